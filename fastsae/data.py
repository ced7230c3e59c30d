"""Activation sources for training: in-memory tensors, iterables of batches, folders of shards, synthetic data.

Every source turns into an :class:`ActivationSource`, an endless stream of rows ``[d_in]`` that
:func:`batches` cuts into ``[batch_size, d_in]`` batches. The stream is a deterministic function of
``(seed, row position)``, so a resumed run can restart it exactly where a checkpoint left it without
replaying the rows before (tensors and shard folders; re-iterable iterables are replayed).

- ``[N, d_in]`` tensor or array: a fresh random permutation of the rows every epoch.
- A folder of ``*.npy`` / ``*.safetensors`` shards (each one 2-D ``[n_tokens, d_in]`` array, read in name
  order, or in the order of an optional ``manifest.json``'s ``shards: [{file}, ...]``, which is never
  required and whose ``d_in`` is checked; its entries may not point outside the folder): headers are
  validated when a shard is opened and files are read lazily in contiguous blocks with ordinary reads (no
  memory map: a shard truncated or rewritten during training raises ValueError naming it, never SIGBUS);
  every epoch the blocks are shuffled, then the rows within a buffer of blocks, so a dataset larger than RAM
  trains with bounded memory.
- Any iterable of ``[..., d_in]`` batches (tensors or arrays): used in its own order, re-batched.
- :func:`synthetic`: sparse non-negative mixtures of known unit directions, with the true dictionary.
"""
from __future__ import annotations

import os
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
        first, n_items = self._pull(), 0
        while first is not None and first.shape[0] == 0:  # empty batches carry nothing: skip to the first row
            first, n_items = self._pull(), n_items + 1
        if first is None:
            raise ValueError("data is an empty iterable" if n_items == 0 else
                             f"data holds no rows: all {n_items} batches of the iterable are empty")
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

_SHARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Shard:
    """One 2-D ``[n_tokens, d_in]`` array in a file; ``rows(a, b)`` / ``take(idx)`` read only what they return.

    The header is validated when the shard is opened (its data must fit the file); every read first checks that
    the file still has the size, inode and modification time it had then, and reads with ordinary positional
    reads, never a memory map. So a shard truncated or rewritten while training reads it raises ValueError
    naming the file instead of killing the process with SIGBUS, and no offset outside the file is ever read.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            st = self.path.stat()
        except OSError as e:
            raise ValueError(f"{path} cannot be read: {e}") from e
        self._identity = (st.st_size, st.st_ino, st.st_mtime_ns)
        if self.path.suffix == ".npy":
            shape, self.dtype, self.offset, self._np_dtype = self._npy_header(st.st_size)
        else:
            shape, self.dtype, self.offset = self._safetensors_header()
            self._np_dtype = None
        if len(shape) != 2:
            raise ValueError(f"{path} must hold a 2-D [n_tokens, d_in] array, got shape {tuple(shape)}")
        if self.dtype not in _SHARD_DTYPES:
            raise ValueError(f"{path} must hold float16/bfloat16/float32/float64 activations, got {self.dtype}")
        self.n, self.d_in = shape
        self.row_bytes = self.d_in * torch.empty((), dtype=self.dtype).element_size()
        end = self.offset + self.n * self.row_bytes
        if end > st.st_size:
            raise ValueError(f"{path} is truncated or corrupt: its header describes {self.n} x {self.d_in} values "
                             f"ending at byte {end}, the file has {st.st_size}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.d_in)

    def _npy_header(self, size: int):
        """Shape, dtype and data offset from a ``.npy`` header (numpy's parser evaluates literals only)."""
        fmt = np.lib.format
        try:
            with open(self.path, "rb") as fh:
                version = fmt.read_magic(fh)
                read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, fortran_order, dtype = read(fh)
                offset = fh.tell()
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            raise ValueError(f"{self.path} is not a readable .npy file: {e}") from e
        if dtype.hasobject:  # never unpickled: object arrays are refused outright
            raise ValueError(f"{self.path} holds Python objects (dtype {dtype}), not activations")
        if fortran_order and len(shape) == 2 and min(shape) > 1:
            raise ValueError(f"{self.path} is stored in Fortran (column-major) order; save it C-ordered "
                             "(np.ascontiguousarray) so rows can be read lazily")
        native = dtype.newbyteorder("=")
        names = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}
        if native not in names:
            raise ValueError(f"{self.path} must hold float16/bfloat16/float32/float64 activations, got {dtype}")
        return tuple(shape), names[native], offset, dtype

    def _safetensors_header(self):
        from .io import read_safetensors_header

        header = read_safetensors_header(self.path)
        tensors = header.tensors
        if len(tensors) != 1 and "activations" not in tensors:
            raise ValueError(f"{self.path} must hold exactly one tensor (or one named 'activations'), "
                             f"got {sorted(tensors)}")
        info = tensors.get("activations") or next(iter(tensors.values()))
        return info.shape, info.dtype, info.start

    def _read(self, spans: list[tuple[int, int]]) -> Tensor:
        """The rows ``[a, b)`` of each span, concatenated, as a fresh ``[rows, d_in]`` tensor."""
        from .io import read_exact

        total = sum(b - a for a, b in spans)
        out = torch.empty(total, self.d_in, dtype=self.dtype)
        if not total:
            return out
        raw = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if (st.st_size, st.st_ino, st.st_mtime_ns) != self._identity:
                    raise ValueError(f"{self.path} changed on disk since it was opened (size {self._identity[0]} -> "
                                     f"{st.st_size} bytes): a shard must not be rewritten while training reads it")
                at = 0
                for a, b in spans:
                    n = (b - a) * self.row_bytes
                    read_exact(fh, self.offset + a * self.row_bytes, raw[at:at + n], self.path)
                    at += n
        except OSError as e:
            raise ValueError(f"{self.path} cannot be read: {e}") from e
        if self._np_dtype is not None and not self._np_dtype.isnative:  # a big-endian .npy
            out.numpy().byteswap(inplace=True)
        return out

    def rows(self, a: int, b: int) -> Tensor:
        if not 0 <= a <= b <= self.n:
            raise IndexError(f"{self.path}: rows [{a}, {b}) outside [0, {self.n})")
        return self._read([(a, b)])

    def take(self, idx: np.ndarray) -> Tensor:
        """Rows ``idx`` (any order), read as runs of consecutive rows."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return self._read([])
        if idx.min() < 0 or idx.max() >= self.n:
            raise IndexError(f"{self.path}: row indices must lie in [0, {self.n})")
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        uniq, first = np.unique(s, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= 4 * uniq.size:  # dense enough: one read of the whole span
            block, pos = self._read([(lo, hi)]), torch.from_numpy(uniq - lo)
        else:
            runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1)
            block, pos = self._read([(int(r[0]), int(r[-1]) + 1) for r in runs]), torch.arange(uniq.size)
        rows = block[pos][torch.from_numpy(first)]
        out = torch.empty_like(rows)
        out[torch.from_numpy(order)] = rows
        return out


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
        from .io import read_json

        return read_json(m)

    @staticmethod
    def _list(path, manifest: Optional[dict]) -> list[Path]:
        if isinstance(path, (list, tuple)):
            return [Path(p) for p in path]
        path = Path(path)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist")
        if manifest is not None and "shards" in manifest:
            # A manifest that lists its shards is authoritative: a shard written by an interrupted harvest
            # but not yet recorded is not part of the dataset. Its entries may not point outside the folder.
            from ._checks import file_in_folder

            where, listed = path / "manifest.json", manifest["shards"]
            if not isinstance(listed, list) or not all(isinstance(e, dict) and "file" in e for e in listed):
                raise ValueError(f"{where}: field 'shards' must be a list of {{\"file\": name, ...}} objects")
            if not listed:
                raise ValueError(f"{where} lists no shards (an unfinished harvest?)")
            files = [file_in_folder(path, e["file"], where) for e in listed]
            for f in files:
                if not f.is_file():
                    raise ValueError(f"{where} lists {f.name}, which does not exist")
            return files
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".safetensors") and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no .npy or .safetensors shards")
        return files

    def _check_manifest(self, path, manifest: Optional[dict]) -> None:
        d_in = (manifest or {}).get("d_in")
        if d_in is None:
            return
        if isinstance(d_in, bool) or not isinstance(d_in, int):
            raise ValueError(f"{Path(path) / 'manifest.json'}: field 'd_in' must be an integer, got {d_in!r}")
        if d_in != self.d_in:
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
