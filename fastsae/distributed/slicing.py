"""Which rows and latents each rank owns: contiguous splits, this rank's share of files and tensors, and the
data sources ``fastsae.train`` reads under ``torchrun`` (each data rank its own rows of one global stream)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..data import ShardSource, _generator
from .collectives import all_reduce_
from .group import Grid, grid


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
