"""fastsae against the peer libraries' own code.

- dictionary_learning: committed trainer folders made by the real trainer classes (tests/peers.py) load as the
  architecture each trained, with outputs equal to the class's own encode/forward, on every backend; with
  dictionary_learning importable, fresh checkpoints are made and compared at test time too.
- SAELens / sparsify (skipped when not importable; run these with the peers venv's python): every exported
  folder loads with the library's own loader and gives fastsae's outputs; fastsae -> SAELens -> fastsae round
  trips, in memory and on disk.
- ``ae.pt`` files are read without unpickling: a planted pickle never runs, and malformed archives are refused.
"""
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import fastsae
from fastsae.io import detect_format
from fastsae.sae import ARCHITECTURES
from fastsae.torchfile import read_state_dict, read_torch_file

import peers
from conftest import BACKENDS

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE_NAMES = sorted(p.name.removeprefix("trainer_") for p in peers.FIXTURES.glob("trainer_*"))
FIXTURES = [pytest.param(n, marks=pytest.mark.skipif(peers.DL_ARCHITECTURES[n] not in ARCHITECTURES,
                                                     reason=f"no fastsae {peers.DL_ARCHITECTURES[n]} SAE yet"))
            for n in FIXTURE_NAMES]
ARCHS = {
    "topk": lambda: fastsae.TopKSAE(10, 24, 4),
    "topk_uncentred": lambda: fastsae.TopKSAE(10, 24, 4, apply_b_dec_to_input=False),
    "batchtopk": lambda: fastsae.BatchTopKSAE(10, 24, 4),
    "jumprelu": lambda: fastsae.JumpReLUSAE(10, 24),  # the defaults: b_dec subtracted from the input
    "jumprelu_uncentred": lambda: fastsae.JumpReLUSAE(10, 24, apply_b_dec_to_input=False),
    "jumprelu_target_l0": lambda: fastsae.JumpReLUSAE(10, 24, target_l0=4.0),
    "relu": lambda: fastsae.ReLUSAE(10, 24),
    "gated": lambda: fastsae.GatedSAE(10, 24),
    "matryoshka_batchtopk": lambda: fastsae.MatryoshkaBatchTopKSAE(10, 24, 4, widths=[6, 12]),
}


def _expected(name):
    from safetensors.torch import load_file

    return load_file(str(peers.FIXTURES / f"trainer_{name}" / "expected.safetensors"))


def _randomized(make):
    return peers.randomized(make())


def test_every_dictionary_class_has_a_fixture():
    assert set(FIXTURE_NAMES) == set(peers.DL_CASES)


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dictionary_learning_checkpoint_loads_as_its_architecture(name, backend):
    folder = peers.FIXTURES / f"trainer_{name}"
    assert detect_format(folder) == "dictionary_learning"
    sae = fastsae.load(folder, backend=backend)
    assert sae.architecture == peers.DL_ARCHITECTURES[name]
    exp = _expected(name)
    torch.testing.assert_close(sae.encode(exp["x"]), exp["f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(exp["x"]), exp["x_hat"], rtol=1e-5, atol=1e-5)
    # the ae.pt alone (its config.json beside it) loads the same
    torch.testing.assert_close(fastsae.load(folder / "ae.pt", backend=backend)(exp["x"]), exp["x_hat"],
                               rtol=1e-5, atol=1e-5)


def test_dictionary_learning_checkpoint_in_checkpoints_folder(tmp_path):
    folder = tmp_path / "trainer_0"
    shutil.copytree(peers.FIXTURES / "trainer_topk", folder)
    (folder / "checkpoints").mkdir()
    shutil.move(folder / "ae.pt", folder / "checkpoints" / "ae_500.pt")
    exp = _expected("topk")
    torch.testing.assert_close(fastsae.load(folder / "checkpoints" / "ae_500.pt")(exp["x"]), exp["x_hat"])


def test_dictionary_learning_batchtopk_is_never_a_relu_sae():
    """SAELens #608: BatchTopK checkpoints loaded as ReLU SAEs gave dense, wrong activations."""
    sae = fastsae.load(peers.FIXTURES / "trainer_batchtopk")
    exp = _expected("batchtopk")
    relu = torch.relu((exp["x"] - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert float(sae.threshold) == pytest.approx(0.3)
    assert (sae.encode(exp["x"]) != 0).sum() < (relu != 0).sum()


def test_dictionary_learning_k_must_agree(tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(peers.FIXTURES / "trainer_topk", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["k"] = peers.K + 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trainer.k"):
        fastsae.load(folder)


def test_dictionary_learning_unknown_class_is_named(tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(peers.FIXTURES / "trainer_standard", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "CrossCoder"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="CrossCoder"):
        fastsae.load(folder)


@pytest.mark.skipif(peers.dictionary_learning() is None, reason="dictionary_learning is not importable")
@pytest.mark.parametrize("name", sorted(peers.DL_CASES))
def test_dictionary_learning_live_checkpoints(tmp_path, name):
    ae = peers.make_checkpoint(name, tmp_path / "trainer", seed=1234)
    sae = fastsae.load(tmp_path / "trainer")
    x = torch.randn(13, peers.D_IN) * 2
    with torch.no_grad():
        torch.testing.assert_close(sae(x), ae(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), ae.encode(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# ae.pt is read without unpickling
# ---------------------------------------------------------------------------------------------------------------


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_torch_file_reader_matches_torch_and_never_runs_code(tmp_path):
    tensors = {"a": torch.randn(5, 3).t(), "b": torch.arange(20.0)[3:15].view(3, 4)[:, ::2],
               "c": torch.randn(4).bfloat16(), "d": torch.tensor([True, False]), "e": torch.empty(0, 3),
               "k": torch.tensor(7, dtype=torch.int32), "p": torch.nn.Parameter(torch.ones(2))}
    for protocol in (2, 4):
        torch.save(tensors, tmp_path / f"ok{protocol}.pt", pickle_protocol=protocol)
        back = read_state_dict(tmp_path / f"ok{protocol}.pt")
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v.detach()), k
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pt")  # OrderedDict with _metadata
    assert set(read_state_dict(tmp_path / "linear.pt")) == {"weight", "bias"}

    marker = tmp_path / "PWNED"
    _Evil.marker = marker
    torch.save({"W_enc": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        read_torch_file(tmp_path / "evil.pt")
    folder = tmp_path / "trainer"
    shutil.copytree(peers.FIXTURES / "trainer_jumprelu", folder)
    shutil.copy(tmp_path / "evil.pt", folder / "ae.pt")
    with pytest.raises(ValueError, match="ae.pt"):
        fastsae.load(folder)
    assert not marker.exists()


def _rewrite(src: Path, dst: Path, edit, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", compress) as out:
        for info in z.infolist():
            out.writestr(info.filename, edit(info.filename, z.read(info)))


def test_torch_file_reader_refuses_malformed_archives(tmp_path):
    src = tmp_path / "ok.pt"
    torch.save({"w": torch.randn(4, 3)}, src)
    pkl = lambda name: name.endswith("data.pkl")  # noqa: E731
    cases = {
        "compressed": (lambda n, b: b, zipfile.ZIP_DEFLATED, "compressed"),
        # the storage says 12 elements; a view claiming 5x3 would read past it
        "overrun": (lambda n, b: b.replace(b"K\x04K\x03\x86", b"K\x05K\x03\x86") if pkl(n) else b,
                    zipfile.ZIP_STORED, "reaches past"),
        "short storage": (lambda n, b: b[:-4] if n.endswith("data/0") else b, zipfile.ZIP_STORED, "holds"),
        "other global": (lambda n, b: b.replace(b"collections\nOrderedDict", b"builtins\nprint\n\n\n\n\n\n\n\n\n")
                         if pkl(n) else b, zipfile.ZIP_STORED, "builtins"),
    }
    for what, (edit, compress, message) in cases.items():
        dst = tmp_path / f"{what.replace(' ', '_')}.pt"
        _rewrite(src, dst, edit, compress)
        with pytest.raises(ValueError, match=message):
            read_torch_file(dst)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle, as torch.save wrote before 1.6
    with pytest.raises(ValueError, match="not a torch.save zip"):
        read_torch_file(legacy)


# ---------------------------------------------------------------------------------------------------------------
# SAELens and sparsify, with the real libraries
# ---------------------------------------------------------------------------------------------------------------


def _sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_saelens_loads_the_export_with_equal_outputs(tmp_path, arch):
    sae_lens = _sae_lens()
    sae = _randomized(ARCHS[arch])
    sae.save(tmp_path / "out", format="saelens", metadata={"hook_name": "blocks.0.hook_resid_post"})
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "out")
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = torch.randn(17, sae.d_in) * 2
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)
    # back through SAELens' own writer into fastsae
    theirs.save_model(tmp_path / "again")
    back = fastsae.load(tmp_path / "again")
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_to_and_from_saelens_in_memory(arch):
    _sae_lens()
    sae = _randomized(ARCHS[arch])
    theirs = fastsae.to_saelens(sae)
    back = fastsae.from_saelens(theirs)
    x = torch.randn(11, sae.d_in)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)
    if arch not in ("batchtopk", "matryoshka_batchtopk"):  # BatchTopK comes back as the JumpReLU SAE it is at inference
        assert back.architecture == sae.architecture


def test_from_saelens_training_batchtopk():
    sae_lens = _sae_lens()
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=10, d_sae=24, k=4))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
        theirs.topk_threshold.fill_(0.25)
    ours = fastsae.from_saelens(theirs)
    inference = sae_lens.SAE.from_dict(theirs.cfg.get_inference_sae_cfg_dict())
    state = theirs.state_dict()
    theirs.process_state_dict_for_saving_inference(state)
    inference.load_state_dict(state)
    x = torch.randn(9, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), inference(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_peers_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="calibrated"):
        fastsae.BatchTopKSAE(6, 12, 2).save(tmp_path / "a", format="saelens")
    with pytest.raises(ValueError, match="TopK SAEs only"):
        fastsae.JumpReLUSAE(6, 12).save(tmp_path / "b", format="sparsify")
    with pytest.raises(ValueError, match="format must be one of"):
        fastsae.TopKSAE(6, 12, 2).save(tmp_path / "c", format="onnx")


@pytest.mark.parametrize("centred", [True, False])
def test_sparsify_loads_the_export_with_equal_outputs(tmp_path, centred, monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    import sparsify.sparse_coder
    import sparsify.utils

    # sparsify's Triton decoder needs a GPU; its eager one is the same sum
    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", sparsify.utils.eager_decode)
    sae = _randomized(lambda: fastsae.TopKSAE(10, 24, 4, apply_b_dec_to_input=centred))
    sae.save(tmp_path / "sp", format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sp")
    x = torch.randn(15, 10)
    with torch.no_grad():
        out = theirs(x)
        torch.testing.assert_close(out.sae_out, sae(x), rtol=1e-5, atol=1e-5)
        values, indices = sae.encode_sparse(x)
        dense = torch.zeros(15, 24).scatter(1, out.latent_indices, out.latent_acts)
        torch.testing.assert_close(dense, sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fastsae.load(tmp_path / "sp")(x), sae(x), rtol=1e-5, atol=1e-5)


def test_export_files_load_in_fastsae_without_peers(tmp_path):
    """Every export also reads back into fastsae (no peer library needed) with equal outputs."""
    x = torch.randn(8, 10)
    for arch, make in ARCHS.items():
        sae = _randomized(make)
        formats = ["saelens"] + (["sparsify"] if sae.architecture == "topk" else [])
        for fmt in formats:
            sae.save(tmp_path / arch / fmt, format=fmt)
            back = fastsae.load(tmp_path / arch / fmt)
            torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5, msg=f"{arch} {fmt}")
            assert back.architecture in ARCHITECTURES


def test_cli_export(tmp_path, capsys):
    from fastsae.cli import main

    src = peers.FIXTURES / "trainer_jumprelu"
    assert main(["export", "--sae", str(src), "--format", "saelens", "--out", str(tmp_path / "sl"),
                 "--hook-name", "blocks.3.hook_mlp_out", "--model-name", "gpt2"]) == 0
    assert "max |difference| 0" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["hook_name"] == "blocks.3.hook_mlp_out"
    exp = _expected("jumprelu")
    torch.testing.assert_close(fastsae.load(tmp_path / "sl")(exp["x"]), exp["x_hat"], rtol=1e-5, atol=1e-5)
    # a non-empty --out is refused unless --overwrite
    assert main(["export", "--sae", str(src), "--format", "saelens", "--out", str(tmp_path / "sl")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--sae", str(tmp_path / "sl"), "--format", "fastsae", "--out", str(tmp_path / "sl"),
                 "--overwrite"]) == 0
    assert detect_format(tmp_path / "sl") == "fastsae"
    # sparsify is TopK only: named, exit status 2
    assert main(["export", "--sae", str(src), "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 2
    assert "TopK SAEs only" in capsys.readouterr().err
