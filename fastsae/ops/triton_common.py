"""What every Triton op family of fastsae shares: the op namespace, block-size choice, dtype rules, segments.

The Triton ops live in their own ``torch.library`` namespace, ``fastsae_triton``, so that they never
collide with the schemas that the C++ extension declares once for the ``fastsae`` namespace.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

import triton

NS = "fastsae_triton"


def interpreting() -> bool:
    """Triton runs its kernels on CPU tensors through the interpreter (read once, at process start)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET = interpreting()

#: Autotuning is on for real GPUs; ``FASTSAE_TRITON_AUTOTUNE=0`` pins the first config (reproducible timings).
AUTOTUNE = (not INTERPRET) and os.environ.get("FASTSAE_TRITON_AUTOTUNE", "1") != "0"


def kernel_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """Input dtypes the kernels accept on ``device``.

    The interpreter computes through numpy, which has no bfloat16: there, bf16/fp16 fall back to the
    eager reference instead of computing garbage. On GPUs float64 is accepted (correct, not fast).
    """
    if device.type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return (torch.float32, torch.float64)


def segments(indices: Tensor, counts: Optional[Tensor], d_sae: int) -> tuple[Tensor, Tensor]:
    """Entries of a compact ``[B, K]`` list grouped by latent: ``(order [N] int64, offsets [d_sae + 1] int64)``.

    ``order[offsets[j]:offsets[j+1]]`` are the flat positions ``b*K + e`` of the entries whose latent is
    ``j``; entries at ``e >= counts[b]`` (padding) are sorted past ``offsets[d_sae]`` and never read.
    Sorting once (``torch.sort`` on int keys) turns every latent-wise reduction of the backward into a
    contiguous segment that one program reduces without atomics. The sort is stable, so each segment
    lists its rows in order and the reductions are deterministic.
    """
    B, K = indices.shape
    key = indices.to(torch.int64)
    if counts is not None:
        valid = torch.arange(K, device=indices.device).unsqueeze(0) < counts.unsqueeze(1)
        key = torch.where(valid, key, torch.full_like(key, d_sae))
    sorted_key, order = torch.sort(key.reshape(-1), stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(d_sae + 1, device=indices.device, dtype=torch.int64))
    return order, offsets


def valid_mask(counts: Optional[Tensor], B: int, K: int, device) -> Tensor:
    """``[B, K]`` bool: which compact slots hold an entry (all of them when ``counts`` is None)."""
    if counts is None:
        return torch.ones(B, K, dtype=torch.bool, device=device)
    return torch.arange(K, device=device).unsqueeze(0) < counts.unsqueeze(1)


class TritonKernel:
    """A ``@triton.jit`` kernel with its Hopper autotuning configs and its (small) interpreter blocks.

    On a GPU the kernel is autotuned over ``configs`` (keyed on the sizes in ``key``); with
    ``FASTSAE_TRITON_AUTOTUNE=0`` it runs the first config (the last one for float64 data, so every
    list ends with a config small enough for float64 tiles); under the interpreter it runs
    ``interp`` — small blocks, so that tests at odd sizes cross several blocks and every mask.
    Launching goes through ``torch.library.wrap_triton`` so ``torch.compile`` sees the kernel itself.
    """

    def __init__(self, fn, configs, key, interp, reset_to_zero=None):
        self.fn = fn
        self.configs = configs
        self.interp = interp
        self.tuned = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(fn) if AUTOTUNE else None

    def __call__(self, grid, *args, **kwargs):
        from torch.library import wrap_triton

        if INTERPRET and any(_is_fake(a) for a in args):
            return  # shape propagation of an interpreter op (see kernel_op): nothing to compute
        if self.tuned is not None:
            wrap_triton(self.tuned)[grid](*args, **kwargs)
            return
        if INTERPRET:
            meta = dict(self.interp)
        else:
            # Untuned: the first config; float64 data takes the last one, which every list keeps small.
            cfg = self.configs[-1] if kwargs.get("ACC64") else self.configs[0]
            meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        wrap_triton(self.fn)[grid](*args, **kwargs, **meta)


def no_work(*sizes) -> bool:
    """True when some size is 0 (skip the launch). Sizes that are unknown while tracing (the dynamic
    width of a compact list) count as nonzero: a launch over an empty grid is harmless anyway."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    return any(guard_or_false(n == 0) for n in sizes)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, Tensor) and (is_fake(t) or t.device.type == "meta")


def kernel_op(name: str):
    """Register ``fn`` as the op ``fastsae_triton::<name>``.

    On GPUs it is a ``torch.library.triton_op``: ``torch.compile`` traces through it and sees the
    kernels themselves. Under ``TRITON_INTERPRET=1`` ``wrap_triton`` cannot trace interpreted kernels,
    so the op is an opaque ``custom_op`` instead, whose fake implementation is the same body with the
    launches skipped (the bodies only allocate outputs and launch kernels, so shapes come out right).
    """

    def deco(fn):
        from torch.library import custom_op, triton_op

        if INTERPRET:
            op = custom_op(f"{NS}::{name}", mutates_args=())(fn)
            op.register_fake(fn)
            return op
        return triton_op(f"{NS}::{name}", mutates_args=())(fn)

    return deco


def cfg(num_warps=4, num_stages=2, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)
