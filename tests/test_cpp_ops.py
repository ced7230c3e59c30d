"""C++ kernels (csrc/*.cpp via fastsae/ops/cpp.py) against reference.py, forward and backward, plus opcheck."""
import pytest
import torch

import fastsae
from fastsae import reference as ref

pytestmark = pytest.mark.skipif("cpp" not in fastsae.backends(), reason="fastsae._C not built")

SHAPES = [(1, 1, 1, 1), (7, 3, 29, 13), (33, 17, 101, 5), (0, 4, 9, 3)]


def sparse_inputs(B, k, d_sae, d_in, dtype=torch.float64, requires_grad=False):
    values = torch.randn(B, k, dtype=dtype, requires_grad=requires_grad)
    indices = torch.randint(0, d_sae, (B, k))
    W = torch.randn(d_sae, d_in, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(d_in, dtype=dtype, requires_grad=requires_grad)
    return values, indices, W, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_decode_forward_backward(shape, bias):
    from fastsae.ops import cpp

    v, i, W, b = sparse_inputs(*shape, requires_grad=True)
    b = b if bias else None
    out = cpp.sparse_decode(v, i, W, b)
    want = ref.sparse_decode(v, i, W, b)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(out)
    inputs = [v, W] + ([b] if bias else [])
    got = torch.autograd.grad(out, inputs, g, allow_unused=True)
    exp = torch.autograd.grad(want, inputs, g, allow_unused=True)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_low_precision(dtype):
    from fastsae.ops import cpp

    v, i, W, b = sparse_inputs(19, 6, 50, 23, dtype=dtype)
    out = cpp.sparse_decode(v, i, W, b)
    want = ref.sparse_decode(v.double(), i, W.double(), b.double())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), want, atol=tol * 10, rtol=tol)


def test_sparse_decode_threads_agree():
    from fastsae.ops import cpp

    v, i, W, b = sparse_inputs(64, 8, 200, 31, dtype=torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.sparse_decode(v, i, W, b)
        torch.set_num_threads(2)
        two = cpp.sparse_decode(v, i, W, b)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_sparse_decode_kernel_refuses_bad_indices():
    """Even called directly (past the public checks) the kernel raises instead of reading out of bounds."""
    v, i, W, b = sparse_inputs(4, 3, 10, 5)
    with pytest.raises(IndexError):
        torch.ops.fastsae.sparse_decode(v, torch.full_like(i, 10), W, b)
    with pytest.raises(IndexError):
        torch.ops.fastsae.sparse_decode(v, torch.full_like(i, -1), W, b)
    with pytest.raises(RuntimeError):
        torch.ops.fastsae.sparse_decode(v, i[:, :2], W, b)


def test_sparse_decode_opcheck():
    for shape in SHAPES[:3]:
        v, i, W, b = sparse_inputs(*shape, requires_grad=True)
        torch.library.opcheck(torch.ops.fastsae.sparse_decode.default, (v, i, W, b))
        torch.library.opcheck(torch.ops.fastsae.sparse_decode.default, (v.detach(), i, W.detach(), None))


def test_public_sparse_decode_uses_cpp_on_cpu():
    v, i, W, b = sparse_inputs(5, 3, 11, 4)
    out = fastsae.sparse_decode(v, i, W, b, backend="cpp")
    torch.testing.assert_close(out, ref.sparse_decode(v, i, W, b))
    assert fastsae.backends()[-1] == "eager"
