"""Argument checks at the public boundary.

Every check runs before any kernel, and every message names the argument and what was expected,
so a compiled or Triton kernel never sees a bad shape or an out-of-range index.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Union

import torch
from torch import Tensor


def float_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v}")
    return v


def k_in_range(name: str, k, d_sae: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"{name} must lie in 1..d_sae={d_sae}, got {k}")
    return k


def last_dim(name: str, t: Tensor, size: int, what: str) -> None:
    if t.dim() == 0 or t.shape[-1] != size:
        raise ValueError(f"{name} must have last dimension {what}={size}, got shape {tuple(t.shape)}")


def latent_vector(name: str, t, d_sae: int) -> Tensor:
    t = float_tensor(name, t)
    if t.shape != (d_sae,):
        raise ValueError(f"{name} must have shape [d_sae]=[{d_sae}], got {tuple(t.shape)}")
    return t


def bandwidth(value: Union[float, Tensor], d_sae: int, like: Tensor) -> Tensor:
    """A positive float or ``[d_sae]`` tensor -> a contiguous ``[d_sae]`` tensor (the backends' form).

    A scalar becomes a tensor whose entries are all equal, so the per-latent and scalar paths are one.
    """
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"bandwidth must be a float or a floating-point tensor, got dtype {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1).expand(d_sae)
        if value.shape != (d_sae,):
            raise ValueError(f"bandwidth must be a float or a [d_sae]=[{d_sae}] tensor, got shape {tuple(value.shape)}")
        if value.numel() and not bool((value > 0).all()):
            raise ValueError(f"bandwidth must be > 0 everywhere, got min {value.min().item():g}")
        return value.detach().to(device=like.device, dtype=like.dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"bandwidth must be a float or a [d_sae] tensor, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"bandwidth must be > 0, got {value}")
    return torch.full((d_sae,), float(value), dtype=like.dtype, device=like.device)


def indices_in_range(name: str, indices, size: int) -> Tensor:
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {indices.dtype}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= size:
            raise IndexError(f"{name} must lie in [0, d_sae={size}), got values in [{lo}, {hi}]")
    return indices.long()


def same_device(**tensors) -> None:
    """Every given tensor (``None`` entries skipped) on one device.

    Mixing devices is refused before any kernel runs: a ``meta`` tensor holds no data, so a kernel handed one
    next to real tensors would read uninitialised memory (or reach a fake, shape-only implementation).
    """
    first = None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            meta = " (a meta tensor holds no data)" if "meta" in (t.device.type, first[1].type) else ""
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1]}: every tensor argument "
                             f"must be on one device{meta}")


def module_device(module, **inputs) -> None:
    """``module``'s parameters and buffers, and each input, all on one device (see :func:`same_device`)."""
    tensors = {f"{type(module).__name__}.{n}": t for n, t in module.named_parameters()}
    tensors.update((f"{type(module).__name__}.{n}", t) for n, t in module.named_buffers())
    same_device(**inputs, **tensors)


def file_in_folder(folder, name, where) -> Path:
    """``folder / name`` for a file name read from a manifest (``where``): a relative path that stays inside
    ``folder``, also after resolving symbolic links. Anything else raises ValueError naming ``where``."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise ValueError(f"{where}: file entries must be non-empty relative paths, got {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or Path(name).is_absolute() or Path(name).drive:
        raise ValueError(f"{where}: file {name!r} points outside its folder {folder}")
    path = folder / rel
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as e:  # a symbolic-link loop
        raise ValueError(f"{where}: file {name!r} cannot be resolved: {e}") from e
    if not inside:
        raise ValueError(f"{where}: file {name!r} resolves to {path.resolve()}, outside its folder {folder}")
    return path
