"""Sparse decode in Triton: forward gather-sum of ``W_dec`` rows, backward SDDMM + latent-segment reduction.

Ops (namespace ``fastsae_triton``):

- ``sparse_decode(values [B,K], indices [B,K] int, W_dec [d_sae,d_in], b_dec?) -> x_hat [B,d_in]``
  the public op (TopK and the functional API). Backward: ``grad_values`` by row-gathered dot products
  (SDDMM) and ``grad_W_dec`` by a segment reduction over entries sorted by latent (no atomics).
- ``jumprelu_decode(pre [B,K], indices, counts [B], threshold, bandwidth, W_dec, b_dec, order, offsets)
  -> (x_hat, l0 [B] float32)``: the JumpReLU training decode on a compact list of active ∪ window
  entries. ``f = pre·H(pre - θ)`` is applied on the fly (window-only entries decode to 0), and the
  backward yields ``∂L/∂pre`` at active entries, ``grad_W_dec`` and the θ-gradient (both
  pseudo-derivative terms: through ``f`` and through ``l0``) reduced per latent in the same segment pass.
- ``sddmm``, ``segment_reduce``, ``jumprelu_sddmm``: the backward building blocks, ops themselves so
  that a compiled backward calls kernels, not Python.

Accumulation is float32 for bf16/fp16/fp32 data and float64 for float64 data.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import kernel_op, no_work, TritonKernel, cfg, segments, valid_mask


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(
    v_ptr, idx_ptr, cnt_ptr, thr_ptr, w_ptr, bias_ptr, out_ptr,
    K, D, stride_wr, stride_wd,
    HAS_COUNTS: tl.constexpr, JUMP: tl.constexpr, HAS_BIAS: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[b, d] = Σ_e v[b, e] · W[idx[b, e], d] (+ bias[d])``; one program per (row, block of d).

    ``W`` is addressed through strides so the same kernel gathers ``W_dec`` rows or ``W_enc`` columns.
    ``JUMP``: ``v`` holds ``pre`` and the JumpReLU is applied here (``v > θ[idx]`` else 0). Zero
    values skip their row load: window-only JumpReLU entries and ReLU zeros cost no bandwidth.
    """
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < D
    n = K
    if HAS_COUNTS:
        n = tl.minimum(tl.load(cnt_ptr + b), K)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for e0 in range(0, n, BLOCK_E):
        re = e0 + tl.arange(0, BLOCK_E)
        me = re < n
        j = tl.load(idx_ptr + b * K + re, mask=me, other=0).to(tl.int64)
        v = tl.load(v_ptr + b * K + re, mask=me, other=0.0)
        if JUMP:
            th = tl.load(thr_ptr + j, mask=me, other=0.0)
            v = tl.where(v > th, v, 0.0)
        v = v.to(ACC)
        mw = me & (v != 0)
        w = tl.load(w_ptr + j[:, None] * stride_wr + rd[None, :] * stride_wd, mask=mw[:, None] & md[None, :],
                    other=0.0)
        acc += tl.sum(v[:, None] * w.to(ACC), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rd, mask=md, other=0.0).to(ACC)
    tl.store(out_ptr + b * D + rd, acc.to(out_ptr.dtype.element_ty), mask=md)


_gather_rows = TritonKernel(
    _gather_rows_kernel,
    [cfg(BLOCK_E=16, BLOCK_D=256, num_warps=4), cfg(BLOCK_E=32, BLOCK_D=128, num_warps=4),
     cfg(BLOCK_E=16, BLOCK_D=512, num_warps=8), cfg(BLOCK_E=8, BLOCK_D=1024, num_warps=8)],
    key=["K", "D"], interp=dict(BLOCK_E=16, BLOCK_D=32),
)


@triton.jit
def _sddmm_kernel(
    g_ptr, idx_ptr, cnt_ptr, w_ptr, out_ptr,
    pre_ptr, thr_ptr, eps_ptr, gl0_ptr, t_ptr,
    K, D, stride_wr, stride_wd,
    HAS_COUNTS: tl.constexpr, JUMP: tl.constexpr, HAS_GL0: tl.constexpr, ACC64: tl.constexpr,
    WIDE64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``s[b, e] = G[b] · W[idx[b, e]]`` at the sampled entries only (SDDMM); one program per (row, entry block).

    ``JUMP`` epilogue (the JumpReLU backward at compact entries), with ``u = (pre - θ)/ε``:
    ``out = s·H(pre - θ)`` (the grad of ``pre``) and the per-entry θ-gradient
    ``t = K(u)·(-(θ/ε)·s - g_l0[b]/ε)`` (through ``f`` and through ``l0``), reduced per latent later.
    Every slot ``e < K`` is written (zeros at padding), so outputs need no zero-fill.
    """
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    WIDE: tl.constexpr = tl.float64 if WIDE64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = K
    if HAS_COUNTS:
        n = tl.minimum(tl.load(cnt_ptr + b), K)
    me = re < n
    j = tl.load(idx_ptr + b * K + re, mask=me, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        md = rd < D
        g = tl.load(g_ptr + b * D + rd, mask=md, other=0.0).to(ACC)
        w = tl.load(w_ptr + j[:, None] * stride_wr + rd[None, :] * stride_wd, mask=me[:, None] & md[None, :],
                    other=0.0)
        acc += tl.sum(w.to(ACC) * g[None, :], axis=1)
    mk = re < K
    if JUMP:
        p = tl.load(pre_ptr + b * K + re, mask=me, other=0.0).to(WIDE)
        th = tl.load(thr_ptr + j, mask=me, other=0.0).to(WIDE)
        ep = tl.load(eps_ptr + j, mask=me, other=1.0).to(WIDE)
        active = me & (p > th)
        u = (p - th) / ep
        window = me & (u > -0.5) & (u < 0.5)
        s = acc.to(WIDE)
        tv = -(th / ep) * s
        if HAS_GL0:
            tv -= tl.load(gl0_ptr + b).to(WIDE) / ep
        tl.store(out_ptr + b * K + re, tl.where(active, acc, 0.0).to(out_ptr.dtype.element_ty), mask=mk)
        tl.store(t_ptr + b * K + re, tl.where(window, tv, 0.0).to(t_ptr.dtype.element_ty), mask=mk)
    else:
        tl.store(out_ptr + b * K + re, tl.where(me, acc, 0.0).to(out_ptr.dtype.element_ty), mask=mk)


_sddmm = TritonKernel(
    _sddmm_kernel,
    [cfg(BLOCK_E=16, BLOCK_D=256, num_warps=4), cfg(BLOCK_E=32, BLOCK_D=128, num_warps=4),
     cfg(BLOCK_E=64, BLOCK_D=128, num_warps=8), cfg(BLOCK_E=16, BLOCK_D=512, num_warps=8)],
    key=["K", "D"], interp=dict(BLOCK_E=16, BLOCK_D=32),
)


@triton.jit
def _segment_kernel(
    order_ptr, offs_ptr, w_ptr, t_ptr, x_ptr, xb_ptr, out_ptr, tout_ptr,
    K, D, stride_xb, stride_oj, stride_od,
    HAS_T: tl.constexpr, HAS_XBIAS: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per latent ``j``: ``out[j, d] = Σ_{e ∈ seg(j)} w[e] · (X[row(e), d] - xb[d])`` and ``tout[j] = Σ t[e]``.

    ``seg(j) = order[offsets[j]:offsets[j+1]]`` (flat positions ``row*K + slot`` sorted by latent), so
    each output row is owned by one program: a plain store, no atomics, no zero-fill (empty segments
    store zeros). ``out`` is addressed through strides.
    """
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    j = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    rd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < D
    start = tl.load(offs_ptr + j)
    end = tl.load(offs_ptr + j + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    tacc = tl.zeros((BLOCK_E,), dtype=ACC)
    if HAS_XBIAS:
        xb = tl.load(xb_ptr + rd, mask=md, other=0.0).to(ACC)
    for e0 in range(start, end, BLOCK_E):
        re = e0 + tl.arange(0, BLOCK_E)
        me = re < end
        src = tl.load(order_ptr + re, mask=me, other=0)
        row = src // K
        w = tl.load(w_ptr + src, mask=me, other=0.0).to(ACC)
        mw = me & (w != 0)
        xv = tl.load(x_ptr + row[:, None] * stride_xb + rd[None, :], mask=mw[:, None] & md[None, :],
                     other=0.0).to(ACC)
        if HAS_XBIAS:
            xv = xv - xb[None, :]
        acc += tl.sum(w[:, None] * xv, axis=0)
        if HAS_T:
            tacc += tl.load(t_ptr + src, mask=me, other=0.0).to(ACC)
    tl.store(out_ptr + j * stride_oj + rd * stride_od, acc.to(out_ptr.dtype.element_ty), mask=md)
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
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``out[b] = Σ_e values[b,e] · W[indices[b,e]] (+ bias)``; ``W`` may be any 2-D strided view."""
    values, indices = values.contiguous(), indices.contiguous()
    B, K = values.shape
    D = W.shape[1]
    out = torch.empty(B, D, dtype=out_dtype or W.dtype, device=values.device)
    if no_work(B, D):
        return out
    dummy = values
    _gather_rows(
        lambda m: (B, triton.cdiv(D, m["BLOCK_D"])),
        values, indices, counts if counts is not None else dummy, threshold if threshold is not None else dummy,
        W, bias if bias is not None else dummy, out,
        K, D, W.stride(0), W.stride(1),
        HAS_COUNTS=counts is not None, JUMP=threshold is not None, HAS_BIAS=bias is not None,
        ACC64=_is64(values, W),
    )
    return out


def segment_rows(order: Tensor, offsets: Tensor, weights: Tensor, X: Tensor, K: int,
                 t: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
                 out: Optional[Tensor] = None, t_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
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
        out, tout if tout is not None else dummy,
        K, D, X.stride(0), out.stride(0), out.stride(1),
        HAS_T=t is not None, HAS_XBIAS=x_bias is not None, ACC64=_is64(weights, X),
    )
    return out, tout


def _sddmm_launch(grad: Tensor, indices: Tensor, W: Tensor, counts: Optional[Tensor] = None,
                  pre: Optional[Tensor] = None, threshold: Optional[Tensor] = None,
                  bandwidth: Optional[Tensor] = None, grad_l0: Optional[Tensor] = None,
                  out_dtype: Optional[torch.dtype] = None):
    grad, indices = grad.contiguous(), indices.contiguous()
    pre = pre.contiguous() if pre is not None else None
    B, K = indices.shape
    D = W.shape[1]
    jump = pre is not None
    out = torch.empty(B, K, dtype=out_dtype or (pre.dtype if jump else W.dtype), device=grad.device)
    wide = torch.float64 if _is64(pre, threshold) else torch.float32
    t = torch.empty(B, K, dtype=wide, device=grad.device) if jump else None
    if no_work(B, K):
        return out, t
    dummy = grad
    _sddmm(
        lambda m: (B, triton.cdiv(K, m["BLOCK_E"])),
        grad, indices, counts if counts is not None else dummy, W, out,
        pre if jump else dummy, threshold if jump else dummy, bandwidth if jump else dummy,
        grad_l0 if grad_l0 is not None else dummy, t if jump else dummy,
        K, D, W.stride(0), W.stride(1),
        HAS_COUNTS=counts is not None, JUMP=jump, HAS_GL0=grad_l0 is not None,
        ACC64=_is64(grad, W), WIDE64=wide == torch.float64,
    )
    return out, t


# ----------------------------------------------------------------------------------------------
# Ops: building blocks
# ----------------------------------------------------------------------------------------------


@kernel_op("sddmm")
def sddmm(grad: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """``out[b, e] = grad[b] · W[indices[b, e]]``: ``grad [B, D]``, ``indices [B, K]``, ``W [N, D]`` -> ``[B, K]``."""
    return _sddmm_launch(grad, indices, W)[0]


@kernel_op("segment_reduce")
def segment_reduce(order: Tensor, offsets: Tensor, weights: Tensor, X: Tensor, K: int,
                   t: Optional[Tensor] = None, x_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Latent-wise scatter-add as a segment reduction over entries sorted by latent.

    Returns ``(out [N, D], tsum [N])`` with ``out[j] = Σ_seg(j) weights · (X[row] - x_bias)`` (``X``'s
    dtype) and ``tsum[j] = Σ_seg(j) t`` (``t`` defaults to ``weights``; float32, float64 for float64).
    ``weights``/``t`` are flat ``[B*K]`` lists; ``order``/``offsets`` come from ``triton_common.segments``.
    """
    wide = torch.float64 if _is64(weights, X, t) else torch.float32
    return segment_rows(order, offsets, weights, X, K, t=weights if t is None else t, x_bias=x_bias, t_dtype=wide)


@kernel_op("gather_sum")
def gather_sum(values: Tensor, indices: Tensor, W: Tensor, counts: Optional[Tensor] = None) -> Tensor:
    """``out[b] = Σ_{e < counts[b]} values[b,e] · W[indices[b,e]]`` for any 2-D strided ``W`` (e.g. ``W_enc.t()``)."""
    return gather_rows(values, indices, W, counts=counts)


@kernel_op("jumprelu_sddmm")
def jumprelu_sddmm(grad_x_hat: Tensor, grad_l0: Tensor, pre: Tensor, indices: Tensor, counts: Tensor,
                   threshold: Tensor, bandwidth: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """JumpReLU backward at compact entries: ``(∂L/∂pre [B, K], per-entry θ-gradient [B, K])``."""
    return _sddmm_launch(grad_x_hat, indices, W_dec, counts, pre, threshold, bandwidth, grad_l0)


# ----------------------------------------------------------------------------------------------
# Ops: sparse_decode (public) and its autograd
# ----------------------------------------------------------------------------------------------


@kernel_op("sparse_decode")
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None,
                  order: Optional[Tensor] = None, offsets: Optional[Tensor] = None) -> Tensor:
    """``x̂[b] = Σ_e values[b,e] · W_dec[indices[b,e]] (+ b_dec)``: ``values [B,K]``, ``indices [B,K]`` int -> ``[B, d_in]``.

    ``order``/``offsets`` (``triton_common.segments``), when the caller has them, are reused by the
    backward instead of sorting again, and let it skip padding entries (BatchTopK's ragged rows).
    """
    return gather_rows(values, indices, W_dec, b_dec)


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec, order, offsets = inputs
    ctx.has_bias = b_dec is not None
    ctx.has_segments = order is not None and offsets is not None
    ctx.save_for_backward(values, indices, W_dec, order, offsets)


def _sparse_decode_backward(ctx, grad):
    values, indices, W_dec, order, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_values = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_values = sddmm(grad, indices, W_dec).to(values.dtype)
    if ctx.needs_input_grad[2]:
        if not ctx.has_segments:
            order, offsets = segments(indices, None, W_dec.shape[0])
        grad_W, _ = segment_reduce(order, offsets, values.contiguous().reshape(-1), grad, values.shape[1])
        grad_W = grad_W.to(W_dec.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad.sum(0)
    return grad_values, None, grad_W, grad_b, None, None


sparse_decode.register_autograd(_sparse_decode_backward, setup_context=_sparse_decode_setup)


# ----------------------------------------------------------------------------------------------
# Ops: the JumpReLU training decode on compact (active ∪ window) entries
# ----------------------------------------------------------------------------------------------


@kernel_op("jumprelu_decode")
def jumprelu_decode(pre: Tensor, indices: Tensor, counts: Tensor, threshold: Tensor, bandwidth: Tensor,
                    W_dec: Tensor, b_dec: Tensor, order: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """``(x̂ [B, d_in], l0 [B] float32)`` from compact pre-activations.

    ``pre [B, K]`` at latents ``indices [B, K]``, the first ``counts[b]`` slots of row ``b`` valid;
    ``f = pre·H(pre - θ)`` (so window-only entries decode to 0) and ``l0[b] = Σ_e H(pre - θ)``.
    ``order``/``offsets`` group the entries by latent (``triton_common.segments``) for the backward.
    """
    x_hat = gather_rows(pre, indices, W_dec, b_dec, counts=counts, threshold=threshold)
    B, K = pre.shape
    active = valid_mask(counts, B, K, pre.device) & (pre > threshold[indices.long()])
    return x_hat, active.sum(-1, dtype=torch.float32)


def _jumprelu_decode_setup(ctx, inputs, output):
    pre, indices, counts, threshold, bandwidth, W_dec, b_dec, order, offsets = inputs
    ctx.save_for_backward(pre, indices, counts, threshold, bandwidth, W_dec, order, offsets)


def _jumprelu_decode_backward(ctx, grad_x_hat, grad_l0):
    pre, indices, counts, threshold, bandwidth, W_dec, order, offsets = ctx.saved_tensors
    B, K = pre.shape
    if grad_x_hat is None:
        grad_x_hat = pre.new_zeros(B, W_dec.shape[1], dtype=W_dec.dtype)
    grad_x_hat = grad_x_hat.contiguous()
    grad_l0 = None if grad_l0 is None else grad_l0.contiguous()
    # One SDDMM pass gives ∂L/∂f at every compact entry; its epilogue applies H for ∂L/∂pre and
    # forms the per-entry θ-gradient of both pseudo-derivative terms.
    grad_pre, t = jumprelu_sddmm(grad_x_hat, grad_l0 if grad_l0 is not None else pre.new_zeros(B, dtype=torch.float32),
                                 pre, indices, counts, threshold, bandwidth, W_dec)
    grad_W = grad_theta = grad_b = None
    if ctx.needs_input_grad[5] or ctx.needs_input_grad[3]:
        f = torch.where(pre > threshold[indices.long()], pre, torch.zeros_like(pre))
        W_out, theta_out = segment_reduce(order, offsets, f.reshape(-1), grad_x_hat, K, t.reshape(-1))
        grad_W = W_out.to(W_dec.dtype) if ctx.needs_input_grad[5] else None
        grad_theta = theta_out.to(threshold.dtype) if ctx.needs_input_grad[3] else None
    if ctx.needs_input_grad[6]:
        grad_b = grad_x_hat.sum(0)
    return grad_pre, None, None, grad_theta, None, grad_W, grad_b, None, None


jumprelu_decode.register_autograd(_jumprelu_decode_backward, setup_context=_jumprelu_decode_setup)
