"""Defaults from the papers (learning rate, sparsity warm-up, ...), the dataset-wide input scale and its folding
into the weights, and the learning-rate and sparsity-coefficient schedules."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..sae import SAE


# ----------------------------------------------------------------------------------------------
# Defaults from the papers
# ----------------------------------------------------------------------------------------------


def default_hyperparameters(sae: SAE) -> dict:
    """Adam ``lr`` and ``betas`` for ``sae``'s architecture.

    - TopK / BatchTopK (Gao et al. 2024; sparsify): ``lr = 2e-4 / sqrt(d_sae / 2**14)``, β = (0.9, 0.999).
    - JumpReLU (Rajamanoharan et al. 2024): β = (0, 0.999). The paper's 7e-5 is for billions of tokens on
      d_sae ≥ 16k; we use twice the TopK width rule (4e-4 at 16k latents, larger for narrower SAEs): thresholds
      and encoder columns must both cross the pre-activation range within a short run, and on the realistic
      synthetic data (quality benchmark, target L0 = 0.5/1/2× the true L0) 2× raised recovery from 79/84/54% to
      89/85/66% (TopK with its own rule: 80/84/65%); the paper's order of magnitude at 16k-131k latents.
    - Gated (Rajamanoharan et al. 2024): β = (0, 0.999); ReLU (Anthropic's April 2024 update): β = (0.9, 0.999).
    - An architecture's ``default_lr_scale`` multiplies the width rule (ReLU and Gated: 2, measured in
      ``fastsae.sae._L1FamilySAE``).
    """
    lr = 2e-4 / math.sqrt(sae.d_sae / 2**14) * (2.0 if sae.architecture == "jumprelu" else 1.0)
    lr *= float(getattr(sae, "default_lr_scale", 1.0))
    betas = (0.0, 0.999) if sae.architecture in ("jumprelu", "gated") else (0.9, 0.999)
    return dict(lr=lr, betas=betas)


# ----------------------------------------------------------------------------------------------
# Input scale and initialisation
# ----------------------------------------------------------------------------------------------


def estimate_input_scale(sample: Tensor) -> float:
    """The scalar ``s`` with ``mean ‖s·(x - mean x)‖² = 1`` over ``sample [N, d_in]``.

    Centred: what an SAE has to explain is the variation around the mean (``b_dec`` carries the mean), and a
    residual stream's mean is often larger than its variation. With ``E‖s·x‖² = 1`` (the JumpReLU paper's
    convention) a mean offset 3× the signal shrinks every feature ~3× in the scaled space, so sparsity
    coefficients, bandwidths and thresholds tuned on one data set are off by ~10× on the next (measured on
    ``fastsae.data.realistic``: TopK at the true L0 recovered 66% of the features with the uncentred scale, 73%
    with this one). On data without an offset the two agree.
    """
    sample = sample.double()
    if not bool(torch.isfinite(sample).all()):
        raise FloatingPointError("data contains NaN or inf values (found while estimating the input scale)")
    msq = float((sample - sample.mean(0)).pow(2).sum(-1).mean()) if sample.shape[0] > 1 else 0.0
    if msq <= 0:
        msq = float(sample.pow(2).sum(-1).mean())  # one distinct row: no variation to measure, use its norm
    if msq <= 0:
        raise ValueError("data is all zeros: cannot estimate an input scale")
    return 1.0 / math.sqrt(msq)


def geometric_median(points: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points [N, d]``."""
    points = points.double()
    y = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * points).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-6 * y.norm().clamp_min(eps):
            return y_new
        y = y_new
    return y


@torch.no_grad()
def fold_input_scale(sae: SAE, scale: float, target_scale: Optional[float] = None) -> None:
    """Make an SAE trained on ``scale · x`` work on raw ``x``, exactly.

    ``(s·x - b_dec) W_enc = (x - b_dec/s)(s·W_enc)``: pre-activations (hence ``b_enc``, ``threshold``, the
    gates) are unchanged; the reconstruction ``f W_dec + b_dec`` is divided by ``s``. A transcoder trained on
    ``(s·x, t·y)`` (``target_scale`` t): the output is divided by ``t`` and the skip ``W_skip`` scaled by ``s/t``.
    """
    t = scale if target_scale is None else target_scale
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(t)
    sae.b_dec.div_(t)
    if getattr(sae, "W_skip", None) is not None:
        sae.W_skip.mul_(scale / t)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup: int, decay: int) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the last ``decay`` steps.
    ``step`` is 0-based (the step about to be taken)."""
    f = 1.0
    if warmup > 0:
        f = min(f, (step + 1) / warmup)
    if decay > 0:
        f = min(f, (steps - step) / decay)
    return max(f, 0.0)


def sparsity_factor(step: int, warmup: int) -> float:
    """Linear warm-up of the sparsity coefficient from 0 (the JumpReLU paper; SAELens' ``l0_warm_up_steps``)."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
