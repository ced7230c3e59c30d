"""Beyond one device: data-parallel and latent-sharded SAE training on ``torch.distributed``.

Everything here runs on PyTorch's own distributed engine (process groups launched by ``torchrun`` or any
launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``): NCCL when the ranks own GPUs,
gloo on CPU, chosen automatically by :func:`init`.

The process grid
----------------
``world_size = data_size × latent_size``. Rank ``r`` sits at ``(data_rank, latent_rank) = divmod(r, latent_size)``,
so the ranks that split one SAE's latents are neighbours (same node, fastest links) and the ranks that hold
the same latent slice on different data form the data groups.

Data parallel (``latent_size == 1``)
------------------------------------
Every rank reads a disjoint slice of the data (:func:`shard_range`, :func:`shard_items`) and computes the
loss of its local batch. :class:`DataParallel` then reduces, once per step:
- the gradients, summed and divided by ``data_size`` in one flat all-reduce per dtype (with the per-rank
  losses riding in the same buffer, so a NaN on one rank is seen by every rank in the same collective and
  all of them raise :class:`NonFiniteLossError` together);
- the running-statistic buffers (adaptive bandwidth, BatchTopK threshold, ...): each rank's *change*
  in this step is averaged, so constant buffers stay bit-exact and every rank ends the step identical;
- the ``fired`` mask (dead-latent statistics, OR over ranks) and the dataset normalisation factor.
Decoder normalisation and the threshold clamp are elementwise functions of identical parameters, so
they stay identical without communication.
Because the loss of every architecture except the AuxK term is a mean over rows, the mean of the per-rank
gradients equals the gradient of one process on the global batch (``per-rank batch × data_size``). AuxK's
normaliser ``‖e - mean e‖²`` and BatchTopK's ``B·k`` selection are per rank (as in other libraries).

Latent sharding (``latent_size > 1``)
-------------------------------------
:class:`ShardedSAE` keeps ``W_enc[:, s]``, ``b_enc[s]``, ``threshold[s]``, ``W_dec[s]`` (and every other
per-latent tensor) for one contiguous slice ``s`` of the latents; ``b_dec`` is replicated. Each rank
encodes its slice with the backend's kernels. TopK/BatchTopK take a local top-k, and the candidates are
merged with one all-gather of ``(value, global index)`` pairs per row (``[B, k]`` per rank, never the dense
``[B, d_sae]``); each rank decodes the winners it owns and the partial reconstructions are all-reduced.
JumpReLU/ReLU need no merge: partial ``x̂`` and ``l0`` are all-reduced. Backward mirrors it (Megatron's
"copy in / reduce out" pair): the all-reduce of partial sums has an identity backward, and the replicated
``b_dec`` entering the encoder all-reduces its gradient. AuxK runs the same merge over the dead latents.
Data and latent parallelism combine on the 2-D grid.

Checkpoints
-----------
:func:`save_sharded` writes one safetensors file per latent shard plus a ``shards.json`` manifest written
last (temp file + rename), so a directory with a manifest is always complete. :func:`load_sharded` rebuilds
a single-process SAE from it (``fastsae.load`` recognises the manifest); :func:`load_shard` resumes a
:class:`ShardedSAE` on any latent size.

Failures
--------
Every collective runs under the process group's time-out (:func:`init`, default 600 s, env
``FASTSAE_DIST_TIMEOUT``); a failing collective (peer died, time-out) is re-raised as
:class:`DistributedError` naming this rank and the operation, instead of hanging.
"""
from __future__ import annotations

import datetime
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference as ref

MANIFEST = "shards.json"
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, raised, or did not arrive within the time-out."""


class NonFiniteLossError(FloatingPointError):
    """The loss (or a gradient) is NaN/inf on at least one rank; raised on every rank at the same step."""


# ------------------------------------------------------------------------------------------------
# Process grid
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Where this process sits. A single process is ``Grid()`` (every size 1, no process group)."""

    rank: int = 0
    world_size: int = 1
    data_rank: int = 0
    data_size: int = 1
    latent_rank: int = 0
    latent_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    timeout: datetime.timedelta = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    data_group: Any = None
    latent_group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the one that logs and writes replicated files."""
        return self.rank == 0

    def global_rank(self, data_rank: int, latent_rank: int) -> int:
        return data_rank * self.latent_size + latent_rank


_GRID: Optional[Grid] = None


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by a distributed launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from e


def launched() -> bool:
    """True when this process was started by torchrun (or a launcher setting the same variables) with >1 rank,
    or a process group is already initialised."""
    return (dist.is_available() and dist.is_initialized()) or env_world_size() > 1


def _timeout(timeout) -> datetime.timedelta:
    if timeout is None:
        timeout = float(os.environ.get("FASTSAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def init(
    latent_parallel: int = 1,
    *,
    backend: Optional[str] = None,
    timeout=None,
    init_method: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Grid:
    """Join (or create) the process group and build the ``data × latent`` grid; returns this rank's :class:`Grid`.

    Without a launcher (no ``WORLD_SIZE`` > 1, no ``init_method``) this is a no-op returning the single-process
    grid. ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"``. ``timeout`` (seconds or timedelta)
    bounds every collective. ``latent_parallel`` ranks share one SAE's latents; it must divide the world size.
    """
    global _GRID
    if isinstance(latent_parallel, bool) or not isinstance(latent_parallel, int) or latent_parallel < 1:
        raise ValueError(f"latent_parallel must be a positive int, got {latent_parallel!r}")
    td = _timeout(timeout)
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        ws = world_size if world_size is not None else env_world_size()
        if ws <= 1 and init_method is None:
            if latent_parallel != 1:
                raise ValueError(f"latent_parallel={latent_parallel} needs that many ranks; this is one process")
            _GRID = Grid(timeout=td)
            return _GRID
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # A collective that times out aborts the communicator and raises instead of hanging forever.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = dict(backend=backend, timeout=td, init_method=init_method or "env://")
        if rank is not None:
            kwargs["rank"] = rank
        if world_size is not None:
            kwargs["world_size"] = world_size
        dist.init_process_group(**kwargs)
    backend = dist.get_backend()
    r, ws = dist.get_rank(), dist.get_world_size()
    if ws % latent_parallel:
        raise ValueError(f"latent_parallel={latent_parallel} must divide the world size {ws}")
    lp = latent_parallel
    dp = ws // lp
    data_rank, latent_rank = divmod(r, lp)
    data_group = latent_group = None
    if lp == 1:
        data_group = dist.group.WORLD
    elif dp == 1:
        latent_group = dist.group.WORLD
    else:
        # new_group is collective: every rank creates every group, in the same order.
        for d in range(dp):
            g = dist.new_group([d * lp + j for j in range(lp)], timeout=td)
            if d == data_rank:
                latent_group = g
        for j in range(lp):
            g = dist.new_group([d * lp + j for d in range(dp)], timeout=td)
            if j == latent_rank:
                data_group = g
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _GRID = Grid(rank=r, world_size=ws, data_rank=data_rank, data_size=dp, latent_rank=latent_rank,
                 latent_size=lp, device=device, backend=backend, timeout=td, data_group=data_group,
                 latent_group=latent_group)
    return _GRID


def grid() -> Grid:
    """The grid of the last :func:`init` (the single-process grid before any)."""
    return _GRID if _GRID is not None else Grid()


def shutdown() -> None:
    """Leave the process group (call at the end of a distributed run)."""
    global _GRID
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _GRID = None


# ------------------------------------------------------------------------------------------------
# Collectives: error wrapping and byte accounting
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Data sharding
# ------------------------------------------------------------------------------------------------


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous chunks of ``n`` items; the first ``n % parts`` get one more."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``rank`` of ``n`` items split in ``size`` contiguous, disjoint chunks."""
    sizes = split_sizes(n, size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def shard_items(items: Sequence, g: Optional[Grid] = None) -> list:
    """This data rank's share of a list of files/shards (round-robin, disjoint; latent peers get the same)."""
    g = g or grid()
    return list(items)[g.data_rank :: g.data_size]


def shard_rows(x: Tensor, g: Optional[Grid] = None) -> Tensor:
    """This data rank's contiguous slice of the rows of a tensor (a view, no copy)."""
    g = g or grid()
    start, stop = shard_range(x.shape[0], g.data_rank, g.data_size)
    return x[start:stop]


# ------------------------------------------------------------------------------------------------
# Data parallel
# ------------------------------------------------------------------------------------------------


class DataParallel:
    """The per-step reductions of data-parallel training, for a plain SAE or a :class:`ShardedSAE`.

    Usage on every rank::

        dp = DataParallel(sae)                     # broadcasts parameters and buffers from data-rank 0
        out = sae.training_forward(x_local)
        out.loss.backward()
        loss = dp.reduce_gradients(out.loss)       # averaged grads; global mean loss; raises on NaN anywhere
        opt.step(); sae.apply_constraints(); sae.observe(x_local, out)
        dp.sync_buffers()                          # running statistics identical on every rank
        fired = dp.reduce_fired(out.fired)         # dead-latent statistics of the global batch

    Why one flat all-reduce per dtype after backward rather than ``DistributedDataParallel``: measured
    (``python benchmarks/bench_comm.py --ddp``, 2 gloo ranks, TopK d_in=256, d_sae=8192, 16 MiB of
    gradients, median of 20 interleaved steps) the step times are the same within noise — flat 1318 ms,
    DDP 1349 ms, DDP with ``gradient_as_bucket_view`` 1307 ms, no communication at all 1289 ms — because
    an SAE's few large gradients are all ready at the very end of a short backward, so DDP's overlap
    hides little. The flat buffer needs no wrapper around ``forward`` (the loop calls ``training_forward``),
    no buffer broadcast that would overwrite running statistics, works on the data group of a 2-D grid,
    and carries the per-rank losses in the same collective (NaN detection at no extra latency).
    """

    def __init__(self, module: nn.Module, g: Optional[Grid] = None, *, broadcast: bool = True):
        self.module = module
        self.grid = g or getattr(module, "grid", None) or grid()
        self.group = self.grid.data_group if self.grid.data_size > 1 else None
        self.size = self.grid.data_size
        self.step = 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        if broadcast and self.group is not None:
            src = self.grid.global_rank(0, self.grid.latent_rank)
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    broadcast_(t.data, src, self.group)
        self._buffer_ref = [b.detach().clone() for b in self._float_buffers()]

    def _float_buffers(self) -> list[Tensor]:
        return [b for b in self.module.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def reduce_gradients(self, loss: Tensor) -> Tensor:
        """Average every parameter's gradient over the data group; return the global mean loss (detached).

        Raises :class:`NonFiniteLossError` on every rank when any rank's loss or any gradient is not finite.
        """
        self.step += 1
        losses = torch.zeros(self.size, dtype=torch.float64, device=loss.device)
        losses[self.grid.data_rank] = loss.detach().double()
        if self.group is None:
            bad = not bool(torch.isfinite(losses).all())
            grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None)
            grads_finite = self._latent_verdict(bad, grads_finite, loss.device)
            self._raise_if(bad, losses, grads_finite)
            return loss.detach()
        # One buffer per dtype; float64 carries the per-rank losses and one "has a gradient" flag per parameter.
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        by_dtype.setdefault(torch.float64, [])
        grads_finite = True
        for dtype, params in by_dtype.items():
            parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
            if dtype == torch.float64:
                has = torch.tensor([float(p.grad is not None) for p in self.params], dtype=dtype, device=loss.device)
                parts = parts + [losses, has]
            flat = torch.cat(parts)
            all_reduce_(flat, self.group)
            if dtype == torch.float64:
                n = flat.numel() - self.size - len(self.params)
                losses, has = flat[n : n + self.size], flat[n + self.size :]
                flat = flat[:n]
            flat.div_(self.size)
            grads_finite &= bool(torch.isfinite(flat).all())
            offset = 0
            for p in params:
                chunk = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
        for p, h in zip(self.params, has.tolist()):
            if h == 0:
                p.grad = None  # no rank produced one: keep the optimizer's "no gradient" semantics
        bad = not bool(torch.isfinite(losses).all())
        grads_finite = self._latent_verdict(bad, grads_finite, loss.device)
        self._raise_if(bad, losses, grads_finite)
        return losses.mean().to(loss.dtype)

    def _latent_verdict(self, bad_loss: bool, grads_finite: bool, device) -> bool:
        """Latent peers share the loss but not the gradients (a NaN may sit in one shard): one verdict for all."""
        if self.grid.latent_size == 1:
            return grads_finite
        flag = torch.tensor([float(bad_loss or not grads_finite)], device=device)
        all_reduce_(flag, self.grid.latent_group, dist.ReduceOp.MAX)
        return grads_finite and not (flag.item() and not bad_loss)

    def _raise_if(self, bad_loss: bool, losses: Tensor, grads_finite: bool) -> None:
        if bad_loss:
            ranks = [self.grid.global_rank(d, self.grid.latent_rank) for d in range(self.size)
                     if not torch.isfinite(losses[d])]
            raise NonFiniteLossError(
                f"non-finite loss on rank(s) {ranks} at step {self.step} (per-data-rank losses {losses.tolist()}); "
                "every rank stops here"
            )
        if not grads_finite:
            raise NonFiniteLossError(f"non-finite gradient at step {self.step}; every rank stops here")

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average this step's change of every floating-point buffer over the data group.

        Buffers that did not change (constants such as a fixed bandwidth) stay bit-exact; running statistics
        (EMAs of batch means) become the EMA of the global batch's mean.
        """
        if self.group is None:
            return
        bufs = self._float_buffers()
        if not bufs:
            return
        deltas = torch.cat([(b.double() - r.double()).reshape(-1) for b, r in zip(bufs, self._buffer_ref)])
        all_reduce_(deltas, self.group)
        deltas.div_(self.size)
        offset = 0
        for b, r in zip(bufs, self._buffer_ref):
            d = deltas[offset : offset + b.numel()].view_as(b)
            offset += b.numel()
            b.copy_(r.double() + d)
            r.copy_(b)

    def reduce_fired(self, fired: Tensor) -> Tensor:
        """``fired [d_sae(_local)]`` bool OR-ed over the data group."""
        if self.group is None:
            return fired
        t = fired.to(torch.uint8)
        return all_reduce_(t, self.group, dist.ReduceOp.MAX).bool()

    def mean(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Mean over the data group of scalar metrics (one small all-reduce; for logging)."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.grid.device)
        all_reduce_(t, self.group)
        return {k: v / self.size for k, v in zip(keys, t.tolist())}


def global_mean(total: float, count: int, g: Optional[Grid] = None) -> float:
    """``Σ total / Σ count`` over the data group (e.g. the dataset's mean squared norm for the scale factor)."""
    g = g or grid()
    t = torch.tensor([float(total), float(count)], dtype=torch.float64, device=g.device)
    if g.data_size > 1:
        all_reduce_(t, g.data_group)
    return float(t[0] / t[1].clamp_min(1))


def assert_in_sync(module: nn.Module, g: Optional[Grid] = None, atol: float = 0.0) -> None:
    """Raise if the parameters differ between data-parallel replicas (a debugging aid; one all-reduce)."""
    g = g or grid()
    if g.data_size == 1:
        return
    with torch.no_grad():
        sums = torch.stack([p.double().sum() for p in module.parameters()])
        lo, hi = sums.clone(), sums.clone()
        all_reduce_(lo, g.data_group, dist.ReduceOp.MIN)
        all_reduce_(hi, g.data_group, dist.ReduceOp.MAX)
        if bool(((hi - lo).abs() > atol).any()):
            raise DistributedError(f"rank {g.rank}: parameters differ between data-parallel replicas")


# ------------------------------------------------------------------------------------------------
# Latent sharding
# ------------------------------------------------------------------------------------------------


def _pack(values: Tensor, indices: Tensor, index_dtype: torch.dtype = torch.int32) -> Tensor:
    """``(values [..., w], indices [..., w]) -> uint8 [..., w * (value bytes + index bytes)]``: one all-gather
    carries both."""
    v = values.contiguous().view(torch.uint8).reshape(*values.shape, -1)
    i = indices.to(index_dtype).contiguous().view(torch.uint8).reshape(*indices.shape, -1)
    return torch.cat([v, i], -1).reshape(*values.shape[:-1], -1)


def _unpack(packed: Tensor, dtype: torch.dtype, w: int, index_dtype: torch.dtype = torch.int32):
    vb = torch.empty((), dtype=dtype).element_size()
    ib = torch.empty((), dtype=index_dtype).element_size()
    p = packed.reshape(*packed.shape[:-1], w, vb + ib)
    values = p[..., :vb].contiguous().view(dtype).squeeze(-1)
    indices = p[..., vb:].contiguous().view(index_dtype).squeeze(-1).long()
    return values, indices


def index_dtype_for(n: int) -> torch.dtype:
    """The narrowest index dtype for global ids in ``[0, n)`` (int32 halves the merge's index bytes)."""
    return torch.int32 if n <= 2**31 else torch.int64


def merge_topk(values: Tensor, indices: Tensor, k: int, group, latent_rank: int,
               index_dtype: torch.dtype = torch.int32) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-``k`` per row from each rank's local candidates.

    ``values [R, w]`` (this rank's candidates, padded with ``-inf``), ``indices [R, w]`` their *global* ids
    (they must fit ``index_dtype``; see :func:`index_dtype_for`). Returns ``(top_values [R, k], top_indices
    [R, k], mine [R, w] bool)``: the merged winners (sorted descending, identical on every rank) and which of
    this rank's candidates won. Communication: one all-gather of ``R·w`` (value, index) pairs per rank.
    """
    w = values.shape[-1]
    if group is None or _group_size(group) == 1:
        top, pos = torch.topk(values, k, dim=-1)
        mine = torch.zeros_like(values, dtype=torch.bool).scatter_(-1, pos, True)
        return top, indices.gather(-1, pos), mine
    gathered = all_gather(_pack(values, indices, index_dtype), group)  # [P, R, w*(vb+ib)]
    vals, idx = _unpack(gathered, values.dtype, w, index_dtype)  # [P, R, w]
    P, R = vals.shape[0], vals.shape[1]
    vals = vals.permute(1, 0, 2).reshape(R, P * w)
    idx = idx.permute(1, 0, 2).reshape(R, P * w)
    top, pos = torch.topk(vals, k, dim=-1)
    won = torch.zeros(R, P * w, dtype=torch.bool, device=values.device).scatter_(-1, pos, True)
    return top, idx.gather(-1, pos), won[:, latent_rank * w : (latent_rank + 1) * w]


def _pad(t: Tensor, width: int, value) -> Tensor:
    if t.shape[-1] == width:
        return t
    return F.pad(t, (0, width - t.shape[-1]), value=value)


def _build(config: dict, d_sae: int, *, backend: str = "auto", device=None, where="the SAE config", weights=None):
    """An SAE module from a saved config with ``d_sae`` replaced (``k`` clipped to it); every field checked, and
    ``weights`` (name -> shape) matched before anything is allocated."""
    from .io import sae_from_config

    return sae_from_config(config, where, backend=backend, d_sae=d_sae, device=device, weights=weights)


def _split_dims(full_shapes: dict[str, torch.Size], local_shapes: dict[str, torch.Size]) -> dict[str, Optional[int]]:
    """For each state entry: the dimension split across latent shards, or ``None`` when replicated."""
    dims = {}
    for name, fs in full_shapes.items():
        ls = local_shapes[name]
        diff = [i for i, (a, b) in enumerate(zip(fs, ls)) if a != b]
        dims[name] = diff[0] if diff else None
    return dims


SHARDABLE = ("jumprelu", "topk", "batchtopk", "relu")


class ShardedSAE(nn.Module):
    """One latent shard of an SAE too wide for one device (see the module docstring).

    ``self.shard`` is an ordinary SAE module of the same architecture with ``d_sae = d_sae_local`` holding
    this rank's slice ``[start, stop)``; its kernels, ``apply_constraints`` and ``observe`` (per-latent
    statistics) are used as they are. ``training_forward`` returns the global loss/``x_hat``/``l0`` (identical
    on the latent group) and ``fired [d_sae]`` for the whole SAE, so a training loop sees the interface of a
    single-process SAE; ``dead_mask`` may be the whole ``[d_sae]`` mask or this shard's ``[d_sae_local]``.
    """

    def __init__(self, shard: nn.Module, full_config: dict, g: Grid, split: dict[str, Optional[int]]):
        super().__init__()
        arch = full_config["architecture"]
        if arch not in SHARDABLE:
            raise ValueError(f"latent sharding supports architectures {list(SHARDABLE)}, got {arch!r}")
        self.shard = shard
        self.grid = g
        self.full_config = dict(full_config)
        self.split = dict(split)
        sizes = split_sizes(full_config["d_sae"], g.latent_size)
        self.start = sum(sizes[: g.latent_rank])
        self.stop = self.start + sizes[g.latent_rank]
        if shard.d_sae != self.stop - self.start:
            raise ValueError(f"shard has d_sae={shard.d_sae}, expected {self.stop - self.start}")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_full(cls, sae: nn.Module, g: Optional[Grid] = None) -> "ShardedSAE":
        """Slice a full SAE (identical on every rank) into this rank's shard."""
        g = g or grid()
        cfg = sae.config()
        _check_shardable(cfg, g)
        start, stop = shard_range(cfg["d_sae"], g.latent_rank, g.latent_size)
        with torch.random.fork_rng(devices=[]):  # building the shard must not move the caller's RNG
            local = _build(cfg, stop - start, backend=sae.backend, device=sae.device)
        full_state = sae.state_dict()
        split = _split_dims({k: v.shape for k, v in full_state.items()},
                            {k: v.shape for k, v in local.state_dict().items()})
        local.load_state_dict({k: _slice(v, split[k], start, stop) for k, v in full_state.items()})
        local.train(sae.training)
        return cls(local, cfg, g, split)

    @classmethod
    def create(cls, architecture: str, d_in: int, d_sae: int, g: Optional[Grid] = None, *, seed: int = 0,
               **kwargs) -> "ShardedSAE":
        """Build the shard directly (never materialising the full SAE): the same initialisation distribution
        as the full module, from the RNG seeded with ``seed`` and the latent rank (data replicas agree)."""
        from .sae import ARCHITECTURES

        g = g or grid()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
        k = kwargs.pop("k", None)
        args = (d_in, d_sae) if k is None else (d_in, d_sae, k)
        with torch.device("meta"):
            cfg = ARCHITECTURES[architecture](*args, **{k_: v for k_, v in kwargs.items() if k_ != "device"}).config()
        _check_shardable(cfg, g)
        start, stop = shard_range(d_sae, g.latent_rank, g.latent_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + g.latent_rank)
            local = _build(cfg, stop - start, backend=kwargs.get("backend", "auto"), device=kwargs.get("device"))
        meta_full = {k_: v.shape for k_, v in _meta_state(cfg).items()}
        return cls(local, cfg, g, _split_dims(meta_full, {k_: v.shape for k_, v in local.state_dict().items()}))

    # -- the SAE surface the training loop uses -----------------------------------------
    @property
    def d_sae(self) -> int:
        return self.full_config["d_sae"]

    @property
    def d_sae_local(self) -> int:
        return self.stop - self.start

    @property
    def d_in(self) -> int:
        return self.shard.d_in

    @property
    def architecture(self) -> str:
        return self.full_config["architecture"]

    @property
    def dtype(self):
        return self.shard.dtype

    @property
    def device(self):
        return self.shard.device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            cfg = self.__dict__.get("full_config", {})
            if name in cfg:
                return cfg[name]
            return getattr(self._modules["shard"], name)

    def config(self) -> dict:
        return dict(self.full_config)

    def ops(self, device=None):
        return self.shard.ops(device)

    def apply_constraints(self) -> None:
        self.shard.apply_constraints()

    def observe(self, x: Tensor, out) -> None:
        self.shard.observe(x, out)

    @torch.no_grad()
    def broadcast_replicated(self) -> None:
        """Make the replicated tensors (``b_dec``, scalar buffers) those of latent rank 0 on the whole latent
        group — shards cut from SAEs that were initialised without a common seed still form one SAE."""
        g = self.grid
        if g.latent_size == 1:
            return
        src = g.global_rank(g.data_rank, 0)
        state = self.shard.state_dict()
        for name, dim in self.split.items():
            if dim is None and name in state:
                broadcast_(state[name], src, g.latent_group)

    def save(self, path) -> Path:
        """Collective: every rank calls it (see :func:`save_sharded`)."""
        return save_sharded(self, path)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.training_forward(x).x_hat.to(x.dtype).reshape(x.shape)

    # -- the sharded training forward -----------------------------------------------------
    def training_forward(self, x: Tensor, target: Optional[Tensor] = None, *, dead_mask: Optional[Tensor] = None,
                         sparsity_coefficient: Optional[float] = None):
        if target is not None:
            raise ValueError("latent sharding trains SAEs only: a transcoder's target is not supported here")
        s = self.shard
        x2, _ = s._flatten(x)
        if dead_mask is not None:
            if not isinstance(dead_mask, Tensor) or dead_mask.shape not in ((self.d_sae,), (self.d_sae_local,)):
                raise ValueError(f"dead_mask must be a [d_sae]=[{self.d_sae}] (or this shard's "
                                 f"[d_sae_local]=[{self.d_sae_local}]) bool tensor")
            if dead_mask.shape[0] == self.d_sae:
                dead_mask = dead_mask[self.start : self.stop]
            dead_mask = dead_mask.to(device=x2.device, dtype=torch.bool)
        group = self.grid.latent_group if self.grid.latent_size > 1 else None
        ops = s.ops(x2.device)
        # b_dec is replicated: its use in the encoder input gathers every shard's gradient in backward.
        b_in = copy_in(s.b_dec, group)
        x_in = x2 - b_in if s.apply_b_dec_to_input else x2
        zero_b = torch.zeros_like(s.b_dec).detach()
        arch = self.architecture
        aux = x2.new_zeros(())
        if arch == "jumprelu":
            out = ops.jumprelu_sae(x_in, s.W_enc, s.b_enc, s.W_dec, zero_b, s.threshold, s.bandwidth, False)
            x_hat = reduce_out(out.x_hat, group) + s.b_dec
            l0 = reduce_out(out.l0, group)
            lam = s.sparsity_coefficient if sparsity_coefficient is None else sparsity_coefficient
            fwd = ref.SAEForward(x_hat=x_hat, l0=l0, fired=self._gather_fired(out.fired, group))
            return s._output(x2, fwd, l0.mean(), aux, lam, 0.0)
        if arch == "relu":
            out = ops.relu_sae(x_in, s.W_enc, s.b_enc, s.W_dec, zero_b, False)
            x_hat = reduce_out(out.x_hat, group) + s.b_dec
            sparsity = reduce_out(out.sparsity, group)
            l0 = all_reduce_(out.l0.detach().clone(), group)
            lam = s.sparsity_coefficient if sparsity_coefficient is None else sparsity_coefficient
            fwd = ref.SAEForward(x_hat=x_hat, l0=l0, fired=self._gather_fired(out.fired, group))
            return s._output(x2, fwd, sparsity.mean(), aux, lam, 0.0)
        # TopK / BatchTopK: local selection, merged across the latent group.
        pre = F.relu(x_in @ s.W_enc + s.b_enc)  # [B, n_local]
        B, n = pre.shape
        k = self.full_config["k"]
        if arch == "topk":
            vals, idx = ops.topk(pre, min(k, n))
            cand_v = _pad(vals.detach(), k, float("-inf"))
            cand_i = _pad(idx + self.start, k, 0)
            top, _, mine = merge_topk(cand_v, cand_i, k, group, self.grid.latent_rank, index_dtype_for(self.d_sae))
            mine = mine[:, : vals.shape[1]]
            partial = ops.sparse_decode(vals * mine, idx, s.W_dec, None)
            kept_local = mine & (vals > 0)
            min_kept = None
        else:  # batchtopk: the B·k largest entries of the whole [B, d_sae] batch
            n_keep = min(B * k, B * self.d_sae)
            flat = pre.reshape(-1)
            vals, fidx = torch.topk(flat, min(n_keep, flat.numel()), sorted=False)
            rows, cols = fidx // n, fidx % n
            cand_v = _pad(vals.detach().unsqueeze(0), n_keep, float("-inf"))
            cand_i = _pad((rows * self.d_sae + cols + self.start).unsqueeze(0), n_keep, 0)
            top, _, mine = merge_topk(cand_v, cand_i, n_keep, group, self.grid.latent_rank,
                                      index_dtype_for(B * self.d_sae))
            mine = mine[0, : vals.shape[0]]
            f = torch.zeros_like(flat).scatter(0, fidx, vals * mine).reshape(B, n)
            partial = f @ s.W_dec
            kept_local = torch.zeros(B, n, dtype=torch.bool, device=pre.device).reshape(-1)
            kept_local[fidx[mine & (vals > 0)]] = True
            kept_local = kept_local.reshape(B, n)
            idx = None
            positive = top[top > 0]
            min_kept = positive.min().detach() if positive.numel() else None
        x_hat = reduce_out(partial, group) + s.b_dec
        with torch.no_grad():
            if arch == "topk":
                l0 = (top > 0).sum(-1).float()
                fired = torch.zeros(n, dtype=torch.bool, device=pre.device)
                fired[idx[kept_local]] = True
            else:
                l0 = all_reduce_(kept_local.sum(-1).float(), group)
                fired = kept_local.any(0)
        if arch == "batchtopk" and s.training and min_kept is not None:
            with torch.no_grad():
                m = min_kept.float()
                if s.calibrated:
                    s.threshold.mul_(s.threshold_decay).add_((1 - s.threshold_decay) * m)
                else:
                    s.threshold.copy_(m)
        if dead_mask is not None and B:
            e_hat = self._auxk(x_in, dead_mask, group, ops, B)
            if e_hat is not None:
                aux = ref.auxk_loss((x2 - x_hat).detach(), e_hat)
        fwd = ref.SAEForward(x_hat=x_hat, l0=l0, fired=self._gather_fired(fired, group))
        return s._output(x2, fwd, x2.new_zeros(()), aux, 0.0, s.aux_coefficient)

    def _gather_fired(self, fired: Tensor, group) -> Tensor:
        """This shard's ``fired [d_sae_local]`` -> the whole SAE's ``[d_sae]`` (d_sae bytes per rank per step),
        so the training loop's dead-latent statistics look exactly like a single-process SAE's."""
        if group is None:
            return fired
        width = split_sizes(self.d_sae, self.grid.latent_size)
        parts = all_gather(_pad(fired.to(torch.uint8), width[0], 0), group)
        return torch.cat([parts[i, :w] for i, w in enumerate(width)]).bool()

    def _auxk(self, x_in: Tensor, dead_mask: Tensor, group, ops, B: int) -> Optional[Tensor]:
        """AuxK's ``ê`` with the top ``k_aux`` dead latents of the whole SAE, merged like the main top-k."""
        s = self.shard
        k_aux = self.full_config["k_aux"]
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel():
            pre_dead = F.relu(x_in @ s.W_enc[:, dead] + s.b_enc[dead])
            vals, idx = ops.topk(pre_dead, min(k_aux, dead.numel()))
        else:
            vals = x_in.new_zeros(B, 0)
            idx = torch.zeros(B, 0, dtype=torch.long, device=x_in.device)
        cand_v = _pad(vals.detach(), k_aux, float("-inf"))
        cand_i = _pad(dead[idx] + self.start if dead.numel() else idx, k_aux, 0)
        top, _, mine = merge_topk(cand_v, cand_i, k_aux, group, self.grid.latent_rank, index_dtype_for(self.d_sae))
        if not bool(torch.isfinite(top).any()):
            return None  # no dead latent on any shard (the same verdict everywhere: `top` is identical)
        mine = mine[:, : vals.shape[1]]
        if dead.numel():
            partial = ops.sparse_decode(vals * mine, idx, s.W_dec[dead], None)
        else:
            partial = x_in.new_zeros(B, s.d_in)
        return reduce_out(partial, group)


def _check_shardable(cfg: dict, g: Grid) -> None:
    if cfg["architecture"] not in SHARDABLE:
        raise ValueError(f"latent sharding supports architectures {list(SHARDABLE)}, got {cfg['architecture']!r}")
    if cfg["d_sae"] < g.latent_size:
        raise ValueError(f"d_sae={cfg['d_sae']} must be >= the latent-parallel size {g.latent_size}")


def _slice(t: Tensor, dim: Optional[int], start: int, stop: int) -> Tensor:
    return t if dim is None else t.narrow(dim, start, stop - start).clone()


def _meta_state(cfg: dict) -> dict[str, Tensor]:
    with torch.device("meta"):
        return _build(cfg, cfg["d_sae"], device="meta").state_dict()


# ------------------------------------------------------------------------------------------------
# Sharded checkpoints
# ------------------------------------------------------------------------------------------------


def _shard_file(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.safetensors"


def _optim_file(i: int, n: int) -> str:
    return f"optim-{i:05d}-of-{n:05d}.safetensors"


_OPTIM_META = "fastsae.optimizer"


def save_sharded(module: ShardedSAE, path, optimizer: Optional[torch.optim.Optimizer] = None,
                 extra: Optional[dict] = None) -> Path:
    """Write one consistent sharded checkpoint. Collective: every rank of the grid calls it.

    The ranks of data-rank 0 each write their shard (and optimizer shard); after a barrier rank 0 writes
    ``shards.json`` (temp + rename). An existing manifest is removed first, so a crash midway leaves a
    directory without manifest (incomplete) rather than a manifest pointing at mixed files.
    """
    from .io import atomic_write_bytes, pack_optimizer, write_safetensors

    g = module.grid
    path = Path(path)
    n = g.latent_size
    if g.is_main:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
    barrier()
    if g.data_rank == 0:
        write_safetensors(path / _shard_file(g.latent_rank, n), module.shard.state_dict())
        if optimizer is not None:
            tensors, meta = pack_optimizer(optimizer)
            write_safetensors(path / _optim_file(g.latent_rank, n), tensors, {_OPTIM_META: json.dumps(meta)})
    barrier()
    if g.is_main:
        sizes = split_sizes(module.d_sae, n)
        manifest = dict(
            fastsae=1,
            sharded=True,
            config=module.config(),
            split=module.split,
            shards=[dict(file=_shard_file(i, n), start=sum(sizes[:i]), stop=sum(sizes[: i + 1]),
                         bytes=(path / _shard_file(i, n)).stat().st_size) for i in range(n)],
            optimizer=[_optim_file(i, n) for i in range(n)] if optimizer is not None else None,
            extra=extra or {},
        )
        atomic_write_bytes(path / MANIFEST, json.dumps(manifest, indent=2).encode())
    barrier()
    return path


def read_manifest(path) -> dict:
    """``shards.json``, checked: its fields have the right types, its files exist with the recorded sizes and lie
    inside ``path`` (ValueError naming the manifest otherwise)."""
    from ._checks import file_in_folder
    from .io import read_json

    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no {MANIFEST})")
    manifest = read_json(mpath)
    shards, split, cfg = manifest.get("shards"), manifest.get("split"), manifest.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{mpath}: field 'config' must be an object")
    if not isinstance(split, dict) or not all(d is None or (isinstance(d, int) and not isinstance(d, bool)
                                                            and 0 <= d < 2) for d in split.values()):
        raise ValueError(f"{mpath}: field 'split' must map tensor names to null or a dimension (0 or 1)")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("bytes"), int) and not isinstance(s["bytes"], bool)
            for s in shards):
        raise ValueError(f"{mpath}: field 'shards' must be a non-empty list of {{file, bytes, ...}} objects")
    for s in shards:
        f = file_in_folder(path, s.get("file"), mpath)
        if not f.is_file() or f.stat().st_size != s["bytes"]:
            raise ValueError(f"{mpath}: shard {s['file']} is missing or has the wrong size")
    optim = manifest.get("optimizer")
    if optim is not None:
        if not isinstance(optim, list) or len(optim) != len(shards):
            raise ValueError(f"{mpath}: field 'optimizer' must list one file per shard")
        for name in optim:
            file_in_folder(path, name, mpath)
    return manifest


def _full_state(path: Path, manifest: dict) -> dict[str, Tensor]:
    from .io import read_safetensors

    shards = [read_safetensors(path / s["file"])[0] for s in manifest["shards"]]
    out = {}
    for name, dim in manifest["split"].items():
        if any(name not in s for s in shards):
            raise ValueError(f"{path / MANIFEST}: tensor {name!r} is missing from a shard")
        out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)
    return out


def load_optimizer_shard(path, optimizer: torch.optim.Optimizer, g: Optional[Grid] = None) -> None:
    """Restore this rank's optimizer state saved by ``save_sharded(..., optimizer=...)`` (same latent size)."""
    g = g or grid()
    manifest = read_manifest(path)
    files = manifest.get("optimizer")
    if not files:
        raise ValueError(f"{path}: the checkpoint holds no optimizer state")
    if len(files) != g.latent_size:
        raise ValueError(f"{path}: optimizer state was saved for latent size {len(files)}, "
                         f"this grid has {g.latent_size}")
    from .io import read_safetensors, unpack_optimizer

    file = Path(path) / files[g.latent_rank]
    tensors, metadata = read_safetensors(file)
    try:
        meta = json.loads(metadata[_OPTIM_META])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{file} holds no fastsae optimizer state") from e
    unpack_optimizer(optimizer, tensors, meta, file)


def load_sharded(path, *, device=None, backend: str = "auto"):
    """Reassemble a sharded checkpoint into one single-process SAE (for inference or further training)."""
    from .io import _check_device

    _check_device(device)
    path = Path(path)
    manifest = read_manifest(path)
    cfg = manifest["config"]
    state = _full_state(path, manifest)
    sae = _build(cfg, cfg.get("d_sae"), backend=backend, where=path / MANIFEST,
                 weights={k: v.shape for k, v in state.items()})
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: shards do not match the manifest's config: {e}") from e
    return sae.to(device) if device is not None else sae


def load_shard(path, g: Optional[Grid] = None, *, backend: str = "auto", device=None) -> ShardedSAE:
    """Resume: this rank's :class:`ShardedSAE` from a sharded checkpoint, on any latent size (the same size
    reads only this rank's file; another size reassembles the SAE on the host and re-slices it)."""
    from .io import read_safetensors

    g = g or grid()
    path = Path(path)
    manifest = read_manifest(path)
    cfg = manifest["config"]
    _build(cfg, cfg.get("d_sae"), device="meta", where=path / MANIFEST)  # every field checked, nothing allocated
    n = len(manifest["shards"])
    if n == g.latent_size:
        state = read_safetensors(path / manifest["shards"][g.latent_rank]["file"])[0]
        start, stop = shard_range(cfg["d_sae"], g.latent_rank, g.latent_size)
        local = _build(cfg, stop - start, backend=backend, device=device, where=path / MANIFEST,
                       weights={k: v.shape for k, v in state.items()})
        try:
            local.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: shard {g.latent_rank} does not match the manifest's config: {e}") from e
        return ShardedSAE(local, cfg, g, manifest["split"])
    state = _full_state(path, manifest)
    full = _build(cfg, cfg["d_sae"], backend=backend, device=device, where=path / MANIFEST,
                  weights={k: v.shape for k, v in state.items()})
    full.load_state_dict(state)
    return ShardedSAE.from_full(full, g)


# ------------------------------------------------------------------------------------------------
# Communication model (what benchmarks/bench_comm.py reports; checked against count_bytes in the tests)
# ------------------------------------------------------------------------------------------------


def comm_per_step(
    architecture: str,
    *,
    batch: int,
    d_in: int,
    d_sae: int,
    k: int = 0,
    k_aux: int = 0,
    latent_size: int = 1,
    data_size: int = 1,
    value_bytes: int = 4,
    aux: bool = False,
    apply_b_dec_to_input: bool = False,
    naive: bool = False,
) -> list[tuple[str, str, int, int]]:
    """The collectives one training step issues on one rank: ``(what, op, group_size, payload_bytes)``.

    ``batch`` is the per-rank batch. ``naive=True`` models the baseline that all-gathers the dense
    ``[B, d_sae / latent_size]`` activations instead of the ``(value, index)`` top-k candidates.
    Data-parallel collectives (gradients, buffers, fired) are listed when ``data_size > 1``.
    """
    P, D, vb = latent_size, data_size, value_bytes
    n_local = -(-d_sae // P)  # the largest shard (what the padded collectives carry)
    out = []
    if P > 1:
        if architecture in ("topk", "batchtopk"):
            if naive:
                out.append(("dense activations", "all_gather", P, batch * n_local * vb))
            elif architecture == "topk":
                out.append(("top-k candidates", "all_gather", P, batch * k * (vb + 4)))
            else:
                ib = torch.empty((), dtype=index_dtype_for(batch * d_sae)).element_size()
                out.append(("batch top-k candidates", "all_gather", P, batch * k * (vb + ib)))
            out.append(("partial x_hat", "all_reduce", P, batch * d_in * vb))
            if architecture == "batchtopk":
                out.append(("l0", "all_reduce", P, batch * 4))
        else:  # jumprelu / relu: no selection to merge
            if naive:
                out.append(("dense activations", "all_gather", P, batch * n_local * vb))
            out.append(("partial x_hat", "all_reduce", P, batch * d_in * vb))
            if architecture == "relu":
                out.append(("sparsity", "all_reduce", P, batch * vb))
            out.append(("l0", "all_reduce", P, batch * 4))
        out.append(("fired", "all_gather", P, n_local))
        if aux and architecture in ("topk", "batchtopk"):
            out.append(("AuxK candidates", "all_gather", P, batch * k_aux * (vb + 4)))
            out.append(("partial AuxK e_hat", "all_reduce", P, batch * d_in * vb))
        if apply_b_dec_to_input:
            out.append(("b_dec grad (backward)", "all_reduce", P, d_in * vb))
        out.append(("non-finite verdict", "all_reduce", P, 4))
    if D > 1:
        n_params = 4 + (architecture == "jumprelu")
        shard = d_sae // P
        # One flat buffer per dtype: the parameters' dtype, float32 for θ (float64 in a float64 SAE), and
        # float64 for the per-rank losses and "has a gradient" flags.
        buckets = {vb: (2 * d_in * shard + shard + d_in) * vb}
        if architecture == "jumprelu":
            wide = 8 if vb == 8 else 4
            buckets[wide] = buckets.get(wide, 0) + shard * wide
        buckets[8] = buckets.get(8, 0) + (D + n_params) * 8
        for b, nbytes in buckets.items():
            out.append((f"gradients ({b}-byte)" + (" + losses + flags" if b == 8 else ""), "all_reduce", D, nbytes))
        buffers = {"jumprelu": shard, "batchtopk": 1}.get(architecture, 0)
        if buffers:
            out.append(("running-statistic buffers", "all_reduce", D, buffers * 8))
        out.append(("fired (dead latents)", "all_reduce", D, d_sae))
    return out


def wire_bytes(op: str, group_size: int, payload: int) -> float:
    """Bytes a rank receives for one collective with the bandwidth-optimal (ring) algorithms."""
    p = group_size
    if op == "all_reduce":
        return 2 * (p - 1) / p * payload
    if op == "all_gather":
        return (p - 1) * payload
    return float(payload)  # broadcast


# ------------------------------------------------------------------------------------------------
# fastsae.train under torchrun
# ------------------------------------------------------------------------------------------------


class RankSlicedSource:
    """This data rank's rows of a source's global stream: global batch ``g`` holds rows
    ``[g·B·D, (g+1)·B·D)`` of the stream and rank ``r`` takes ``[r·B, (r+1)·B)`` of it, so ``D`` ranks with
    per-rank batch ``B`` consume exactly the batches of one process with batch ``B·D``, disjointly.

    The stream is a deterministic function of the seed, so the ranks agree on it without communicating.
    Shard folders are read selectively: each rank reads only its own rows from the memory maps (1/D of
    the I/O). Other sources (in-memory tensors) are walked whole and sliced, which costs only indexing.
    """

    resumable = True

    def __init__(self, source, batch_size: int, g: Grid):
        self.source = source
        self.d_in = source.d_in
        self.batch_size = batch_size
        self.grid = g
        self.resumable = getattr(source, "resumable", True)

    def __len__(self) -> int:
        return len(self.source) // self.grid.data_size

    def sample(self, n: int, seed: int) -> Tensor:
        return self.source.sample(n, seed)

    def chunks(self, seed: int, start_row: int = 0):
        from .data import ShardSource

        B, D, r = self.batch_size, self.grid.data_size, self.grid.data_rank
        first, skip = divmod(start_row, B)
        if type(self.source) is ShardSource:
            # Files: read only this rank's rows from the memory maps (1/D of the I/O), same stream.
            for chunk in _shard_rank_rows(self.source, seed, first * B * D, B, D, r):
                if skip:
                    drop = min(skip, chunk.shape[0])
                    chunk, skip = chunk[drop:], skip - drop
                if chunk.shape[0]:
                    yield chunk
            return
        pending, have = [], 0
        it = self.source.chunks(seed, first * B * D)
        for chunk in it:
            pending.append(chunk)
            have += chunk.shape[0]
            while have >= B * D:
                rows = torch.cat(pending) if len(pending) > 1 else pending[0]
                mine, rest = rows[r * B : (r + 1) * B], rows[B * D :]
                pending, have = ([rest] if rest.shape[0] else []), rest.shape[0]
                if skip:
                    mine, skip = mine[skip:], 0
                yield mine


class _CheckedStream:
    """A per-rank iterable (e.g. a streamed harvest), checked once on its first rows: data-parallel ranks must
    see different rows (else every rank trains on the same batch: shard the text, e.g. ``shard_items(docs)``),
    and the ranks of one latent group the same rows (they split one SAE's latents over one batch)."""

    def __init__(self, source, g: Grid):
        self.source, self.grid = source, g
        self.d_in = source.d_in
        self.resumable = getattr(source, "resumable", False)

    def sample(self, n: int, seed: int) -> Tensor:
        return self.source.sample(n, seed)

    def chunks(self, seed: int, start_row: int = 0):
        first = True
        for chunk in self.source.chunks(seed, start_row):
            if first:
                self._check(chunk)
                first = False
            yield chunk

    def _check(self, chunk: Tensor) -> None:
        g = self.grid
        head = chunk[:64].detach().double().cpu()
        sig = torch.stack([head.sum(), head.pow(2).sum()]).to(g.device)
        for group, size, want_same, what in ((g.data_group, g.data_size, False, "data-parallel"),
                                             (g.latent_group, g.latent_size, True, "latent-sharded")):
            if size == 1:
                continue
            lo, hi = sig.clone(), sig.clone()
            all_reduce_(lo, group, dist.ReduceOp.MIN)
            all_reduce_(hi, group, dist.ReduceOp.MAX)
            same = bool(torch.equal(lo, hi))
            if same != want_same:
                raise ValueError(
                    f"rank {g.rank}: the {what} ranks got {'the same' if same else 'different'} first rows from "
                    f"the iterable data; " + ("give every data-parallel rank its own stream (e.g. harvest "
                    "fastsae.distributed.shard_items(documents) on each rank)" if same else
                    "the ranks of one latent group must iterate the same stream")
                )


def _shard_rank_rows(src, seed: int, start_row: int, B: int, D: int, r: int):
    """``ShardSource.chunks(seed, start_row)`` restricted to the stream positions of data rank ``r``
    (``p mod B·D`` in ``[r·B, (r+1)·B)``), reading only those rows. Mirrors ShardSource's buffer/permutation
    scheme (tests/test_distributed.py checks it against slicing the full stream)."""
    import numpy as np

    from .data import _generator

    n, period = src.n, B * D
    epoch, offset = divmod(start_row, n)
    while True:
        base, cum = epoch * n, 0
        for b, buf in enumerate(src._buffers(seed, epoch)):
            sizes = [e - a for _, a, e in buf]
            size = sum(sizes)
            if offset >= cum + size:  # before the start: skip without reading
                cum += size
                continue
            p = torch.arange(base + max(offset, cum), base + cum + size)
            phase = p % period
            q = p[(phase >= r * B) & (phase < (r + 1) * B)] - base - cum  # my positions within the buffer
            cum += size
            if q.numel() == 0:
                continue
            perm = torch.randperm(size, generator=_generator(seed, epoch, b))
            c = perm[q]  # indices into the buffer's concatenated blocks
            starts = torch.tensor([0] + sizes).cumsum(0)
            block = torch.searchsorted(starts[1:], c, right=True)
            within = c - starts[block]
            positions, pieces = [], []
            for j in block.unique().tolist():
                sel = (block == j).nonzero().squeeze(1)
                i, a, _ = buf[j]
                rows = (a + within[sel]).numpy()
                order = np.argsort(rows, kind="stable")  # sorted reads from the map
                pieces.append(src.shards[i].take(rows[order]))
                positions.append(sel[torch.from_numpy(order)])
            got = torch.cat(pieces)
            out = torch.empty_like(got)
            out[torch.cat(positions)] = got
            yield out
        epoch, offset = epoch + 1, 0


class TrainingContext:
    """The hooks ``fastsae.train`` calls so that it runs unchanged under ``torchrun``.

    Single process: every hook is a no-op and ``module`` is the SAE itself. Launched with more than one rank:
    joins the process group (:func:`init`; ``latent_parallel`` or env ``FASTSAE_LATENT_PARALLEL`` ranks
    share one SAE's latents), shards the SAE when asked, and provides the data-parallel reductions.
    """

    def __init__(self, sae: nn.Module, device=None, latent_parallel: Optional[int] = None):
        self.full = sae
        self.active = launched()
        if latent_parallel is None:
            latent_parallel = int(os.environ.get("FASTSAE_LATENT_PARALLEL", "1"))
        if not self.active:
            if latent_parallel != 1:
                raise ValueError(f"latent_parallel={latent_parallel} needs torchrun with at least that many ranks")
            self.grid = Grid()
            self.device = torch.device(device) if device is not None else sae.device
            sae.to(self.device)
            self.module, self.dp = sae, None
            return
        self.grid = init(latent_parallel)
        if self.grid.backend == "nccl":
            self.device = self.grid.device  # one GPU per rank: cuda:LOCAL_RANK
        else:
            self.device = torch.device(device) if device is not None else sae.device
        if self.grid.latent_size > 1:
            # Slice on the host, then move only this rank's shard to its device.
            self.module = ShardedSAE.from_full(sae, self.grid)
            self.module.to(self.device)
            self.module.broadcast_replicated()
        else:
            self.module = sae.to(self.device)
        self.dp = DataParallel(self.module, self.grid)

    # -- what the loop asks ------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.grid.is_main

    @property
    def data_size(self) -> int:
        return self.grid.data_size

    def shard_source(self, source, batch_size: int):
        """Each data rank's disjoint slice of tensors / shard folders / synthetic data. A plain iterable is
        taken to be this rank's own stream already (e.g. a harvest over this rank's prompts)."""
        from .data import IterableSource

        if isinstance(source, IterableSource):
            return _CheckedStream(source, self.grid) if self.grid.distributed else source
        if self.grid.data_size == 1:
            return source
        return RankSlicedSource(source, batch_size, self.grid)

    def reduce_gradients(self, loss: Tensor) -> Optional[Tensor]:
        return None if self.dp is None else self.dp.reduce_gradients(loss)

    @property
    def gradient_hook(self):
        """``None`` single-process; else the callable ``train_step`` runs right after ``backward``."""
        return None if self.dp is None else self.dp.reduce_gradients

    def after_step(self, out) -> None:
        """After ``observe``: running statistics averaged; ``out.fired`` becomes the global batch's."""
        if self.dp is None:
            return
        self.dp.sync_buffers()
        out.fired = self.dp.reduce_fired(out.fired)

    def tokens(self, rows: int) -> int:
        return rows * self.grid.data_size

    def mean_(self, sums: Tensor) -> Tensor:
        """Metric sums averaged over the data group, in place (every rank logs the global numbers)."""
        if self.dp is not None and self.grid.data_size > 1:
            all_reduce_(sums, self.grid.data_group).div_(self.grid.data_size)
        return sums

    @torch.no_grad()
    def reduce_init(self, state, sae) -> Any:
        """A fresh run's input scale and ``b_dec`` from every rank's sample: mean squared norm averaged over
        ranks (the dataset normalisation factor), ``b_dec`` averaged. Identical samples change nothing."""
        if self.dp is None or self.grid.data_size == 1:
            return state
        t = torch.tensor([1.0 / state.scale**2], dtype=torch.float64, device=self.grid.device)
        lo, hi = t.clone(), t.clone()
        all_reduce_(lo, self.grid.data_group, dist.ReduceOp.MIN)
        all_reduce_(hi, self.grid.data_group, dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            all_reduce_(t, self.grid.data_group)
            state.scale = float((t / self.grid.data_size).rsqrt())
        b = sae.b_dec.detach().double()
        spread = b.clone()
        all_reduce_(b, self.grid.data_group)
        b /= self.grid.data_size
        if not torch.equal(b.to(sae.b_dec.dtype), spread.to(sae.b_dec.dtype)):
            sae.b_dec.copy_(b)
        return state

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_path(self, path: Optional[Path]) -> Optional[Path]:
        """The file this rank resumes from. Latent-sharded runs keep one file per shard and generation
        (optimizer state is sharded too); ``<name>.json``, written last, names the complete generation."""
        if path is None or self.grid.latent_size == 1:
            return path
        manifest = path.with_suffix(".json")
        if manifest.is_file():
            from ._checks import file_in_folder
            from .io import read_json

            files = read_json(manifest).get("files")
            if not isinstance(files, list):
                raise ValueError(f"{manifest} is not a valid checkpoint manifest: field 'files' must be a list")
            if len(files) != self.grid.latent_size:
                raise ValueError(f"{manifest} holds {len(files)} latent shards; this run has "
                                 f"latent_parallel={self.grid.latent_size} (resume needs the same)")
            return file_in_folder(path.parent, files[self.grid.latent_rank], manifest)
        return self._generation_file(path, 0)

    def _generation_file(self, path: Path, step: int, latent_rank: Optional[int] = None) -> Path:
        r = self.grid.latent_rank if latent_rank is None else latent_rank
        return path.with_name(f"{path.stem}-step{step:09d}-latent{r:05d}-of-{self.grid.latent_size:05d}{path.suffix}")

    def save_checkpoint(self, save, path: Path, payload) -> None:
        """``save(file, payload())`` on the ranks that own a distinct state (rank 0; or data-rank 0 of each
        latent shard). Sharded: each shard writes a new generation file, then rank 0 writes the manifest
        naming that generation (temp + rename), then the previous generation is removed — a crash at any
        point leaves a manifest that names one complete, consistent generation."""
        if self.dp is None:
            save(path, payload())
            return
        if self.grid.latent_size == 1:
            if self.grid.data_rank == 0:
                save(path, payload())
            barrier()
            return
        from .io import atomic_write_bytes

        base = path.with_name(path.name.split("-step")[0] + path.suffix) if "-step" in path.name else path
        data = payload()
        step = int(data["step"])
        mine = self._generation_file(base, step)
        if self.grid.data_rank == 0:
            save(mine, data)
        barrier()
        if self.is_main:
            files = [self._generation_file(base, step, i).name for i in range(self.grid.latent_size)]
            manifest = dict(step=step, files=files, latent_size=self.grid.latent_size, data_size=self.grid.data_size)
            atomic_write_bytes(base.with_suffix(".json"), json.dumps(manifest, indent=2).encode())
        barrier()
        if self.grid.data_rank == 0:
            pattern = f"{base.stem}-step*-latent{self.grid.latent_rank:05d}-of-{self.grid.latent_size:05d}{base.suffix}"
            for old in list(base.parent.glob(pattern)) + list(base.parent.glob(f".{pattern}.tmp*")):
                if old != mine:
                    old.unlink(missing_ok=True)  # older generations, and temporaries of interrupted saves

    def finish(self, sae) -> nn.Module:
        """The trained SAE as one module on every rank: the user's object (data parallel trains it in place;
        latent shards are gathered back into it)."""
        if not isinstance(sae, ShardedSAE):
            return sae
        full = self.full
        group = self.grid.latent_group
        widths = split_sizes(sae.d_sae, self.grid.latent_size)
        local = sae.shard.state_dict()
        with torch.no_grad():
            for name, t in full.state_dict().items():
                dim = sae.split.get(name)
                src = local[name]
                if dim is None:
                    t.copy_(src.to(t.device))
                    continue
                pad = [0, 0] * (src.dim() - dim - 1) + [0, widths[0] - src.shape[dim]]
                parts = all_gather(F.pad(src, pad), group)
                t.copy_(torch.cat([parts[i].narrow(dim, 0, w) for i, w in enumerate(widths)], dim).to(t.device))
        full.train(sae.training)
        return full
