"""The ``cpp`` backend: Python side of the compiled ``fastsae._C`` CPU kernels.

The C++ side declares each op's schema (csrc/ops.cpp) and registers the CPU kernels. Here each op
gets a typed wrapper, a fake (meta) implementation for ``torch.compile``/``torch.export``, and its
autograd formula, following pytorch/extension-cpp.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ..backends import Backend

try:
    from .. import _C  # noqa: F401  (loading the .so registers torch.ops.fastsae.*)

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # not compiled: the package still works on the other backends
    _IMPORT_ERROR = (
        f"the compiled extension fastsae._C is not importable ({e}); "
        'build it with `pip install --no-build-isolation -e ".[dev]"`'
    )


def _ops():
    return torch.ops.fastsae


if _IMPORT_ERROR is None:
    # ---- sparse decode ------------------------------------------------------------------------
    @torch.library.register_fake("fastsae::sparse_decode")
    def _sparse_decode_fake(values, indices, W_dec, b_dec):
        torch._check(values.dim() == 2, lambda: "values must be [B, k]")
        torch._check(indices.shape == values.shape, lambda: "indices must have the shape of values")
        torch._check(W_dec.dim() == 2, lambda: "W_dec must be [d_sae, d_in]")
        return values.new_empty((values.shape[0], W_dec.shape[1]))

    @torch.library.register_fake("fastsae::sparse_decode_backward")
    def _sparse_decode_backward_fake(grad, values, indices, W_dec, need_values, need_W_dec):
        return (values.new_empty(values.shape if need_values else (0,)),
                W_dec.new_empty(W_dec.shape if need_W_dec else (0,)))

    def _sparse_decode_setup(ctx, inputs, output):
        values, indices, W_dec, b_dec = inputs
        ctx.has_bias = b_dec is not None
        ctx.save_for_backward(values, indices, W_dec)

    def _sparse_decode_backward(ctx, grad):
        values, indices, W_dec = ctx.saved_tensors
        need_v, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_values = grad_W = grad_b = None
        if need_v or need_W:
            gv, gW = _ops().sparse_decode_backward(grad.contiguous(), values, indices, W_dec, need_v, need_W)
            grad_values = gv if need_v else None
            grad_W = gW if need_W else None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.sum(0)
        return grad_values, None, grad_W, grad_b

    torch.library.register_autograd(
        "fastsae::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup
    )

    # ---- dense JumpReLU / step ----------------------------------------------------------------
    def _elementwise_fake(pre, threshold, bandwidth):
        torch._check(pre.dim() >= 1, lambda: "pre must be [..., d_sae]")
        torch._check(threshold.shape == (pre.shape[-1],), lambda: "threshold must be [d_sae]")
        torch._check(bandwidth.shape == (pre.shape[-1],), lambda: "bandwidth must be [d_sae]")
        return torch.empty_like(pre, memory_format=torch.contiguous_format)

    torch.library.register_fake("fastsae::jumprelu")(_elementwise_fake)
    torch.library.register_fake("fastsae::step")(_elementwise_fake)

    @torch.library.register_fake("fastsae::jumprelu_backward")
    def _jumprelu_backward_fake(grad, pre, threshold, bandwidth, is_step, need_pre, need_threshold):
        return (grad.new_empty(pre.shape if need_pre else (0,)),
                threshold.new_empty(threshold.shape if need_threshold else (0,)))

    def _elementwise_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _make_elementwise_backward(is_step: bool):
        def backward(ctx, grad):
            pre, threshold, bandwidth = ctx.saved_tensors
            need_pre, need_th = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if not (need_pre or need_th):
                return None, None, None
            gp, gt = _ops().jumprelu_backward(grad, pre, threshold, bandwidth, is_step, need_pre, need_th)
            return (gp if need_pre else None), (gt if need_th else None), None

        return backward

    torch.library.register_autograd("fastsae::jumprelu", _make_elementwise_backward(False),
                                    setup_context=_elementwise_setup)
    torch.library.register_autograd("fastsae::step", _make_elementwise_backward(True),
                                    setup_context=_elementwise_setup)

    # ---- top-k ----------------------------------------------------------------------------------
    @torch.library.register_fake("fastsae::topk")
    def _topk_fake(pre, k):
        torch._check(pre.dim() == 2, lambda: "pre must be [rows, d_sae]")
        torch._check(1 <= k <= pre.shape[1], lambda: "k must lie in 1..d_sae")
        return pre.new_empty((pre.shape[0], k)), pre.new_empty((pre.shape[0], k), dtype=torch.int64)

    @torch.library.register_fake("fastsae::topk_backward")
    def _topk_backward_fake(grad_values, indices, d_sae):
        return grad_values.new_empty((grad_values.shape[0], d_sae))

    def _topk_setup(ctx, inputs, output):
        ctx.d_sae = inputs[0].shape[1]
        ctx.save_for_backward(output[1])

    def _topk_backward(ctx, grad_values, grad_indices):
        (indices,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return _ops().topk_backward(grad_values.contiguous(), indices, ctx.d_sae), None

    torch.library.register_autograd("fastsae::topk", _topk_backward, setup_context=_topk_setup)

    # ---- fused sparse SAE forwards --------------------------------------------------------------
    def _check_sae_fake(x, W_enc, b_enc, W_dec, b_dec):
        torch._check(x.dim() == 2, lambda: "x must be [B, d_in]")
        torch._check(W_enc.dim() == 2 and W_enc.shape[0] == x.shape[1], lambda: "W_enc must be [d_in, d_sae]")
        torch._check(W_dec.shape == (W_enc.shape[1], x.shape[1]), lambda: "W_dec must be [d_sae, d_in]")
        return x.shape[0], x.shape[1], W_enc.shape[1]

    @torch.library.register_fake("fastsae::jumprelu_sae")
    def _jumprelu_sae_fake(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, b_enc, W_dec, b_dec)
        nnz = torch.library.get_ctx().new_dynamic_size()  # active ∪ window entries: data-dependent
        return (x.new_empty((B, d_in)), x.new_empty((B,), dtype=torch.float32),
                x.new_empty((d_sae,), dtype=torch.bool), x.new_empty((B + 1,), dtype=torch.int64),
                x.new_empty((nnz,), dtype=torch.int64), x.new_empty((nnz,)), x.new_empty((nnz,), dtype=torch.uint8))

    @torch.library.register_fake("fastsae::topk_sae")
    def _topk_sae_fake(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, b_enc, W_dec, b_dec)
        return (x.new_empty((B, d_in)), x.new_empty((B, k)), x.new_empty((B, k), dtype=torch.int64),
                x.new_empty((B,), dtype=torch.float32), x.new_empty((d_sae,), dtype=torch.bool))

    @torch.library.register_fake("fastsae::sparse_sae_backward")
    def _sparse_sae_backward_fake(grad_x_hat, grad_l0, grad_values, x, W_enc, W_dec, b_dec, apply_b_dec_to_input,
                                  row_ptr, cols, values, flags, threshold, bandwidth):
        th = threshold.new_empty(threshold.shape) if flags is not None else x.new_empty((0,))
        return (W_enc.new_empty(W_enc.shape), W_enc.new_empty((W_enc.shape[1],)), W_dec.new_empty(W_dec.shape),
                b_dec.new_empty(b_dec.shape), th)

    def _no_input_grad(ctx):
        if ctx.needs_input_grad[0]:
            # Training never differentiates the input; the backend falls back to eager when it must.
            raise NotImplementedError("fastsae::*_sae: the C++ backward does not compute a gradient for x")

    def _jumprelu_sae_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input = inputs
        _, _, _, row_ptr, cols, values, flags = output
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        # Only O(B · (L0 + window)) entries are kept for backward, never a [B, d_sae] tensor.
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, threshold, bandwidth, row_ptr, cols, values, flags)

    def _jumprelu_sae_backward(ctx, grad_x_hat, grad_l0, *_):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, threshold, bandwidth, row_ptr, cols, values, flags = ctx.saved_tensors
        if grad_x_hat is None:
            grad_x_hat = torch.zeros(x.shape, dtype=x.dtype)
        gWe, gbe, gWd, gbd, gth = _ops().sparse_sae_backward(
            grad_x_hat.contiguous(), grad_l0, None, x, W_enc, W_dec, b_dec, ctx.apply_b_dec_to_input, row_ptr, cols,
            values, flags, threshold, bandwidth)
        n = ctx.needs_input_grad
        return (None, gWe if n[1] else None, gbe if n[2] else None, gWd if n[3] else None, gbd if n[4] else None,
                gth if n[5] else None, None, None)

    torch.library.register_autograd("fastsae::jumprelu_sae", _jumprelu_sae_backward,
                                    setup_context=_jumprelu_sae_setup)

    def _topk_sae_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input = inputs
        _, values, indices, _, _ = output
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, values, indices)

    def _topk_sae_backward(ctx, grad_x_hat, grad_values, *_):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, values, indices = ctx.saved_tensors
        B, k = values.shape
        if grad_x_hat is None:
            grad_x_hat = torch.zeros(x.shape, dtype=x.dtype)
        row_ptr = torch.arange(0, B * k + 1, k, dtype=torch.int64) if k else torch.zeros(B + 1, dtype=torch.int64)
        gv = None if grad_values is None else grad_values.reshape(-1)
        gWe, gbe, gWd, gbd, _ = _ops().sparse_sae_backward(
            grad_x_hat.contiguous(), None, gv, x, W_enc, W_dec, b_dec, ctx.apply_b_dec_to_input, row_ptr,
            indices.reshape(-1), values.reshape(-1), None, None, None)
        n = ctx.needs_input_grad
        return (None, gWe if n[1] else None, gbe if n[2] else None, gWd if n[3] else None, gbd if n[4] else None,
                None, None)

    torch.library.register_autograd("fastsae::topk_sae", _topk_sae_backward, setup_context=_topk_sae_setup)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """C++ sparse decode. ``values [B, k] float``, ``indices [B, k] int64``, ``W_dec [d_sae, d_in]`` -> ``[B, d_in]``."""
    return _ops().sparse_decode(values, indices, W_dec, b_dec)


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: Tensor) -> Tensor:
    """C++ JumpReLU ``pre · H(pre - θ)``. ``pre [..., d_sae]``, ``threshold``/``bandwidth [d_sae]``."""
    return _ops().jumprelu(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: Tensor) -> Tensor:
    """C++ Heaviside ``H(pre - θ)`` (gradient to ``threshold`` only). Shapes as :func:`jumprelu`."""
    return _ops().step(pre, threshold, bandwidth)


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """C++ row-wise top-k of ``pre [rows, d_sae]``: ``(values [rows, k], indices [rows, k] int64)``, descending."""
    return _ops().topk(pre, k)


def jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input=False):
    """Fused sparse JumpReLU SAE forward; returns ``(x_hat, l0, fired, row_ptr, cols, values, flags)``.

    ``(row_ptr [B+1], cols [nnz])`` is the CSR of the active ∪ window entries; ``values`` is ``f`` there
    (0 at inactive window entries); ``flags`` bit 0 = active, bit 1 = in the window ``|pre - θ| < ε/2``.
    """
    return _ops().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input)


def topk_sae(x, W_enc, b_enc, W_dec, b_dec, k: int, apply_b_dec_to_input=True):
    """Fused sparse TopK SAE forward; returns ``(x_hat, values [B, k], indices [B, k], l0, fired)``."""
    return _ops().topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _fusable(x: Tensor, *params: Tensor) -> bool:
    """The fused ops need one compute dtype and no gradient for ``x`` (training never asks for one)."""
    return (x.dtype in _FUSED_DTYPES and not x.requires_grad and x.dim() == 2
            and all(p.dtype == x.dtype for p in params))


class CppBackend(Backend):
    """Compiled C++ (OpenMP) kernels for CPU tensors; everything else falls back to the reference."""

    name = "cpp"

    @classmethod
    def availability(cls):
        if _IMPORT_ERROR is not None:
            return False, _IMPORT_ERROR
        return True, f"compiled extension {_C.__file__}"

    def supports(self, device):
        return None if device.type == "cpu" else f"the C++ kernels run on CPU tensors only (got {device.type})"

    def sparse_decode(self, values, indices, W_dec, b_dec):
        lead = values.shape[:-1]
        rows = lead.numel()
        k = values.shape[-1]
        out = sparse_decode(values.reshape(rows, k), indices.reshape(rows, k), W_dec, b_dec)
        return out.reshape(*lead, W_dec.shape[1])

    def jumprelu(self, pre, threshold, bandwidth):
        if pre.dtype not in _FUSED_DTYPES:
            return super().jumprelu(pre, threshold, bandwidth)
        return jumprelu(pre, threshold, bandwidth)

    def step(self, pre, threshold, bandwidth):
        if pre.dtype not in _FUSED_DTYPES:
            return super().step(pre, threshold, bandwidth)
        return step(pre, threshold, bandwidth)

    def topk(self, pre, k):
        lead = pre.shape[:-1]
        values, indices = topk(pre.reshape(lead.numel(), pre.shape[-1]), k)
        return values.reshape(*lead, k), indices.reshape(*lead, k)

    def jumprelu_sae(self, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                     ste_to_input=False, need_values=False):
        if ste_to_input or need_values:  # not in the fused kernels yet: the reference computes them
            return super().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                        ste_to_input, need_values)
        if not _fusable(x, W_enc, b_enc, W_dec, b_dec):
            return super().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input)
        x_hat, l0, fired, *_ = jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth,
                                            bool(apply_b_dec_to_input))
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired)

    def topk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input):
        if not _fusable(x, W_enc, b_enc, W_dec, b_dec):
            return super().topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)
        x_hat, values, indices, l0, fired = topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, bool(apply_b_dec_to_input))
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, values=values, indices=indices)
