"""Nothing unsafe, nothing silent (issue 13): one test per class of what an attack on the package found.

1. nothing fastsae reads can execute code  2. tensors on mixed devices are refused  3. non-finite state stops
training  4. bad data is named, never read outside a file, never SIGBUS  5. malformed configs and checkpoints are
refused before anything large is allocated  6. resume is exact for every configuration; saves survive crashes and
full disks  7. the command line.

A case that could crash the interpreter (SIGBUS, a kernel reading a meta tensor's null pointer, an allocation of
terabytes) runs in a child process that prints one line per case; the parent asserts on those lines.
"""
import errno
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastsae
from fastsae import io as fio
from fastsae.cli import build_parser, main
from fastsae.data import IterableSource, ShardSource
from fastsae.training import CHECKPOINT, FiniteCheck, load_checkpoint, train, train_step

from conftest import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _child(code: str, timeout: int = 240) -> str:
    """Run ``code`` in a fresh interpreter; it must exit normally (no SIGBUS/SIGSEGV); return its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, f"child exited with {r.returncode} (negative: killed by that signal)\n{r.stderr[-3000:]}"
    return r.stdout


_CASES = '''
def case(name, fn):
    try:
        fn()
        print(f"{name}|no error|")
    except Exception as e:
        print(f"{name}|{type(e).__name__}|{' '.join(str(e).split())}")
'''


def _parse(out: str) -> dict:
    rows = [line.split("|", 2) for line in out.splitlines() if line.count("|") >= 2]
    return {name: (kind, msg) for name, kind, msg in rows}


def _sae_files(folder: Path, arch="topk") -> Path:
    sae = fastsae.TopKSAE(6, 12, 2) if arch == "topk" else fastsae.JumpReLUSAE(6, 12)
    sae.save(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# 1. Nothing fastsae reads may execute code
# ---------------------------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_pickle(marker: Path) -> bytes:
    _Evil.marker = marker
    return pickle.dumps({"payload": _Evil()})


def test_no_reader_in_fastsae_can_unpickle():
    forbidden = ("weights_only=False", "pickle.load", "allow_pickle=True", "torch.load(", "import pickle")
    for path in (ROOT / "fastsae").rglob("*.py"):
        text = path.read_text()
        for word in forbidden:
            assert word not in text, f"{path.relative_to(ROOT)} contains {word!r}"


def test_a_planted_pickle_never_runs_anywhere_fastsae_reads(tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_pickle(marker)
    torch_evil = tmp_path / "torch_evil.pt"
    _Evil.marker = marker
    torch.save({"model": _Evil()}, torch_evil)  # the zip container torch.save writes
    data = torch.randn(200, 6)
    checks = []

    # run folder: an old-format checkpoint.pt, and pickles under the new name
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(torch_evil.read_bytes())
    checks.append(("run folder checkpoint.pt", lambda: train(fastsae.TopKSAE(6, 12, 2), data, steps=2, batch_size=32,
                                                             checkpoint_dir=run, resume=True, progress=False),
                   "old pickle format"))
    for i, blob in enumerate((evil, torch_evil.read_bytes())):
        r = tmp_path / f"run{i}"
        r.mkdir()
        (r / CHECKPOINT).write_bytes(blob)
        checks.append((f"run folder {CHECKPOINT} #{i}", lambda r=r: train(
            fastsae.TopKSAE(6, 12, 2), data, steps=2, batch_size=32, checkpoint_dir=r, resume=True, progress=False),
            CHECKPOINT))
    # SAE folders: fastsae, SAELens, sparsify weights; Gemma Scope params.npz holding a pickled object array
    for name, cfg_name, weights in (("fastsae", "config.json", "sae.safetensors"),
                                    ("saelens", "cfg.json", "sae_weights.safetensors")):
        d = tmp_path / name
        _sae_files(d)
        if cfg_name != "config.json":
            (d / "config.json").rename(d / cfg_name)
            (d / "sae.safetensors").unlink()
        (d / weights).write_bytes(evil)
        checks.append((f"SAE folder {name}", lambda d=d: fastsae.load(d), weights))
    dl = tmp_path / "dictionary_learning"  # ae.pt is a torch.save zip: read without unpickling
    dl.mkdir()
    (dl / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "k": 2}}))
    (dl / "ae.pt").write_bytes(torch_evil.read_bytes())
    checks.append(("dictionary_learning ae.pt", lambda: fastsae.load(dl), "ae.pt"))
    gs = tmp_path / "gemma"
    gs.mkdir()
    obj = np.empty(1, dtype=object)
    obj[0] = _Evil()
    np.savez(gs / "params.npz", W_enc=obj)  # numpy pickles object arrays into the .npy members
    checks.append(("Gemma Scope params.npz", lambda: fastsae.load(gs / "params.npz"), "params.npz"))
    # shard folders: a pickled .npy object array, a pickle named .safetensors
    for suffix in (".npy", ".safetensors"):
        d = tmp_path / f"shards{suffix}"
        d.mkdir()
        np.save(d / "a.npy", np.ones((4, 6), np.float32))
        if suffix == ".npy":
            np.save(d / "b.npy", obj, allow_pickle=True)
        else:
            (d / "b.safetensors").write_bytes(evil)
        checks.append((f"shard folder {suffix}", lambda d=d: ShardSource(d), f"b{suffix}"))
    # sharded checkpoint: shard and optimizer files replaced by pickles
    sharded = tmp_path / "sharded"
    _write_sharded(sharded)
    (sharded / "shard-00000-of-00001.safetensors").write_bytes(evil)
    manifest = json.loads((sharded / "shards.json").read_text())
    manifest["shards"][0]["bytes"] = len(evil)
    (sharded / "shards.json").write_text(json.dumps(manifest))
    checks.append(("sharded checkpoint shard", lambda: fastsae.load(sharded), "shard-00000-of-00001.safetensors"))
    opt_dir = tmp_path / "sharded_opt"
    sae, opt = _write_sharded(opt_dir)
    (opt_dir / "optim-00000-of-00001.safetensors").write_bytes(evil)
    from fastsae.distributed import load_optimizer_shard

    checks.append(("sharded checkpoint optimizer", lambda: load_optimizer_shard(opt_dir, opt),
                   "optim-00000-of-00001.safetensors"))

    for what, fn, named in checks:
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            fn()
        assert not marker.exists(), f"{what}: the planted pickle ran"


def _write_sharded(path: Path):
    from fastsae import distributed as fd

    sae = fd.ShardedSAE.from_full(fastsae.TopKSAE(6, 12, 2), fd.Grid())
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_forward(torch.randn(8, 6)).loss.backward()
    opt.step()
    fd.save_sharded(sae, path, optimizer=opt)
    return sae, opt


# ---------------------------------------------------------------------------------------------------------------
# 2. Tensors on mixed devices
# ---------------------------------------------------------------------------------------------------------------


def test_mixed_devices_are_refused_naming_the_argument():
    out = _parse(_child(_CASES + f'''
import torch, fastsae
for b in {BACKENDS!r}:
    meta = lambda *s: torch.empty(*s, device="meta")
    case(f"{{b}} jumprelu threshold", lambda: fastsae.jumprelu(torch.randn(4, 8), meta(8), backend=b))
    case(f"{{b}} step bandwidth", lambda: fastsae.step(torch.randn(4, 8), torch.rand(8), meta(8), backend=b))
    case(f"{{b}} jumprelu pre", lambda: fastsae.jumprelu(meta(4, 8), torch.rand(8), backend=b))
    case(f"{{b}} decode W_dec", lambda: fastsae.sparse_decode(torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.long),
                                                              meta(8, 5), backend=b))
    case(f"{{b}} decode b_dec", lambda: fastsae.sparse_decode(torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.long),
                                                              torch.randn(8, 5), meta(5), backend=b))
'''))
    for b in BACKENDS:
        for case, arg in (("jumprelu threshold", "threshold"), ("step bandwidth", "bandwidth"),
                          ("jumprelu pre", "threshold"), ("decode W_dec", "W_dec"), ("decode b_dec", "b_dec")):
            kind, msg = out[f"{b} {case}"]
            assert kind == "ValueError" and arg in msg and "meta" in msg, (b, case, kind, msg)


def test_a_meta_device_in_a_config_or_load_is_refused(tmp_path):
    d = _sae_files(tmp_path / "sae")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, device="meta")))
    with pytest.raises(ValueError, match="config.json.*'device'"):
        fastsae.load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="meta"):
        fastsae.load(d, device="meta")


def test_module_methods_refuse_mixed_devices():
    out = _parse(_child(_CASES + f'''
import torch, fastsae
for b in {BACKENDS!r}:
    sae = fastsae.TopKSAE(5, 8, 2, backend=b, device="meta")
    x = torch.randn(3, 5)
    case(f"{{b}} forward", lambda: sae(x))
    case(f"{{b}} training_forward", lambda: sae.training_forward(x))
    case(f"{{b}} decode", lambda: sae.decode(torch.randn(3, 8)))
'''))
    for b in BACKENDS:
        for case in ("forward", "training_forward", "decode"):
            kind, msg = out[f"{b} {case}"]
            assert kind == "ValueError" and "meta" in msg, (b, case, kind, msg)


# ---------------------------------------------------------------------------------------------------------------
# 3. Non-finite parameters, gradients, Adam state
# ---------------------------------------------------------------------------------------------------------------


def _small(arch, backend):
    torch.manual_seed(0)
    if arch == "topk":
        return fastsae.TopKSAE(8, 16, 2, backend=backend)
    return fastsae.JumpReLUSAE(8, 16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_state_stops_training_naming_step_and_tensor(tmp_path, backend):
    good = [torch.randn(32, 8) for _ in range(6)]
    kw = dict(batch_size=32, checkpoint_every=2, log_every=4, scale_inputs=False, init_b_dec=False, progress=False)
    for arch in ("topk", "jumprelu"):
        # A NaN decoder row of a latent that never fires leaves the loss finite: the parameter itself is checked.
        sae = _small(arch, backend)
        with torch.no_grad():
            sae.W_dec[3] = float("nan")
        with pytest.raises(FloatingPointError, match="step 0: parameter W_dec"):
            train(sae, good, steps=4, checkpoint_dir=tmp_path / f"{arch}-nanrow", **kw)
        assert not (tmp_path / f"{arch}-nanrow" / CHECKPOINT).exists()
        # An outlier row (1e17) keeps the loss and the gradients finite, but their squares overflow: Adam's
        # second moment would become inf for good. Caught at that step; no checkpoint holds it.
        bad = torch.randn(32, 8)
        bad[7] = 1e17
        d = tmp_path / f"{arch}-outlier"
        with pytest.raises(FloatingPointError, match="step 6: the gradient of W_dec .*written after 6 steps"):
            train(_small(arch, backend), good + [bad] + good, steps=12, checkpoint_dir=d, **kw)
        ck = load_checkpoint(d / CHECKPOINT)
        assert ck["step"] == 6
        assert all(bool(torch.isfinite(t).all()) for t in ck["tensors"].values() if t.is_floating_point())


def test_the_per_step_check_never_reads_back_to_the_host(monkeypatch):
    sae = fastsae.TopKSAE(8, 16, 2)
    check = FiniteCheck(sae, 0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(16, 8)
    x[0, 0] = float("nan")
    out = sae.training_forward(x)
    out.loss.backward()
    opt.step()

    def sync(*args, **kwargs):
        raise AssertionError("a device->host read during FiniteCheck.record")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, sync)
        check.record(x, out.loss)
        check.record(x, out.loss)
    with pytest.raises(FloatingPointError, match="step 0: the input batch contains NaN"):
        check.raise_if_bad()
    # a hand-written loop without a check object is checked at once (and a module already NaN is refused)
    with pytest.raises(FloatingPointError, match="cannot start at step 3: parameter W_dec"):
        train_step(sae, opt, x, step=3, dead_mask=None, sparsity_coefficient=None)
    sae = fastsae.TopKSAE(8, 16, 2)
    with pytest.raises(FloatingPointError, match="step 4: the input batch"):
        train_step(sae, torch.optim.Adam(sae.parameters()), x, step=4, dead_mask=None, sparsity_coefficient=None)


def test_ranks_agree_on_non_finite_state(tmp_path):
    """Under torch.distributed every rank stops at the same read, also when only one rank's state is bad."""
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    code = textwrap.dedent(f'''
        import sys, torch, torch.distributed as dist, fastsae
        from fastsae.training import FiniteCheck
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        torch.manual_seed(0)
        sae = fastsae.TopKSAE(8, 16, 2)
        if rank == 1:
            with torch.no_grad():
                sae.W_dec[2] = float("nan")
        try:
            FiniteCheck(sae, 7)
        except FloatingPointError as e:
            print("init:", e)
        sae = fastsae.TopKSAE(8, 16, 2)
        check = FiniteCheck(sae, 0)
        x = torch.randn(16, 8)
        if rank == 1:
            x[3, 3] = float("inf")
        out = sae.training_forward(x)
        out.loss.backward()
        check.record(x, out.loss)
        try:
            check.raise_if_bad()
        except FloatingPointError as e:
            print("step:", e)
        dist.destroy_process_group()
    ''')
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in (0, 1)]
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        outs.append(out)
    assert "init: training cannot start at step 7: the SAE's state on another rank" in outs[0], outs[0]
    assert "init: training cannot start at step 7: parameter W_dec" in outs[1], outs[1]
    for out in outs:
        assert "step: training stopped at step 0: the input batch contains NaN or inf" in out, out


# ---------------------------------------------------------------------------------------------------------------
# 4. Data
# ---------------------------------------------------------------------------------------------------------------


def test_empty_batches_raise_instead_of_training_a_nan_sae():
    with pytest.raises(ValueError, match="all 3 batches of the iterable are empty"):
        IterableSource([torch.empty(0, 8)] * 3)
    with pytest.raises(ValueError, match="no rows"):
        train(fastsae.TopKSAE(8, 16, 2), [torch.empty(0, 8), torch.empty(0, 8)], steps=2, progress=False)
    with pytest.raises(ValueError, match="no batch of batch_size=64"):  # fewer rows than one batch, read once
        train(fastsae.TopKSAE(8, 16, 2), iter([torch.randn(10, 8)]), steps=2, batch_size=64, progress=False,
              init_b_dec=False, input_scale=1.0)


def test_shards_truncated_or_rewritten_while_training_raise_not_sigbus(tmp_path):
    out = _parse(_child(_CASES + f'''
import numpy as np, torch, os
from safetensors.torch import save_file
from fastsae.data import ShardSource, batches
root = {str(tmp_path)!r}
for kind in ("npy", "safetensors"):
    d = os.path.join(root, kind); os.makedirs(d)
    f = os.path.join(d, "a." + kind)
    arr = np.random.default_rng(0).normal(size=(20000, 64)).astype(np.float32)
    np.save(f, arr) if kind == "npy" else save_file({{"activations": torch.from_numpy(arr)}}, f)
    src = ShardSource(d, block_rows=512, buffer_rows=1024)
    it = batches(src, 256)
    next(it)
    size = os.path.getsize(f)
    os.truncate(f, size // 3)  # with a memory map, touching the lost pages is SIGBUS
    case(kind + " truncated", lambda: [next(it) for _ in range(200)])
    case(kind + " opened truncated", lambda: ShardSource(d))
    np.save(f, arr) if kind == "npy" else save_file({{"activations": torch.from_numpy(arr)}}, f)
    src = ShardSource(d)
    it = batches(src, 256)
    with open(f, "r+b") as fh:  # rewritten in place, same size
        fh.seek(size - 8); fh.write(b"12345678")
    case(kind + " rewritten", lambda: next(it))
'''))
    for kind in ("npy", "safetensors"):
        for case, says in (("truncated", "changed on disk"), ("opened truncated", "truncated"),
                           ("rewritten", "changed on disk")):
            got, msg = out[f"{kind} {case}"]
            assert got == "ValueError" and f"a.{kind}" in msg and says in msg, (kind, case, got, msg)


def _st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_headers_with_bad_offsets_are_refused(tmp_path):
    f32 = lambda offsets, shape=(2, 2): dict(dtype="F32", shape=list(shape), data_offsets=offsets)  # noqa: E731
    cases = {
        "negative": ({"activations": f32([-16, 0])}, 16),
        "past the end": ({"activations": f32([0, 16])}, 8),
        "overlapping": ({"activations": f32([0, 16]), "b": f32([8, 24])}, 24),
        "gap": ({"activations": f32([8, 24])}, 24),
        "size mismatch": ({"activations": f32([0, 12])}, 16),
        "unknown dtype": ({"activations": dict(dtype="F128", shape=[2], data_offsets=[0, 32])}, 32),
        "bool shape": ({"activations": f32([0, 16], shape=(True, 4))}, 16),
        "huge header length": (None, 0),
    }
    for name, (header, n) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        if header is None:
            path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
        else:
            path.write_bytes(_st_bytes(header, bytes(n)))
    out = _parse(_child(_CASES + f'''
import glob
from fastsae.data import ShardSource
from fastsae.io import read_safetensors
for f in sorted(glob.glob({str(tmp_path)!r} + "/*.safetensors")):
    case("shard " + f, lambda: ShardSource([f]))
    case("file " + f, lambda: read_safetensors(f))
'''))
    assert len(out) == 2 * len(cases)
    for name, (kind, msg) in out.items():
        assert kind == "ValueError" and name.split(" ", 1)[1] in msg, (name, kind, msg)


def test_manifests_may_not_point_outside_their_folder(tmp_path):
    outside = tmp_path / "secret.npy"
    np.save(outside, np.ones((4, 3), np.float32))
    d = tmp_path / "acts"
    d.mkdir()
    np.save(d / "a.npy", np.ones((4, 3), np.float32))
    (d / "link.npy").symlink_to(outside)
    from fastsae import activations as act

    for name in ("../secret.npy", str(outside), "link.npy", "sub/../../secret.npy", ""):
        (d / "manifest.json").write_text(json.dumps(dict(format=act.FORMAT, d_in=3, dtype="float32", n_tokens=4,
                                                         shards=[dict(file="a.npy"), dict(file=name)])))
        with pytest.raises(ValueError, match="manifest.json"):
            ShardSource(d)
        with pytest.raises(ValueError, match="manifest.json"):
            act.read_manifest(d)
    # sharded checkpoints: shards.json and a training run's checkpoint.json
    sharded = tmp_path / "sharded"
    _write_sharded(sharded)
    m = json.loads((sharded / "shards.json").read_text())
    m["shards"][0]["file"] = "../secret.npy"
    m["shards"][0]["bytes"] = outside.stat().st_size
    (sharded / "shards.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="shards.json.*outside"):
        fastsae.load(sharded)
    from fastsae.distributed import Grid, TrainingContext

    ctx = TrainingContext.__new__(TrainingContext)
    ctx.grid = Grid(rank=0, world_size=2, latent_rank=0, latent_size=2)
    (tmp_path / "checkpoint.json").write_text(json.dumps(dict(step=1, files=["../x.safetensors", "b"])))
    with pytest.raises(ValueError, match="checkpoint.json.*outside"):
        ctx.checkpoint_path(tmp_path / CHECKPOINT)


# ---------------------------------------------------------------------------------------------------------------
# 5. Malformed configs and checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_malformed_config_fields_name_file_and_field(tmp_path):
    d = _sae_files(tmp_path / "sae")
    good = json.loads((d / "config.json").read_text())
    bad_fields = {
        "d_sae": "12",  # a string for an int
        "k": 2.0,
        "architecture": ["topk"],  # a list for a string
        "apply_b_dec_to_input": "false",  # a string boolean (truthy!)
        "aux_coefficient": float("nan"),
        "fastsae": 2,  # unknown format version
        "dtype": "float8",
        "surprise": 1,  # an unknown field
    }
    for field, value in bad_fields.items():
        (d / "config.json").write_text(json.dumps(dict(good, **{field: value})))
        with pytest.raises(ValueError, match=rf"config\.json.*{field if field != 'fastsae' else 'version'}"):
            fastsae.load(d)
    (d / "config.json").write_text(json.dumps(dict(good, d_sae=13)))
    with pytest.raises(ValueError, match=r"config\.json.*W_dec has shape \[12, 6\].*d_sae=13"):
        fastsae.load(d)
    # foreign formats: SAELens cfg.json, sparsify cfg.json
    sl = tmp_path / "saelens"
    sl.mkdir()
    src = fastsae.TopKSAE(6, 12, 2).state_dict()
    fio.write_safetensors(sl / "sae_weights.safetensors", {k: src[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
    base = dict(architecture="topk", d_in=6, d_sae=12, k=2)
    for field, value in (("apply_b_dec_to_input", "false"), ("d_sae", 10**12), ("architecture", ["topk"]),
                         ("rescale_acts_by_decoder_norm", "false"), ("k", "2")):
        (sl / "cfg.json").write_text(json.dumps(dict(base, **{field: value})))
        with pytest.raises(ValueError, match=rf"(cfg\.json|safetensors).*{'W_enc' if field == 'd_sae' else field}"):
            fastsae.load(sl)
    sp = tmp_path / "sparsify"
    sp.mkdir()
    fio.write_safetensors(sp / "sae.safetensors", {"encoder.weight": src["W_enc"].t().contiguous(),
                                                   "encoder.bias": src["b_enc"], "W_dec": src["W_dec"],
                                                   "b_dec": src["b_dec"]})
    for field, value in (("transcode", "false"), ("k", True), ("d_in", "6"), ("num_latents", 99)):
        (sp / "cfg.json").write_text(json.dumps(dict(dict(k=2), **{field: value})))
        with pytest.raises(ValueError, match=rf"cfg\.json.*{field}"):
            fastsae.load(sp)


def test_an_absurd_d_sae_is_refused_before_anything_is_allocated(tmp_path):
    d = _sae_files(tmp_path / "sae")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, d_sae=10**11)))  # 2.4 TB of weights
    sharded = tmp_path / "sharded"
    _write_sharded(sharded)
    m = json.loads((sharded / "shards.json").read_text())
    m["config"]["d_sae"] = 10**11
    (sharded / "shards.json").write_text(json.dumps(m))
    out = _parse(_child(_CASES + f'''
import resource, fastsae
from fastsae.distributed import load_shard
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # an allocation attempt would fail, not swap
case("config.json", lambda: fastsae.load({str(d)!r}))
case("shards.json", lambda: fastsae.load({str(sharded)!r}))
case("shards.json resume", lambda: load_shard({str(sharded)!r}))
'''))
    for name in ("config.json", "shards.json", "shards.json resume"):
        kind, msg = out[name]
        assert kind == "ValueError" and name.split()[0] in msg and "d_sae=100000000000" in msg, (kind, msg)


@pytest.mark.filterwarnings("ignore:resuming .* with steps")
def test_a_checkpoint_for_another_module_is_refused(tmp_path):
    data = torch.randn(300, 8)
    train(fastsae.TopKSAE(8, 16, 2), data, steps=2, batch_size=32, checkpoint_dir=tmp_path, progress=False)
    kw = dict(steps=3, batch_size=32, checkpoint_dir=tmp_path, resume=True, progress=False)
    for other, says in ((fastsae.JumpReLUSAE(8, 16), "architecture='topk'"), (fastsae.TopKSAE(8, 24, 2), "d_sae=16"),
                        (fastsae.TopKSAE(8, 16, 2, dtype=torch.float64), "dtype='float32'"),
                        (fastsae.BatchTopKSAE(8, 16, 2), "architecture")):
        with pytest.raises(ValueError, match=rf"{CHECKPOINT}.*{says}"):
            train(other, data, **kw)
    with pytest.warns(UserWarning, match="k=3.*used 2"):  # not structural: resumed, and said aloud
        train(fastsae.TopKSAE(8, 16, 3), data, **kw)


# ---------------------------------------------------------------------------------------------------------------
# 6. Exact resume; crash- and full-disk-safe saves
# ---------------------------------------------------------------------------------------------------------------


class _ControlledSAE(fastsae.JumpReLUSAE):
    """Stands in for state a module may add later (e.g. a target-L0 controller): a non-persistent buffer and a
    private counter, both updated every step and both steering the loss."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.register_buffer("_controller", torch.zeros(()), persistent=False)
        self._ticks = 0

    def observe(self, x, out):
        super().observe(x, out)
        self._ticks += 1
        self._controller.add_(out.l0.detach().float() * 1e-3 + self._ticks * 1e-4)

    def _training_forward(self, x, dead_mask, coefficient):
        out = super()._training_forward(x, dead_mask, coefficient)
        out.loss = out.loss + self._controller * out.sparsity
        return out


_RESUMABLE = {
    "adaptive": lambda: fastsae.JumpReLUSAE(12, 40, bandwidth="adaptive", sparsity_coefficient=0.05,
                                            adaptive=dict(every=2, sample_rows=16)),
    "batchtopk": lambda: fastsae.BatchTopKSAE(12, 40, 3),
    "gated": lambda: fastsae.GatedSAE(12, 40),
    "future-state": lambda: _ControlledSAE(12, 40, sparsity_coefficient=0.05),
}


@pytest.mark.parametrize("config", sorted(_RESUMABLE))
def test_resume_is_exact_for_every_configuration(tmp_path, config):
    from fastsae.data import synthetic

    data = synthetic(2000, 12, 24, active=2, seed=3).x
    kw = dict(steps=9, batch_size=64, log_every=1, progress=False, dead_after=200, seed=5, checkpoint_every=4)

    def make():
        torch.manual_seed(11)
        return _RESUMABLE[config]()

    full = train(make(), data, checkpoint_dir=tmp_path / "a", **kw)

    class Stop(Exception):
        pass

    def stop(record):
        if record["step"] == 5:
            raise Stop

    with pytest.raises(Stop):
        train(make(), data, checkpoint_dir=tmp_path / "b", callback=stop, **kw)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 4
    fresh = make()
    with torch.no_grad():
        for t in list(fresh.parameters()) + [b for b in fresh.buffers() if b.is_floating_point()]:
            t.add_(0.5)  # resume must not depend on the new module's state
    resumed = train(fresh, data, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in full.metrics]
    mine = dict(resumed.sae.named_buffers(), **dict(resumed.sae.named_parameters()))
    for name, t in dict(full.sae.named_buffers(), **dict(full.sae.named_parameters())).items():
        assert torch.equal(t, mine[name]), name  # non-persistent buffers included
    assert vars(resumed.sae).get("_observed") == vars(full.sae).get("_observed")


@pytest.mark.filterwarnings("ignore:resuming .* with steps")
def test_interrupted_saves_leave_no_temporaries_and_a_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    data = torch.randn(300, 8)
    train(fastsae.TopKSAE(8, 16, 2), data, steps=2, batch_size=32, checkpoint_dir=tmp_path, progress=False)
    stale = tmp_path / f".{CHECKPOINT}.tmp99999"  # a save killed midway by another process
    stale.write_bytes(b"half a checkpoint")
    train(fastsae.TopKSAE(8, 16, 2), data, steps=4, batch_size=32, checkpoint_dir=tmp_path, resume=True,
          progress=False, checkpoint_every=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "metrics.jsonl"]
    before = (tmp_path / CHECKPOINT).read_bytes()

    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fio.os, "fsync", full_disk)
    with pytest.raises(OSError, match=rf"no space left .*{CHECKPOINT}.*unchanged") as e:
        train(fastsae.TopKSAE(8, 16, 2), data, steps=6, batch_size=32, checkpoint_dir=tmp_path, resume=True,
              progress=False, checkpoint_every=1)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(fio.os, "fsync", real_fsync)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "metrics.jsonl"]


def test_checkpoint_files_are_plain_safetensors(tmp_path):
    from safetensors import safe_open

    train(fastsae.JumpReLUSAE(8, 16, bandwidth="adaptive"), torch.randn(300, 8), steps=2, batch_size=32,
          checkpoint_dir=tmp_path, progress=False)
    with safe_open(str(tmp_path / CHECKPOINT), "pt") as f:  # the reference implementation reads ours
        names = set(f.keys())
        meta = json.loads(f.metadata()["fastsae.checkpoint"])
    assert {"module._adaptive_density", "module.bandwidth", "rng.numpy", "optimizer.0.exp_avg_sq"} <= names
    assert meta["counters"][""]["_observed"] == 2 and meta["step"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 7. The command line
# ---------------------------------------------------------------------------------------------------------------

SMALL = ["--d-in", "8", "--n-features", "16", "--width", "32", "--k", "2", "--n-samples", "2000",
         "--batch-size", "64", "--no-progress", "--threads", "1"]


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastsae", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _main(args, capsys) -> tuple[int, str]:
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def test_cli_errors_are_one_line_and_checked_before_any_data(tmp_path, capsys):
    out = str(tmp_path / "run")
    for args, says in ((["--steps", "-1", "--n-samples", "1000000000"], "--steps"), (["--width", "0"], "--width"),
                       (["--k", "99", "--width", "32"], "--k"), (["--data", str(tmp_path / "nope")], "--data"),
                       (["--steps", "many"], "--steps"), (["--device", "meta"], "--device"),
                       (["--resume", "--overwrite"], "--overwrite"), (["--lr", "-1"], "--lr")):
        rc, err = _main(["train", "--out", out, *args], capsys)  # 1e9 samples would take minutes: none are made
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("fastsae: error: ") and says in lines[0], (args, err)
    bad = tmp_path / "bad_shards"
    bad.mkdir()
    (bad / "a.safetensors").write_bytes(struct.pack("<Q", 10) + b'{"a": 1}  ')
    rc, err = _main(["train", "--out", out, "--data", str(bad)], capsys)  # an error from deep inside: one line
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "fastsae: error:" in err and "a.safetensors" in err
    # a real process: no traceback, unless --debug
    r = _cli("train", "--out", out, "--steps", "-1")
    assert r.returncode == 2 and r.stderr.strip() == "fastsae: error: --steps must be a positive integer, got -1"
    r = _cli("train", "--out", out, "--width", "0", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_run_folders_resume_and_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--out", str(out), "--resume", *SMALL]) == 0
    assert "holds no checkpoint; starting a fresh run" in capsys.readouterr().out
    assert main(["train", "--steps", "3", "--out", str(out), *SMALL]) == 2  # a finished run is not overwritten
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--resume" in err and "--overwrite" in err
    with pytest.warns(UserWarning, match="steps=6"):
        assert main(["train", "--steps", "6", "--out", str(out), "--resume", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "this run" in text  # tokens/s counts only the 3 new steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 6 * 64
    assert main(["train", "--steps", "2", "--out", str(out), "--overwrite", *SMALL]) == 0
    capsys.readouterr()
    assert load_checkpoint(out / CHECKPOINT)["step"] == 2
    (out / CHECKPOINT).unlink()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04old")
    assert main(["train", "--steps", "2", "--out", str(out), "--resume", *SMALL]) == 2
    assert "old pickle format" in capsys.readouterr().err
    assert "/fastsae-run/" in (ROOT / ".gitignore").read_text().splitlines()


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastsae", "train", "--steps", "1000000", "--out", str(out),
                             "--log-every", "1", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                              and (out / "metrics.jsonl").read_text().count("\n") >= 3):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "checkpoint written to" in err and "--resume" in err and "Traceback" not in err, err
    step = load_checkpoint(out / CHECKPOINT)["step"]
    assert step >= 3
    resume = err.split("Resume with: ", 1)[1].strip().split()
    assert resume[:3] == ["fastsae", "train", "--steps"] and resume[-1] == "--resume"


def test_help_shows_every_default():
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = sub.choices["train"]
    text = train_parser.format_help()
    for action in train_parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and not isinstance(action, argparse._HelpAction):
            assert str(action.default) in text, action.option_strings
        if action.default is None and action.option_strings and action.help:
            assert "default" in action.help, action.option_strings  # None defaults say what they mean
