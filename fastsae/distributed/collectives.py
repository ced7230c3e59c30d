"""The collectives every other part of the package issues: error wrapping (a failed or timed-out collective
raises :class:`DistributedError` naming the rank and operation), byte accounting (:func:`count_bytes`), and the
autograd pair of latent sharding (:func:`copy_in` / :func:`reduce_out`)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .group import DistributedError, grid

#: ``(op, group_size, payload_bytes)`` of every collective issued inside :func:`count_bytes`.
_comm_log: Optional[list] = None


@contextmanager
def count_bytes():
    """Record every collective issued by this module: yields a list of ``(op, group_size, payload_bytes)``.

    Payload is the tensor handed to the collective on this rank (for an all-gather: this rank's input).
    """
    global _comm_log
    prev, _comm_log = _comm_log, []
    try:
        yield _comm_log
    finally:
        _comm_log = prev


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _run(op: str, t: Tensor, group, fn):
    if _comm_log is not None:
        _comm_log.append((op, _group_size(group), t.numel() * t.element_size()))
    try:
        return fn()
    except Exception as e:
        r = dist.get_rank() if dist.is_initialized() else 0
        raise DistributedError(
            f"rank {r}: {op} over {_group_size(group)} ranks failed — another rank died, raised or did not arrive "
            f"within the time-out ({type(e).__name__}: {e})"
        ) from e


def all_reduce_(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of ``t`` over ``group`` (no-op for a group of one)."""
    if group is None or _group_size(group) == 1:
        return t
    _run("all_reduce", t, group, lambda: dist.all_reduce(t, op=op, group=group))
    return t


def all_gather(t: Tensor, group) -> Tensor:
    """``[n, ...] -> [group_size, n, ...]`` (every rank passes the same shape)."""
    if group is None or _group_size(group) == 1:
        return t.unsqueeze(0)
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(_group_size(group))]
    _run("all_gather", t, group, lambda: dist.all_gather(parts, t, group=group))
    return torch.stack(parts)


def broadcast_(t: Tensor, src: int, group) -> Tensor:
    if group is None or _group_size(group) == 1:
        return t
    _run("broadcast", t, group, lambda: dist.broadcast(t, src=src, group=group))
    return t


def barrier(group=None) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    # A tiny all-reduce instead of dist.barrier: it honours the group's time-out on every backend.
    all_reduce_(torch.zeros(1, device=grid().device), group if group is not None else dist.group.WORLD)


class _ReduceOut(torch.autograd.Function):
    """Forward: sum of the partial results of a latent group. Backward: identity (every rank holds the same
    loss of the summed value, so each partial gets that gradient unchanged)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        return all_reduce_(t.clone(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyIn(torch.autograd.Function):
    """Forward: identity on a tensor replicated across a latent group. Backward: sum of the gradients of all
    the ranks' uses (each rank only sees its own latents' contribution)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


def reduce_out(t: Tensor, group) -> Tensor:
    if group is None or _group_size(group) == 1:
        return t
    return _ReduceOut.apply(t, group)


def copy_in(t: Tensor, group) -> Tensor:
    if group is None or _group_size(group) == 1:
        return t
    return _CopyIn.apply(t, group)
