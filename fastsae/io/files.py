"""File primitives every fastsae file goes through: the one atomic writer (:func:`atomic_write`), the one
validating safetensors reader (:func:`read_safetensors`: every offset checked against the file, read with
ordinary reads, never memory-mapped) and streaming writer, and readers that turn every failure into a
``ValueError`` naming the file (JSON, ``.npz`` with ``allow_pickle=False``, tensors a format must hold)."""
from __future__ import annotations

import errno
import glob
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# Atomic writes: everything fastsae writes goes through `atomic_write`
# ----------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file next to it, fsync, then rename over it.

    A crash at any point leaves the previous ``path`` (or none); a failed write (e.g. a full disk) removes the
    temporary file and raises ``OSError`` naming ``path``, the previous file untouched; a successful write also
    removes the temporaries that earlier, interrupted writes of ``path`` left behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on the device while writing {path}; the previous "
                                   f"{path.name} (if any) is unchanged") from e
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        stale.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def read_exact(fh: BinaryIO, offset: int, out: memoryview, path) -> None:
    """Fill ``out`` with the bytes of ``fh`` from ``offset``; a file that ends early raises ValueError naming ``path``
    (reads, never memory maps: a file truncated while training reads it cannot kill the process with SIGBUS)."""
    fh.seek(offset)
    done, n = 0, len(out)
    while done < n:
        got = fh.readinto(out[done:])
        if not got:
            raise ValueError(f"{path} is truncated: expected {n} bytes at offset {offset}, the file ends after "
                             f"{done} (was it rewritten or truncated while being read?)")
        done += got


# ----------------------------------------------------------------------------------------------
# safetensors: one validating reader and one streaming writer for every tensor file fastsae touches
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
#: the safetensors library's own limit on the JSON header
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a safetensors file lives: ``[start, stop)`` are absolute byte offsets in the file."""

    dtype: torch.dtype
    shape: tuple
    start: int
    stop: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    size: int  # of the file, in bytes, when the header was read
    tensors: dict  # name -> TensorInfo, in file order
    metadata: dict  # str -> str


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the JSON repeats the key {k!r}")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path) -> SafetensorsHeader:
    """The validated header of a safetensors file.

    Every tensor's dtype is known, its shape a list of non-negative ints, its byte range the size its shape and
    dtype need, and the ranges tile the data section exactly (no negative, overlapping or out-of-file offsets):
    nothing outside the file, and nothing of the header, is ever read as tensor data.
    """
    path = Path(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a readable safetensors file: {why}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"the file has {size} bytes, fewer than the 8 of the header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"header length {n} does not fit the file of {size} bytes")
            raw = fh.read(n)
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets, got {info!r}")
        dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise bad(f"tensor {name!r} has dtype {info['dtype']!r}; fastsae reads {sorted(_ST_DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not two integers")
        begin, end = offsets
        need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end < begin or end - begin != need:
            raise bad(f"tensor {name!r} has data_offsets {offsets} but its shape {shape} and dtype {info['dtype']} "
                      f"need {need} bytes")
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    at = 0
    for begin, end, name, _, _ in entries:
        if begin != at:
            raise bad(f"tensor {name!r} starts at data offset {begin}, expected {at} "
                      "(tensors overlap or leave a gap)")
        at = end
    if at != data_size:
        raise bad(f"the tensors cover {at} bytes of data but the file holds {data_size} after the header "
                  "(truncated or padded)")
    tensors = {name: TensorInfo(dtype, shape, data_start + begin, data_start + end)
               for begin, end, name, dtype, shape in entries}
    return SafetensorsHeader(path=path, size=size, tensors=tensors, metadata=metadata)


def read_safetensors(path, names=None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (only ``names`` if given), read into fresh CPU tensors."""
    header = read_safetensors_header(path)
    wanted = header.tensors if names is None else {k: header.tensors[k] for k in names}
    out = {}
    with open(header.path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size != header.size:
            raise ValueError(f"{header.path} changed size while being read")
        for name, info in wanted.items():
            t = torch.empty(info.shape, dtype=info.dtype)
            if t.numel():
                read_exact(fh, info.start, memoryview(t.reshape(-1).view(torch.uint8).numpy()), header.path)
            out[name] = t
    return out, dict(header.metadata)


def write_safetensors(path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write a safetensors file atomically, one tensor at a time (no second in-memory copy of the whole file)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if t.dtype not in _ST_CODES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be saved (supported: {sorted(map(str, _ST_CODES))})")
        nbytes = t.numel() * t.element_size()
        header[name] = dict(dtype=_ST_CODES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + nbytes])
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(fh):
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            if t.numel():
                fh.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# Readers that turn every failure into a ValueError naming the file
# ----------------------------------------------------------------------------------------------


def read_json(path) -> dict:
    """A JSON object from ``path``; anything else (invalid JSON, repeated keys, a list) raises ValueError naming it."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


_read_json = read_json


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path)[0]


def _read_npz(path: Path) -> dict[str, Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except Exception as e:  # BadZipFile, EOFError, ValueError, ...
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e


def _need(state: dict, key: str, path: Path, shape: Optional[tuple] = None) -> Tensor:
    if key not in state:
        raise ValueError(f"{path} has no tensor {key!r} (found {sorted(state)})")
    t = state[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{path}: {key} must have shape {list(shape)} (d_in/d_sae of the config), "
                         f"got {list(t.shape)}")
    return t


def _cfg_int(cfg: dict, key: str, path: Path) -> int:
    v = cfg.get(key)
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{path}: field {key!r} must be a positive integer, got {v!r}")
    return v


_MISSING = object()


def _cfg_typed(cfg: dict, key: str, path: Path, types: tuple, default=_MISSING):
    """``cfg[key]`` if it is one of ``types`` (exactly: ``"false"`` is no bool, ``1`` no string), else ValueError."""
    v = cfg.get(key, default)
    if v is _MISSING:
        raise ValueError(f"{path}: field {key!r} is missing")
    if type(v) not in types:
        names = "/".join("null" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"{path}: field {key!r} must be {names}, got {v!r} ({type(v).__name__})")
    return v


def _fill(sae, state: dict[str, Tensor], path: Path):
    """Copy ``state`` into ``sae`` (strict), in the module's dtypes."""
    own = sae.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {list(v.shape)}, expected {list(own[k].shape)}")
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the SAE it describes: {e}") from e
    return sae
