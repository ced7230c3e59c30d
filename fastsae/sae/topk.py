"""The TopK family: TopK (Gao et al. 2024), AbsTopK, BatchTopK (Bussmann et al. 2024) and Matryoshka BatchTopK
(Bussmann et al. 2025)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks as check
from .. import reference as ref
from .base import SAE


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): ``f = topk(relu((x - b_dec) W_enc + b_enc), k)``, with AuxK for dead latents.

    Args:
        k: active latents per row, in ``1..d_sae``.
        k_aux: dead latents used by AuxK (default ``d_in // 2``, as in sparsify).
        aux_coefficient: α of AuxK (default 1/32).
        dead_after: tokens without firing after which a latent counts as dead (for the trainer; default
            ``None``: the trainer's :func:`fastsae.training.default_dead_after`, 10M or a sixth of a shorter run).
    """

    architecture = "topk"
    unit_norm_decoder = True
    resample_encoder_scale = 1.0  # a resampled latent must win a row's top k to get any gradient

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        k_aux: Optional[int] = None,
        aux_coefficient: float = 1 / 32,
        dead_after: Optional[int] = None,
        apply_b_dec_to_input: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, backend=backend, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype,
                         device=device)
        self.k = check.k_in_range("k", k, d_sae)
        self.k_aux = check.positive_int("k_aux", k_aux) if k_aux is not None else max(1, d_in // 2)
        self.aux_coefficient = float(aux_coefficient)
        self.dead_after = None if dead_after is None else check.positive_int("dead_after", dead_after)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=device))

    def _sae_forward(self, ops, x) -> ref.SAEForward:
        return ops.topk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.apply_b_dec_to_input)

    def _training_forward(self, x, dead_mask, coefficient):
        ops = self.ops(x.device)
        out = self._sae_forward(ops, x)
        aux = self._auxk(ops, x, out, dead_mask)
        return self._output(x, out, x.new_zeros(()), aux, 0.0, self.aux_coefficient)

    def _auxk(self, ops, x, out, dead_mask) -> Tensor:
        """AuxK of the residual ``target - x̂`` (the training target; ``x`` for an SAE); 0 without dead latents."""
        aux = x.new_zeros(())
        if dead_mask is not None and x.shape[0]:
            e_hat = ref.auxk_reconstruction(self._encoder_input(x), self.W_enc, self.b_enc, self.W_dec, dead_mask,
                                            self.k_aux, topk=ops.topk, decode=ops.sparse_decode)
            if e_hat is not None:
                aux = ref.auxk_loss((self._target_of(x) - out.x_hat).detach(), e_hat)
        return aux

    def config(self):
        return dict(super().config(), k=self.k, k_aux=self.k_aux, aux_coefficient=self.aux_coefficient,
                    dead_after=self.dead_after)


class AbsTopKSAE(TopKSAE):
    """AbsTopK SAE: ``f`` keeps, per row, the ``k`` pre-activations ``(x - b_dec) W_enc + b_enc`` of largest
    magnitude with their sign (no ReLU), so one latent can write its direction either way. TopK's selection on
    ``|pre|`` (``reference.abstopk_sae_forward``): every backend runs it with its own top-k and sparse-decode
    kernels. AuxK, the unit-norm decoder and resampling are TopK's. Saved and loaded in fastsae's format; SAELens
    and sparsify have no such architecture.
    """

    architecture = "abstopk"

    def _sae_forward(self, ops, x):
        return ops.abstopk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.apply_b_dec_to_input)


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024): keep the ``B·k`` largest activations of the whole batch.

    Inference uses a global threshold instead (``threshold``, a buffer), so it no longer depends on the
    batch: ``encode`` is ``f = pre · 1[pre > threshold]`` with ``pre = relu(...)``. Two things set it:
    - during training, a bias-corrected running mean of each batch's smallest kept activation (decay
      ``threshold_decay``; the correction makes the first steps' estimate the mean of the batches seen so far,
      not a blend with an arbitrary starting value), updated on device without a host sync;
    - :meth:`calibrate` on held-out rows: the threshold that keeps exactly ``k`` latents per row on average
      there. ``fastsae.train`` calls it at the end of training on a sample of the data, so the saved SAE's
      inference L0 is ``k`` even when the activation scale was still drifting in the last steps.
    ``threshold < 0`` means not calibrated yet; ``encode`` then applies the batch top-k.

    ``topk_warmup``: the fraction of a ``fastsae.train`` run (default 0.8) whose training forward keeps each
    row's ``k`` largest activations (TopK, same parameters) instead of the batch's ``B·k`` largest. The batch
    top-k shares the batch's latents out by activation size, which is only meaningful once latents are features:
    with a random dictionary every pre-activation of a row is proportional to the row's norm, so the batch
    top-k hands the rows of largest norm several times their share (measured at the end of a run: mean 8, 95th
    percentile 22, max 49 latents per row) and the others none, and the dictionary does not form (47% of the
    true features recovered on a small version of the CLI job; 95% with the warm-up). :meth:`on_train_step`
    switches it from the run's step, so a resumed run switches at the same step. How long: the batch phase
    also erodes features the TopK phase found (as a per-latent threshold does on data whose rows differ in norm),
    so the warm-up takes most of the run and the batch phase tunes the dictionary to the batch-wide selection
    (experiments/results/arch_defaults.md, session 9; true features recovered, realistic data, k = true L0):
    1/3 → 0.8 of the run took the CLI job (3M tokens) from 88.0 / 97.2 / 87.1% to 92.2 / 97.1 / 91.0% (seeds 0-2;
    held-out FVU 0.177-0.178 → 0.180-0.183) and the quality benchmark's job (1M tokens, five seeds) from 79.0% to
    82.0% at the true L0 (FVU 0.139 → 0.137) and from 66.6% to 78.8% at twice it (FVU 0.106 → 0.104); 0.9 recovers
    about as many there at a worse FVU (0.146 at the true L0).
    """

    architecture = "batchtopk"
    fit_encoder_scale_at_init = True

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_decay: float = 0.99, topk_warmup: float = 0.8,
                 **kwargs):
        super().__init__(d_in, d_sae, k, **kwargs)
        if not 0.0 <= threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must lie in [0, 1), got {threshold_decay}")
        self.threshold_decay = float(threshold_decay)
        if isinstance(topk_warmup, bool) or not isinstance(topk_warmup, (int, float)) or not 0 <= topk_warmup < 1:
            raise ValueError(f"topk_warmup must be a fraction of the run in [0, 1), got {topk_warmup!r}")
        self.topk_warmup = float(topk_warmup)
        self.per_row_selection = False  # set by on_train_step: TopK's selection during the warm-up
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=self.device))
        # Σ of the EMA weights so far (the bias correction); not saved: a loaded SAE restarts its running mean
        self.register_buffer("_threshold_weight", torch.zeros((), dtype=torch.float32, device=self.device),
                             persistent=False)

    @property
    def calibrated(self) -> bool:
        return bool(self.threshold >= 0)

    def on_train_step(self, step: int, steps: int) -> None:
        self.per_row_selection = step < self.topk_warmup * steps

    def _sae_forward(self, ops, x):
        if self.training and self.per_row_selection:
            return super()._sae_forward(ops, x)
        out = ops.batchtopk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k,
                                self.apply_b_dec_to_input)
        self._update_threshold(out)
        return out

    def _update_threshold(self, out) -> None:
        if self.training and out.min_kept is not None:
            with torch.no_grad():
                m = out.min_kept.float()
                # a batch that kept nothing reports +inf (triton) and must not move the estimate: masked, no sync
                seen = torch.isfinite(m).float()
                w = self._threshold_weight.mul_(1 - seen * (1 - self.threshold_decay)).add_(seen * (1 - self.threshold_decay))
                # θ ← θ + ((1 - decay) / w)·(m - θ): the running mean of m with Adam-style bias correction
                step = seen * (1 - self.threshold_decay) / w.clamp_min(1e-12)
                self.threshold.add_(step * (torch.where(seen > 0, m, self.threshold) - self.threshold))

    def on_train_end(self, x: Tensor, target: Optional[Tensor] = None) -> None:
        self.calibrate(x)

    @torch.no_grad()
    def calibrate(self, x: Tensor, batch_size: Optional[int] = None) -> float:
        """Set ``threshold`` so that ``encode`` keeps ``k`` latents per row on average over ``x [N, d_in]``
        (the smallest of the ``N·k`` largest activations of all rows: BatchTopK over one batch of N rows).
        Returns the threshold."""
        x2, _ = self._flatten(x)
        return self._set_calibrated_threshold(self._largest_activations(x2, x2.shape[0] * self.k, batch_size))

    def _largest_activations(self, x2: Tensor, n_keep: int, batch_size: Optional[int]) -> Tensor:
        """The ``n_keep`` largest ``relu(pre)`` of all rows of ``x2`` (unsorted), one bounded slab at a time."""
        batch_size = batch_size or max(1, 2**24 // self.d_sae)  # a [rows, d_sae] slab of at most 16M entries
        kept = x2.new_empty(0)
        for a in range(0, x2.shape[0], batch_size):
            pool = torch.cat([kept, F.relu(self._pre(x2[a:a + batch_size])).reshape(-1)])
            kept = torch.topk(pool, min(n_keep, pool.numel()), sorted=False).values
        return kept

    def _set_calibrated_threshold(self, kept: Tensor) -> float:
        positive = kept[kept > 0]
        if positive.numel() == 0:  # nothing fires on these rows: keep the running estimate
            return float(self.threshold)
        self.threshold.fill_(float(positive.min()))
        self._threshold_weight.fill_(1.0)
        return float(self.threshold)

    def config(self):
        return dict(super().config(), threshold_decay=self.threshold_decay, topk_warmup=self.topk_warmup)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025; SAELens ``matryoshka_batchtopk``, dictionary_learning's
    ``MatryoshkaBatchTopKTrainer``): a BatchTopK SAE whose latents below each width in ``widths`` must also
    reconstruct the input on their own, so early latents learn general features and later ones refinements.

    loss = ``Σ_g w_g · mean_b ‖x̂_g - x‖²`` over every width (the full width's term is ``mse``, ``w = 1``) + α·AuxK, with
    ``x̂_g = b_dec + Σ_{kept j < widths[g]} f_j W_dec[j]``: every prefix is a running sum over each row's kept
    entries (``reference.prefix_reconstructions``; on the cpp and triton backends the fused BatchTopK step decodes
    the full width and ``reference.matryoshka_from_kept`` the inner ones), never a dense ``[B, d_sae]`` product.
    Inference is BatchTopK's (the calibrated global threshold). ``widths``: strictly increasing, ending at
    ``d_sae`` (appended when missing, as SAELens does).

    ``topk_warmup`` is BatchTopK's (default 0.8 of a ``fastsae.train`` run): the prefix losses are computed from
    each row's ``k`` largest activations until the switch. Without it (the old default, 0) the batch top-k's
    allocation by row norm while the dictionary is random cost as much here as for BatchTopK: 53.5% → 62.1% of the
    true features recovered on the quality benchmark's realistic data at the true L0 (BatchTopK: 80.5%; the
    prefix losses themselves make the first latents general directions rather than features).

    ``prefix_weights`` (issue 18): the weight ``w_g`` of each inner prefix's loss. ``"width"`` (the default):
    ``widths[g] / d_sae``, each prefix weighted by its share of the dictionary (so the full width, weight 1, is
    the largest term); ``"uniform"``: 1 for every prefix, SAELens's ``matryoshka_batchtopk`` (dictionary_learning's
    default ``1/G`` for all G groups is the same up to scale); or a list of ``len(widths) - 1`` floats. Unweighted,
    the 1/16-width prefix's loss weighs as much as the whole reconstruction and its latents become means of
    feature groups (cosine < 0.9 to every true feature). Measured at k ≈ the true L0 (with the 1/3 warm-up of
    then) with the default ``nested_widths`` (1/16, 1/4, 1; ``experiments/matryoshka_weights_sweep.py``,
    ``experiments/results/arch_defaults.md``), true features recovered (cos > 0.9):

    - quality benchmark (64 dims, 256 features, d_sae 512, realistic data, k = 4, seeds 0–4): ``"uniform"``
      66.9% (62.1 / 82.8 / 62.5 / 61.3 / 65.6), ``"width"`` **81.3%** (78.1 / 97.3 / 78.5 / 76.2 / 76.6), no prefix
      losses (= BatchTopK) 84.0%; larger first prefixes ([d/4, d/2, d], [d/2, d]) gave no more than the default
      widths once weighted (80.8%, 81.3%);
    - ``fastsae train --arch matryoshka_batchtopk --data realistic --k 4`` (128 dims, 1,024 features, d_sae
      2,048), training seeds 0–3: ``"uniform"`` 78.3 / 87.9 / 76.2 / 78.1%, ``"width"`` **85.3 / 94.7 / 84.4 /
      84.0%** (mean 87.1%), no prefix losses 86.6 / 97.2 / 85.7% (seeds 0–2); clean data (no ``--data``):
      ``"width"`` 100%.

    The nesting survives the weighting: the first 128 latents alone reconstruct the CLI job's held-out rows at FVU
    0.85 (seed 0; 0.64 seed 1), against 0.69 unweighted and 0.95 for a BatchTopK SAE's first 128. Weaker weights
    buy the last point of recovery with the rest of it (half the width weights: 84.9 / 85.6% on seeds 2 / 3, first
    prefix at FVU 0.90).
    """

    architecture = "matryoshka_batchtopk"

    #: the named ``prefix_weights`` rules: the inner prefix ``g``'s weight from its width
    PREFIX_WEIGHTS = ("width", "uniform")

    def __init__(self, d_in: int, d_sae: int, k: int, *, widths: list, prefix_weights="width", **kwargs):
        super().__init__(d_in, d_sae, k, **kwargs)
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
            raise TypeError(f"widths must be a list of increasing latent counts, got {widths!r}")
        widths = list(widths)
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and 0 < w <= d_sae for w in widths):
            raise ValueError(f"widths must be integers in 1..d_sae={d_sae}, got {widths!r}")
        if any(b <= a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"widths must be strictly increasing, got {widths}")
        if widths[-1] != d_sae:
            widths.append(d_sae)
        self.widths = widths
        if isinstance(prefix_weights, str):
            if prefix_weights not in self.PREFIX_WEIGHTS:
                raise ValueError(f"prefix_weights must be one of {self.PREFIX_WEIGHTS} or a list of "
                                 f"{len(widths) - 1} non-negative floats, got {prefix_weights!r}")
        else:
            if isinstance(prefix_weights, (bytes, bool)) or not hasattr(prefix_weights, "__iter__"):
                raise TypeError(f"prefix_weights must be a name or a list of floats, got {prefix_weights!r}")
            prefix_weights = [float(w) for w in prefix_weights]
            if len(prefix_weights) != len(widths) - 1 or not all(w >= 0 and math.isfinite(w) for w in prefix_weights):
                raise ValueError(f"prefix_weights must hold {len(widths) - 1} finite non-negative floats (one per "
                                 f"inner prefix of {widths}), got {prefix_weights!r}")
        self.prefix_weights = prefix_weights

    @property
    def inner_prefix_weights(self) -> list:
        """The weight of each inner prefix's loss (``len(widths) - 1`` floats; the full width's MSE has weight 1)."""
        if self.prefix_weights == "width":
            return [w / self.d_sae for w in self.widths[:-1]]
        if self.prefix_weights == "uniform":
            return [1.0] * (len(self.widths) - 1)
        return list(self.prefix_weights)

    @staticmethod
    def nested_widths(d_sae: int) -> list:
        """Prefixes at 1/16, 1/4 and all of ``d_sae`` (dictionary_learning's and SAELens's examples grow 4×): what
        ``fastsae train`` and the quality benchmark build when no ``widths`` are given."""
        return sorted({max(1, d_sae // 16), max(1, d_sae // 4), d_sae})

    def _sae_forward(self, ops, x):
        per_row = self.training and self.per_row_selection
        out = ops.matryoshka_batchtopk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.widths,
                                           self.apply_b_dec_to_input, per_row=per_row)
        if not per_row:  # the inference threshold estimates the batch top-k's smallest kept value
            self._update_threshold(out)
        return out

    def _training_forward(self, x, dead_mask, coefficient):
        ops = self.ops(x.device)
        out = self._sae_forward(ops, x)
        aux = self._auxk(ops, x, out, dead_mask)
        result = self._output(x, out, x.new_zeros(()), aux, 0.0, self.aux_coefficient)
        result.loss = result.loss + ref.matryoshka_loss(out.prefixes, self._target_of(x), self.inner_prefix_weights)
        return result

    def config(self):
        pw = self.prefix_weights if isinstance(self.prefix_weights, str) else list(self.prefix_weights)
        return dict(super().config(), widths=list(self.widths), prefix_weights=pw)
