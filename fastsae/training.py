"""The training loop: ``fastsae.train(sae, data, steps=...)``.

One step is: next batch -> ``sae.training_forward`` -> ``loss.backward()`` -> Adam step ->
``sae.apply_constraints()`` -> ``sae.observe``. Around it: a dataset-wide input scale (folded into the
weights at the end), ``b_dec`` initialised from the data, learning-rate warm-up and decay, a linear
sparsity-coefficient warm-up, dead-latent tracking for AuxK, metrics as JSON lines, a progress bar,
atomic checkpoints (safetensors + JSON, no pickle) that a resumed run continues from exactly, and a sync-free
per-step check that stops training on non-finite state (:class:`FiniteCheck`).

The pieces are small functions on purpose (data iteration, the gradient step, metric reduction,
checkpoint I/O), so a distributed trainer can wrap them: all-reduce the gradients after
``backward``, reduce the metric sums in :func:`reduce_metrics`, write checkpoints from one rank.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .data import ActivationSource, as_source, batches
from .sae import SAE, TrainOutput

__all__ = ["train", "TrainResult", "default_hyperparameters", "fold_input_scale", "estimate_input_scale",
           "geometric_median", "CHECKPOINT", "FiniteCheck", "TrainingInterrupted", "paired_rows"]

CHECKPOINT = "checkpoint.safetensors"
OLD_CHECKPOINT = "checkpoint.pt"  # the pickle format before version 2: refused, never read
#: rows of the data that set BatchTopK's inference threshold at the end of training
CALIBRATION_ROWS = 16384
METRICS = "metrics.jsonl"
#: what each metrics record holds, in the order accumulated per step
_SUMS = ("loss", "mse", "fvu", "l0", "sparsity", "aux")


# ----------------------------------------------------------------------------------------------
# Defaults from the papers
# ----------------------------------------------------------------------------------------------


def default_hyperparameters(sae: SAE) -> dict:
    """Adam ``lr`` and ``betas`` for ``sae``'s architecture.

    - TopK / BatchTopK (Gao et al. 2024; sparsify): ``lr = 2e-4 / sqrt(d_sae / 2**14)``, β = (0.9, 0.999).
    - JumpReLU (Rajamanoharan et al. 2024): β = (0, 0.999). The paper's 7e-5 is for billions of tokens on
      d_sae ≥ 16k; we use twice the TopK width rule (4e-4 at 16k latents, larger for narrower SAEs): thresholds
      and encoder columns must both cross the pre-activation range within a short run, and on the realistic
      synthetic data (quality benchmark, target L0 = 0.5/1/2× the true L0) 2× raised recovery from 79/84/54% to
      89/85/66% (TopK with its own rule: 80/84/65%); the paper's order of magnitude at 16k-131k latents.
    - Gated (Rajamanoharan et al. 2024): β = (0, 0.999); ReLU (Anthropic's April 2024 update): β = (0.9, 0.999).
    - An architecture's ``default_lr_scale`` multiplies the width rule (ReLU and Gated: 2, measured in
      ``fastsae.sae._L1FamilySAE``).
    """
    lr = 2e-4 / math.sqrt(sae.d_sae / 2**14) * (2.0 if sae.architecture == "jumprelu" else 1.0)
    lr *= float(getattr(sae, "default_lr_scale", 1.0))
    betas = (0.0, 0.999) if sae.architecture in ("jumprelu", "gated") else (0.9, 0.999)
    return dict(lr=lr, betas=betas)


# ----------------------------------------------------------------------------------------------
# Input scale and initialisation
# ----------------------------------------------------------------------------------------------


def estimate_input_scale(sample: Tensor) -> float:
    """The scalar ``s`` with ``mean ‖s·(x - mean x)‖² = 1`` over ``sample [N, d_in]``.

    Centred: what an SAE has to explain is the variation around the mean (``b_dec`` carries the mean), and a
    residual stream's mean is often larger than its variation. With ``E‖s·x‖² = 1`` (the JumpReLU paper's
    convention) a mean offset 3× the signal shrinks every feature ~3× in the scaled space, so sparsity
    coefficients, bandwidths and thresholds tuned on one data set are off by ~10× on the next (measured on
    ``fastsae.data.realistic``: TopK at the true L0 recovered 66% of the features with the uncentred scale, 73%
    with this one). On data without an offset the two agree.
    """
    sample = sample.double()
    if not bool(torch.isfinite(sample).all()):
        raise FloatingPointError("data contains NaN or inf values (found while estimating the input scale)")
    msq = float((sample - sample.mean(0)).pow(2).sum(-1).mean()) if sample.shape[0] > 1 else 0.0
    if msq <= 0:
        msq = float(sample.pow(2).sum(-1).mean())  # one distinct row: no variation to measure, use its norm
    if msq <= 0:
        raise ValueError("data is all zeros: cannot estimate an input scale")
    return 1.0 / math.sqrt(msq)


def geometric_median(points: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points [N, d]``."""
    points = points.double()
    y = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * points).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-6 * y.norm().clamp_min(eps):
            return y_new
        y = y_new
    return y


@torch.no_grad()
def fold_input_scale(sae: SAE, scale: float, target_scale: Optional[float] = None) -> None:
    """Make an SAE trained on ``scale · x`` work on raw ``x``, exactly.

    ``(s·x - b_dec) W_enc = (x - b_dec/s)(s·W_enc)``: pre-activations (hence ``b_enc``, ``threshold``, the
    gates) are unchanged; the reconstruction ``f W_dec + b_dec`` is divided by ``s``. A transcoder trained on
    ``(s·x, t·y)`` (``target_scale`` t): the output is divided by ``t`` and the skip ``W_skip`` scaled by ``s/t``.
    """
    t = scale if target_scale is None else target_scale
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(t)
    sae.b_dec.div_(t)
    if getattr(sae, "W_skip", None) is not None:
        sae.W_skip.mul_(scale / t)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup: int, decay: int) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the last ``decay`` steps.
    ``step`` is 0-based (the step about to be taken)."""
    f = 1.0
    if warmup > 0:
        f = min(f, (step + 1) / warmup)
    if decay > 0:
        f = min(f, (steps - step) / decay)
    return max(f, 0.0)


def sparsity_factor(step: int, warmup: int) -> float:
    """Linear warm-up of the sparsity coefficient from 0 (the JumpReLU paper; SAELens' ``l0_warm_up_steps``)."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


# ----------------------------------------------------------------------------------------------
# State, metrics, checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns. ``sae`` works on raw activations (the input scale is folded in)."""

    sae: SAE
    metrics: list  # one dict per logged step (also written as JSON lines)
    input_scale: float
    steps: int  # steps completed
    tokens: int
    seconds: float  # wall time of this call
    run_tokens: int = 0  # tokens trained on by this call (after a resume: only the new ones)

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}


@dataclass
class _State:
    step: int
    tokens: int
    scale: float
    since_fired: Tensor  # [d_sae] int64: tokens since each latent last fired
    sums: Tensor  # [len(_SUMS)] float64 metric sums since the last log
    n_summed: int
    metrics: list = field(default_factory=list)
    target_scale: Optional[float] = None  # a transcoder's targets' own scale (None: the input scale)
    resampled: int = 0  # latents resampled so far (fastsae/resample.py)


# A checkpoint is one safetensors file: every tensor (module parameters and *all* buffers, persistent or not;
# optimizer state; RNG states as bytes; the loop's counters) under a structured name, and everything else as
# JSON in the header's metadata. One file, so one rename makes a new checkpoint visible all at once, and
# nothing in it can execute code when read (the old pickle format is refused, never unpickled).
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "fastsae-checkpoint", 2
_META_KEY = "fastsae.checkpoint"


def _rng_state(tensors: dict) -> dict:
    """The RNG states: generator bytes as uint8 tensors into ``tensors``, their small scalars returned as JSON."""
    tensors["rng.torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
            n_cuda += 1
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype="<u4").view(np.uint8).copy())
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.from_numpy(np.asarray(internal, dtype="<u4").view(np.uint8).copy())
    return dict(numpy=dict(name=name, pos=int(pos), has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                python=dict(version=version, gauss_next=gauss_next), cuda=n_cuda)


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    m = meta["numpy"]
    np.random.set_state((m["name"], tensors["rng.numpy"].numpy().view("<u4").astype(np.uint32), m["pos"],
                         m["has_gauss"], m["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(int(v) for v in tensors["rng.python"].numpy().view("<u4")),
                     py["gauss_next"]))
    if meta.get("cuda") and torch.cuda.is_available():
        n = min(meta["cuda"], torch.cuda.device_count())
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(n)])


def _module_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter and every buffer, persistent or not (running statistics such as the adaptive bandwidth's,
    controllers' state: whatever a module registers round-trips without the module doing anything)."""
    out = {f"module.{n}": p for n, p in module.named_parameters()}
    out.update((f"module.{n}", b) for n, b in module.named_buffers())
    return out


def _module_counters(module: torch.nn.Module) -> dict:
    """Private int/float/bool attributes of each submodule (e.g. ``_observed``, a step counter): state too."""
    out = {}
    for name, mod in module.named_modules():
        found = {k: v for k, v in vars(mod).items()
                 if k.startswith("_") and not k.startswith("__") and type(v) in (int, float, bool)}
        if found:
            out[name] = found
    return out


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` (from :func:`_payload`) atomically: a crash or a full disk leaves the previous checkpoint."""
    from .io import write_safetensors

    write_safetensors(path, payload["tensors"], {_META_KEY: json.dumps(payload["meta"])})


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's JSON fields, with its tensors under ``"tensors"``. Refuses (ValueError naming the file) an
    old pickle checkpoint without unpickling it, and any file that is not a fastsae checkpoint."""
    from .io import read_safetensors

    path = Path(path)
    old = ValueError(f"{path} is a checkpoint in the old pickle format, which fastsae no longer reads (loading a "
                     "pickle can execute code). Start the run afresh (fastsae train --overwrite), or finish it with "
                     "the fastsae version that wrote it")
    if path.suffix == ".pt":
        raise old
    try:
        tensors, metadata = read_safetensors(path)
    except ValueError as e:
        with open(path, "rb") as fh:
            magic = fh.read(2)
        if magic == b"PK" or magic[:1] == b"\x80":  # torch.save's zip container or a bare pickle
            raise old from e
        raise
    try:
        meta = json.loads(metadata[_META_KEY])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a fastsae checkpoint (no valid {_META_KEY!r} metadata)") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fastsae checkpoint")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a fastsae checkpoint of version {meta.get('version')!r}; this fastsae reads "
                         f"version {CHECKPOINT_VERSION}")
    return dict(meta, tensors=tensors)


def _accumulate(state: _State, out: TrainOutput) -> None:
    vals = torch.stack([out.loss.detach(), out.mse.detach(), out.fvu, out.l0,
                        out.sparsity.detach(), out.aux.detach()]).to(torch.float64)
    state.sums += vals.to(state.sums.device)
    state.n_summed += 1


def reduce_metrics(state: _State) -> dict:
    """Means of the metric sums since the last log (a distributed trainer all-reduces ``state.sums`` here)."""
    means = (state.sums / max(state.n_summed, 1)).tolist()
    state.sums.zero_()
    state.n_summed = 0
    return dict(zip(_SUMS, means))


def _dead_mask(state: _State, dead_after: int) -> Tensor:
    return state.since_fired >= dead_after


def _update_dead(state: _State, out: TrainOutput, n_tokens: int) -> None:
    fired = out.fired.to(state.since_fired.device)
    state.since_fired = torch.where(fired, torch.zeros_like(state.since_fired), state.since_fired + n_tokens)


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------


def _project_decoder_grad(sae: SAE) -> None:
    """Remove the gradient component parallel to each (unit-norm) decoder row (Gao et al. 2024): the step
    then moves along the sphere instead of fighting the renormalisation."""
    g = sae.W_dec.grad
    if g is None:
        return
    W = sae.W_dec.detach()
    g -= (g * W).sum(1, keepdim=True) * W


class FiniteCheck:
    """Training stops on non-finite state, without a device->host sync per step.

    Each step :meth:`record` computes one fused on-device verdict over the input batch, the loss, every gradient
    (also "finite but so large that its square, Adam's second moment, overflows its dtype": an outlier row that
    would turn Adam's state to inf), every parameter and every floating-point buffer after the update, and keeps
    on the device the first bad (step, what). Nothing is read back until :meth:`raise_if_bad`, which the loop calls
    at each logging interval, before writing any checkpoint and at the end: then ``FloatingPointError`` names the
    first bad step and the tensor, and no checkpoint ever holds state from that step on.

    The input is checked first, so a NaN batch is reported as such rather than as the loss or gradients it
    poisoned. Parameters and buffers are also checked once, on the host, when the check is created: a module that
    starts (or resumes) non-finite is refused before its first step.
    """

    def __init__(self, sae: SAE, first_step: int):
        self.first_step = first_step
        self.params = [p for _, p in sae.named_parameters()]
        self.buffers = [b for _, b in sae.named_buffers() if b.is_floating_point()]
        names = [n for n, _ in sae.named_parameters()]
        state = [f"parameter {n}" for n in names] + [f"buffer {n}" for n, b in sae.named_buffers()
                                                      if b.is_floating_point()]
        self.labels = (["the input batch contains NaN or inf values", "the loss is not finite"]
                       + [f"the gradient of {n} is not finite (or so large that its square, Adam's second moment, "
                          "overflows)" for n in names]
                       + [f"{what} is not finite after the update" for what in state])
        device = sae.device
        self._none = torch.zeros(1, device=device)  # stands in for a parameter without a gradient
        self._never = torch.iinfo(torch.int64).max
        self.first_bad = torch.full((), self._never, dtype=torch.int64, device=device)  # step * L + label
        self._base = torch.zeros((), dtype=torch.int64, device=device)
        self._index = torch.arange(len(self.labels), device=device)
        self._limits = None
        with torch.no_grad():
            norms = _norms(self.params + self.buffers)
            finite = torch.stack(norms).isfinite() if norms else torch.ones(0, dtype=torch.bool, device=device)
            everywhere = bool(_agree(finite.all().to(torch.int64)))
        if not everywhere:
            bad = [what for what, ok in zip(state, finite.tolist()) if not ok] + ["the SAE's state on another rank"]
            raise FloatingPointError(f"training cannot start at step {first_step}: {bad[0]} holds NaN or inf values")

    @torch.no_grad()
    def record(self, x: Tensor, loss: Tensor) -> None:
        grads = [self._none if p.grad is None else p.grad for p in self.params]
        tensors = [x] + grads + self.params + self.buffers
        norms = _norms(tensors)
        vec = torch.stack(norms[:1] + [loss.detach()] + norms[1:])
        if self._limits is None:
            limits = [torch.finfo(norms[0].dtype).max, torch.finfo(loss.dtype).max]
            limits += [math.sqrt(torch.finfo(g.dtype).max) for g in grads]
            limits += [torch.finfo(n.dtype).max for n in norms[1 + len(grads):]]
            self._limits = torch.tensor(limits, dtype=torch.float64, device=vec.device)
        bad = ~(vec <= self._limits)  # NaN compares False: bad
        first = torch.where(bad, self._base + self._index, self._never).min()
        torch.minimum(self.first_bad, first, out=self.first_bad)
        self._base += len(self.labels)

    def raise_if_bad(self, last_checkpoint: Optional[int] = None, cause: Optional[BaseException] = None) -> None:
        """Raise if a recorded step was bad. Collective under torch.distributed (every rank stops together), except
        when ``cause`` is given: an exception on this rank alone must not wait for the others."""
        if cause is None:
            _agree(self.first_bad)
        key = int(self.first_bad)  # the only device->host read
        if key == self._never:
            return
        step = self.first_step + key // len(self.labels)
        saved = (f"the checkpoint on disk, written after {last_checkpoint} steps, is intact"
                 if last_checkpoint is not None else "no checkpoint was written")
        err = FloatingPointError(f"training stopped at step {step}: {self.labels[key % len(self.labels)]}; "
                                 f"nothing from this step on was saved ({saved})")
        raise err from cause


def _agree(t: Tensor) -> Tensor:
    """``t`` replaced by its minimum over all ranks when torch.distributed runs (one verdict for all), in place."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """2-norms of ``tensors`` (one fused ``_foreach_norm`` per dtype; 16-bit ones accumulated in float32)."""
    out: list = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    for dtype, idx in groups.items():
        kw = dict(dtype=torch.float32) if dtype in (torch.float16, torch.bfloat16) else {}
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, **kw)):
            out[i] = n
    return out


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, x: Tensor, *, step: int, dead_mask: Optional[Tensor],
               sparsity_coefficient: Optional[float],
               reduce_gradients: Optional[Callable[[Tensor], Tensor]] = None,
               check: Optional[FiniteCheck] = None, target: Optional[Tensor] = None) -> TrainOutput:
    """Forward, backward, optimizer step, constraints, ``observe``, then ``check.record`` (``x`` is scaled).

    Without ``check`` (a caller stepping by hand) the step is checked at once and raises ``FloatingPointError``
    naming what is not finite; the training loop passes its :class:`FiniteCheck`, read only at intervals.
    """
    now = check is None
    check = FiniteCheck(sae, step) if now else check
    optimizer.zero_grad(set_to_none=True)
    out = sae.training_forward(x, target, dead_mask=dead_mask, sparsity_coefficient=sparsity_coefficient)
    out.loss.backward()
    if reduce_gradients is not None:  # data parallel: global-batch mean gradient; NaN on any rank raises on all
        reduce_gradients(out.loss)
    if sae.unit_norm_decoder:
        _project_decoder_grad(sae)
    optimizer.step()
    sae.apply_constraints()
    sae.observe(x, out)
    check.record(x, out.loss)
    if now:
        check.raise_if_bad()
    return out


def paired_rows(x, y) -> Tensor:
    """Training data for a transcoder: ``x [..., d_in]`` (e.g. an MLP's input) and ``y [..., d_out]`` (its output)
    side by side as ``[N, d_in + d_out]`` rows, so every shuffle keeps each pair together. ``fastsae.train(sae,
    (x, y))`` does this; harvested pairs (``fastsae harvest --transcode``) are stored this way already."""
    x, y = (torch.as_tensor(t) for t in (x, y))
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"the inputs {tuple(x.shape)} and targets {tuple(y.shape)} of a transcoder must pair up "
                         "row for row")
    return torch.cat([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]).to(x.dtype)], dim=1)


def _row_width(sae: SAE) -> int:
    return sae.d_in + sae.d_out if getattr(sae, "is_transcoder", False) else sae.d_in


def _split(rows: Tensor, sae: SAE) -> tuple[Tensor, Optional[Tensor]]:
    """``(input, target)`` of a batch: a transcoder's rows hold both, an SAE's are its own target (``None``)."""
    if not getattr(sae, "is_transcoder", False):
        return rows, None
    return rows[:, :sae.d_in], rows[:, sae.d_in:]


def _scaled_batch(rows: Tensor, sae: SAE, device: torch.device, scale: float,
                  target_scale: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``(s·x, t·y)`` of data rows as the loop trains on them: a transcoder's target ``y`` has its own scale ``t``
    (``None``: unscaled); an SAE's target is ``None`` (its own input)."""
    x, target = _split(rows.to(device=device, dtype=sae.dtype, non_blocking=True), sae)
    x = x * scale if scale != 1.0 else x
    if target is not None and target_scale is not None:
        target = target * target_scale
    return x, target


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(
    sae: SAE,
    data,
    *,
    steps: int,
    batch_size: int = 4096,
    lr: Optional[float] = None,
    betas: Optional[tuple[float, float]] = None,
    lr_warmup_steps: Optional[int] = None,
    lr_decay_steps: Optional[int] = None,
    sparsity_coefficient: Optional[float] = None,
    sparsity_warmup_steps: Optional[int] = None,
    dead_after: Optional[int] = None,
    scale_inputs: bool = True,
    input_scale: Optional[float] = None,
    init_b_dec: bool = True,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    log_every: Optional[int] = None,
    metrics_path: Union[str, Path, None] = None,
    checkpoint_dir: Union[str, Path, None] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = False,
    callback: Optional[Callable[[dict], None]] = None,
    latent_parallel: Optional[int] = None,
    resample_every: Optional[int] = None,
) -> TrainResult:
    """Train ``sae`` on ``data`` for ``steps`` Adam steps of ``batch_size`` rows.

    Args:
        sae: a freshly built SAE (its weights are taken as living in the scaled input space).
        data: ``[N, d_in]`` tensor/array (shuffled each epoch), a folder (or file) of ``.npy`` /
            ``.safetensors`` shards, any iterable of ``[..., d_in]`` batches, or ``fastsae.data.synthetic(...)``.
        lr, betas: Adam; ``None`` takes :func:`default_hyperparameters` (per architecture, from the papers).
        lr_warmup_steps: linear warm-up (default ``min(1000, steps // 20)``).
        lr_decay_steps: linear decay to 0 at the end (default: the last 20% of the steps).
        sparsity_coefficient: λ for JumpReLU / ReLU / Gated (default: the module's).
        sparsity_warmup_steps: λ rises linearly from 0 over these steps (default ``steps // 10``; ignored by TopK).
        dead_after: tokens without firing after which a latent is dead (default ``sae.dead_after`` or 10M);
            dead latents feed AuxK (TopK/BatchTopK) and the ``dead`` metric.
        scale_inputs: train on ``s·x`` with ``mean ‖s·(x - mean x)‖² = 1`` (estimated from the data, or ``input_scale``),
            then fold ``s`` into the weights so the returned SAE works on raw activations.
        init_b_dec: set ``b_dec`` to the geometric median of a data sample before the first step.
        seed: data order (and nothing else: the SAE's initial weights are whatever was passed in).
        log_every: steps between metric records (default ``min(100, max(1, steps // 50))``); each record has
            step, tokens, loss, mse, fvu, l0, sparsity, aux, dead (fraction), lr, sparsity_coefficient, tokens_per_s.
        metrics_path: JSON-lines file for the records (default ``checkpoint_dir/metrics.jsonl``).
        checkpoint_dir: write ``checkpoint.safetensors`` there every ``checkpoint_every`` steps (default
            ``steps // 10``), at the end and on Ctrl-C, atomically: every parameter and buffer (persistent or
            not), optimizer, step, RNG and data position (tensors as safetensors, the rest as JSON; no pickle).
        resume: continue exactly from ``checkpoint_dir/checkpoint.safetensors`` when it exists (else start
            fresh); a checkpoint of another architecture, shape or dtype is refused, an old ``checkpoint.pt``
            too (never unpickled).
        callback: called with each metrics record (after that step's checkpoint, if any).
        latent_parallel: under torchrun, ranks that split the SAE's latents (default: env
            ``FASTSAE_LATENT_PARALLEL`` or 1); the rest is data parallel (``fastsae/distributed/``).
        resample_every: every this many steps, during the first 60% of the run, latents that fire on none of
            8,192 probe rows and the weaker of co-firing duplicate pairs are re-initialised towards badly
            reconstructed inputs (``fastsae/resample.py``; default ``steps // 10``; 0 turns it off; latent-sharded
            runs do not resample). The records' ``resampled`` counts them.
    Raises:
        FloatingPointError: the input, the loss, a gradient (or its square), a parameter or a buffer became
            non-finite; names the first bad step and the tensor (:class:`FiniteCheck`). It is raised at the next
            logging interval or checkpoint at the latest, and no checkpoint ever holds state from that step on
            (the module passed in does: it was trained in place).
        TrainingInterrupted: Ctrl-C (with ``checkpoint_dir``, in one process): after the step in flight and a
            checkpoint.
        ValueError: no data (not one batch), or a checkpoint that does not fit.
    Returns:
        :class:`TrainResult` with the trained ``sae`` (modified in place), the metric records and the scale.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a fastsae SAE module, got {type(sae).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    t_start = time.perf_counter()
    from .distributed import TrainingContext

    # Under torchrun: process group, data-parallel reductions, latent shards; a no-op in one process.
    dist_ctx = TrainingContext(sae, device, latent_parallel)
    device, sae = dist_ctx.device, dist_ctx.module
    source = as_source(paired_rows(*data) if isinstance(data, tuple) else data)
    width = _row_width(sae)
    if source.d_in is not None and source.d_in != width:
        raise ValueError(f"data has d_in={source.d_in} but the SAE has d_in={sae.d_in}" if width == sae.d_in else
                         f"data rows have {source.d_in} columns but the transcoder needs d_in + d_out = {sae.d_in} + "
                         f"{sae.d_out} = {width} (input and target side by side; see fastsae.training.paired_rows)")

    hp = default_hyperparameters(sae)
    lr = hp["lr"] if lr is None else float(lr)
    betas = hp["betas"] if betas is None else tuple(betas)
    warmup = min(1000, steps // 20) if lr_warmup_steps is None else int(lr_warmup_steps)
    decay = steps // 5 if lr_decay_steps is None else int(lr_decay_steps)
    controlled = getattr(sae, "controls_sparsity", False)  # target_l0: the module's controller sets λ
    if controlled and sparsity_coefficient is not None:
        raise ValueError("sparsity_coefficient cannot be given when the SAE has target_l0: its controller sets λ "
                         "(set the starting λ on the module instead)")
    lam = None if controlled else (getattr(sae, "sparsity_coefficient", None) if sparsity_coefficient is None
                                   else float(sparsity_coefficient))
    lam_warmup = steps // 10 if sparsity_warmup_steps is None else int(sparsity_warmup_steps)
    dead_after = int(dead_after if dead_after is not None else getattr(sae, "dead_after", 10_000_000))
    log_every = min(100, max(1, steps // 50)) if log_every is None else max(1, int(log_every))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_every = max(1, steps // 10) if checkpoint_every is None else max(1, int(checkpoint_every))
    if metrics_path is None and ckpt_dir is not None:
        metrics_path = ckpt_dir / METRICS
    metrics_path = Path(metrics_path) if metrics_path is not None else None

    sae.train()
    optimizer = torch.optim.Adam([dict(params=ps, lr=lr * scale, lr_scale=scale) for ps, scale in sae.parameter_groups()],
                                 lr=lr, betas=betas)
    config = dict(sae=sae.config(), steps=steps, batch_size=batch_size, lr=lr, betas=list(betas),
                  lr_warmup_steps=warmup, lr_decay_steps=decay, sparsity_coefficient=lam,
                  sparsity_warmup_steps=lam_warmup, dead_after=dead_after, seed=seed, scale_inputs=scale_inputs)

    ckpt_path = dist_ctx.checkpoint_path(ckpt_dir / CHECKPOINT if ckpt_dir is not None else None)
    old_format = ckpt_dir / OLD_CHECKPOINT if ckpt_dir is not None else None
    resume_from = next((p for p in (ckpt_path, old_format) if resume and p.is_file()), None)
    last_saved = None
    if resume_from is not None:  # an old pickle checkpoint is refused there, never unpickled
        state = _restore(resume_from, sae, optimizer, config, device)
        _truncate_metrics(metrics_path, state.step)
        last_saved = state.step
    else:
        state = dist_ctx.reduce_init(_fresh_state(sae, source, seed, scale_inputs, input_scale, init_b_dec, device),
                                     sae)
        if metrics_path is not None:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    resampler = _resampler(sae, source, steps, batch_size, resample_every, seed, state.scale, state.target_scale,
                           device, dist_ctx)
    on_step = getattr(sae, "on_train_step", None) or (lambda step, steps: None)  # a latent-sharded module: none
    check = FiniteCheck(sae, state.step)
    interrupt = _Interrupt(ckpt_path is not None and dist_ctx.dp is None)
    bar = _progress(progress and dist_ctx.is_main, steps, state.step)
    it = batches(dist_ctx.shard_source(source, batch_size), batch_size, seed=seed, start_batch=state.step)
    t_log, tokens_log, tokens_start = time.perf_counter(), state.tokens, state.tokens
    try:
        while state.step < steps:
            x_raw = next(it, None)
            if x_raw is None:
                if state.step == 0:
                    raise ValueError(f"data yielded no batch of batch_size={batch_size} rows: it holds fewer rows "
                                     "than one batch (or only empty batches)")
                import warnings

                warnings.warn(f"data ran out after {state.step} of {steps} steps", stacklevel=2)
                break
            x, target = _scaled_batch(x_raw, sae, device, state.scale, state.target_scale)
            step = state.step
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"] * lr_factor(step, steps, warmup, decay)
            coef = None if lam is None else lam * sparsity_factor(step, lam_warmup)
            on_step(step, steps)
            try:
                out = train_step(sae, optimizer, x, step=step, dead_mask=_dead_mask(state, dead_after),
                                 sparsity_coefficient=coef, reduce_gradients=dist_ctx.gradient_hook, check=check,
                                 target=target)
            except Exception as e:  # a kernel that choked on NaN state from an earlier step: report that step
                check.raise_if_bad(last_saved, cause=e)
                raise
            dist_ctx.after_step(out)
            _update_dead(state, out, dist_ctx.tokens(x.shape[0]))
            _accumulate(state, out)
            state.step += 1
            state.tokens += dist_ctx.tokens(x.shape[0])
            if resampler is not None and resampler.due(state.step):
                state.resampled += resampler(sae, optimizer, state.step)
            bar.update(1)
            record = None
            if state.step % log_every == 0 or state.step == steps:
                check.raise_if_bad(last_saved)
                now = time.perf_counter()
                dist_ctx.mean_(state.sums)
                record = dict(step=state.step, tokens=state.tokens, **reduce_metrics(state),
                              dead=float(_dead_mask(state, dead_after).float().mean()),
                              lr=lr * lr_factor(step, steps, warmup, decay),
                              sparsity_coefficient=float(sae.sparsity_coefficient) if controlled else coef,
                              tokens_per_s=(state.tokens - tokens_log) / max(now - t_log, 1e-9),
                              resampled=state.resampled)
                t_log, tokens_log = now, state.tokens
                state.metrics.append(record)
                if metrics_path is not None and dist_ctx.is_main:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}", fvu=f"{record['fvu']:.3f}")
            if ckpt_path is not None and (state.step % ckpt_every == 0 or state.step == steps
                                          or interrupt.requested):
                check.raise_if_bad(last_saved)
                dist_ctx.save_checkpoint(save_checkpoint, ckpt_path,
                                         lambda: _payload(state, sae, optimizer, config, seed))
                last_saved = state.step
            if interrupt.requested:
                raise TrainingInterrupted(state.step, ckpt_path)
            if record is not None and callback is not None:
                callback(record)
    finally:
        interrupt.close()
        bar.close()
    check.raise_if_bad(last_saved)

    calibrate = getattr(sae, "calibrate", None)  # BatchTopK: its inference threshold, exactly k per row
    if calibrate is not None and state.step > 0:
        calibrate(_scaled_batch(source.sample(CALIBRATION_ROWS, seed + 1), sae, device, state.scale)[0])
    sae.eval()
    if state.scale != 1.0 or state.target_scale is not None:
        fold_input_scale(sae, state.scale, state.target_scale)
    sae = dist_ctx.finish(sae)  # latent shards gathered back into the caller's SAE
    return TrainResult(sae=sae, metrics=state.metrics, input_scale=state.scale, steps=state.step,
                       tokens=state.tokens, seconds=time.perf_counter() - t_start,
                       run_tokens=state.tokens - tokens_start)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the step in flight finished and ``checkpoint`` (if any) holds ``step``."""

    def __init__(self, step: int, checkpoint: Optional[Path]):
        super().__init__(f"interrupted after step {step}" + (f"; checkpoint written to {checkpoint}" if checkpoint
                                                              else ""))
        self.step, self.checkpoint = step, checkpoint


class _Interrupt:
    """While training with a checkpoint in one process, the first SIGINT asks the loop to finish its step, write a
    checkpoint and stop (:class:`TrainingInterrupted`); a second one interrupts at once."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested, self._installed, self._previous = False, False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def close(self) -> None:
        import signal

        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _progress(enabled: bool, steps: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=initial, disable=not enabled, desc="fastsae train", unit="step",
                dynamic_ncols=True)


#: rows of the data the resampler looks at (residuals to resample towards, co-firing duplicates)
RESAMPLE_PROBE_ROWS = 8192


def _resampler(sae: SAE, source: ActivationSource, steps: int, batch_size: int, every: Optional[int], seed: int,
               scale: float, target_scale: Optional[float], device, dist_ctx):
    from . import resample

    every = resample.default_every(steps) if every is None else int(every)
    if every < 0:
        raise ValueError(f"resample_every must be >= 0, got {every}")
    if every == 0 or not hasattr(sae, "reinit_latents"):  # a latent-sharded module resamples nothing
        return None
    probe, target = _scaled_batch(source.sample(RESAMPLE_PROBE_ROWS, seed + 2), sae, device, scale, target_scale)
    return resample.Resampler(every=every, until=resample.default_until(steps), probe=probe, seed=seed,
                              target=target)


def _fresh_state(sae: SAE, source: ActivationSource, seed: int, scale_inputs: bool, input_scale, init_b_dec,
                 device) -> _State:
    sample = target_sample = None
    transcoder = getattr(sae, "is_transcoder", False)
    # a transcoder's targets get their own scale, estimated even when the input scale is given
    if scale_inputs and (input_scale is None or transcoder) or init_b_dec:
        sample = source.sample(16384, seed).to(torch.float64)
        if sample.shape[-1] != _row_width(sae):
            raise ValueError(f"data has d_in={sample.shape[-1]} but the SAE has d_in={sae.d_in}")
        # a transcoder: the scale comes from the input side, b_dec (the output bias) from the target side
        sample, target_sample = _split(sample, sae)
    if not scale_inputs:
        scale = 1.0
    elif input_scale is not None:
        scale = float(input_scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {input_scale}")
    else:
        scale = estimate_input_scale(sample)
    # a transcoder's targets get their own scale (an MLP's output can be far smaller than its input)
    target_scale = estimate_input_scale(target_sample) if target_sample is not None and scale_inputs else None
    if init_b_dec:
        if target_sample is not None:
            b_sample, scale_b = target_sample, (1.0 if target_scale is None else target_scale)
        else:
            b_sample, scale_b = sample, scale
        if not bool(torch.isfinite(b_sample).all()):
            raise FloatingPointError("data contains NaN or inf values (found while initialising b_dec)")
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(b_sample * scale_b).to(sae.b_dec))
    if sample is not None:
        sae.init_from_data((sample * scale).to(device=sae.device, dtype=sae.dtype))
    return _State(step=0, tokens=0, scale=scale, target_scale=target_scale,
                  since_fired=torch.zeros(sae.d_sae, dtype=torch.int64, device=device),
                  sums=torch.zeros(len(_SUMS), dtype=torch.float64, device=device), n_summed=0)


def _payload(state: _State, sae: SAE, optimizer, config: dict, seed: int) -> dict:
    from .io import pack_optimizer

    tensors = _module_tensors(sae)
    opt_tensors, opt_meta = pack_optimizer(optimizer, prefix="optimizer.")
    tensors.update(opt_tensors)
    rng = _rng_state(tensors)
    tensors.update({"train.since_fired": state.since_fired, "train.sums": state.sums})
    meta = dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, config=config, step=state.step,
                tokens=state.tokens, scale=state.scale, target_scale=state.target_scale, n_summed=state.n_summed,
                metrics=state.metrics, resampled=state.resampled,
                counters=_module_counters(sae), optimizer=opt_meta, rng=rng, data=dict(seed=seed, rows=state.tokens),
                density=sae.ops().density.state(sae.W_enc))
    return dict(step=state.step, tensors=tensors, meta=meta)


def _restore(path: Path, sae: SAE, optimizer, config: dict, device) -> _State:
    """Load a checkpoint into ``sae``, ``optimizer`` and the RNGs, exactly; anything that does not fit this module
    (architecture, shapes, dtypes, the set of tensors) or is malformed raises ValueError naming ``path``."""
    import warnings

    from .io import unpack_optimizer

    ck = load_checkpoint(path)
    tensors = ck["tensors"]
    try:
        saved, mine = ck["config"]["sae"], sae.config()
        for key in ("architecture", "d_in", "d_sae", "dtype"):
            if saved.get(key) != mine.get(key):
                raise ValueError(f"{path} was written for an SAE with {key}={saved.get(key)!r}, not {mine.get(key)!r}")
        changed = {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}
        changed.update({k: (ck["config"].get(k), config.get(k)) for k in ("steps", "batch_size", "seed")
                        if ck["config"].get(k) != config.get(k)})
        for key, (old, new) in changed.items():
            warnings.warn(f"resuming {path} with {key}={new!r} (the checkpoint used {old!r}): the run will not "
                          "match an uninterrupted one", stacklevel=3)
        own = _module_tensors(sae)
        stored = {k for k in tensors if k.startswith("module.")}
        if stored != set(own):
            raise ValueError(f"{path} holds the state of another module: missing {sorted(set(own) - stored)}, "
                             f"unexpected {sorted(stored - set(own))}")
        for name, t in own.items():
            if tensors[name].shape != t.shape or tensors[name].dtype != t.dtype:
                raise ValueError(f"{path}: {name} has shape {list(tensors[name].shape)} and dtype "
                                 f"{tensors[name].dtype}, the module's {list(t.shape)} and {t.dtype}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(tensors[name])
        for mod_name, found in ck["counters"].items():
            mod = sae.get_submodule(mod_name)
            for key, value in found.items():
                if type(vars(mod).get(key)) is not type(value):
                    raise ValueError(f"{path}: counter {mod_name}.{key} does not exist on this module")
                setattr(mod, key, value)
        unpack_optimizer(optimizer, tensors, ck["optimizer"], path, prefix="optimizer.")
        _set_rng_state(tensors, ck["rng"])
        sae.ops().density.load_state(sae.W_enc, ck.get("density"))
        state = _State(step=ck["step"], tokens=ck["tokens"], scale=ck["scale"],
                       since_fired=tensors["train.since_fired"].to(device), sums=tensors["train.sums"].to(device),
                       n_summed=ck["n_summed"], metrics=list(ck["metrics"]), target_scale=ck.get("target_scale"),
                       resampled=ck.get("resampled", 0))
        for key in ("step", "tokens", "n_summed", "resampled"):
            if isinstance(getattr(state, key), bool) or not isinstance(getattr(state, key), int):
                raise ValueError(f"{path}: field {key!r} must be an integer")
        if not (isinstance(state.scale, (int, float)) and math.isfinite(state.scale) and state.scale > 0):
            raise ValueError(f"{path}: field 'scale' must be a positive number, got {state.scale!r}")
        if state.since_fired.shape != (sae.d_sae,) or state.sums.shape != (len(_SUMS),):
            raise ValueError(f"{path}: the loop's counters have the wrong shapes")
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path} is not a valid fastsae checkpoint: {e}") from e
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a valid fastsae checkpoint: {type(e).__name__}: {e}") from e
    return state


def _truncate_metrics(path: Optional[Path], step: int) -> None:
    """Drop records written after the checkpoint (a crash between checkpoints would duplicate them)."""
    if path is None or not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a half-written last line
    path.write_text("".join(k + "\n" for k in keep))


# ----------------------------------------------------------------------------------------------
# The `fastsae train` command
# ----------------------------------------------------------------------------------------------

#: the default job: about a minute of CPU on synthetic data with a known dictionary
#: (about 45 s on 2 idle CPU cores: 1024 true features in 128 dimensions, 3M tokens)
DEFAULT_JOB = dict(arch="topk", d_in=128, n_features=1024, width=2048, k=8, active=4.0, n_samples=500_000,
                   steps=3000, batch_size=1024)


def add_cli(sub) -> None:
    p = sub.add_parser(
        "train", help="train an SAE (default: a ~1-minute CPU job on synthetic data)",
        description="Train an SAE. With no options: a TopK SAE on synthetic sparse mixtures of known directions, "
                    "ending with a metrics table that includes feature recovery.")
    d = DEFAULT_JOB
    p.add_argument("--arch", default=d["arch"], choices=list(CLI_ARCHITECTURES))
    p.add_argument("--width", type=int, default=None, help=f"d_sae (default {d['width']} on synthetic data, "
                   "else 16 x d_in)")
    p.add_argument("--k", type=int, default=None, help=f"active latents for topk/batchtopk (default {d['k']})")
    p.add_argument("--l0-coefficient", "--lambda", dest="lam", type=float, default=None,
                   help="sparsity coefficient λ for jumprelu/relu/gated (default: the module's)")
    p.add_argument("--target-l0", type=float, default=None,
                   help="jumprelu/relu/gated: ask for this L0 instead of a λ (jumprelu: the quadratic target-L0 "
                        "loss; relu/gated: λ adjusted by a controller; default: none, train with λ)")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: per architecture)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (sparse mixtures of known directions), 'realistic' (the same with a mean "
                        "offset, Zipf frequencies, heavy-tailed magnitudes, correlated and hierarchical features and "
                        "noise: fastsae.data.realistic), or a folder / file of .npy or .safetensors shards")
    p.add_argument("--out", default="fastsae-run", help=f"output folder: {CHECKPOINT}, metrics.jsonl, sae/ "
                   "(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT} (starts fresh if none)")
    p.add_argument("--overwrite", action="store_true", help="replace the run OUT holds instead of refusing")
    p.add_argument("--latent-parallel", type=int, default=None, help="under torchrun: ranks that split the SAE's "
                   "latents (default: env FASTSAE_LATENT_PARALLEL or 1); the others are data parallel")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: steps/10)")
    p.add_argument("--log-every", type=int, default=None,
                   help="steps between metric records (default: min(100, steps/50))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for small jobs on a busy machine)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--d-in", type=int, default=d["d_in"])
    g.add_argument("--n-features", type=int, default=d["n_features"])
    g.add_argument("--active", type=float, default=d["active"], help="mean active features per sample")
    g.add_argument("--n-samples", type=int, default=d["n_samples"])
    p.set_defaults(func=cmd_train)


#: what ``fastsae train --arch`` builds; the ones in K_ARCHITECTURES take ``--k``, the others λ or ``--target-l0``
CLI_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu", "gated", "abstopk", "matryoshka_batchtopk")
K_ARCHITECTURES = ("topk", "batchtopk", "abstopk", "matryoshka_batchtopk")


def build_sae(arch: str, d_in: int, width: int, *, k: Optional[int] = None, lam: Optional[float] = None,
              target_l0: Optional[float] = None, backend: str = "auto", dtype: torch.dtype = torch.float32) -> SAE:
    from .sae import ARCHITECTURES

    cls = ARCHITECTURES[arch]
    kw = dict(backend=backend, dtype=dtype)
    if arch == "matryoshka_batchtopk":
        kw["widths"] = cls.nested_widths(width)
    if arch in K_ARCHITECTURES:
        return cls(d_in, width, k if k is not None else DEFAULT_JOB["k"], **kw)
    if lam is not None:
        kw["sparsity_coefficient"] = lam
    if target_l0 is not None:
        kw["target_l0"] = target_l0
    return cls(d_in, width, **kw)


def _check_train_args(args) -> None:
    """Every argument checked before any data is generated or read (ValueError naming the option)."""
    positive = ["steps", "batch_size", "width", "k", "checkpoint_every", "log_every", "threads", "latent_parallel"]
    synthetic_data = args.data in ("synthetic", "realistic")
    if synthetic_data:
        positive += ["d_in", "n_features", "n_samples"]
    for name in positive:
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    for name, v, low in (("lr", args.lr, "> 0"), ("l0-coefficient", args.lam, ">= 0"),
                         ("target-l0", args.target_l0, "> 0")):
        if v is not None and not (math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0)):
            raise ValueError(f"--{name} must be a finite number {low}, got {v}")
    if args.target_l0 is not None and args.arch in K_ARCHITECTURES:
        raise ValueError(f"--target-l0 is for jumprelu/relu/gated; --arch {args.arch} takes --k")
    if synthetic_data:
        if not (math.isfinite(args.active) and 0 < args.active <= args.n_features):
            raise ValueError(f"--active must lie in (0, --n-features={args.n_features}], got {args.active}")
        width = args.width or DEFAULT_JOB["width"]
        if args.k is not None and args.k > width:
            raise ValueError(f"--k must lie in 1..--width={width}, got {args.k}")
        if args.target_l0 is not None and args.target_l0 > width:
            raise ValueError(f"--target-l0 must lie in (0, --width={width}], got {args.target_l0}")
    elif not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or folder (or pass --data synthetic)")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"--device {args.device!r} is not a device: {e}") from e
        if dev.type == "meta":
            raise ValueError("--device meta holds no data: train on a real device (cpu, cuda)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")


#: what a run writes into OUT (all of it, and nothing else, is removed by --overwrite)
_RUN_FILES = (CHECKPOINT, OLD_CHECKPOINT, "checkpoint.json", METRICS, "summary.json")


def _prepare_out(args, out: Path) -> None:
    """Refuse to write into a folder holding a run unless --resume or --overwrite; --overwrite removes that run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        if args.resume:
            print(f"fastsae: --resume: {out} holds no checkpoint; starting a fresh run")
        return
    held = [out / n for n in _RUN_FILES if (out / n).exists()] + sorted(out.glob("checkpoint-step*-latent*"))
    held += [out / "sae"] if (out / "sae").is_dir() else []
    has_ckpt = any(p.name.startswith("checkpoint") for p in held)
    if args.resume:
        if not has_ckpt:
            print(f"fastsae: --resume: {out} holds no checkpoint; starting a fresh run")
        return
    if held and not args.overwrite:
        finished = (out / "summary.json").is_file()
        raise ValueError(f"--out {out} already holds {'a finished' if finished else 'an unfinished'} run "
                         f"({', '.join(p.name for p in held)}); pass --resume to continue it"
                         f"{' with more --steps' if finished else ''} or --overwrite to replace it")
    import shutil

    for p in held:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _resume_hint(args) -> str:
    import shlex

    argv = [a for a in (getattr(args, "argv", None) or []) if a not in ("--resume", "--overwrite")]
    return shlex.join(["fastsae", *argv, "--resume"]) if argv else "the same command with --resume"


def cmd_train(args) -> int:
    from .data import ShardSource, realistic, synthetic
    from .metrics import evaluate

    _check_train_args(args)
    _prepare_out(args, Path(args.out))
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    synth = None
    if args.data in ("synthetic", "realistic"):
        make = synthetic if args.data == "synthetic" else realistic
        print(f"{args.data} synthetic data: {args.n_samples} samples, d_in={args.d_in}, {args.n_features} true "
              f"features, ~{args.active:g} active per sample")
        synth = make(args.n_samples, args.d_in, args.n_features, active=args.active, seed=args.seed)
        data, d_in = synth, args.d_in
        held_out = synth.sample(20_000, seed=args.seed + 1)
        width = args.width or DEFAULT_JOB["width"]
    else:
        data = ShardSource(args.data)
        d_in = data.d_in
        held_out = data.sample(20_000, seed=args.seed + 1)
        width = args.width or 16 * d_in
    sae = build_sae(args.arch, d_in, width, k=args.k, lam=args.lam, target_l0=args.target_l0, backend=args.backend,
                    dtype=getattr(torch, args.dtype)).to(device)
    sparsity = (f"k={sae.k}" if hasattr(sae, "k") else f"target L0={sae.target_l0:g}" if sae.target_l0
                else f"λ={sae.sparsity_coefficient:g}")
    print(f"training {type(sae).__name__}(d_in={d_in}, d_sae={width}, {sparsity}"
          + f") for {args.steps} steps of {args.batch_size} on {device}, writing {out}/")
    try:
        result = train(sae, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       device=device, progress=not args.no_progress, log_every=args.log_every, checkpoint_dir=out,
                       checkpoint_every=args.checkpoint_every, resume=args.resume,
                       latent_parallel=args.latent_parallel)
    except TrainingInterrupted as e:
        raise KeyboardInterrupt(f"stopped after step {e.step}; checkpoint written to {e.checkpoint}. "
                                f"Resume with: {_resume_hint(args)}") from None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return 0  # under torchrun: rank 0 saves, evaluates and reports
    sae.save(out / "sae")
    ev = evaluate(sae, held_out.to(torch.float32))
    rows = [
        ("steps", f"{result.steps}"),
        ("tokens", f"{result.tokens:,}"),
        ("time", f"{result.seconds:.1f} s ({result.run_tokens / max(result.seconds, 1e-9):,.0f} tokens/s"
                 + (", this run" if result.run_tokens != result.tokens else "") + ")"),
        ("train loss (last log)", f"{result.final.get('loss', float('nan')):.4g}"),
        ("train FVU (last log)", f"{result.final.get('fvu', float('nan')):.4f}"),
        ("held-out FVU", f"{ev['fvu']:.4f}"),
        ("held-out MSE", f"{ev['mse']:.4g}"),
        ("held-out L0", f"{ev['l0']:.2f}"),
        ("dead latents (held-out)", f"{100 * ev['dead']:.1f}%"),
        ("input scale (folded)", f"{result.input_scale:.4g}"),
    ]
    truth = synth.evaluate(sae) if synth is not None else None
    if truth is not None:
        rows += [("feature recovery (cos>0.9)", f"{100 * truth['recovery']:.1f}% of {args.n_features}"),
                 ("MCC / uniqueness", f"{truth['mcc']:.3f} / {truth['uniqueness']:.3f}"),
                 ("firing precision / recall / F1", f"{truth['precision']:.2f} / {truth['recall']:.2f} / "
                                                    f"{truth['f1']:.2f}"),
                 ("true L0 (data)", f"{synth.true_l0:.2f}")]
    rows.append(("saved", f"{out / 'sae'}  (fastsae.load)"))
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'metric':<{w}}  value")
    print(f"{'-' * w}  {'-' * 24}")
    for name, value in rows:
        print(f"{name:<{w}}  {value}")
    (out / "summary.json").write_text(json.dumps(dict(ev, steps=result.steps, tokens=result.tokens,
                                                      seconds=result.seconds, input_scale=result.input_scale,
                                                      recovery=truth["recovery"] if truth else None,
                                                      ground_truth=truth),
                                                 indent=2))
    return 0
