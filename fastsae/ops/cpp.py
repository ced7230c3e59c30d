"""The ``cpp`` backend: Python side of the compiled ``fastsae._C`` CPU kernels.

The C++ side declares each op's schema (csrc/ops.cpp) and registers the CPU kernels. Here each op
gets a typed wrapper, a fake (meta) implementation for ``torch.compile``/``torch.export``, and its
autograd formula, following pytorch/extension-cpp.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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

    @torch.library.register_fake("fastsae::sparse_decode")
    def _sparse_decode_fake(values, indices, W_dec, b_dec):
        torch._check(values.dim() == 2, lambda: "values must be [B, k]")
        torch._check(indices.shape == values.shape, lambda: "indices must have the shape of values")
        torch._check(W_dec.dim() == 2, lambda: "W_dec must be [d_sae, d_in]")
        return values.new_empty((values.shape[0], W_dec.shape[1]))

    def _sparse_decode_setup(ctx, inputs, output):
        values, indices, W_dec, b_dec = inputs
        ctx.has_bias = b_dec is not None
        ctx.save_for_backward(values, indices, W_dec)

    def _sparse_decode_backward(ctx, grad):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # SDDMM: d x_hat[b] / d values[b, j] = W_dec[indices[b, j]] . grad[b]
            grad_values = torch.einsum("bkd,bd->bk", W_dec[indices], grad)
        if ctx.needs_input_grad[2]:
            grad_W = torch.zeros_like(W_dec).index_add_(
                0, indices.reshape(-1), (values.unsqueeze(-1) * grad.unsqueeze(1)).reshape(-1, W_dec.shape[1])
            )
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.sum(0)
        return grad_values, None, grad_W, grad_b

    torch.library.register_autograd(
        "fastsae::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup
    )


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """C++ sparse decode. ``values [B, k] float``, ``indices [B, k] int64``, ``W_dec [d_sae, d_in]`` -> ``[B, d_in]``."""
    return _ops().sparse_decode(values, indices, W_dec, b_dec)


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
