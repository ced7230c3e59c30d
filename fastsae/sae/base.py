"""What every SAE shares: :class:`TrainOutput` (one training forward pass) and :class:`SAE` (parameters,
backend choice, encode / decode / forward, the training forward, initialisation from data, resampling, saving).

The architectures subclass it: :mod:`fastsae.sae.jumprelu`, :mod:`fastsae.sae.topk`, :mod:`fastsae.sae.l1`,
:mod:`fastsae.sae.transcoder`. Everything is importable from ``fastsae.sae``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import _checks as check
from .._saver import saver
from ..dispatch import Backend, check_name, get as get_backend
from ..inference import encoder_of
from .. import reference as ref
from .. import sparsity as sparsity_control


@dataclass
class TrainOutput:
    """One training forward pass.

    loss: the scalar to differentiate. mse: ``mean_b Σ_i (x̂ - x)²``. sparsity: the architecture's
    (unweighted) sparsity penalty (0 for TopK/BatchTopK). aux: AuxK (TopK/BatchTopK), Gated's
    frozen-decoder reconstruction term, or JumpReLU's AuxK and pre-activation loss (already weighted). l0: mean active latents per row (detached).
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

    def on_train_end(self, x: Tensor, target: Optional[Tensor] = None) -> None:
        """Training-loop hook, called once after the last step with fresh rows ``x [N, d_in]`` scaled as training
        saw them (a transcoder's ``target`` too): for fits to the trained model (BatchTopK's inference threshold,
        ReLU's magnitudes). The default does nothing."""

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
