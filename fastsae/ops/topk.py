"""Top-k in Triton: per-tile partial top-k (in registers) + one small merge, exact by construction and
without a device→host read.

Why not a full in-kernel top-k: a row of ``d_sae`` = 65536 is spread over hundreds of tiles, and the
k = 64 winners of a row are spread over them too. Each tile ``[BLOCK_M, BLOCK_N]`` therefore keeps only
its ``kp`` largest entries per row (``kp`` ≪ ``BLOCK_N``, by ``kp`` rounds of max/argmax in registers)
and records the largest entry it *dropped*. ``torch.topk`` then merges the ``n_tiles · kp`` candidates of
each row (16× fewer than ``d_sae`` for ``BLOCK_N=128, kp=8``).

Order keys. Values are compared as integer *order keys* (``order_key``): the float's bits mapped so that
integer order is ``torch.topk``'s — NaN above +inf, then the reals, then -inf — with a reserved key below
all of them for "no entry" (columns past ``N``, entries already taken). So NaN and ±inf rank as in
``torch.topk`` on every device (GPU ``max`` would drop NaN, numpy's would spread it), and a row with
fewer than k finite values still yields k *distinct* columns (its -inf entries are real entries, the
absent ones never win while enough real candidates exist, which ``tile_shape`` guarantees).

Exactness without a host read. The merged k-th key ``τ`` is exact unless some tile dropped a key
``> τ``. Such a tile kept ``kp`` keys ``> τ``, and at most ``k - 1`` candidates lie strictly above ``τ``,
so at most ``F = (k - 1) // kp`` tiles of a row (``(B·k - 1) // kp`` of a batch, for BatchTopK) can be
flagged. ``repair`` therefore recomputes a fixed number ``F`` of tiles per row — the ``F`` with the largest
drops; those not above ``τ`` are skipped inside the kernel — keeping each flagged tile's top
``min(k, BLOCK_N)``, and a second merge over the first merge's survivors plus the recomputed tiles gives
the exact top-k. Every size is known on the host, so the whole selection is a fixed sequence of
launches (no ``nonzero``, no ``.item()``). Ties at ``τ`` may pick other columns with equal values, as
``torch.topk`` itself may.

The same tile routine runs in the fused encoder's epilogue and after each cuBLAS slab (``encode.py``),
so TopK/BatchTopK SAEs never write the dense ``[B, d_sae]`` pre-activations.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from .triton_common import ABSENT32, ABSENT64, NS, TritonKernel, cfg, flat_grid, gpu_geometry, key_dtype, keys_to_values

#: Candidates kept per (row, tile) and the tile width on GPUs / in the interpreter.
KP_GPU, BLOCK_N_GPU = 8, 128
KP_INTERP, BLOCK_N_INTERP = 4, 16


@triton.jit
def order_key(v, KEY64: tl.constexpr):
    """Integer keys whose order is ``torch.topk``'s: NaN > +inf > reals > -inf (-0.0 just below +0.0)."""
    if KEY64:
        bits = v.to(tl.float64).to(tl.int64, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        key = tl.where(v != v, tl.full(key.shape, 0x7FFFFFFFFFFFFFFF, tl.int64), key)
    else:
        bits = v.to(tl.float32).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(v != v, tl.full(key.shape, 0x7FFFFFFF, tl.int32), key)
    return key


@triton.jit
def absent_key(shape: tl.constexpr, KEY64: tl.constexpr):
    """The key of "no entry": below every float's key."""
    if KEY64:
        return tl.full(shape, -9223372036854775808, tl.int64)
    else:
        return tl.full(shape, -2147483648, tl.int32)


@triton.jit
def relu_keep_nan(v):
    """``relu`` as torch computes it: NaN stays NaN (``max(NaN, 0)`` on a GPU would give 0)."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def tile_topk_store(keys, rm, col0, M, tile, n_tiles, key_ptr, idx_ptr, drop_ptr,
                    KP: tl.constexpr, KEY64: tl.constexpr):
    """Store the ``KP`` largest keys of each row of the tile ``keys [BM, BN]`` (absent columns: ``absent_key``).

    Candidates go to ``[row, tile*KP + i]`` of ``[M, n_tiles*KP]`` buffers with their columns
    ``col0 + i``; the largest key left over goes to ``drop[row, tile]`` (absent when nothing was dropped).
    """
    BN: tl.constexpr = keys.shape[1]
    mrow = rm < M
    base = rm.to(tl.int64) * (n_tiles * KP) + tile * KP
    rn_local = tl.arange(0, BN)
    gone = absent_key(keys.shape, KEY64)
    for i in tl.static_range(KP):
        m, a = tl.max(keys, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tl.store(key_ptr + base + i, m, mask=mrow)
        tl.store(idx_ptr + base + i, (col0 + a).to(tl.int32), mask=mrow)
        keys = tl.where(rn_local[None, :] == a[:, None], gone, keys)
    tl.store(drop_ptr + rm.to(tl.int64) * n_tiles + tile, tl.max(keys, axis=1), mask=mrow)


@triton.jit
def _dense_topk_kernel(
    x_ptr, key_ptr, idx_ptr, drop_ptr, M, N, stride_xm, col0, tile0, n_tiles,
    RELU: tl.constexpr, KEY64: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per-tile candidates of a dense ``[M, N]`` block whose column 0 is global column ``col0`` (tile
    ``tile0``): the top-k op on ``pre``, and the compaction after each cuBLAS slab of the encoder."""
    n_here = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    t = pid % n_here
    rm = (pid // n_here) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rn[None, :], mask=mask, other=0.0)
    if RELU:
        x = relu_keep_nan(x)
    keys = tl.where(rn[None, :] < N, order_key(x, KEY64), absent_key((BLOCK_M, BLOCK_N), KEY64))
    tile_topk_store(keys, rm, col0 + t * BLOCK_N, M, tile0 + t, n_tiles, key_ptr, idx_ptr, drop_ptr, KP, KEY64)


_dense_topk = TritonKernel(
    _dense_topk_kernel,
    [cfg(BLOCK_M=32, num_warps=4), cfg(BLOCK_M=16, num_warps=4), cfg(BLOCK_M=64, num_warps=8)],
    key=["M", "N", "KP"], bucketed=["M", "N"], interp=dict(BLOCK_M=8),
)


@triton.jit
def _repair_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, tiles_ptr, key_ptr, idx_ptr,
    N, Kd, stride_xm, stride_xk, stride_wk, stride_wn,
    FROM_GEMM: tl.constexpr, RELU: tl.constexpr, KEY64: tl.constexpr, ACC64: tl.constexpr, KR: tl.constexpr,
    KR_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Exact top-``KR`` of one (row, tile) pair per program; pairs with tile ``-1`` store absent keys.

    ``FROM_GEMM``: the tile is recomputed as ``x[row] @ W[:, tile] + b[tile]`` (rounded to the data
    dtype as the encoder's GEMM rounds it); otherwise read from the dense ``x [M, N]``. Most pairs are
    not flagged: they store their absent keys in one vector store and do no further work.
    """
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    p = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + p).to(tl.int64)
    tile = tl.load(tiles_ptr + p)
    out = p * KR
    slots = tl.arange(0, KR_P2)
    skipped = (slots * 0 + tile) < 0  # the vector form: a scalar mask on a vector store trips the interpreter
    tl.store(key_ptr + out + slots, absent_key((KR_P2,), KEY64), mask=(slots < KR) & skipped)
    tl.store(idx_ptr + out + slots, slots * 0, mask=(slots < KR) & skipped)
    rn = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (rn >= 0) & (rn < N)  # tile -1 (skip) gives rn < 0 everywhere
    if FROM_GEMM:
        acc = tl.zeros((BLOCK_N,), dtype=ACC)
        k_end = tl.where(tile >= 0, Kd, 0)
        for k0 in range(0, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < Kd
            xk = tl.load(x_ptr + row * stride_xm + rk.to(tl.int64) * stride_xk, mask=mk, other=0.0).to(ACC)
            w = tl.load(w_ptr + rk.to(tl.int64)[:, None] * stride_wk + rn[None, :] * stride_wn,
                        mask=mk[:, None] & valid[None, :], other=0.0).to(ACC)
            acc += tl.sum(xk[:, None] * w, axis=0)
        bias = tl.load(b_ptr + rn, mask=valid, other=0.0).to(ACC)
        v = (acc + bias).to(x_ptr.dtype.element_ty)
    else:
        v = tl.load(x_ptr + row * stride_xm + rn, mask=valid, other=0.0)
    if RELU:
        v = relu_keep_nan(v)
    keys = tl.where(valid, order_key(v, KEY64), absent_key((BLOCK_N,), KEY64))
    gone = absent_key((BLOCK_N,), KEY64)
    local = tl.arange(0, BLOCK_N)
    rounds = tl.where(tile >= 0, KR, 0)
    for i in range(0, rounds):
        m, a = tl.max(keys, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(key_ptr + out + i, m)
        tl.store(idx_ptr + out + i, (tile * BLOCK_N + a).to(tl.int32))
        keys = tl.where(local == a, gone, keys)


_repair = TritonKernel(
    _repair_kernel,
    [cfg(BLOCK_K=64, num_warps=4), cfg(BLOCK_K=32, num_warps=4)],  # the last also fits float64
    key=["N", "Kd", "KR"], bucketed=["N"], interp=dict(BLOCK_K=16),
)


# ----------------------------------------------------------------------------------------------
# Host side: tile geometry, candidate buffers, the exact selection
# ----------------------------------------------------------------------------------------------


def tile_shape(N: int, k: int) -> tuple[int, int, int]:
    """``(BLOCK_N, kp, n_tiles)`` for rows of width ``N`` and top ``k``.

    ``kp`` grows until the tiles offer at least ``k`` real candidates per row (the last tile may be
    narrow); ``kp == BLOCK_N`` keeps every entry (then nothing is dropped and the merge is exact).
    """
    block_n, kp = (BLOCK_N_GPU, KP_GPU) if gpu_geometry() else (BLOCK_N_INTERP, KP_INTERP)
    n_tiles = triton.cdiv(N, block_n)
    last = N - (n_tiles - 1) * block_n
    kp = min(kp, block_n)
    while (n_tiles - 1) * kp + min(kp, last) < k and kp < block_n:
        kp = min(block_n, kp * 2)
    return block_n, kp, n_tiles


class Candidates:
    """The outputs of a per-tile top-k pass over ``[B, N]``: ``keys``/``idx [B, n_tiles*kp]`` (int keys,
    int32 columns) and ``drop [B, n_tiles]`` (largest key each tile dropped), with their geometry."""

    def __init__(self, B: int, N: int, k: int, dtype: torch.dtype, device):
        self.block_n, self.kp, self.n_tiles = tile_shape(N, k)
        self.dtype, self.key64 = dtype, dtype == torch.float64
        kd = key_dtype(dtype)
        self.keys = torch.empty(B, self.n_tiles * self.kp, dtype=kd, device=device)
        self.idx = torch.empty(B, self.n_tiles * self.kp, dtype=torch.int32, device=device)
        self.drop = torch.empty(B, self.n_tiles, dtype=kd, device=device)

    @property
    def absent(self) -> int:
        return ABSENT64 if self.key64 else ABSENT32


def dense_candidates(c: Candidates, x: Tensor, col0: int = 0, relu: bool = False) -> None:
    """Fill the candidates of global columns ``[col0, col0 + x.shape[1])`` from the dense block ``x``."""
    M, N = x.shape
    if M == 0 or N == 0:
        return
    assert col0 % c.block_n == 0 and x.stride(1) == 1
    _dense_topk(flat_grid(lambda m: triton.cdiv(M, m["BLOCK_M"]), lambda m: triton.cdiv(N, c.block_n)),
                x, c.keys, c.idx, c.drop, M, N, x.stride(0), col0, col0 // c.block_n, c.n_tiles,
                RELU=relu, KEY64=c.key64, KP=c.kp, BLOCK_N=c.block_n)


#: ``recompute(rows [P], tiles [P] int32 (-1: skip), KR) -> (keys [P, KR], idx [P, KR] int32)``
Recompute = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


def recompute_dense(x: Tensor, c: Candidates, relu: bool = False) -> Recompute:
    """Exact tiles read again from the dense ``x [M, N]``."""
    def run(rows, tiles, KR):
        return _launch_repair(c, rows, tiles, KR, x, x, x, x.shape[1], 0, x.stride(0), 1, 0, 0,
                              from_gemm=False, relu=relu, acc64=c.key64)
    return run


def recompute_gemm(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, c: Candidates) -> Recompute:
    """Exact tiles of ``relu(x_in @ W_enc + b_enc)`` recomputed from the inputs (never held densely)."""
    def run(rows, tiles, KR):
        return _launch_repair(c, rows, tiles, KR, x_in, W_enc, b_enc, W_enc.shape[1], x_in.shape[1],
                              x_in.stride(0), x_in.stride(1), W_enc.stride(0), W_enc.stride(1),
                              from_gemm=True, relu=True, acc64=x_in.dtype == torch.float64)
    return run


def _launch_repair(c, rows, tiles, KR, x, w, b, N, Kd, sxm, sxk, swk, swn, from_gemm, relu, acc64):
    P = rows.numel()
    keys = torch.empty(P, KR, dtype=c.keys.dtype, device=c.keys.device)
    idx = torch.empty(P, KR, dtype=torch.int32, device=c.keys.device)
    if P:
        _repair((P,), x, w, b, rows.contiguous(), tiles.to(torch.int32).contiguous(), keys, idx,
                N, Kd, sxm, sxk, swk, swn, FROM_GEMM=from_gemm, RELU=relu, KEY64=c.key64, ACC64=acc64,
                KR=KR, KR_P2=triton.next_power_of_2(KR), BLOCK_N=c.block_n)
    return keys, idx


def _with_repair(keys, cols, rows, n_keep, c: Candidates, drop_flat, tau, flag_rows, recompute, B):
    """Shared second stage: recompute the flagged (row, tile) pairs and merge them with the survivors.

    ``keys``/``cols``/``rows``: the first merge's picks (flat); ``drop_flat``: the tiles' drops (flat
    ``row * n_tiles + tile``), ``tau``: the cut they are compared with (per pick's row, or global);
    ``flag_rows``: the number of pairs that can be flagged. Returns the final flat picks.
    """
    T, KR = c.n_tiles, min(n_keep, c.block_n)
    dk, dp = torch.topk(drop_flat, flag_rows, dim=-1)
    flagged = dk > tau
    tiles = torch.where(flagged, dp % T, torch.full_like(dp, -1))
    prow = dp // T if dp.dim() == 1 else torch.arange(B, device=dp.device).unsqueeze(1).expand_as(dp)
    rkeys, ridx = recompute(prow.reshape(-1), tiles.reshape(-1), KR)
    # the first merge's picks from flagged tiles are replaced by the recomputed tiles (no duplicates)
    pair = rows * T + cols.long() // c.block_n
    gdp = dp if dp.dim() == 1 else dp + (torch.arange(B, device=dp.device) * T).unsqueeze(1)
    table = torch.zeros(B * T + 1, dtype=torch.bool, device=keys.device)
    table.scatter_(0, torch.where(flagged, gdp, torch.full_like(gdp, B * T)).reshape(-1), True)
    table[B * T] = False
    keys = torch.where(table[pair], torch.full_like(keys, c.absent), keys)
    return keys, rkeys, ridx, prow


def select_rows(c: Candidates, k: int, recompute: Recompute) -> tuple[Tensor, Tensor]:
    """Exact per-row top-k from the candidates: ``(keys [B, k], columns [B, k] int64)``, sorted descending."""
    B = c.keys.shape[0]
    keys, pos = torch.topk(c.keys, k, dim=-1, largest=True, sorted=True)
    cols = c.idx.gather(-1, pos).long()
    F = min((k - 1) // c.kp, c.n_tiles)
    if F == 0 or B == 0:
        return keys, cols
    rows = torch.arange(B, device=keys.device).unsqueeze(1).expand_as(cols)
    keys, rkeys, ridx, _ = _with_repair(keys, cols, rows, k, c, c.drop, keys[:, -1:], F, recompute, B)
    all_keys = torch.cat([keys, rkeys.reshape(B, -1)], 1)
    all_cols = torch.cat([cols, ridx.reshape(B, -1).long()], 1)
    keys, pos = torch.topk(all_keys, k, dim=-1, largest=True, sorted=True)
    return keys, all_cols.gather(-1, pos)


def select_batch(c: Candidates, n_keep: int, recompute: Recompute) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-``n_keep`` of the whole batch: flat ``(keys, rows int64, columns int64)``, unordered."""
    B, C = c.keys.shape
    keys, pos = torch.topk(c.keys.reshape(-1), n_keep, sorted=False)
    rows, cols = pos // C, c.idx.reshape(-1)[pos].long()
    F = min((n_keep - 1) // c.kp, B * c.n_tiles)
    if F == 0 or n_keep == 0:
        return keys, rows, cols
    keys, rkeys, ridx, prow = _with_repair(keys, cols, rows, n_keep, c, c.drop.reshape(-1), keys.min(), F,
                                           recompute, B)
    KR = rkeys.shape[1]
    all_keys = torch.cat([keys, rkeys.reshape(-1)])
    all_rows = torch.cat([rows, prow.unsqueeze(1).expand(-1, KR).reshape(-1)])
    all_cols = torch.cat([cols, ridx.reshape(-1).long()])
    keys, pos = torch.topk(all_keys, n_keep, sorted=False)
    return keys, all_rows[pos], all_cols[pos]


# ----------------------------------------------------------------------------------------------
# The top-k op on dense rows
# ----------------------------------------------------------------------------------------------


def topk_dense(pre: Tensor, k: int, relu: bool = False) -> tuple[Tensor, Tensor]:
    """``(values [B, k], indices [B, k] int64)`` of ``pre [B, N]`` (``relu(pre)`` with ``relu``), sorted descending."""
    B, N = pre.shape
    c = Candidates(B, N, k, pre.dtype, pre.device)
    dense_candidates(c, pre, relu=relu)
    keys, cols = select_rows(c, k, recompute_dense(pre, c, relu))
    return keys_to_values(keys, pre.dtype), cols


@custom_op(f"{NS}::topk", mutates_args=())
def _topk_values(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return topk_dense(pre.contiguous(), k)


@_topk_values.register_fake
def _(pre, k):
    return pre.new_empty(pre.shape[0], k), pre.new_empty(pre.shape[0], k, dtype=torch.int64)


def _topk_setup(ctx, inputs, output):
    pre, k = inputs
    ctx.shape = pre.shape
    ctx.save_for_backward(output[1])


def _topk_backward(ctx, grad_values, grad_indices):
    (idx,) = ctx.saved_tensors
    return grad_values.new_zeros(ctx.shape).scatter(-1, idx, grad_values), None


_topk_values.register_autograd(_topk_backward, setup_context=_topk_setup)


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``pre [B, N]``, sorted descending: ``(values, indices int64)``.

    NaN ranks above +inf and -inf below every real, as in ``torch.topk``; the indices of a row are
    always distinct, also when it holds fewer than ``k`` finite values."""
    return _topk_values(pre, k)
