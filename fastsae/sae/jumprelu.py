"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope, SAELens ``jumprelu``): a learned threshold per latent,
trained through straight-through estimators with a bandwidth."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import _checks as check
from .. import reference as ref
from .. import adaptive as adaptive_rule
from .. import sparsity as sparsity_control
from ..adaptive import AdaptiveBandwidth
from .base import SAE, TrainOutput


class JumpReLUSAE(SAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): ``f = pre · H(pre - θ)``, L0 penalty via pseudo-derivatives.

    Args:
        bandwidth: ε of the rectangle kernel: a float, a per-latent ``[d_sae]`` tensor, or ``"adaptive"``
            (or a :class:`fastsae.adaptive.AdaptiveBandwidth`) for a per-latent ε adapted during training
            from running statistics of each latent's pre-activations near its threshold (see
            ``fastsae/adaptive.py``; updated in :meth:`observe`, which the training loop calls).
        sparsity_coefficient: λ of the L0 penalty (default ``None``: 0.02 for ``"step"``/``"tanh"``, in the units
            of ``fastsae.train``'s centred input scale; 1.0 for ``"quadratic"``, see below).
        threshold_init: initial θ (the paper: 0.001, for inputs with mean squared norm 1).
        threshold_parameterization: ``"direct"`` (default): θ is the parameter, clamped at 0 after each
            step, so Adam moves it by about ``lr`` per step; ``"log"`` (the paper): the parameter is
            ``log_threshold`` and ``threshold`` is its exponential (moves only about ``θ · lr`` per step).
        adaptive: options of the adaptive rule (a dict of :class:`~fastsae.adaptive.AdaptiveBandwidth`
            fields), only with ``bandwidth="adaptive"``.
        sparsity_loss: the sparsity penalty (the recipe):
            ``"step"`` (the paper): ``λ · mean_b L0_b`` through the step function's pseudo-derivative;
            ``"tanh"`` (Anthropic, January 2025): ``λ · mean_b Σ_j tanh(c · f_bj · ‖W_dec[j]‖)``, a smooth L0
            whose gradient reaches f and the decoder norms (c = ``tanh_scale``);
            ``"quadratic"`` (dictionary_learning; Gemma Scope 2's target-L0 loss): ``λ · (mean_b L0_b / T - 1)²``
            with ``T = target_l0``.
        target_l0: the L0 to reach. With ``"step"`` or ``"tanh"``, λ becomes the state of a controller that
            adjusts it during training (``fastsae/sparsity.py``), starting from ``sparsity_coefficient``;
            with ``"quadratic"`` it is the penalty's target (required) and λ stays fixed.
        pre_act_coefficient: weight of the pre-activation loss ``mean_b Σ_{j dead} relu(θ_j - pre_bj)‖W_dec[j]‖``
            that pulls dead latents back towards their thresholds (Anthropic; dead latents only, as SAELens).
        ste_to_input: let the jump's pseudo-derivative reach the pre-activations (hence the encoder) too,
            not only θ (Anthropic; SAELens ``jumprelu_ste_to_input``).
        threshold_lr_scale: θ's learning rate as a multiple of the weights' (default ``None``: 5 with
            ``"quadratic"``, 2 otherwise; see below).
        k_aux: JumpReLU's AuxK (:func:`fastsae.reference.quiet_auxk_loss`): on each row, the ``k_aux`` largest
            pre-activations of the latents that do not fire reconstruct what the firing ones miss (default
            ``None``: ``d_in // 16``, at least 1 and at most ``d_sae``; 0: off). See below.
        aux_coefficient: its weight in the loss.
        aux_rows: the fraction of each batch's rows it is computed on (its selection needs every pre-activation
            of those rows: a dense GEMM of ``aux_rows`` × the encoder's).

    The target-L0 defaults (``target_l0=T``, quadratic loss: λ = 1, θ at 5× the learning rate). A threshold only
    gets a gradient at kernel hits, and once the code is sparse most latents have no hit in a batch, so with Adam
    (β₁ = 0) θ drifts at ~``lr·√P(hit)`` per step *whatever* λ is: with λ = 0.02 and 2× (the old defaults) L0 rose
    from its ``init_l0`` of 2T to ~3.5T while the encoder grew and came down only slowly, ending 50% above the
    target on the quality benchmark's short run (1M tokens) and 75% above it at 2T. λ sets which term of θ's
    gradient wins at a hit: at 0.02 the reconstruction term does for most latents even above the target (L0 still
    1.7T at the end with a 5× θ rate), at λ ≥ 0.3 the penalty does and L0 tracks the rate limit (λ = 0.3 and 1
    gave the same trajectory); the 5× rate then brings L0 to within 3% of T in ~200 steps and keeps it there
    (measured: 4.40 against 4.28, 69% → 84% recovery at that size; 10× was no better).
    JumpReLU's AuxK (``k_aux``, on by default). A latent below its threshold on a row gets no gradient from it,
    so a feature no latent has yet is not learned: at matched L0 JumpReLU recovered 2.6 points fewer true features
    than TopK on the CLI realistic job (91.9 against 94.5%, five seeds), whose per-row rank hands each row's spare
    slots to its nearest latents. With each row's ``d_in // 16`` largest quiet latents (8 there) fitting the
    residual off the firing latents' span at weight 0.25, JumpReLU recovers 95.3 / 95.9 / 96.3% on seeds 0–2
    (TopK 94.0 / 96.9 / 94.1%; held-out FVU 0.174 → 0.163, firing recall 0.52 → 0.57). How many quiet latents
    help depends on the input width: 8 of 2,048 latents in 128 dims beat 4 and 16 there; in 64 dims (the quality
    benchmark's job, 512 latents) 4 gave 91.4 / 92.5 / 71.8% at 0.5 / 1 / 2× the true L0 over five seeds (8:
    92.4 / 91.6 / 66.3%; none: 89.3 / 86.7 / 65.4%; TopK 82.3 / 85.9 / 65.7%); in 32 dims (128 latents) 8 cost 12
    points (87.5 → 75.0%) where 2 gained 6 (93.8%). Without the projection it grew co-firing duplicates
    (uniqueness 0.94 → 0.86); on dead latents only (TopK's AuxK) or at k_aux 64 it gained < 1 point, at weight 1
    none; on half of each batch's rows (``aux_rows=0.5``) 95.2% over five seeds, 0.5 points under all rows on each
    of seeds 0–2
    (``experiments/results/arch_defaults.md``, session 10). Its cost is a second, unfused pass over the
    ``aux_rows`` rows: a dense GEMM, a selection and a small least-squares solve per row (``k_aux=0`` turns it
    off; latent-sharded training runs without it).
    θ (and ε) are kept in float32 (float64 for a float64 SAE) whatever the module's compute dtype, also
    across ``.to(dtype)``: a bf16 threshold stops learning once its updates fall below its precision.
    """

    architecture = "jumprelu"
    PARAMETERIZATIONS = ("direct", "log")
    SPARSITY_LOSSES = ("step", "tanh", "quadratic")
    #: default λ of the step / tanh penalties (centred input units) and of the quadratic target-L0 loss
    STEP_LAMBDA, QUADRATIC_LAMBDA = 2e-2, 1.0
    #: default θ learning-rate multiple with the quadratic target-L0 loss (the class docstring says why)
    QUADRATIC_THRESHOLD_LR_SCALE = 5.0
    #: default k_aux of JumpReLU's AuxK: one quiet latent per this many input dimensions (the class docstring)
    K_AUX_PER_INPUT_DIMS = 16

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        bandwidth: Union[float, Tensor, str, "AdaptiveBandwidth"] = 1e-3,
        sparsity_coefficient: Optional[float] = None,
        threshold_init: float = 1e-3,
        threshold_parameterization: str = "direct",
        adaptive: Optional[dict] = None,
        sparsity_loss: Optional[str] = None,
        target_l0: Optional[float] = None,
        tanh_scale: float = 4.0,
        pre_act_coefficient: float = 0.0,
        ste_to_input: bool = False,
        init_l0: Union[float, str, None] = "auto",
        threshold_lr_scale: Optional[float] = None,
        k_aux: Optional[int] = None,
        aux_coefficient: float = 0.25,
        aux_rows: float = 1.0,
        decoder_init_norm: float = 0.1,
        apply_b_dec_to_input: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, backend=backend, apply_b_dec_to_input=apply_b_dec_to_input,
                         decoder_init_norm=decoder_init_norm, dtype=dtype, device=device)
        if sparsity_loss is None:
            sparsity_loss = "step" if target_l0 is None else "quadratic"
        if sparsity_loss not in self.SPARSITY_LOSSES:
            raise ValueError(f"sparsity_loss must be one of {list(self.SPARSITY_LOSSES)}, got {sparsity_loss!r}")
        if sparsity_loss == "quadratic" and target_l0 is None:
            raise ValueError("sparsity_loss='quadratic' needs target_l0 (the L0 the penalty aims at)")
        if sparsity_loss == "step" and target_l0 is not None:
            # λ·L0 with λ driven by a controller cannot pull L0 *up*: at λ = 0 thresholds sitting in a gap of the
            # pre-activation density get no gradient (measured: L0 stuck at half the target with λ → 1e-4)
            raise ValueError("target_l0 goes with sparsity_loss='quadratic' (the default when target_l0 is given) "
                             "or 'tanh', not 'step'")
        quadratic = sparsity_loss == "quadratic"
        if sparsity_coefficient is None:
            sparsity_coefficient = self.QUADRATIC_LAMBDA if quadratic else self.STEP_LAMBDA
        if threshold_lr_scale is None:
            threshold_lr_scale = self.QUADRATIC_THRESHOLD_LR_SCALE if quadratic else 2.0
        if init_l0 == "auto":
            init_l0 = None if target_l0 is None else min(2.0 * float(target_l0), float(d_sae))
        elif isinstance(init_l0, str):
            raise ValueError(f"init_l0 must be a number, None or 'auto', got {init_l0!r}")
        for name, v in (("tanh_scale", tanh_scale), ("pre_act_coefficient", pre_act_coefficient),
                        ("aux_coefficient", aux_coefficient)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.sparsity_loss = sparsity_loss
        self.tanh_scale = float(tanh_scale)
        self.pre_act_coefficient = float(pre_act_coefficient)
        self.ste_to_input = bool(ste_to_input)
        if k_aux is None:
            k_aux = min(max(1, d_in // self.K_AUX_PER_INPUT_DIMS), d_sae)
        self.k_aux = check.k_in_range("k_aux", k_aux, d_sae) if k_aux != 0 else 0
        self.aux_coefficient = float(aux_coefficient)
        if isinstance(aux_rows, bool) or not isinstance(aux_rows, (int, float)) or not 0 < aux_rows <= 1:
            raise ValueError(f"aux_rows must be a fraction of the batch in (0, 1], got {aux_rows!r}")
        self.aux_rows = float(aux_rows)
        self.init_l0 = sparsity_control.check_target_l0(init_l0, d_sae) if init_l0 is not None else None
        if isinstance(threshold_lr_scale, bool) or not isinstance(threshold_lr_scale, (int, float)) or not (
                0 < threshold_lr_scale < math.inf):
            raise ValueError(f"threshold_lr_scale must be a positive number, got {threshold_lr_scale!r}")
        self.threshold_lr_scale = float(threshold_lr_scale)
        if threshold_parameterization not in self.PARAMETERIZATIONS:
            raise ValueError(f"threshold_parameterization must be one of {list(self.PARAMETERIZATIONS)}, "
                             f"got {threshold_parameterization!r}")
        if threshold_init < 0:
            raise ValueError(f"threshold_init must be >= 0, got {threshold_init}")
        if threshold_parameterization == "log" and not threshold_init > 0:
            raise ValueError(f"threshold_init must be > 0 with threshold_parameterization='log', got {threshold_init}")
        self.threshold_parameterization = threshold_parameterization
        self._init_sparsity(sparsity_coefficient, target_l0)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=device))
        th_init = torch.full((d_sae,), float(threshold_init), dtype=self._wide_dtype(), device=device)
        if threshold_parameterization == "log":
            self.log_threshold = nn.Parameter(th_init.log())
        else:
            self.threshold = nn.Parameter(th_init)

        # The bandwidth: fixed (float or [d_sae]) or adapted per latent by the rule of fastsae/adaptive.py.
        if isinstance(bandwidth, AdaptiveBandwidth):
            if adaptive is not None:
                raise ValueError("adaptive options go either in bandwidth=AdaptiveBandwidth(...) or in adaptive=, "
                                 "not both")
            rule = bandwidth
        elif isinstance(bandwidth, str):
            if bandwidth != "adaptive":
                raise ValueError(f"bandwidth must be a float, a [d_sae] tensor or 'adaptive', got {bandwidth!r}")
            rule = AdaptiveBandwidth.from_config(adaptive)
        else:
            if adaptive is not None:
                raise ValueError("adaptive options need bandwidth='adaptive'")
            rule = None
        self.adaptive = rule
        self.register_buffer("bandwidth", check.bandwidth(rule.eps_init if rule else bandwidth, d_sae, th_init))
        self._observed = 0
        if rule is not None:
            # Running statistics are not saved: after a load they re-warm within ~1/(1 - decay) updates,
            # while ε itself (the `bandwidth` buffer) is saved, so nothing jumps.
            for name, t in adaptive_rule.new_state(d_sae, th_init.dtype, device).items():
                self.register_buffer(f"_adaptive_{name}", t, persistent=False)

    @property
    def threshold(self) -> Tensor:
        """θ ``[d_sae]`` (float32, or float64 for a float64 SAE): the parameter itself, or ``exp(log_threshold)``."""
        if self.__dict__.get("threshold_parameterization") == "log":
            return self.log_threshold.exp()
        p = self._parameters.get("threshold")
        if p is None:  # AttributeError (not KeyError) so that hasattr() and nn.Module registration work
            raise AttributeError("threshold")
        return p

    @property
    def controls_sparsity(self) -> bool:
        # "quadratic" aims at target_l0 through its own penalty; the controller drives λ for the others
        return super().controls_sparsity and self.__dict__.get("sparsity_loss") != "quadratic"

    def _training_forward(self, x, dead_mask, coefficient):
        tanh = self.sparsity_loss == "tanh"
        ops = self.ops(x.device)
        out = ops.jumprelu_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold,
                                              self.bandwidth, self.apply_b_dec_to_input,
                                              ste_to_input=self.ste_to_input, need_values=tanh)
        if tanh:
            sparsity = ref.tanh_sparsity(out.values, out.indices, self.W_dec, self.tanh_scale, x.shape[0])
        elif self.sparsity_loss == "quadratic":
            sparsity = ref.quadratic_l0(out.l0, self.target_l0)
        else:
            sparsity = out.l0.mean()
        aux = x.new_zeros(())
        if self.pre_act_coefficient and dead_mask is not None:
            aux = self.pre_act_coefficient * ref.pre_activation_loss(
                self._encoder_input(x), self.W_enc, self.b_enc, self.threshold, self.W_dec, dead_mask)
        if self.k_aux and self.aux_coefficient:
            n = min(x.shape[0], math.ceil(self.aux_rows * x.shape[0]))
            aux = aux + self.aux_coefficient * ref.quiet_auxk_loss(
                self._encoder_input(x[:n]), self.W_enc, self.b_enc, self.W_dec, self.threshold,
                self._target_of(x)[:n] - out.x_hat[:n], self.k_aux, topk=ops.topk, decode=ops.sparse_decode)
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, sparsity, aux, lam, 1.0)

    def latent_axes(self):
        name = "log_threshold" if self.threshold_parameterization == "log" else "threshold"
        return dict(super().latent_axes(), **{name: 0})

    @torch.no_grad()
    def reinit_latents(self, idx, directions, live, probe, fire_rate, encoder_directions=None):
        """θ of each new latent at the quantile of its pre-activations on ``probe`` that gives it the live latents'
        mean firing rate, so it neither starts dead nor dense."""
        super().reinit_latents(idx, directions, live, probe, fire_rate, encoder_directions)
        pre = self._encoder_input(probe.to(self.dtype)) @ self.W_enc[:, idx] + self.b_enc[idx]
        q = min(max(1.0 - fire_rate, 0.0), 1.0 - 1.0 / max(probe.shape[0], 1))
        theta = pre.float().quantile(q, dim=0).clamp_min(0).to(self.threshold.dtype)
        if self.threshold_parameterization == "log":
            self.log_threshold[idx] = theta.clamp_min(torch.finfo(theta.dtype).tiny).log()
        else:
            self.threshold[idx] = theta

    def parameter_groups(self):
        th = self.log_threshold if self.threshold_parameterization == "log" else self.threshold
        rest = [p for p in self.parameters() if p is not th]
        return [(rest, 1.0), ([th], self.threshold_lr_scale)]

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """With ``init_l0``: each θ_j at the quantile of latent j's pre-activations on ``x`` above which it fires
        on ``init_l0 / d_sae`` of the rows, so the fresh SAE has L0 ≈ ``init_l0`` instead of firing on about half
        its latents (θ ≥ 0)."""
        if self.init_l0 is None or x.shape[0] == 0:
            return
        x = x.to(self.dtype)
        rank = max(1, min(x.shape[0], int(round(x.shape[0] * (1 - self.init_l0 / self.d_sae)))))
        theta = torch.empty(self.d_sae, dtype=self.threshold.dtype, device=self.device)
        step = max(1, 2**24 // max(x.shape[0], 1))  # [rows, latents] slabs of at most 16M entries
        x_in = self._encoder_input(x)
        for a in range(0, self.d_sae, step):
            pre = x_in @ self.W_enc[:, a:a + step] + self.b_enc[a:a + step]
            theta[a:a + step] = pre.float().kthvalue(rank, dim=0).values.to(theta.dtype)
        theta.clamp_(min=0)
        if self.threshold_parameterization == "log":
            self.log_threshold.copy_(theta.clamp_min(torch.finfo(theta.dtype).tiny).log())
        else:
            self.threshold.copy_(theta)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        super().apply_constraints()
        if self.threshold_parameterization == "direct":
            self.threshold.clamp_(min=0)

    @torch.no_grad()
    def observe(self, x: Tensor, out: TrainOutput) -> None:
        """The target-L0 controller, then the per-latent bandwidth (``bandwidth="adaptive"`` only) from a
        subsample of the batch ``x``.

        ``pre`` is recomputed under ``no_grad`` on at most ``adaptive.sample_rows`` evenly strided rows,
        so no kernel has to expose it; see ``fastsae/adaptive.py`` for the rule.
        """
        super().observe(x, out)
        rule = self.adaptive
        if rule is None:
            return
        self._observed += 1
        if (self._observed - 1) % rule.every:
            return
        x2 = x.reshape(-1, self.d_in).to(self.dtype)
        B = x2.shape[0]
        if B == 0:
            return
        sub = x2[:: max(1, B // rule.sample_rows)][: rule.sample_rows]
        state = {name: getattr(self, f"_adaptive_{name}") for name in adaptive_rule.STATE}
        adaptive_rule.update(rule, self.bandwidth, state, self._pre(sub), self.threshold, B)

    def _wide_tensors(self) -> list[tuple[dict, str]]:
        names = ["log_threshold" if self.threshold_parameterization == "log" else "threshold"]
        out = super()._wide_tensors() + [(self._parameters, n) for n in names]
        out += [(self._buffers, n) for n in self._buffers if n == "bandwidth" or n.startswith("_adaptive_")]
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept either parameterisation's key (e.g. a SAELens/Gemma Scope `threshold` into a log-θ module).
        direct, log = prefix + "threshold", prefix + "log_threshold"
        if self.threshold_parameterization == "log" and direct in state_dict and log not in state_dict:
            th = state_dict.pop(direct)
            state_dict[log] = th.clamp_min(torch.finfo(th.dtype).tiny).log()
        elif self.threshold_parameterization == "direct" and log in state_dict and direct not in state_dict:
            state_dict[direct] = state_dict.pop(log).exp()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def config(self):
        cfg = dict(super().config(), **self._sparsity_config(),
                   threshold_parameterization=self.threshold_parameterization, sparsity_loss=self.sparsity_loss,
                   tanh_scale=self.tanh_scale, pre_act_coefficient=self.pre_act_coefficient,
                   ste_to_input=self.ste_to_input, init_l0=self.init_l0,
                   threshold_lr_scale=self.threshold_lr_scale, k_aux=self.k_aux,
                   aux_coefficient=self.aux_coefficient, aux_rows=self.aux_rows)
        if self.adaptive is not None:
            cfg.update(bandwidth="adaptive", adaptive=self.adaptive.config())
        return cfg
