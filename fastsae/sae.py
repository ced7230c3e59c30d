"""Drop-in SAE modules: JumpReLUSAE, TopKSAE, BatchTopKSAE, GatedSAE, ReLUSAE.

Parameter names follow SAELens / Gemma Scope (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``, ``threshold``). Modules never branch on hardware: every kernel comes from
``backends.get(self.backend, device)``.

Inputs may be ``[B, d_in]`` or ``[..., d_in]``, any float dtype, contiguous or not. The SAE computes
in its parameters' dtype and returns results in the input's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from ._saver import saver
from .dispatch import Backend, check_name, get as get_backend
from .inference import dense_to_padded, encoder_of  # noqa: F401  (dense_to_padded: kept importable from here)
from . import reference as ref
from . import adaptive as adaptive_rule
from . import sparsity as sparsity_control
from .adaptive import AdaptiveBandwidth


@dataclass
class TrainOutput:
    """One training forward pass.

    loss: the scalar to differentiate. mse: ``mean_b Σ_i (x̂ - x)²``. sparsity: the architecture's
    (unweighted) sparsity penalty (0 for TopK/BatchTopK). aux: AuxK (TopK/BatchTopK) or Gated's
    frozen-decoder reconstruction term (0 elsewhere). l0: mean active latents per row (detached).
    fvu: fraction of variance unexplained in this batch (detached). x_hat: ``[B, d_in]``.
    fired: ``[d_sae]`` bool, latents active on at least one row of the batch.
    """

    loss: Tensor
    mse: Tensor
    sparsity: Tensor
    aux: Tensor
    l0: Tensor
    fvu: Tensor
    x_hat: Tensor
    fired: Tensor


class SAE(nn.Module):
    """Shared machinery of every architecture. Subclasses set ``architecture`` and the encoder."""

    architecture = "base"
    #: decoder rows are renormalised to unit norm after every optimizer step (``apply_constraints``)
    unit_norm_decoder = False

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        backend: str = "auto",
        apply_b_dec_to_input: bool = False,
        decoder_init_norm: float = 1.0,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
    ):
        super().__init__()
        self.d_in = check.positive_int("d_in", d_in)
        self.d_sae = check.positive_int("d_sae", d_sae)
        if isinstance(decoder_init_norm, bool) or not isinstance(decoder_init_norm, (int, float)) or not (
                0 < decoder_init_norm < math.inf):
            raise ValueError(f"decoder_init_norm must be a positive number, got {decoder_init_norm!r}")
        self.decoder_init_norm = float(decoder_init_norm)
        check_name(backend)
        self.backend = backend
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        factory = dict(dtype=dtype, device=device)
        # Decoder rows: random directions of norm decoder_init_norm; encoder initialised to the decoder's transpose.
        # An architecture whose fresh code is dense (JumpReLU, ReLU) starts with small rows: with unit rows and
        # W_enc = W_decᵀ, half of d_sae latents firing reconstruct ~d_sae / (2 d_in) times the input, and the
        # first steps' gradients wreck the random dictionary (measured: 0% of the true features ever recovered).
        W_dec = torch.randn(d_sae, d_in, dtype=torch.float32, device=device)
        W_dec *= self.decoder_init_norm / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.W_enc = nn.Parameter(W_dec.t().contiguous().to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))

    # -- helpers ------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def ops(self, device: Optional[torch.device] = None) -> Backend:
        """The backend this module runs on for tensors on ``device`` (default: its parameters' device)."""
        return get_backend(self.backend, self.device if device is None else device)

    def _flatten(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        check.float_tensor("x", x)
        check.last_dim("x", x, self.d_in, "d_in")
        check.module_device(self, x=x)
        return x.reshape(-1, self.d_in).to(self.dtype), x.shape[:-1]

    def _encoder_input(self, x: Tensor) -> Tensor:
        return ref.encoder_input(x, self.b_dec, self.apply_b_dec_to_input)

    def _pre(self, x: Tensor) -> Tensor:
        return self._encoder_input(x) @ self.W_enc + self.b_enc

    def _dense_code(self, x: Tensor) -> Tensor:
        """``[B, d_sae]`` activations for a flattened input in the parameters' dtype."""
        return self.ops(x.device).encode(encoder_of(self), x)

    # -- public API ---------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Dense activations ``f``: ``[..., d_in] -> [..., d_sae]``, in ``x``'s dtype."""
        x2, lead = self._flatten(x)
        return self._dense_code(x2).reshape(*lead, self.d_sae).to(x.dtype)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The active latents of each row: ``(values [..., K] float, indices [..., K] int64)``.

        ``K`` is the largest number of active latents in any row (``k`` for TopK); shorter rows are
        padded with value 0 at index 0, so ``sparse_decode(values, indices, W_dec, b_dec)`` is exact.
        """
        x2, lead = self._flatten(x)
        values, indices = self._sparse_code(x2)
        K = values.shape[-1]
        return values.reshape(*lead, K).to(x.dtype), indices.reshape(*lead, K)

    def _sparse_code(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.ops(x.device).encode_sparse(encoder_of(self), x)

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``, in ``f``'s dtype."""
        check.float_tensor("f", f)
        check.last_dim("f", f, self.d_sae, "d_sae")
        check.module_device(self, f=f)
        f2 = f.reshape(-1, self.d_sae).to(self.dtype)
        return torch.addmm(self.b_dec, f2, self.W_dec).reshape(*f.shape[:-1], self.d_in).to(f.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``x̂ = decode(encode(x))``, computed through the sparse code."""
        x2, lead = self._flatten(x)
        x_hat = self.ops(x2.device).reconstruct(encoder_of(self), x2, self.W_dec)
        return x_hat.reshape(*lead, self.d_in).to(x.dtype)

    def training_forward(
        self, x: Tensor, target: Optional[Tensor] = None, *, dead_mask: Optional[Tensor] = None,
        sparsity_coefficient: Optional[float] = None
    ) -> TrainOutput:
        """Loss and metrics of one training batch ``x [..., d_in]``.

        ``target [..., d_out]``: reconstruct it instead of ``x`` (a transcoder; ``d_out`` is ``d_in`` for an SAE
        module); every loss term (MSE, AuxK's residual, Matryoshka's prefixes) is then measured against it.
        ``dead_mask [d_sae]`` bool marks latents that have not fired recently (AuxK for TopK/BatchTopK);
        ``sparsity_coefficient`` overrides the module's (the training loop uses it for the warm-up).
        """
        x2, _ = self._flatten(x)
        if dead_mask is not None:
            if not isinstance(dead_mask, Tensor) or dead_mask.shape != (self.d_sae,):
                raise ValueError(f"dead_mask must be a [d_sae]=[{self.d_sae}] bool tensor")
            dead_mask = dead_mask.to(device=x2.device, dtype=torch.bool)
        if target is None:
            return self._training_forward(x2, dead_mask, sparsity_coefficient)
        check.float_tensor("target", target)
        d_out = getattr(self, "d_out", self.d_in)
        check.last_dim("target", target, d_out, "d_out")
        check.module_device(self, target=target)
        if target.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"target must have the leading shape of x {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
        # The architectures' forwards read the target through _target_of (until they take it as an argument).
        self._target = target.reshape(-1, d_out).to(self.dtype)
        try:
            return self._training_forward(x2, dead_mask, sparsity_coefficient)
        finally:
            self._target = None

    def _target_of(self, x: Tensor) -> Tensor:
        """What the loss reconstructs: the ``target`` passed to ``training_forward``, else ``x``."""
        t = self.__dict__.get("_target")
        return x if t is None else t

    def _training_forward(self, x, dead_mask, coefficient) -> TrainOutput:
        raise NotImplementedError

    def _output(self, x, out: ref.SAEForward, sparsity, aux, coefficient, aux_coefficient) -> TrainOutput:
        x = self._target_of(x)
        m = ref.mse(out.x_hat, x)
        loss = m + coefficient * sparsity + aux_coefficient * aux
        with torch.no_grad():
            l0 = out.l0.float().mean() if out.l0.numel() else out.l0.new_zeros(())
            fvu = ref.fvu(out.x_hat, x)
        return TrainOutput(loss=loss, mse=m, sparsity=sparsity, aux=aux, l0=l0, fvu=fvu, x_hat=out.x_hat,
                           fired=out.fired)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project the parameters back onto their constraint set; the trainer calls this after each step."""
        if self.unit_norm_decoder:
            self.normalize_decoder()

    def on_train_step(self, step: int, steps: int) -> None:
        """Training-loop hook, called before every step with the 0-based ``step`` of a run of ``steps``: for
        schedules over the run's progress (BatchTopK's TopK warm-up). The default does nothing."""

    def observe(self, x: Tensor, out: TrainOutput) -> None:
        """Training-loop hook, called after every optimizer step with the batch ``x [B, d_in]`` (in the
        parameters' dtype) and its ``TrainOutput``. Running statistics are updated here: the target-L0
        controller of λ (``target_l0``), JumpReLU's adaptive bandwidth."""
        if self.controls_sparsity:
            sparsity_control.update_log_lambda(self.log_sparsity_coefficient, out.l0, self.target_l0)

    # -- resampling (fastsae/resample.py) --------------------------------------------------------
    def latent_axes(self) -> dict[str, int]:
        """Parameter name -> the axis that indexes latents (for resampling and its optimizer-state reset)."""
        axes = dict(W_enc=1, W_dec=0)
        axes.update({n: 0 for n in ("b_enc", "b_gate", "r_mag", "b_mag") if n in self._parameters})
        return axes

    #: a resampled latent's encoder column, as a fraction of the live latents' median norm (fastsae/resample.py)
    resample_encoder_scale = 0.2

    @torch.no_grad()
    def reinit_latents(self, idx: Tensor, directions: Tensor, live: Tensor, probe: Tensor, fire_rate: float,
                       encoder_directions: Optional[Tensor] = None) -> None:
        """Re-initialise latents ``idx`` along unit ``directions [len(idx), d_out]``: decoder rows at the median
        norm of the ``live [d_sae]`` latents' rows, encoder columns (along ``encoder_directions [len(idx), d_in]``,
        default ``directions``: a transcoder's differ) at ``resample_encoder_scale`` × their median norm,
        biases 0. ``probe`` (scaled inputs) and the live latents' mean ``fire_rate`` on it let an architecture
        calibrate what else it needs."""
        live_idx = live.nonzero().squeeze(1)
        dec_norm = self.W_dec[live_idx].norm(dim=1).median()
        enc_norm = self.W_enc[:, live_idx].norm(dim=0).median()
        enc_dirs = directions if encoder_directions is None else encoder_directions
        self.W_dec[idx] = directions * dec_norm
        self.W_enc[:, idx] = enc_dirs.t() * (enc_norm * self.resample_encoder_scale)
        for name in ("b_enc", "b_gate", "b_mag"):
            if name in self._parameters:
                getattr(self, name)[idx] = 0

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """``(parameters, learning-rate multiplier)`` groups for the optimizer; every parameter once."""
        return [(list(self.parameters()), 1.0)]

    #: :meth:`init_from_data` rescales the encoder so the first reconstruction does not overshoot (set by the
    #: architectures whose fresh code overshoots badly: ReLU, Gated, BatchTopK)
    fit_encoder_scale_at_init = False

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Initialisation that needs data, called by ``fastsae.train`` on a fresh run with a sample ``x [N, d_in]``
        of the (scaled) training data, after ``b_dec`` was set: :meth:`fit_encoder_scale` (when
        ``fit_encoder_scale_at_init``)."""
        if self.fit_encoder_scale_at_init:
            self.fit_encoder_scale(x)

    @torch.no_grad()
    def fit_encoder_scale(self, x: Tensor, batch_size: int = 4096) -> float:
        """Multiply ``W_enc`` by the ``α > 0`` that makes ``α·(x̂ - b_dec)`` the least-squares fit of ``x - b_dec``
        on the sample ``x [N, d_in]``; returns α.

        With ``W_enc = W_decᵀ`` and random unit directions, every latent that fires adds ``(x·w) w`` and the
        first reconstruction overshoots: about ``d_sae / (2 d_in)`` times the input for a dense code (ReLU,
        Gated: 8× on the default job), 1.4-2.5× for BatchTopK (whose batch-wide top-k gives the rows of
        largest norm tens of latents), 1.4× for TopK (which keeps its initialisation: it trains well with it).
        The first steps then spend themselves shrinking every latent at once, and the gradients of that
        overshoot rotate the random decoder rows away from anything in the data (JumpReLU's fix for the same
        problem is its small decoder init, ``decoder_init_norm``). The code of every architecture here is
        positively homogeneous in ``W_enc`` while the encoder biases are 0 (a fresh SAE), so scaling ``W_enc`` by
        α scales the code, and ``x̂ - b_dec``, by exactly α: which latents fire does not change, only the
        overshoot goes.
        """
        x2, _ = self._flatten(x)
        num = torch.zeros((), dtype=torch.float64, device=x2.device)
        den = torch.zeros_like(num)
        for a in range(0, x2.shape[0], batch_size):
            xb = x2[a:a + batch_size]
            y = self._dense_code(xb) @ self.W_dec
            t = xb - self.b_dec
            num += (t.double() * y.double()).sum()
            den += y.double().pow(2).sum()
        if not float(den) > 0 or not float(num) > 0:
            return 1.0
        alpha = float(num / den)
        self.W_enc.mul_(alpha)
        return alpha

    # -- the sparsity coefficient λ, fixed or controlled to reach target_l0 ---------------------
    def _init_sparsity(self, sparsity_coefficient: float, target_l0: Optional[float]) -> None:
        coef = float(sparsity_coefficient)
        if not (coef >= 0 and math.isfinite(coef)):
            raise ValueError(f"sparsity_coefficient must be a finite number >= 0, got {sparsity_coefficient}")
        self._sparsity_coefficient = coef
        self.target_l0 = sparsity_control.check_target_l0(target_l0, self.d_sae)
        if self.controls_sparsity:
            if coef <= 0:
                raise ValueError("sparsity_coefficient (the controller's starting λ) must be > 0 with target_l0")
            self.register_buffer("log_sparsity_coefficient",
                                 torch.tensor(math.log(coef), dtype=self._wide_dtype(), device=self.device))

    @property
    def controls_sparsity(self) -> bool:
        """True when λ is adjusted during training to reach ``target_l0`` (fastsae/sparsity.py)."""
        return self.__dict__.get("target_l0") is not None

    @property
    def sparsity_coefficient(self):
        """λ: a float, or with ``target_l0`` the controller's current value (a 0-d tensor on the module's
        device, so reading it in a training step does not synchronise)."""
        if self.controls_sparsity:
            return self.log_sparsity_coefficient.exp()
        return self._sparsity_coefficient

    @sparsity_coefficient.setter
    def sparsity_coefficient(self, value) -> None:
        self._sparsity_coefficient = float(value)
        if self.controls_sparsity:
            with torch.no_grad():
                self.log_sparsity_coefficient.fill_(math.log(float(value)))

    def _sparsity_config(self) -> dict:
        cfg = dict(sparsity_coefficient=self._sparsity_coefficient)
        if self.target_l0 is not None:
            cfg["target_l0"] = self.target_l0
        return cfg

    # -- tensors that keep full precision whatever the compute dtype ---------------------------
    def _wide_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _wide_tensors(self) -> list[tuple[dict, str]]:
        """``(store, name)`` of the tensors kept in float32 (float64 for a float64 SAE) across ``.to(dtype)``:
        thresholds, bandwidths and controller state, whose small updates a bf16 copy would lose."""
        return [(self._buffers, n) for n in self._buffers if n == "log_sparsity_coefficient"]

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor; keep the originals of the wide ones and re-cast them
        # from full precision, so no round trip through bf16 happens.
        before = {}
        for store, name in self._wide_tensors():
            t = store[name]
            if t is not None and t.is_floating_point():
                before[name] = (t.detach(), None if getattr(t, "grad", None) is None else t.grad.detach())
        super()._apply(fn, recurse)
        wide = self._wide_dtype()
        for store, name in self._wide_tensors():
            if name not in before or store[name].dtype == wide:
                continue
            old, old_grad = before[name]
            cur = store[name]
            fixed = old.to(device=cur.device, dtype=wide)
            if isinstance(cur, nn.Parameter):
                cur.data = fixed
                if old_grad is not None:
                    cur.grad = old_grad.to(device=cur.device, dtype=wide)
            else:
                store[name] = fixed
        return self

    def config(self) -> dict:
        """Constructor arguments that rebuild this module (used by ``save``/``load``)."""
        return dict(
            architecture=self.architecture,
            d_in=self.d_in,
            d_sae=self.d_sae,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def save(self, path, format: str = "fastsae", metadata: Optional[dict] = None) -> None:
        """Write the folder ``path/`` (atomically): ``format="fastsae"`` (``config.json`` + ``sae.safetensors``,
        exact), ``"saelens"`` (a SAELens 6.x folder) or ``"sparsify"`` (TopK); ``fastsae.load`` reads all three.
        ``metadata``: SAELens ``cfg.json`` metadata such as ``hook_name``. See :func:`fastsae.io.save`."""
        saver()(self, path, format=format, metadata=metadata)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, backend={self.backend!r}"


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

    The target-L0 defaults (``target_l0=T``, quadratic loss: λ = 1, θ at 5× the learning rate). A threshold only
    gets a gradient at kernel hits, and once the code is sparse most latents have no hit in a batch, so with Adam
    (β₁ = 0) θ drifts at ~``lr·√P(hit)`` per step *whatever* λ is: with λ = 0.02 and 2× (the old defaults) L0 rose
    from its ``init_l0`` of 2T to ~3.5T while the encoder grew and came down only slowly, ending 50% above the
    target on the quality benchmark's short run (1M tokens) and 75% above it at 2T. λ sets which term of θ's
    gradient wins at a hit: at 0.02 the reconstruction term does for most latents even above the target (L0 still
    1.7T at the end with a 5× θ rate), at λ ≥ 0.3 the penalty does and L0 tracks the rate limit (λ = 0.3 and 1
    gave the same trajectory); the 5× rate then brings L0 to within 3% of T in ~200 steps and keeps it there
    (measured: 4.40 against 4.28, 69% → 84% recovery at that size; 10× was no better).
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
        for name, v in (("tanh_scale", tanh_scale), ("pre_act_coefficient", pre_act_coefficient)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.sparsity_loss = sparsity_loss
        self.tanh_scale = float(tanh_scale)
        self.pre_act_coefficient = float(pre_act_coefficient)
        self.ste_to_input = bool(ste_to_input)
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
        out = self.ops(x.device).jumprelu_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold,
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
            aux = ref.pre_activation_loss(self._encoder_input(x), self.W_enc, self.b_enc, self.threshold, self.W_dec,
                                          dead_mask)
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, sparsity, aux, lam, self.pre_act_coefficient)

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
                   threshold_lr_scale=self.threshold_lr_scale)
        if self.adaptive is not None:
            cfg.update(bandwidth="adaptive", adaptive=self.adaptive.config())
        return cfg


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): ``f = topk(relu((x - b_dec) W_enc + b_enc), k)``, with AuxK for dead latents.

    Args:
        k: active latents per row, in ``1..d_sae``.
        k_aux: dead latents used by AuxK (default ``d_in // 2``, as in sparsify).
        aux_coefficient: α of AuxK (default 1/32).
        dead_after: tokens without firing after which a latent counts as dead (for the trainer).
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
        dead_after: int = 10_000_000,
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
        self.dead_after = check.positive_int("dead_after", dead_after)
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

    ``topk_warmup``: the fraction of a ``fastsae.train`` run (default 1/3) whose training forward keeps each
    row's ``k`` largest activations (TopK, same parameters) instead of the batch's ``B·k`` largest. The batch
    top-k shares the batch's latents out by activation size, which is only meaningful once latents are features:
    with a random dictionary every pre-activation of a row is proportional to the row's norm, so the batch
    top-k hands the rows of largest norm several times their share (measured at the end of a run: mean 8, 95th
    percentile 22, max 49 latents per row) and the others none, and the dictionary does not form (47% of the
    true features recovered on a small version of the CLI job; 95% with the warm-up). :meth:`on_train_step`
    switches it from the run's step, so a resumed run switches at the same step.
    """

    architecture = "batchtopk"
    fit_encoder_scale_at_init = True

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_decay: float = 0.99, topk_warmup: float = 1 / 3,
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

    @torch.no_grad()
    def calibrate(self, x: Tensor, batch_size: Optional[int] = None) -> float:
        """Set ``threshold`` so that ``encode`` keeps ``k`` latents per row on average over ``x [N, d_in]``
        (the smallest of the ``N·k`` largest activations of all rows: BatchTopK over one batch of N rows).
        Returns the threshold."""
        x2, _ = self._flatten(x)
        n_keep = x2.shape[0] * self.k
        batch_size = batch_size or max(1, 2**24 // self.d_sae)  # a [rows, d_sae] slab of at most 16M entries
        kept = None
        for a in range(0, x2.shape[0], batch_size):
            pre = F.relu(self._pre(x2[a:a + batch_size])).reshape(-1)
            pool = pre if kept is None else torch.cat([kept, pre])
            kept = torch.topk(pool, min(n_keep, pool.numel()), sorted=False).values
        positive = kept[kept > 0] if kept is not None else None
        if positive is None or positive.numel() == 0:
            return float(self.threshold)
        self.threshold.fill_(float(positive.min()))
        self._threshold_weight.fill_(1.0)
        return float(self.threshold)

    def config(self):
        return dict(super().config(), threshold_decay=self.threshold_decay, topk_warmup=self.topk_warmup)


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

    def _init_l1_options(self, controller_start, resample_bias) -> None:
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

    λ (``sparsity_coefficient``, default 0.3) is in the units of ``fastsae.train``'s centred input scale
    (``E‖x - E x‖² = 1``), where a feature of a row with L0 active ones has a typical size of ~1/√L0 (0.5 at
    L0 = 4): the penalty shrinks every active latent by λ/2 and keeps a latent silent where it would explain
    less than that, so λ has to be a sizeable fraction of the features' size to silence the other features'
    interference (λ = 0.01, the old default, left a dense code: L0 134 against a true 4 on a small version of
    the CLI job). ``target_l0`` asks for an L0 instead (a controller on log λ, starting at ``sparsity_coefficient``
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
        sparsity_coefficient: float = 0.3,
        target_l0: Optional[float] = None,
        controller_start: float = 0.6,
        resample_bias: str = "rate",
        apply_b_dec_to_input: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, backend=backend, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype,
                         device=device)
        self._init_sparsity(sparsity_coefficient, target_l0)
        self._init_l1_options(controller_start, resample_bias)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=device))

    @torch.no_grad()
    def reinit_latents(self, idx, directions, live, probe, fire_rate, encoder_directions=None):
        """The base re-initialisation, then with ``resample_bias="rate"`` ``b_enc`` at the firing rate of the live
        latents (:meth:`_L1FamilySAE._rate_bias`)."""
        super().reinit_latents(idx, directions, live, probe, fire_rate, encoder_directions)
        if self.resample_bias == "rate":
            self.b_enc[idx] = self._rate_bias(idx, probe, fire_rate)

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
        super().__init__(d_in, d_sae, backend=backend, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype,
                         device=device)
        self._init_sparsity(sparsity_coefficient, target_l0)
        self._init_l1_options(controller_start, resample_bias)
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


ARCHITECTURES = {cls.architecture: cls for cls in (JumpReLUSAE, TopKSAE, AbsTopKSAE, BatchTopKSAE, ReLUSAE,
                                                   GatedSAE)}


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025; SAELens ``matryoshka_batchtopk``, dictionary_learning's
    ``MatryoshkaBatchTopKTrainer``): a BatchTopK SAE whose latents below each width in ``widths`` must also
    reconstruct the input on their own, so early latents learn general features and later ones refinements.

    loss = ``Σ_g mean_b ‖x̂_g - x‖²`` over every width (the full width's term is ``mse``) + α·AuxK, with
    ``x̂_g = b_dec + Σ_{kept j < widths[g]} f_j W_dec[j]``: every prefix is a running sum over each row's kept
    entries sorted by latent (``reference.prefix_reconstructions``), never a dense ``[B, d_sae]`` product.
    Inference is BatchTopK's (the calibrated global threshold). ``widths``: strictly increasing, ending at
    ``d_sae`` (appended when missing, as SAELens does).

    ``topk_warmup`` is BatchTopK's (default 1/3 of a ``fastsae.train`` run): the prefix losses are computed from
    each row's ``k`` largest activations until the switch. Without it (the old default, 0) the batch top-k's
    allocation by row norm while the dictionary is random cost as much here as for BatchTopK: 53.5% → 62.1% of the
    true features recovered on the quality benchmark's realistic data at the true L0 (BatchTopK: 80.5%; the
    prefix losses themselves make the first latents general directions rather than features).
    """

    architecture = "matryoshka_batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int, *, widths: list, **kwargs):
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
        result.loss = result.loss + ref.matryoshka_loss(out.prefixes, self._target_of(x))
        return result

    def config(self):
        return dict(super().config(), widths=list(self.widths))


ARCHITECTURES[MatryoshkaBatchTopKSAE.architecture] = MatryoshkaBatchTopKSAE


# ----------------------------------------------------------------------------------------------
# Transcoders (Dunefsky et al. 2024) and skip transcoders (Paulo et al. 2025): every architecture
# ----------------------------------------------------------------------------------------------


class _EagerSAEForwards(Backend):
    """``inner``'s elementwise and selection kernels, with the whole-SAE forwards of the eager reference: the
    fused SAE kernels assume ``W_dec [d_sae, d_in]``, a transcoder's is ``[d_sae, d_out]``."""

    def __init__(self, inner: Backend):
        self.inner, self.name = inner, inner.name

    def jumprelu(self, pre, threshold, bandwidth):
        return self.inner.jumprelu(pre, threshold, bandwidth)

    def step(self, pre, threshold, bandwidth):
        return self.inner.step(pre, threshold, bandwidth)

    def topk(self, pre, k):
        return self.inner.topk(pre, k)

    def sparse_decode(self, values, indices, W_dec, b_dec):
        return self.inner.sparse_decode(values, indices, W_dec, b_dec)


class _Transcoder:
    """Mixed in before an SAE class: the same encoder, a decoder to ``d_out`` dimensions, and with
    ``skip_connection=True`` an affine skip ``x @ W_skip`` (``W_skip [d_in, d_out]``, zero-initialised).

    ``ŷ = decode(encode(x)) + x @ W_skip``; ``training_forward(x, target)`` reconstructs ``target [..., d_out]``.
    The input is never centred (``b_dec`` lives in the output space; as SAELens and sparsify). A skip transcoder
    trains the inner model on ``target - x @ W_skip`` (the same loss and gradients, W_skip's included), so every
    architecture's loss, AuxK and Matryoshka prefixes carry over unchanged.
    """

    is_transcoder = True
    #: the least-squares encoder rescale compares x̂ with x; a transcoder's output lives in another space, and
    #: init_from_data sees only the inputs
    fit_encoder_scale_at_init = False

    def __init__(self, d_in: int, d_sae: int, *args, d_out: Optional[int] = None, skip_connection: bool = False,
                 apply_b_dec_to_input: bool = False, **kwargs):
        if apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input must be False for a transcoder (b_dec is the output bias)")
        super().__init__(d_in, d_sae, *args, apply_b_dec_to_input=False, **kwargs)
        self.d_out = check.positive_int("d_out", d_out if d_out is not None else d_in)
        self.skip_connection = bool(skip_connection)
        device = self.W_enc.device
        W_dec = torch.randn(d_sae, self.d_out, dtype=torch.float32, device=device)
        W_dec *= self.decoder_init_norm / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(self.dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, dtype=self.dtype, device=device))
        if self.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_in, self.d_out, dtype=self.dtype, device=device))

    @property
    def base_architecture(self) -> str:
        return self.architecture.removesuffix("_transcoder")

    def ops(self, device=None):
        inner = super().ops(device)
        return inner if self.d_out == self.d_in else _EagerSAEForwards(inner)

    def _skip(self, x2: Tensor) -> Optional[Tensor]:
        return x2 @ self.W_skip if self.skip_connection else None

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_out]`` (without the skip term, which needs ``x``)."""
        check.float_tensor("f", f)
        check.last_dim("f", f, self.d_sae, "d_sae")
        check.module_device(self, f=f)
        f2 = f.reshape(-1, self.d_sae).to(self.dtype)
        return (f2 @ self.W_dec + self.b_dec).reshape(*f.shape[:-1], self.d_out).to(f.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The transcoder's output ``ŷ [..., d_out]`` for ``x [..., d_in]``."""
        x2, lead = self._flatten(x)
        values, indices = self._sparse_code(x2)
        y = self.ops(x2.device).sparse_decode(values, indices, self.W_dec, self.b_dec)
        skip = self._skip(x2)
        y = y if skip is None else y + skip
        return y.reshape(*lead, self.d_out).to(x.dtype)

    def training_forward(self, x: Tensor, target: Optional[Tensor] = None, **kwargs) -> TrainOutput:
        if target is None:
            if self.d_out != self.d_in:
                raise ValueError(f"a transcoder to d_out={self.d_out} needs target= (what it predicts from x)")
            target = x
        if not self.skip_connection:
            return super().training_forward(x, target, **kwargs)
        check.float_tensor("x", x)
        check.last_dim("x", x, self.d_in, "d_in")
        check.float_tensor("target", target)
        check.last_dim("target", target, self.d_out, "d_out")
        if target.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"target must have the leading shape of x {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
        x2 = x.reshape(-1, self.d_in)
        skip = x2.to(self.dtype) @ self.W_skip
        t2 = target.reshape(-1, self.d_out).to(self.dtype)
        out = super().training_forward(x2, t2 - skip, **kwargs)
        out.x_hat = out.x_hat + skip
        with torch.no_grad():
            out.fvu = ref.fvu(out.x_hat, t2)
        return out

    def config(self) -> dict:
        cfg = dict(super().config(), d_out=self.d_out, skip_connection=self.skip_connection)
        cfg.pop("apply_b_dec_to_input", None)
        return cfg

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_out={self.d_out}, skip_connection={self.skip_connection}"


def _transcoder_class(base: type) -> type:
    name = base.__name__.removesuffix("SAE") + "Transcoder"
    doc = f"{base.__name__} as a transcoder: ``x [..., d_in] -> ŷ [..., d_out]``; see :class:`_Transcoder`."
    return type(name, (_Transcoder, base), dict(architecture=f"{base.architecture}_transcoder", __doc__=doc,
                                               __module__=__name__))


ReLUTranscoder, JumpReLUTranscoder, TopKTranscoder, AbsTopKTranscoder, BatchTopKTranscoder, \
    MatryoshkaBatchTopKTranscoder, GatedTranscoder = TRANSCODERS = tuple(
        _transcoder_class(c) for c in (ReLUSAE, JumpReLUSAE, TopKSAE, AbsTopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE,
                                       GatedSAE))
ARCHITECTURES.update((cls.architecture, cls) for cls in TRANSCODERS)


def Transcoder(architecture: str, d_in: int, d_sae: int, *args, d_out: Optional[int] = None,
               skip_connection: bool = False, **kwargs) -> SAE:
    """A transcoder of any architecture (``"relu"``, ``"jumprelu"``, ``"topk"``, ``"abstopk"``, ``"batchtopk"``,
    ``"matryoshka_batchtopk"``, ``"gated"``) mapping ``d_in`` to ``d_out`` (default ``d_in``); the architecture's
    own arguments pass through (``k=``, ``widths=``, ``sparsity_coefficient=``, ...)."""
    cls = ARCHITECTURES.get(f"{architecture}_transcoder")
    if cls is None:
        names = sorted(c.architecture.removesuffix("_transcoder") for c in TRANSCODERS)
        raise ValueError(f"architecture must be one of {names}, got {architecture!r}")
    return cls(d_in, d_sae, *args, d_out=d_out, skip_connection=skip_connection, **kwargs)
