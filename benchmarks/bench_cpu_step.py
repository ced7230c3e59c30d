"""One SAE training step (forward + backward) on CPU: the `cpp` backend against the eager reference.

    python benchmarks/bench_cpu_step.py                    # d_in=512, batch 2048, d_sae 4096..32768
    python benchmarks/bench_cpu_step.py --d-sae 8192 --repeats 7

Everything runs in one process with ``torch.set_num_threads(--threads)`` (default 2), and each number
is the median of ``--repeats`` timed steps after a warm-up. Speed is quoted as a ratio against eager
measured in the same process (absolute times on a shared machine are noisy).

Rows:
- JumpReLU: thresholds set per latent from quantiles of the pre-activations of the batch, so each
  row has ~``--l0`` active latents; ε = 1e-3 on inputs with E‖x‖² = 1 (the paper's setting).
- TopK (k = ``--k``), without AuxK (no dead latents), three ways: eager, cpp, and the CPU recipe of
  EleutherAI's sparsify (relu(linear) → topk → ``F.embedding_bag(indices, W_dec,
  per_sample_weights=values, mode="sum")`` decode, ordinary autograd backward).

Peak memory: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free of
the CPU allocator during one step; the running sum of those events, in time order, gives the peak
bytes allocated *during* the step above what existed before it (parameters, the batch). Allocations
made by the C++ kernels go through the same allocator (``at::empty``), so they are counted too.

Columns ``gemm`` and ``rest`` split the cpp step into the encoder GEMM alone (``addmm`` of the whole
batch, timed separately) and everything else: the part that should follow L0 / k, not d_sae (it
still contains the O(d_sae · d_in) writes of the two dense weight gradients and the O(B · d_sae)
threshold scan of the GEMM output).

Results are printed and written to ``benchmarks/results/cpu/step_cpp.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fastsae


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def make_batch(B: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g)
    return x / x.pow(2).sum(-1).mean().sqrt()  # E‖x‖² = 1, as the paper's ε assumes


def jumprelu_sae(backend: str, d_in: int, d_sae: int, x: torch.Tensor, l0: int) -> fastsae.JumpReLUSAE:
    torch.manual_seed(1)
    sae = fastsae.JumpReLUSAE(d_in, d_sae, bandwidth=1e-3, sparsity_coefficient=1e-3, backend=backend)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc) / d_in ** 0.5)
        pre = x @ sae.W_enc + sae.b_enc
        # per-latent threshold at the (1 - l0/d_sae) quantile: each latent fires on l0/d_sae of rows
        q = torch.quantile(pre, 1.0 - l0 / d_sae, dim=0)
        sae.threshold.copy_(q.clamp_min(0))
    return sae


def topk_sae(backend: str, d_in: int, d_sae: int, k: int) -> fastsae.TopKSAE:
    torch.manual_seed(1)
    sae = fastsae.TopKSAE(d_in, d_sae, k, backend=backend)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc) / d_in ** 0.5)
        sae.b_enc.normal_(0, 0.01)
    return sae


def module_step(sae, x):
    def run():
        for p in sae.parameters():
            p.grad = None
        out = sae.training_forward(x)
        out.loss.backward()
        return out

    return run


def sparsify_step(sae, x):
    """EleutherAI sparsify's CPU path: dense encoder + torch.topk, embedding_bag decode, plain autograd."""
    k = sae.k

    def run():
        for p in sae.parameters():
            p.grad = None
        pre = F.relu(F.linear(x - sae.b_dec, sae.W_enc.t(), sae.b_enc))
        values, indices = pre.topk(k, sorted=False)
        x_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        loss.backward()

    return run


def gemm_time(x, W_enc, b_enc, repeats):
    return median_time(lambda: torch.addmm(b_enc, x, W_enc), repeats)


def bench(args):
    torch.set_num_threads(args.threads)
    rows = []
    x = make_batch(args.batch, args.d_in)
    for d_sae in args.d_sae:
        # -- JumpReLU ---------------------------------------------------------------------------------
        saes = {b: jumprelu_sae(b, args.d_in, d_sae, x, args.l0) for b in ("eager", "cpp")}
        out = saes["cpp"].training_forward(x)
        l0 = float(out.l0)
        with torch.no_grad():
            pre = x @ saes["cpp"].W_enc + saes["cpp"].b_enc
            th = saes["cpp"].threshold
            window = float(((pre - th).abs() < 0.5e-3).sum(-1).float().mean())
        t = {b: median_time(module_step(s, x), args.repeats) for b, s in saes.items()}
        m = {b: peak_bytes(module_step(s, x)) for b, s in saes.items()}
        g = gemm_time(x, saes["cpp"].W_enc.detach(), saes["cpp"].b_enc.detach(), args.repeats)
        rows.append(dict(arch="jumprelu", d_sae=d_sae, sparsity=f"L0={l0:.1f} (+{window:.1f} window)",
                         eager=t["eager"], cpp=t["cpp"], sparsify=None, gemm=g,
                         mem_eager=m["eager"], mem_cpp=m["cpp"], mem_sparsify=None))
        print_row(rows[-1])
        del saes
        # -- TopK ---------------------------------------------------------------------------------------
        saes = {b: topk_sae(b, args.d_in, d_sae, args.k) for b in ("eager", "cpp")}
        steps = {b: module_step(s, x) for b, s in saes.items()}
        steps["sparsify"] = sparsify_step(topk_sae("eager", args.d_in, d_sae, args.k), x)
        t = {b: median_time(fn, args.repeats) for b, fn in steps.items()}
        m = {b: peak_bytes(fn) for b, fn in steps.items()}
        g = gemm_time(x - saes["cpp"].b_dec.detach(), saes["cpp"].W_enc.detach(), saes["cpp"].b_enc.detach(),
                      args.repeats)
        rows.append(dict(arch="topk", d_sae=d_sae, sparsity=f"k={args.k}", eager=t["eager"], cpp=t["cpp"],
                         sparsify=t["sparsify"], gemm=g, mem_eager=m["eager"], mem_cpp=m["cpp"],
                         mem_sparsify=m["sparsify"]))
        print_row(rows[-1])
        del saes, steps
    return rows


HEADER = ("| arch | d_sae | sparsity | eager ms | cpp ms | cpp vs eager | sparsify ms | cpp vs sparsify "
          "| gemm ms | rest ms | peak MiB eager | peak MiB cpp | cpp/eager mem | peak MiB sparsify |")
RULE = "|" + "---|" * (HEADER.count("|") - 1)


def fmt_row(r) -> str:
    ms = lambda s: f"{1e3 * s:.1f}"
    mib = lambda b: f"{b / 2**20:.1f}"
    sp = r["sparsify"]
    ratio = lambda a, b: f"{a / b:.2f}x" if a else "-"
    return (f"| {r['arch']} | {r['d_sae']} | {r['sparsity']} | {ms(r['eager'])} | {ms(r['cpp'])} | "
            f"{r['eager'] / r['cpp']:.2f}x | {ms(sp) if sp else '-'} | {ratio(sp, r['cpp'])} | "
            f"{ms(r['gemm'])} | {ms(r['cpp'] - r['gemm'])} | {mib(r['mem_eager'])} | {mib(r['mem_cpp'])} | "
            f"{r['mem_cpp'] / r['mem_eager']:.2f} | {mib(r['mem_sparsify']) if r['mem_sparsify'] else '-'} |")


def print_row(r):
    print(fmt_row(r), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--l0", type=int, default=64, help="target active latents per row (JumpReLU)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "step_cpp.md"))
    args = p.parse_args(argv)
    if "cpp" not in fastsae.backends():
        raise SystemExit("the cpp backend is not built here (pip install --no-build-isolation -e .)")
    print(f"torch {torch.__version__}, {args.threads} threads, d_in={args.d_in}, batch={args.batch}, float32")
    print(HEADER)
    print(RULE)
    rows = bench(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    cmd = "python benchmarks/bench_cpu_step.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    with open(args.out, "w") as f:
        f.write(f"# One training step (forward + backward), CPU, cpp backend vs eager\n\n")
        f.write(f"`{cmd.strip()}` — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                f"{args.threads} threads, d_in={args.d_in}, batch={args.batch}, float32, median of "
                f"{args.repeats} steps. Peak memory: profiler allocation events during one step.\n\n")
        f.write(HEADER + "\n" + RULE + "\n")
        for r in rows:
            f.write(fmt_row(r) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
