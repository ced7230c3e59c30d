"""Sharded checkpoints on disk: one safetensors file per latent shard (and optimizer shard) plus a ``shards.json``
manifest written last, reading it back checked, and reassembling a single-process SAE. The format registers
itself with :func:`fastsae.io.register_format`, so ``fastsae.load`` reads it without ``fastsae.io`` importing
this package."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .._checks import file_in_folder
from ..io import (_check_device, atomic_write_bytes, pack_optimizer, read_json, read_safetensors, register_format,
                  sae_from_config, unpack_optimizer, write_safetensors)
from .collectives import barrier
from .group import Grid, grid
from .slicing import split_sizes

if TYPE_CHECKING:
    from .sharded import ShardedSAE

MANIFEST = "shards.json"


def _build(config: dict, d_sae: int, *, backend: str = "auto", device=None, where="the SAE config", weights=None):
    """An SAE module from a saved config with ``d_sae`` replaced (``k`` clipped to it); every field checked, and
    ``weights`` (name -> shape) matched before anything is allocated."""
    return sae_from_config(config, where, backend=backend, d_sae=d_sae, device=device, weights=weights)


def _shard_file(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.safetensors"


def _optim_file(i: int, n: int) -> str:
    return f"optim-{i:05d}-of-{n:05d}.safetensors"


_OPTIM_META = "fastsae.optimizer"


def save_sharded(module: ShardedSAE, path, optimizer: Optional[torch.optim.Optimizer] = None,
                 extra: Optional[dict] = None) -> Path:
    """Write one consistent sharded checkpoint. Collective: every rank of the grid calls it.

    The ranks of data-rank 0 each write their shard (and optimizer shard); after a barrier rank 0 writes
    ``shards.json`` (temp + rename). An existing manifest is removed first, so a crash midway leaves a
    directory without manifest (incomplete) rather than a manifest pointing at mixed files.
    """
    g = module.grid
    path = Path(path)
    n = g.latent_size
    if g.is_main:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
    barrier()
    if g.data_rank == 0:
        write_safetensors(path / _shard_file(g.latent_rank, n), module.shard.state_dict())
        if optimizer is not None:
            tensors, meta = pack_optimizer(optimizer)
            write_safetensors(path / _optim_file(g.latent_rank, n), tensors, {_OPTIM_META: json.dumps(meta)})
    barrier()
    if g.is_main:
        sizes = split_sizes(module.d_sae, n)
        manifest = dict(
            fastsae=1,
            sharded=True,
            config=module.config(),
            split=module.split,
            shards=[dict(file=_shard_file(i, n), start=sum(sizes[:i]), stop=sum(sizes[: i + 1]),
                         bytes=(path / _shard_file(i, n)).stat().st_size) for i in range(n)],
            optimizer=[_optim_file(i, n) for i in range(n)] if optimizer is not None else None,
            extra=extra or {},
        )
        atomic_write_bytes(path / MANIFEST, json.dumps(manifest, indent=2).encode())
    barrier()
    return path


def read_manifest(path) -> dict:
    """``shards.json``, checked: its fields have the right types, its files exist with the recorded sizes and lie
    inside ``path`` (ValueError naming the manifest otherwise)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no {MANIFEST})")
    manifest = read_json(mpath)
    shards, split, cfg = manifest.get("shards"), manifest.get("split"), manifest.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{mpath}: field 'config' must be an object")
    if not isinstance(split, dict) or not all(d is None or (isinstance(d, int) and not isinstance(d, bool)
                                                            and 0 <= d < 2) for d in split.values()):
        raise ValueError(f"{mpath}: field 'split' must map tensor names to null or a dimension (0 or 1)")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("bytes"), int) and not isinstance(s["bytes"], bool)
            for s in shards):
        raise ValueError(f"{mpath}: field 'shards' must be a non-empty list of {{file, bytes, ...}} objects")
    for s in shards:
        f = file_in_folder(path, s.get("file"), mpath)
        if not f.is_file() or f.stat().st_size != s["bytes"]:
            raise ValueError(f"{mpath}: shard {s['file']} is missing or has the wrong size")
    optim = manifest.get("optimizer")
    if optim is not None:
        if not isinstance(optim, list) or len(optim) != len(shards):
            raise ValueError(f"{mpath}: field 'optimizer' must list one file per shard")
        for name in optim:
            file_in_folder(path, name, mpath)
    return manifest


def _full_state(path: Path, manifest: dict) -> dict[str, Tensor]:
    shards = [read_safetensors(path / s["file"])[0] for s in manifest["shards"]]
    out = {}
    for name, dim in manifest["split"].items():
        if any(name not in s for s in shards):
            raise ValueError(f"{path / MANIFEST}: tensor {name!r} is missing from a shard")
        out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)
    return out


def load_optimizer_shard(path, optimizer: torch.optim.Optimizer, g: Optional[Grid] = None) -> None:
    """Restore this rank's optimizer state saved by ``save_sharded(..., optimizer=...)`` (same latent size)."""
    g = g or grid()
    manifest = read_manifest(path)
    files = manifest.get("optimizer")
    if not files:
        raise ValueError(f"{path}: the checkpoint holds no optimizer state")
    if len(files) != g.latent_size:
        raise ValueError(f"{path}: optimizer state was saved for latent size {len(files)}, "
                         f"this grid has {g.latent_size}")
    file = Path(path) / files[g.latent_rank]
    tensors, metadata = read_safetensors(file)
    try:
        meta = json.loads(metadata[_OPTIM_META])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{file} holds no fastsae optimizer state") from e
    unpack_optimizer(optimizer, tensors, meta, file)


def load_sharded(path, *, device=None, backend: str = "auto"):
    """Reassemble a sharded checkpoint into one single-process SAE (for inference or further training)."""
    _check_device(device)
    path = Path(path)
    manifest = read_manifest(path)
    cfg = manifest["config"]
    state = _full_state(path, manifest)
    sae = _build(cfg, cfg.get("d_sae"), backend=backend, where=path / MANIFEST,
                 weights={k: v.shape for k, v in state.items()})
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: shards do not match the manifest's config: {e}") from e
    return sae.to(device) if device is not None else sae


def _is_sharded(path: Path) -> bool:
    return (path / MANIFEST).is_file()


register_format("sharded", _is_sharded, load_sharded)
