"""Read the tensors of a ``torch.save`` file without unpickling anything.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive: ``<name>/data.pkl`` is a pickle of the saved object
whose tensors point, through "persistent ids", at raw storages ``<name>/data/<key>``. Unpickling ``data.pkl``
with :mod:`pickle` (or ``torch.load``, which is an unpickler with an allow-list; its bypasses have been
CVEs) runs whatever callables the file names. This module never does: :func:`read_state_dict` interprets the
pickle's opcodes itself, accepts only the opcodes a state dict needs, and maps the few global names torch writes
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter``,
``torch.<Type>Storage``) to functions of its own; any other name, opcode or structure is refused with a
``ValueError`` naming the file. No module is imported and no object is constructed from the file except
dicts, lists, tuples, strings, numbers and tensors, and every tensor's view is checked against its storage
before the bytes are copied. Records must be stored uncompressed (as ``torch.save`` writes them), so a small
file cannot expand into a large allocation.

The result is ``{name: Tensor}`` (fresh, contiguous CPU tensors), for files holding a dict of tensors (a
``state_dict``, possibly nested one level as e.g. ``{"state_dict": {...}}`` is *not* flattened: the caller
chooses). Big-endian files and the legacy (pre-1.6, non-zip) format are refused.
"""
from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: the largest ``data.pkl`` read (a state dict's pickle is a few bytes per tensor)
MAX_PICKLE_BYTES = 64 << 20

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _Global:
    """A name the pickle refers to, from the fixed table below; calling one runs *our* function for it."""

    module: str
    name: str


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


class _Mark:
    pass


_MARK = _Mark()
_ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                    ("torch._utils", "_rebuild_parameter")} | {("torch", n) for n in _STORAGE_DTYPES}


class _Reader:
    """Interprets one ``data.pkl``: a stack machine over the opcodes of protocols 2-5 that a state dict uses."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, where: str):
        self.data, self.pos = data, 0
        self.archive, self.prefix, self.where = archive, prefix, where
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.storages: dict[str, Tensor] = {}

    # -- helpers --------------------------------------------------------------------------------------
    def bad(self, why: str) -> ValueError:
        return ValueError(f"{self.where} cannot be read as a tensor file (fastsae reads torch.save files without "
                          f"unpickling them): {why}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.bad("the pickle ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def pop(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise self.bad("the pickle pops an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise self.bad("the pickle closes a MARK it never opened")
        start = self.marks.pop()
        if len(self.stack) <= start or self.stack[start] is not _MARK:
            raise self.bad("the pickle's MARK is corrupt")
        items = self.stack[start + 1:]
        del self.stack[start:]
        return items

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.bad(f"a string is not UTF-8: {e}") from e

    # -- what the pickle may construct ----------------------------------------------------------------
    def call(self, fn, args):
        if not isinstance(fn, _Global) or not isinstance(args, tuple):
            raise self.bad(f"the pickle calls {fn!r}, which is not a name fastsae allows")
        if (fn.module, fn.name) == ("collections", "OrderedDict"):
            if args:
                raise self.bad("OrderedDict is built with arguments")
            return {}
        if fn.name == "_rebuild_tensor_v2":
            return self.rebuild_tensor(*self.check_args(args, 6, 7))
        if fn.name == "_rebuild_parameter":
            data, _requires_grad, hooks = self.check_args(args, 3, 3)
            if not isinstance(data, Tensor) or hooks != {}:
                raise self.bad("a parameter is not a plain tensor without hooks")
            return data
        raise self.bad(f"the pickle calls {fn.module}.{fn.name}")

    def check_args(self, args: tuple, low: int, high: int) -> tuple:
        if not low <= len(args) <= high:
            raise self.bad(f"a tensor is rebuilt from {len(args)} arguments")
        return args

    def rebuild_tensor(self, storage, offset, size, stride, _requires_grad, hooks, metadata=None) -> Tensor:
        if not isinstance(storage, _Storage):
            raise self.bad("a tensor's storage is not a storage record")
        ints = lambda v: isinstance(v, tuple) and all(type(i) is int and i >= 0 for i in v)  # noqa: E731
        if type(offset) is not int or offset < 0 or not ints(size) or not ints(stride) or len(size) != len(stride):
            raise self.bad(f"a tensor has offset {offset!r}, size {size!r}, stride {stride!r}")
        if hooks != {} or metadata not in (None, {}):
            raise self.bad("a tensor carries hooks or metadata")
        numel = 1
        for s in size:
            numel *= s
        if numel and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= storage.numel:
            raise self.bad(f"a tensor of size {list(size)}, stride {list(stride)} at offset {offset} reaches past its "
                           f"storage {storage.key!r} of {storage.numel} elements")
        flat = self.storage(storage)
        if not numel:
            return torch.empty(size, dtype=storage.dtype)
        return flat.as_strided(size, stride, offset).clone(memory_format=torch.contiguous_format)

    def storage(self, ref: _Storage) -> Tensor:
        if ref.key in self.storages:
            t = self.storages[ref.key]
            if t.dtype != ref.dtype or t.numel() != ref.numel:
                raise self.bad(f"storage {ref.key!r} is used with two dtypes or sizes")
            return t
        name = f"{self.prefix}data/{ref.key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise self.bad(f"the archive has no record {name}") from None
        itemsize = torch.empty((), dtype=ref.dtype).element_size()
        if info.file_size != ref.numel * itemsize:
            raise self.bad(f"record {name} holds {info.file_size} bytes, its {ref.numel} elements need "
                           f"{ref.numel * itemsize}")
        raw = bytearray(self.archive.read(info))
        if not raw:
            t = torch.empty(0, dtype=ref.dtype)
        elif ref.dtype == torch.bool:  # any byte other than 0/1 would be an invalid bool: normalise
            t = torch.frombuffer(raw, dtype=torch.uint8) != 0
        else:
            t = torch.frombuffer(raw, dtype=ref.dtype)
        self.storages[ref.key] = t
        return t

    def persistent(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[3], str) and type(pid[4]) is int and pid[4] >= 0):
            raise self.bad(f"persistent id {pid!r} is not a storage record")
        if not pid[2].isalnum():
            raise self.bad(f"storage key {pid[2]!r} is not a plain name")
        return _Storage(pid[2], pid[1].dtype, pid[4])

    def find_global(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise self.bad(f"it refers to {module}.{name}; only tensors in dicts are read")
        if module == "torch":
            return _StorageType(_STORAGE_DTYPES[name])
        return _Global(module, name)

    # -- the interpreter ------------------------------------------------------------------------------
    def run(self):
        push = self.stack.append
        while True:
            op = self.take(1)
            if op == b"\x80":  # PROTO
                if self.take(1)[0] > 5:
                    raise self.bad("unknown pickle protocol")
            elif op == b"\x95":  # FRAME
                self.take(8)
            elif op == b".":  # STOP
                value = self.pop()
                if self.stack or self.marks:
                    raise self.bad("the pickle leaves values on its stack")
                return value
            elif op == b"(":  # MARK
                self.marks.append(len(self.stack))
                push(_MARK)
            elif op == b"}":
                push({})
            elif op == b"]":
                push([])
            elif op == b")":
                push(())
            elif op == b"t":
                push(tuple(self.pop_mark()))
            elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
                n = op[0] - 0x84
                items = [self.pop() for _ in range(n)][::-1]
                push(tuple(items))
            elif op == b"N":
                push(None)
            elif op == b"\x88":
                push(True)
            elif op == b"\x89":
                push(False)
            elif op == b"K":
                push(self.take(1)[0])
            elif op == b"M":
                push(self.unpack("<H"))
            elif op == b"J":
                push(self.unpack("<i"))
            elif op == b"\x8a":  # LONG1
                push(int.from_bytes(self.take(self.take(1)[0]), "little", signed=True))
            elif op == b"G":
                push(self.unpack(">d"))
            elif op == b"X":
                push(self.text(self.unpack("<I")))
            elif op == b"\x8c":  # SHORT_BINUNICODE
                push(self.text(self.take(1)[0]))
            elif op == b"c":  # GLOBAL "module\nname\n"
                module = self.line()
                push(self.find_global(module, self.line()))
            elif op == b"\x93":  # STACK_GLOBAL
                name, module = self.pop(), self.pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise self.bad("STACK_GLOBAL without two strings")
                push(self.find_global(module, name))
            elif op == b"q":
                self.memo[self.take(1)[0]] = self.top()
            elif op == b"r":
                self.memo[self.unpack("<I")] = self.top()
            elif op == b"\x94":  # MEMOIZE
                self.memo[len(self.memo)] = self.top()
            elif op in (b"h", b"j"):
                key = self.take(1)[0] if op == b"h" else self.unpack("<I")
                if key not in self.memo:
                    raise self.bad(f"memo entry {key} is read before it is written")
                push(self.memo[key])
            elif op == b"Q":  # BINPERSID
                push(self.persistent(self.pop()))
            elif op == b"R":  # REDUCE
                args = self.pop()
                push(self.call(self.pop(), args))
            elif op == b"s":
                value, key = self.pop(), self.pop()
                self.set_items(self.top(), [key, value])
            elif op == b"u":
                items = self.pop_mark()
                self.set_items(self.top(), items)
            elif op == b"a":
                value = self.pop()
                self.append(self.top(), [value])
            elif op == b"e":
                items = self.pop_mark()
                self.append(self.top(), items)
            elif op == b"b":  # BUILD: only OrderedDict's `_metadata` attribute (state_dict()), which is dropped
                state = self.pop()
                if not isinstance(self.top(), dict) or not (isinstance(state, dict) and set(state) <= {"_metadata"}):
                    raise self.bad("the pickle sets attributes on an object")
            else:
                raise self.bad(f"pickle opcode {op!r} at byte {self.pos - 1} is not one a state dict uses")

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0 or end - self.pos > 256:
            raise self.bad("a GLOBAL name is not terminated")
        out = self.text(end - self.pos)
        self.pos += 1
        return out

    def top(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise self.bad("the pickle refers to an empty stack")
        return self.stack[-1]

    def set_items(self, target, items: list) -> None:
        if not isinstance(target, dict) or len(items) % 2:
            raise self.bad("SETITEMS on something other than a dict")
        for k, v in zip(items[::2], items[1::2]):
            if not isinstance(k, (str, int)):
                raise self.bad(f"a dict key is a {type(k).__name__}")
            target[k] = v

    def append(self, target, items: list) -> None:
        if not isinstance(target, list):
            raise self.bad("APPENDS on something other than a list")
        target.extend(items)


def read_torch_file(path) -> Any:
    """The object a ``torch.save`` zip file holds, built from dicts, lists, tuples, scalars and tensors only
    (see the module docstring); ``ValueError`` naming ``path`` for anything else."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    if magic[:2] != b"PK":
        raise ValueError(f"{path} is not a torch.save zip archive (a legacy pre-1.6 torch file or a bare pickle?): "
                         "fastsae reads only the zip format and never unpickles; re-save it with torch.save from a "
                         "recent PyTorch")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable zip archive: {e}") from e
    with archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path} is not a torch.save archive: expected one <name>/data.pkl, found {pkl or names[:5]}")
        prefix = pkl[0][: -len("data.pkl")]
        for info in archive.infolist():
            if not info.filename.startswith(prefix):
                raise ValueError(f"{path}: record {info.filename!r} lies outside the archive's folder {prefix!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: record {info.filename} is compressed; torch.save stores records uncompressed")
        order = prefix + "byteorder"
        if order in names and archive.read(order).strip() not in (b"little", b""):
            raise ValueError(f"{path} was written on a big-endian machine; fastsae reads little-endian files only")
        info = archive.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"{path}: {pkl[0]} has {info.file_size} bytes, more than a state dict needs")
        try:
            return _Reader(archive.read(info), archive, prefix, where).run()
        except (zipfile.BadZipFile, OSError, RuntimeError) as e:  # a CRC error, a truncated record
            raise ValueError(f"{path} is corrupt: {e}") from e


def read_state_dict(path) -> dict[str, Tensor]:
    """``{name: tensor}`` of a ``torch.save``'d state dict (see :func:`read_torch_file`)."""
    obj = read_torch_file(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a dict of named tensors (a state dict)")
    return obj
