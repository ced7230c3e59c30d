"""JumpReLU bandwidth experiment: the paper's fixed ε vs. SAELens's defaults vs. fastsae's adaptive ε.

Trains JumpReLU SAEs with ``fastsae.train`` on synthetic ground-truth data (``fastsae.data.synthetic``:
sparse non-negative mixtures of known unit directions) at a fixed token budget, for each setting, seed
and sparsity coefficient λ, and writes

- ``experiments/results/jumprelu_bandwidth.md``   the table (mean ± std over seeds)
- ``experiments/results/jumprelu_bandwidth.png``  L0 and FVU against tokens, one colour per setting
- ``experiments/results/jumprelu_bandwidth.json`` every run's curve and final metrics

Settings (everything else equal: same data, seeds, initial weights, Adam β = (0, 0.999), lr, λ warm-up):
- ``paper``:    ε = 0.001 fixed, θ stored as log θ, θ₀ = 0.001 (Rajamanoharan et al. 2024)
- ``saelens``:  ε = 0.05 fixed, θ stored directly, θ₀ = 0.01 (SAELens's defaults)
- ``adaptive``: fastsae's per-latent adaptive ε (``bandwidth="adaptive"``), θ direct, θ₀ = 0.001
- ``paper-direct`` (ablation): ε = 0.001 fixed with θ stored directly, θ₀ = 0.001 —
  separates the effect of the parameterisation from that of the bandwidth.

Metrics (held-out samples, on the SAE returned by ``fastsae.train``, which works on raw inputs):
- tokens to settle: tokens after which the logged L0 stays within 10% (and, coarser, 50%) of its final
  value (L0 of the training batches, logged ``--points`` times per run);
- tokens to target: tokens until the logged L0 first drops to ≤ 1.1 × the common target L0 (the matched
  L0 below), the same target for every setting — a setting still far above it is "not reached";
- final L0, FVU; FVU at matched L0 (log-log interpolation across the λ sweep at ``--match-l0``, default
  the median final L0 of all runs at the main λ; "n/a" where a seed's sweep does not bracket it);
- recovery: fraction of true features matched by a decoder row at cosine > 0.9;
- dead: fraction of latents that never fire on the held-out samples.

Run (the committed results: 4 settings x 3 seeds x 3 λ = 36 runs, two at a time; 932 s measured on 2 CPU
cores shared with other jobs, load average ≈ 13 — less on an idle machine):
    python experiments/jumprelu_bandwidth.py                                          # fastsae.train's lr
    python experiments/jumprelu_bandwidth.py --lr 5e-3 --name jumprelu_bandwidth_lr5e-3
    python experiments/jumprelu_bandwidth.py --from-json experiments/results/jumprelu_bandwidth.json  # re-render
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

SETTINGS = {
    "paper": ("paper: ε=0.001, log θ, θ₀=0.001",
              dict(bandwidth=1e-3, threshold_init=1e-3, threshold_parameterization="log")),
    "saelens": ("SAELens: ε=0.05, direct θ, θ₀=0.01",
                dict(bandwidth=0.05, threshold_init=1e-2, threshold_parameterization="direct")),
    "adaptive": ("fastsae: adaptive ε, direct θ, θ₀=0.001",
                 dict(bandwidth="adaptive", threshold_init=1e-3, threshold_parameterization="direct")),
    "paper-direct": ("ablation: ε=0.001, direct θ, θ₀=0.001",
                     dict(bandwidth=1e-3, threshold_init=1e-3, threshold_parameterization="direct")),
}
COLORS = {"paper": "tab:red", "saelens": "tab:blue", "adaptive": "tab:green", "paper-direct": "tab:orange"}


def make_data(args):
    from fastsae.data import synthetic

    return synthetic(args.n_samples, args.d_in, args.n_features, active=args.active,
                     frequency_decay=args.frequency_decay, noise=args.noise, seed=args.data_seed)


def run_one(job):
    """Train one SAE; returns its curve and held-out metrics. Runs in a worker process."""
    args, setting, seed, lam = job
    torch.set_num_threads(1)
    import fastsae
    from fastsae.training import train

    data = make_data(args)
    torch.manual_seed(seed)  # the same initial weights for every setting of a seed
    sae = fastsae.JumpReLUSAE(args.d_in, args.d_sae, sparsity_coefficient=lam, backend=args.backend,
                              **SETTINGS[setting][1])
    curve = []
    t0 = time.perf_counter()
    train(sae, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False,
          log_every=max(1, args.steps // args.points),
          callback=lambda r: curve.append(dict(tokens=r["tokens"], l0=r["l0"], fvu=r["fvu"])))
    seconds = time.perf_counter() - t0
    x = data.sample(args.eval_samples, 10_000 + seed)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae(x)
    active = f != 0
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    eps = sae.bandwidth.float()
    return dict(setting=setting, seed=seed, lam=lam, curve=curve, seconds=seconds,
                l0=float(active.sum(-1).float().mean()), fvu=fvu, recovery=data.recovery(sae.W_dec),
                dead=float((~active.any(0)).float().mean()),
                eps_quantiles=[float(q) for q in eps.quantile(torch.tensor([0.1, 0.5, 0.9]))],
                theta_median=float(sae.threshold.detach().float().median()))


def tokens_to_settle(curve, tol=0.1):
    """Tokens after which L0 stays within ``tol`` of its final value."""
    final = curve[-1]["l0"]
    t = curve[-1]["tokens"]
    for r in reversed(curve):
        if abs(r["l0"] - final) > tol * final:
            break
        t = r["tokens"]
    return t


def tokens_to_target(curve, target):
    for r in curve:
        if r["l0"] <= target:
            return r["tokens"]
    return None


def fvu_at_l0(points, l0):
    """Log-log interpolation of FVU at ``l0`` from ``(l0, fvu)`` points of a λ sweep; None if not bracketed."""
    pts = sorted(points)
    for (l_a, f_a), (l_b, f_b) in zip(pts, pts[1:]):
        if l_a <= l0 <= l_b and l_a > 0 and f_a > 0 and f_b > 0:
            if l_b == l_a:
                return f_a
            w = (math.log(l0) - math.log(l_a)) / (math.log(l_b) - math.log(l_a))
            return math.exp((1 - w) * math.log(f_a) + w * math.log(f_b))
    return None


def mean_sd(values, fmt="{:.3g}", scale=1.0):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    m = statistics.mean(values) / scale
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ± {fmt.format(statistics.stdev(values) / scale)}"


def summarise(args, runs, settings):
    main = [r for r in runs if r["lam"] == args.lam]
    if args.match_l0 is None:
        args.match_l0 = round(statistics.median(r["l0"] for r in main), 1)
    by = {s: [r for r in main if r["setting"] == s] for s in settings}
    target = 1.1 * args.match_l0
    rows = []
    for s in settings:
        rs = by[s]
        settle = [tokens_to_settle(r["curve"]) for r in rs]
        settle50 = [tokens_to_settle(r["curve"], 0.5) for r in rs]
        reach = [tokens_to_target(r["curve"], target) for r in rs]
        matched = []
        for seed in args.seeds:
            pts = [(r["l0"], r["fvu"]) for r in runs if r["setting"] == s and r["seed"] == seed]
            matched.append(fvu_at_l0(pts, args.match_l0))
        n_matched = sum(m is not None for m in matched)
        rows.append(dict(setting=s, settle=settle, settle50=settle50, reach=reach, matched=matched, runs=rs, n_matched=n_matched))
    return target, rows


def write_table(args, runs, settings, path):
    target, rows = summarise(args, runs, settings)
    budget = args.steps * args.batch_size
    lines = [
        f"Synthetic ground truth: d_in={args.d_in}, {args.n_features} true features "
        f"(frequency decay {args.frequency_decay}), {args.active} active per sample on average, noise {args.noise}; "
        f"SAE d_sae={args.d_sae}; {args.steps} steps × {args.batch_size} rows = {budget / 1e6:.2f}M tokens; "
        f"lr {'fastsae.train default' if args.lr is None else format(args.lr, 'g')}, fastsae.train defaults otherwise (Adam β=(0, 0.999), λ warm-up over the first 10%, "
        f"lr decay over the last 20%). Seeds {args.seeds}; main λ = {args.lam}; "
        f"λ sweep {args.lams} for FVU at matched L0 = {args.match_l0:g}. Mean ± std over seeds, held-out samples.",
        "",
        f"| setting | tokens until L0 within 10% of final (M) | within 50% of final (M) | until L0 ≤ {target:.1f} (M) "
        f"| final L0 | final FVU | FVU at L0 = {args.match_l0:g} | recovery (cos > 0.9) | dead fraction "
        f"| ε (10/50/90%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rs = row["runs"]
        reach = row["reach"]
        reach_txt = mean_sd(reach, scale=1e6) if all(v is not None for v in reach) else (
            f"not reached in {sum(v is None for v in reach)}/{len(reach)} seeds (> {budget / 1e6:.2f})"
            + (f" (others {mean_sd(reach, scale=1e6)})" if any(v is not None for v in reach) else ""))
        eps = [statistics.median(r["eps_quantiles"][i] for r in rs) for i in range(3)]
        matched = mean_sd(row["matched"], "{:.4f}")
        if 0 < row["n_matched"] < len(args.seeds):
            matched += f" ({row['n_matched']}/{len(args.seeds)} seeds bracket it)"
        lines.append(
            f"| {SETTINGS[row['setting']][0]} | {mean_sd(row['settle'], scale=1e6)} "
            f"| {mean_sd(row['settle50'], scale=1e6)} | {reach_txt} "
            f"| {mean_sd([r['l0'] for r in rs], '{:.2f}')} | {mean_sd([r['fvu'] for r in rs], '{:.4f}')} "
            f"| {matched} | {mean_sd([r['recovery'] for r in rs], '{:.2f}')} "
            f"| {mean_sd([r['dead'] for r in rs], '{:.3f}')} | {' / '.join(f'{e:.2g}' for e in eps)} |")
    if "paper" in settings:
        paper = next(row for row in rows if row["setting"] == "paper")
        lines += ["", "Speed-up over the paper's setting in tokens to settle (per seed: paper's tokens / this setting's "
                  "tokens; median over seeds, min–max):", ""]
        for row in rows:
            if row["setting"] == "paper":
                continue
            cells = []
            for key, name in (("settle", "within 10%"), ("settle50", "within 50%")):
                ratios = sorted(p / t for p, t in zip(paper[key], row[key]))
                cells.append(f"{name}: {statistics.median(ratios):.2f}x ({ratios[0]:.2f}–{ratios[-1]:.2f})")
            lines.append(f"- {SETTINGS[row['setting']][0]}: " + "; ".join(cells))
    lines += ["", "Final (L0, FVU) of every λ of the sweep (mean over seeds):", "",
              "| setting | " + " | ".join(f"λ={lam:g}" for lam in args.lams) + " |",
              "|---|" + "---|" * len(args.lams)]
    for s in settings:
        cells = []
        for lam in args.lams:
            rs = [r for r in runs if r["setting"] == s and r["lam"] == lam]
            cells.append(f"L0 {statistics.mean(r['l0'] for r in rs):.2f}, FVU {statistics.mean(r['fvu'] for r in rs):.4f}")
        lines.append(f"| {SETTINGS[s][0]} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot(args, runs, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in settings:
        rs = [r for r in runs if r["setting"] == s and r["lam"] == args.lam]
        for i, r in enumerate(rs):
            t = [p["tokens"] / 1e6 for p in r["curve"]]
            for ax, key in zip(axes, ("l0", "fvu")):
                ax.plot(t, [p[key] for p in r["curve"]], color=COLORS[s], alpha=0.8, lw=1.2,
                        label=SETTINGS[s][0] if i == 0 else None)
    axes[0].axhline(args.true_l0, color="gray", ls=":", lw=1, label=f"true active features ({args.true_l0:.2g})")
    for ax, name in zip(axes, ("L0 (active latents per token, training batches)", "FVU (training batches)")):
        ax.set_yscale("log")
        ax.set_xlabel("tokens (M)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"JumpReLU on synthetic ground truth (d_in={args.d_in}, d_sae={args.d_sae}, λ={args.lam}, "
                 f"{len(args.seeds)} seeds, one line per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=32)
    p.add_argument("--n-features", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=128)
    p.add_argument("--active", type=float, default=4.0)
    p.add_argument("--frequency-decay", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--n-samples", type=int, default=200_000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=None,
                   help="Adam lr for every setting (default: fastsae.train's width rule, 2.3e-3 at d_sae=128)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lam", type=float, default=0.01, help="main sparsity coefficient (curves, token counts)")
    p.add_argument("--lams", type=float, nargs="+", default=None,
                   help="λ sweep for FVU at matched L0 (default: main λ × 0.5, 1, 2)")
    p.add_argument("--match-l0", type=float, default=None,
                   help="L0 at which FVUs are compared (default: the median final L0 of all runs at the main λ, "
                        "which the λ sweep brackets)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--points", type=int, default=60, help="logged points per curve")
    p.add_argument("--eval-samples", type=int, default=16384)
    p.add_argument("--backend", default="auto")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="jumprelu_bandwidth", help="file stem of the outputs in --out")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the table and plot from a previous run's JSON (no training)")
    args = p.parse_args(argv)
    if args.lams is None:
        args.lams = [args.lam * 0.5, args.lam, args.lam * 2]
    if args.lam not in args.lams:
        args.lams = sorted(args.lams + [args.lam])
    args.true_l0 = float(make_data(args).probabilities.sum())
    settings = list(args.settings)

    t0 = time.perf_counter()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        for k, v in saved["config"].items():
            if k not in ("out", "from_json", "jobs", "match_l0", "name"):
                setattr(args, k, v)
        settings = list(args.settings)
        runs = saved["runs"]
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / args.name
        print(write_table(args, runs, settings, Path(f"{stem}.md")))
        plot(args, runs, settings, Path(f"{stem}.png"))
        return
    jobs = [(args, s, seed, lam) for lam in args.lams for seed in args.seeds for s in settings]
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(run_one, jobs):
            runs.append(r)
            print(f"[{time.perf_counter() - t0:6.0f}s] {r['setting']:>12} seed {r['seed']} λ={r['lam']:g}: "
                  f"L0 {r['l0']:.2f} FVU {r['fvu']:.4f} recovery {r['recovery']:.2f} dead {r['dead']:.3f} "
                  f"({r['seconds']:.0f}s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    Path(f"{stem}.json").write_text(json.dumps(dict(config=cfg, command=" ".join(["python"] + sys.argv),
                                                    runs=runs), indent=1))
    table = write_table(args, runs, settings, Path(f"{stem}.md"))
    plot(args, runs, settings, Path(f"{stem}.png"))
    print(table)
    print(f"wrote {stem}.md, .png, .json in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
