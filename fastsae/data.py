"""Activation sources for training: in-memory tensors, iterables of batches, folders of shards, synthetic data.

Every source turns into an :class:`ActivationSource`, an endless stream of rows ``[d_in]`` that
:func:`batches` cuts into ``[batch_size, d_in]`` batches. The stream is a deterministic function of
``(seed, row position)``, so a resumed run can restart it exactly where a checkpoint left it without
replaying the rows before (tensors and shard folders; re-iterable iterables are replayed).

- ``[N, d_in]`` tensor or array: a fresh random permutation of the rows every epoch.
- A folder of ``*.npy`` / ``*.safetensors`` shards (each one 2-D ``[n_tokens, d_in]`` array, read in name
  order, or in the order of an optional ``manifest.json``'s ``shards: [{file}, ...]``, which is never
  required and whose ``d_in`` is checked): files are memory-mapped and read
  lazily in contiguous blocks; every epoch the blocks are shuffled, then the rows within a buffer of
  blocks, so a dataset larger than RAM trains with bounded memory.
- Any iterable of ``[..., d_in]`` batches (tensors or arrays): used in its own order, re-batched.
- :func:`synthetic`: sparse non-negative mixtures of known unit directions, with the true dictionary.
"""
from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ActivationSource",
    "TensorSource",
    "ShardSource",
    "IterableSource",
    "SyntheticData",
    "synthetic",
    "realistic",
    "as_source",
    "batches",
    "feature_recovery",
]

# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def _generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a tuple of small integers (epoch, buffer, ...)."""
    h = int(seed) & 0xFFFFFFFF
    for s in salt:
        h = (h * 1_000_003 + int(s) + 1) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)


class ActivationSource:
    """An endless, deterministic stream of activation rows.

    Subclasses implement :meth:`chunks` (row tensors that concatenate to the stream, starting at
    ``start_row``) and :meth:`sample` (rows for estimating the input scale and ``b_dec``).
    """

    d_in: int
    #: True when ``chunks(seed, start_row)`` reproduces the stream exactly from any position.
    resumable: bool = True

    def chunks(self, seed: int, start_row: int = 0) -> Iterator[Tensor]:
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> Tensor:
        raise NotImplementedError

    def __len__(self) -> int:  # rows per epoch, where known
        raise TypeError(f"{type(self).__name__} has no known length")


def batches(source: ActivationSource, batch_size: int, *, seed: int = 0, start_batch: int = 0) -> Iterator[Tensor]:
    """``[batch_size, d_in]`` batches of ``source``'s stream, starting after ``start_batch`` batches."""
    pending: list[Tensor] = []
    have = 0
    for chunk in source.chunks(seed, start_batch * batch_size):
        while chunk.shape[0]:
            take = min(batch_size - have, chunk.shape[0])
            pending.append(chunk[:take])
            have += take
            chunk = chunk[take:]
            if have == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, have = [], 0


def _as_rows(name: str, t, d_in: Optional[int] = None) -> Tensor:
    """An array-like ``[..., d_in]`` -> a float tensor ``[N, d_in]`` (no copy when possible)."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array of activations, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must hold floating-point activations, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [..., d_in] with at least 2 dimensions, got {tuple(t.shape)}")
    if d_in is not None and t.shape[-1] != d_in:
        raise ValueError(f"{name} must have last dimension d_in={d_in}, got shape {tuple(t.shape)}")
    return t.reshape(-1, t.shape[-1])


class TensorSource(ActivationSource):
    """Rows of an in-memory ``[N, d_in]`` tensor, in a new random order every epoch."""

    def __init__(self, x, *, chunk_rows: int = 65536):
        self.x = _as_rows("data", x)
        if self.x.shape[0] == 0:
            raise ValueError("data must contain at least one row")
        self.d_in = self.x.shape[1]
        self.chunk_rows = chunk_rows

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunks(self, seed, start_row=0):
        n = self.x.shape[0]
        epoch, offset = divmod(start_row, n)
        while True:
            perm = torch.randperm(n, generator=_generator(seed, epoch)).to(self.x.device)
            for i in range(offset, n, self.chunk_rows):
                yield self.x[perm[i:i + self.chunk_rows]]
            epoch, offset = epoch + 1, 0

    def sample(self, n, seed):
        n_rows = self.x.shape[0]
        if n >= n_rows:
            return self.x
        return self.x[torch.randperm(n_rows, generator=_generator(seed, -1))[:n].to(self.x.device)]


class IterableSource(ActivationSource):
    """Batches from any iterable of ``[..., d_in]`` tensors or arrays, in the iterable's order.

    A re-iterable object (a list, a DataLoader) is read again for every epoch, and a resumed run
    replays it to its position. A one-shot iterator is read once: rows taken for :meth:`sample` are
    kept and served first, and on resume it is assumed to be positioned where training stopped.
    """

    def __init__(self, iterable: Iterable):
        if isinstance(iterable, (str, bytes)) or not hasattr(iterable, "__iter__"):
            raise TypeError(f"data must be a tensor, an array, a folder of shards or an iterable of batches, "
                            f"got {type(iterable).__name__}")
        self.iterable = iterable
        self.one_shot = iter(iterable) is iterable
        self.resumable = not self.one_shot
        self._peeked: list[Tensor] = []
        self._it: Optional[Iterator] = None
        self.d_in = None  # known after the first batch
        first = self._pull()
        if first is None:
            raise ValueError("data is an empty iterable")
        self._peeked.append(first)

    def _pull(self) -> Optional[Tensor]:
        if self._it is None:
            self._it = iter(self.iterable)
        try:
            item = next(self._it)
        except StopIteration:
            return None
        rows = _as_rows("each batch of data", item, self.d_in)
        self.d_in = rows.shape[1]
        return rows

    def _stream(self) -> Iterator[Tensor]:
        """One pass over the data (the peeked rows first when one-shot)."""
        if self.one_shot:
            while self._peeked:
                yield self._peeked.pop(0)
            while (rows := self._pull()) is not None:
                yield rows
        else:
            for item in self.iterable:
                yield _as_rows("each batch of data", item, self.d_in)

    def chunks(self, seed, start_row=0):
        if self.one_shot:
            if start_row:
                warnings.warn("data is a one-shot iterator: resuming from its current position, not replaying "
                              f"the {start_row} rows already trained on", stacklevel=3)
            yield from self._stream()
            return
        skip = start_row
        while True:
            n_epoch = 0
            for rows in self._stream():
                n_epoch += rows.shape[0]
                if skip >= rows.shape[0]:
                    skip -= rows.shape[0]
                    continue
                yield rows[skip:]
                skip = 0
            if n_epoch == 0:
                return
            skip %= n_epoch  # a position past one epoch wraps (e.g. skip on a short dataset)

    def sample(self, n, seed):
        if self.one_shot:
            while sum(r.shape[0] for r in self._peeked) < n:
                rows = self._pull()
                if rows is None:
                    break
                self._peeked.append(rows)
            return torch.cat(self._peeked)[:n]
        got, out = 0, []
        for rows in self._stream():
            out.append(rows[: n - got])
            got += out[-1].shape[0]
            if got >= n:
                break
        return torch.cat(out)


# -- shard folders --------------------------------------------------------------------------------

_ST_DTYPES = {"F16": (np.float16, None), "F32": (np.float32, None), "F64": (np.float64, None),
              "BF16": (np.uint16, torch.bfloat16)}


class _Shard:
    """One memory-mapped 2-D array; ``rows(a, b)`` / ``take(idx)`` read only what they return."""

    def __init__(self, path: Path):
        self.path = path
        self.view_as = None  # torch dtype to reinterpret the numpy bits as (bf16)
        if path.suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as e:
                raise ValueError(f"{path} is not a readable .npy file: {e}") from e
        else:
            arr = self._open_safetensors(path)
        if arr.ndim != 2:
            raise ValueError(f"{path} must hold a 2-D [n_tokens, d_in] array, got shape {arr.shape}")
        if arr.dtype not in (np.float16, np.float32, np.float64) and self.view_as is None:
            raise ValueError(f"{path} must hold float16/bfloat16/float32/float64 activations, got {arr.dtype}")
        self.arr = arr
        self.n, self.d_in = arr.shape

    def _open_safetensors(self, path: Path) -> np.ndarray:
        # Parse the header ourselves so the tensor can be memory-mapped (safetensors' own loaders read it all).
        size = path.stat().st_size
        try:
            with open(path, "rb") as fh:
                (n_header,) = struct.unpack("<Q", fh.read(8))
                if n_header > size - 8:
                    raise ValueError("header length exceeds the file size")
                header = json.loads(fh.read(n_header))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        if len(tensors) != 1 and "activations" not in tensors:
            raise ValueError(f"{path} must hold exactly one tensor (or one named 'activations'), "
                             f"got {sorted(tensors)}")
        info = tensors.get("activations") or next(iter(tensors.values()))
        if info.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"{path}: activations must be F16/BF16/F32/F64, got {info.get('dtype')}")
        np_dtype, self.view_as = _ST_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        expected = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        if end - begin != expected or 8 + n_header + end > size:
            raise ValueError(f"{path} is truncated or corrupt: tensor needs bytes [{begin}, {end}) after the "
                             f"header, file has {size - 8 - n_header}")
        if expected == 0:
            return np.zeros(shape, dtype=np_dtype)
        return np.memmap(path, dtype=np_dtype, mode="r", offset=8 + n_header + begin, shape=shape)

    def _tensor(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(a, copy=True))  # read from the map into writable memory
        return t.view(self.view_as) if self.view_as is not None else t

    def rows(self, a: int, b: int) -> Tensor:
        return self._tensor(self.arr[a:b])

    def take(self, idx: np.ndarray) -> Tensor:
        return self._tensor(self.arr[idx])


class ShardSource(ActivationSource):
    """A folder (or list) of ``.npy`` / ``.safetensors`` activation shards, read lazily.

    Args:
        block_rows: rows read contiguously per block (the unit of the epoch-level shuffle).
        buffer_rows: rows held in memory at once; rows are shuffled within this buffer.
    """

    def __init__(self, path, *, block_rows: int = 4096, buffer_rows: int = 262144):
        manifest = self._manifest(path)
        paths = self._list(path, manifest)
        self.shards = [_Shard(p) for p in paths]
        d_ins = {s.d_in for s in self.shards}
        if len(d_ins) != 1:
            bad = next(s for s in self.shards if s.d_in != self.shards[0].d_in)
            raise ValueError(f"{bad.path} has d_in={bad.d_in} but {self.shards[0].path} has {self.shards[0].d_in}")
        self.d_in = d_ins.pop()
        self._check_manifest(path, manifest)
        self.block_rows = int(block_rows)
        self.buffer_rows = max(int(buffer_rows), self.block_rows)
        self.blocks = [(i, a, min(a + self.block_rows, s.n)) for i, s in enumerate(self.shards)
                       for a in range(0, s.n, self.block_rows)]
        self.n = sum(s.n for s in self.shards)
        if self.n == 0:
            raise ValueError(f"{path}: the shards hold no rows")

    @staticmethod
    def _manifest(path) -> Optional[dict]:
        if isinstance(path, (list, tuple)) or not Path(path).is_dir():
            return None
        m = Path(path) / "manifest.json"
        if not m.is_file():
            return None
        try:
            manifest = json.loads(m.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{m} is not valid JSON: {e}") from e
        return manifest if isinstance(manifest, dict) else None

    @staticmethod
    def _list(path, manifest: Optional[dict]) -> list[Path]:
        if isinstance(path, (list, tuple)):
            return [Path(p) for p in path]
        path = Path(path)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist")
        listed = (manifest or {}).get("shards")
        if isinstance(listed, list) and listed and all(isinstance(e, dict) and "file" in e for e in listed):
            # A manifest that lists its shards is authoritative: a shard written by an interrupted harvest
            # but not yet recorded is not part of the dataset.
            files = [path / e["file"] for e in listed]
            for f in files:
                if not f.is_file():
                    raise ValueError(f"{path / 'manifest.json'} lists {f.name}, which does not exist")
            return files
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".safetensors") and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no .npy or .safetensors shards")
        return files

    def _check_manifest(self, path, manifest: Optional[dict]) -> None:
        if manifest and "d_in" in manifest and int(manifest["d_in"]) != self.d_in:
            raise ValueError(f"{Path(path) / 'manifest.json'} says d_in={manifest['d_in']} but the shards have "
                             f"d_in={self.d_in}")

    def __len__(self) -> int:
        return self.n

    def _buffers(self, seed: int, epoch: int) -> list[list[tuple[int, int, int]]]:
        order = torch.randperm(len(self.blocks), generator=_generator(seed, epoch)).tolist()
        out, cur, rows = [], [], 0
        for j in order:
            cur.append(self.blocks[j])
            rows += self.blocks[j][2] - self.blocks[j][1]
            if rows >= self.buffer_rows:
                out.append(cur)
                cur, rows = [], 0
        if cur:
            out.append(cur)
        return out

    def chunks(self, seed, start_row=0):
        epoch, offset = divmod(start_row, self.n)
        while True:
            for b, buf in enumerate(self._buffers(seed, epoch)):
                size = sum(e - a for _, a, e in buf)
                if offset >= size:  # skip whole buffers without reading them
                    offset -= size
                    continue
                rows = torch.cat([self.shards[i].rows(a, e) for i, a, e in buf])
                perm = torch.randperm(size, generator=_generator(seed, epoch, b))
                yield rows[perm[offset:]]
                offset = 0
            epoch += 1

    def sample(self, n, seed):
        n = min(n, self.n)
        g = _generator(seed, -1)
        if self.n > 16 * n:  # a permutation of every row of a huge folder would not fit in memory
            idx = torch.randint(0, self.n, (n,), generator=g).unique().numpy()
        else:
            idx = torch.randperm(self.n, generator=g)[:n].sort().values.numpy()
        starts = np.cumsum([0] + [s.n for s in self.shards])
        out = []
        for i, s in enumerate(self.shards):
            local = idx[(idx >= starts[i]) & (idx < starts[i + 1])] - starts[i]
            if local.size:
                out.append(s.take(local).to(torch.float32))
        return torch.cat(out)


def as_source(data) -> ActivationSource:
    """Whatever ``fastsae.train`` accepts as ``data`` -> an :class:`ActivationSource`."""
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, SyntheticData):
        return TensorSource(data.x)
    if isinstance(data, (Tensor, np.ndarray)):
        return TensorSource(data)
    if isinstance(data, (str, Path)):
        return ShardSource(data)
    return IterableSource(data)


# ----------------------------------------------------------------------------------------------
# Synthetic data with a known dictionary lives in fastsae/synthetic.py; these names stay importable from here.
# ----------------------------------------------------------------------------------------------

from .synthetic import SyntheticData, feature_recovery, realistic, synthetic  # noqa: E402
