"""Elementwise JumpReLU and Heaviside step in Triton, with the rectangle-kernel θ-gradient reduced in-kernel.

Ops (namespace ``fastsae_triton``), on dense ``pre [..., d_sae]`` (inference, ``encode``, the functional API):

- ``jumprelu(pre, threshold, bandwidth) -> pre·H(pre - θ)``; backward ``∂/∂pre = H(pre - θ)``,
  ``∂/∂θ = -(θ/ε)·K((pre - θ)/ε)``.
- ``step(pre, threshold, bandwidth) -> H(pre - θ)``; backward ``∂/∂pre = 0``, ``∂/∂θ = -(1/ε)·K(...)``.
- ``jumprelu_backward(grad, pre, threshold, bandwidth, is_step) -> (grad_pre, grad_threshold)``: one
  program per block of latents walks down the rows, so the θ-gradient is a per-latent sum in
  registers (no atomics, deterministic).

``threshold``/``bandwidth`` may be float32 while ``pre`` is bf16: the window is computed in
float32-or-wider, exactly as ``reference._kernel_window`` does. Outputs multiply by the 0/1 step, as
the reference does, so NaN stays NaN (and ``-inf`` gives NaN, ``inf·0``) on every backend, in both
directions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import TritonKernel, cfg, flat_grid, kernel_op, last_config_if


@triton.jit
def _jumprelu_fwd_kernel(pre_ptr, thr_ptr, out_ptr, R, N, STEP: tl.constexpr, WIDE64: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    WIDE: tl.constexpr = tl.float64 if WIDE64 else tl.float32
    n_n = tl.cdiv(N, BLOCK_N)  # one flat grid axis: d_sae / BLOCK_N passes 65,535 at 2^24
    pid = tl.program_id(0)
    rr = (pid // n_n) * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = (pid % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rr[:, None] < R) & (rn[None, :] < N)
    off = rr.to(tl.int64)[:, None] * N + rn[None, :]
    p = tl.load(pre_ptr + off, mask=mask, other=0.0)
    th = tl.load(thr_ptr + rn, mask=rn < N, other=0.0).to(WIDE)
    on = p.to(WIDE) > th[None, :]
    if STEP:
        out = on.to(out_ptr.dtype.element_ty)
    else:
        out = (p * on.to(p.dtype)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + off, out, mask=mask)


_jumprelu_fwd = TritonKernel(
    _jumprelu_fwd_kernel,
    [cfg(BLOCK_R=16, BLOCK_N=256, num_warps=4), cfg(BLOCK_R=32, BLOCK_N=512, num_warps=8)],
    key=["R", "N"], bucketed=["R"], interp=dict(BLOCK_R=8, BLOCK_N=32),
)


@triton.jit
def _jumprelu_bwd_kernel(grad_ptr, pre_ptr, thr_ptr, eps_ptr, gpre_ptr, gthr_ptr, R, N,
                         STEP: tl.constexpr, NEED_PRE: tl.constexpr, WIDE64: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    WIDE: tl.constexpr = tl.float64 if WIDE64 else tl.float32
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    th = tl.load(thr_ptr + rn, mask=mn, other=0.0).to(WIDE)
    ep = tl.load(eps_ptr + rn, mask=mn, other=1.0).to(WIDE)
    # ∂f/∂θ = -(θ/ε)K(u) for JumpReLU, ∂H/∂θ = -(1/ε)K(u) for the step.
    if STEP:
        scale = -1.0 / ep
    else:
        scale = -(th / ep)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=WIDE)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask = (rr[:, None] < R) & mn[None, :]
        off = rr.to(tl.int64)[:, None] * N + rn[None, :]
        g = tl.load(grad_ptr + off, mask=mask, other=0.0)
        p = tl.load(pre_ptr + off, mask=mask, other=0.0).to(WIDE)
        u = (p - th[None, :]) / ep[None, :]
        window = (u > -0.5) & (u < 0.5)
        acc += tl.where(mask, window.to(WIDE) * g.to(WIDE), 0.0)
        if NEED_PRE:
            tl.store(gpre_ptr + off, (g * (p > th[None, :]).to(g.dtype)).to(gpre_ptr.dtype.element_ty), mask=mask)
    tl.store(gthr_ptr + rn, (scale * tl.sum(acc, axis=0)).to(gthr_ptr.dtype.element_ty), mask=mn)


_jumprelu_bwd = TritonKernel(
    _jumprelu_bwd_kernel,
    [cfg(BLOCK_R=32, BLOCK_N=128, num_warps=4), cfg(BLOCK_R=64, BLOCK_N=64, num_warps=4),
     cfg(BLOCK_R=16, BLOCK_N=256, num_warps=8)],
    key=["R", "N"], bucketed=["R"], interp=dict(BLOCK_R=8, BLOCK_N=32),
    prune=last_config_if("WIDE64"),  # float64 accumulators in the 32x128 / 64x64 tiles spill in the row loop
)


def _wide64(pre: Tensor, threshold: Tensor) -> bool:
    return torch.float64 in (pre.dtype, threshold.dtype)


def _as_rows(pre: Tensor) -> Tensor:
    return pre.reshape(-1, pre.shape[-1]).contiguous()


def _forward(pre: Tensor, threshold: Tensor, step: bool) -> Tensor:
    p = _as_rows(pre)
    R, N = p.shape
    out = torch.empty_like(p)
    if p.numel():
        _jumprelu_fwd(flat_grid(lambda m: triton.cdiv(R, m["BLOCK_R"]), lambda m: triton.cdiv(N, m["BLOCK_N"])),
                      p, threshold.contiguous(), out, R, N, STEP=step, WIDE64=_wide64(pre, threshold))
    return out.reshape(pre.shape)


@kernel_op("jumprelu")
def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: Tensor) -> Tensor:
    """``pre·H(pre - θ)``: ``pre [..., d_sae]``, ``threshold``/``bandwidth [d_sae]``; same shape and dtype as ``pre``."""
    return _forward(pre, threshold, step=False)


@kernel_op("step")
def step(pre: Tensor, threshold: Tensor, bandwidth: Tensor) -> Tensor:
    """``H(pre - θ)`` in ``pre``'s dtype."""
    return _forward(pre, threshold, step=True)


def _backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: Tensor, is_step: bool) -> tuple[Tensor, Tensor]:
    g, p = _as_rows(grad), _as_rows(pre)
    R, N = p.shape
    grad_pre = torch.zeros_like(p) if is_step else torch.empty_like(p)
    grad_thr = torch.empty(N, dtype=threshold.dtype, device=pre.device)
    if N == 0:
        return grad_pre.reshape(pre.shape), grad_thr
    _jumprelu_bwd(lambda m: (triton.cdiv(N, m["BLOCK_N"]),),
                  g, p, threshold.contiguous(), bandwidth.contiguous(), grad_pre, grad_thr, R, N,
                  STEP=is_step, NEED_PRE=not is_step, WIDE64=_wide64(pre, threshold))
    return grad_pre.reshape(pre.shape), grad_thr


@kernel_op("jumprelu_backward")
def jumprelu_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: Tensor,
                      is_step: bool) -> tuple[Tensor, Tensor]:
    """``(grad_pre, grad_threshold [d_sae])`` of :func:`jumprelu` (or :func:`step` with ``is_step``)."""
    return _backward(grad, pre, threshold, bandwidth, is_step)


def _setup(ctx, inputs, output):
    pre, threshold, bandwidth = inputs
    ctx.save_for_backward(pre, threshold, bandwidth)


def _make_backward(is_step: bool):
    def backward(ctx, grad):
        pre, threshold, bandwidth = ctx.saved_tensors
        grad_pre, grad_thr = jumprelu_backward(grad, pre, threshold, bandwidth, is_step)
        return (grad_pre if ctx.needs_input_grad[0] else None,
                grad_thr if ctx.needs_input_grad[1] else None, None)
    return backward


jumprelu.register_autograd(_make_backward(False), setup_context=_setup)
step.register_autograd(_make_backward(True), setup_context=_setup)
