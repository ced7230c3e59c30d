"""save/load: the own format round trips exactly; SAELens, sparsify and Gemma Scope layouts load and give
the outputs of those libraries' own forward passes (re-implemented here from their source, a few lines
each); corrupt or truncated files raise ValueError naming the file."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fastsae
from fastsae.io import detect_format

D_IN, D_SAE = 12, 40


def _randomize(sae):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if name in ("threshold", "r_mag") else 0.5))
            if name == "threshold":
                p.abs_()
    return sae


ARCHS = {
    "topk": lambda: fastsae.TopKSAE(D_IN, D_SAE, 5),
    "batchtopk": lambda: fastsae.BatchTopKSAE(D_IN, D_SAE, 5),
    "jumprelu": lambda: fastsae.JumpReLUSAE(D_IN, D_SAE, sparsity_coefficient=0.02, bandwidth=0.05),
    "relu": lambda: fastsae.ReLUSAE(D_IN, D_SAE, sparsity_coefficient=0.3),
    "gated": lambda: fastsae.GatedSAE(D_IN, D_SAE),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_own_format_round_trip_is_exact(tmp_path, arch):
    sae = _randomize(ARCHS[arch]())
    if arch == "batchtopk":
        sae.train()
        sae.training_forward(torch.randn(16, D_IN))  # calibrates the inference threshold buffer
    sae.eval()
    sae.save(tmp_path / "sae")
    assert detect_format(tmp_path / "sae") == "fastsae"
    back = fastsae.load(tmp_path / "sae")
    assert type(back) is type(sae) and back.config() == sae.config()
    for (k, a), (k2, b) in zip(sorted(sae.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    x = torch.randn(7, D_IN)
    assert torch.equal(sae(x), back(x))
    assert torch.equal(sae.encode(x), back.encode(x))


def test_round_trip_bf16_keeps_dtypes(tmp_path):
    sae = _randomize(fastsae.JumpReLUSAE(D_IN, D_SAE, dtype=torch.bfloat16))
    sae.save(tmp_path)
    back = fastsae.load(tmp_path)
    assert back.W_enc.dtype == torch.bfloat16 and back.threshold.dtype == torch.float32
    assert torch.equal(back.W_enc, sae.W_enc) and torch.equal(back.threshold, sae.threshold)


# -- SAELens ---------------------------------------------------------------------------------------


def _saelens_forward(arch, cfg, st, x):
    """SAELens' inference forward (sae_lens/saes/*.py): process_sae_in, encode, decode."""
    sae_in = x - st["b_dec"] * cfg["apply_b_dec_to_input"]
    if arch == "gated":
        gate = (sae_in @ st["W_enc"] + st["b_gate"]) > 0
        mag = F.relu(sae_in @ (st["W_enc"] * torch.exp(st["r_mag"])) + st["b_mag"])
        f = gate.to(mag.dtype) * mag
    else:
        pre = sae_in @ st["W_enc"] + st["b_enc"]
        if arch == "standard":
            f = F.relu(pre)
        elif arch == "topk":
            top = torch.topk(pre, k=cfg["k"], dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        else:  # jumprelu
            f = F.relu(pre) * (pre > st["threshold"]).to(pre.dtype)
    return f @ st["W_dec"] + st["b_dec"]


def _saelens_state(arch):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    st = dict(W_enc=r(D_IN, D_SAE), W_dec=r(D_SAE, D_IN), b_dec=r(D_IN))
    if arch == "gated":
        st.update(b_gate=r(D_SAE), r_mag=r(D_SAE) * 0.1, b_mag=r(D_SAE))
    else:
        st["b_enc"] = r(D_SAE)
    if arch == "jumprelu":
        st["threshold"] = r(D_SAE).abs() * 0.5
        st["threshold"][:3] = -0.1  # negative θ: SAELens' relu() still zeroes negative pre-activations
    return st


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_folder_loads_and_matches(tmp_path, arch, apply_b_dec):
    st = _saelens_state(arch)
    cfg = dict(architecture=arch, d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu",
               apply_b_dec_to_input=apply_b_dec, normalize_activations="none", reshape_activations="none",
               metadata=dict(model_name="gpt2", hook_name="blocks.0.hook_resid_pre", sae_lens_version="6.5.1"))
    if arch == "topk":
        cfg["k"] = 7
    save_file(st, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = fastsae.load(tmp_path)
    expected_cls = dict(standard=fastsae.ReLUSAE, topk=fastsae.TopKSAE, jumprelu=fastsae.JumpReLUSAE,
                        gated=fastsae.GatedSAE)[arch]
    assert type(sae) is expected_cls and sae.apply_b_dec_to_input == apply_b_dec
    x = torch.randn(9, D_IN) * 2
    torch.testing.assert_close(sae(x), _saelens_forward(arch, cfg, st, x), rtol=1e-5, atol=1e-5)


def test_saelens_pre_6_topk_and_finetuning_scale(tmp_path):
    """Old configs: architecture 'standard' + activation_fn_str 'topk' + activation_fn_kwargs.k, and a
    finetuning scaling factor multiplying the activations before the decoder."""
    st = _saelens_state("topk")
    scale = torch.rand(D_SAE) + 0.5
    save_file(dict(st, scaling_factor=scale), str(tmp_path / "sae_weights.safetensors"))
    cfg = dict(d_in=D_IN, d_sae=D_SAE, dtype="float32", activation_fn_str="topk",
               activation_fn_kwargs=dict(k=4), finetuning_scaling_factor=True, normalize_activations=False)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = fastsae.load(tmp_path)
    assert isinstance(sae, fastsae.TopKSAE) and sae.k == 4 and sae.apply_b_dec_to_input
    x = torch.randn(6, D_IN)
    expected = _saelens_forward("topk", dict(apply_b_dec_to_input=True, k=4),
                                dict(st, W_dec=st["W_dec"] * scale[:, None]), x)
    torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


def test_saelens_log_threshold_and_unsupported_normalisation(tmp_path):
    st = _saelens_state("jumprelu")
    th = st.pop("threshold").abs() + 0.01
    save_file(dict(st, log_threshold=th.log()), str(tmp_path / "sae_weights.safetensors"))
    cfg = dict(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = fastsae.load(tmp_path)
    torch.testing.assert_close(sae.threshold, th)
    (tmp_path / "cfg.json").write_text(json.dumps(dict(cfg, normalize_activations="constant_norm_rescale")))
    with pytest.raises(ValueError, match="cfg.json.*normalize_activations"):
        fastsae.load(tmp_path)


# -- sparsify --------------------------------------------------------------------------------------


def _sparsify_forward(st, k, x):
    """sparsify's SparseCoder: encode(x - b_dec) -> relu -> top-k; decode with W_dec rows + b_dec."""
    pre = F.relu(F.linear(x - st["b_dec"], st["encoder.weight"], st["encoder.bias"]))
    acts, idx = pre.topk(k, sorted=False)
    return (acts[..., None] * st["W_dec"][idx]).sum(-2) + st["b_dec"]


def test_sparsify_folder_loads_and_matches(tmp_path):
    g = torch.Generator().manual_seed(2)
    st = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g), "encoder.bias": torch.randn(D_SAE, generator=g),
          "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    save_file(st, str(tmp_path / "sae.safetensors"))
    cfg = dict(activation="topk", expansion_factor=32, normalize_decoder=True, num_latents=D_SAE, k=6,
               multi_topk=False, skip_connection=False, transcode=False, d_in=D_IN)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert detect_format(tmp_path) == "sparsify"
    sae = fastsae.load(tmp_path)
    assert isinstance(sae, fastsae.TopKSAE) and sae.k == 6 and sae.d_sae == D_SAE
    x = torch.randn(2, 5, D_IN)
    torch.testing.assert_close(sae(x), _sparsify_forward(st, 6, x), rtol=1e-5, atol=1e-5)
    # transcode=True: a TopK transcoder, which never centres its input (sparsify's encode)
    (tmp_path / "cfg.json").write_text(json.dumps(dict(cfg, transcode=True)))
    tc = fastsae.load(tmp_path)
    assert tc.architecture == "topk_transcoder"
    st_uncentred = dict(st, **{"b_dec": torch.zeros_like(st["b_dec"])})
    torch.testing.assert_close(tc(x) - st["b_dec"], _sparsify_forward(st_uncentred, 6, x), rtol=1e-5, atol=1e-5)
    (tmp_path / "cfg.json").write_text(json.dumps(dict(cfg, skip_connection=True)))
    with pytest.raises(ValueError, match="skip_connection"):
        fastsae.load(tmp_path)


# -- Gemma Scope -----------------------------------------------------------------------------------


def _gemma_scope_forward(p, x):
    pre = x @ p["W_enc"] + p["b_enc"]
    return (F.relu(pre) * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]


def test_gemma_scope_params_npz_loads_and_matches(tmp_path):
    rng = np.random.default_rng(3)
    p = dict(W_enc=rng.normal(size=(D_IN, D_SAE)), W_dec=rng.normal(size=(D_SAE, D_IN)),
             b_enc=rng.normal(size=D_SAE), b_dec=rng.normal(size=D_IN), threshold=np.abs(rng.normal(size=D_SAE)))
    p = {k: v.astype(np.float32) for k, v in p.items()}
    np.savez(tmp_path / "params.npz", **p)
    for target in (tmp_path / "params.npz", tmp_path):
        sae = fastsae.load(target)
        assert isinstance(sae, fastsae.JumpReLUSAE) and not sae.apply_b_dec_to_input
        x = torch.randn(8, D_IN)
        expected = _gemma_scope_forward({k: torch.from_numpy(v) for k, v in p.items()}, x)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


# -- corrupt files ---------------------------------------------------------------------------------


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    sae = _randomize(fastsae.TopKSAE(D_IN, D_SAE, 3))
    sae.save(tmp_path / "own")
    w = tmp_path / "own" / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:-50])
    with pytest.raises(ValueError, match="sae.safetensors"):
        fastsae.load(tmp_path / "own")
    sae.save(tmp_path / "own2")
    (tmp_path / "own2" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        fastsae.load(tmp_path / "own2")

    np.savez(tmp_path / "params.npz", W_enc=np.ones((D_IN, D_SAE), np.float32))
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="params.npz"):
        fastsae.load(tmp_path / "params.npz")

    d = tmp_path / "saelens"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps(dict(architecture="standard", d_in=D_IN, d_sae=D_SAE)))
    (d / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        fastsae.load(d)
    save_file(dict(W_enc=torch.zeros(D_IN, D_SAE + 1)), str(d / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="W_enc"):
        fastsae.load(d)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected"):
        fastsae.load(tmp_path / "empty")
