"""fastsae's own format: a folder with ``config.json`` (``{"fastsae": 1, "architecture": ..., constructor
args}``) and ``sae.safetensors`` (the state dict); the config is type-checked field by field against the
constructor (:func:`sae_from_config`) before anything is allocated. Also the tensors + JSON form of optimizer
state that training checkpoints and sharded checkpoints use."""
from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .files import _fill, _is_int, _read_json, _read_safetensors, read_safetensors_header

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "sae.safetensors"


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
    from ..sae import ARCHITECTURES

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


# ----------------------------------------------------------------------------------------------
# Reading the own format
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
