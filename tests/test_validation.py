"""Bad input is refused at the public boundary, on every backend, with a message naming the argument."""
import pytest
import torch

import fastsae
from conftest import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_validation(backend):
    pre = torch.randn(4, 10)
    th = torch.rand(10)
    with pytest.raises(ValueError, match="bandwidth"):
        fastsae.jumprelu(pre, th, 0.0, backend=backend)
    with pytest.raises(ValueError, match="bandwidth"):
        fastsae.step(pre, th, -1e-3, backend=backend)
    with pytest.raises(ValueError, match="bandwidth"):
        fastsae.jumprelu(pre, th, torch.full((9,), 0.1), backend=backend)
    with pytest.raises(ValueError, match="bandwidth"):
        fastsae.jumprelu(pre, th, torch.tensor([0.1] * 9 + [0.0]), backend=backend)
    with pytest.raises(ValueError, match="threshold"):
        fastsae.jumprelu(pre, torch.rand(9), backend=backend)
    with pytest.raises(TypeError, match="pre"):
        fastsae.jumprelu(pre.long(), th, backend=backend)
    with pytest.raises(ValueError, match="k"):
        fastsae.topk(pre, 0, backend=backend)
    with pytest.raises(ValueError, match="k"):
        fastsae.topk(pre, 11, backend=backend)
    with pytest.raises(TypeError, match="pre"):
        fastsae.topk(pre.int(), 2, backend=backend)

    W = torch.randn(10, 6)
    v = torch.randn(4, 3)
    i = torch.randint(0, 10, (4, 3))
    with pytest.raises(ValueError, match="indices"):
        fastsae.sparse_decode(v, i[:, :2], W, backend=backend)
    with pytest.raises(IndexError, match="indices"):
        fastsae.sparse_decode(v, torch.full((4, 3), 10), W, backend=backend)
    with pytest.raises(IndexError, match="indices"):
        fastsae.sparse_decode(v, torch.full((4, 3), -1), W, backend=backend)
    with pytest.raises(TypeError, match="indices"):
        fastsae.sparse_decode(v, i.float(), W, backend=backend)
    with pytest.raises(ValueError, match="b_dec"):
        fastsae.sparse_decode(v, i, W, torch.zeros(5), backend=backend)
    with pytest.raises(TypeError, match="values"):
        fastsae.sparse_decode(i, i, W, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        fastsae.jumprelu(torch.randn(2, 3), torch.rand(3), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        fastsae.TopKSAE(4, 8, 2, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_validation(backend):
    with pytest.raises(ValueError, match="d_sae"):
        fastsae.JumpReLUSAE(8, 0, backend=backend)
    with pytest.raises(ValueError, match="d_in"):
        fastsae.ReLUSAE(-3, 8, backend=backend)
    with pytest.raises(ValueError, match="k"):
        fastsae.TopKSAE(8, 16, k=17, backend=backend)
    with pytest.raises(ValueError, match="k"):
        fastsae.BatchTopKSAE(8, 16, k=0, backend=backend)
    with pytest.raises(ValueError, match="bandwidth"):
        fastsae.JumpReLUSAE(8, 16, bandwidth=0.0, backend=backend)
    with pytest.raises(ValueError, match="bandwidth"):
        fastsae.JumpReLUSAE(8, 16, bandwidth=torch.ones(15), backend=backend)
    for bad, err in ((dict(k_aux=17), ValueError), (dict(k_aux=-1), ValueError), (dict(k_aux=2.5), TypeError),
                     (dict(aux_rows=0.0), ValueError), (dict(aux_rows=1.5), ValueError),
                     (dict(aux_coefficient=-0.1), ValueError), (dict(aux_coefficient=float("nan")), ValueError)):
        with pytest.raises(err, match=next(iter(bad))):
            fastsae.JumpReLUSAE(8, 16, backend=backend, **bad)
    assert fastsae.JumpReLUSAE(8, 16, backend=backend).k_aux == 1  # d_in // 16, at least 1
    assert fastsae.JumpReLUSAE(64, 2, backend=backend).k_aux == 2  # and at most d_sae
    assert fastsae.JumpReLUSAE(8, 16, k_aux=0, backend=backend).k_aux == 0
    for sae in [fastsae.JumpReLUSAE(8, 16, backend=backend), fastsae.TopKSAE(8, 16, 3, backend=backend),
                fastsae.GatedSAE(8, 16, backend=backend)]:
        with pytest.raises(ValueError, match="d_in"):
            sae(torch.randn(4, 7))
        with pytest.raises(ValueError, match="d_in"):
            sae.training_forward(torch.randn(4, 9))
        with pytest.raises(TypeError, match="x"):
            sae.encode(torch.ones(4, 8, dtype=torch.int64))
        with pytest.raises(ValueError, match="d_sae"):
            sae.decode(torch.randn(4, 15))
        with pytest.raises(ValueError, match="dead_mask"):
            sae.training_forward(torch.randn(4, 8), dead_mask=torch.zeros(3, dtype=torch.bool))
