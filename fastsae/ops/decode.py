"""Sparse decode in Triton: forward gather-sum of ``W_dec`` rows, backward SDDMM + latent-segment reduction.

Ops (namespace ``fastsae_triton``):

- ``sparse_decode(values, indices, W_dec, b_dec?, order?, offsets?, rows?, row_ptr?) -> x_hat [B, d_in]``
  the public op (TopK, BatchTopK and the functional API). Backward: ``grad_values`` by row-gathered dot
  products (SDDMM) and ``grad_W_dec`` by a segment reduction over entries sorted by latent (no atomics).
- ``jumprelu_decode(pre [B,K], indices, counts [B], threshold, bandwidth, W_dec, b_dec, order, offsets)
  -> (x_hat, l0 [B] float32, f [B,K])``: the JumpReLU training decode on a compact list of active ∪ window
  entries. ``f = pre·H(pre - θ)`` is applied on the fly (window-only entries decode to 0), and the
  backward yields ``∂L/∂pre`` at active entries (and window entries with ``ste_to_input``), ``grad_W_dec``
  and the θ-gradient (both pseudo-derivative terms: through ``f`` and through ``l0``) reduced per latent in
  the same segment pass.
- ``sddmm``, ``segment_reduce``, ``gather_sum``, ``jumprelu_sddmm``: the backward building blocks, ops
  themselves so that a compiled backward calls kernels, not Python.

Two list layouts. *Padded rows*: ``[B, K]`` lists, row ``b``'s entries in its first ``counts[b]`` slots
(all ``K`` when ``counts`` is None). *CSR* (BatchTopK, whose per-row counts are only known on the device):
1-D lists sorted by row, row ``b``'s entries at ``row_ptr[b]:row_ptr[b+1]``, ``rows[e]`` the row of entry
``e``. Every size a launch needs is then known on the host; no kernel reads a count to size anything.

Accumulation is float32 for bf16/fp16/fp32 data and float64 for float64 data. Offsets that can pass
2^31 (a latent index times a stride, a ``d_in`` index times the stride ``d_sae`` of ``W_enc.t()``) are
formed in int64. Kernels skip entries whose latent lies outside ``[0, n_latents)`` (never an
out-of-bounds read); the ops also check the indices they are given (``check_index_range``, IndexError
as the C++ ops raise), unless called with ``checked=False`` — as the training path does with the lists
its own encoders made (a check is a few extra launches per op on a GPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (TritonKernel, cfg, check_index_range, flat_grid, kernel_op, last_config_if, no_work,
                            segments, valid_mask)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(
    v_ptr, idx_ptr, cnt_ptr, thr_ptr, w_ptr, bias_ptr, out_ptr,
    K, D, NW, stride_wr, stride_wd,
    HAS_COUNTS: tl.constexpr, CSR: tl.constexpr, JUMP: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[b, d] = Σ_e v[b, e] · W[idx[b, e], d] (+ bias[d])``; one program per (row, block of d).

    ``W [NW, D]`` is addressed through strides so the same kernel gathers ``W_dec`` rows or ``W_enc``
    columns. ``CSR``: ``cnt_ptr`` is ``row_ptr``. ``JUMP``: ``v`` holds ``pre`` and the JumpReLU is applied
    here (``v > θ[idx]`` else 0). Zero values skip their row load: window-only JumpReLU entries and ReLU
    zeros cost no bandwidth.
    """
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < D
    rd64 = rd.to(tl.int64)
    if CSR:
        start = tl.load(cnt_ptr + b)
        n = tl.load(cnt_ptr + b + 1) - start
    else:
        start = b * K
        n = K
        if HAS_COUNTS:
            n = tl.minimum(tl.load(cnt_ptr + b), K)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for e0 in range(0, n, BLOCK_E):
        re = e0 + tl.arange(0, BLOCK_E)
        me = re < n
        j = tl.load(idx_ptr + start + re, mask=me, other=0).to(tl.int64)
        me = me & (j >= 0) & (j < NW)
        v = tl.load(v_ptr + start + re, mask=me, other=0.0)
        if JUMP:
            th = tl.load(thr_ptr + j, mask=me, other=0.0)
            v = tl.where(v > th, v, 0.0)
        v = v.to(ACC)
        mw = me & (v != 0)
        w = tl.load(w_ptr + j[:, None] * stride_wr + rd64[None, :] * stride_wd, mask=mw[:, None] & md[None, :],
                    other=0.0)
        acc += tl.sum(v[:, None] * w.to(ACC), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rd, mask=md, other=0.0).to(ACC)
    tl.store(out_ptr + b * D + rd, acc.to(out_ptr.dtype.element_ty), mask=md)


# (BLOCK_E=8, BLOCK_D=1024, 8 warps spilled inside its loop for fp16 CSR lists: dropped, see the compile report)
_gather_rows = TritonKernel(
    _gather_rows_kernel,
    [cfg(BLOCK_E=16, BLOCK_D=256, num_warps=4), cfg(BLOCK_E=32, BLOCK_D=128, num_warps=4),
     cfg(BLOCK_E=16, BLOCK_D=512, num_warps=8)],
    key=["K", "D"], bucketed=["K"], interp=dict(BLOCK_E=16, BLOCK_D=32),
)


@triton.jit
def _sddmm_kernel(
    g_ptr, idx_ptr, cnt_ptr, rows_ptr, w_ptr, out_ptr,
    pre_ptr, thr_ptr, eps_ptr, gl0_ptr, t_ptr,
    B, K, D, NW, stride_wr, stride_wd,
    HAS_COUNTS: tl.constexpr, CSR: tl.constexpr, JUMP: tl.constexpr, HAS_GL0: tl.constexpr,
    ACC64: tl.constexpr, WIDE64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``s[b, e] = G[b] · W[idx[b, e]]`` at the sampled entries only (SDDMM).

    Padded rows: one program per (row, block of entries), reusing ``G[b]`` for the block. ``CSR``: one
    program per block of the ``K`` flat entries, each with its own row ``rows[e]``.

    ``JUMP`` epilogue (the JumpReLU backward at compact entries), with ``u = (pre - θ)/ε``:
    ``out = s·H(pre - θ)`` (the grad of ``pre``) and the per-entry θ-gradient
    ``t = K(u)·(-(θ/ε)·s - g_l0[b]/ε)`` (through ``f`` and through ``l0``), reduced per latent later.
    Every slot ``e < K`` is written (zeros at padding), so outputs need no zero-fill.
    """
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    WIDE: tl.constexpr = tl.float64 if WIDE64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    if CSR:
        re = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        mk = re < K
        me = mk
        row = tl.load(rows_ptr + re, mask=me, other=0).to(tl.int64)
        me = me & (row >= 0) & (row < B)
        pos = re
    else:
        n_eb = tl.cdiv(K, BLOCK_E)
        b = pid // n_eb
        re = (pid % n_eb) * BLOCK_E + tl.arange(0, BLOCK_E)
        n = K
        if HAS_COUNTS:
            n = tl.minimum(tl.load(cnt_ptr + b), K)
        mk = re < K
        me = re < n
        pos = b * K + re
    j = tl.load(idx_ptr + pos, mask=me, other=0).to(tl.int64)
    me = me & (j >= 0) & (j < NW)
    acc = tl.zeros((BLOCK_E,), dtype=ACC)
    d_end = tl.where(tl.max(me.to(tl.int32), axis=0) > 0, D, 0)  # blocks of padding only skip the loop
    for d0 in range(0, d_end, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        md = rd < D
        if CSR:
            g = tl.load(g_ptr + row[:, None] * D + rd[None, :], mask=me[:, None] & md[None, :], other=0.0).to(ACC)
        else:
            g = tl.load(g_ptr + b * D + rd, mask=md, other=0.0).to(ACC)[None, :]
        w = tl.load(w_ptr + j[:, None] * stride_wr + rd.to(tl.int64)[None, :] * stride_wd,
                    mask=me[:, None] & md[None, :], other=0.0)
        acc += tl.sum(w.to(ACC) * g, axis=1)
    if JUMP:
        p = tl.load(pre_ptr + pos, mask=me, other=0.0).to(WIDE)
        th = tl.load(thr_ptr + j, mask=me, other=0.0).to(WIDE)
        ep = tl.load(eps_ptr + j, mask=me, other=1.0).to(WIDE)
        active = me & (p > th)
        u = (p - th) / ep
        window = me & (u > -0.5) & (u < 0.5)
        s = acc.to(WIDE)
        tv = -(th / ep) * s
        if HAS_GL0:
            tv -= tl.load(gl0_ptr + b).to(WIDE) / ep
        tl.store(out_ptr + pos, tl.where(active, acc, 0.0).to(out_ptr.dtype.element_ty), mask=mk)
        tl.store(t_ptr + pos, tl.where(window, tv, 0.0).to(t_ptr.dtype.element_ty), mask=mk)
    else:
        tl.store(out_ptr + pos, tl.where(me, acc, 0.0).to(out_ptr.dtype.element_ty), mask=mk)


_sddmm = TritonKernel(
    _sddmm_kernel,
    [cfg(BLOCK_E=16, BLOCK_D=256, num_warps=4), cfg(BLOCK_E=32, BLOCK_D=128, num_warps=4),
     cfg(BLOCK_E=64, BLOCK_D=128, num_warps=8), cfg(BLOCK_E=16, BLOCK_D=512, num_warps=8)],
    key=["K", "D", "CSR"], bucketed=["K"], interp=dict(BLOCK_E=16, BLOCK_D=32),
    prune=last_config_if("ACC64"),  # float64: E64 x D128 spills in its loop on sm_80
)


@triton.jit
def _segment_kernel(
    order_ptr, offs_ptr, w_ptr, t_ptr, x_ptr, xb_ptr, rows_ptr, out_ptr, tout_ptr,
    K, NNZ, NX, D, stride_xb, stride_oj, stride_od,
    HAS_T: tl.constexpr, HAS_XBIAS: tl.constexpr, CSR: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per latent ``j``: ``out[j, d] = Σ_{e ∈ seg(j)} w[e] · (X[row(e), d] - xb[d])`` and ``tout[j] = Σ t[e]``.

    ``seg(j) = order[offsets[j]:offsets[j+1]]`` (flat positions sorted by latent); ``row(e)`` is
    ``e // K`` for padded rows, ``rows[e]`` for ``CSR``. Each output row is owned by one program: a plain
    store, no atomics, no zero-fill (empty segments store zeros). ``out`` is addressed through strides.
    Positions outside ``[0, NNZ)`` and rows outside ``[0, NX)`` are skipped (never read out of bounds).
    """
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    j = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    rd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < D
    start = tl.maximum(tl.load(offs_ptr + j), 0)
    end = tl.minimum(tl.load(offs_ptr + j + 1), NNZ)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    tacc = tl.zeros((BLOCK_E,), dtype=ACC)
    if HAS_XBIAS:
        xb = tl.load(xb_ptr + rd, mask=md, other=0.0).to(ACC)
    for e0 in range(start, end, BLOCK_E):
        re = e0 + tl.arange(0, BLOCK_E)
        me = re < end
        src = tl.load(order_ptr + re, mask=me, other=0).to(tl.int64)
        me = me & (src >= 0) & (src < NNZ)
        if CSR:
            row = tl.load(rows_ptr + src, mask=me, other=0).to(tl.int64)
        else:
            row = src // K
        me = me & (row >= 0) & (row < NX)
        w = tl.load(w_ptr + src, mask=me, other=0.0).to(ACC)
        mw = me & (w != 0)
        xv = tl.load(x_ptr + row[:, None] * stride_xb + rd[None, :], mask=mw[:, None] & md[None, :],
                     other=0.0).to(ACC)
        if HAS_XBIAS:
            xv = xv - xb[None, :]
        acc += tl.sum(w[:, None] * xv, axis=0)
        if HAS_T:
            tacc += tl.load(t_ptr + src, mask=me, other=0.0).to(ACC)
    tl.store(out_ptr + j * stride_oj + rd.to(tl.int64) * stride_od, acc.to(out_ptr.dtype.element_ty), mask=md)
    if HAS_T:
        if pd == 0:
            tl.store(tout_ptr + j, tl.sum(tacc, axis=0).to(tout_ptr.dtype.element_ty))


_segment = TritonKernel(
    _segment_kernel,
    [cfg(BLOCK_E=16, BLOCK_D=256, num_warps=4), cfg(BLOCK_E=32, BLOCK_D=128, num_warps=4),
     cfg(BLOCK_E=16, BLOCK_D=512, num_warps=8), cfg(BLOCK_E=8, BLOCK_D=1024, num_warps=8)],
    key=["D"], interp=dict(BLOCK_E=16, BLOCK_D=32),
)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _is64(*ts) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in ts)


def gather_rows(values: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor] = None,
                counts: Optional[Tensor] = None, threshold: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None, row_ptr: Optional[Tensor] = None) -> Tensor:
    """``out[b] = Σ_e values[b,e] · W[indices[b,e]] (+ bias)``; ``W`` may be any 2-D strided view.

    With ``row_ptr`` the lists are CSR (1-D ``values``/``indices``) and ``counts`` must be None."""
    values, indices = values.contiguous(), indices.contiguous()
    csr = row_ptr is not None
    B = row_ptr.shape[0] - 1 if csr else values.shape[0]
    K = values.shape[-1] if not csr else 0
    D = W.shape[1]
    out = torch.empty(B, D, dtype=out_dtype or W.dtype, device=values.device)
    if no_work(B, D):
        return out
    dummy = values
    _gather_rows(
        lambda m: (B, triton.cdiv(D, m["BLOCK_D"])),
        values, indices, row_ptr if csr else (counts if counts is not None else dummy),
        threshold if threshold is not None else dummy, W, bias if bias is not None else dummy, out,
        K, D, W.shape[0], W.stride(0), W.stride(1),
        HAS_COUNTS=counts is not None, CSR=csr, JUMP=threshold is not None, HAS_BIAS=bias is not None,
        ACC64=_is64(values, W),
    )
    return out


def segment_rows(order: Tensor, offsets: Tensor, weights: Tensor, X: Tensor, K: int,
                 t: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
                 out: Optional[Tensor] = None, t_dtype: Optional[torch.dtype] = None,
                 rows: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Per latent ``j``: ``out[j] = Σ_{seg j} weights · (X[row] - x_bias)`` and ``Σ_{seg j} t`` (see the kernel)."""
    n_lat = offsets.shape[0] - 1
    D = X.shape[1]
    if X.stride(1) != 1:
        X = X.contiguous()
    if out is None:
        out = torch.empty(n_lat, D, dtype=X.dtype, device=X.device)
    tout = torch.empty(n_lat, dtype=t_dtype or weights.dtype, device=X.device) if t is not None else None
    if no_work(n_lat):
        return out, tout
    if no_work(D):
        if tout is not None:
            tout.zero_()
        return out, tout
    dummy = weights
    _segment(
        lambda m: (n_lat, triton.cdiv(D, m["BLOCK_D"])),
        order, offsets, weights, t if t is not None else dummy, X, x_bias if x_bias is not None else dummy,
        rows if rows is not None else order, out, tout if tout is not None else dummy,
        K, weights.numel(), X.shape[0], D, X.stride(0), out.stride(0), out.stride(1),
        HAS_T=t is not None, HAS_XBIAS=x_bias is not None, CSR=rows is not None, ACC64=_is64(weights, X),
    )
    return out, tout


def _sddmm_launch(grad: Tensor, indices: Tensor, W: Tensor, counts: Optional[Tensor] = None,
                  pre: Optional[Tensor] = None, threshold: Optional[Tensor] = None,
                  bandwidth: Optional[Tensor] = None, grad_l0: Optional[Tensor] = None,
                  out_dtype: Optional[torch.dtype] = None, rows: Optional[Tensor] = None):
    grad, indices = grad.contiguous(), indices.contiguous()
    pre = pre.contiguous() if pre is not None else None
    csr = rows is not None
    B = grad.shape[0]
    K = indices.shape[-1]  # CSR: the number of entries
    D = W.shape[1]
    jump = pre is not None
    out = torch.empty(indices.shape, dtype=out_dtype or (pre.dtype if jump else W.dtype), device=grad.device)
    wide = torch.float64 if _is64(pre, threshold) else torch.float32
    t = torch.empty(indices.shape, dtype=wide, device=grad.device) if jump else None
    if no_work(B, K):
        return out, t
    dummy = grad
    rows_per = (lambda m: 1) if csr else (lambda m: B)
    _sddmm(
        flat_grid(rows_per, lambda m: triton.cdiv(K, m["BLOCK_E"])),
        grad, indices, counts if counts is not None else dummy, rows if csr else dummy, W, out,
        pre if jump else dummy, threshold if jump else dummy, bandwidth if jump else dummy,
        grad_l0 if grad_l0 is not None else dummy, t if jump else dummy,
        B, K, D, W.shape[0], W.stride(0), W.stride(1),
        HAS_COUNTS=counts is not None, CSR=csr, JUMP=jump, HAS_GL0=grad_l0 is not None,
        ACC64=_is64(grad, W), WIDE64=wide == torch.float64,
    )
    return out, t


def _check_lists(op: str, indices: Tensor, n: int, order: Optional[Tensor] = None, rows: Optional[Tensor] = None,
                 n_rows: int = 0) -> None:
    check_index_range(indices, n, op, "indices")
    if order is not None:
        check_index_range(order, indices.numel(), op, "order")
    if rows is not None:
        check_index_range(rows, n_rows, op, "rows")


# ----------------------------------------------------------------------------------------------
# Ops: building blocks
# ----------------------------------------------------------------------------------------------


@kernel_op("sddmm")
def sddmm(grad: Tensor, indices: Tensor, W: Tensor, rows: Optional[Tensor] = None, checked: bool = True,
          counts: Optional[Tensor] = None) -> Tensor:
    """``out[b, e] = grad[b] · W[indices[b, e]]``: ``grad [B, D]``, ``indices [B, K]``, ``W [N, D]`` -> ``[B, K]``.

    With ``rows`` (CSR): ``indices [nnz]``, ``out[e] = grad[rows[e]] · W[indices[e]]``. With ``counts [B]``
    (padded rows): slots ``e >= counts[b]`` are padding, written 0 without being computed."""
    if checked:
        _check_lists("sddmm", indices, W.shape[0], rows=rows, n_rows=grad.shape[0])
    return _sddmm_launch(grad, indices, W, counts, rows=rows)[0]


@kernel_op("segment_reduce")
def segment_reduce(order: Tensor, offsets: Tensor, weights: Tensor, X: Tensor, K: int,
                   t: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
                   rows: Optional[Tensor] = None, checked: bool = True) -> tuple[Tensor, Tensor]:
    """Latent-wise scatter-add as a segment reduction over entries sorted by latent.

    Returns ``(out [N, D], tsum [N])`` with ``out[j] = Σ_seg(j) weights · (X[row] - x_bias)`` (``X``'s
    dtype) and ``tsum[j] = Σ_seg(j) t`` (``t`` defaults to ``weights``; float32, float64 for float64).
    ``weights``/``t`` are flat ``[B*K]`` lists; ``order``/``offsets`` come from ``triton_common.segments``;
    an entry's row is ``position // K``, or ``rows[position]`` when ``rows`` is given (CSR).
    """
    if checked:
        check_index_range(order, weights.numel(), "segment_reduce", "order")
        if rows is not None:
            check_index_range(rows, X.shape[0], "segment_reduce", "rows")
    wide = torch.float64 if _is64(weights, X, t) else torch.float32
    return segment_rows(order, offsets, weights, X, K, t=weights if t is None else t, x_bias=x_bias, t_dtype=wide,
                        rows=rows)


@kernel_op("gather_sum")
def gather_sum(values: Tensor, indices: Tensor, W: Tensor, counts: Optional[Tensor] = None,
               row_ptr: Optional[Tensor] = None, checked: bool = True) -> Tensor:
    """``out[b] = Σ_{e < counts[b]} values[b,e] · W[indices[b,e]]`` for any 2-D strided ``W`` (e.g. ``W_enc.t()``).

    With ``row_ptr`` (CSR): 1-D lists, row ``b``'s entries at ``row_ptr[b]:row_ptr[b+1]``."""
    if checked:
        _check_lists("gather_sum", indices, W.shape[0])
    return gather_rows(values, indices, W, counts=counts, row_ptr=row_ptr)


@kernel_op("jumprelu_sddmm")
def jumprelu_sddmm(grad_x_hat: Tensor, grad_l0: Tensor, pre: Tensor, indices: Tensor, counts: Tensor,
                   threshold: Tensor, bandwidth: Tensor, W_dec: Tensor, checked: bool = True) -> tuple[Tensor, Tensor]:
    """JumpReLU backward at compact entries: ``(∂L/∂pre [B, K], per-entry θ-gradient [B, K])``."""
    if checked:
        _check_lists("jumprelu_sddmm", indices, W_dec.shape[0])
    return _sddmm_launch(grad_x_hat, indices, W_dec, counts, pre, threshold, bandwidth, grad_l0)


# ----------------------------------------------------------------------------------------------
# Ops: sparse_decode (public) and its autograd
# ----------------------------------------------------------------------------------------------


@kernel_op("sparse_decode")
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None,
                  order: Optional[Tensor] = None, offsets: Optional[Tensor] = None,
                  rows: Optional[Tensor] = None, row_ptr: Optional[Tensor] = None, checked: bool = True,
                  counts: Optional[Tensor] = None) -> Tensor:
    """``x̂[b] = Σ_e values[b,e] · W_dec[indices[b,e]] (+ b_dec)``: ``values [B,K]``, ``indices [B,K]`` int -> ``[B, d_in]``.

    ``order``/``offsets`` (``triton_common.segments``), when the caller has them, are reused by the
    backward instead of sorting again. CSR lists (BatchTopK): 1-D ``values``/``indices`` with their
    ``rows`` and ``row_ptr [B+1]``. ``counts [B]``: padded rows whose slots ``e >= counts[b]`` are padding
    (the encoders' lists: ReLU, Gated), skipped forward and backward (they get gradient 0).
    ``checked=False`` skips the index check (lists fastsae made).
    """
    if checked:
        n_rows = row_ptr.shape[0] - 1 if row_ptr is not None else values.shape[0]
        _check_lists("sparse_decode", indices, W_dec.shape[0], order, rows, n_rows)
    return gather_rows(values, indices, W_dec, b_dec, counts=counts, row_ptr=row_ptr)


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec, order, offsets, rows, row_ptr, checked, counts = inputs
    ctx.has_bias = b_dec is not None
    ctx.has_segments = order is not None and offsets is not None
    ctx.save_for_backward(values, indices, W_dec, order, offsets, rows, counts)


def _sparse_decode_backward(ctx, grad):
    values, indices, W_dec, order, offsets, rows, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_values = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        # indices checked in the forward
        grad_values = sddmm(grad, indices, W_dec, rows, False, counts).to(values.dtype)
    if ctx.needs_input_grad[2]:
        if not ctx.has_segments:
            order, offsets = segments(indices.reshape(-1, indices.shape[-1]), counts, W_dec.shape[0])
        grad_W, _ = segment_reduce(order, offsets, values.contiguous().reshape(-1), grad, values.shape[-1],
                                   None, None, rows, False)
        grad_W = grad_W.to(W_dec.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad.sum(0)
    return grad_values, None, grad_W, grad_b, None, None, None, None, None, None


sparse_decode.register_autograd(_sparse_decode_backward, setup_context=_sparse_decode_setup)


# ----------------------------------------------------------------------------------------------
# Ops: the JumpReLU training decode on compact (active ∪ window) entries
# ----------------------------------------------------------------------------------------------


@kernel_op("jumprelu_decode")
def jumprelu_decode(pre: Tensor, indices: Tensor, counts: Tensor, threshold: Tensor, bandwidth: Tensor,
                    W_dec: Tensor, b_dec: Tensor, order: Tensor, offsets: Tensor,
                    checked: bool = True, ste_to_input: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(x̂ [B, d_in], l0 [B] float32, f [B, K])`` from compact pre-activations.

    ``pre [B, K]`` at latents ``indices [B, K]``, the first ``counts[b]`` slots of row ``b`` valid;
    ``f = pre·H(pre - θ)`` (so window-only entries decode to 0) and ``l0[b] = Σ_e H(pre - θ)``.
    ``f`` is the code itself, differentiable like ``reference.jumprelu`` (a penalty on it, e.g. the tanh
    sparsity, reaches ``pre`` and θ through the same pseudo-derivative); 0 at padding.
    ``ste_to_input``: the jump's pseudo-derivative also reaches ``pre`` (``∂f/∂pre += (θ/ε)K``,
    ``∂H/∂pre := (1/ε)K``), at the window entries the lists hold anyway.
    ``order``/``offsets`` group the entries by latent (``triton_common.segments``) for the backward.
    """
    if checked:
        _check_lists("jumprelu_decode", indices, W_dec.shape[0], order)
    x_hat = gather_rows(pre, indices, W_dec, b_dec, counts=counts, threshold=threshold)
    B, K = pre.shape
    active = valid_mask(counts, B, K, pre.device) & (pre > threshold[indices.long()])
    return x_hat, active.sum(-1, dtype=torch.float32), torch.where(active, pre, torch.zeros_like(pre))


def _jumprelu_decode_setup(ctx, inputs, output):
    pre, indices, counts, threshold, bandwidth, W_dec, b_dec, order, offsets, checked, ste_to_input = inputs
    ctx.ste_to_input = ste_to_input
    ctx.save_for_backward(pre, indices, counts, threshold, bandwidth, W_dec, order, offsets)


def _jumprelu_decode_backward(ctx, grad_x_hat, grad_l0, grad_f):
    pre, indices, counts, threshold, bandwidth, W_dec, order, offsets = ctx.saved_tensors
    B, K = pre.shape
    if grad_x_hat is None:
        grad_x_hat = pre.new_zeros(B, W_dec.shape[1], dtype=W_dec.dtype)
    grad_x_hat = grad_x_hat.contiguous()
    grad_l0 = None if grad_l0 is None else grad_l0.contiguous()
    # One SDDMM pass gives ∂L/∂f at every compact entry; its epilogue applies H for ∂L/∂pre and
    # forms the per-entry θ-gradient of both pseudo-derivative terms.
    grad_pre, t = jumprelu_sddmm(grad_x_hat, grad_l0 if grad_l0 is not None else pre.new_zeros(B, dtype=torch.float32),
                                 pre, indices, counts, threshold, bandwidth, W_dec, False)
    if grad_f is not None or ctx.ste_to_input:
        # O(B·K) corrections of the epilogue's results, linear in ∂L/∂f: a gradient reaching f directly joins
        # the SDDMM's, and with ste_to_input ∂L/∂pre gains (θ/ε)K·∂L/∂f + (1/ε)K·∂L/∂l0 = -t at window entries.
        wide = t.dtype
        idx = indices.long()
        p, th, ep = pre.to(wide), threshold[idx].to(wide), bandwidth[idx].to(wide)
        valid = valid_mask(counts, B, K, pre.device)
        u = (p - th) / ep
        window = valid & (u > -0.5) & (u < 0.5)
        if grad_f is not None:
            gf = grad_f.to(wide)
            grad_pre = grad_pre + torch.where(valid & (p > th), gf, 0.0).to(grad_pre.dtype)
            t = t + torch.where(window, -(th / ep) * gf, 0.0)
        if ctx.ste_to_input:
            grad_pre = grad_pre - t.to(grad_pre.dtype)  # t is 0 outside the window
    grad_W = grad_theta = grad_b = None
    if ctx.needs_input_grad[5] or ctx.needs_input_grad[3]:
        f = torch.where(pre > threshold[indices.long()], pre, torch.zeros_like(pre))
        W_out, theta_out = segment_reduce(order, offsets, f.reshape(-1), grad_x_hat, K, t.reshape(-1), None, None,
                                          False)
        grad_W = W_out.to(W_dec.dtype) if ctx.needs_input_grad[5] else None
        grad_theta = theta_out.to(threshold.dtype) if ctx.needs_input_grad[3] else None
    if ctx.needs_input_grad[6]:
        grad_b = grad_x_hat.sum(0)
    return grad_pre, None, None, grad_theta, None, grad_W, grad_b, None, None, None, None


jumprelu_decode.register_autograd(_jumprelu_decode_backward, setup_context=_jumprelu_decode_setup)
