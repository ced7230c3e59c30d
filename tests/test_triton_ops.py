"""Triton kernels (fastsae/ops: jumprelu, topk, decode, encode, triton_common) against reference.py.

On CPU these run under TRITON_INTERPRET=1 with small blocks (the interpreter is slow), so sizes stay
small but odd, and every size crosses several blocks. Forward and backward, float32 and float64.
"""
import pytest
import torch

import fastsae
from fastsae import reference as ref

pytestmark = pytest.mark.skipif("triton" not in fastsae.backends(),
                                reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
DTYPES = [torch.float32, torch.float64]


def ops():
    from fastsae.ops import decode, encode, jumprelu, topk, triton_common

    return jumprelu, topk, decode, encode, triton_common


def near_threshold(B, N, dtype, frac_window=0.3):
    """``pre`` with many entries inside the window ``|pre - θ| < ε/2`` and per-latent ``θ``, ``ε``."""
    theta = torch.rand(N, dtype=torch.float32, device=DEV) * 0.5
    eps = 0.05 + 0.3 * torch.rand(N, dtype=torch.float32, device=DEV)
    pre = torch.randn(B, N, dtype=dtype, device=DEV)
    near = torch.rand(B, N, device=DEV) < frac_window
    pre = torch.where(near, (theta + eps * (torch.rand(B, N, device=DEV) - 0.5) * 0.98).to(dtype), pre)
    return pre, theta, eps


# ------------------------------------------------------------------------------------------
# jumprelu.py: elementwise JumpReLU / step
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 37), (33, 70), (2, 5, 19)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["jumprelu", "step"])
def test_jumprelu_step_forward_backward(shape, dtype, which):
    jumprelu, *_ = ops()
    B = int(torch.tensor(shape[:-1]).prod())
    pre, theta, eps = near_threshold(B, shape[-1], dtype)
    pre = pre.reshape(shape)
    if dtype == torch.float64:
        theta, eps = theta.double(), eps.double()
    pre.requires_grad_(True)
    theta.requires_grad_(True)
    fn, rfn = (jumprelu.jumprelu, ref.jumprelu) if which == "jumprelu" else (jumprelu.step, ref.step)
    out, want = fn(pre, theta, eps), rfn(pre, theta, eps)
    torch.testing.assert_close(out, want, **TOL[dtype])
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [pre, theta], g)
    exp = torch.autograd.grad(want, [pre, theta], g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, **TOL[dtype])


def test_jumprelu_float64_pre_float32_threshold():
    """θ stays float32 while pre is float64: the window is computed in float64, as in the reference."""
    jumprelu, *_ = ops()
    pre, theta, eps = near_threshold(9, 21, torch.float64)
    pre.requires_grad_(True)
    theta.requires_grad_(True)
    out = jumprelu.jumprelu(pre, theta, eps)
    want = ref.jumprelu(pre, theta, eps)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, [pre, theta], g), torch.autograd.grad(want, [pre, theta], g)):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# topk.py: per-tile candidates + merge + repair
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,N,k", [(7, 37, 5), (5, 130, 9), (3, 16, 16), (4, 33, 1), (9, 100, 30), (2, 5, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_matches_torch(B, N, k, dtype):
    _, topk, *_ = ops()
    x = torch.randn(B, N, dtype=dtype, device=DEV, requires_grad=True)
    v, i = topk.topk(x, k)
    rv, ri = torch.topk(x, k)
    assert torch.equal(v, rv) and torch.equal(i, ri)
    g = torch.randn_like(v)
    torch.testing.assert_close(torch.autograd.grad(v, x, g)[0], torch.autograd.grad(rv, x, g)[0])


def test_topk_repair_path_is_exercised_and_exact():
    """Concentrate each row's winners in one tile: the merge flags those rows and the repair fixes them."""
    _, topk, *_ = ops()
    B, N, k = 6, 64, 8
    x = torch.randn(B, N, device=DEV)
    x[:, :k] += 10.0  # all top-k of every row in the first tile, more than kp of them
    c = topk.Candidates(B, N, k, x.dtype, DEV)
    topk.dense_candidates(c, x)
    first, _ = torch.topk(c.keys, k)
    assert bool((c.drop > first[:, -1:]).any(-1).all())  # every row has a flagged tile
    v, i = topk.topk(x, k)
    rv, ri = torch.topk(x, k)
    assert torch.equal(v, rv) and torch.equal(i, ri)


def test_tile_shape_offers_k_candidates():
    _, topk, *_ = ops()
    for N, k in [(37, 5), (17, 17), (130, 64), (5, 5), (1000, 900)]:
        block_n, kp, n_tiles = topk.tile_shape(N, k)
        last = N - (n_tiles - 1) * block_n
        assert (n_tiles - 1) * kp + min(kp, last) >= k


# ------------------------------------------------------------------------------------------
# decode.py: sparse decode, SDDMM, segment reduction, JumpReLU decode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,k,d_sae,d_in", [(1, 1, 1, 1), (7, 3, 29, 13), (19, 17, 41, 5), (5, 9, 23, 37)])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float64, False)])
def test_sparse_decode_forward_backward(B, k, d_sae, d_in, dtype, bias):
    _, _, decode, _, _ = ops()
    v = torch.randn(B, k, dtype=dtype, device=DEV, requires_grad=True)
    i = torch.randint(0, d_sae, (B, k), device=DEV)
    W = torch.randn(d_sae, d_in, dtype=dtype, device=DEV, requires_grad=True)
    b = torch.randn(d_in, dtype=dtype, device=DEV, requires_grad=True) if bias else None
    out = decode.sparse_decode(v, i, W, b)
    want = ref.sparse_decode(v, i, W, b)
    torch.testing.assert_close(out, want, **TOL[dtype])
    g = torch.randn_like(out)
    inputs = [v, W] + ([b] if bias else [])
    for a, e in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, e, **TOL[dtype])


def test_sddmm_segment_reduce_gather_sum():
    _, _, decode, _, common = ops()
    B, K, N, D = 9, 6, 23, 11
    g = torch.randn(B, D, dtype=torch.float64, device=DEV)
    idx = torch.randint(0, N, (B, K), device=DEV, dtype=torch.int32)
    W = torch.randn(N, D, dtype=torch.float64, device=DEV)
    torch.testing.assert_close(decode.sddmm(g, idx, W), torch.einsum("bkd,bd->bk", W[idx.long()], g))
    # segments: entries past counts are padding and must be ignored
    counts = torch.randint(0, K + 1, (B,), device=DEV, dtype=torch.int32)
    valid = common.valid_mask(counts, B, K, DEV)
    w = torch.randn(B, K, dtype=torch.float64, device=DEV)
    xb = torch.randn(D, dtype=torch.float64, device=DEV)
    order, offsets = common.segments(idx, counts, N)
    out, tsum = decode.segment_reduce(order, offsets, w.reshape(-1), g, K, None, xb)
    wv = torch.where(valid, w, 0)
    want = torch.zeros(N, D, dtype=torch.float64, device=DEV).index_add_(
        0, idx.long().reshape(-1), (wv.unsqueeze(-1) * (g - xb).unsqueeze(1)).reshape(-1, D))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(tsum, torch.zeros(N, dtype=torch.float64, device=DEV).index_add_(
        0, idx.long().reshape(-1), wv.reshape(-1)))
    # gather_sum through a transposed (strided) view, with counts
    Wt = torch.randn(D, N, dtype=torch.float64, device=DEV)
    got = decode.gather_sum(w, idx, Wt.t(), counts)
    torch.testing.assert_close(got, torch.einsum("bk,bkd->bd", wv, Wt.t()[idx.long()]))


@pytest.fixture
def small_slabs(monkeypatch):
    """cuBLAS-slab encoder with slabs one interpreter tile wide (16 columns): every test crosses several."""
    from fastsae.ops import encode

    monkeypatch.setattr(encode, "SLAB_BYTES", 1)


@pytest.mark.parametrize("provider", ["fused", "slab"])
@pytest.mark.parametrize("B,d_in,d_sae", [(11, 13, 37), (33, 40, 70), (1, 3, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_jumprelu_lists_match_dense(B, d_in, d_sae, dtype, provider, small_slabs):
    *_, encode, common = ops()
    x = torch.randn(B, d_in, dtype=dtype, device=DEV)
    W = torch.randn(d_in, d_sae, dtype=dtype, device=DEV) / d_in ** 0.5
    b = 0.1 * torch.randn(d_sae, dtype=dtype, device=DEV)
    theta = (0.3 * torch.rand(d_sae, device=DEV)).to(dtype)
    eps = (0.1 + 0.3 * torch.rand(d_sae, device=DEV)).to(dtype)
    encode._capacity_hint[(B, d_sae)] = 1  # force the overflow + exact retry path
    idx, pre, counts = encode.encode_jumprelu(x, W, b, theta, eps, provider)
    dense = x @ W + b
    u = (dense - theta) / eps
    keep = (dense > theta) | ((u > -0.5) & (u < 0.5))
    assert torch.equal(counts.long(), keep.sum(-1))
    # the width is the bucket of the longest list (tuning keys stay put while L0 drifts)
    assert idx.shape[1] == min(d_sae, common.bucket(int(keep.sum(-1).max())))
    for r in range(B):
        n = int(counts[r])
        cols = idx[r, :n].long()
        assert sorted(cols.tolist()) == keep[r].nonzero().squeeze(1).tolist()
        torch.testing.assert_close(pre[r, :n], dense[r, cols], **TOL[dtype])
        assert not idx[r, n:].any() and not pre[r, n:].any()  # padding: latent 0, value 0
    assert encode._capacity_hint[(B, d_sae)] >= idx.shape[1]


@pytest.mark.parametrize("provider", ["fused", "slab"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_jumprelu_without_window_keeps_exactly_the_positive_entries(dtype, provider, small_slabs):
    """θ = 0 and a NaN bandwidth (the ReLU / Gated compaction): the lists hold exactly pre > 0, and the op
    reports the longest row it read (the backend's density) — ``longest_list``."""
    *_, encode, _ = ops()
    from fastsae.ops.triton_backend import _no_window

    B, d_in, d_sae = 13, 9, 45
    x = torch.randn(B, d_in, dtype=dtype, device=DEV)
    W = torch.randn(d_in, d_sae, dtype=dtype, device=DEV)
    b = torch.randn(d_sae, dtype=dtype, device=DEV)
    idx, pre, counts = encode.encode_jumprelu(x, W, b, *_no_window(d_sae, x), provider)
    dense = x @ W + b
    assert torch.equal(counts.long(), (dense > 0).sum(-1))
    assert encode.longest_list(B, d_sae) == int((dense > 0).sum(-1).max())
    for r in range(B):
        n = int(counts[r])
        assert idx[r, :n].long().tolist() == (dense[r] > 0).nonzero().squeeze(1).tolist()
        torch.testing.assert_close(pre[r, :n], dense[r, idx[r, :n].long()], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_decode_and_sddmm_with_counts_skip_padding(dtype):
    """``sparse_decode`` / ``sddmm`` on padded lists with ``counts``: padding (even with nonzero values) neither
    decodes nor gets a gradient; the rest matches the reference."""
    *_, decode, _, _ = ops()
    B, K, N, D = 7, 6, 19, 23
    g = dict(dtype=dtype, device=DEV)
    counts = torch.tensor([0, 6, 3, 1, 5, 2, 6], dtype=torch.int32, device=DEV)
    idx = torch.randint(0, N, (B, K), dtype=torch.int32, device=DEV)
    values = torch.randn(B, K, **g, requires_grad=True)
    W = torch.randn(N, D, **g, requires_grad=True)
    bias = torch.randn(D, **g)
    valid = torch.arange(K, device=DEV) < counts[:, None].long()
    out = decode.sparse_decode(values, idx, W, bias, None, None, None, None, True, counts)
    want = ref.sparse_decode(values * valid, idx.long(), W, bias)
    torch.testing.assert_close(out, want, **TOL[dtype])
    gr = torch.randn_like(out)
    got = torch.autograd.grad(out, [values, W], gr)
    exp = torch.autograd.grad(want, [values, W], gr)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, **TOL[dtype])
    assert not got[0][~valid].any()
    s = decode.sddmm(gr, idx, W.detach(), None, True, counts)
    torch.testing.assert_close(s, torch.einsum("bd,bkd->bk", gr, W.detach()[idx.long()]) * valid, **TOL[dtype])


@pytest.mark.parametrize("provider", ["fused", "slab"])
@pytest.mark.parametrize("B,d_in,d_sae,k", [(11, 13, 37, 5), (14, 24, 70, 17), (4, 7, 9, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_topk_matches_dense(B, d_in, d_sae, k, dtype, provider, small_slabs):
    *_, encode, _ = ops()
    x = torch.randn(B, d_in, dtype=dtype, device=DEV)
    W = torch.randn(d_in, d_sae, dtype=dtype, device=DEV)
    b = torch.randn(d_sae, dtype=dtype, device=DEV)
    v, i = encode.encode_topk(x, W, b, k, provider)
    rv, ri = torch.topk(torch.relu(x @ W + b), k)
    torch.testing.assert_close(v, rv, **TOL[dtype])
    pos = rv > 0  # zero-valued picks are ties at 0: any index is right
    assert torch.equal(i[pos], ri[pos])
    vals, idx, rows, row_ptr = encode.encode_batchtopk(x, W, b, k, provider)
    dense = torch.relu(x @ W + b)
    kept_v, kept_i = torch.topk(dense.reshape(-1), B * k)
    want = torch.zeros_like(dense).reshape(-1).scatter(0, kept_i, kept_v).reshape(dense.shape)
    assert vals.shape == (B * k,) and row_ptr.shape == (B + 1,)
    assert torch.equal(rows.long(), torch.searchsorted(row_ptr, torch.arange(B * k), right=True) - 1)
    pair = rows.long() * d_sae + idx.long()
    assert pair.unique().numel() == B * k  # distinct (row, latent) entries
    got = torch.zeros_like(dense).reshape(-1).scatter(0, pair, vals).reshape(dense.shape)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("provider", ["fused", "slab"])
@pytest.mark.parametrize("batch", [False, True])
def test_encoder_repair_concentrated_winners(provider, batch, small_slabs):
    """Every row's winners in one tile: the first merge flags that tile, the recomputed tile makes it exact."""
    *_, encode, _ = ops()
    B, d_in, N, k = 6, 9, 70, 8
    x = torch.randn(B, d_in, dtype=torch.float64, device=DEV)
    W = torch.randn(d_in, N, dtype=torch.float64, device=DEV)
    b = torch.randn(N, dtype=torch.float64, device=DEV)
    b[16:16 + k] += 50.0  # latents 16..23: one interpreter tile, more than kp of each row's top k
    c = encode.topk_candidates(x, W, b, k, provider)
    first, _ = torch.topk(c.keys, k)
    assert bool((c.drop > first[:, -1:]).any(-1).all())
    dense = torch.relu(x @ W + b)
    if batch:
        vals, idx, rows, _ = encode.encode_batchtopk(x, W, b, k, provider)
        got = torch.zeros_like(dense).reshape(-1).scatter(0, rows.long() * N + idx.long(), vals).reshape(B, N)
        kv, ki = torch.topk(dense.reshape(-1), B * k)
        torch.testing.assert_close(got, torch.zeros_like(dense).reshape(-1).scatter(0, ki, kv).reshape(B, N))
    else:
        v, i = encode.encode_topk(x, W, b, k, provider)
        rv, ri = torch.topk(dense, k)
        torch.testing.assert_close(v, rv)
        assert torch.equal(i, ri)


@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_encoder_gradients(apply_b_dec, dtype):
    """The encoder's sparse backward equals autograd of the dense formula at the sampled entries."""
    *_, encode, common = ops()
    B, d_in, N, K = 9, 11, 29, 6
    x = torch.randn(B, d_in, dtype=dtype, device=DEV, requires_grad=True)
    W = torch.randn(d_in, N, dtype=dtype, device=DEV, requires_grad=True)
    b = torch.randn(N, dtype=dtype, device=DEV, requires_grad=True)
    bd = torch.randn(d_in, dtype=dtype, device=DEV, requires_grad=True)
    idx = torch.stack([torch.randperm(N, device=DEV)[:K] for _ in range(B)]).to(torch.int32)
    counts = torch.randint(1, K + 1, (B,), device=DEV, dtype=torch.int32)
    x_in = x - bd if apply_b_dec else x
    dense = x_in @ W + b
    want = dense.gather(1, idx.long())
    order, offsets = common.segments(idx, counts, N)
    got = encode.sampled_encoder(x, W, b, bd if apply_b_dec else None, idx, counts, want.detach(), order, offsets)
    valid = common.valid_mask(counts, B, K, DEV)
    g = torch.randn(B, K, dtype=dtype, device=DEV) * valid
    inputs = [x, W, b] + ([bd] if apply_b_dec else [])
    for a, e in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, e, **TOL[dtype])


# ------------------------------------------------------------------------------------------
# NaN / ±inf / short rows, on every backend (the same answers as torch.topk and the reference)
# ------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def special_rows(dtype):
    """Rows with NaN, ±inf, fewer than k finite values, all -inf, ties, and ordinary values (width 37)."""
    torch.manual_seed(5)
    x = torch.randn(8, 37, dtype=dtype, device=DEV)
    x[0, [3, 20]] = NAN  # NaN ranks above everything
    x[1, [2, 30]] = INF
    x[1, 5] = NAN  # NaN above +inf
    x[2, :] = -INF
    x[2, [4, 9]] = torch.tensor([1.0, -2.0], dtype=dtype)  # two finite values, k > 2
    x[3, :] = -INF  # nothing finite: k distinct columns all the same
    x[4, 10:14] = 0.5  # ties
    x[5, 17:] = -INF  # the last tiles hold no finite value
    x[6, ::2] = INF
    return x


def _check_topk_like_torch(v, i, x, k, **tol):
    tol = tol or dict(atol=0, rtol=0)
    rv, _ = torch.topk(x, k)
    torch.testing.assert_close(v, rv, equal_nan=True, **tol)
    assert all(len(set(r.tolist())) == k for r in i), "indices must be distinct within a row"
    torch.testing.assert_close(x.gather(1, i), v, equal_nan=True, **tol)  # each index holds its value


@pytest.mark.parametrize("backend", fastsae.backends())
@pytest.mark.parametrize("k", [1, 5, 12])
def test_topk_nan_inf_and_short_rows_match_torch_on_every_backend(backend, k):
    x = special_rows(torch.float32)
    v, i = fastsae.topk(x, k, backend=backend)
    _check_topk_like_torch(v, i, x, k)


@pytest.mark.parametrize("backend", fastsae.backends())
@pytest.mark.parametrize("k", [1, 5, 12])
def test_topk_inf_and_short_rows_without_nan_match_torch_on_every_backend(backend, k):
    x = special_rows(torch.float32)
    x = torch.where(x.isnan(), torch.full_like(x, 7.0), x)
    v, i = fastsae.topk(x, k, backend=backend)
    _check_topk_like_torch(v, i, x, k)


def test_encoder_topk_keeps_nan_like_torch_relu():
    """NaN inputs give NaN pre-activations; relu keeps them (as F.relu does) and they rank first."""
    *_, encode, _ = ops()
    x = torch.randn(5, 6, device=DEV)
    x[2, 1] = NAN
    W, b = torch.randn(6, 40, device=DEV), torch.randn(40, device=DEV)
    for provider in ("fused", "slab"):
        v, i = encode.encode_topk(x, W, b, 7, provider)
        dense = torch.relu(x @ W + b)
        _check_topk_like_torch(v, i, dense, 7, **TOL[torch.float32])
        assert bool(v[2].isnan().all()) and bool(i[2].lt(40).all())  # the NaN row: NaN values first


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy (interpreter): inf·0 is NaN, on purpose
@pytest.mark.parametrize("backend", fastsae.backends())
def test_jumprelu_keeps_nan_on_every_backend(backend):
    """``jumprelu``/``step`` forward and backward agree with the reference at NaN and ±inf pre-activations
    (NaN stays NaN; ``-inf`` gives ``-inf·0 = NaN`` as in the reference)."""
    pre = torch.randn(4, 9, device=DEV)
    pre[0, 1], pre[1, 2], pre[2, 3], pre[3, 4] = NAN, INF, -INF, NAN
    theta = torch.rand(9, device=DEV).requires_grad_()
    pre.requires_grad_()
    for fn in (fastsae.jumprelu, fastsae.step):
        out = fn(pre, theta, 0.5, backend=backend)
        want = fn(pre, theta, 0.5, backend="eager")
        torch.testing.assert_close(out, want, equal_nan=True)
        assert bool(out[0, 1].isnan()) or fn is fastsae.step
        g = torch.randn_like(out)
        for a, e in zip(torch.autograd.grad(out, [pre, theta], g), torch.autograd.grad(want, [pre, theta], g)):
            torch.testing.assert_close(a, e, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_triton_jumprelu_backward_propagates_nan_gradients_like_the_reference():
    jumprelu, *_ = ops()
    pre = torch.randn(4, 9, device=DEV, requires_grad=True)
    theta = torch.rand(9, device=DEV).requires_grad_()
    eps = torch.full((9,), 0.5, device=DEV)
    for fn, rfn in ((jumprelu.jumprelu, ref.jumprelu), (jumprelu.step, ref.step)):
        out, want = fn(pre, theta, eps), rfn(pre, theta, eps)
        g = torch.randn_like(out)
        g[1, 0] = NAN
        for a, e in zip(torch.autograd.grad(out, [pre, theta], g), torch.autograd.grad(want, [pre, theta], g)):
            torch.testing.assert_close(a, e, equal_nan=True)


# ------------------------------------------------------------------------------------------
# Raw ops check their indices (as the C++ ops do): IndexError naming the op and argument
# ------------------------------------------------------------------------------------------


def test_raw_ops_check_index_bounds():
    _, _, decode, encode, common = ops()
    B, K, N, D = 3, 4, 11, 5
    v = torch.randn(B, K, device=DEV)
    W = torch.randn(N, D, device=DEV)
    g = torch.randn(B, D, device=DEV)
    for bad in (N, -1, 10**6):
        i = torch.randint(0, N, (B, K), device=DEV)
        i[1, 2] = bad
        with pytest.raises(IndexError, match="sparse_decode: indices must lie in"):
            torch.ops.fastsae_triton.sparse_decode(v, i, W)
        with pytest.raises(IndexError, match="sddmm: indices"):
            torch.ops.fastsae_triton.sddmm(g, i, W)
        with pytest.raises(IndexError, match="gather_sum: indices"):
            torch.ops.fastsae_triton.gather_sum(v, i, W)
    i = torch.randint(0, N, (B, K), device=DEV)
    order, offsets = common.segments(i, None, N)
    bad_order = order.clone()
    bad_order[0] = B * K
    with pytest.raises(IndexError, match="segment_reduce: order"):
        torch.ops.fastsae_triton.segment_reduce(bad_order, offsets, v.reshape(-1), g, K)
    rows = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEV)  # row 3 of a 3-row batch
    with pytest.raises(IndexError, match="sddmm: rows"):
        torch.ops.fastsae_triton.sddmm(g, i[0, :3].to(torch.int32), W, rows)


def test_kernels_skip_out_of_range_latents():
    """Below the op checks, the kernels themselves never read outside W: an out-of-range latent adds nothing."""
    _, _, decode, _, _ = ops()
    v = torch.ones(2, 3, device=DEV)
    i = torch.tensor([[0, 5, 99], [-7, 1, 2]], device=DEV)
    W = torch.randn(6, 4, device=DEV)
    got = decode.gather_rows(v, i, W)
    want = torch.stack([W[0] + W[5], W[1] + W[2]])
    torch.testing.assert_close(got, want)
    s, _ = decode._sddmm_launch(torch.ones(2, 4, device=DEV), i, W)
    torch.testing.assert_close(s[0, 2], torch.zeros((), device=DEV))
    torch.testing.assert_close(s[1, 0], torch.zeros((), device=DEV))


# ------------------------------------------------------------------------------------------
# Encoder providers: the slab width bound, the choice table, the fp32 precision read
# ------------------------------------------------------------------------------------------


def test_slab_encoder_holds_one_bounded_slab(monkeypatch):
    """``SLAB_BYTES`` bounds the one buffer the slabs reuse; each slab is compacted by its own launch."""
    *_, encode, common = ops()
    B, d_in, N = 9, 7, 70
    monkeypatch.setattr(encode, "SLAB_BYTES", B * 32 * 4)  # 32 float32 columns
    x, W, b = torch.randn(B, d_in), torch.randn(d_in, N), torch.randn(N)
    assert encode.slab_width(B, N, 4, 16) == 32
    widths = [s.shape[1] for _, s in encode._slabs(x, W, b, 16)]
    assert widths == [32, 32, 6]
    with common.capture_launches() as got:
        encode.jumprelu_lists(x, W, b, torch.zeros(N), torch.ones(N), 8, "slab")
    assert [launch.kernel.name for launch in got] == ["_compact_jumprelu_kernel"] * 3


def test_encoder_plan_reads_the_measured_table(monkeypatch):
    *_, encode, _ = ops()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(encode, "_table_cache", [
        dict(device="Fake GPU", dtype="bfloat16", arch="topk", B=4096, d_in=2304, d_sae=16384, best="fused"),
        dict(device="Fake GPU", dtype="bfloat16", arch="topk", B=4096, d_in=2304, d_sae=65536, best="slab"),
        dict(device="Other GPU", dtype="bfloat16", arch="topk", B=4096, d_in=2304, d_sae=20000, best="fused"),
    ])
    monkeypatch.delenv("FASTSAE_ENCODER", raising=False)
    cuda = torch.device("cuda")
    plan = lambda N, arch="topk", dt=torch.bfloat16: encode.encoder_plan(4096, N, 2304, dt, cuda, arch)  # noqa: E731
    assert plan(16384) == "fused" and plan(20000) == "fused" and plan(2**20) == "slab"  # nearest measured size
    assert plan(16384, arch="jumprelu") == "slab"  # nothing measured: the default on CUDA
    assert plan(16384, dt=torch.float32) == "slab"
    assert encode.encoder_plan(4096, 16384, 2304, torch.float32, torch.device("cpu"), "topk") == "fused"
    monkeypatch.setenv("FASTSAE_ENCODER", "slab")
    assert plan(16384) == "slab"
    with pytest.raises(ValueError, match="provider must be"):
        encode.encode_topk(torch.randn(2, 3), torch.randn(3, 5), torch.randn(5), 2, "cublas")


def test_fp32_precision_is_read_through_the_api_that_does_not_raise():
    """``torch.backends.fp32_precision = "tf32"`` makes the legacy ``allow_tf32`` read raise (torch >= 2.9);
    the kernels' precision choice reads the new API and follows either way of setting it."""
    *_, common = ops()
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy flag")
    prev_root, prev = torch.backends.fp32_precision, matmul.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        matmul.fp32_precision = "none"
        with pytest.raises(RuntimeError):
            matmul.allow_tf32  # noqa: B018  (the read itself raises)
        assert common.matmul_fp32_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert common.matmul_fp32_precision() == "ieee"
        torch.backends.fp32_precision = "none"
        matmul.fp32_precision = "none"
        matmul.allow_tf32 = True  # the legacy setter
        assert common.matmul_fp32_precision() == "tf32"
        matmul.allow_tf32 = False
        assert common.matmul_fp32_precision() == "ieee"
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = prev_root, prev
