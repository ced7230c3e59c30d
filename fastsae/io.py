"""Save and load SAEs.

Own format: a directory with ``config.json`` (``{"fastsae": 1, "architecture": ..., constructor args}``)
and ``sae.safetensors`` (the state dict). Files are written to a temporary name and renamed, so a
crash never leaves a half-written SAE behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "sae.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(sae, path) -> Path:
    from safetensors.torch import save as st_save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    atomic_write_bytes(path / WEIGHTS, st_save(tensors))
    cfg = dict(fastsae=FORMAT_VERSION, **sae.config())
    atomic_write_bytes(path / CONFIG, json.dumps(cfg, indent=2).encode())
    return path


def load(path, *, device=None, backend: str = "auto"):
    """Load an SAE saved by ``sae.save(path)``."""
    from safetensors.torch import load_file

    from .sae import ARCHITECTURES

    path = Path(path)
    cfg_path, weights_path = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{path} is not a saved fastsae SAE (expected {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    try:
        state = load_file(str(weights_path))
    except Exception as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
    cfg = dict(cfg)
    cfg.pop("fastsae", None)
    arch = cfg.pop("architecture", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    dtype = getattr(torch, cfg.pop("dtype", "float32"))
    d_in, d_sae = cfg.pop("d_in"), cfg.pop("d_sae")
    cls = ARCHITECTURES[arch]
    args = (d_in, d_sae, cfg.pop("k")) if "k" in cfg else (d_in, d_sae)
    sae = cls(*args, **cfg, dtype=dtype, backend=backend)
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights_path} does not match {cfg_path}: {e}") from e
    return sae.to(device) if device is not None else sae
