"""The fused inference encoders of the cpp backend (csrc/encode.cpp) against the eager inference of
fastsae/inference.py: dense codes, padded sparse codes, reconstructions; every architecture, SAEs loaded from
SAELens / sparsify / Gemma Scope files; odd sizes, dtypes, opcheck, bad input."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastsae
from fastsae import inference
from fastsae.dispatch import get as get_backend

pytestmark = [pytest.mark.skipif("cpp" not in fastsae.backends(), reason="fastsae._C not built"),
              pytest.mark.usefixtures("one_thread")]

SHAPES = [(11, 13, 37), (1, 5, 3), (40, 17, 101), (6, 4, 1), (0, 7, 9)]


def encoder(kind, d_in, d_sae, dtype=torch.float64, apply=True, seed=0, k=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    common = dict(W_enc=r(d_in, d_sae) / d_in ** 0.5, b_enc=0.2 * r(d_sae), b_dec=0.1 * r(d_in),
                  apply_b_dec_to_input=apply)
    if kind == "threshold":
        th = (0.3 * torch.rand(d_sae, generator=g)).to(torch.float32 if dtype != torch.float64 else dtype)
        return inference.Encoder("threshold", threshold=th, **common)
    if kind == "gated":
        return inference.Encoder("gated", r_mag=0.3 * r(d_sae), b_mag=0.1 * r(d_sae), **common)
    return inference.Encoder(kind, k=min(k, d_sae), **common)


def decoder(d_sae, d_in, dtype=torch.float64, seed=1):
    return torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(seed), dtype=dtype) / d_in ** 0.5


KINDS = ["threshold", "gated", "topk", "batchtopk"]


def cpp_backend():
    return get_backend("cpp", torch.device("cpu"))


def eager_backend():
    return get_backend("eager", torch.device("cpu"))


def spy_ops(monkeypatch):
    """Record the names of the fastsae ops the cpp backend calls."""
    from fastsae.ops import cpp as cpp_mod

    calls, orig = [], cpp_mod._ops

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(orig(), name)

    monkeypatch.setattr(cpp_mod, "_ops", lambda: Spy())
    return calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("apply", [False, True])
def test_encoders_match_eager_float64(kind, shape, apply):
    B, d_in, d_sae = shape
    enc = encoder(kind, d_in, d_sae, apply=apply)
    W_dec = decoder(d_sae, d_in)
    x = torch.randn(B, d_in, dtype=torch.float64)
    cpp, eager = cpp_backend(), eager_backend()
    f = cpp.encode(enc, x)
    f_want = eager.encode(enc, x)
    torch.testing.assert_close(f, f_want, atol=1e-12, rtol=1e-12)
    v, i = cpp.encode_sparse(enc, x)
    v_want, i_want = eager.encode_sparse(enc, x)
    assert v.shape[0] == B and i.dtype == torch.int64 and v.shape == i.shape
    if kind == "topk":  # k entries per row, sorted descending (relu'd), as the eager topk
        torch.testing.assert_close(v, v_want, atol=1e-12, rtol=1e-12)
        pos = v_want > 0
        assert torch.equal(i[pos], i_want[pos])
    else:  # the nonzero entries in latent order, zero-padded to the longest row: the layout of dense_to_padded
        assert v.shape == v_want.shape
        torch.testing.assert_close(v, v_want, atol=1e-12, rtol=1e-12)
        assert torch.equal(i, i_want)
    x_hat = cpp.reconstruct(enc, x, W_dec)
    torch.testing.assert_close(x_hat, eager.reconstruct(enc, x, W_dec), atol=1e-12, rtol=1e-12)
    if B:
        torch.testing.assert_close(x_hat, f_want @ W_dec + enc.b_dec, atol=1e-12, rtol=1e-12)


def test_cases_are_not_trivial():
    enc = encoder("threshold", 17, 101)
    x = torch.randn(40, 17, dtype=torch.float64)
    f = eager_backend().encode(enc, x)
    counts = (f != 0).sum(-1)
    assert counts.min() < counts.max() and 0 < counts.float().mean() < 101  # padding happens
    enc = encoder("gated", 17, 101, apply=True)
    with torch.no_grad():
        z = (x - enc.b_dec) @ enc.W_enc
        gate, mag = z + enc.b_enc > 0, z * enc.r_mag.exp() + enc.b_mag
    assert (gate & (mag <= 0)).any() and (gate & (mag > 0)).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoders_low_precision(kind, dtype):
    """Inputs in small multiples of 1/4 make every selection exact in every dtype; values and x̂ then agree
    with float64 to the dtype's rounding."""
    g = torch.Generator().manual_seed(7)
    q = lambda *s, scale: (torch.randint(-2, 3, s, generator=g) * scale).double()  # noqa: E731
    B, d_in, d_sae = 21, 24, 70
    enc64 = inference.Encoder(
        kind, W_enc=q(d_in, d_sae, scale=0.25), b_enc=q(d_sae, scale=0.25) + 0.125, b_dec=q(d_in, scale=0.25),
        apply_b_dec_to_input=False,
        threshold=(torch.randint(0, 4, (d_sae,), generator=g) * 0.25 + 0.1).float() if kind == "threshold" else None,
        k=5 if kind in ("topk", "batchtopk") else None,
        r_mag=q(d_sae, scale=0.0) if kind == "gated" else None, b_mag=q(d_sae, scale=0.25) + 0.125 if kind == "gated" else None)
    low = {f: (getattr(enc64, f).to(dtype) if f in ("W_enc", "b_enc", "b_dec", "r_mag", "b_mag")
               and getattr(enc64, f) is not None else getattr(enc64, f))
           for f in ("kind", "W_enc", "b_enc", "b_dec", "apply_b_dec_to_input", "threshold", "k", "r_mag", "b_mag")}
    enc = inference.Encoder(**low)
    x = q(B, d_in, scale=1.0)
    W_dec = decoder(d_sae, d_in)
    cpp = cpp_backend()
    if kind in ("topk", "batchtopk"):  # ties: the kernel's float64 selection (index tie-break) is the one to match
        want_f = cpp.encode(enc64, x)
        want_x = cpp.reconstruct(enc64, x, W_dec)
    else:
        want_f = eager_backend().encode(enc64, x)
        want_x = want_f @ W_dec + enc64.b_dec
    f = cpp.encode(enc, x.to(dtype))
    assert f.dtype == dtype and torch.equal(f != 0, want_f != 0)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(f.double(), want_f, atol=tol, rtol=tol)
    x_hat = cpp.reconstruct(enc, x.to(dtype), W_dec.to(dtype))
    assert x_hat.dtype == dtype
    torch.testing.assert_close(x_hat.double(), want_x, atol=tol * 20, rtol=tol * 4)


def test_autograd_or_odd_dtypes_take_the_eager_path(monkeypatch):
    """No backward exists for the fused encoders: with a gradient to record (or a float16 SAE) the backend
    computes eagerly, and the gradient is right."""
    enc = encoder("threshold", 6, 20, dtype=torch.float32)
    enc = inference.Encoder("threshold", W_enc=enc.W_enc.requires_grad_(), b_enc=enc.b_enc, b_dec=enc.b_dec,
                            apply_b_dec_to_input=True, threshold=enc.threshold)
    x = torch.randn(5, 6)
    seen = spy_ops(monkeypatch)
    f = cpp_backend().encode(enc, x)
    f.sum().backward()
    assert not seen and enc.W_enc.grad is not None
    with torch.no_grad():
        cpp_backend().encode(enc, x)
        half = inference.Encoder("threshold", W_enc=enc.W_enc.half(), b_enc=enc.b_enc.half(), b_dec=enc.b_dec.half(),
                                 apply_b_dec_to_input=True, threshold=enc.threshold)
        cpp_backend().encode_sparse(half, x.half())
    assert seen == ["threshold_encode"]


ARCHS = ["jumprelu", "relu", "gated", "topk", "batchtopk", "batchtopk-calibrated"]


def module(arch, backend):
    torch.manual_seed(0)
    d_in, d_sae = 13, 57
    if arch == "jumprelu":
        sae = fastsae.JumpReLUSAE(d_in, d_sae, bandwidth=0.05, threshold_init=0.05, backend=backend)
    elif arch == "relu":
        sae = fastsae.ReLUSAE(d_in, d_sae, backend=backend)
    elif arch == "gated":
        sae = fastsae.GatedSAE(d_in, d_sae, backend=backend)
    elif arch == "topk":
        sae = fastsae.TopKSAE(d_in, d_sae, 5, backend=backend)
    else:
        sae = fastsae.BatchTopKSAE(d_in, d_sae, 5, backend=backend)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.dim() == 1 and name != "threshold":
                p.add_(0.1 * torch.randn_like(p))
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
        if arch == "batchtopk-calibrated":
            sae.threshold.fill_(0.3)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_modules_run_the_fused_encoders(monkeypatch, arch):
    """encode / encode_sparse / sae(x) of every architecture under no_grad reach the fused op and give the eager
    backend's results; x may be [..., d_in] and non-contiguous."""
    sae, ref_sae = module(arch, "cpp"), module(arch, "eager")
    op = dict(gated="gated_encode", topk="topk_encode", batchtopk="batchtopk_encode").get(arch, "threshold_encode")
    calls = spy_ops(monkeypatch)
    x = torch.randn(3, 13, 8).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), ref_sae.encode(x), atol=1e-6, rtol=1e-5)
        v, i = sae.encode_sparse(x)
        dense = torch.zeros(*x.shape[:-1], 57).scatter_add(-1, i, v)
        torch.testing.assert_close(dense, ref_sae.encode(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sae(x), ref_sae(x), atol=1e-5, rtol=1e-5)
    assert calls == [op] * 3


def _write_saelens(path, arch, apply_b_dec):
    from test_io import D_IN, D_SAE, _saelens_state

    st = _saelens_state(arch)
    cfg = dict(architecture=arch, d_in=D_IN, d_sae=D_SAE, dtype="float32", apply_b_dec_to_input=apply_b_dec,
               normalize_activations="none")
    if arch == "topk":
        cfg["k"] = 7
    save_file(st, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, st


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_files_through_the_fused_encoders(tmp_path, arch):
    from test_io import _saelens_forward

    cfg, st = _write_saelens(tmp_path, arch, True)
    sae = fastsae.load(tmp_path, backend="cpp")
    x = torch.randn(9, cfg["d_in"]) * 2
    with torch.no_grad():
        torch.testing.assert_close(sae(x), _saelens_forward(arch, cfg, st, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x) @ sae.W_dec + sae.b_dec, sae(x), rtol=1e-5, atol=1e-5)


def test_sparsify_and_gemma_scope_files_through_the_fused_encoders(tmp_path):
    from test_io import D_IN, D_SAE, _gemma_scope_forward, _sparsify_forward

    g = torch.Generator().manual_seed(2)
    st = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g), "encoder.bias": torch.randn(D_SAE, generator=g),
          "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    (tmp_path / "sp").mkdir()
    save_file(st, str(tmp_path / "sp" / "sae.safetensors"))
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps(dict(activation="topk", num_latents=D_SAE, k=6, d_in=D_IN)))
    sae = fastsae.load(tmp_path / "sp", backend="cpp")
    x = torch.randn(2, 5, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), _sparsify_forward(st, 6, x), rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(3)
    p = dict(W_enc=rng.normal(size=(D_IN, D_SAE)), W_dec=rng.normal(size=(D_SAE, D_IN)),
             b_enc=rng.normal(size=D_SAE), b_dec=rng.normal(size=D_IN), threshold=np.abs(rng.normal(size=D_SAE)))
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in p.items()})
    sae = fastsae.load(tmp_path / "params.npz", backend="cpp")
    x = torch.randn(8, D_IN)
    with torch.no_grad():
        want = _gemma_scope_forward({k: torch.from_numpy(v.astype(np.float32)) for k, v in p.items()}, x)
        torch.testing.assert_close(sae(x), want, rtol=1e-5, atol=1e-5)


def test_one_and_two_threads_identical():
    x = torch.randn(1100, 24)  # two encoder slabs: two threads take them in parallel
    n = torch.get_num_threads()
    for kind in KINDS:
        enc, W_dec = encoder(kind, 24, 330, dtype=torch.float32, k=9), decoder(330, 24, dtype=torch.float32)
        outs = []
        try:
            for nt in (1, 2):
                torch.set_num_threads(nt)
                outs.append((*cpp_backend().encode_sparse(enc, x), cpp_backend().reconstruct(enc, x, W_dec),
                             cpp_backend().encode(enc, x)))
        finally:
            torch.set_num_threads(n)
        for a, b in zip(*outs):
            assert torch.equal(a, b), kind


def test_kernels_refuse_bad_input():
    ops = torch.ops.fastsae
    enc = encoder("threshold", 6, 11)
    x = torch.randn(5, 6, dtype=torch.float64)
    args = (x, enc.W_enc, enc.b_enc, enc.b_dec)
    with pytest.raises(RuntimeError, match="W_dec"):
        ops.threshold_encode(*args, enc.threshold, True, decoder(10, 6), False)
    with pytest.raises(RuntimeError, match="threshold"):
        ops.threshold_encode(*args, enc.threshold[:5], True, None, False)
    with pytest.raises(RuntimeError, match="k"):
        ops.topk_encode(*args, 12, True, None, False)
    with pytest.raises(RuntimeError, match="k"):
        ops.batchtopk_encode(*args, 0, True, None, True)
    with pytest.raises(RuntimeError, match="r_mag"):
        ops.gated_encode(*args[:3], enc.b_enc[:4], enc.b_enc, enc.b_dec, True, None, False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.threshold_encode(x.float(), enc.W_enc, enc.b_enc, enc.b_dec, enc.threshold, True, None, False)


def test_opcheck():
    x = torch.randn(7, 5, dtype=torch.float64)
    W_dec = decoder(23, 5)
    dyn = ("test_schema", "test_faketensor")
    for kind in KINDS:
        enc = encoder(kind, 5, 23)
        ops = torch.ops.fastsae
        if kind == "threshold":
            op, extra = ops.threshold_encode.default, (enc.threshold,)
            head = (x, enc.W_enc, enc.b_enc, enc.b_dec)
        elif kind == "gated":
            op, extra, head = ops.gated_encode.default, (), (x, enc.W_enc, enc.b_enc, enc.r_mag, enc.b_mag, enc.b_dec)
        else:
            op = ops.topk_encode.default if kind == "topk" else ops.batchtopk_encode.default
            head, extra = (x, enc.W_enc, enc.b_enc, enc.b_dec), (enc.k,)
        torch.library.opcheck(op, head + extra + (True, None, True))  # dense: a fixed output size
        sparse = head + extra + (False, W_dec, False)
        if kind == "topk":  # k entries per row: a fixed size too
            torch.library.opcheck(op, sparse)
        else:
            torch.library.opcheck(op, sparse, test_utils=dyn)
