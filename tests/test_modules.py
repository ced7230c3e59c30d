"""The five modules on every backend here: shapes, dtypes, layouts, empty batches, and agreement with eager."""
import pytest
import torch

import fastsae
from conftest import BACKENDS, FAST_BACKENDS

D_IN, D_SAE = 13, 37


def make(arch, backend="eager", dtype=torch.float32, seed=0):
    """The same SAE (same values) whatever the dtype: built in float32, then copied into ``dtype``."""
    if dtype != torch.float32:
        sae = make(arch, backend, torch.float32, seed)
        other = _build(arch, backend, dtype)
        other.load_state_dict(sae.state_dict())
        return other
    torch.manual_seed(seed)
    sae = _build(arch, backend, dtype)
    with torch.no_grad():  # break the W_enc = W_decᵀ symmetry and give the biases values
        for p in sae.parameters():
            if p.dim() == 1 and p is not getattr(sae, "threshold", None):
                p.add_(0.05 * torch.randn_like(p))
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def _build(arch, backend, dtype):
    if arch == "jumprelu":
        sae = fastsae.JumpReLUSAE(D_IN, D_SAE, bandwidth=0.05, threshold_init=0.05, backend=backend, dtype=dtype)
    elif arch == "topk":
        sae = fastsae.TopKSAE(D_IN, D_SAE, k=5, k_aux=4, backend=backend, dtype=dtype)
    elif arch == "batchtopk":
        sae = fastsae.BatchTopKSAE(D_IN, D_SAE, k=5, k_aux=4, backend=backend, dtype=dtype)
    elif arch == "gated":
        sae = fastsae.GatedSAE(D_IN, D_SAE, backend=backend, dtype=dtype)
    else:
        sae = fastsae.ReLUSAE(D_IN, D_SAE, backend=backend, dtype=dtype)
    return sae


ARCHS = ["jumprelu", "topk", "batchtopk", "gated", "relu"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_layouts_and_round_trip(arch, backend):
    sae = make(arch, backend)
    for shape in [(6, D_IN), (2, 3, D_IN), (0, D_IN), (D_IN,)]:
        x = torch.randn(*shape)
        f = sae.encode(x)
        assert f.shape == (*shape[:-1], D_SAE)
        y = sae(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        torch.testing.assert_close(y, sae.decode(f), atol=1e-5, rtol=1e-5)
        v, i = sae.encode_sparse(x)
        assert v.shape == i.shape and i.dtype == torch.int64 and v.shape[:-1] == x.shape[:-1]
        if x.numel():
            dense = torch.zeros(*shape[:-1], D_SAE).scatter_add(-1, i, v)
            torch.testing.assert_close(dense, f)
    # non-contiguous input gives the same result as its contiguous copy
    x = torch.randn(D_IN, 8).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(sae(x), sae(x.contiguous()))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_input_dtypes(arch, dtype):
    sae = make(arch)
    x = torch.randn(5, D_IN, dtype=dtype)
    y = sae(x)
    assert y.dtype == dtype
    ref = make(arch, dtype=torch.float64)(x.double())
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype] * 10 + 1e-4, rtol=TOL[dtype] * 10)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_module_dtypes(arch, dtype):
    sae = make(arch, dtype=dtype)
    assert sae.W_enc.dtype == dtype
    if arch == "jumprelu":
        assert sae.threshold.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(4, D_IN)
    out = sae.training_forward(x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert sae(x).dtype == torch.float32


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_matches_eager(arch, backend):
    B = 11
    x = torch.randn(B, D_IN, dtype=torch.float64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::4] = True
    results = []
    for be in ["eager", backend]:
        sae = make(arch, be, dtype=torch.float64)
        out = sae.training_forward(x, dead_mask=dead)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (oe, ge), (ob, gb) = results
    for field in ["loss", "mse", "sparsity", "aux", "l0", "fvu", "x_hat"]:
        torch.testing.assert_close(getattr(ob, field).double(), getattr(oe, field).double(), atol=1e-9, rtol=1e-9)
    assert torch.equal(ob.fired, oe.fired)
    for name in ge:
        torch.testing.assert_close(gb[name], ge[name], atol=1e-9, rtol=1e-9, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_metrics(arch):
    sae = make(arch)
    x = torch.randn(2, 8, D_IN)
    out = sae.training_forward(x)
    assert out.x_hat.shape == (16, D_IN)
    assert out.fired.shape == (D_SAE,) and out.fired.dtype == torch.bool
    assert 0 < float(out.l0) <= D_SAE
    torch.testing.assert_close(out.mse, (out.x_hat - x.reshape(-1, D_IN)).pow(2).sum(-1).mean())
    if arch in ("topk",):
        assert float(out.l0) == 5


def test_constraints():
    sae = make("jumprelu")
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
    sae.apply_constraints()
    assert (sae.threshold == 0).all()
    topk = make("topk")
    with torch.no_grad():
        topk.W_dec.mul_(3)
    topk.apply_constraints()
    torch.testing.assert_close(topk.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_batchtopk_threshold_calibrates():
    sae = make("batchtopk")
    assert not sae.calibrated
    sae.training_forward(torch.randn(32, D_IN))
    assert sae.calibrated and float(sae.threshold) > 0
    f = sae.encode(torch.randn(3, D_IN))  # now a global JumpReLU: each row on its own
    x1 = torch.randn(1, D_IN)
    torch.testing.assert_close(sae.encode(torch.cat([x1, x1 * 2]))[:1], sae.encode(x1))
    assert f.shape == (3, D_SAE)


def test_save_load_round_trip(tmp_path):
    for arch in ARCHS:
        sae = make(arch)
        sae.save(tmp_path / arch)
        back = fastsae.load(tmp_path / arch, backend="eager")
        assert type(back) is type(sae)
        x = torch.randn(4, D_IN)
        torch.testing.assert_close(back(x), sae(x), atol=0, rtol=0)
