"""The process grid: joining the process group with a time-out, and where this rank sits on ``data × latent``."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, raised, or did not arrive within the time-out."""


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
