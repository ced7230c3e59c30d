"""Evaluation metrics for trained SAEs on held-out activations."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .data import feature_recovery

__all__ = ["evaluate", "feature_recovery"]


@torch.no_grad()
def evaluate(sae, x: Tensor, *, batch_size: int = 8192, dead_after: Optional[int] = None) -> dict:
    """Reconstruction and sparsity of ``sae`` on ``x [N, d_in]`` (raw activations).

    Returns ``mse`` (``mean_b Σ_i (x̂ - x)²``), ``fvu`` (``Σ (x̂ - x)² / Σ (x - mean x)²`` over all of ``x``),
    ``l0`` (mean active latents per row), ``dead`` (fraction of latents that never fired on ``x``) and ``rows``.
    """
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, d_in], got {tuple(x.shape)}")
    x = x.reshape(-1, x.shape[-1])
    was_training = sae.training
    sae.eval()
    sq_err = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)
    mean = x.double().mean(0)
    total = 0.0
    for a in range(0, x.shape[0], batch_size):
        xb = x[a:a + batch_size].to(device=sae.device)
        values, indices = sae.encode_sparse(xb)
        active = values != 0
        l0 += float(active.sum())
        fired[indices[active]] = True
        x_hat = sae.ops(xb.device).sparse_decode(values.to(sae.dtype), indices, sae.W_dec, sae.b_dec)
        sq_err += float((x_hat.double() - xb.double()).pow(2).sum())
        total += float((xb.double() - mean.to(xb.device)).pow(2).sum())
    sae.train(was_training)
    n = x.shape[0]
    return dict(mse=sq_err / n, fvu=sq_err / max(total, 1e-300), l0=l0 / n,
                dead=float((~fired).float().mean()), rows=n)
