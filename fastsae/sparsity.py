"""Target-L0 control: ask for an L0 instead of tuning the sparsity coefficient λ.

JumpReLU, ReLU and Gated SAEs trade reconstruction against a sparsity penalty weighted by λ, and the L0 a
given λ lands at depends on the data (its scale after normalisation, how much of its energy is a shared
offset, how heavy its tails are) and on the width. With ``target_l0=T`` the module adjusts λ itself during
training, an integral controller on ``log λ``:

    log λ ← log λ + rate · clamp(log(L0_batch / T), -1, 1)        (after every optimizer step)

- Multiplicative in λ and symmetric in L0's ratio to the target: 2× too many active latents raises λ by
  the same factor per step as 2× too few lowers it. λ spans orders of magnitude between data sets, so an
  additive rule would be either too slow for one or unstable for another.
- Integral only (no proportional term): L0 responds to λ with a lag (θ or the encoder must move first), and
  the integral of the error is what removes the steady-state offset that a fixed λ leaves.
- The error is clamped to a factor e either way. A fresh SAE fires on about half its latents, hundreds of
  times the target, and L0 answers a change of λ only after the thresholds (or the encoder) have moved, a few
  hundred steps at Adam's step size: an unclamped integral grows λ by orders of magnitude during that lag
  (measured: 229× the λ it needed), then undershoots the target for most of the run while it unwinds.
- ``rate`` (default 0.005): at most 0.5% change of λ per step, so λ moves by e over the ~200 steps L0 needs to
  respond (no overshoot), and by e^15 over 3,000 steps (any starting λ within that range is found).
- The state (``log λ``) is a buffer of the module, so checkpoints carry it and a resumed run continues the
  same trajectory; it is updated on device, with no host sync.

The controlled λ replaces the training loop's λ warm-up: the controller starts from the module's
``sparsity_coefficient`` and raises it as fast as L0 needs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_target_l0", "update_log_lambda", "LOG_LAMBDA_RANGE", "DEFAULT_RATE"]

DEFAULT_RATE = 0.005
#: log λ is kept inside this range so a long stretch of zero L0 (or of a dense code) cannot wind it up forever
LOG_LAMBDA_RANGE = (math.log(1e-8), math.log(1e4))


def check_target_l0(target_l0, d_sae: int) -> Optional[float]:
    if target_l0 is None:
        return None
    if isinstance(target_l0, bool) or not isinstance(target_l0, (int, float)):
        raise TypeError(f"target_l0 must be a number, got {type(target_l0).__name__}")
    t = float(target_l0)
    if not (0 < t <= d_sae) or math.isnan(t):
        raise ValueError(f"target_l0 must lie in (0, d_sae={d_sae}], got {target_l0}")
    return t


@torch.no_grad()
def update_log_lambda(log_lambda: Tensor, l0: Tensor, target: float, rate: float = DEFAULT_RATE) -> None:
    """One controller step on the ``log λ`` buffer from this batch's mean L0 (a 0-d tensor), in place."""
    error = torch.log(l0.to(log_lambda.dtype).clamp_min(1e-3 * target) / target).clamp(-1.0, 1.0)
    log_lambda.add_(rate * error).clamp_(*LOG_LAMBDA_RANGE)
