"""Where the sparse kernels stop paying: one training step of each architecture on the cpp backend, forced to the
sparse formulation and to the dense one, against eager, over a sweep of densities. Prints (and writes) the
crossover row for ``fastsae.dispatch.CROSSOVERS``.

    python benchmarks/bench_cpu_crossover.py                       # d_in 512, batch 2048, d_sae 8192, 2 threads
    python benchmarks/bench_cpu_crossover.py --d-sae 4096 --batch 1024 --repeats 3

Density = entries the sparse kernels keep per row / d_sae (JumpReLU: active ∪ window; ReLU: active; Gated: open
gates; TopK / BatchTopK: k). Each SAE is set to a target density from the batch's own pre-activations (per-latent
quantiles for the thresholds / biases; k for TopK). The three providers are timed interleaved in one process,
``--repeats`` rounds after a warm-up, medians. The crossover is where sparse/dense crosses 1, interpolated
log-linearly in the density between the sampled points. Written to ``benchmarks/results/cpu/crossover.md``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform

import torch

from bench_cpu_common import build as build_sae, make_batch, time_interleaved
from fastsae.dispatch import override_crossover

DENSITIES = (0.004, 0.008, 0.016, 0.03, 0.05, 0.08, 0.12, 0.18, 0.27, 0.4)
ARCHS = ("jumprelu", "relu", "gated", "topk", "batchtopk")


def step_fn(sae, x, mode):
    def run():
        for p in sae.parameters():
            p.grad = None
        with override_crossover(mode):
            out = sae.training_forward(x)
            out.loss.backward()
        return out

    return run


def measured_density(arch, sae, x):
    """Entries per row / d_sae as the dispatcher sees them."""
    if arch in ("topk", "batchtopk"):
        return sae.k / sae.d_sae
    run = step_fn(sae, x, "sparse")
    run()
    return sae.ops().density.last(sae.W_enc) / sae.d_sae


def crossover(rows):
    """Log-linear interpolation of the density where sparse/dense = 1 (the first crossing from below)."""
    pts = sorted((r["density"], r["sparse"] / r["dense"]) for r in rows)
    if pts[0][1] > 1:
        return pts[0][0]
    for (d0, q0), (d1, q1) in zip(pts, pts[1:]):
        if q0 <= 1 < q1:
            t = (math.log(q1) - 0.0) / (math.log(q1) - math.log(q0))  # fraction from d1 back to d0
            return math.exp(math.log(d1) - t * (math.log(d1) - math.log(d0)))
    return pts[-1][0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time instead of elapsed time (a busy machine; with --threads 1)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "crossover.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = make_batch(args.batch, args.d_in)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, d_in={args.d_in}, d_sae={args.d_sae}, "
          f"batch={args.batch}, float32")
    print("| arch | density | eager ms | dense ms | sparse ms | dense vs eager | sparse vs eager | sparse/dense |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for target in args.densities:
            k = max(1, round(target * args.d_sae))
            cpp = build_sae(arch, "cpp", args.d_in, args.d_sae, x, target, k)
            eager = build_sae(arch, "eager", args.d_in, args.d_sae, x, target, k)
            density = measured_density(arch, cpp, x)
            t = time_interleaved(dict(eager=step_fn(eager, x, None), dense=step_fn(cpp, x, "dense"),
                                      sparse=step_fn(cpp, x, "sparse")), args.repeats, args.clock)
            row = dict(arch=arch, density=density, **t)
            rows.append(row)
            print(f"| {arch} | {density:.4f} | {1e3 * t['eager']:.0f} | {1e3 * t['dense']:.0f} | "
                  f"{1e3 * t['sparse']:.0f} | {t['eager'] / t['dense']:.2f}x | {t['eager'] / t['sparse']:.2f}x | "
                  f"{t['sparse'] / t['dense']:.2f} |", flush=True)
            del cpp, eager
    found = {a: crossover([r for r in rows if r["arch"] == a]) for a in args.archs}
    line = "    (\"cpp\", \"cpu\"): dict(" + ", ".join(f"{a}={v:.3g}" for a, v in found.items()) + "),"
    print("\nmeasured crossovers (paste into fastsae/dispatch.py CROSSOVERS):\n" + line)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    cmd = "python benchmarks/bench_cpu_crossover.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    with open(args.out, "w") as f:
        f.write("# Sparse vs dense training step on the cpp backend, by density\n\n")
        f.write(f"`{cmd.strip()}` — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                f"{args.threads} threads, d_in={args.d_in}, d_sae={args.d_sae}, batch={args.batch}, float32, "
                f"median of {args.repeats} interleaved steps, {args.clock} clock; load average {os.getloadavg()[0]:.1f} at the end.\n\n")
        f.write("| arch | density | eager ms | dense ms | sparse ms | dense vs eager | sparse vs eager | sparse/dense |\n")
        f.write("|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['arch']} | {r['density']:.4f} | {1e3 * r['eager']:.0f} | {1e3 * r['dense']:.0f} | "
                    f"{1e3 * r['sparse']:.0f} | {r['eager'] / r['dense']:.2f}x | {r['eager'] / r['sparse']:.2f}x | "
                    f"{r['sparse'] / r['dense']:.2f} |\n")
        f.write("\nCrossovers (density where sparse/dense = 1):\n\n```\n" + line + "\n```\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
