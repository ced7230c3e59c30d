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


# ---- dense JumpReLU / step ------------------------------------------------------------------------
ELEMENTWISE_SHAPES = [(1, 1), (7, 29), (3, 5, 13), (0, 9), (40, 301)]


def elementwise_inputs(shape, dtype=torch.float64, th_dtype=torch.float64, requires_grad=True):
    d = shape[-1]
    pre = torch.randn(*shape, dtype=dtype)
    threshold = (0.5 * torch.rand(d, dtype=th_dtype)).requires_grad_(requires_grad)
    # per-latent bandwidth, wide enough that many entries fall inside the window |pre - θ| < ε/2
    bandwidth = 0.2 + 0.6 * torch.rand(d, dtype=th_dtype)
    return pre.requires_grad_(requires_grad), threshold, bandwidth


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
@pytest.mark.parametrize("name", ["jumprelu", "step"])
def test_elementwise_forward_backward(shape, name):
    from fastsae.ops import cpp

    pre, th, bw = elementwise_inputs(shape)
    out = getattr(cpp, name)(pre, th, bw)
    want = getattr(ref, name)(pre, th, bw)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [pre, th], g)
    exp = torch.autograd.grad(want, [pre, th], g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    if pre.numel() > 100:
        assert exp[1].abs().sum() > 0  # the window is not empty: the θ-gradient is exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["jumprelu", "step"])
def test_elementwise_low_precision_with_float32_threshold(dtype, name):
    """θ and ε stay float32 while pre is bf16 (the module's layout); the window test runs in float32."""
    from fastsae.ops import cpp

    pre, th, bw = elementwise_inputs((17, 33), dtype=dtype, th_dtype=torch.float32)
    out = getattr(cpp, name)(pre, th, bw)
    want = getattr(ref, name)(pre, th, bw)
    assert out.dtype == want.dtype == dtype
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [pre, th], g)
    exp = torch.autograd.grad(want, [pre, th], g)
    assert got[1].dtype == torch.float32
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_elementwise_opcheck():
    for shape in [(7, 29), (2, 3, 5)]:
        pre, th, bw = elementwise_inputs(shape)
        for op in (torch.ops.fastsae.jumprelu.default, torch.ops.fastsae.step.default):
            torch.library.opcheck(op, (pre, th, bw))
    pre, th, bw = elementwise_inputs((5, 7), requires_grad=False)
    torch.library.opcheck(torch.ops.fastsae.jumprelu_backward.default, (torch.randn(5, 7, dtype=torch.float64), pre,
                                                                        th, bw, False, True, True))


def test_elementwise_kernel_refuses_bad_shapes():
    pre, th, bw = elementwise_inputs((4, 6), requires_grad=False)
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.fastsae.jumprelu(pre, th[:5], bw)
    with pytest.raises(RuntimeError, match="bandwidth"):
        torch.ops.fastsae.step(pre, th, bw[:5])
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.fastsae.jumprelu_backward(pre[:3], pre, th, bw, False, True, True)


# ---- top-k ----------------------------------------------------------------------------------------
# (rows, d_sae, k): small rows use the heap path, long rows the grouped-maxima path (d_sae >= 64·k)
TOPK_SHAPES = [(1, 1, 1), (9, 37, 5), (5, 37, 37), (13, 1031, 7), (6, 4099, 32), (0, 50, 3)]


@pytest.mark.parametrize("shape", TOPK_SHAPES)
def test_topk_forward_backward(shape):
    rows, d, k = shape
    pre = torch.randn(rows, d, dtype=torch.float64, requires_grad=True)
    backend = fastsae.ops.cpp.CppBackend()
    v, i = backend.topk(pre, k)
    ev, ei = ref.topk(pre, k)
    assert torch.equal(i, ei)
    torch.testing.assert_close(v, ev, atol=0, rtol=0)
    g = torch.randn_like(v)
    got = torch.autograd.grad(v, pre, g)[0]
    exp = torch.autograd.grad(ev, pre, g)[0]
    torch.testing.assert_close(got, exp, atol=0, rtol=0)


def test_topk_leading_dims_dtypes_ties_and_nan():
    backend = fastsae.ops.cpp.CppBackend()
    for dtype in (torch.float32, torch.bfloat16):
        pre = torch.randn(2, 3, 2000, dtype=dtype)
        v, i = backend.topk(pre, 9)
        assert v.shape == i.shape == (2, 3, 9) and v.dtype == dtype
        torch.testing.assert_close(v, torch.topk(pre, 9).values, atol=0, rtol=0)
        assert torch.equal(pre.gather(-1, i), v)
    # ties (relu zeros): the values agree with torch, indices are distinct, lowest index first
    pre = torch.relu(torch.randn(4, 3000) - 2.5)
    v, i = backend.topk(pre, 40)
    torch.testing.assert_close(v, torch.topk(pre, 40).values)
    assert all(len(set(r.tolist())) == 40 for r in i)
    # NaN ranks largest, as in torch.topk
    pre = torch.randn(3, 2000)
    pre[1, 77] = float("nan")
    v, i = backend.topk(pre, 5)
    assert i[1, 0] == 77 and torch.isnan(v[1, 0])
    torch.testing.assert_close(v[[0, 2]], torch.topk(pre[[0, 2]], 5).values)


def test_topk_opcheck_and_bad_input():
    pre = torch.randn(6, 300, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastsae.topk.default, (pre, 4))
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.fastsae.topk(pre.detach(), 301)
    with pytest.raises(IndexError):
        torch.ops.fastsae.topk_backward(torch.randn(2, 3), torch.tensor([[0, 1, 300]] * 2), 300)


def test_sparse_decode_backward_threads_agree_and_refuses_bad_indices():
    v, i, W, b = sparse_inputs(64, 8, 200, 31, dtype=torch.float32)
    g = torch.randn(64, 31)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastsae.sparse_decode_backward(g, v, i, W, True, True)
        torch.set_num_threads(2)
        two = torch.ops.fastsae.sparse_decode_backward(g, v, i, W, True, True)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, c) for a, c in zip(one, two))
    with pytest.raises(IndexError):
        torch.ops.fastsae.sparse_decode_backward(g, v, torch.full_like(i, 200), W, True, True)


@pytest.mark.parametrize("d_in", [1, 7, 8, 15, 16, 17, 31, 33, 64, 65, 127])
def test_float32_simd_dot_axpy_tails(d_in):
    """csrc/simd.cpp: the float32 dot/axpy (AVX-512 / AVX2 / baseline clones) behind sparse decode and its
    SDDMM backward, at every vector-width tail, against the float64 reference."""
    from fastsae.ops import cpp

    v, i, W, b = sparse_inputs(9, 5, 41, d_in, dtype=torch.float32, requires_grad=True)
    out = cpp.sparse_decode(v, i, W, b)
    g = torch.randn_like(out)
    gv, gW = torch.autograd.grad(out, [v, W], g)
    v64, W64, b64 = (t.detach().double().requires_grad_() for t in (v, W, b))
    want = ref.sparse_decode(v64, i, W64, b64)
    ev, eW = torch.autograd.grad(want, [v64, W64], g.double())
    for got, exp in [(out, want), (gv, ev), (gW, eW)]:
        torch.testing.assert_close(got.double(), exp.detach(), atol=1e-4, rtol=1e-4)
