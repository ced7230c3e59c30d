"""What the CPU benchmark scripts share (not a benchmark itself): the batch, SAEs set to a chosen sparsity from the
batch's own pre-activations, interleaved timing, peak memory, and the results file."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Optional

import torch

import fastsae


def make_batch(B: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g)
    return x / x.pow(2).sum(-1).mean().sqrt()  # E‖x‖² = 1, as the JumpReLU paper's ε assumes


def column_quantile(pre: torch.Tensor, density: float) -> torch.Tensor:
    """Per latent: a value exceeded by about ``density`` of the rows (halfway between two order statistics, so no
    entry sits on the boundary)."""
    B = pre.shape[0]
    r = min(B - 1, max(1, round(B * density)))
    top = pre.topk(r + 1, dim=0).values
    return 0.5 * (top[r - 1] + top[r])


#: the architectures whose sparsity is ``k`` (the others get theirs from per-latent quantiles)
K_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")


def base_arch(arch: str) -> str:
    """The architecture of a benchmark row name (``"jumprelu-fresh"``, ``"jumprelu-noaux"`` -> ``"jumprelu"``)."""
    return arch.removesuffix("-fresh").removesuffix("-noaux")


def build(arch: str, backend: str, d_in: int, d_sae: int, x: torch.Tensor, density: float, k: int,
          calibrate: bool = False, dtype: Optional[torch.dtype] = None) -> fastsae.SAE:
    """An SAE of ``arch`` whose rows of ``x`` keep about ``density · d_sae`` latents (JumpReLU thresholds, ReLU
    encoder biases, Gated gate biases at per-latent quantiles; TopK / BatchTopK / Matryoshka: ``k``). ``calibrate``: a BatchTopK
    with its inference threshold set to keep about k per row. ``"<arch>-fresh"``: the library's default module.
    ``"jumprelu-noaux"``: JumpReLU without its AuxK (``k_aux=0``), the fused step alone.
    The module lives on ``x``'s device, in ``dtype`` (default: the default dtype)."""
    torch.manual_seed(1)
    base = base_arch(arch)
    cls = fastsae.sae.ARCHITECTURES[base]
    where = dict(backend=backend, device=x.device, dtype=dtype)
    if arch.endswith("-noaux"):
        where["k_aux"] = 0
    if base == "matryoshka_batchtopk":
        where["widths"] = cls.nested_widths(d_sae)
    sae = cls(d_in, d_sae, k, **where) if base in K_ARCHS else cls(d_in, d_sae, **where)
    x = x.to(sae.dtype)
    if arch.endswith("-fresh"):
        return sae
    with torch.no_grad():
        # unit encoder columns whatever the architecture's initial norm (a JumpReLU starts at 0.1): the
        # pre-activations' scale against ε, hence the θ-window's size, stays that of a trained SAE
        sae.W_enc.div_(sae.W_enc.norm(dim=0, keepdim=True).clamp_min(1e-12))
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc) / d_in ** 0.5)
        x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
        if base == "jumprelu":
            sae.threshold.copy_(column_quantile(x_in @ sae.W_enc + sae.b_enc, density).clamp_min(0))
        elif base == "relu":
            sae.b_enc.sub_(column_quantile(x_in @ sae.W_enc + sae.b_enc, density))
        elif base == "gated":
            sae.b_gate.copy_(-column_quantile(x_in @ sae.W_enc, density))
        else:
            sae.b_enc.normal_(0, 0.01)
            if base == "batchtopk" and calibrate:
                pre = torch.relu(x_in @ sae.W_enc + sae.b_enc).reshape(-1)
                sae.threshold.fill_(float(pre.topk(x.shape[0] * k).values.min()))
    return sae


#: ``wall``: elapsed time; ``cpu``: this process's CPU time (all its threads), for a busy shared machine, where
#: other jobs' time slices inflate elapsed time but not the CPU work a step costs (use it with 1 thread)
CLOCKS = dict(wall=time.perf_counter, cpu=time.process_time)


def time_interleaved(fns: dict, repeats: int, clock: str = "wall") -> dict:
    """Median seconds of each function over ``repeats`` rounds after a warm-up; each round runs every function
    once, so the load of a shared machine moves them together. ``clock``: a key of :data:`CLOCKS`."""
    now = CLOCKS[clock]
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = now()
            f()
            times[name].append(now() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_bytes(fn) -> int:
    """Peak CPU-allocator bytes held during ``fn()`` above the level before it (profiler memory events)."""
    fn()  # warm caches / lazy init outside the measurement
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, cur)
    return peak


def write_table(out: str, title: str, argv, settings: str, lines) -> None:
    """``out``: a markdown file with ``title``, the command that made it (this script and ``argv``, default the
    process's arguments), torch, the processor, ``settings``, the load average at the end, then ``lines``."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "<script>"
    cmd = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with open(out, "w") as f:
        f.write(f"# {title}\n\n`{cmd.strip()}` — torch {torch.__version__}, "
                f"{platform.processor() or platform.machine()}, {settings}; load average {load:.1f} at the end.\n\n")
        f.write("".join(line + "\n" for line in lines))
    print(f"wrote {out}")
