"""The one timing and memory harness every benchmark goes through.

A *case* (one op or one training step at one size) is run by several *providers* (eager, cpp,
torch.compile of eager, SAELens, sparsify, ...). Each provider hands the harness a zero-argument
callable. The harness:

1. runs each callable once under ``torch.profiler`` with ``profile_memory=True`` — this is both the
   warm-up (first-call allocations, lazy init, autotuning) and the peak-memory measurement;
2. times ``repeats`` further calls, *interleaving* the providers (a rotated order each round) so
   that load from other processes on a shared machine hits every provider alike;
3. reports the median and inter-quartile range, and the speed-up against ``eager`` measured in the
   same process (the only number that is comparable between machines and runs).

Peak memory. On CUDA we use the allocator's own counter (``max_memory_allocated``). On CPU torch
keeps no peak counter, so we record every allocation and free of the step with the profiler
(``[memory]`` events carry signed byte counts), sort them by time and take the maximum of the running
sum: the peak of bytes *allocated during the call and live at once*, relative to what was live
before it (parameters, inputs and anything cached before the call are not counted). Every provider
is measured the same way; memory that bypasses torch's allocator (e.g. a library's own ``malloc``
scratch) is invisible to both methods.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


class Skip(Exception):
    """A provider cannot run this case here; the message is the reason (reported as ``skipped: ...``)."""


@dataclass
class Measurement:
    """One provider on one case."""

    provider: str
    status: str = "ok"  # "ok" | "skipped" | "failed"
    reason: str = ""
    times_ms: list = field(default_factory=list)
    peak_bytes: Optional[int] = None
    max_rel_diff: Optional[float] = None  # against eager's output on the same inputs

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else math.nan

    @property
    def iqr_ms(self) -> float:
        if len(self.times_ms) < 2:
            return 0.0 if self.times_ms else math.nan
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[2] - q[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr():
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured): nothing to silence
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device):
    """Run ``fn`` once; return ``(result, peak bytes allocated during the call and live at once)``."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    with _quiet_stderr():  # kineto prints a line to fd 2 at every start and stop
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    # kineto_results holds every allocation/free (prof.events() folds allocations into their ops).
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak


def _as_tensors(out) -> list:
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _as_tensors(o)]
    return []


def max_rel_diff(out, ref) -> Optional[float]:
    """``max |out - ref| / max |ref|`` over matching tensors; ``None`` when there is nothing to compare."""
    a, b = _as_tensors(out), _as_tensors(ref)
    if not a or len(a) != len(b):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        scale = y.abs().max().item() if y.numel() else 0.0
        d = (x - y).abs().max().item() if y.numel() else 0.0
        worst = max(worst, d / scale if scale > 0 else d)
    return worst


def _fail(provider: str, e: BaseException) -> Measurement:
    if isinstance(e, Skip):
        return Measurement(provider, "skipped", str(e))
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return Measurement(provider, "failed", msg[:300])


def measure_providers(
    builders: dict[str, Callable[[], Callable[[], object]]],
    device: torch.device,
    repeats: int,
    *,
    memory: bool = True,
    reference: str = "eager",
    max_seconds: Optional[float] = None,
) -> dict[str, Measurement]:
    """Build, warm up (with memory), then time every provider of one case, interleaved.

    ``builders[name]()`` returns the callable to time, or raises :class:`Skip` (reported as skipped)
    or any other exception (reported as failed). Building includes compilation, which is therefore
    never timed. ``max_seconds`` lowers the number of timed rounds (never below 3) when one round of
    all providers would take longer than ``max_seconds / repeats``.
    """
    device = torch.device(device)
    results: dict[str, Measurement] = {}
    fns: dict[str, Callable] = {}
    outputs: dict[str, object] = {}
    for name, build in builders.items():
        try:
            fn = build()
            if memory:
                out, peak = peak_memory_bytes(fn, device)
            else:
                out, peak = fn(), None
                _sync(device)
            fns[name] = fn
            outputs[name] = out
            results[name] = Measurement(name, peak_bytes=peak)
        except Exception as e:  # one provider failing must not stop the others
            results[name] = _fail(name, e)
    # The first-call results double as the correctness check against eager on the same inputs.
    if reference in outputs:
        for name, out in outputs.items():
            if name != reference:
                results[name].max_rel_diff = max_rel_diff(out, outputs[reference])
    outputs.clear()
    gc.collect()

    names = list(fns)
    rounds = repeats
    for r in range(repeats):
        if r >= rounds:
            break
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        round_start = time.perf_counter()
        for name in order:
            if results[name].status != "ok":
                continue
            try:
                _sync(device)
                t0 = time.perf_counter()
                fns[name]()
                _sync(device)
                results[name].times_ms.append((time.perf_counter() - t0) * 1e3)
            except Exception as e:
                results[name] = _fail(name, e)
        if r == 0 and max_seconds is not None:
            per_round = time.perf_counter() - round_start
            rounds = max(3, min(repeats, int(max_seconds / max(per_round, 1e-9))))
    fns.clear()
    gc.collect()
    return results


def speedups(results: dict[str, Measurement], reference: str = "eager") -> dict[str, float]:
    """Median time of ``reference`` divided by each provider's median (``> 1`` is faster than eager)."""
    ref = results.get(reference)
    out = {}
    for name, m in results.items():
        if ref is None or ref.status != "ok" or m.status != "ok" or not m.times_ms:
            out[name] = math.nan
        else:
            out[name] = ref.median_ms / m.median_ms
    return out


def order_providers(names: Sequence[str]) -> list[str]:
    """Display order: eager first, our backends, compile, then peers."""
    rank = {"eager": 0, "compile": 1, "cpp": 2, "triton": 3, "saelens": 4, "sparsify": 5}
    return sorted(names, key=lambda n: (rank.get(n, 10), n))
