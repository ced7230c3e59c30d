"""Per-latent adaptive bandwidth for JumpReLU SAEs (``JumpReLUSAE(bandwidth="adaptive")``).

Why a bandwidth at all
----------------------
JumpReLU's threshold θ_j only learns through the rectangle-kernel pseudo-derivatives (DESIGN.md §1): a
batch contributes to ``grad θ_j`` only through its *kernel hits*, the entries with
``|pre_bj - θ_j| < ε_j / 2``. Per training batch of ``B`` rows, latent ``j`` gets on average

    hits_j = B · p_j(θ_j) · ε_j

hits, where ``p_j`` is the density of latent j's pre-activations at its threshold. The θ-gradient is a
kernel estimate of ``λ p_j(θ_j) - θ_j E[-∂L/∂f | pre = θ_j] p_j(θ_j)``: its relative noise is about
``1/sqrt(hits_j)``, and its bias grows with ``ε_j`` relative to the scale on which ``p_j`` changes.

- One ε for all latents cannot be right: densities at the threshold differ by orders of magnitude
  between latents (dense vs. rare features) and change during training as θ moves into the tail.
  With the paper's ε = 0.001, most latents get ``hits ≪ 1``: θ receives a gradient on a few batches
  only, and with Adam a gradient that is zero on most steps moves θ by about ``lr · sqrt(P(hit))`` per
  step, so L0 comes down slowly. With a wide ε (SAELens's 0.05) dense latents average the
  pseudo-gradient over a window wider than the structure of their distribution (bias).
- The quantity that matters for the gradient's noise is the hit count itself. So we choose, per
  latent, ``ε_j`` such that the expected hits per batch stay near a target ``H``:

      ε_j* = H / (B · p̂_j(θ_j))

  and keep ε as narrow as that allows (least bias for the noise level we accept).

Estimating the density at the threshold
---------------------------------------
After each optimizer step (``JumpReLUSAE.observe``), on a strided subsample of at most
``sample_rows`` rows of the batch, we compute ``pre`` under ``no_grad`` (one small GEMM; no kernel has
to change) and count, per latent, the entries in a band of width ``band · ε_j`` around θ_j (open
interval, like the kernel). ``count / (rows · band · ε_j)`` is an unbiased histogram estimate of
``p_j(θ_j)`` smoothed over the band; the band is wider than the window to cut the counting noise by
``sqrt(band)``. An exponential moving average (decay ``decay``, Adam-style bias correction for the
first updates) smooths it over steps. It is a density *per unit of pre*, so averaging estimates made
with different ε over time is consistent.

Safety rails
------------
- Rate limit: one update changes ε_j by at most a factor ``max_factor`` (up or down), so noise in
  the estimate never makes ε jump, and Adam's second-moment estimate of grad θ (which scales as 1/ε)
  can follow.
- No hits: a latent with no pre-activations in the band (rare or dead latent, or ε far too small)
  has estimated density 0, so ε_j* = ∞ and ε_j grows by ``max_factor`` per update until the band
  catches pre-activations — exactly the "θ gets no gradient" case the rule exists for.
- Bounds: ``eps_min ≤ ε_j ≤ eps_max`` (absolute, for inputs scaled to E‖x - E x‖² = 1 by
  ``fastsae.train``), and ``ε_j ≤ max_std_fraction · std_j`` where ``std_j`` is the running standard
  deviation of latent j's pre-activations: a window wider than a good part of the latent's own spread
  no longer estimates a derivative at θ, it averages over the whole distribution.
- ε is a buffer (no gradient) in the threshold's float dtype, so the kernels, save/load and every
  backend see an ordinary per-latent ``[d_sae]`` bandwidth.

Cost: one ``[rows, d_in] @ [d_in, d_sae]`` product and a few elementwise passes per update —
``rows / (5 B)`` of a training step's matmul work (≈ 2.5 % at 512 of 4096), ``every`` reduces it more.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
from torch import Tensor


@dataclass
class AdaptiveBandwidth:
    """Hyper-parameters of the adaptive-bandwidth rule (see the module docstring for the reasoning).

    target_hits: expected kernel hits per latent per training batch that ε aims for.
    eps_init: the bandwidth every latent starts from.
    eps_min, eps_max: absolute bounds on ε (inputs scaled so that E‖x - E x‖² = 1).
    max_std_fraction: ε_j ≤ this × the running std of latent j's pre-activations.
    max_factor: largest multiplicative change of ε_j in one update (> 1).
    decay: EMA decay of the density and moment estimates, in [0, 1).
    band: the density is counted in a band ``band × ε_j`` wide around θ_j (≥ 1).
    sample_rows: rows of the batch used per update (a strided subsample).
    every: update every ``every`` optimizer steps.
    """

    target_hits: float = 16.0
    eps_init: float = 1e-2
    eps_min: float = 1e-4
    eps_max: float = 0.1
    max_std_fraction: float = 0.5
    max_factor: float = 1.1
    decay: float = 0.95
    band: float = 4.0
    sample_rows: int = 512
    every: int = 1

    def __post_init__(self):
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"adaptive bandwidth: {name} must be a finite number > 0, got {v!r}")

        for name in ("target_hits", "eps_init", "eps_min", "eps_max", "max_std_fraction"):
            positive(name)
        if not self.eps_min <= self.eps_init <= self.eps_max:
            raise ValueError(
                f"adaptive bandwidth: need eps_min <= eps_init <= eps_max, got {self.eps_min}, {self.eps_init}, "
                f"{self.eps_max}"
            )
        if not (isinstance(self.max_factor, (int, float)) and self.max_factor > 1 and math.isfinite(self.max_factor)):
            raise ValueError(f"adaptive bandwidth: max_factor must be a finite number > 1, got {self.max_factor!r}")
        if not (isinstance(self.decay, (int, float)) and 0 <= self.decay < 1):
            raise ValueError(f"adaptive bandwidth: decay must lie in [0, 1), got {self.decay!r}")
        if not (isinstance(self.band, (int, float)) and self.band >= 1 and math.isfinite(self.band)):
            raise ValueError(f"adaptive bandwidth: band must be a finite number >= 1, got {self.band!r}")
        for name in ("sample_rows", "every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"adaptive bandwidth: {name} must be a positive int, got {v!r}")

    @classmethod
    def from_config(cls, options: Optional[dict]) -> "AdaptiveBandwidth":
        """Build from a (JSON) dict of options; unknown keys are an error naming them."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"adaptive bandwidth: unknown options {unknown}; expected some of {sorted(known)}")
        return cls(**options)

    def config(self) -> dict:
        return asdict(self)


STATE = ("density", "mean", "sq", "steps")


def new_state(d_sae: int, dtype: torch.dtype, device=None) -> dict[str, Tensor]:
    """Zeroed running statistics for ``d_sae`` latents (the module registers them as buffers).

    density: EMA of the estimated density of pre at θ; mean, sq: EMAs of pre's first and second moments
    (for the std cap); steps: updates so far (for the EMA's bias correction). All are un-corrected EMAs.
    """
    z = dict(dtype=dtype, device=device)
    return dict(density=torch.zeros(d_sae, **z), mean=torch.zeros(d_sae, **z), sq=torch.zeros(d_sae, **z),
                steps=torch.zeros((), dtype=torch.int64, device=device))


def band_density(pre: Tensor, threshold: Tensor, width: Tensor) -> Tensor:
    """Histogram estimate of each latent's pre-activation density at its threshold.

    ``pre [n, d_sae]``, ``threshold [d_sae]``, ``width [d_sae] > 0`` -> ``[d_sae]``:
    ``#{b : |pre_bj - θ_j| < width_j / 2} / (n · width_j)`` (open interval, as the rectangle kernel).
    """
    n = pre.shape[0]
    inside = (pre - threshold).abs() < width / 2
    return inside.sum(0).to(width.dtype) / (max(n, 1) * width)


@torch.no_grad()
def update(
    rule: AdaptiveBandwidth,
    bandwidth: Tensor,
    state: dict[str, Tensor],
    pre: Tensor,
    threshold: Tensor,
    batch_size: int,
) -> None:
    """One update of ``bandwidth [d_sae]`` (in place) from a subsample ``pre [n, d_sae]`` of a batch of ``batch_size`` rows.

    ``state`` is the dict of ``new_state`` (updated in place). ``threshold`` is θ (any float dtype).
    """
    if pre.shape[0] == 0:
        return
    dt = bandwidth.dtype
    pre = pre.to(dt)
    theta = threshold.detach().to(dt)
    d = rule.decay
    state["steps"] += 1
    # Adam-style bias correction (unbiased from the first update on); a tensor op, so no device sync.
    correction = 1.0 - torch.pow(torch.tensor(d, dtype=dt, device=bandwidth.device), state["steps"].to(dt))

    dens_now = band_density(pre, theta, rule.band * bandwidth)
    state["density"].mul_(d).add_(dens_now, alpha=1 - d)
    state["mean"].mul_(d).add_(pre.mean(0), alpha=1 - d)
    state["sq"].mul_(d).add_(pre.pow(2).mean(0), alpha=1 - d)
    density = state["density"] / correction
    std = (state["sq"] / correction - (state["mean"] / correction).pow(2)).clamp_min(0).sqrt()

    # ε* = H / (B p̂); p̂ = 0 gives +inf, i.e. "grow as fast as allowed".
    wanted = rule.target_hits / (batch_size * density)
    new = torch.minimum(torch.maximum(wanted, bandwidth / rule.max_factor), bandwidth * rule.max_factor)
    # The std cap is itself rate-limited from above only (a collapsing std may not shrink ε faster than
    # max_factor either), and the absolute bounds always win.
    cap = torch.maximum(rule.max_std_fraction * std, bandwidth / rule.max_factor)
    new = torch.minimum(new, cap).clamp(rule.eps_min, rule.eps_max)
    bandwidth.copy_(new)


def expected_hits(pre: Tensor, threshold: Tensor, bandwidth: Tensor, batch_size: int) -> Tensor:
    """Kernel hits per latent that a batch of ``batch_size`` rows would get, estimated from ``pre [n, d_sae]``."""
    inside = ((pre - threshold) / bandwidth).abs() < 0.5
    return inside.sum(0).to(bandwidth.dtype) * (batch_size / max(pre.shape[0], 1))
