"""Synthetic activations with a known dictionary, and the metrics that say how well an SAE found it.

:func:`synthetic` draws samples ``x = μ + Σ_j c_j · d_j + noise`` from a dictionary of unit directions
``d_j`` (``n_features > d_in`` puts them in superposition). With its default arguments it is the clean toy
problem (equal frequencies, uniform magnitudes, no offset). Real activations are harder in ways that break
SAE recipes tuned on that toy, so each of these can be switched on (:func:`realistic` switches on all of
them; SAELens's SynthSAEBench is the model):

- ``mean_offset``: a shared offset ``μ`` (a random direction) whose norm is this multiple of the RMS norm of
  the centred signal. A residual stream's mean is often larger than its variation; after the dataset-wide
  scaling to ``E‖x‖² = 1`` (the JumpReLU paper's; fastsae centres first) the features become small next to it, and an encoder that does not remove the
  mean sees it in every pre-activation.
- ``frequency_decay``: feature ``j`` fires with probability ``∝ (j + 1) ** -frequency_decay`` (Zipf-like).
- ``magnitude_tail``: magnitudes are log-normal with this σ around each feature's own typical size (drawn
  from ``magnitude``), so a few activations are many times the typical one.
- ``correlation``: firing is correlated through a low-rank Gaussian copula (a few shared factors with
  this loading), so features co-occur rather than fire independently.
- ``hierarchy``: this fraction of the features are children of a more frequent parent feature: a child
  fires only together with its parent, and the children of one parent exclude each other.
- ``noise``: isotropic Gaussian noise, standard deviation relative to the RMS norm of the centred signal
  per dimension.

:meth:`SyntheticData.evaluate` scores an SAE against the truth: ``recovery`` (true features matched by a
decoder row at cosine > 0.9), ``mcc`` (mean cosine of the optimal one-to-one matching), ``uniqueness``,
firing ``precision``/``recall``/``f1`` of each feature's matched latent, ``shrinkage``, plus held-out
``fvu``, ``l0`` and ``dead`` (see :func:`match_metrics` for the definitions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["SyntheticData", "synthetic", "realistic", "feature_recovery", "match_metrics", "REALISTIC"]

_CHUNK = 16384


def _generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a tuple of small integers (the same rule as fastsae.data)."""
    h = int(seed) & 0xFFFFFFFF
    for s in salt:
        h = (h * 1_000_003 + int(s) + 1) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)


def feature_recovery(W_dec: Tensor, features: Tensor, threshold: float = 0.9) -> float:
    """Fraction of true ``features [n_features, d_in]`` whose best-matching decoder row
    (``W_dec [d_sae, d_in]``) has cosine similarity above ``threshold``."""
    return float((_cosines(W_dec, features).max(dim=1).values > threshold).float().mean())


def _cosines(W_dec: Tensor, features: Tensor) -> Tensor:
    """``[n_features, d_sae]`` cosines between true features and decoder rows."""
    D = torch.nn.functional.normalize(features.detach().float(), dim=1)
    W = torch.nn.functional.normalize(W_dec.detach().float().to(D.device), dim=1)
    return D @ W.t()


@dataclass
class _Hierarchy:
    """``parent[j]`` is feature j's parent (-1 for none); ``share[j]`` the probability that j is the child
    chosen when its parent fires (children of one parent exclude each other)."""

    parent: Tensor  # [n_features] int64
    share: Tensor  # [n_features] float32


@dataclass
class SyntheticData:
    """Samples from a known sparse dictionary (see the module docstring).

    x:           ``[n, d_in]`` float32 samples.
    features:    ``[n_features, d_in]`` the true dictionary (unit rows).
    probabilities: ``[n_features]`` each feature's marginal firing probability.
    mean:        ``[d_in]`` the shared offset μ (zeros when ``mean_offset = 0``).
    The other fields are the generator's settings, so :meth:`sample` draws more data from the same model.
    """

    x: Tensor
    features: Tensor
    probabilities: Tensor
    magnitude: tuple[float, float]
    noise: float
    seed: int
    mean: Optional[Tensor] = None
    typical_magnitude: Optional[Tensor] = None  # [n_features]: the median magnitude of each feature
    magnitude_tail: float = 0.0
    correlation: float = 0.0
    loadings: Optional[Tensor] = None  # [n_features, rank] copula factor loadings
    hierarchy: Optional[_Hierarchy] = None
    noise_std: float = 0.0  # absolute per-dimension noise standard deviation
    settings: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def d_in(self) -> int:
        return self.features.shape[1]

    @property
    def true_l0(self) -> float:
        """Mean number of active features per sample."""
        return float(self.probabilities.double().sum())

    def sample(self, n: int, seed: int, *, return_codes: bool = False):
        """``n`` fresh samples from the same model (e.g. a held-out set); with ``return_codes`` also the
        ``[n, n_features]`` true coefficients."""
        x, codes = _draw(self, n, _generator(seed, 7), keep_codes=return_codes)
        return (x, codes) if return_codes else x

    def recovery(self, W_dec: Tensor, threshold: float = 0.9) -> float:
        """Fraction of true features matched by some decoder row at cosine > ``threshold``."""
        return feature_recovery(W_dec, self.features, threshold)

    @torch.no_grad()
    def evaluate(self, sae, n: int = 16384, seed: int = 12345, batch_size: int = 4096) -> dict:
        """Every ground-truth metric of ``sae`` (which works on raw samples) on ``n`` fresh samples:
        recovery, mcc, uniqueness, precision, recall, f1, shrinkage (:func:`match_metrics`) and fvu, l0, dead."""
        x, codes = self.sample(n, seed, return_codes=True)
        fired = []
        x_hat = []
        was_training = sae.training
        sae.eval()
        for a in range(0, n, batch_size):
            xb = x[a:a + batch_size].to(sae.device)
            f = sae.encode(xb)
            fired.append((f != 0).cpu())
            x_hat.append(sae.decode(f).float().cpu())
        sae.train(was_training)
        fired_t, x_hat_t = torch.cat(fired), torch.cat(x_hat)
        out = match_metrics(sae.W_dec, self.features, fired_t, codes > 0)
        mu = x.double().mean(0)
        err = (x_hat_t.double() - x.double()).pow(2).sum()
        centred = (x.double() - mu)
        out.update(fvu=float(err / centred.pow(2).sum()), l0=float(fired_t.sum(1).float().mean()),
                   dead=float((~fired_t.any(0)).float().mean()),
                   shrinkage=float(((x_hat_t.double() - mu).norm(dim=1) / centred.norm(dim=1).clamp_min(1e-12)).mean()))
        return out


def match_metrics(W_dec: Tensor, features: Tensor, fired: Optional[Tensor] = None, active: Optional[Tensor] = None,
                  threshold: float = 0.9) -> dict:
    """How well decoder rows ``W_dec [d_sae, d_in]`` match true ``features [n_features, d_in]``.

    - ``recovery``: fraction of features whose best decoder row has cosine > ``threshold``.
    - ``mcc``: mean cosine over the optimal one-to-one matching of features to latents (Hungarian algorithm
      on cosines; SynthSAEBench's "MCC"). 1 means every feature has its own exact latent.
    - ``uniqueness``: among latents whose best feature matches at cosine > ``threshold``, the fraction of
      distinct features they point at (1: no two latents on one feature).
    - ``precision``/``recall``/``f1`` (with ``fired [N, d_sae]`` and ``active [N, n_features]`` bool): for each
      feature and its matched latent, P(feature active | latent fires) and P(latent fires | feature active),
      averaged over features (0 where undefined); f1 is the mean of the per-feature F1 scores.
    """
    cos = _cosines(W_dec, features)  # [F, L]
    out = dict(recovery=float((cos.max(1).values > threshold).float().mean()))
    rows, cols = _assignment(cos)
    out["mcc"] = float(cos[rows, cols].sum() / features.shape[0])
    best_cos, best_feature = cos.max(0)  # per latent
    good = best_cos > threshold
    out["uniqueness"] = float(best_feature[good].unique().numel() / max(int(good.sum()), 1))
    if fired is not None and active is not None:
        f = fired[:, cols].float()  # [N, F'] the matched latent of each matched feature
        a = active[:, rows].float()
        tp = (f * a).sum(0)
        prec = torch.where(f.sum(0) > 0, tp / f.sum(0).clamp_min(1), torch.zeros_like(tp))
        rec = torch.where(a.sum(0) > 0, tp / a.sum(0).clamp_min(1), torch.zeros_like(tp))
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-12), torch.zeros_like(tp))
        n = features.shape[0]
        out.update(precision=float(prec.sum() / n), recall=float(rec.sum() / n), f1=float(f1.sum() / n))
    return out


def _assignment(cos: Tensor) -> tuple[Tensor, Tensor]:
    """The one-to-one matching of rows to columns that maximises the summed cosine."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy is in the dev and bench extras
        raise ImportError("the matching metrics (mcc, precision/recall/f1) need scipy: pip install scipy") from e
    r, c = linear_sum_assignment(cos.double().numpy(), maximize=True)
    return torch.as_tensor(r, dtype=torch.long), torch.as_tensor(c, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------


def _draw(s: SyntheticData, n: int, gen: torch.Generator, keep_codes: bool = False):
    F, d = s.features.shape
    out = torch.empty(n, d)
    codes = torch.zeros(n, F) if keep_codes else None
    std_normal = torch.distributions.Normal(0.0, 1.0)
    if s.correlation > 0:
        # Gaussian copula: feature j fires when z_j > τ_j with z = L·g + sqrt(1 - |L_j|²)·e, so each marginal
        # stays p_j while features sharing a factor co-occur.
        tau = std_normal.icdf((1 - s.probabilities.double()).clamp(1e-12, 1 - 1e-12)).float()
        idio = (1 - s.loadings.pow(2).sum(1)).clamp_min(0).sqrt()
    h = s.hierarchy
    for a in range(0, n, _CHUNK):  # chunked: the [rows, n_features] codes never exist for all rows at once
        b = min(n, a + _CHUNK)
        m = b - a
        if s.correlation > 0:
            z = torch.randn(m, s.loadings.shape[1], generator=gen) @ s.loadings.t()
            z += idio * torch.randn(m, F, generator=gen)
            fires = z > tau
        else:
            fires = torch.rand(m, F, generator=gen) < _base_probabilities(s)
        if h is not None:
            fires = _apply_hierarchy(fires, h, gen)
        u = torch.rand(m, F, generator=gen)
        if s.magnitude_tail > 0:
            mags = s.typical_magnitude * torch.exp(s.magnitude_tail * torch.randn(m, F, generator=gen))
        else:
            lo, hi = s.magnitude
            mags = lo + (hi - lo) * u
        c = fires * mags
        out[a:b] = c @ s.features
        if keep_codes:
            codes[a:b] = c
        if s.noise_std:
            out[a:b] += s.noise_std * torch.randn(m, d, generator=gen)
    if s.mean is not None:
        out += s.mean
    return out, codes


def _base_probabilities(s: SyntheticData) -> Tensor:
    """Per-feature Bernoulli probabilities before the hierarchy gates children by their parents."""
    if s.hierarchy is None:
        return s.probabilities
    # a child's marginal is p_parent · share; it is drawn through the parent, so its own base rate is 0
    return torch.where(s.hierarchy.parent >= 0, torch.zeros_like(s.probabilities), s.probabilities)


def _apply_hierarchy(fires: Tensor, h: _Hierarchy, gen: torch.Generator) -> Tensor:
    """Children fire only with their parent, at most one child per parent (they exclude each other)."""
    child = (h.parent >= 0).nonzero().squeeze(1)
    if child.numel() == 0:
        return fires
    parents = h.parent[child]
    # One uniform per (row, parent) picks which child (if any) fires: child j owns the interval
    # [start_j, start_j + share_j) of its parent's unit interval, so siblings never fire together.
    order = torch.argsort(parents, stable=True)
    child, parents = child[order], parents[order]
    shares = h.share[child]
    start = torch.zeros_like(shares)
    for i in range(1, child.numel()):  # children are few (a fraction of the features); a scan is enough
        if parents[i] == parents[i - 1]:
            start[i] = start[i - 1] + shares[i - 1]
    u = torch.rand(fires.shape[0], fires.shape[1], generator=gen)[:, parents]
    picked = (u >= start) & (u < start + shares)
    fires = fires.clone()
    fires[:, child] = fires[:, parents] & picked
    return fires


def _check_fraction(name: str, v: float, hi: float = 1.0) -> float:
    v = float(v)
    if not 0.0 <= v <= hi or math.isnan(v):
        raise ValueError(f"{name} must lie in [0, {hi}], got {v}")
    return v


def synthetic(
    n: int,
    d_in: int,
    n_features: int,
    *,
    active: float = 4.0,
    magnitude: tuple[float, float] = (0.5, 1.5),
    frequency_decay: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    mean_offset: float = 0.0,
    magnitude_tail: float = 0.0,
    correlation: float = 0.0,
    hierarchy: float = 0.0,
) -> SyntheticData:
    """Synthetic activations with a known dictionary (see the module docstring for each knob).

    Args:
        n: number of samples. d_in: dimension. n_features: size of the true dictionary (random unit
            directions; ``n_features > d_in`` puts them in superposition).
        active: mean number of active features per sample.
        magnitude: ``(lo, hi)``: an active feature's coefficient is uniform in ``[lo, hi]``; with
            ``magnitude_tail > 0`` each feature's typical (median) size is drawn from that range instead and
            its coefficients are log-normal around it with σ = ``magnitude_tail``.
        frequency_decay: feature ``j`` fires with probability ``∝ (j + 1) ** -frequency_decay``.
        noise: standard deviation of isotropic Gaussian noise, relative to the per-dimension RMS of the signal.
        mean_offset: norm of a shared offset, relative to the RMS norm of the centred signal.
        correlation: loading of the shared copula factors in ``[0, 0.9]`` (0: independent firing).
        hierarchy: fraction of features in ``[0, 0.5]`` that are children of a more frequent parent.
    Returns a :class:`SyntheticData` (``.x``, ``.features``, ``.sample(n, seed)``, ``.evaluate(sae)``).
    """
    for name, v in (("n", n), ("d_in", d_in), ("n_features", n_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0 < active <= n_features:
        raise ValueError(f"active must lie in (0, n_features={n_features}], got {active}")
    lo, hi = float(magnitude[0]), float(magnitude[1])
    if not 0 <= lo <= hi or hi == 0:
        raise ValueError(f"magnitude must be (lo, hi) with 0 <= lo <= hi and hi > 0, got {magnitude}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if mean_offset < 0:
        raise ValueError(f"mean_offset must be >= 0, got {mean_offset}")
    magnitude_tail = _check_fraction("magnitude_tail", magnitude_tail, 2.0)
    correlation = _check_fraction("correlation", correlation, 0.9)
    hierarchy = _check_fraction("hierarchy", hierarchy, 0.5)
    settings = dict(active=active, magnitude=(lo, hi), frequency_decay=frequency_decay, noise=noise,
                    mean_offset=mean_offset, magnitude_tail=magnitude_tail, correlation=correlation,
                    hierarchy=hierarchy)

    gen = _generator(seed, 0)
    features = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=gen), dim=1)
    weights = (torch.arange(n_features, dtype=torch.float64) + 1) ** -float(frequency_decay)
    probabilities = (weights / weights.sum() * active).clamp(max=1.0).float()
    structure = _generator(seed, 1)  # everything below draws from its own stream: the clean problem is unchanged
    typical = lo + (hi - lo) * torch.rand(n_features, generator=structure)
    loadings = None
    if correlation > 0:
        rank = max(1, n_features // 64)
        member = torch.randint(0, rank, (n_features,), generator=structure)
        loadings = torch.zeros(n_features, rank)
        loadings[torch.arange(n_features), member] = correlation
    tree = _make_hierarchy(probabilities, hierarchy, structure) if hierarchy > 0 else None
    if tree is not None:
        probabilities = torch.where(tree.parent >= 0, probabilities[tree.parent.clamp_min(0)] * tree.share,
                                    probabilities)
    s = SyntheticData(x=torch.empty(0, d_in), features=features, probabilities=probabilities, magnitude=(lo, hi),
                      noise=float(noise), seed=seed, typical_magnitude=typical, magnitude_tail=magnitude_tail,
                      correlation=correlation, loadings=loadings, hierarchy=tree, settings=settings)
    if noise or mean_offset:
        # Scales relative to the signal: measure its RMS on a small draw of the noiseless, centred model.
        probe, _ = _draw(s, 4096, _generator(seed, 2))
        rms = float(probe.pow(2).sum(1).mean().sqrt())
        s.noise_std = float(noise) * rms / math.sqrt(d_in)
        if mean_offset:
            direction = torch.nn.functional.normalize(torch.randn(d_in, generator=structure), dim=0)
            s.mean = direction * (mean_offset * rms)
    s.x, _ = _draw(s, n, gen)
    return s


def _make_hierarchy(probabilities: Tensor, fraction: float, gen: torch.Generator) -> _Hierarchy:
    """The rarest ``fraction`` of features become children of random parents among the most frequent
    features (about 3 children per parent); the children's shares of a parent sum to 0.9, so a parent also
    fires alone."""
    F = probabilities.shape[0]
    n_child = int(round(fraction * F))
    parent = torch.full((F,), -1, dtype=torch.long)
    share = torch.zeros(F)
    if n_child == 0:
        return _Hierarchy(parent, share)
    order = torch.argsort(probabilities, descending=True)
    children = order[F - n_child:]
    n_parents = max(1, n_child // 3)
    parents = order[:n_parents]
    assign = parents[torch.randint(0, n_parents, (n_child,), generator=gen)]
    parent[children] = assign
    raw = 0.5 + torch.rand(n_child, generator=gen)
    totals = torch.zeros(F).index_add_(0, assign, raw)
    share[children] = 0.9 * raw / totals[assign]
    return _Hierarchy(parent, share)


#: the structure of real activations, for :func:`realistic` and the quality benchmark
REALISTIC = dict(frequency_decay=0.5, mean_offset=3.0, magnitude_tail=0.5, correlation=0.3, hierarchy=0.2,
                 noise=0.05)


def realistic(n: int, d_in: int = 128, n_features: int = 1024, *, active: float = 4.0, seed: int = 0,
              **overrides) -> SyntheticData:
    """:func:`synthetic` with the structure of real activations switched on (:data:`REALISTIC`: a mean offset
    3× the signal, Zipf-like frequencies, log-normal magnitudes, correlated and hierarchical features, 5% noise).
    Keyword ``overrides`` change single knobs."""
    return synthetic(n, d_in, n_features, active=active, seed=seed, **dict(REALISTIC, **overrides))
