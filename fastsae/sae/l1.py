"""The L1 family: ReLU SAEs (the standard / April-update SAE) and Gated SAEs (Rajamanoharan et al. 2024), over
what they share (:class:`_L1FamilySAE`)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import reference as ref
from .base import SAE, TrainOutput


class _L1FamilySAE(SAE):
    """What ReLU and Gated SAEs share: a λ-weighted L1 penalty (on ``f·‖W_dec‖``, or on Gated's gate), and so the
    same schedule for λ under ``target_l0``, the same resampling rule and the same learning-rate rule.

    - **target_l0 schedule** (``controller_start``, a fraction of the run, default 0.6). Until then λ follows the
      fixed-λ schedule (the loop's linear warm-up over the first 10% of the steps, then ``sparsity_coefficient``);
      from then on the log-λ controller of ``fastsae/sparsity.py`` moves it towards the asked L0. The early L0 of
      an L1 SAE says little about the L0 the same λ ends at: the code is dense while the dictionary forms (L0 250
      → 30 → 5 over a run at a fixed λ), and each resampling round adds latents that fire widely until they
      settle. A controller that chases that L0 from step 0 drives λ up to where every activation shrinks to
      nothing while the dictionary is still random, and that collapsed code also has the asked L0, so it never
      comes back (ReLU, ``target_l0=4`` on clean data: λ 0.3 → 0.93 by step 300, FVU 0.97, 27% of the features
      recovered, against 100% at a fixed λ of 0.45 or 0.6 whose L0 falls to 4.4-4.7 by the end). 0.6 is where
      resampling stops (``fastsae.resample.default_until``). The schedule runs from :meth:`on_train_step`
      (``fastsae.train`` calls it); a hand-written loop that does not call it gets the controller from its first
      step, as before.
    - **resampled latents** start at the firing rate of the live ones (:meth:`reinit_latents`): their bias at
      minus the quantile of their pre-activations on the probe (Gated: ``b_gate`` and ``b_mag``, ``r_mag = 0``).
      With bias 0 a new latent fires on every row with a positive projection (about half), inflating L0 and taking
      the L1 penalty on rows it does not explain (ReLU on the realistic data: 240-290 of 512 latents were
      resampled at every round, and L0 fell from 11 to 3.4 once resampling stopped).
    - **learning rate**: ``default_lr_scale = 2`` × the width rule of ``fastsae.training.default_hyperparameters``.
    """

    #: multiplies the width-rule learning rate of ``fastsae.training.default_hyperparameters``: measured on the
    #: realistic synthetic data, Gated at 1× / 2× recovered 76% / 88% (the CLI job, 3M tokens), ReLU 74% / 83%
    #: (64 dims, 1M tokens); the clean job stays at 100%. An explicit ``lr=`` replaces it.
    default_lr_scale = 2.0

    def __init__(self, d_in: int, d_sae: int, *, sparsity_coefficient: float, target_l0: Optional[float],
                 controller_start: float, resample_bias: str, **base):
        super().__init__(d_in, d_sae, **base)
        self._init_sparsity(sparsity_coefficient, target_l0)
        if isinstance(controller_start, bool) or not isinstance(controller_start, (int, float)) or not (
                0.0 <= controller_start < 1.0):
            raise ValueError(f"controller_start must be a fraction of the run in [0, 1), got {controller_start!r}")
        if resample_bias not in ("rate", "zero"):
            raise ValueError(f"resample_bias must be 'rate' or 'zero', got {resample_bias!r}")
        self.controller_start = float(controller_start)
        self.resample_bias = resample_bias
        self._controller_on = True  # until on_train_step says otherwise (a loop without the hook: as before)

    def on_train_step(self, step: int, steps: int) -> None:
        super().on_train_step(step, steps)
        if not self.controls_sparsity:
            return
        start = int(self.controller_start * steps)
        self._controller_on = step >= start
        if not self._controller_on:
            # the fixed-λ schedule, set from the step alone, so a resumed run follows the same trajectory
            warmup = steps // 10
            factor = 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
            with torch.no_grad():
                self.log_sparsity_coefficient.fill_(math.log(self._sparsity_coefficient * factor))

    def observe(self, x: Tensor, out: TrainOutput) -> None:
        if self.__dict__.get("_controller_on", True):
            super().observe(x, out)

    def _rate_bias(self, idx: Tensor, probe: Tensor, fire_rate: float) -> Tensor:
        """Minus the quantile of the new latents' bias-free pre-activations on ``probe`` above which they fire on
        ``fire_rate`` of its rows (≤ 0: a latent never starts with a positive bias)."""
        pre = self._encoder_input(probe.to(self.dtype)) @ self.W_enc[:, idx]
        q = min(max(1.0 - fire_rate, 0.0), 1.0 - 1.0 / max(probe.shape[0], 1))
        return -pre.float().quantile(q, dim=0).clamp_min(0).to(self.dtype)

    def _config_l1(self) -> dict:
        return dict(self._sparsity_config(), controller_start=self.controller_start, resample_bias=self.resample_bias)


class ReLUSAE(_L1FamilySAE):
    """ReLU SAE: ``f = relu((x - b_dec) W_enc + b_enc)``, loss ``MSE + λ Σ_j f_j ‖W_dec[j]‖`` (Anthropic's April 2024
    update: the decoder-norm-weighted L1 with unconstrained decoder norms).

    λ (``sparsity_coefficient``, default 0.25) is in the units of ``fastsae.train``'s centred input scale
    (``E‖x - E x‖² = 1``), where a feature of a row with L0 active ones has a typical size of ~1/√L0 (0.5 at
    L0 = 4): the penalty shrinks every active latent by λ/2 and keeps a latent silent where it would explain
    less than that, so λ has to be a sizeable fraction of the features' size to silence the other features'
    interference (λ = 0.01, the old default, left a dense code: L0 134 against a true 4 on a small version of
    the CLI job). 0.25 rather than 0.3 (the first default): the shrinkage that ``fit_magnitudes`` cannot undo
    costs less, and on the CLI jobs (seed 0) clean FVU 0.151 → 0.145 at L0 5.0 → 5.4 (100% recovered both), realistic
    recovery 93.1% → 95.4% at FVU 0.209 → 0.197 (λ 0.27: clean FVU 0.148; ReLU collapses above λ ≈ 0.5, and at 0.1
    the code is dense). ``target_l0`` asks for an L0 instead (a controller on log λ, starting at ``sparsity_coefficient``
    once ``controller_start`` of the run has passed: see :class:`_L1FamilySAE`).

    ``apply_b_dec_to_input`` (default True, as TopK, Gated and JumpReLU here): the encoder reads ``x - b_dec``.
    Without it a mean offset (a residual stream's; 3× the signal on ``fastsae.data.realistic``) sits in every
    pre-activation through ``μ·W_enc``, which ``b_enc`` has to chase whenever ``W_enc`` moves: on the realistic
    data 57% → 71% of the features recovered (64 dims, 1M tokens, λ = 0.3); no change on data without an offset.
    ``resample_bias``: ``"rate"`` (default) or ``"zero"`` (the bias of a resampled latent; :meth:`reinit_latents`).
    """

    architecture = "relu"
    fit_encoder_scale_at_init = True
    #: fastsae/resample.py takes a new latent's direction from the residual with the row's active decoder rows
    #: projected out, skipping directions a live decoder row already has: ReLU's residual is mostly its L1
    #: shrinkage (λ/2 along every active latent), so the raw residual points at features it already has (CLI
    #: realistic job: 85.9% → 92.6% recovered, MCC 0.939 → 0.972; clean stays at 100%, uniqueness 1.00). Gated's
    #: magnitudes are not shrunk, and there the projection alone changed nothing beyond noise (87.7% → 88.3%).
    resample_off_active = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        sparsity_coefficient: float = 0.25,
        target_l0: Optional[float] = None,
        controller_start: float = 0.6,
        resample_bias: str = "rate",
        apply_b_dec_to_input: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, sparsity_coefficient=sparsity_coefficient, target_l0=target_l0,
                         controller_start=controller_start, resample_bias=resample_bias, backend=backend,
                         apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype, device=device)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=device))

    @torch.no_grad()
    def reinit_latents(self, idx, directions, live, probe, fire_rate, encoder_directions=None):
        """The base re-initialisation, then with ``resample_bias="rate"`` ``b_enc`` at the firing rate of the live
        latents (:meth:`_L1FamilySAE._rate_bias`)."""
        super().reinit_latents(idx, directions, live, probe, fire_rate, encoder_directions)
        if self.resample_bias == "rate":
            self.b_enc[idx] = self._rate_bias(idx, probe, fire_rate)

    #: ``fastsae.train`` calls :meth:`fit_magnitudes` on 16,384 rows at the end of a run (``False``: it does not)
    fit_magnitudes_at_end = True

    def on_train_end(self, x: Tensor, target: Optional[Tensor] = None) -> None:
        if self.fit_magnitudes_at_end:
            self.fit_magnitudes(x, target)

    @torch.no_grad()
    def fit_magnitudes(self, x: Tensor, target: Optional[Tensor] = None, ridge: float = 1e-6, iterations: int = 200,
                       tol: float = 1e-12) -> Tensor:
        """Undo the L1 shrinkage after training: multiply each latent's encoder column and bias by the ``α_j > 0``
        of the least-squares fit ``min_α ‖y - b_dec - (f ⊙ α) W_dec‖²`` on the (scaled) sample ``x [N, d_in]``
        (``y = x``; a transcoder's ``target [N, d_out]`` less its skip term); returns α.

        ``relu(α·pre) = α·relu(pre)`` for ``α > 0``, so which latents fire on which rows does not change (L0,
        decoder directions and feature recovery are untouched); only the magnitudes grow back towards what the
        reconstruction wants. The L1 penalty shrinks every active latent by ~λ/2 of the features' size, which is
        most of ReLU's reconstruction error on clean data (CLI job: held-out FVU 0.204 at L0 5.0 without it).
        The normal equations ``(FᵀF ⊙ W_dec W_decᵀ) α = diag(Fᵀ (x - b_dec) W_decᵀ)`` are solved by conjugate
        gradients on the sparse code, never forming a ``[d_sae, d_sae]`` or dense ``[N, d_sae]`` matrix (an SAE
        with 10⁵ latents fits as cheaply as the CLI's); latents that never fire on the sample, or whose fit is
        not positive, keep ``α = 1``."""
        x2, _ = self._flatten(x.to(self.dtype))
        slab = max(1, 2**24 // self.d_sae)  # rows per dense [rows, d_sae] code slab: at most 16M entries
        rows, cols, vals = [], [], []
        for a in range(0, x2.shape[0], slab):
            f = self._dense_code(x2[a:a + slab])
            r, c = f.nonzero(as_tuple=True)
            rows.append(r + a), cols.append(c), vals.append(f[r, c])
        alpha = torch.ones(self.d_sae, dtype=torch.float64, device=x2.device)
        r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals).double()
        if v.numel() == 0:
            return alpha.to(self.dtype)
        w = self.W_dec.double()
        d_out = w.shape[1]
        per_block = max(1, 2**22 // d_out)  # code entries per gathered [entries, d_out] block

        def project(y: Tensor) -> Tensor:
            """``diag(Fᵀ y W_decᵀ)``: Σ over each latent's entries of f_ij (y_i · w_j)."""
            out = torch.zeros(self.d_sae, dtype=torch.float64, device=y.device)
            for a in range(0, v.numel(), per_block):
                s_ = slice(a, a + per_block)
                out.index_add_(0, c[s_], v[s_] * (y[r[s_]] * w[c[s_]]).sum(-1))
            return out

        def decode(p: Tensor) -> Tensor:
            """``(F ⊙ p) W_dec``: the code with each latent scaled by ``p``, decoded."""
            y = torch.zeros(x2.shape[0], d_out, dtype=torch.float64, device=x2.device)
            for a in range(0, v.numel(), per_block):
                s_ = slice(a, a + per_block)
                y.index_add_(0, r[s_], (v[s_] * p[c[s_]])[:, None] * w[c[s_]])
            return y

        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x2.device)
        fired[c] = True
        mask = fired.double()
        diag = torch.zeros(self.d_sae, dtype=torch.float64, device=x2.device)
        diag.index_add_(0, c, v * v * (w[c] * w[c]).sum(-1))
        damp = ridge * float(diag[fired].mean())

        def gram(p: Tensor) -> Tensor:  # (FᵀF ⊙ W_dec W_decᵀ) p over the fired latents, plus the ridge
            return (project(decode(p)) + damp * p) * mask

        y = x2 if target is None else target.reshape(-1, d_out).to(self.dtype)
        skip = getattr(self, "_skip", lambda _: None)(x2)  # a skip transcoder: its inner model fits y - x W_skip
        b = project((y - self.b_dec - (0 if skip is None else skip)).double()) * mask
        # CG from α = 1 (the trained magnitudes), preconditioned by the diagonal
        inv = torch.where(fired, 1.0 / (diag + damp), torch.zeros_like(diag))
        sol = mask.clone()
        res = b - gram(sol)
        z = inv * res
        p = z.clone()
        rz = float(res @ z)
        stop = tol * float(b @ (inv * b))
        for _ in range(iterations):
            if rz <= stop:
                break
            q = gram(p)
            step = rz / float(p @ q)
            sol += step * p
            res -= step * q
            z = inv * res
            rz_new = float(res @ z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        alpha = torch.where(fired & (sol > 0), sol, alpha)
        a = alpha.to(self.dtype)
        self.W_enc.mul_(a)
        self.b_enc.mul_(a)
        return a

    def _training_forward(self, x, dead_mask, coefficient):
        out = self.ops(x.device).relu_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                          self.apply_b_dec_to_input)
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, out.sparsity.mean(), x.new_zeros(()), lam, 0.0)

    def config(self):
        return dict(super().config(), **self._config_l1())


class GatedSAE(_L1FamilySAE):
    """Gated SAE (Rajamanoharan et al. 2024). ``W_enc`` is the gate matrix; ``W_mag = exp(r_mag) ⊙ W_enc``.

    ``f = H(π_gate) ⊙ relu(π_mag)``; loss ``MSE + λ‖relu(π_gate)‖₁ + ‖x - x̂_frozen(relu(π_gate))‖²``
    with detached decoder weights in the last term; decoder rows are kept at unit norm.

    λ (``sparsity_coefficient``, default 0.7) is in the units of ``fastsae.train``'s centred input scale, like
    ReLU's (the auxiliary term ties the gate's pre-activations to the features' size); the magnitude path has no
    penalty, so a larger λ than ReLU's costs no shrinkage (λ = 0.01, the old default: L0 91 against a true 4).
    ``target_l0`` asks for an L0 instead (from ``controller_start`` of the run on: see :class:`_L1FamilySAE`).
    ``resample_bias``: ``"rate"`` (default) or ``"zero"`` (the gate of a resampled latent; :meth:`reinit_latents`).
    """

    architecture = "gated"
    unit_norm_decoder = True
    fit_encoder_scale_at_init = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        sparsity_coefficient: float = 0.7,
        target_l0: Optional[float] = None,
        controller_start: float = 0.6,
        resample_bias: str = "rate",
        apply_b_dec_to_input: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, sparsity_coefficient=sparsity_coefficient, target_l0=target_l0,
                         controller_start=controller_start, resample_bias=resample_bias, backend=backend,
                         apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype, device=device)
        factory = dict(dtype=self.dtype, device=device)
        self.b_gate = nn.Parameter(torch.zeros(d_sae, **factory))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, **factory))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, **factory))

    def _training_forward(self, x, dead_mask, coefficient):
        args = (x, self.W_enc, self.b_gate, self.r_mag, self.b_mag, self.W_dec, self.b_dec, self.apply_b_dec_to_input)
        if self.__dict__.get("_target") is None:
            out = self.ops(x.device).gated_sae(*args)
        else:  # the frozen-decoder term reconstructs the target too (no fused kernel has a gated transcoder)
            out = ref.gated_sae_forward(*args, target=self._target_of(x))
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, out.sparsity.mean(), out.aux, lam, 1.0)

    @torch.no_grad()
    def reinit_latents(self, idx, directions, live, probe, fire_rate, encoder_directions=None):
        """The base re-initialisation, then with ``resample_bias="rate"`` the gate opens at the firing rate of the
        live latents (``b_gate``, :meth:`_L1FamilySAE._rate_bias`) and the magnitude starts as the gate's
        pre-activation (``r_mag = 0``, ``b_mag = b_gate``: the old latent's magnitude scale is not kept)."""
        super().reinit_latents(idx, directions, live, probe, fire_rate, encoder_directions)
        if self.resample_bias == "rate":
            b = self._rate_bias(idx, probe, fire_rate)
            self.r_mag[idx] = 0
            self.b_gate[idx] = b
            self.b_mag[idx] = b

    def config(self):
        return dict(super().config(), **self._config_l1())
