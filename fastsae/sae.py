"""Drop-in SAE modules: JumpReLUSAE, TopKSAE, BatchTopKSAE, GatedSAE, ReLUSAE.

Parameter names follow SAELens / Gemma Scope (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``, ``threshold``). Modules never branch on hardware: every kernel comes from
``backends.get(self.backend, device)``.

Inputs may be ``[B, d_in]`` or ``[..., d_in]``, any float dtype, contiguous or not. The SAE computes
in its parameters' dtype and returns results in the input's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from .backends import Backend, check_name, get as get_backend
from .inference import dense_to_padded, encoder_of  # noqa: F401  (dense_to_padded: kept importable from here)
from . import reference as ref
from . import adaptive as adaptive_rule
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
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
    ):
        super().__init__()
        self.d_in = check.positive_int("d_in", d_in)
        self.d_sae = check.positive_int("d_sae", d_sae)
        check_name(backend)
        self.backend = backend
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        factory = dict(dtype=dtype, device=device)
        # Decoder rows: random unit directions; encoder initialised to the decoder's transpose.
        W_dec = torch.randn(d_sae, d_in, dtype=torch.float32, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
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
        self, x: Tensor, *, dead_mask: Optional[Tensor] = None, sparsity_coefficient: Optional[float] = None
    ) -> TrainOutput:
        """Loss and metrics of one training batch ``x [..., d_in]``.

        ``dead_mask [d_sae]`` bool marks latents that have not fired recently (AuxK for TopK/BatchTopK);
        ``sparsity_coefficient`` overrides the module's (the training loop uses it for the warm-up).
        """
        x2, _ = self._flatten(x)
        if dead_mask is not None:
            if not isinstance(dead_mask, Tensor) or dead_mask.shape != (self.d_sae,):
                raise ValueError(f"dead_mask must be a [d_sae]=[{self.d_sae}] bool tensor")
            dead_mask = dead_mask.to(device=x2.device, dtype=torch.bool)
        return self._training_forward(x2, dead_mask, sparsity_coefficient)

    def _training_forward(self, x, dead_mask, coefficient) -> TrainOutput:
        raise NotImplementedError

    def _output(self, x, out: ref.SAEForward, sparsity, aux, coefficient, aux_coefficient) -> TrainOutput:
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

    def observe(self, x: Tensor, out: TrainOutput) -> None:
        """Training-loop hook, called after every optimizer step with the batch ``x [B, d_in]`` (in the
        parameters' dtype) and its ``TrainOutput``. Architectures with running statistics (e.g. an adaptive
        JumpReLU bandwidth) update them here; the default keeps none."""

    def config(self) -> dict:
        """Constructor arguments that rebuild this module (used by ``save``/``load``)."""
        return dict(
            architecture=self.architecture,
            d_in=self.d_in,
            d_sae=self.d_sae,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def save(self, path) -> None:
        """Write ``path/`` as ``config.json`` + ``sae.safetensors`` (atomically); ``fastsae.load`` reads it back."""
        from .io import save

        save(self, path)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, backend={self.backend!r}"


class JumpReLUSAE(SAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): ``f = pre · H(pre - θ)``, L0 penalty via pseudo-derivatives.

    Args:
        bandwidth: ε of the rectangle kernel: a float, a per-latent ``[d_sae]`` tensor, or ``"adaptive"``
            (or a :class:`fastsae.adaptive.AdaptiveBandwidth`) for a per-latent ε adapted during training
            from running statistics of each latent's pre-activations near its threshold (see
            ``fastsae/adaptive.py``; updated in :meth:`observe`, which the training loop calls).
        sparsity_coefficient: λ of the L0 penalty.
        threshold_init: initial θ (the paper: 0.001, for inputs with mean squared norm 1).
        threshold_parameterization: ``"direct"`` (default): θ is the parameter, clamped at 0 after each
            step, so Adam moves it by about ``lr`` per step; ``"log"`` (the paper): the parameter is
            ``log_threshold`` and ``threshold`` is its exponential (moves only about ``θ · lr`` per step).
        adaptive: options of the adaptive rule (a dict of :class:`~fastsae.adaptive.AdaptiveBandwidth`
            fields), only with ``bandwidth="adaptive"``.
    θ (and ε) are kept in float32 (float64 for a float64 SAE) whatever the module's compute dtype, also
    across ``.to(dtype)``: a bf16 threshold stops learning once its updates fall below its precision.
    """

    architecture = "jumprelu"
    PARAMETERIZATIONS = ("direct", "log")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        bandwidth: Union[float, Tensor, str, "AdaptiveBandwidth"] = 1e-3,
        sparsity_coefficient: float = 1e-3,
        threshold_init: float = 1e-3,
        threshold_parameterization: str = "direct",
        adaptive: Optional[dict] = None,
        apply_b_dec_to_input: bool = False,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, backend=backend, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype,
                         device=device)
        if threshold_parameterization not in self.PARAMETERIZATIONS:
            raise ValueError(f"threshold_parameterization must be one of {list(self.PARAMETERIZATIONS)}, "
                             f"got {threshold_parameterization!r}")
        if threshold_init < 0:
            raise ValueError(f"threshold_init must be >= 0, got {threshold_init}")
        if threshold_parameterization == "log" and not threshold_init > 0:
            raise ValueError(f"threshold_init must be > 0 with threshold_parameterization='log', got {threshold_init}")
        self.sparsity_coefficient = float(sparsity_coefficient)
        self.threshold_parameterization = threshold_parameterization
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

    def _wide_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def threshold(self) -> Tensor:
        """θ ``[d_sae]`` (float32, or float64 for a float64 SAE): the parameter itself, or ``exp(log_threshold)``."""
        if self.__dict__.get("threshold_parameterization") == "log":
            return self.log_threshold.exp()
        p = self._parameters.get("threshold")
        if p is None:  # AttributeError (not KeyError) so that hasattr() and nn.Module registration work
            raise AttributeError("threshold")
        return p

    def _training_forward(self, x, dead_mask, coefficient):
        out = self.ops(x.device).jumprelu_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold,
                                              self.bandwidth, self.apply_b_dec_to_input)
        sparsity = out.l0.mean()
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, sparsity, x.new_zeros(()), lam, 0.0)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        super().apply_constraints()
        if self.threshold_parameterization == "direct":
            self.threshold.clamp_(min=0)

    @torch.no_grad()
    def observe(self, x: Tensor, out: TrainOutput) -> None:
        """Adapt the per-latent bandwidth (``bandwidth="adaptive"`` only) from a subsample of the batch ``x``.

        ``pre`` is recomputed under ``no_grad`` on at most ``adaptive.sample_rows`` evenly strided rows,
        so no kernel has to expose it; see ``fastsae/adaptive.py`` for the rule.
        """
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
        out = [(self._parameters, n) for n in names]
        out += [(self._buffers, n) for n in self._buffers if n == "bandwidth" or n.startswith("_adaptive_")]
        return out

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor; θ and ε must stay float32 (float64 for a float64 SAE).
        # Keep the originals and re-cast them from full precision, so no round trip through bf16 happens.
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
        cfg = dict(super().config(), sparsity_coefficient=self.sparsity_coefficient,
                   threshold_parameterization=self.threshold_parameterization)
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
        aux = x.new_zeros(())
        if dead_mask is not None and x.shape[0]:
            e_hat = ref.auxk_reconstruction(self._encoder_input(x), self.W_enc, self.b_enc, self.W_dec, dead_mask,
                                            self.k_aux, topk=ops.topk, decode=ops.sparse_decode)
            if e_hat is not None:
                aux = ref.auxk_loss((x - out.x_hat).detach(), e_hat)
        return self._output(x, out, x.new_zeros(()), aux, 0.0, self.aux_coefficient)

    def config(self):
        return dict(super().config(), k=self.k, k_aux=self.k_aux, aux_coefficient=self.aux_coefficient,
                    dead_after=self.dead_after)


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024): keep the ``B·k`` largest activations of the whole batch.

    During training the module keeps an exponential moving average of the smallest kept activation
    (``threshold``, a buffer). Once calibrated, ``encode`` uses it as a global JumpReLU threshold, so
    inference no longer depends on the batch; before that, ``encode`` applies the batch top-k.
    """

    architecture = "batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_decay: float = 0.999, **kwargs):
        super().__init__(d_in, d_sae, k, **kwargs)
        if not 0.0 <= threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must lie in [0, 1), got {threshold_decay}")
        self.threshold_decay = float(threshold_decay)
        # -1 marks "not calibrated yet"; calibrated thresholds are >= 0.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=self.device))

    @property
    def calibrated(self) -> bool:
        return bool(self.threshold >= 0)

    def _sae_forward(self, ops, x):
        out = ops.batchtopk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k,
                                self.apply_b_dec_to_input)
        if self.training and out.min_kept is not None:
            with torch.no_grad():
                m = out.min_kept.float()
                if self.calibrated:
                    self.threshold.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * m)
                else:
                    self.threshold.copy_(m)
        return out

    def config(self):
        return dict(super().config(), threshold_decay=self.threshold_decay)


class ReLUSAE(SAE):
    """ReLU SAE: ``f = relu(x W_enc + b_enc)``, loss ``MSE + λ Σ_j f_j ‖W_dec[j]‖``."""

    architecture = "relu"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        sparsity_coefficient: float = 1e-2,
        apply_b_dec_to_input: bool = False,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, backend=backend, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype,
                         device=device)
        self.sparsity_coefficient = float(sparsity_coefficient)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=device))

    def _training_forward(self, x, dead_mask, coefficient):
        out = self.ops(x.device).relu_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                          self.apply_b_dec_to_input)
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, out.sparsity.mean(), x.new_zeros(()), lam, 0.0)

    def config(self):
        return dict(super().config(), sparsity_coefficient=self.sparsity_coefficient)


class GatedSAE(SAE):
    """Gated SAE (Rajamanoharan et al. 2024). ``W_enc`` is the gate matrix; ``W_mag = exp(r_mag) ⊙ W_enc``.

    ``f = H(π_gate) ⊙ relu(π_mag)``; loss ``MSE + λ‖relu(π_gate)‖₁ + ‖x - x̂_frozen(relu(π_gate))‖²``
    with detached decoder weights in the last term; decoder rows are kept at unit norm.
    """

    architecture = "gated"
    unit_norm_decoder = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        sparsity_coefficient: float = 1e-2,
        apply_b_dec_to_input: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__(d_in, d_sae, backend=backend, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype,
                         device=device)
        self.sparsity_coefficient = float(sparsity_coefficient)
        factory = dict(dtype=self.dtype, device=device)
        self.b_gate = nn.Parameter(torch.zeros(d_sae, **factory))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, **factory))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, **factory))

    def _training_forward(self, x, dead_mask, coefficient):
        out = self.ops(x.device).gated_sae(x, self.W_enc, self.b_gate, self.r_mag, self.b_mag, self.W_dec,
                                           self.b_dec, self.apply_b_dec_to_input)
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, out.sparsity.mean(), out.aux, lam, 1.0)

    def config(self):
        return dict(super().config(), sparsity_coefficient=self.sparsity_coefficient)


ARCHITECTURES = {cls.architecture: cls for cls in (JumpReLUSAE, TopKSAE, BatchTopKSAE, ReLUSAE, GatedSAE)}
