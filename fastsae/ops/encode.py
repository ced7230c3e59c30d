"""The fused SAE encoder in Triton: one GEMM ``x @ W_enc + b_enc`` whose epilogue writes a compact code.

The dense ``[B, d_sae]`` pre-activation tensor is never written to memory (DESIGN.md §2):

- JumpReLU (``encode_jumprelu``): the epilogue keeps the *active* entries ``pre > θ`` and the *window*
  entries ``|pre - θ| < ε/2`` (needed only for the θ-gradient) and appends them to per-row lists:
  one ``tl.atomic_add`` per (tile, row) reserves the row's slots, an in-tile prefix sum places each
  entry. The lists have a capacity chosen from the previous call (a cheap bound that tracks L0); a row
  that overflows still counts its entries, so one retry at the exact capacity always suffices.
- TopK / BatchTopK (``encode_topk`` / ``encode_batchtopk``): the epilogue keeps each tile's top
  ``kp`` entries per row (``topk.tile_topk_store``); a small ``torch.topk`` merges them and the rare
  rows the merge cannot vouch for are recomputed densely (see ``topk.py``).
- ``sampled_encoder``: attaches the encoder's *sparse* backward to the compact pre-activations:
  ``grad W_enc[:, j] = Σ_{entries at j} g · x_in[row]`` and ``grad b_enc[j] = Σ g`` in one segment pass over
  entries sorted by latent, ``grad b_dec = -W_enc @ grad b_enc`` (batch summed first, then one mat-vec),
  and ``grad x`` (only when ``x`` itself requires grad) by gathering ``W_enc`` columns.

The encode ops are opaque ``custom_op``s (their capacity retry and exactness repair look at data);
their output width is a dynamic size for ``torch.compile``. Everything they launch is a plain kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from .decode import gather_sum, segment_reduce
from .topk import candidate_buffers, merge_candidates, tile_topk_store
from .triton_common import NS, kernel_op, TritonKernel, cfg


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: ``GROUP_M`` row-tiles sweep the columns together so ``W_enc`` tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _encoder_tile(x_ptr, w_ptr, b_ptr, rm, rn, M, N, Kd, stride_xm, stride_xk, stride_wk, stride_wn,
                  ACC64: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pre = x[rm] @ W_enc[:, rn] + b_enc[rn]`` for one tile, accumulated in float32 (float64 for float64),
    returned rounded to the data dtype as eager's ``pre`` is."""
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    rm64 = rm.to(tl.int64)
    for k0 in range(0, Kd, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < Kd), other=0.0)
        b = tl.load(w_ptr + rk.to(tl.int64)[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(rk[:, None] < Kd) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(ACC)
    return (acc + bias[None, :]).to(x_ptr.dtype.element_ty)


@triton.jit
def _encode_jumprelu_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, eps_ptr, idx_ptr, pre_ptr, cnt_ptr,
    M, N, Kd, CAP, stride_xm, stride_xk, stride_wk, stride_wn,
    ACC64: tl.constexpr, WIDE64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    WIDE: tl.constexpr = tl.float64 if WIDE64 else tl.float32
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pre = _encoder_tile(x_ptr, w_ptr, b_ptr, rm, rn, M, N, Kd, stride_xm, stride_xk, stride_wk, stride_wn,
                        ACC64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # θ and ε stay in their own (float32-or-wider) precision, as in reference._kernel_window.
    pw = pre.to(WIDE)
    th = tl.load(thr_ptr + rn, mask=rn < N, other=0.0).to(WIDE)
    ep = tl.load(eps_ptr + rn, mask=rn < N, other=1.0).to(WIDE)
    u = (pw - th[None, :]) / ep[None, :]
    keep = (pw > th[None, :]) | ((u > -0.5) & (u < 0.5))
    keep = keep & (rm[:, None] < M) & (rn[None, :] < N)
    ki = keep.to(tl.int32)
    count = tl.sum(ki, axis=1)
    # One atomic per (row, tile) reserves this tile's slots in the row's list; rows with nothing to
    # append skip it. Counts keep growing past CAP so the caller learns the exact size to retry with.
    base = tl.atomic_add(cnt_ptr + rm, count, mask=(rm < M) & (count > 0), sem="relaxed")
    pos = base[:, None] + tl.cumsum(ki, axis=1) - ki
    ok = keep & (pos < CAP)
    off = rm.to(tl.int64)[:, None] * CAP + pos
    tl.store(idx_ptr + off, (rn[None, :] + 0 * pos).to(tl.int32), mask=ok)
    tl.store(pre_ptr + off, pre, mask=ok)


_ENC_CONFIGS = [
    # Hopper GEMM shapes for bf16 with float32 accumulation (d_in = 2304 is a multiple of 64).
    cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    cfg(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    # last: small enough for float64 operands in shared memory (the autotuner drops configs that do not fit)
    cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
]

_encode_jumprelu = TritonKernel(
    _encode_jumprelu_kernel, _ENC_CONFIGS, key=["M", "N", "Kd"],
    interp=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2), reset_to_zero=["cnt_ptr"],
)


@triton.jit
def _encode_topk_kernel(
    x_ptr, w_ptr, b_ptr, val_ptr, idx_ptr, drop_ptr,
    M, N, Kd, n_tiles, stride_xm, stride_xk, stride_wk, stride_wn,
    ACC64: tl.constexpr, PRECISION: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_local = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + rn_local
    pre = _encoder_tile(x_ptr, w_ptr, b_ptr, rm, rn, M, N, Kd, stride_xm, stride_xk, stride_wk, stride_wn,
                        ACC64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    t = tl.maximum(pre.to(ACC), 0.0)  # relu
    t = tl.where(rn[None, :] < N, t, float("-inf"))
    tile_topk_store(t, rm, rn_local, pid_n * BLOCK_N, M, pid_n, n_tiles, val_ptr, idx_ptr, drop_ptr, KP)


# BLOCK_N is fixed by topk.tile_shape (the candidate buffers are sized by it), so it is not tuned here.
_encode_topk = TritonKernel(
    _encode_topk_kernel,
    [cfg(BLOCK_M=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
     cfg(BLOCK_M=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
     cfg(BLOCK_M=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
     cfg(BLOCK_M=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)],  # fits float64
    key=["M", "N", "Kd"], interp=dict(BLOCK_M=16, BLOCK_K=16, GROUP_M=2),
)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _precision(x: Tensor) -> str:
    """``tl.dot`` input precision. It only matters for float32 operands: match what eager's matmul does
    on this device (TF32 only where torch allows it). bf16/fp16 keep Triton's default."""
    if x.dtype == torch.float32:
        return "tf32" if (x.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return "ieee" if x.dtype == torch.float64 else "tf32"


def _grid(M, N):
    return lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)


#: capacity used last time for a (B, d_sae) shape: the next call starts there (L0 drifts slowly).
_capacity_hint: dict[tuple[int, int], int] = {}


def _round_up(n: int, m: int = 16) -> int:
    return (n + m - 1) // m * m


def jumprelu_lists(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, bandwidth: Tensor,
                   capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """One launch at a fixed ``capacity``: ``(indices [B, cap] int32, pre [B, cap], counts [B] int32)``.

    ``counts`` are the true per-row totals; a row with ``counts > capacity`` lost entries (retry).
    """
    B, Kd = x_in.shape
    N = W_enc.shape[1]
    # Padding slots hold latent 0 with value 0, so every index stays in range for whoever reads them.
    idx = torch.zeros(B, capacity, dtype=torch.int32, device=x_in.device)
    pre = torch.zeros(B, capacity, dtype=x_in.dtype, device=x_in.device)
    counts = torch.zeros(B, dtype=torch.int32, device=x_in.device)
    if B and N:
        _encode_jumprelu(
            _grid(B, N), x_in, W_enc, b_enc, threshold, bandwidth, idx, pre, counts,
            B, N, Kd, capacity, x_in.stride(0), x_in.stride(1), W_enc.stride(0), W_enc.stride(1),
            ACC64=x_in.dtype == torch.float64,
            WIDE64=torch.float64 in (x_in.dtype, threshold.dtype), PRECISION=_precision(x_in),
        )
    return idx, pre, counts


@custom_op(f"{NS}::encode_jumprelu", mutates_args=())
def encode_jumprelu(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused JumpReLU encoder: the active ∪ window entries of ``pre = x_in @ W_enc + b_enc``, per row.

    Returns ``(indices [B, K] int32, pre [B, K], counts [B] int32)``: row ``b``'s entries are its first
    ``counts[b]`` slots, in no particular order; ``K = max counts`` (a dynamic size). Not differentiable:
    pass ``pre`` through :func:`sampled_encoder` for gradients.
    """
    B = x_in.shape[0]
    N = W_enc.shape[1]
    key = (B, N)
    # Cheap bound for the first call: 1/16 of the latents (L0 is a few per mille when trained);
    # later calls start from the last exact need plus 25 % headroom.
    cap = _capacity_hint.get(key, max(16, N // 16))
    cap = min(N, max(cap, 1))
    while True:
        idx, pre, counts = jumprelu_lists(x_in, W_enc, b_enc, threshold, bandwidth, cap)
        need = int(counts.max()) if B else 0
        if need <= cap:
            break
        cap = min(N, need)  # the counters kept counting past the capacity: this retry is exact
    _capacity_hint[key] = min(N, _round_up(need + need // 4 + 16))
    if need < cap:
        idx, pre = idx[:, :need].contiguous(), pre[:, :need].contiguous()
    return idx, pre, counts


@encode_jumprelu.register_fake
def _(x_in, W_enc, b_enc, threshold, bandwidth):
    K = torch.library.get_ctx().new_dynamic_size()
    B = x_in.shape[0]
    return (x_in.new_empty(B, K, dtype=torch.int32), x_in.new_empty(B, K), x_in.new_empty(B, dtype=torch.int32))


def topk_candidates_fused(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused encoder's per-tile candidates of ``relu(pre)``: ``(values, indices int32, dropped max)``."""
    B, Kd = x_in.shape
    N = W_enc.shape[1]
    block_n, kp, n_tiles, val, idx, drop = candidate_buffers(B, N, k, x_in.dtype, x_in.device)
    if B:
        _encode_topk(
            lambda m: (triton.cdiv(B, m["BLOCK_M"]) * n_tiles,),
            x_in, W_enc, b_enc, val, idx, drop, B, N, Kd, n_tiles,
            x_in.stride(0), x_in.stride(1), W_enc.stride(0), W_enc.stride(1),
            ACC64=x_in.dtype == torch.float64, PRECISION=_precision(x_in), KP=kp, BLOCK_N=block_n,
        )
    return val, idx, drop


def _dense_relu_pre(x_in, W_enc, b_enc):
    return F.relu(x_in @ W_enc + b_enc)


@custom_op(f"{NS}::encode_topk", mutates_args=())
def encode_topk(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Fused TopK encoder: ``(values [B, k], indices [B, k] int64)`` of ``relu(x_in @ W_enc + b_enc)``,
    sorted descending. Not differentiable: pass ``values`` through :func:`sampled_encoder`."""
    cand_val, cand_idx, drop = topk_candidates_fused(x_in, W_enc, b_enc, k)
    vals, idx, unsafe = merge_candidates(cand_val, cand_idx, drop, k)
    if bool(unsafe.any()):  # rare: a tile held more than kp of a row's top k; redo those rows densely
        rows = unsafe.nonzero().squeeze(1)
        v, i = torch.topk(_dense_relu_pre(x_in[rows], W_enc, b_enc), k, dim=-1)
        vals[rows], idx[rows] = v, i
    return vals, idx


@encode_topk.register_fake
def _(x_in, W_enc, b_enc, k):
    B = x_in.shape[0]
    return x_in.new_empty(B, k), x_in.new_empty(B, k, dtype=torch.int64)


@custom_op(f"{NS}::encode_batchtopk", mutates_args=())
def encode_batchtopk(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused BatchTopK encoder: the ``B·k`` largest entries of ``relu(x_in @ W_enc + b_enc)`` over the batch,
    as per-row lists ``(values [B, K], indices [B, K] int32, counts [B] int32)`` (padding: value 0 at latent 0)."""
    B = x_in.shape[0]
    N = W_enc.shape[1]
    n_keep = min(B * k, B * N)
    cand_val, cand_idx, drop = topk_candidates_fused(x_in, W_enc, b_enc, k)
    # Every row offers >= k finite candidates, so the candidates hold >= B·k entries.
    vals, pos = torch.topk(cand_val.reshape(-1), n_keep, sorted=False)
    width = cand_val.shape[1]
    if n_keep and bool((drop > vals.min().to(drop.dtype)).any()):
        # Some tile dropped an entry above the batch's cut: select exactly from the dense pre-activations.
        dense = _dense_relu_pre(x_in, W_enc, b_enc)
        vals, pos = torch.topk(dense.reshape(-1), n_keep, sorted=False)
        rows, cols = pos // N, pos % N
    else:
        rows, cols = pos // width, cand_idx.reshape(-1)[pos].long()
    counts = torch.bincount(rows, minlength=B)
    K = int(counts.max()) if B else 0
    order = torch.argsort(rows, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    out_val = x_in.new_zeros(B, K)
    out_idx = torch.zeros(B, K, dtype=torch.int32, device=x_in.device)
    out_val[rows, slot] = vals
    out_idx[rows, slot] = cols.to(torch.int32)
    return out_val, out_idx, counts.to(torch.int32)


@encode_batchtopk.register_fake
def _(x_in, W_enc, b_enc, k):
    K = torch.library.get_ctx().new_dynamic_size()
    B = x_in.shape[0]
    return x_in.new_empty(B, K), x_in.new_empty(B, K, dtype=torch.int32), x_in.new_empty(B, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# The encoder's sparse backward
# ----------------------------------------------------------------------------------------------


@kernel_op("sampled_encoder")
def sampled_encoder(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], indices: Tensor,
                    counts: Optional[Tensor], pre: Tensor, order: Tensor, offsets: Tensor) -> Tensor:
    """Returns ``pre [B, K]`` unchanged, differentiable as ``pre[b, e] = x_in[b] · W_enc[:, indices[b, e]] + b_enc[indices[b, e]]``
    with ``x_in = x - b_dec`` (``x`` when ``b_dec`` is None).

    ``pre`` must hold exactly those values — the fused encoders compute them in their GEMM epilogue,
    so the forward recomputes nothing. Slots ``e >= counts[b]`` are padding and get no gradient;
    ``order``/``offsets`` group the entries by latent (``triton_common.segments``).
    """
    return pre.clone()


def _sampled_encoder_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, indices, counts, pre, order, offsets = inputs
    ctx.has_b_dec = b_dec is not None
    ctx.has_counts = counts is not None
    ctx.save_for_backward(x, W_enc, b_enc, b_dec, indices, counts, order, offsets)


def _sampled_encoder_backward(ctx, grad):
    x, W_enc, b_enc, b_dec, indices, counts, order, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    B, K = grad.shape
    need_x, need_W, need_b, need_bd = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2], (
        ctx.has_b_dec and ctx.needs_input_grad[3])
    grad_x = grad_W = grad_b = grad_bd = None
    if need_W or need_b or need_bd:
        # One pass over the entries sorted by latent gives both grad W_enc (transposed) and grad b_enc.
        flat = grad.reshape(-1)
        W_t, gb = segment_reduce(order, offsets, flat, x, K, None, b_dec if ctx.has_b_dec else None)
        gb = gb.to(b_enc.dtype)
        if need_W:
            grad_W = W_t.t().to(W_enc.dtype)
        if need_b:
            grad_b = gb
        if need_bd:
            grad_bd = -(W_enc @ gb.to(W_enc.dtype)).to(b_dec.dtype)
    if need_x:
        grad_x = gather_sum(grad, indices, W_enc.t(), counts if ctx.has_counts else None).to(x.dtype)
    return grad_x, grad_W, grad_b, grad_bd, None, None, None, None, None


sampled_encoder.register_autograd(_sampled_encoder_backward, setup_context=_sampled_encoder_setup)
