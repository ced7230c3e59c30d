"""The ``cpp`` backend: Python side of the compiled ``fastsae._C`` CPU kernels.

The C++ side declares each op's schema (csrc/ops.cpp) and registers the CPU kernels. Here each op
gets a typed wrapper, a fake (meta) implementation for ``torch.compile``/``torch.export``, and its
autograd formula, following pytorch/extension-cpp.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary
from torch import Tensor

from .. import reference as ref
from ..dispatch import Backend

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

    # ---- fused SAE training steps: sparse (csrc/sae.cpp) and dense (csrc/sae_dense.cpp) -------------
    def _check_sae_fake(x, W_enc, W_dec):
        torch._check(x.dim() == 2, lambda: "x must be [B, d_in]")
        torch._check(W_enc.dim() == 2 and W_enc.shape[0] == x.shape[1], lambda: "W_enc must be [d_in, d_sae]")
        torch._check(W_dec.shape == (W_enc.shape[1], x.shape[1]), lambda: "W_dec must be [d_sae, d_in]")
        return x.shape[0], x.shape[1], W_enc.shape[1]

    def _csr_fake(x, B, n_values=1):
        nnz = torch.library.get_ctx().new_dynamic_size()  # the kept entries: data-dependent
        return ((x.new_empty((B + 1,), dtype=torch.int64), x.new_empty((nnz,), dtype=torch.int64))
                + tuple(x.new_empty((nnz,)) for _ in range(n_values)), nnz)

    def _row_fakes(x, B, d_sae):  # l0 [B] float32, fired [d_sae] bool
        return x.new_empty((B,), dtype=torch.float32), x.new_empty((d_sae,), dtype=torch.bool)

    @torch.library.register_fake("fastsae::jumprelu_sae")
    def _jumprelu_sae_fake(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                           straight_through=False):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, W_dec)
        (row_ptr, cols, values), nnz = _csr_fake(x, B)
        return (x.new_empty((B, d_in)), *_row_fakes(x, B, d_sae), row_ptr, cols, values,
                x.new_empty((nnz,), dtype=torch.uint8))

    @torch.library.register_fake("fastsae::topk_sae")
    def _topk_sae_fake(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, W_dec)
        l0, fired = _row_fakes(x, B, d_sae)
        return x.new_empty((B, d_in)), x.new_empty((B, k)), x.new_empty((B, k), dtype=torch.int64), l0, fired

    @torch.library.register_fake("fastsae::batchtopk_sae")
    def _batchtopk_sae_fake(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, bound_hint=0.0):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, W_dec)
        (row_ptr, cols, values), _ = _csr_fake(x, B)
        min_kept = x.new_empty((torch.library.get_ctx().new_dynamic_size(max=1),))  # [1], or [0] if none kept
        return (x.new_empty((B, d_in)), *_row_fakes(x, B, d_sae), row_ptr, cols, values, min_kept)

    @torch.library.register_fake("fastsae::relu_sae")
    def _relu_sae_fake(x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, W_dec)
        (row_ptr, cols, values), _ = _csr_fake(x, B)
        return (x.new_empty((B, d_in)), x.new_empty((B,)), *_row_fakes(x, B, d_sae), row_ptr, cols, values)

    @torch.library.register_fake("fastsae::gated_sae")
    def _gated_sae_fake(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input):
        B, d_in, d_sae = _check_sae_fake(x, W_gate, W_dec)
        (row_ptr, cols, values, gate_values), _ = _csr_fake(x, B, 2)
        return (x.new_empty((B, d_in)), x.new_empty((B, d_in)), x.new_empty((B,)), *_row_fakes(x, B, d_sae),
                row_ptr, cols, values, gate_values)

    @torch.library.register_fake("fastsae::jumprelu_sae_dense")
    def _jumprelu_sae_dense_fake(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                 straight_through=False):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, W_dec)
        return (x.new_empty((B, d_in)), *_row_fakes(x, B, d_sae), x.new_empty((), dtype=torch.int64),
                x.new_empty((B, d_sae)), x.new_empty((B, d_sae)))

    @torch.library.register_fake("fastsae::relu_sae_dense")
    def _relu_sae_dense_fake(x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input):
        B, d_in, d_sae = _check_sae_fake(x, W_enc, W_dec)
        return (x.new_empty((B, d_in)), x.new_empty((B,)), *_row_fakes(x, B, d_sae),
                x.new_empty((), dtype=torch.int64), x.new_empty((B, d_sae)))

    @torch.library.register_fake("fastsae::gated_sae_dense")
    def _gated_sae_dense_fake(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input):
        B, d_in, d_sae = _check_sae_fake(x, W_gate, W_dec)
        return (x.new_empty((B, d_in)), x.new_empty((B, d_in)), x.new_empty((B,)), *_row_fakes(x, B, d_sae),
                x.new_empty((), dtype=torch.int64), x.new_empty((B, d_sae)), x.new_empty((B, d_sae)))

    def _grads_fake(x, W_enc, W_dec, b_dec, *latent):
        return (W_enc.new_empty(W_enc.shape), W_enc.new_empty((W_enc.shape[1],)), W_dec.new_empty(W_dec.shape),
                b_dec.new_empty(b_dec.shape), *latent)

    @torch.library.register_fake("fastsae::sparse_sae_backward")
    def _sparse_sae_backward_fake(grad_x_hat, grad_l0, grad_values, x, W_enc, W_dec, b_dec, apply_b_dec_to_input,
                                  row_ptr, cols, values, flags, threshold, bandwidth, straight_through=False):
        th = threshold.new_empty(threshold.shape) if flags is not None else x.new_empty((0,))
        return _grads_fake(x, W_enc, W_dec, b_dec, th)

    @torch.library.register_fake("fastsae::jumprelu_sae_dense_backward")
    def _jumprelu_sae_dense_backward_fake(grad_x_hat, grad_l0, grad_f, x, W_enc, W_dec, b_dec, apply_b_dec_to_input,
                                          pre, f, threshold, bandwidth, straight_through=False):
        return _grads_fake(x, W_enc, W_dec, b_dec, threshold.new_empty(threshold.shape))

    def _relu_backward_fake(grad_x_hat, grad_sparsity, x, W_enc, W_dec, b_dec, latent_weight, *_):
        return _grads_fake(x, W_enc, W_dec, b_dec, latent_weight.new_empty(latent_weight.shape))

    torch.library.register_fake("fastsae::relu_sae_backward")(_relu_backward_fake)
    torch.library.register_fake("fastsae::relu_sae_dense_backward")(_relu_backward_fake)

    def _gated_backward_fake(grad_x_hat, grad_x_hat_frozen, grad_sparsity, x, W_gate, r_mag, b_mag, W_dec, b_dec, *_):
        d_sae = W_gate.shape[1]
        return (W_gate.new_empty(W_gate.shape), *(W_gate.new_empty((d_sae,)) for _ in range(3)),
                W_dec.new_empty(W_dec.shape), b_dec.new_empty(b_dec.shape))

    torch.library.register_fake("fastsae::gated_sae_backward")(_gated_backward_fake)
    torch.library.register_fake("fastsae::gated_sae_dense_backward")(_gated_backward_fake)

    def _no_input_grad(ctx):
        if ctx.needs_input_grad[0]:
            # Training never differentiates the input; the backend falls back to eager when it must.
            raise NotImplementedError("fastsae::*_sae: the C++ backward does not compute a gradient for x")

    def _zeros_if_none(grad, like):
        return torch.zeros(like.shape, dtype=like.dtype) if grad is None else grad.contiguous()

    def _pick(ctx, grads):
        """Each gradient where its input asked for one, else None (inputs in order, x first)."""
        return (None,) + tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad[1:]))

    # JumpReLU, sparse. `values` is differentiable: a gradient reaching it joins ∂L/∂f at the entries.
    def _jumprelu_sae_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input, *ste = inputs
        _, _, _, row_ptr, cols, values, flags = output
        ctx.apply_b_dec_to_input, ctx.straight_through = apply_b_dec_to_input, bool(ste and ste[0])
        ctx.mark_non_differentiable(output[2], row_ptr, cols, flags)
        # Only O(B · (L0 + window)) entries are kept for backward, never a [B, d_sae] tensor.
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, threshold, bandwidth, row_ptr, cols, values, flags)

    def _jumprelu_sae_backward(ctx, grad_x_hat, grad_l0, _fired, _rp, _cols, grad_values, _flags):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, threshold, bandwidth, row_ptr, cols, values, flags = ctx.saved_tensors
        gWe, gbe, gWd, gbd, gth = _ops().sparse_sae_backward(
            _zeros_if_none(grad_x_hat, x), grad_l0, grad_values, x, W_enc, W_dec, b_dec, ctx.apply_b_dec_to_input,
            row_ptr, cols, values, flags, threshold, bandwidth, ctx.straight_through)
        return _pick(ctx, (gWe, gbe, gWd, gbd, gth)) + (None,) * (len(ctx.needs_input_grad) - 6)

    torch.library.register_autograd("fastsae::jumprelu_sae", _jumprelu_sae_backward,
                                    setup_context=_jumprelu_sae_setup)

    # JumpReLU, dense: the saved pre-activations are an output, never differentiated; f is (grad_f).
    def _jumprelu_sae_dense_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input, *ste = inputs
        _, _, fired, entries, pre, f = output
        ctx.apply_b_dec_to_input, ctx.straight_through = apply_b_dec_to_input, bool(ste and ste[0])
        ctx.mark_non_differentiable(fired, entries, pre)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, threshold, bandwidth, pre, f)

    def _jumprelu_sae_dense_backward(ctx, grad_x_hat, grad_l0, _fired, _entries, _pre, grad_f):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, threshold, bandwidth, pre, f = ctx.saved_tensors
        gWe, gbe, gWd, gbd, gth = _ops().jumprelu_sae_dense_backward(
            _zeros_if_none(grad_x_hat, x), grad_l0, grad_f, x, W_enc, W_dec, b_dec, ctx.apply_b_dec_to_input, pre, f,
            threshold, bandwidth, ctx.straight_through)
        return _pick(ctx, (gWe, gbe, gWd, gbd, gth)) + (None,) * (len(ctx.needs_input_grad) - 6)

    torch.library.register_autograd("fastsae::jumprelu_sae_dense", _jumprelu_sae_dense_backward,
                                    setup_context=_jumprelu_sae_dense_setup)

    # TopK and BatchTopK: the same backward from their kept entries (values differentiable).
    def _topk_sae_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input = inputs
        _, values, indices, _, fired = output
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        ctx.mark_non_differentiable(indices, fired)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, values, indices)

    def _topk_sae_backward(ctx, grad_x_hat, grad_values, *_):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, values, indices = ctx.saved_tensors
        B, k = values.shape
        row_ptr = torch.arange(0, B * k + 1, k, dtype=torch.int64)
        gv = None if grad_values is None else grad_values.reshape(-1)
        gWe, gbe, gWd, gbd, _ = _ops().sparse_sae_backward(
            _zeros_if_none(grad_x_hat, x), None, gv, x, W_enc, W_dec, b_dec, ctx.apply_b_dec_to_input, row_ptr,
            indices.reshape(-1), values.reshape(-1), None, None, None)
        return _pick(ctx, (gWe, gbe, gWd, gbd)) + (None, None)

    torch.library.register_autograd("fastsae::topk_sae", _topk_sae_backward, setup_context=_topk_sae_setup)

    def _batchtopk_sae_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input = inputs[:7]
        _, _, fired, row_ptr, cols, values, min_kept = output
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        ctx.mark_non_differentiable(fired, row_ptr, cols, min_kept)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, row_ptr, cols, values)

    def _batchtopk_sae_backward(ctx, grad_x_hat, _l0, _fired, _rp, _cols, grad_values, _min):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, row_ptr, cols, values = ctx.saved_tensors
        gWe, gbe, gWd, gbd, _ = _ops().sparse_sae_backward(
            _zeros_if_none(grad_x_hat, x), None, grad_values, x, W_enc, W_dec, b_dec, ctx.apply_b_dec_to_input,
            row_ptr, cols, values, None, None, None)
        return _pick(ctx, (gWe, gbe, gWd, gbd)) + (None, None, None)

    torch.library.register_autograd("fastsae::batchtopk_sae", _batchtopk_sae_backward,
                                    setup_context=_batchtopk_sae_setup)

    # ReLU: sparsity_b = Σ_j f_bj·w_j is an output; w (the decoder row norms) gets its gradient.
    def _relu_sae_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input = inputs
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        ctx.mark_non_differentiable(*output[2:])  # l0, fired, and the entries (gradients come via sparsity)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, latent_weight, *output[4:])

    def _relu_sae_backward(ctx, grad_x_hat, grad_sparsity, *_):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, latent_weight, row_ptr, cols, values = ctx.saved_tensors
        grads = _ops().relu_sae_backward(_zeros_if_none(grad_x_hat, x), grad_sparsity, x, W_enc, W_dec, b_dec,
                                         latent_weight, ctx.apply_b_dec_to_input, row_ptr, cols, values)
        return _pick(ctx, grads) + (None,)

    torch.library.register_autograd("fastsae::relu_sae", _relu_sae_backward, setup_context=_relu_sae_setup)

    def _relu_sae_dense_setup(ctx, inputs, output):
        x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input = inputs
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, latent_weight, output[5])

    def _relu_sae_dense_backward(ctx, grad_x_hat, grad_sparsity, *_):
        _no_input_grad(ctx)
        x, W_enc, W_dec, b_dec, latent_weight, f = ctx.saved_tensors
        grads = _ops().relu_sae_dense_backward(_zeros_if_none(grad_x_hat, x), grad_sparsity, x, W_enc, W_dec, b_dec,
                                               latent_weight, ctx.apply_b_dec_to_input, f)
        return _pick(ctx, grads) + (None,)

    torch.library.register_autograd("fastsae::relu_sae_dense", _relu_sae_dense_backward,
                                    setup_context=_relu_sae_dense_setup)

    # Gated: x_hat, x_hat_frozen (through the detached decoder) and sparsity are differentiable outputs.
    def _gated_sae_setup(ctx, inputs, output):
        x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input = inputs
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        ctx.mark_non_differentiable(*output[3:])
        ctx.save_for_backward(x, W_gate, r_mag, b_mag, W_dec, b_dec, *output[5:8])

    def _gated_sae_backward(ctx, grad_x_hat, grad_x_hat_frozen, grad_sparsity, *_):
        _no_input_grad(ctx)
        x, W_gate, r_mag, b_mag, W_dec, b_dec, row_ptr, cols, values = ctx.saved_tensors
        gW, gbg, grm, gbm, gWd, gbd = _ops().gated_sae_backward(
            _zeros_if_none(grad_x_hat, x), grad_x_hat_frozen, grad_sparsity, x, W_gate, r_mag, b_mag, W_dec, b_dec,
            ctx.apply_b_dec_to_input, row_ptr, cols, values)
        return _pick(ctx, (gW, gbg, grm, gbm, gWd, gbd)) + (None,)

    torch.library.register_autograd("fastsae::gated_sae", _gated_sae_backward, setup_context=_gated_sae_setup)

    def _gated_sae_dense_setup(ctx, inputs, output):
        x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input = inputs
        ctx.apply_b_dec_to_input = apply_b_dec_to_input
        ctx.mark_non_differentiable(*output[3:])
        ctx.save_for_backward(x, W_gate, r_mag, b_mag, W_dec, b_dec, output[6], output[7])

    def _gated_sae_dense_backward(ctx, grad_x_hat, grad_x_hat_frozen, grad_sparsity, *_):
        _no_input_grad(ctx)
        x, W_gate, r_mag, b_mag, W_dec, b_dec, f, gate = ctx.saved_tensors
        gW, gbg, grm, gbm, gWd, gbd = _ops().gated_sae_dense_backward(
            _zeros_if_none(grad_x_hat, x), grad_x_hat_frozen, grad_sparsity, x, W_gate, r_mag, b_mag, W_dec, b_dec,
            ctx.apply_b_dec_to_input, f, gate)
        return _pick(ctx, (gW, gbg, grm, gbm, gWd, gbd)) + (None,)

    torch.library.register_autograd("fastsae::gated_sae_dense", _gated_sae_dense_backward,
                                    setup_context=_gated_sae_dense_setup)

    # ---- inference encoders (csrc/encode.cpp): no autograd (the backend takes them only without grad) ------
    def _encode_fake(x, W_enc, W_dec, dense, k=None):
        B, d_in, d_sae = x.shape[0], x.shape[1], W_enc.shape[1]
        if dense:
            return x.new_empty((B, d_sae)), x.new_empty((0,), dtype=torch.int64), x.new_empty((0,))
        K = k if k is not None else torch.library.get_ctx().new_dynamic_size()
        return (x.new_empty((B, K)), x.new_empty((B, K), dtype=torch.int64),
                x.new_empty((B, d_in)) if W_dec is not None else x.new_empty((0,)))

    @torch.library.register_fake("fastsae::threshold_encode")
    def _threshold_encode_fake(x, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, W_dec, dense):
        return _encode_fake(x, W_enc, W_dec, dense)

    @torch.library.register_fake("fastsae::gated_encode")
    def _gated_encode_fake(x, W_gate, b_gate, r_mag, b_mag, b_dec, apply_b_dec_to_input, W_dec, dense):
        return _encode_fake(x, W_gate, W_dec, dense)

    @torch.library.register_fake("fastsae::topk_encode")
    def _topk_encode_fake(x, W_enc, b_enc, b_dec, k, apply_b_dec_to_input, W_dec, dense):
        return _encode_fake(x, W_enc, W_dec, dense, k)

    @torch.library.register_fake("fastsae::batchtopk_encode")
    def _batchtopk_encode_fake(x, W_enc, b_enc, b_dec, k, apply_b_dec_to_input, W_dec, dense):
        return _encode_fake(x, W_enc, W_dec, dense)


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


def jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input=False,
                 straight_through=False):
    """Fused sparse JumpReLU SAE forward; returns ``(x_hat, l0, fired, row_ptr, cols, values, flags)``.

    ``(row_ptr [B+1], cols [nnz])`` is the CSR of the active ∪ window entries; ``values`` is ``f`` there
    (0 at inactive window entries, differentiable); ``flags`` bit 0 = active, bit 1 = in the window
    ``|pre - θ| < ε/2``. ``straight_through`` (the reference's ``ste_to_input``): the backward also passes the
    jump's and the step's pseudo-derivatives to the pre-activations at window entries
    (``∂f/∂pre += (θ/ε)K``, ``∂H/∂pre := (1/ε)K``; without it the step passes none).
    """
    return _ops().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                               straight_through)


def jumprelu_sae_dense(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input=False,
                       straight_through=False):
    """The dense JumpReLU step (same math as :func:`jumprelu_sae`); returns
    ``(x_hat, l0, fired, entries, pre, f)``: ``entries`` is the count of active ∪ window entries; ``f`` is
    differentiable (a gradient reaching it joins ∂L/∂f)."""
    return _ops().jumprelu_sae_dense(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                     straight_through)


def topk_sae(x, W_enc, b_enc, W_dec, b_dec, k: int, apply_b_dec_to_input=True):
    """Fused sparse TopK SAE forward; returns ``(x_hat, values [B, k], indices [B, k], l0, fired)``."""
    return _ops().topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)


def batchtopk_sae(x, W_enc, b_enc, W_dec, b_dec, k: int, apply_b_dec_to_input=True, bound_hint: float = 0.0):
    """Fused sparse BatchTopK SAE forward: ``(x_hat, l0, fired, row_ptr, cols, values, min_kept)`` — the CSR of
    the batch's ``B·k`` largest relu'd pre-activations; ``min_kept`` is ``[1]`` (``[0]`` when none is > 0).
    ``bound_hint``: a guess below the batch's ``B·k``-th value that the scan starts from (speed only; the selection
    is exact whatever it is, recomputed from 0 when fewer than ``B·k`` entries lie above it)."""
    return _ops().batchtopk_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, float(bound_hint))


def relu_sae(x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input=False):
    """Fused sparse ReLU SAE forward: ``(x_hat, sparsity, l0, fired, row_ptr, cols, values)``, with
    ``sparsity_b = Σ_j f_bj · latent_weight_j`` differentiable (also in ``latent_weight``)."""
    return _ops().relu_sae(x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input)


def relu_sae_dense(x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input=False):
    """The dense ReLU step: ``(x_hat, sparsity, l0, fired, entries, f)``."""
    return _ops().relu_sae_dense(x, W_enc, b_enc, W_dec, b_dec, latent_weight, apply_b_dec_to_input)


def gated_sae(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input=True):
    """Fused sparse Gated SAE forward: ``(x_hat, x_hat_frozen, sparsity, l0, fired, row_ptr, cols, values,
    gate_values)`` over the open gates; ``x_hat_frozen`` decodes ``relu(π_gate)`` through the detached decoder."""
    return _ops().gated_sae(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input)


def gated_sae_dense(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input=True):
    """The dense Gated step: ``(x_hat, x_hat_frozen, sparsity, l0, fired, entries, f, gate)``."""
    return _ops().gated_sae_dense(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input)


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _fusable(x: Tensor, *params: Tensor) -> bool:
    """The fused ops need one compute dtype and no gradient for ``x`` (training never asks for one)."""
    return (x.dtype in _FUSED_DTYPES and not x.requires_grad and x.dim() == 2
            and all(p.dtype == x.dtype for p in params))


def _aux_loss(x_hat_frozen: Tensor, x: Tensor) -> Tensor:
    """Gated's frozen-decoder reconstruction term ``mean_b ‖x - x̂_frozen‖²`` (reference.gated_sae_forward)."""
    return (x_hat_frozen - x).pow(2).sum(-1).mean()


class CppBackend(Backend):
    """Compiled C++ (OpenMP) kernels for CPU tensors; everything else falls back to the reference.

    Training steps run the sparse kernels or the dense ones, step by step, from the previous step's density
    (``Backend.density``, crossovers in ``fastsae.dispatch.CROSSOVERS``): the same math either way.
    """

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

    # -- training steps ---------------------------------------------------------------------
    def jumprelu_sae(self, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                     ste_to_input=False, need_values=False):
        if not _fusable(x, W_enc, b_enc, W_dec, b_dec):
            return super().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                        ste_to_input, need_values)
        args = (x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, bool(apply_b_dec_to_input), bool(ste_to_input))
        if self.density.sparse("jumprelu", W_enc):
            # the code at the CSR entries (active ∪ window; 0 at window-only ones), a layout of SAEForward's
            x_hat, l0, fired, _, cols, values, _ = jumprelu_sae(*args)
            entries, indices = cols.shape[0], cols
        else:
            x_hat, l0, fired, entries, _, values = jumprelu_sae_dense(*args)
            indices = None  # the dense code
        self.density.record(W_enc, entries, x.shape[0])
        if not need_values:
            return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired)
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, values=values, indices=indices)

    #: the next step's BatchTopK scan starts from this fraction of the previous step's smallest kept value (the
    #: batch's B·k-th moves by a few % from step to step; a guess above it only costs that step a second pass)
    BATCH_BOUND_FRACTION = 0.8

    def kept_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, per_row):
        if not _fusable(x, W_enc, b_enc, W_dec, b_dec) or \
                not self.density.sparse_at("topk" if per_row else "batchtopk", W_enc, k):
            return None
        if per_row:
            x_hat, values, indices, l0, fired = topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, bool(apply_b_dec_to_input))
            return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, values=values, indices=indices)
        # Keyed by the encoder weight like the density record; a hint never changes the result, so it is not saved.
        bounds = self.__dict__.setdefault("_batch_bounds", WeakIdKeyDictionary())
        traced = torch.compiler.is_compiling()
        hint = 0.0 if traced else bounds.get(W_enc, 0.0)
        x_hat, l0, fired, row_ptr, cols, values, min_kept = batchtopk_sae(x, W_enc, b_enc, W_dec, b_dec, k,
                                                                          bool(apply_b_dec_to_input), hint)
        if not traced:
            bounds[W_enc] = self.BATCH_BOUND_FRACTION * float(min_kept[0]) if min_kept.numel() else 0.0
        rows = torch.repeat_interleave(torch.arange(x.shape[0]), row_ptr.diff(), output_size=cols.shape[0])
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, values=values, indices=cols, rows=rows,
                              min_kept=min_kept[0] if min_kept.numel() else None)

    def relu_sae(self, x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input):
        if not _fusable(x, W_enc, b_enc, W_dec, b_dec):
            return super().relu_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input)
        # The L1 weights are the decoder row norms; autograd carries their gradient back to W_dec.
        args = (x, W_enc, b_enc, W_dec, b_dec, W_dec.norm(dim=1), bool(apply_b_dec_to_input))
        if self.density.sparse("relu", W_enc):
            x_hat, sparsity, l0, fired, _, cols, _ = relu_sae(*args)
            entries = cols.shape[0]
        else:
            x_hat, sparsity, l0, fired, entries, _ = relu_sae_dense(*args)
        self.density.record(W_enc, entries, x.shape[0])
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, sparsity=sparsity)

    def gated_sae(self, x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input):
        if not _fusable(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec):
            return super().gated_sae(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input)
        args = (x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, bool(apply_b_dec_to_input))
        if self.density.sparse("gated", W_enc):
            x_hat, x_hat_frozen, sparsity, l0, fired, _, cols, _, _ = gated_sae(*args)
            entries = cols.shape[0]
        else:
            x_hat, x_hat_frozen, sparsity, l0, fired, entries, _, _ = gated_sae_dense(*args)
        self.density.record(W_enc, entries, x.shape[0])
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, sparsity=sparsity, aux=_aux_loss(x_hat_frozen, x))

    # -- inference --------------------------------------------------------------------------
    def _encode(self, enc, x, W_dec, dense):
        """The fused encoder's ``(values, indices, x_hat)``, or None where it cannot run (autograd, dtypes)."""
        tensors = [x, enc.W_enc, enc.b_enc, enc.b_dec] + [t for t in (enc.r_mag, enc.b_mag, W_dec) if t is not None]
        if enc.needs_grad(x) or (W_dec is not None and torch.is_grad_enabled() and W_dec.requires_grad):
            return None
        if not _fusable(x, *tensors[1:]) or enc.kind not in ("threshold", "gated", "topk", "batchtopk"):
            return None
        ops, apply = _ops(), bool(enc.apply_b_dec_to_input)
        if enc.kind == "threshold":
            return ops.threshold_encode(x, enc.W_enc, enc.b_enc, enc.b_dec, enc.threshold, apply, W_dec, dense)
        if enc.kind == "gated":
            return ops.gated_encode(x, enc.W_enc, enc.b_enc, enc.r_mag, enc.b_mag, enc.b_dec, apply, W_dec, dense)
        op = ops.topk_encode if enc.kind == "topk" else ops.batchtopk_encode
        return op(x, enc.W_enc, enc.b_enc, enc.b_dec, enc.k, apply, W_dec, dense)

    def encode(self, enc, x):
        out = self._encode(enc, x, None, True)
        return super().encode(enc, x) if out is None else out[0]

    def encode_sparse(self, enc, x):
        out = self._encode(enc, x, None, False)
        return super().encode_sparse(enc, x) if out is None else (out[0], out[1])

    def reconstruct(self, enc, x, W_dec):
        out = self._encode(enc, x, W_dec, False)
        return super().reconstruct(enc, x, W_dec) if out is None else out[2]
