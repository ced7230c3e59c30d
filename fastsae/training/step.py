"""One training step: the gradient step (:func:`train_step`, the decoder-gradient projection), the sync-free
finite check (:class:`FiniteCheck`), and the batches a step reads (paired transcoder rows, input scaling)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..sae import SAE, TrainOutput


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
