"""Resampling dead and duplicate latents during training.

Two things waste an SAE's latents in a short run, on every architecture:
- **dead** latents: no input drives them over their threshold (or into the top k) any more, so they get no
  gradient and never come back (AuxK helps TopK only slowly, and only after ``dead_after`` tokens);
- **duplicates**: two latents on one feature. Nothing but competition for a row's k slots separates them, and
  JumpReLU, ReLU and Gated have no such competition: on data with heavy-tailed magnitudes two JumpReLU latents
  split one feature by magnitude, or both fire on it at half size.
Both are latents that could be learning a feature nobody has. Every ``every`` steps during the first part of
training, :class:`Resampler` finds them and re-initialises each one towards an input the SAE reconstructs
badly (the residual of a row drawn with probability ∝ its squared error: Bricken et al. 2023's resampling,
which dictionary learning calls atom replacement):

- dead: fires on none of the probe rows (8,192 rows drawn once from the data: a firing frequency below ~1e-4).
  Measured against "not fired during the whole period" (the loop's tokens-since-fired), this also catches the
  latents that fire now and then on noise and learn nothing: TopK at the true L0 on the realistic data
  recovered 73% of the features with the stricter rule, 77% with this one (small problem, 1M tokens);
- duplicate: fires on the probe rows together with a latent whose decoder row has cosine > ``duplicate_cos``
  with its own, and fires less often than that latent (pairs are looked for only among latents that fire
  together on a row, so the cost is O(rows · L0²), not O(d_sae²));
- the new latent: decoder row = the residual direction (with ``resample_off_active`` on the module, ReLU's: the
  residual minus its least-squares fit by the row's active decoder rows, since an L1 SAE's residual is mostly its
  shrinkage along latents it already has; from 4× as many drawn rows, skipping directions within
  ``duplicate_cos`` of a live decoder row, which are features a live latent missed on that row) at the median
  live decoder norm, encoder column = the
  same direction at a fraction of the median live encoder norm (the architecture's ``resample_encoder_scale``:
  0.2 where firing is decided by a threshold, so the latent starts by fitting the residual rather than at full
  strength; 1 for TopK, whose latents must win a row's top k to get any gradient), bias 0; each architecture
  sets its own extras
  (:meth:`fastsae.sae.SAE.reinit_latents`: e.g. JumpReLU's θ at the quantile that gives the current firing rate);
- Adam's state for those rows is reset: first moment 0, second moment the mean of the live rows', so the first
  updates have the size every other latent's have (a zero second moment would make them ~30× larger).

Measured (``experiments/results/training_quality.md``): on the realistic synthetic data TopK (k = true L0) goes
from 83% to 95% of the true features recovered in the same 3M tokens.

Deterministic: the probe rows are drawn once from the data with the run's seed and the row choice uses a
generator seeded from (seed, step), so a resumed run resamples exactly as the uninterrupted one; under data
parallelism every rank makes the same choice (the probe and the firing statistics are the same on every rank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Resampler", "DEFAULT_DUPLICATE_COS"]

DEFAULT_DUPLICATE_COS = 0.7
#: rows of the probe searched for co-firing duplicate pairs (O(rows · L0²) pairs)
_PAIR_ROWS = 2048
#: at most this many candidate pairs (rows · K²) per search: a fresh JumpReLU fires on half its latents, and
#: 2048 rows · 2048² pairs (d_sae 4096) took ~20 GB, and 2^25 pairs still cost ~11 s of CPU per call at L0 ≈ 360;
#: at trained sparsity (K ≤ 64) all _PAIR_ROWS rows fit
_PAIR_BUDGET = 2**23
#: decoder-row elements gathered at once for the per-row cosines ([rows, K, d_in] per chunk)
_COS_ELEMENTS = 2**24


def _pair_rows(K: int) -> int:
    """Probe rows searched for duplicates when the code has ``K`` entries per row (0: a code this dense has no
    meaningful co-firing, every latent fires with most others)."""
    return min(_PAIR_ROWS, _PAIR_BUDGET // max(K * K, 1))


@dataclass
class Resampler:
    """Resample every ``every`` steps up to step ``until`` on the fixed ``probe [N, d_in]`` (scaled inputs);
    a transcoder's ``target [N, d_out]`` (its scaled targets) is what the residuals are measured against."""

    every: int
    until: int
    probe: Tensor
    seed: int
    duplicate_cos: float = DEFAULT_DUPLICATE_COS
    target: Optional[Tensor] = None

    def due(self, step: int) -> bool:
        """``step`` is the number of steps completed."""
        return self.every > 0 and step % self.every == 0 and step <= self.until

    @torch.no_grad()
    def __call__(self, sae, optimizer, step: int) -> int:
        """Resample the dead and duplicate latents of ``sae`` in place; returns how many."""
        values, indices = sae.encode_sparse(self.probe)
        active = values != 0
        fires = torch.zeros(sae.d_sae, dtype=torch.long, device=values.device)
        fires.index_add_(0, indices[active], torch.ones_like(indices[active]))
        dead = fires == 0
        pv, pi = _typical_rows(values, indices)
        rows = _pair_rows(pi.shape[-1])
        candidates = dead | _duplicates(sae.W_dec, pv[:rows], pi[:rows], fires, self.duplicate_cos)
        idx = candidates.nonzero().squeeze(1)
        if idx.numel() == 0 or bool(candidates.all()):
            return 0
        x_hat = sae.ops(values.device).sparse_decode(values, indices, sae.W_dec, sae.b_dec)
        skip = sae._skip(self.probe) if getattr(sae, "skip_connection", False) else None
        x_hat = x_hat if skip is None else x_hat + skip
        err = ((self.probe if self.target is None else self.target) - x_hat).float()
        weight = err.pow(2).sum(1)
        n = min(idx.numel(), int((weight > 0).sum()))
        if n == 0:
            return 0
        g = torch.Generator(device="cpu").manual_seed(int(self.seed) * 1_000_003 + int(step))
        live = ~candidates
        if getattr(sae, "resample_off_active", False):
            # what the row's active latents cannot explain is often a feature a live latent has but missed on this
            # row: draw spare rows and skip directions that a live decoder row already points along
            m = min(4 * n, int((weight > 0).sum()))
            rows = torch.multinomial(weight.cpu().double(), m, replacement=False, generator=g).to(err.device)
            residual = _off_active(err[rows], values[rows], indices[rows], sae.W_dec)
            W_live = torch.nn.functional.normalize(sae.W_dec.detach()[live].float(), dim=1)
            seen = (torch.nn.functional.normalize(residual, dim=1) @ W_live.t()).abs().amax(1) > self.duplicate_cos
            keep = (~seen).nonzero().squeeze(1)[:n]
            rows, residual, n = rows[keep], residual[keep], keep.numel()
            if n == 0:
                return 0
        else:
            rows = torch.multinomial(weight.cpu().double(), n, replacement=False, generator=g).to(err.device)
            residual = err[rows]
        idx = idx[:n]
        directions = torch.nn.functional.normalize(residual, dim=1).to(sae.dtype)
        # an SAE's new encoder column reads the residual direction; a transcoder's residual lives in the output
        # space, so its encoder reads the chosen rows' inputs (centred: what tells them apart from the others)
        encoder_directions = None
        if self.target is not None:
            centred = (self.probe[rows] - self.probe.mean(0)).float()
            encoder_directions = torch.nn.functional.normalize(centred, dim=1).to(sae.dtype)
        fire_rate = float(fires[live].float().mean()) / self.probe.shape[0]
        sae.reinit_latents(idx, directions, live, self.probe, fire_rate=fire_rate,
                           encoder_directions=encoder_directions)
        _reset_optimizer_rows(sae, optimizer, idx, live)
        return n


def _typical_rows(values: Tensor, indices: Tensor, quantile: float = 0.99) -> tuple[Tensor, Tensor]:
    """The probe rows whose L0 is at most its ``quantile``, each cut to that many entries (active first), for the
    duplicate search. Its cost budget is rows · K², with K the widest row: one outlier row (measured: 100 active
    latents at a mean L0 of 4.5, JumpReLU on the realistic data) cut the search from 2,048 rows to 838, too few to
    see the duplicates of rare features (37 co-firing pairs at decoder cosine > 0.9 were left at the end)."""
    active = values != 0
    counts = active.sum(1)
    if counts.numel() == 0:
        return values, indices
    K = max(1, int(counts.float().quantile(quantile).ceil()))
    if K >= indices.shape[-1]:
        return values, indices
    keep = counts <= K
    order = active[keep].to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :K]
    return values[keep].gather(1, order), indices[keep].gather(1, order)


def _duplicates(W_dec: Tensor, values: Tensor, indices: Tensor, fires: Tensor, min_cos: float) -> Tensor:
    """``[d_sae]`` bool: the less frequent latent of every co-firing pair whose decoder rows have cosine > min_cos."""
    d_sae = W_dec.shape[0]
    out = torch.zeros(d_sae, dtype=torch.bool, device=W_dec.device)
    K = indices.shape[-1]
    if K < 2 or indices.shape[0] == 0:
        return out
    # Per row, the cosines of its active latents' decoder rows ([K, K], a batched GEMM over row chunks); only the
    # close pairs (few) are deduplicated, never all rows · K² of them.
    W = torch.nn.functional.normalize(W_dec.float(), dim=1)
    idx = torch.where(values != 0, indices, torch.full_like(indices, -1))
    upper = torch.ones(K, K, dtype=torch.bool, device=W.device).triu(1)
    chunk = max(1, _COS_ELEMENTS // (K * W.shape[1]))
    close = []
    for a in range(0, idx.shape[0], chunk):
        ia = idx[a:a + chunk]
        Wr = W[ia.clamp_min(0)]  # [rows, K, d_in]
        cos = Wr @ Wr.transpose(1, 2)
        keep = (cos > min_cos) & upper & (ia >= 0).unsqueeze(2) & (ia >= 0).unsqueeze(1)
        r, p, q = keep.nonzero(as_tuple=True)
        i, j = ia[r, p], ia[r, q]
        close.append(torch.minimum(i, j) * d_sae + torch.maximum(i, j))
    pairs = torch.unique(torch.cat(close))
    if pairs.numel() == 0:
        return out
    i, j = pairs // d_sae, pairs % d_sae
    loser = torch.where(fires[i] < fires[j], i, j)
    out[loser] = True
    return out


def _off_active(residual: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``residual [n, d]`` of each chosen row minus its least-squares fit by the decoder rows active in that row:
    what no active latent can explain. An L1 SAE's residual is mostly its shrinkage (``λ/2`` along every active
    latent), so its raw direction points at features already learned and the new latent becomes their duplicate."""
    W = W_dec.float()[indices] * (values != 0).unsqueeze(-1).float()  # [n, K, d], inactive slots zero
    r = residual.float()
    gram = W @ W.transpose(1, 2)  # [n, K, K]
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    coef = torch.linalg.solve(gram + ridge * eye, (W @ r.unsqueeze(-1)))  # [n, K, 1]
    out = r - (W.transpose(1, 2) @ coef).squeeze(-1)
    # a row whose residual lies inside its active span has nothing left: keep its raw residual
    keep = out.norm(dim=1, keepdim=True) > 1e-3 * r.norm(dim=1, keepdim=True)
    return torch.where(keep, out, r)


def _reset_optimizer_rows(sae, optimizer, idx: Tensor, live: Tensor) -> None:
    """Adam moments of the resampled latents: first moment 0, second moment the mean over live latents."""
    for name, axis in sae.latent_axes().items():
        p = getattr(sae, name)
        state = optimizer.state.get(p, {})
        if "exp_avg" in state:
            state["exp_avg"].index_fill_(axis, idx.to(p.device), 0)
        sq = state.get("exp_avg_sq")
        if sq is not None:
            live_rows = sq.index_select(axis, live.nonzero().squeeze(1).to(p.device))
            mean = live_rows.mean(dim=axis, keepdim=True) if live_rows.numel() else torch.zeros_like(
                sq.narrow(axis, 0, 1))
            shape = list(sq.shape)
            shape[axis] = idx.numel()
            sq.index_copy_(axis, idx.to(p.device), mean.expand(shape).contiguous())


def default_every(steps: int) -> int:
    """Ten resampling periods per run (none for runs shorter than 100 steps)."""
    return steps // 10 if steps >= 100 else 0


def default_until(steps: int) -> int:
    """Resample during the first 60% of the steps: the rest lets the new latents settle with the schedule."""
    return int(math.floor(0.6 * steps))
