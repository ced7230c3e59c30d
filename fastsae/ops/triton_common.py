"""What every Triton op family of fastsae shares: the op namespace, launching and tuning, dtype rules,
segments, order keys, index checks.

The Triton ops live in their own ``torch.library`` namespace, ``fastsae_triton``, so that they never
collide with the schemas that the C++ extension declares once for the ``fastsae`` namespace.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
from torch import Tensor

import triton

NS = "fastsae_triton"

#: The lowest Triton whose masked vector ``tl.atomic_add`` hands the returned (old) value to every
#: thread that holds the element. The JumpReLU list builder reserves a row's slots with one such
#: atomic per (row, tile); the row's entries are spread over many threads, and before 3.5.0 only the
#: thread that issued the atomic saw the right base (the others read 0 and overwrote other rows'
#: slots). Reported as triton-lang/triton#7402, fixed by #7460 (in 3.5.0, not in 3.4.x):
#: ``tests/test_triton_compile.py`` checks the broadcast in the PTX of our own kernel.
MIN_TRITON = (3, 5, 0)


def triton_version() -> tuple[int, ...]:
    parts = []
    for p in triton.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def interpreting() -> bool:
    """Triton runs its kernels on CPU tensors through the interpreter (read once, at process start)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET = interpreting()

#: Autotuning is on for real GPUs; ``FASTSAE_TRITON_AUTOTUNE=0`` pins the first config (reproducible timings).
AUTOTUNE = (not INTERPRET) and os.environ.get("FASTSAE_TRITON_AUTOTUNE", "1") != "0"

#: CUDA's launch limits per grid axis (x, y, z).
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def kernel_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """Input dtypes the kernels accept on ``device``.

    The interpreter computes through numpy, which has no bfloat16: there, bf16/fp16 fall back to the
    eager reference instead of computing garbage. On GPUs float64 is accepted (correct, not fast).
    """
    if device.type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return (torch.float32, torch.float64)


def matmul_fp32_precision() -> str:
    """``"tf32"`` or ``"ieee"``: what torch's own float32 matmuls use on CUDA right now.

    Read through ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9), which answers whichever
    API set it; reading the legacy ``allow_tf32`` raises RuntimeError once the new API has been used.
    ``"none"`` defers to the global ``torch.backends.fp32_precision``, and when that is unset too, to the
    legacy flag (safe to read then: nothing new was set).
    """
    matmul = torch.backends.cuda.matmul
    p = getattr(matmul, "fp32_precision", None)
    if p == "none":
        p = getattr(torch.backends, "fp32_precision", "none")
    if p in ("tf32", "ieee"):
        return p
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # a mix of the two APIs that torch refuses to resolve: IEEE is the safe reading
        return "ieee"


def bucket(n: int) -> int:
    """The tuning bucket of a data-dependent size: the next power of two, at least 16 (0 stays 0).

    Autotuning keys use buckets instead of exact sizes, so a size that drifts every step (a list
    width tracking L0, the number of dead latents) re-tunes once per bucket, not once per value.
    """
    n = int(n)
    if n <= 0:
        return 0
    return max(16, 1 << (n - 1).bit_length())


def segments(indices: Tensor, counts: Optional[Tensor], d_sae: int) -> tuple[Tensor, Tensor]:
    """Entries of a compact ``[B, K]`` list grouped by latent: ``(order [N] int64, offsets [d_sae + 1] int64)``.

    ``order[offsets[j]:offsets[j+1]]`` are the flat positions ``b*K + e`` of the entries whose latent is
    ``j``; entries at ``e >= counts[b]`` (padding) are sorted past ``offsets[d_sae]`` and never read.
    Sorting once (``torch.sort`` on int keys) turns every latent-wise reduction of the backward into a
    contiguous segment that one program reduces without atomics. The sort is stable, so each segment
    lists its rows in order and the reductions are deterministic. A flat CSR list is ``indices[None]``.
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


# ----------------------------------------------------------------------------------------------
# Order keys: floats as integers whose order is torch.topk's (NaN largest, then +inf ... -inf)
# ----------------------------------------------------------------------------------------------

#: Key of "no entry" (a removed or absent candidate): below the key of every float, -inf included.
ABSENT32, ABSENT64 = -(2**31), -(2**63)
_FLIP32, _FLIP64 = 2**31 - 1, 2**63 - 1


def key_dtype(dtype: torch.dtype) -> torch.dtype:
    """Order keys of float64 data are int64; of every narrower float, int32 (of the float32 value)."""
    return torch.int64 if dtype == torch.float64 else torch.int32


def keys_to_values(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Invert the kernels' ``order_key``: the float values (in ``dtype``) of int keys. NaN keys give NaN."""
    flip = _FLIP64 if keys.dtype == torch.int64 else _FLIP32
    bits = torch.where(keys < 0, keys ^ flip, keys)
    wide = torch.float64 if keys.dtype == torch.int64 else torch.float32
    return bits.view(wide).to(dtype)


# ----------------------------------------------------------------------------------------------
# Index checks of the raw ops
# ----------------------------------------------------------------------------------------------


def check_index_range(idx: Tensor, size: int, op: str, arg: str) -> None:
    """``idx`` must lie in ``[0, size)``, as the C++ ops check it (IndexError naming the op and argument).

    No device→host read: on CUDA the check is a device-side assert queued before the kernels (which
    mask out-of-range indices anyway, so nothing is read out of bounds before it fires); on CPU
    (the interpreter) it raises at once.
    """
    ok = ((idx >= 0) & (idx < size)).all()  # True for no entries
    msg = f"{op}: {arg} must lie in [0, {size})"
    try:
        torch._assert_async(ok, msg)
    except RuntimeError as e:
        raise IndexError(msg) from e


# ----------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------

#: While set (``capture_launches``), launches are recorded instead of run.
_capture: Optional[list] = None
_as_gpu = False


def gpu_geometry() -> bool:
    """Block shapes and configs are the GPU's (not the interpreter's small ones): on a GPU, and while
    ``capture_launches(as_gpu=True)`` records what a GPU would launch."""
    return (not INTERPRET) or _as_gpu


@contextlib.contextmanager
def capture_launches(as_gpu: bool = False):
    """Record every kernel launch as ``Launch`` (kernel, grid, args, kwargs) and run none of them.

    What the compile report and the grid-limit tests use: the launchers allocate and launch exactly
    as in training, so the recorded argument lists are the real ones (any dtype, any size: tensors on
    the ``meta`` device cost nothing). ``as_gpu``: record the GPU's geometry even under the interpreter.
    """
    global _capture, _as_gpu
    prev, _capture = _capture, []
    prev_gpu, _as_gpu = _as_gpu, as_gpu or _as_gpu
    try:
        yield _capture
    finally:
        _capture, _as_gpu = prev, prev_gpu


class Launch:
    def __init__(self, kernel: "TritonKernel", grid, args, kwargs):
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs

    def named_args(self) -> dict:
        return dict(zip(self.kernel.fn.arg_names, self.args)) | self.kwargs

    def grids(self) -> list[tuple[int, ...]]:
        """The launch grid under every config this launch may run with (autotune configs and the interpreter's)."""
        return [self.kernel.grid_of(self.grid, m) for m in self.kernel.metas(self.named_args())]


class TritonKernel:
    """A ``@triton.jit`` kernel with its autotuning configs, tuning key and (small) interpreter blocks.

    On a GPU the kernel is autotuned over ``configs``. The tuning key is the values of the arguments
    named in ``key`` — those in ``bucketed`` (sizes that change from step to step: list widths, row
    counts, the number of dead latents) replaced by their :func:`bucket` — plus the tensors' dtypes, so
    a drifting size benchmarks the configs once per bucket. With ``FASTSAE_TRITON_AUTOTUNE=0`` it runs
    the first config (the last one for float64 data, so every list ends with a config small enough for
    float64 tiles); under the interpreter it runs ``interp`` — small blocks, so that tests at odd sizes
    cross several blocks and every mask. Launching goes through ``torch.library.wrap_triton`` so
    ``torch.compile`` sees the kernel itself. ``prune(configs, named_args) -> configs`` narrows the
    configs a launch may use by its arguments (e.g. float64 data: the last, smallest config; see
    ``last_config_if``) — what the compile report found not to fit or to spill in a loop never runs.
    """

    #: every kernel made here, by name (the compile report and the tests walk them)
    registry: dict[str, "TritonKernel"] = {}

    def __init__(self, fn, configs, key, interp, bucketed=(), reset_to_zero=None, prune=None):
        self.fn = fn
        self.name = fn.__name__
        self.configs = configs
        self.key = list(key)
        self.bucketed = set(bucketed)
        assert self.bucketed <= set(self.key), "bucketed sizes must be key arguments"
        self.interp = interp
        self.prune = prune
        by = {"early_config_prune": lambda configs, nargs, **kw: prune(configs, {**nargs, **kw})} if prune else None
        self.tuned = (triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero, prune_configs_by=by)(fn)
                      if AUTOTUNE else None)
        self._best: dict[tuple, triton.Config] = {}  # bucketed tuning key -> the config tuned for it
        self.seen_keys: set[tuple] = set()  # every tuning key launched with (tests count them)
        self.seen_raw: set[tuple] = set()  # the same without bucketing
        self._forced: Optional[triton.Config] = None
        TritonKernel.registry[self.name] = self

    @contextlib.contextmanager
    def forced(self, config: Optional[triton.Config]):
        """Launch with ``config`` (no autotuning) while inside: how the GPU probe checks every config."""
        prev, self._forced = self._forced, config
        try:
            yield
        finally:
            self._forced = prev

    # -- keys and configs ---------------------------------------------------------------------
    def tuning_key(self, named: dict, bucketed: bool = True) -> tuple:
        vals = tuple(bucket(named[k]) if (bucketed and k in self.bucketed) else named[k] for k in self.key)
        dtypes = tuple(str(v.dtype) for v in named.values() if isinstance(v, Tensor))
        return vals + dtypes

    def candidate_configs(self, named: dict) -> list:
        """The configs a launch with these arguments (by name) can run with on a GPU."""
        return list(self.prune(self.configs, named)) if self.prune else list(self.configs)

    def metas(self, named: dict) -> list[dict]:
        """Block sizes (and warps/stages) of every config this launch can run with here."""
        if not gpu_geometry():
            return [dict(self.interp)]
        cfgs = self.candidate_configs(named)
        if not AUTOTUNE and not _as_gpu:
            cfgs = cfgs[:1]
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs]

    @staticmethod
    def grid_of(grid, meta: dict) -> tuple[int, ...]:
        g = grid(meta) if callable(grid) else grid
        return tuple(int(v) for v in g)

    def _check_grid(self, grid, metas) -> None:
        for m in metas:
            g = self.grid_of(grid, m)
            for axis, (n, limit) in enumerate(zip(g, GRID_LIMITS)):
                if n > limit:
                    raise ValueError(f"{self.name}: grid axis {'xyz'[axis]} = {n} exceeds CUDA's limit {limit}")

    # -- launching ------------------------------------------------------------------------------
    def __call__(self, grid, *args, **kwargs):
        from torch.library import wrap_triton

        named = dict(zip(self.fn.arg_names, args)) | kwargs
        if _capture is not None:
            _capture.append(Launch(self, grid, args, kwargs))
            return
        if INTERPRET and any(_is_fake(a) for a in args):
            return  # shape propagation of an interpreter op (see kernel_op): nothing to compute
        if any(isinstance(v, torch.SymInt) for v in named.values()):
            # torch.compile tracing a triton_op with a dynamic size (a list width): the kernel goes into
            # the graph as is; bucketed keys and grid checks need concrete sizes, which it has when it runs
            if self.tuned is not None:
                wrap_triton(self.tuned)[grid](*args, **kwargs)
            else:
                wrap_triton(self.fn)[grid](*args, **kwargs, **self.metas(named)[0])
            return
        tkey = self.tuning_key(named)
        self.seen_keys.add(tkey)
        self.seen_raw.add(self.tuning_key(named, bucketed=False))
        if self._forced is not None:
            c = self._forced
            meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            self._check_grid(grid, [meta])
        elif self.tuned is not None:
            best = self._best.get(tkey)
            if best is None:
                self._check_grid(grid, self.metas(named))
                wrap_triton(self.tuned)[grid](*args, **kwargs)
                if getattr(self.tuned, "best_config", None) is not None:  # not while torch.compile traces
                    self._best[tkey] = self.tuned.best_config
                return
            meta = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        else:
            meta = self.metas(named)[0]  # untuned: the first config this launch may use
            self._check_grid(grid, [meta])
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


def last_config_if(*flags: str):
    """A ``prune`` that keeps only the last config when any of the named constexpr flags is set (the
    config lists end with one small enough for float64 data)."""

    def prune(configs, named):
        return configs[-1:] if any(named.get(f) for f in flags) else configs

    return prune


def flat_grid(*counts: Callable[[dict], int]):
    """A 1-D grid over the product of per-axis program counts (each a function of the config's blocks).

    CUDA limits grid axes y and z to 65,535 programs; at d_sae = 2^24 a second axis over latent tiles
    would pass that, so every kernel with more than one tiled axis flattens it into x (2^31 - 1).
    """

    def grid(meta):
        n = 1
        for c in counts:
            n *= int(c(meta))
        return (n,)

    return grid
