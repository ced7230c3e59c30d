"""The functional API: each op checks its arguments, then runs on the backend ``backends.get`` picks."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from . import _checks as check
from .dispatch import check_name, get as get_backend


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: Union[float, Tensor] = 1e-3, backend: str = "auto") -> Tensor:
    """JumpReLU ``pre · H(pre - θ)``.

    Args:
        pre: ``[..., d_sae]`` float pre-activations.
        threshold: ``[d_sae]`` float θ (kept in its own dtype; float32 is recommended).
        bandwidth: ε, a positive float or a per-latent ``[d_sae]`` tensor.
    Returns:
        ``[..., d_sae]`` in ``pre``'s dtype. Backward: ``∂f/∂pre = H(pre - θ)``,
        ``∂f/∂θ = -(θ/ε) K((pre - θ)/ε)`` with the rectangle kernel ``K``.
    """
    pre, threshold, bw = _elementwise_args(pre, threshold, bandwidth, backend)
    return get_backend(backend, pre.device).jumprelu(pre, threshold, bw)


def step(pre: Tensor, threshold: Tensor, bandwidth: Union[float, Tensor] = 1e-3, backend: str = "auto") -> Tensor:
    """Heaviside ``H(pre - θ)`` in ``pre``'s dtype; gradient only to θ: ``-(1/ε) K((pre - θ)/ε)``."""
    pre, threshold, bw = _elementwise_args(pre, threshold, bandwidth, backend)
    return get_backend(backend, pre.device).step(pre, threshold, bw)


def topk(pre: Tensor, k: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``pre [..., d_sae]``, sorted descending.

    Returns ``(values [..., k] float, indices [..., k] int64)``; gradients flow to ``pre`` at the kept entries.
    """
    check_name(backend)
    check.float_tensor("pre", pre)
    if pre.dim() == 0:
        raise ValueError("pre must be at least 1-D [..., d_sae], got a scalar")
    check.k_in_range("k", k, pre.shape[-1])
    return get_backend(backend, pre.device).topk(pre, k)


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None, backend: str = "auto"
) -> Tensor:
    """``x̂[b] = Σ_j values[b, j] · W_dec[indices[b, j]] (+ b_dec)``.

    Args:
        values: ``[..., k]`` float.  indices: ``[..., k]`` integer, each in ``[0, d_sae)``.
        W_dec: ``[d_sae, d_in]`` float.  b_dec: optional ``[d_in]`` float.
    Returns:
        ``[..., d_in]``. Differentiable in ``values``, ``W_dec`` and ``b_dec``.
    """
    check_name(backend)
    check.float_tensor("values", values)
    check.float_tensor("W_dec", W_dec)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [d_sae, d_in], got shape {tuple(W_dec.shape)}")
    if values.dim() == 0:
        raise ValueError("values must be at least 1-D [..., k], got a scalar")
    check.same_device(values=values, indices=indices, W_dec=W_dec, b_dec=b_dec)
    if not hasattr(indices, "shape") or tuple(indices.shape) != tuple(values.shape):
        got = tuple(indices.shape) if hasattr(indices, "shape") else type(indices).__name__
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {got}")
    indices = check.indices_in_range("indices", indices, W_dec.shape[0])
    if b_dec is not None:
        check.float_tensor("b_dec", b_dec)
        if b_dec.shape != (W_dec.shape[1],):
            raise ValueError(f"b_dec must have shape [d_in]=[{W_dec.shape[1]}], got {tuple(b_dec.shape)}")
    dtype = W_dec.dtype
    values = values.to(dtype)
    b_dec = None if b_dec is None else b_dec.to(dtype)
    return get_backend(backend, values.device).sparse_decode(values, indices, W_dec, b_dec)


def _elementwise_args(pre, threshold, bandwidth, backend):
    check_name(backend)
    check.float_tensor("pre", pre)
    if pre.dim() == 0:
        raise ValueError("pre must be at least 1-D [..., d_sae], got a scalar")
    d_sae = pre.shape[-1]
    check.latent_vector("threshold", threshold, d_sae)
    check.same_device(pre=pre, threshold=threshold, bandwidth=bandwidth)
    return pre, threshold, check.bandwidth(bandwidth, d_sae, threshold)
