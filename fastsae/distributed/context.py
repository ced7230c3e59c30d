"""``fastsae.train`` under ``torchrun``: :class:`TrainingContext`, the hooks the training loop calls (no-ops in one
process): joining the grid, sharding the SAE, slicing the data, the reductions, and sharded training checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import file_in_folder
from ..data import IterableSource
from ..io import atomic_write_bytes, read_json
from .collectives import all_gather, all_reduce_, barrier
from .data_parallel import DataParallel
from .group import Grid, init, launched
from .sharded import ShardedSAE
from .slicing import RankSlicedSource, _CheckedStream, split_sizes


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
