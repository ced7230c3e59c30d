"""Top-k in Triton: per-tile partial top-k (in registers) + one small merge, exact by construction.

Why not a full in-kernel top-k: a row of ``d_sae`` = 65536 is spread over hundreds of tiles, and
the k = 64 winners of a row are spread over them too. Each tile ``[BLOCK_M, BLOCK_N]`` therefore keeps
only its ``kp`` largest entries per row (``kp`` ≪ ``BLOCK_N``, by ``kp`` rounds of max/argmax in
registers) and records the largest entry it *dropped*. ``torch.topk`` then merges the
``n_tiles · kp`` candidates of each row (16× fewer than ``d_sae`` for ``BLOCK_N=128, kp=8``).

Exactness: the merged k-th value ``τ_b`` is exact unless some tile dropped an entry ``> τ_b`` — which
the recorded drop maxima show. Those rows (rare: a tile would have to hold more than ``kp`` of a row's
top ``k``) are recomputed densely. Ties at ``τ_b`` may pick other indices with equal values, as
``torch.topk`` itself may.

The same tile routine runs in the fused encoder's epilogue (``encode.py``), so TopK/BatchTopK SAEs
never write the dense ``[B, d_sae]`` pre-activations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from .triton_common import INTERPRET, NS, kernel_op, TritonKernel, cfg

#: Candidates kept per (row, tile) and the tile width on GPUs / in the interpreter.
KP_GPU, BLOCK_N_GPU = 8, 128
KP_INTERP, BLOCK_N_INTERP = 4, 16


@triton.jit
def tile_topk_store(t, rm, rn_local, col0, M, tile, n_tiles, val_ptr, idx_ptr, drop_ptr, KP: tl.constexpr):
    """Store the ``KP`` largest entries of each row of the tile ``t [BM, BN]`` (``-inf`` marks absent columns).

    Candidates go to ``[row, tile*KP + i]`` of ``[M, n_tiles*KP]`` buffers; the largest entry left
    over goes to ``drop[row, tile]`` (``-inf`` when the tile kept everything it had).
    """
    mrow = rm < M
    base = rm.to(tl.int64) * (n_tiles * KP) + tile * KP
    for i in tl.static_range(KP):
        m = tl.max(t, axis=1)
        a = tl.argmax(t, axis=1)
        tl.store(val_ptr + base + i, m.to(val_ptr.dtype.element_ty), mask=mrow)
        tl.store(idx_ptr + base + i, (col0 + a).to(tl.int32), mask=mrow)
        t = tl.where(rn_local[None, :] == a[:, None], float("-inf"), t)
    tl.store(drop_ptr + rm.to(tl.int64) * n_tiles + tile, tl.max(t, axis=1).to(drop_ptr.dtype.element_ty), mask=mrow)


@triton.jit
def _dense_topk_kernel(
    x_ptr, val_ptr, idx_ptr, drop_ptr, M, N, stride_xm, n_tiles,
    ACC64: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    tile = tl.program_id(1)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_local = tl.arange(0, BLOCK_N)
    rn = tile * BLOCK_N + rn_local
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N),
                other=0.0).to(ACC)
    t = tl.where(rn[None, :] < N, x, float("-inf"))
    tile_topk_store(t, rm, rn_local, tile * BLOCK_N, M, tile, n_tiles, val_ptr, idx_ptr, drop_ptr, KP)


_dense_topk = TritonKernel(
    _dense_topk_kernel,
    [cfg(BLOCK_M=32, num_warps=4), cfg(BLOCK_M=16, num_warps=4), cfg(BLOCK_M=64, num_warps=8)],
    key=["N", "n_tiles"], interp=dict(BLOCK_M=8),
)


def tile_shape(N: int, k: int) -> tuple[int, int, int]:
    """``(BLOCK_N, kp, n_tiles)`` for rows of width ``N`` and top ``k``.

    ``kp`` grows until the tiles offer at least ``k`` finite candidates per row (the last tile may be
    narrow); ``kp == BLOCK_N`` keeps every entry (then nothing is dropped and the merge is exact).
    """
    block_n, kp = (BLOCK_N_INTERP, KP_INTERP) if INTERPRET else (BLOCK_N_GPU, KP_GPU)
    n_tiles = triton.cdiv(N, block_n)
    last = N - (n_tiles - 1) * block_n
    kp = min(kp, block_n)
    while (n_tiles - 1) * kp + min(kp, last) < k and kp < block_n:
        kp = min(block_n, kp * 2)
    return block_n, kp, n_tiles


def candidate_buffers(B: int, N: int, k: int, dtype: torch.dtype, device) -> tuple:
    """Tile geometry and the outputs of a per-tile top-k pass over ``[B, N]``:
    ``(block_n, kp, n_tiles, values [B, T*kp], indices [B, T*kp] int32, dropped max [B, T])``."""
    block_n, kp, n_tiles = tile_shape(N, k)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    val = torch.empty(B, n_tiles * kp, dtype=dtype, device=device)
    idx = torch.empty(B, n_tiles * kp, dtype=torch.int32, device=device)
    drop = torch.empty(B, n_tiles, dtype=wide, device=device)
    return block_n, kp, n_tiles, val, idx, drop


def merge_candidates(cand_val: Tensor, cand_idx: Tensor, drop: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values [B,k], indices [B,k] int64, unsafe [B] bool)``: the merge, and the rows it may have got wrong."""
    vals, pos = torch.topk(cand_val, k, dim=-1, largest=True, sorted=True)
    idx = cand_idx.gather(-1, pos).long()
    unsafe = (drop > vals[:, -1:].to(drop.dtype)).any(-1)
    return vals, idx, unsafe


@kernel_op("topk_candidates")
def topk_candidates(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tile candidates of ``pre [B, N]``: ``(values [B, T*kp], indices [B, T*kp] int32, dropped max [B, T])``."""
    B, N = pre.shape
    block_n, kp, n_tiles, val, idx, drop = candidate_buffers(B, N, k, pre.dtype, pre.device)
    if B:
        _dense_topk(lambda m: (triton.cdiv(B, m["BLOCK_M"]), n_tiles),
                    pre, val, idx, drop, B, N, pre.stride(0), n_tiles,
                    ACC64=pre.dtype == torch.float64, KP=kp, BLOCK_N=block_n)
    return val, idx, drop


@custom_op(f"{NS}::topk", mutates_args=())
def _topk_values(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    pre = pre.contiguous()
    cand_val, cand_idx, drop = topk_candidates(pre, k)
    vals, idx, unsafe = merge_candidates(cand_val, cand_idx, drop, k)
    if bool(unsafe.any()):  # data-dependent repair: this is why the op is opaque (custom_op), not traced
        rows = unsafe.nonzero().squeeze(1)
        v, i = torch.topk(pre[rows], k, dim=-1, largest=True, sorted=True)
        vals[rows], idx[rows] = v, i
    return vals, idx


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
    """The ``k`` largest entries of each row of ``pre [B, N]``, sorted descending: ``(values, indices int64)``."""
    return _topk_values(pre, k)
