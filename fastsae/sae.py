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
        raise NotImplementedError

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
        return dense_to_padded(self._dense_code(x))

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``, in ``f``'s dtype."""
        check.float_tensor("f", f)
        check.last_dim("f", f, self.d_sae, "d_sae")
        check.module_device(self, f=f)
        f2 = f.reshape(-1, self.d_sae).to(self.dtype)
        return (f2 @ self.W_dec + self.b_dec).reshape(*f.shape[:-1], self.d_in).to(f.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``x̂ = decode(encode(x))``, computed through the sparse code."""
        x2, lead = self._flatten(x)
        values, indices = self._sparse_code(x2)
        x_hat = self.ops(x2.device).sparse_decode(values, indices, self.W_dec, self.b_dec)
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

    def save(self, path, format: str = "fastsae", metadata: Optional[dict] = None) -> None:
        """Write the folder ``path/`` (atomically): ``format="fastsae"`` (``config.json`` + ``sae.safetensors``,
        exact), ``"saelens"`` (a SAELens 6.x folder) or ``"sparsify"`` (TopK); ``fastsae.load`` reads all three.
        ``metadata``: SAELens ``cfg.json`` metadata such as ``hook_name``. See :func:`fastsae.io.save`."""
        from .io import save

        save(self, path, format=format, metadata=metadata)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, backend={self.backend!r}"


def dense_to_padded(f: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``[B, d_sae]`` -> padded ``(values, indices) [B, K]`` of the nonzero entries, K = max row count.

    Each row's active latents come first, in latent order; the rest is padding (value 0, index 0).
    One pass over ``f`` plus O(nnz) work: no sort over ``d_sae``.
    """
    B = f.shape[0]
    rows, cols = (f != 0).nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=B)
    K = int(counts.max()) if B else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=f.device) - starts[rows]
    values = f.new_zeros(B, K)
    indices = torch.zeros(B, K, dtype=torch.long, device=f.device)
    values[rows, slot] = f[rows, cols]
    indices[rows, slot] = cols
    return values, indices


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

    def _dense_code(self, x):
        return self.ops(x.device).jumprelu(self._pre(x), self.threshold, self.bandwidth)

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

    def _sparse_code(self, x):
        ops = self.ops(x.device)
        return ops.topk(F.relu(self._pre(x)), self.k)

    def _dense_code(self, x):
        values, indices = self._sparse_code(x)
        return ref.topk_scatter(values, indices, self.d_sae)

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

    def _dense_code(self, x):
        pre = F.relu(self._pre(x))
        if self.calibrated:
            return pre * (pre > self.threshold)
        n_keep = min(x.shape[0] * self.k, pre.numel())
        vals, idx = torch.topk(pre.reshape(-1), n_keep, sorted=False)
        return torch.zeros_like(pre).reshape(-1).scatter(0, idx, vals).reshape(pre.shape)

    def _sparse_code(self, x):
        return dense_to_padded(self._dense_code(x))

    def _sae_forward(self, ops, x):
        out = ops.batchtopk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k,
                                self.apply_b_dec_to_input)
        self._update_threshold(out)
        return out

    def _update_threshold(self, out) -> None:
        if self.training and out.min_kept is not None:
            with torch.no_grad():
                m = out.min_kept.float()
                if self.calibrated:
                    self.threshold.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * m)
                else:
                    self.threshold.copy_(m)

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

    def _dense_code(self, x):
        return F.relu(self._pre(x))

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

    def _dense_code(self, x):
        x_in = self._encoder_input(x)
        gate = (x_in @ self.W_enc + self.b_gate) > 0
        mag = F.relu(x_in @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag)
        return gate.to(mag.dtype) * mag

    def _training_forward(self, x, dead_mask, coefficient):
        args = (x, self.W_enc, self.b_gate, self.r_mag, self.b_mag, self.W_dec, self.b_dec, self.apply_b_dec_to_input)
        if self.__dict__.get("_target") is None:
            out = self.ops(x.device).gated_sae(*args)
        else:  # the frozen-decoder term reconstructs the target too (no fused kernel has a gated transcoder)
            out = ref.gated_sae_forward(*args, target=self._target_of(x))
        lam = self.sparsity_coefficient if coefficient is None else coefficient
        return self._output(x, out, out.sparsity.mean(), out.aux, lam, 1.0)

    def config(self):
        return dict(super().config(), sparsity_coefficient=self.sparsity_coefficient)


ARCHITECTURES = {cls.architecture: cls for cls in (JumpReLUSAE, TopKSAE, BatchTopKSAE, ReLUSAE, GatedSAE)}


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025; SAELens ``matryoshka_batchtopk``, dictionary_learning's
    ``MatryoshkaBatchTopKTrainer``): a BatchTopK SAE whose latents below each width in ``widths`` must also
    reconstruct the input on their own, so early latents learn general features and later ones refinements.

    loss = ``Σ_g mean_b ‖x̂_g - x‖²`` over every width (the full width's term is ``mse``) + α·AuxK, with
    ``x̂_g = b_dec + Σ_{kept j < widths[g]} f_j W_dec[j]``: every prefix is a running sum over each row's kept
    entries sorted by latent (``reference.prefix_reconstructions``), never a dense ``[B, d_sae]`` product.
    Inference is BatchTopK's (the calibrated global threshold). ``widths``: strictly increasing, ending at
    ``d_sae`` (appended when missing, as SAELens does).
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

    def _sae_forward(self, ops, x):
        out = ops.matryoshka_batchtopk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.widths,
                                           self.apply_b_dec_to_input)
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

    def __init__(self, d_in: int, d_sae: int, *args, d_out: Optional[int] = None, skip_connection: bool = False,
                 apply_b_dec_to_input: bool = False, **kwargs):
        if apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input must be False for a transcoder (b_dec is the output bias)")
        super().__init__(d_in, d_sae, *args, apply_b_dec_to_input=False, **kwargs)
        self.d_out = check.positive_int("d_out", d_out if d_out is not None else d_in)
        self.skip_connection = bool(skip_connection)
        device = self.W_enc.device
        W_dec = torch.randn(d_sae, self.d_out, dtype=torch.float32, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
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


ReLUTranscoder, JumpReLUTranscoder, TopKTranscoder, BatchTopKTranscoder, MatryoshkaBatchTopKTranscoder, \
    GatedTranscoder = TRANSCODERS = tuple(_transcoder_class(c) for c in (ReLUSAE, JumpReLUSAE, TopKSAE, BatchTopKSAE,
                                                                          MatryoshkaBatchTopKSAE, GatedSAE))
ARCHITECTURES.update((cls.architecture, cls) for cls in TRANSCODERS)


def Transcoder(architecture: str, d_in: int, d_sae: int, *args, d_out: Optional[int] = None,
               skip_connection: bool = False, **kwargs) -> SAE:
    """A transcoder of any architecture (``"relu"``, ``"jumprelu"``, ``"topk"``, ``"batchtopk"``,
    ``"matryoshka_batchtopk"``, ``"gated"``) mapping ``d_in`` to ``d_out`` (default ``d_in``); the architecture's
    own arguments pass through (``k=``, ``widths=``, ``sparsity_coefficient=``, ...)."""
    cls = ARCHITECTURES.get(f"{architecture}_transcoder")
    if cls is None:
        names = sorted(c.architecture.removesuffix("_transcoder") for c in TRANSCODERS)
        raise ValueError(f"architecture must be one of {names}, got {architecture!r}")
    return cls(d_in, d_sae, *args, d_out=d_out, skip_connection=skip_connection, **kwargs)
