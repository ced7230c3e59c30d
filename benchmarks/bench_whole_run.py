"""A whole training run on CPU: ``fastsae.train`` from a freshly built module, per architecture, the cpp backend
against the eager one (and SAELens's training SAEs where sae-lens imports), on the same data and batches.

    python benchmarks/bench_whole_run.py                         # d_in 256, d_sae 4096, batch 2048, 300 steps
    python benchmarks/bench_whole_run.py --archs jumprelu --steps 500 --d-sae 8192

A run starts dense (a fresh JumpReLU fires on about half its latents; ReLU and Gated start dense too) and gets
sparse as the sparsity penalty warms up: the dispatcher (fastsae.dispatch.Density) moves from the dense to the
sparse formulation on its own. Every SAE is the library's default for its architecture (``ARCHITECTURES[arch](d_in,
d_sae[, k])``) and ``fastsae.train`` runs with its defaults (learning rate, warm-ups, input scaling, b_dec
initialisation), so the numbers follow the library as its defaults change. Data: ``fastsae.data.synthetic``
(true features in superposition), the same seed for every provider.

Reported per run: total wall time of ``train``, tokens/s over the run, the speed-up against eager, final L0 and
FVU; per step (logged every step): the step time against the step's L0, drawn in one PNG. ``saelens`` runs
SAELens's own trainer (``SAETrainer.fit``, its defaults) for the same architecture in a subprocess of
``--peer-python`` (a side venv with sae-lens; the quality benchmark's worker, fastsae/bench/saelens_worker.py) on the
same rows, scaled as fastsae.train scales them; its time is ``fit`` alone, its L0 and FVU are measured on held-out
rows. Skipped, with the reason, where no interpreter has sae-lens.

Written to ``benchmarks/results/cpu/whole_run.md``, ``whole_run.csv`` and ``whole_run.png``. Timings on a shared
machine move with its load: each provider's run is one measurement, so re-run to see the spread.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import time

import torch

import fastsae
from fastsae.dispatch import get_crossover
from fastsae.data import synthetic
from fastsae.sae import ARCHITECTURES

ALL = ("jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "relu", "gated")
#: the architectures whose sparsity is k; SAELENS: the ones the SAELens worker builds
K_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")
SAELENS = ("jumprelu", "topk", "batchtopk", "relu", "gated")


def fresh(arch: str, d_in: int, d_sae: int, k: int, backend: str, seed: int, target_l0=None):
    torch.manual_seed(seed)
    cls = ARCHITECTURES[arch]
    if arch == "matryoshka_batchtopk":
        return cls(d_in, d_sae, k, widths=cls.nested_widths(d_sae), backend=backend)
    if arch in K_ARCHS:
        return cls(d_in, d_sae, k, backend=backend)
    return cls(d_in, d_sae, backend=backend, **({} if target_l0 is None else dict(target_l0=target_l0)))


def run_fastsae(arch, backend, data, args):
    sae = fresh(arch, args.d_in, args.d_sae, args.k, backend, args.seed, args.target_l0)
    trace = []
    t_prev = [time.perf_counter()]
    ops = sae.ops()
    selection = "batchtopk" if arch == "matryoshka_batchtopk" else arch  # the step Matryoshka's runs on
    crossover = get_crossover(ops.name, sae.device, selection) * sae.d_sae
    fixed = getattr(sae, "k", None) if arch in K_ARCHS else None
    before = [None]  # entries per row the dispatcher saw before the step (None: no history, the dense step)

    def record(rec):
        now = time.perf_counter()
        seen = fixed if fixed is not None else before[0]
        sparse = backend != "eager" and seen is not None and seen <= crossover
        trace.append(dict(step=rec["step"], l0=rec["l0"], seconds=now - t_prev[0], fvu=rec["fvu"], sparse=sparse))
        before[0] = ops.density.last(sae.W_enc)
        t_prev[0] = now

    t0 = time.perf_counter()
    result = fastsae.train(sae, data, steps=args.steps, batch_size=args.batch, seed=args.seed, progress=False,
                           log_every=1, callback=record)
    total = time.perf_counter() - t0
    return dict(seconds=total, tokens=result.tokens, trace=trace, final_l0=trace[-1]["l0"],
                final_fvu=trace[-1]["fvu"])


def run_saelens(archs, data, args, python):
    """SAELens's own trainer (``SAETrainer.fit``, its defaults) on the same rows, one subprocess of ``python`` (the
    quality benchmark's worker, fastsae/bench/saelens_worker.py) for every arch: ``{arch: result or reason}``.
    Its time is ``fit`` alone (no imports, no evaluation); L0 and FVU are measured on 2048 held-out rows."""
    from fastsae.bench.quality import run_saelens_jobs

    # the scale fastsae.train applies (E‖x‖² = 1, what SAELens's JumpReLU ε assumes too), on SAELens's rows
    scale = 1.0 / math.sqrt(float(data.x[:16384].double().pow(2).sum(-1).mean()))
    x = data.x.float() * scale
    x_eval = synthetic(2048, args.d_in, args.n_features, active=args.active, seed=args.seed + 1).x.float() * scale
    specs, skipped = [], {a: "the SAELens worker builds no " + a for a in archs if a not in SAELENS}
    archs = [a for a in archs if a in SAELENS]
    for arch in archs:
        spec = dict(arch=arch, d_sae=args.d_sae, steps=args.steps, batch_size=args.batch, seed=args.seed)
        if arch in ("topk", "batchtopk"):
            spec["k"] = args.k
        elif arch == "jumprelu" and args.target_l0 is not None:
            spec["target_l0"] = args.target_l0
        specs.append(spec)

    def consume(info, t):
        err = (t["x_hat"] - x_eval).pow(2).sum()
        fvu = float(err / (x_eval - x_eval.mean(0)).pow(2).sum())
        return dict(seconds=info["seconds"], tokens=args.steps * args.batch, trace=None,
                    final_l0=float(t["fired"].float().sum(-1).mean()), final_fvu=fvu, peer=info)

    out = run_saelens_jobs(python, specs, x, x_eval, args.threads, print, consume)
    return {**skipped, **{arch: (r if "status" not in r else r["status"]) for arch, r in zip(archs, out)}}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({a for a, _ in results}, key=ALL.index)
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for (a, provider), r in results.items():
            if a != arch or isinstance(r, str) or r["trace"] is None:
                continue
            tr = r["trace"][1:]  # the first step carries the one-off start-up
            for sparse, marker in ((False, "o"), (True, "^")):
                pts = [t for t in tr if t["sparse"] == sparse]
                if pts:
                    label = provider + (" (sparse steps)" if sparse else " (dense steps)" if provider != "eager" else "")
                    ax.scatter([t["l0"] for t in pts], [1e3 * t["seconds"] for t in pts], s=6, marker=marker,
                               label=label, alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per row)")
        ax.set_ylabel("step time (ms)")
        ax.set_title(arch)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ALL), choices=ALL)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="TopK / BatchTopK k")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--target-l0", type=float, default=None,
                   help="JumpReLU / ReLU / Gated: build with target_l0 (its controller or target-L0 loss sets the "
                        "sparsity; a JumpReLU then starts at L0 ≈ 2 × target, init_l0='auto'); default: the "
                        "library's λ, from a dense start")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n-features", type=int, default=2048, help="true features of the synthetic data")
    p.add_argument("--active", type=float, default=16.0, help="mean active true features per sample")
    p.add_argument("--providers", nargs="+", default=["cpp", "eager", "saelens"], choices=["cpp", "eager", "saelens"])
    p.add_argument("--peer-python", default=None,
                   help="the python of a venv with sae-lens, for the saelens column (default $FASTSAE_PEER_PYTHON, "
                        "else this interpreter if it has sae-lens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "whole_run"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # fastsae.data.synthetic holds ~27 KB per sample while it draws them (its dense [n, n_features] codes):
    # 65536 samples (~2 GB) cycled through; 262144 ran out of the shared machine's memory
    n = min(args.steps * args.batch, 65536)
    data = synthetic(n, args.d_in, args.n_features, active=args.active, seed=args.seed)
    print(f"torch {torch.__version__}, {args.threads} threads, d_in={args.d_in}, d_sae={args.d_sae}, "
          f"batch={args.batch}, steps={args.steps}, float32; synthetic data: {n} samples, {args.n_features} "
          f"features, ~{args.active:g} active")
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = {}
    peer = {}
    if "saelens" in args.providers:
        from fastsae.bench.quality import saelens_python

        python, why = saelens_python(args.peer_python)
        print(f"saelens: {why}")
        peer = run_saelens(args.archs, data, args, python) if python else {a: why for a in args.archs}
    # one-off process costs (lazy imports, first calls into the extension) would land on whichever run came first
    for arch in args.archs:
        for provider in [p for p in args.providers if p != "saelens"]:
            fastsae.train(fresh(arch, args.d_in, args.d_sae, args.k, provider, args.seed, args.target_l0), data,
                          steps=2, batch_size=args.batch, seed=args.seed, progress=False)
    for arch in args.archs:
        for provider in args.providers:
            r = peer[arch] if provider == "saelens" else run_fastsae(arch, provider, data, args)
            results[(arch, provider)] = r
            if isinstance(r, str):
                print(f"{arch:10s} {provider:8s} {r}", flush=True)
            else:
                first = "-" if r["trace"] is None else f"{r['trace'][0]['l0']:.0f}"
                print(f"{arch:10s} {provider:8s} {r['seconds']:8.1f} s  {r['tokens'] / r['seconds']:10.0f} tokens/s  "
                      f"first L0 {first}, final L0 {r['final_l0']:.1f}", flush=True)
    header = ("| arch | provider | total s | tokens/s | speed-up vs eager | first-step L0 | final L0 | final FVU | "
              "sparse steps |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (arch, provider), r in results.items():
        if isinstance(r, str):
            lines.append(f"| {arch} | {provider} | {r} | | | | | | |")
            continue
        eager = results.get((arch, "eager"))
        speed = f"{eager['seconds'] / r['seconds']:.2f}x" if isinstance(eager, dict) else "-"
        if r["trace"] is None:  # SAELens: its trainer's own loop, measured on held-out rows
            lines.append(f"| {arch} | {provider} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} | {speed} | - | "
                         f"{r['final_l0']:.1f} (held-out) | {r['final_fvu']:.3f} (held-out) | - |")
            continue
        sparse = sum(t["sparse"] for t in r["trace"])
        lines.append(f"| {arch} | {provider} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} | {speed} | "
                     f"{r['trace'][0]['l0']:.0f} | {r['final_l0']:.1f} | {r['final_fvu']:.3f} | "
                     f"{sparse} of {len(r['trace'])} |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    cmd = "python benchmarks/bench_whole_run.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with open(args.out + ".md", "w") as f:
        f.write("# A whole training run from a fresh module, CPU: fastsae (cpp) vs eager (and SAELens's trainer)\n\n")
        f.write(f"`{cmd.strip()}` — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                f"{args.threads} threads, d_in={args.d_in}, d_sae={args.d_sae}, batch={args.batch}, {args.steps} "
                f"steps, float32, synthetic data ({args.n_features} features, ~{args.active:g} active); load "
                f"average {load0:.1f} at the start, {load:.1f} at the end. Step time vs L0: `{os.path.basename(args.out)}.png`.\n\n")
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "provider", "step", "l0", "step_seconds", "sparse"])
        for (arch, provider), r in results.items():
            if not isinstance(r, str) and r["trace"] is not None:
                for t in r["trace"]:
                    w.writerow([arch, provider, t["step"], f"{t['l0']:.3f}", f"{t['seconds']:.5f}", int(t["sparse"])])
    plot(results, args.out + ".png")
    print(f"wrote {args.out}.md, .csv, .png")


if __name__ == "__main__":
    main()
