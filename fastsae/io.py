"""Save and load SAEs.

Own format: a directory with ``config.json`` (``{"fastsae": 1, "architecture": ..., constructor args}``)
and ``sae.safetensors`` (the state dict). Files are written to a temporary name and renamed, so a
crash never leaves a half-written SAE behind.

:func:`load` also reads the layouts of other libraries, mapped onto fastsae modules so that the
outputs equal those libraries' own forward passes:

- SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (architectures ``standard`` -> ReLUSAE,
  ``topk`` -> TopKSAE, ``jumprelu`` -> JumpReLUSAE, ``gated`` -> GatedSAE; pre-6.0 configs too).
- EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors`` (``encoder.weight [num_latents, d_in]``,
  ``encoder.bias``, ``W_dec [num_latents, d_in]``, ``b_dec``) -> TopKSAE with ``b_dec`` subtracted from the input.
- Gemma Scope ``params.npz`` (``W_enc [d_in, d_sae]``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``) -> JumpReLUSAE.
- dictionary_learning trainer folders (``ae.pt`` + ``config.json``): every dictionary class as the architecture
  it trained (standard/April-update ReLU, gated, JumpReLU, TopK, BatchTopK, Matryoshka BatchTopK). ``ae.pt`` is a
  ``torch.save`` zip, read by :mod:`fastsae.torchfile` without unpickling.

``save(sae, path, format=...)`` writes the own format, or SAELens 6.x / sparsify folders whose own loaders give
this module's outputs (:func:`saelens_parts`, :func:`sparsify_parts`); :func:`to_saelens` / :func:`from_saelens`
convert in memory when sae-lens is importable.

A corrupt or truncated file raises ``ValueError`` naming the file; a folder in none of these layouts
raises ``FileNotFoundError`` saying what was expected.

Nothing here can execute code from a file: tensors are read by one validating safetensors reader
(:func:`read_safetensors`: every offset checked against the file, read with ordinary reads, never
memory-mapped), ``.npz``/``.npy`` with ``allow_pickle=False``, ``torch.save`` files by an opcode interpreter
that builds only dicts and tensors (:mod:`fastsae.torchfile`), everything else is JSON whose every field is
type-checked (:func:`sae_from_config`). The same module holds the one atomic writer (:func:`atomic_write`)
and the tensors + JSON form of optimizer state used by training checkpoints.
"""
from __future__ import annotations

import errno
import glob
import inspect
import json
import math
import os
import struct
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch
from torch import Tensor

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "sae.safetensors"
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
GEMMA_SCOPE = "params.npz"


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
# Optimizer state as tensors + JSON (checkpoints, sharded checkpoints)
# ----------------------------------------------------------------------------------------------


def pack_optimizer(optimizer: torch.optim.Optimizer, prefix: str = "") -> tuple[dict[str, Tensor], dict]:
    """``optimizer.state_dict()`` split into tensors named ``{prefix}{param index}.{key}`` and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, entry in sd["state"].items():
        rest = {}
        for key, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}{idx}.{key}"] = v
            else:
                rest[key] = v
        plain[str(idx)] = rest
    return tensors, dict(state=plain, param_groups=sd["param_groups"])


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta, where,
                     prefix: str = "") -> None:
    """Load what :func:`pack_optimizer` wrote into ``optimizer``; a mismatch raises ValueError naming ``where``."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict) \
            or not isinstance(meta.get("param_groups"), list):
        raise ValueError(f"{where}: the optimizer state is malformed")
    current = optimizer.state_dict()["param_groups"]
    groups = meta["param_groups"]
    if len(groups) != len(current) or any(not isinstance(g, dict) or not isinstance(g.get("params"), list)
                                          or len(g["params"]) != len(c["params"]) for g, c in zip(groups, current)):
        raise ValueError(f"{where}: the optimizer state is for other parameters (param groups "
                         f"{[len(g.get('params', [])) if isinstance(g, dict) else '?' for g in groups]}, "
                         f"this optimizer has {[len(c['params']) for c in current]})")
    # JSON turned tuples (Adam's betas) into lists: give each value the type the optimizer uses.
    groups = [{k: (tuple(v) if isinstance(c.get(k), tuple) and isinstance(v, list) else v) for k, v in g.items()}
              for g, c in zip(groups, current)]
    n_params = sum(len(c["params"]) for c in current)
    state: dict = {}
    for idx, rest in meta["state"].items():
        if not (idx.isdigit() and int(idx) < n_params and isinstance(rest, dict)):
            raise ValueError(f"{where}: optimizer state for unknown parameter {idx!r}")
        state[int(idx)] = dict(rest)
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        idx, _, key = name[len(prefix):].partition(".")
        if not (idx.isdigit() and int(idx) in state and key):
            raise ValueError(f"{where}: optimizer tensor {name!r} belongs to no parameter")
        state[int(idx)][key] = t
    try:
        optimizer.load_state_dict(dict(state=state, param_groups=groups))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{where}: the optimizer state does not fit this optimizer: {e}") from e
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, Tensor) and v.dim() and v.shape != p.shape:
                raise ValueError(f"{where}: optimizer {key} of parameter {i} has shape {list(v.shape)}, "
                                 f"the parameter {list(p.shape)}")


# ----------------------------------------------------------------------------------------------
# Configs: every field type-checked against the constructor before anything is allocated
# ----------------------------------------------------------------------------------------------

#: dtypes a config may name
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: constructor arguments a file never sets (they describe this process, not the SAE)
_NOT_FROM_FILES = ("backend", "device", "dtype")


def _fits(value, hint) -> bool:
    """Does a JSON value match a constructor annotation? (JSON has no tensors, dtypes or objects.)"""
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return True
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return _is_int(value)
    if hint is float:
        return (_is_int(value) or type(value) is float) and math.isfinite(value)
    if hint is str:
        return type(value) is str
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list)
    return False


def _constructor_parameters(cls) -> dict[str, object]:
    """Name -> annotation of every argument ``cls(...)`` accepts, following ``**kwargs`` up the MRO."""
    out: dict[str, object] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not evaluate: fall back to no type check for it
            hints = {}
        more = False
        for name, p in inspect.signature(init).parameters.items():
            if name == "self":
                continue
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.kind is not p.VAR_POSITIONAL:
                out.setdefault(name, hints.get(name, inspect.Parameter.empty))
        if not more:
            break
    return out


def sae_from_config(cfg: dict, where, *, backend: str = "auto", d_sae: Optional[int] = None, device=None,
                    weights: Optional[dict[str, tuple]] = None):
    """Build the SAE a saved ``config()`` describes; every malformed field raises ValueError naming ``where``.

    ``d_sae`` replaces the config's (latent shards; ``k`` is clipped to it). ``weights`` (name -> shape, from the
    weights file's header) must match the module exactly: checked on the meta device, before anything is allocated.
    """
    from .sae import ARCHITECTURES

    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg)
    version = cfg.pop("fastsae", FORMAT_VERSION)
    if not _is_int(version) or version != FORMAT_VERSION:
        raise ValueError(f"{where}: unknown format version fastsae={version!r}; this fastsae reads version "
                         f"{FORMAT_VERSION} (a newer fastsae wrote it?)")
    arch = cfg.pop("architecture", None)
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"{where}: unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    dtype_name = cfg.pop("dtype", "float32")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ValueError(f"{where}: field 'dtype' must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    params = _constructor_parameters(cls)
    for key in ("d_in", "d_sae"):
        if not _is_int(cfg.get(key)) or cfg[key] <= 0:
            raise ValueError(f"{where}: field {key!r} must be a positive integer, got {cfg.get(key)!r}")
    for key, value in cfg.items():
        if key in _NOT_FROM_FILES or key not in params:
            allowed = sorted(k for k in params if k not in _NOT_FROM_FILES)
            raise ValueError(f"{where}: unknown field {key!r} for a {arch} SAE (expected some of {allowed})")
        if not _fits(value, params[key]):
            raise ValueError(f"{where}: field {key!r} has the wrong type: got {value!r} "
                             f"({type(value).__name__}), expected {getattr(params[key], '__name__', params[key])}")
    if d_sae is not None:
        cfg["d_sae"] = d_sae
        if "k" in cfg:
            cfg["k"] = min(cfg["k"], d_sae)

    def build(dev):
        return cls(**cfg, dtype=DTYPES[dtype_name], backend=backend, device=dev)

    try:
        if weights is not None:
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in build("meta").state_dict().items()}
            if set(expected) != set(weights):
                raise ValueError(f"the weights hold {sorted(weights)}, a {arch} SAE has {sorted(expected)}")
            for k, shape in expected.items():
                if tuple(weights[k]) != shape:
                    raise ValueError(f"{k} has shape {list(weights[k])} in the weights, but d_in={cfg['d_in']}, "
                                     f"d_sae={cfg['d_sae']} need {list(shape)}")
        return build(device)
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{where} does not describe a valid {arch} SAE: {e}") from e


def _check_device(device) -> None:
    if device is not None and torch.device(device).type == "meta":
        raise ValueError("device='meta' holds no data: load an SAE onto a real device (cpu, cuda, ...)")


#: what ``sae.save(path, format=...)`` writes
SAVE_FORMATS = ("fastsae", "saelens", "sparsify")


def save(sae, path, format: str = "fastsae", metadata: Optional[dict] = None) -> Path:
    """Write ``sae`` to the folder ``path`` in ``format`` (:data:`SAVE_FORMATS`); every file atomically.

    ``"fastsae"``: ``config.json`` + ``sae.safetensors`` (exact round trip). ``"saelens"``: a SAELens 6.x folder
    (``cfg.json`` + ``sae_weights.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads with outputs equal to
    this module's (:func:`saelens_parts`). ``"sparsify"``: an EleutherAI sparsify folder (``cfg.json`` +
    ``sae.safetensors``), TopK only (:func:`sparsify_parts`). ``metadata`` (JSON values) goes into SAELens'
    ``cfg.json`` ``metadata`` (e.g. ``model_name``, ``hook_name``, which SAELens uses to attach the SAE).
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {list(SAVE_FORMATS)}, got {format!r}")
    if metadata is not None and format != "saelens":
        raise ValueError(f"metadata is written only with format='saelens', not {format!r}")
    path = Path(path)
    if format == "saelens":
        cfg, tensors = saelens_parts(sae, metadata)
        cfg_name, weights_name = SAELENS_CONFIG, SAELENS_WEIGHTS
    elif format == "sparsify":
        cfg, tensors = sparsify_parts(sae)
        cfg_name, weights_name = SPARSIFY_CONFIG, SPARSIFY_WEIGHTS
    else:
        cfg, tensors = dict(fastsae=FORMAT_VERSION, **sae.config()), sae.state_dict()
        cfg_name, weights_name = CONFIG, WEIGHTS
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / weights_name, {k: v.detach().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path / cfg_name, json.dumps(cfg, indent=2).encode())
    return path


def detect_format(path) -> str:
    """``"fastsae"``, ``"saelens"``, ``"sparsify"``, ``"dictionary_learning"`` or ``"gemma_scope"`` for a file
    or folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        if path.suffix == ".pt":
            return "dictionary_learning"
        raise ValueError(f"{path} is a file fastsae cannot load as an SAE: pass its folder, a Gemma Scope "
                         f"params.npz or a dictionary_learning ae.pt")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    has = lambda name: (path / name).is_file()  # noqa: E731
    if has(CONFIG) and has(WEIGHTS):
        return "fastsae"
    if has(DL_CONFIG) and has(DL_WEIGHTS):
        return "dictionary_learning"
    if has(SAELENS_CONFIG) and has(SAELENS_WEIGHTS):
        return "saelens"
    if has(SPARSIFY_CONFIG) and has(SPARSIFY_WEIGHTS):
        return "sparsify"
    if has(GEMMA_SCOPE):
        return "gemma_scope"
    raise FileNotFoundError(
        f"{path} is not a saved SAE: expected {CONFIG} + {WEIGHTS} (fastsae), {SAELENS_CONFIG} + "
        f"{SAELENS_WEIGHTS} (SAELens), {SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS} (sparsify), {DL_CONFIG} + {DL_WEIGHTS} "
        f"(dictionary_learning) or {GEMMA_SCOPE} (Gemma Scope)")


def load(path, *, device=None, backend: str = "auto"):
    """Load an SAE: a folder written by ``sae.save``, a SAELens or sparsify folder, a dictionary_learning trainer
    folder (``ae.pt`` + ``config.json``, or one ``.pt`` checkpoint), or a Gemma Scope ``params.npz`` (or a folder
    holding one). Returns the matching fastsae module in eval mode.

    Nothing read can execute code (no pickle anywhere); a malformed config or weights file raises ValueError
    naming the file and the field, before the module is allocated."""
    _check_device(device)
    path = Path(path)
    for detect, read in _FORMATS.values():  # registered from above (fastsae.distributed: sharded checkpoints)
        if detect(path):
            return read(path, device=device, backend=backend).eval()
    fmt = detect_format(path)
    if fmt == "fastsae":
        sae = _load_own(path, backend)
    elif fmt == "saelens":
        sae = _load_saelens(path, backend)
    elif fmt == "sparsify":
        sae = _load_sparsify(path, backend)
    elif fmt == "dictionary_learning":
        sae = _load_dictionary_learning(path, backend)
    else:
        sae = _load_gemma_scope(path if path.is_file() else path / GEMMA_SCOPE, backend)
    sae.eval()
    return sae.to(device) if device is not None else sae


#: Formats that modules above this one register (:func:`register_format`): name -> (detect, load). :func:`load`
#: tries them before the built-in layouts, so io imports none of the modules that read them.
_FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[..., object]]] = {}


def register_format(name: str, detect: Callable[[Path], bool], load: Callable[..., object]) -> None:
    """Teach :func:`load` another layout: ``detect(path)`` is true for a ``Path`` holding it, and
    ``load(path, *, device, backend)`` returns the module. Registering a name again replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(detect) or not callable(load):
        raise TypeError(f"detect and load must be callables, got {detect!r} and {load!r}")
    _FORMATS[name] = (detect, load)


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


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------


def _load_own(path: Path, backend: str):
    cfg_path, weights_path = path / CONFIG, path / WEIGHTS
    cfg = _read_json(cfg_path)
    if "fastsae" not in cfg:
        raise ValueError(f"{cfg_path}: field 'fastsae' (the format version) is missing: not a fastsae config")
    header = read_safetensors_header(weights_path)
    sae = sae_from_config(cfg, cfg_path, backend=backend,
                          weights={k: v.shape for k, v in header.tensors.items()})
    return _fill(sae, _read_safetensors(weights_path), weights_path)


def _dtype_of(state: dict[str, Tensor]) -> torch.dtype:
    for v in state.values():
        if v.is_floating_point():
            return v.dtype
    return torch.float32


def _load_saelens(path: Path, backend: str):
    cfg_path, weights_path = path / SAELENS_CONFIG, path / SAELENS_WEIGHTS
    return saelens_to_fastsae(_read_json(cfg_path), _read_safetensors(weights_path), cfg_path, weights_path, backend)


def saelens_to_fastsae(cfg: dict, state: dict[str, Tensor], cfg_path, weights_path, backend: str = "auto"):
    """The fastsae module of a SAELens config + state dict (``cfg_path``/``weights_path`` name them in errors).

    SAELens (``sae_lens.SAE``): ``process_sae_in`` subtracts ``b_dec`` when ``apply_b_dec_to_input``; standard:
    ``relu(pre)``; topk: ``relu`` of the top-k of ``pre``; jumprelu: ``relu(pre) · 1[pre > θ]``; gated: as in the
    paper; decode ``f @ W_dec + b_dec``."""
    from .sae import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

    cfg_path, weights_path = Path(cfg_path), Path(weights_path)
    d_in, d_sae = _cfg_int(cfg, "d_in", cfg_path), _cfg_int(cfg, "d_sae", cfg_path)
    norm = _cfg_typed(cfg, "normalize_activations", cfg_path, (str, type(None), bool), "none")
    # "expected_average_only_in" is folded into the weights by SAELens before saving; at inference it is
    # the identity in SAELens' own forward, as are "none"/None/False.
    if norm not in ("none", None, False, "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} (a per-token normalisation) has no fastsae "
                         "equivalent; only 'none' and 'expected_average_only_in' load")
    arch = _cfg_typed(cfg, "architecture", cfg_path, (str,), "standard")
    act_key = "activation_fn" if "activation_fn" in cfg else "activation_fn_str"
    act = _cfg_typed(cfg, act_key, cfg_path, (str, type(None)), "relu")
    if arch == "standard" and act == "topk":  # pre-6.0 TopK SAEs
        arch = "topk"
    elif arch == "standard" and act not in ("relu", None):
        raise ValueError(f"{cfg_path}: activation_fn={act!r} is not supported (relu or topk)")
    b_dec_in = _cfg_typed(cfg, "apply_b_dec_to_input", cfg_path, (bool,), True)
    dtype = _dtype_of(state)
    if arch in SAELENS_TRANSCODERS:
        return _saelens_transcoder(cfg, state, arch, d_in, d_sae, cfg_path, weights_path, dtype, backend)
    W_enc = _need(state, "W_enc", weights_path, (d_in, d_sae))
    W_dec = _need(state, "W_dec", weights_path, (d_sae, d_in)).clone()
    b_dec = _need(state, "b_dec", weights_path, (d_in,))
    scale = state.get("finetuning_scaling_factor", state.get("scaling_factor"))
    if scale is not None:
        # decode is (f * scale) @ W_dec: fold the per-latent scale into the decoder rows.
        W_dec = W_dec * _need({"s": scale}, "s", weights_path, (d_sae,)).to(W_dec.dtype)[:, None]
    common = dict(apply_b_dec_to_input=b_dec_in, dtype=dtype, backend=backend)
    out = dict(W_enc=W_enc, W_dec=W_dec, b_dec=b_dec)
    if arch == "standard":
        sae = ReLUSAE(d_in, d_sae, **common)
        out["b_enc"] = _need(state, "b_enc", weights_path, (d_sae,))
    elif arch == "topk":
        kwargs = _cfg_typed(cfg, "activation_fn_kwargs", cfg_path, (dict, type(None)), None) or {}
        k = cfg.get("k", kwargs.get("k"))
        if _cfg_typed(cfg, "rescale_acts_by_decoder_norm", cfg_path, (bool, type(None)), False):
            raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=True is not supported")
        if not _is_int(k) or not 1 <= k <= d_sae:
            raise ValueError(f"{cfg_path}: field 'k': a topk SAE needs k in 1..d_sae={d_sae}, got {k!r}")
        sae = TopKSAE(d_in, d_sae, k, **common)
        out["b_enc"] = _need(state, "b_enc", weights_path, (d_sae,))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(d_in, d_sae, **common)
        out["b_enc"] = _need(state, "b_enc", weights_path, (d_sae,))
        if "threshold" in state:
            th = _need(state, "threshold", weights_path, (d_sae,))
        else:  # a SAELens training checkpoint stores log θ
            th = _need(state, "log_threshold", weights_path, (d_sae,)).exp()
        # relu(pre)·1[pre > θ] == pre·1[pre > max(θ, 0)]: clamping makes a negative θ exact too.
        out["threshold"] = th.clamp_min(0)
    elif arch == "gated":
        sae = GatedSAE(d_in, d_sae, **common)
        for key in ("b_gate", "r_mag", "b_mag"):
            out[key] = _need(state, key, weights_path, (d_sae,))
    else:
        raise ValueError(f"{cfg_path}: SAELens architecture {arch!r} is not supported "
                         "(standard, topk, jumprelu, gated)")
    return _fill_partial(sae, out, weights_path)


#: SAELens transcoder architectures -> (fastsae base architecture, skip connection)
SAELENS_TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                       "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


def _saelens_transcoder(cfg, state, arch, d_in, d_sae, cfg_path, weights_path, dtype, backend):
    """SAELens ``Transcoder``: ``ŷ = act(x @ W_enc + b_enc) @ W_dec + b_dec (+ x @ W_skipᵀ)``, never centred."""
    from .sae import Transcoder

    base, skip = SAELENS_TRANSCODERS[arch]
    d_out = _cfg_int(cfg, "d_out", cfg_path)
    if _cfg_typed(cfg, "apply_b_dec_to_input", cfg_path, (bool,), False):
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input=True is not valid for a SAELens transcoder")
    need = lambda key, shape: _need(state, key, weights_path, shape)  # noqa: E731
    out = dict(W_enc=need("W_enc", (d_in, d_sae)), b_enc=need("b_enc", (d_sae,)), W_dec=need("W_dec", (d_sae, d_out)),
               b_dec=need("b_dec", (d_out,)))
    if skip:
        out["W_skip"] = need("W_skip", (d_out, d_in)).t().contiguous()
    if base == "jumprelu":
        out["threshold"] = need("threshold", (d_sae,)).clamp_min(0)
    sae = Transcoder(base, d_in, d_sae, d_out=d_out, skip_connection=skip, dtype=dtype, backend=backend)
    return _fill_partial(sae, out, weights_path)


def _fill_partial(sae, tensors: dict[str, Tensor], path: Path):
    """Load the tensors a foreign format provides; the module's other state (e.g. bandwidth) keeps its defaults."""
    state = sae.state_dict()
    if "threshold" in tensors and "threshold" not in state and "log_threshold" in state:
        tensors = dict(tensors, log_threshold=tensors.pop("threshold").clamp_min(1e-38).log())
    for k, v in tensors.items():
        state[k] = v.to(state[k].dtype)
    return _fill(sae, state, path)


def _load_sparsify(path: Path, backend: str):
    """EleutherAI sparsify ``SparseCoder``: ``pre = relu(encoder(x - b_dec))``, keep the top k,
    ``x̂ = Σ acts · W_dec[idx] + b_dec``."""
    from .sae import TopKSAE

    cfg_path, weights_path = path / SPARSIFY_CONFIG, path / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    state = _read_safetensors(weights_path)
    transcode = bool(_cfg_typed(cfg, "transcode", cfg_path, (bool, type(None)), False))
    skip = bool(_cfg_typed(cfg, "skip_connection", cfg_path, (bool, type(None)), False))
    if _cfg_typed(cfg, "activation", cfg_path, (str,), "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation={cfg.get('activation')!r} is not supported (topk only)")
    W = _need(state, "encoder.weight", weights_path)
    if W.dim() != 2:
        raise ValueError(f"{weights_path}: encoder.weight must be 2-D, got shape {list(W.shape)}")
    d_sae, d_in = W.shape
    if "d_in" in cfg and _cfg_int(cfg, "d_in", cfg_path) != d_in:
        raise ValueError(f"{cfg_path}: field 'd_in' says {cfg['d_in']} but encoder.weight has {d_in} columns")
    if cfg.get("num_latents") and _cfg_int(cfg, "num_latents", cfg_path) != d_sae:
        raise ValueError(f"{cfg_path}: field 'num_latents' says {cfg['num_latents']} but encoder.weight has "
                         f"{d_sae} rows")
    k = cfg.get("k")
    if not _is_int(k) or not 1 <= k <= d_sae:
        raise ValueError(f"{cfg_path}: field 'k' must lie in 1..num_latents={d_sae}, got {k!r}")
    if transcode or skip:  # sparsify transcoders never centre their input; W_skip [d_in, d_in] acts as x @ W_skipᵀ
        from .sae import Transcoder

        sae = Transcoder("topk", d_in, d_sae, k=k, skip_connection=skip, dtype=_dtype_of(state), backend=backend)
        if not transcode:
            raise ValueError(f"{cfg_path}: skip_connection=True without transcode=True is not supported")
    else:
        sae = TopKSAE(d_in, d_sae, k, apply_b_dec_to_input=True, dtype=_dtype_of(state), backend=backend)
    out = dict(
        W_enc=W.t().contiguous(),
        b_enc=_need(state, "encoder.bias", weights_path, (d_sae,)),
        W_dec=_need(state, "W_dec", weights_path, (d_sae, d_in)),
        b_dec=_need(state, "b_dec", weights_path, (d_in,)),
    )
    if skip:
        out["W_skip"] = _need(state, "W_skip", weights_path, (d_in, d_in)).t().contiguous()
    return _fill_partial(sae, out, weights_path)


def _load_gemma_scope(path: Path, backend: str):
    """Gemma Scope: ``pre = x @ W_enc + b_enc``, ``f = relu(pre) · 1[pre > threshold]``, ``x̂ = f @ W_dec + b_dec``."""
    from .sae import JumpReLUSAE

    raw = _read_npz(path)
    state = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    W_enc = _need(state, "W_enc", path)
    if W_enc.dim() != 2:
        raise ValueError(f"{path}: W_enc must be 2-D, got shape {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    sae = JumpReLUSAE(d_in, d_sae, apply_b_dec_to_input=False, dtype=_dtype_of(state), backend=backend)
    out = dict(
        W_enc=W_enc,
        W_dec=_need(state, "W_dec", path, (d_sae, d_in)),
        b_enc=_need(state, "b_enc", path, (d_sae,)),
        b_dec=_need(state, "b_dec", path, (d_in,)),
        threshold=_need(state, "threshold", path, (d_sae,)).clamp_min(0),
    )
    return _fill_partial(sae, out, path)


# ----------------------------------------------------------------------------------------------
# dictionary_learning (saprmarks/dictionary_learning): trainer_*/ae.pt + config.json
# ----------------------------------------------------------------------------------------------

DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"
#: dictionary_learning's ``config["trainer"]["dict_class"]`` -> the fastsae architecture it loads as
DICTIONARY_LEARNING_CLASSES = {
    "AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated", "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk",
}


def _dictionary_learning_files(path: Path) -> tuple[Path, Path]:
    """``(ae.pt, config.json)`` for a trainer folder, its ``ae.pt``, or a ``checkpoints/ae_<step>.pt``."""
    if path.is_dir():
        return path / DL_WEIGHTS, path / DL_CONFIG
    for folder in (path.parent, path.parent.parent):
        if (folder / DL_CONFIG).is_file():
            return path, folder / DL_CONFIG
    raise FileNotFoundError(f"{path}: no {DL_CONFIG} next to it or in the folder above (a dictionary_learning "
                            f"checkpoint is read with its trainer's {DL_CONFIG})")


def _load_dictionary_learning(path: Path, backend: str):
    """A dictionary_learning dictionary as the fastsae module whose forward equals the class's own ``forward``:

    - ``AutoEncoder``: ``relu(encoder(x - bias))``, ``decoder(f) + bias`` -> ReLUSAE(apply_b_dec_to_input=True);
      ``AutoEncoderNew`` (April update): no input centring, ``decoder.bias`` -> ReLUSAE(False).
    - ``GatedAutoEncoder``: ``π = encoder(x - decoder_bias)``, ``1[π + gate_bias > 0] · relu(exp(r_mag)·π +
      mag_bias)`` -> GatedSAE (W_mag = exp(r_mag) ⊙ W_gate is the same product).
    - ``JumpReluAutoEncoder``: ``relu(pre · 1[pre > θ])``, ``pre = x @ W_enc + b_enc`` -> JumpReLUSAE (θ clamped
      at 0, which is exact).
    - ``AutoEncoderTopK``: per-row top-k of ``relu(encoder(x - b_dec))`` -> TopKSAE.
    - ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: ``relu(pre) · 1[relu(pre) > threshold]`` with the learned
      global threshold -> BatchTopKSAE / MatryoshkaBatchTopKSAE with that threshold (SAELens #608: these once
      loaded as ReLU SAEs). A threshold still at its initial -1 (saved before ``threshold_start_step``) makes
      dictionary_learning's own forward a dense ReLU; fastsae then applies the batch top-k and warns.

    ``ae.pt`` is read by :mod:`fastsae.torchfile` (never unpickled); ``k`` must agree between the file and
    ``config["trainer"]["k"]`` (dictionary_learning's ``load_dictionary`` checks the same).
    """
    from .sae import ARCHITECTURES
    from .torchfile import read_state_dict

    weights_path, cfg_path = _dictionary_learning_files(path)
    cfg = _read_json(cfg_path)
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(f"{cfg_path}: field 'trainer' (the trainer's config) is missing: not a dictionary_learning "
                         "config.json")
    dict_class = _cfg_typed(trainer, "dict_class", cfg_path, (str,))
    arch = DICTIONARY_LEARNING_CLASSES.get(dict_class)
    if arch is None or arch not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: trainer.dict_class={dict_class!r} is not supported (supported: "
                         f"{sorted(k for k, v in DICTIONARY_LEARNING_CLASSES.items() if v in ARCHITECTURES)})")
    state = read_state_dict(weights_path)
    dtype = _dtype_of(state)
    need = lambda key, shape=None: _need(state, key, weights_path, shape)  # noqa: E731

    def linear(key):  # nn.Linear stores [out, in]
        w = need(key)
        if w.dim() != 2:
            raise ValueError(f"{weights_path}: {key} must be 2-D, got shape {list(w.shape)}")
        return w

    if arch in ("relu", "gated", "topk", "batchtopk"):
        enc = linear("encoder.weight")
        d_sae, d_in = enc.shape
        out = dict(W_enc=enc.t().contiguous(), W_dec=need("decoder.weight", (d_in, d_sae)).t().contiguous())
    else:
        enc = need("W_enc")
        if enc.dim() != 2:
            raise ValueError(f"{weights_path}: W_enc must be 2-D, got shape {list(enc.shape)}")
        d_in, d_sae = enc.shape
        out = dict(W_enc=enc, W_dec=need("W_dec", (d_sae, d_in)), b_enc=need("b_enc", (d_sae,)),
                   b_dec=need("b_dec", (d_in,)))
    for key in ("activation_dim", "dict_size"):
        if key in trainer and trainer[key] != (d_in if key == "activation_dim" else d_sae):
            raise ValueError(f"{cfg_path}: trainer.{key}={trainer[key]!r} does not match {weights_path} "
                             f"(d_in={d_in}, d_sae={d_sae})")
    kwargs: dict = dict(dtype=dtype, backend=backend)
    if arch == "relu":
        # by its keys, not dict_class: StandardTrainerAprilUpdate writes "AutoEncoder" whatever class it trained
        centred = "bias" in state
        kwargs["apply_b_dec_to_input"] = centred
        out.update(b_enc=need("encoder.bias", (d_sae,)), b_dec=need("bias" if centred else "decoder.bias", (d_in,)))
    elif arch == "gated":
        out.update(b_gate=need("gate_bias", (d_sae,)), r_mag=need("r_mag", (d_sae,)), b_mag=need("mag_bias", (d_sae,)),
                   b_dec=need("decoder_bias", (d_in,)))
    elif arch == "jumprelu":
        kwargs["apply_b_dec_to_input"] = False
        out["threshold"] = need("threshold", (d_sae,)).clamp_min(0)
    else:  # the TopK family
        if arch in ("topk", "batchtopk"):
            out.update(b_enc=need("encoder.bias", (d_sae,)), b_dec=need("b_dec", (d_in,)))
        k_file = int(need("k", ()).item())
        k_cfg = trainer.get("k", k_file)
        if not _is_int(k_cfg) or k_cfg != k_file:
            raise ValueError(f"{cfg_path}: trainer.k={k_cfg!r} but {weights_path} holds k={k_file}")
        kwargs.update(k=k_file, apply_b_dec_to_input=True)
        if arch != "topk":
            th = float(need("threshold", ()).item())
            if th < 0:
                import warnings

                warnings.warn(f"{weights_path}: the BatchTopK threshold was never calibrated (saved before "
                              "threshold_start_step); dictionary_learning's forward would be a dense ReLU here, "
                              "fastsae applies the batch top-k instead", stacklevel=3)
            out["threshold"] = torch.tensor(th if th >= 0 else -1.0)
        if arch == "matryoshka_batchtopk":
            sizes = need("group_sizes")
            if sizes.dim() != 1 or sizes.is_floating_point() or bool((sizes <= 0).any()) or int(sizes.sum()) != d_sae:
                raise ValueError(f"{weights_path}: group_sizes must be positive integers summing to d_sae={d_sae}, "
                                 f"got {sizes.tolist()}")
            kwargs["widths"] = torch.cumsum(sizes, 0).tolist()
    try:
        sae = ARCHITECTURES[arch](d_in, d_sae, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path} does not describe a valid {dict_class}: {e}") from e
    return _fill_partial(sae, out, weights_path)


# ----------------------------------------------------------------------------------------------
# Export: the layouts SAELens and sparsify read, and in-memory conversion to and from SAELens
# ----------------------------------------------------------------------------------------------

#: the SAELens config version written (6.0 is the layout ``SAE.load_from_disk`` reads without conversion)
SAELENS_VERSION = "6.0.0"


def _batch_threshold(sae) -> Tensor:
    """A BatchTopK-family module's global inference threshold as SAELens' per-latent JumpReLU threshold."""
    if not sae.calibrated:
        raise ValueError(f"this {sae.architecture} SAE has no calibrated inference threshold yet (it is set while "
                         "training); only a calibrated BatchTopK SAE has a batch-independent forward to export")
    return torch.full((sae.d_sae,), float(sae.threshold), dtype=sae.dtype, device=sae.device)


def saelens_parts(sae, metadata: Optional[dict] = None) -> tuple[dict, dict[str, Tensor]]:
    """``(cfg.json dict, tensors)`` of the SAELens 6.x inference SAE that computes what ``sae`` computes.

    relu -> ``standard``; topk -> ``topk`` (``rescale_acts_by_decoder_norm=False``); jumprelu -> ``jumprelu``;
    gated -> ``gated``; batchtopk / matryoshka_batchtopk -> ``jumprelu`` with the calibrated global threshold on
    every latent (SAELens saves its own BatchTopK SAEs the same way: ``relu(pre)·1[pre > θ]`` is their forward).
    Transcoders map to ``transcoder`` / ``jumprelu_transcoder`` (``skip_`` variants with ``W_skip [d_out, d_in]``);
    SAELens has no TopK or Gated transcoder.
    """
    arch = sae.architecture
    transcoder = bool(getattr(sae, "is_transcoder", False))
    base = getattr(sae, "base_architecture", arch)
    W_skip = getattr(sae, "W_skip", None)
    tensors = dict(W_enc=sae.W_enc, W_dec=sae.W_dec, b_dec=sae.b_dec)
    extra: dict = {}
    if base == "relu":
        kind = "standard"
        tensors["b_enc"] = sae.b_enc
    elif base == "topk":
        kind = "topk"
        tensors["b_enc"] = sae.b_enc
        extra = dict(k=sae.k, rescale_acts_by_decoder_norm=False)
    elif base == "jumprelu":
        kind = "jumprelu"
        tensors.update(b_enc=sae.b_enc, threshold=sae.threshold.detach().clamp_min(0).to(sae.dtype))
    elif base in ("batchtopk", "matryoshka_batchtopk"):
        kind = "jumprelu"
        tensors.update(b_enc=sae.b_enc, threshold=_batch_threshold(sae))
    elif base == "gated":
        kind = "gated"
        tensors.update(b_gate=sae.b_gate, r_mag=sae.r_mag, b_mag=sae.b_mag)
    else:
        raise ValueError(f"a {arch} SAE has no SAELens equivalent")
    if transcoder:
        if kind not in ("standard", "jumprelu"):
            raise ValueError(f"SAELens has no {base} transcoder (only ReLU and JumpReLU ones); "
                             + ("export it with format='sparsify'" if base == "topk" else "keep format='fastsae'"))
        kind = ("jumprelu_" if kind == "jumprelu" else "") + ("skip_transcoder" if W_skip is not None else "transcoder")
        extra["d_out"] = sae.d_out
        if W_skip is not None:
            tensors["W_skip"] = W_skip.t()
    meta = dict(sae_lens_version=SAELENS_VERSION, sae_lens_training_version=None,
                fastsae_architecture=arch)
    if metadata:
        json.dumps(metadata)  # a TypeError now rather than a half-written folder
        meta.update(metadata)
    cfg = dict(architecture=kind, d_in=sae.d_in, d_sae=sae.d_sae, dtype=str(sae.dtype).removeprefix("torch."),
               device="cpu", apply_b_dec_to_input=sae.apply_b_dec_to_input, normalize_activations="none",
               reshape_activations="none", **extra, metadata=meta)
    return cfg, {k: v.detach().to("cpu") for k, v in tensors.items()}


def sparsify_parts(sae) -> tuple[dict, dict[str, Tensor]]:
    """``(cfg.json dict, tensors)`` of the sparsify ``SparseCoder`` that computes what a TopK ``sae`` computes.

    sparsify always centres an autoencoder's input (``x - b_dec``): an SAE trained without it is exported with
    ``b_enc + b_dec @ W_enc`` as the encoder bias (the same pre-activations). Transcoders (sparsify's
    ``transcode``; ``d_out == d_in``, optional skip ``W_skip [d_in, d_in]``) never centre.
    """
    base = getattr(sae, "base_architecture", sae.architecture)
    if base != "topk":
        raise ValueError(f"sparsify stores TopK SAEs only; this is a {sae.architecture} SAE (use format='saelens')")
    transcoder = bool(getattr(sae, "is_transcoder", False))
    W_skip = getattr(sae, "W_skip", None)
    d_out = getattr(sae, "d_out", sae.d_in)
    if d_out != sae.d_in:
        raise ValueError(f"sparsify needs d_out == d_in; this transcoder maps {sae.d_in} -> {d_out}")
    b_enc = sae.b_enc.detach()
    if not transcoder and not sae.apply_b_dec_to_input:
        b_enc = b_enc + (sae.b_dec.detach().double() @ sae.W_enc.detach().double()).to(b_enc.dtype)
    tensors = {"encoder.weight": sae.W_enc.detach().t(), "encoder.bias": b_enc, "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}
    if W_skip is not None:
        tensors["W_skip"] = W_skip.detach().t()
    cfg = dict(activation="topk", expansion_factor=max(1, sae.d_sae // sae.d_in), normalize_decoder=True,
               num_latents=sae.d_sae, k=sae.k, multi_topk=False, skip_connection=W_skip is not None,
               transcode=transcoder, d_in=sae.d_in)
    return cfg, {k: v.to("cpu") for k, v in tensors.items()}


def _sae_lens():
    try:
        import sae_lens  # noqa: F401
    except ImportError as e:
        raise ImportError("this needs sae-lens (pip install sae-lens); fastsae reads and writes SAELens folders "
                          "without it: fastsae.load(folder), sae.save(folder, format='saelens')") from e
    return sae_lens


def to_saelens(sae):
    """A ``sae_lens.SAE`` (inference class) with the same outputs as the fastsae module ``sae`` (see
    :func:`saelens_parts`), on ``sae``'s device. Needs sae-lens importable."""
    sae_lens = _sae_lens()
    cfg, tensors = saelens_parts(sae)
    cfg["device"] = str(sae.device)
    out = sae_lens.SAE.from_dict(cfg)
    out.load_state_dict({k: v.to(sae.device) for k, v in tensors.items()})
    return out.eval()


def from_saelens(sae, *, backend: str = "auto"):
    """The fastsae module equal to a ``sae_lens.SAE`` (an inference SAE, or a training SAE: converted to its
    inference form first, as SAELens' own ``save_inference_model`` does), in eval mode, on the SAE's device."""
    try:
        cfg_obj, state = sae.cfg, sae.state_dict()
    except AttributeError:
        raise TypeError(f"from_saelens expects a sae_lens.SAE, got {type(sae).__name__}") from None
    state = dict(state)
    if hasattr(sae, "process_state_dict_for_saving_inference"):
        sae.process_state_dict_for_saving_inference(state)
        cfg = cfg_obj.get_inference_sae_cfg_dict()
    else:
        sae.process_state_dict_for_saving(state)
        cfg = cfg_obj.to_dict()
    device = next((v.device for v in state.values() if isinstance(v, Tensor)), torch.device("cpu"))
    state = {k: v.detach().to("cpu") for k, v in state.items() if isinstance(v, Tensor)}
    where = f"<{type(sae).__name__} config>"
    out = saelens_to_fastsae(json.loads(json.dumps(cfg, default=str)), state, where, f"<{type(sae).__name__} weights>",
                             backend)
    return out.eval().to(device)


# ----------------------------------------------------------------------------------------------
# `fastsae export`
# ----------------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to replace the SAE files in it")
    sae = load(args.sae)
    if args.overwrite and out.is_dir():  # a stale file of another layout would change what detect_format sees
        for name in {CONFIG, WEIGHTS, SAELENS_CONFIG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, DL_WEIGHTS}:
            (out / name).unlink(missing_ok=True)
    metadata = {k: v for k, v in (("model_name", args.model_name), ("hook_name", args.hook_name)) if v}
    save(sae, out, format=args.format, metadata=metadata or None if args.format == "saelens" else None)
    back = load(out)
    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(0), dtype=sae.dtype)
    with torch.no_grad():
        err = float((back(x) - sae(x)).abs().max())
    print(f"{type(sae).__name__}(d_in={sae.d_in}, d_sae={sae.d_sae}) from {args.sae} -> {out} ({args.format}); "
          f"reloaded by fastsae: max |difference| {err:.3g} on 64 random inputs")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("export", help="write a saved SAE (any format fastsae reads) as a SAELens or sparsify folder")
    p.add_argument("--sae", required=True, help="SAE folder or file: fastsae, SAELens, sparsify, dictionary_learning, "
                   "Gemma Scope")
    p.add_argument("--format", required=True, choices=list(SAVE_FORMATS), help="layout to write")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--hook-name", default=None, help="SAELens metadata.hook_name (e.g. blocks.6.hook_resid_post)")
    p.add_argument("--model-name", default=None, help="SAELens metadata.model_name")
    p.add_argument("--overwrite", action="store_true", help="replace the SAE files in a non-empty --out")
    p.set_defaults(func=cmd_export)
