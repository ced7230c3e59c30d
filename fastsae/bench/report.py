"""Results on disk: ``results.csv`` (one row per case × provider), ``results.md`` (tables),
``scaling.png`` (time against d_sae and against k / L0) and ``machine.json``."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from .harness import order_providers

FIELDS = [
    "group", "name", "mode", "provider", "device", "d_in", "d_sae", "batch", "k", "status", "reason",
    "median_ms", "iqr_ms", "repeats", "speedup_vs_eager", "peak_mb", "max_rel_diff",
]
# Outputs that disagree with eager by more than this are flagged in the tables (float32 sums over
# d_in and d_sae in a different order differ by ~1e-6 relative; a real bug is orders larger).
MATCH_TOL = 1e-3
# Speed-ups are bold from here: below it, a difference is within the noise of a shared machine.
BOLD_FROM = 1.1


# ------------------------------------------------------------------------------------------------
# Machine description
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device) -> str:
    """Folder name under ``benchmarks/results``: ``cpu-<model>-<cores>c`` or ``cuda-<gpu>``."""
    slug = lambda s: re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40]  # noqa: E731
    if torch.device(device).type == "cuda":
        return "cuda-" + slug(torch.cuda.get_device_name(device))
    return f"cpu-{slug(cpu_model())}-{os.cpu_count()}c"


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except Exception:
        return None


def _git_dirty() -> Optional[list]:
    """Modified kernel/backend files: the numbers are those of the working tree, not of the commit."""
    try:
        root = Path(__file__).resolve().parents[2]
        r = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "csrc", "fastsae/ops",
                            "fastsae/dispatch.py", "fastsae/reference.py", "fastsae/sae"],
                           capture_output=True, text=True, timeout=10)
        return [line[3:] for line in r.stdout.splitlines()] if r.returncode == 0 else None
    except Exception:
        return None


def machine_info(device: torch.device, threads: int, command: str, peers: dict) -> dict:
    import fastsae
    from fastsae.dispatch import status

    info = dict(
        device=str(device),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=threads,
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        fastsae=fastsae.__version__,
        git_commit=_git_commit(),
        git_uncommitted_kernel_files=_git_dirty(),
        date_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=command,
        backends={k: ("yes" if ok else "no: " + why) for k, (ok, why) in status().items()},
        peers=peers,
    )
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------------


def rows_for(case, device, measurements: dict, speedup: dict) -> list[dict]:
    rows = []
    for name in order_providers(measurements):
        m = measurements[name]
        rows.append(dict(
            group=case.group, name=case.name, mode=case.mode, provider=name, device=str(device),
            d_in=case.d_in, d_sae=case.d_sae, batch=case.batch, k=case.k, status=m.status, reason=m.reason,
            median_ms=_num(m.median_ms), iqr_ms=_num(m.iqr_ms), repeats=len(m.times_ms),
            speedup_vs_eager=_num(speedup.get(name, math.nan)),
            peak_mb=_num(m.peak_bytes / 2**20 if m.peak_bytes is not None else math.nan),
            max_rel_diff=_num(m.max_rel_diff if m.max_rel_diff is not None else math.nan, sci=True),
        ))
    return rows


def _num(v: float, sci: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.2e}" if sci else f"{v:.4g}"


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(row: dict, key: str) -> float:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _cell_time(row: Optional[dict]) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return row["status"]
    ms, sp = _f(row, "median_ms"), _f(row, "speedup_vs_eager")
    t = f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1e3:.3g} s"
    if row["provider"] != "eager" and not math.isnan(sp):
        t += f" (**{sp:.2f}×**)" if sp >= BOLD_FROM else f" ({sp:.2f}×)"
    d = _f(row, "max_rel_diff")
    if not math.isnan(d) and d > MATCH_TOL:
        t += " †"
    return t


def _cell_mem(row: Optional[dict]) -> str:
    if row is None or row["status"] != "ok" or row.get("peak_mb", "") == "":
        return "—"
    return f"{_f(row, 'peak_mb'):.4g}"


def _table(rows: list[dict], keyfn, labelfn, header: str, cell) -> list[str]:
    providers = order_providers({r["provider"] for r in rows})
    keys = []
    for r in rows:
        if keyfn(r) not in keys:
            keys.append(keyfn(r))
    index = {(keyfn(r), r["provider"]): r for r in rows}
    out = [f"| {header} | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for key in keys:
        out.append(f"| {labelfn(key)} | " + " | ".join(cell(index.get((key, p))) for p in providers) + " |")
    return out


def _repeats(rows: list[dict]) -> str:
    n = sorted({int(r["repeats"]) for r in rows if r["status"] == "ok" and r.get("repeats")})
    return "?" if not n else (str(n[0]) if n[0] == n[-1] else f"{n[0]}–{n[-1]}")


def _growth_lines(scale: list[dict], cfg) -> list[str]:
    """``d_sae ×8 -> time ×a; k ×8 -> time ×b`` for each series of the scaling study."""
    out = []
    series = {}
    for r in scale:
        if r["status"] == "ok" and r["median_ms"]:
            series.setdefault((r["name"], r["mode"], r["provider"]), []).append(r)
    for (name, mode, prov), rs in sorted(series.items(), key=lambda kv: (kv[0][0], order_providers([kv[0][2]]))):
        parts = []
        for vary, fixed_key, fixed_val in (("d_sae", "k", cfg.main_k), ("k", "d_sae", cfg.main_d_sae)):
            pts = sorted((int(r[vary]), _f(r, "median_ms")) for r in rs if int(r[fixed_key]) == fixed_val)
            if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
                what = "target L0" if (vary == "k" and name == "jumprelu") else vary
                parts.append(f"{what} ×{pts[-1][0] / pts[0][0]:g} → time ×{pts[-1][1] / pts[0][1]:.2f}")
        if parts:
            out.append(f"- {name} {'' if mode == 'step' else mode + ' '}({prov}): " + "; ".join(parts))
    return out


def write_markdown(path: Path, rows: list[dict], info: dict, cfg) -> None:
    L = [f"# fastsae benchmarks — {info.get('device_tag', info['device'])}", ""]
    L += [
        f"- Machine: {info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}"
        + (f", GPU {info['gpu']}" if "gpu" in info else ""),
    ]
    for run in info.get("runs") or [{k: info.get(k) for k in ("date_utc", "command", "git_commit",
                                                              "git_uncommitted_kernel_files")}]:
        dirty = run.get("git_uncommitted_kernel_files")
        L.append(f"- Run {run['date_utc']}: `{run['command']}` — fastsae {info['fastsae']} at git "
                 f"{run.get('git_commit') or '?'}" + (f" + uncommitted {', '.join(dirty)}" if dirty else ""))
    L += [
        f"- Suite `{cfg.name}`: d_in={cfg.d_in}, batch={cfg.batch}; tables at d_sae={cfg.main_d_sae}, "
        f"k = target L0 = {cfg.main_k}; median of {_repeats(rows)} timed runs after a warm-up "
        "(the `repeats` column of results.csv), providers interleaved.",
        f"- Speed-up (bold from {BOLD_FROM}×) = eager median / provider median, measured in the same process. "
        "Peak memory = bytes allocated during the call and live at once (see `fastsae/bench/harness.py`). "
        f"† = output differs from eager by more than {MATCH_TOL:g} (relative).",
        "- Providers: " + "; ".join(
            [f"{k}: {v}" for k, v in info.get("backends", {}).items()]
            + [f"{k}: {v}" for k, v in info.get("peers", {}).items()]),
        "",
    ]
    arch_rank = {a: i for i, a in enumerate(("jumprelu", "topk", "batchtopk", "relu", "gated"))}
    steps = sorted((r for r in rows if r["group"] == "step"), key=lambda r: arch_rank.get(r["name"], 99))
    if steps:
        L += ["## One training step (training_forward + backward)", ""]
        L += _table(steps, lambda r: r["name"], str, "architecture", _cell_time)
        L += ["", "Peak memory of the step (MB):", ""]
        L += _table(steps, lambda r: r["name"], str, "architecture", _cell_mem)
        L.append("")
    ops = [r for r in rows if r["group"] == "op"]
    if ops:
        L += ["## Ops", "",
              "`fwd` under `no_grad`; `bwd` is the backward alone (the forward ran before timing). "
              "`encoder_gemm` (`x @ W_enc + b_enc`) is the dense floor every provider pays; "
              "`encode_*` is the module's inference encode to a sparse code.", ""]
        L += _table(ops, lambda r: (r["name"], r["mode"]), lambda k: f"{k[0]} {k[1]}", "op", _cell_time)
        L += ["", "Peak memory of the op (MB):", ""]
        L += _table(ops, lambda r: (r["name"], r["mode"]), lambda k: f"{k[0]} {k[1]}", "op", _cell_mem)
        L.append("")
    scale = [r for r in rows if (r["name"] in cfg.scale_archs and r["mode"] == "step")
             or (r["name"], r["mode"]) in (("sparse_decode", "fwd+bwd"), ("encoder_gemm", "fwd"))]
    for title, vary, fixed in (("d_sae", "d_sae", ("k", cfg.main_k)), ("k (TopK) / target L0 (JumpReLU)", "k",
                                                                     ("d_sae", cfg.main_d_sae))):
        sub = [r for r in scale if int(r[fixed[0]]) == fixed[1]]
        if not sub or len({r[vary] for r in sub}) < 2:
            continue
        L += [f"## Scaling: time against {title} ({fixed[0]} = {fixed[1]})", ""]
        L += _table(sorted(sub, key=lambda r: int(r[vary])), lambda r: (r["name"], r["mode"], int(r[vary])),
                    lambda k: f"{k[0]} {'' if k[1] == 'step' else k[1] + ' '}{vary}={k[2]}", "case", _cell_time)
        L.append("")
    growth = _growth_lines(scale, cfg)
    if growth:
        L += ["## How each cost grows", "",
              "Time at the largest size divided by time at the smallest, per provider:", ""]
        L += growth + [""]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        L += ["## Not run", ""]
        seen = set()
        for r in bad:
            key = (r["provider"], r["status"], r["reason"])
            if key in seen:
                continue
            seen.add(key)
            cases = sorted({f"{x['name']} {x['mode']}" for x in bad if (x["provider"], x["status"], x["reason"]) == key})
            L.append(f"- {r['provider']} {r['status']}: {r['reason']} ({', '.join(cases)})")
        L.append("")
    if (path.parent / "scaling.png").exists():
        L += ["## Scaling plot", "", "![scaling](scaling.png)", ""]
    path.write_text("\n".join(L))


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------

COLORS = {"eager": "#444444", "cpp": "#1f77b4", "triton": "#2ca02c", "compile": "#ff7f0e",
          "saelens": "#9467bd", "sparsify": "#8c564b"}


def plot_scaling(path: Path, rows: list[dict], cfg, title: str) -> bool:
    """Time against d_sae (top) and against k / L0 (bottom), JumpReLU (left) and TopK (right).

    Besides the steps: the dense encoder GEMM (the floor every provider pays, dotted grey), each
    provider's sparse decode forward+backward (the sparse parts: they should follow k and stay flat
    in d_sae), and for our fast backends the step minus the GEMM (dash-dot: everything after the
    encoder matmul — the O(B·d_sae) threshold/top-k selection plus the sparse parts).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["median_ms"] != ""]
    archs = [a for a in cfg.scale_archs if any(r["name"] == a for r in ok)]
    if not archs:
        return False
    fig, axes = plt.subplots(2, len(archs), figsize=(6.4 * len(archs), 10.4), squeeze=False)
    legend: dict = {}  # one legend for the figure, below the panels, so no curve is hidden
    arch_title = {"jumprelu": f"JumpReLU (L0 ≈ {cfg.main_k})", "topk": f"TopK (k = {cfg.main_k})"}
    for col, arch in enumerate(archs):
        for row_i, (vary, fixed_key, fixed_val) in enumerate((("d_sae", "k", cfg.main_k),
                                                             ("k", "d_sae", cfg.main_d_sae))):
            ax = axes[row_i][col]
            sel = lambda name, mode, prov: sorted(  # noqa: E731
                [(int(r[vary]), _f(r, "median_ms")) for r in ok if r["name"] == name and r["mode"] == mode
                 and r["provider"] == prov and int(r[fixed_key]) == fixed_val], key=lambda t: t[0])
            providers = order_providers({r["provider"] for r in ok if r["name"] == arch and r["mode"] == "step"})
            if vary == "d_sae":
                gemm = dict(sel("encoder_gemm", "fwd", "eager"))
            else:  # the GEMM does not depend on k: one value at the fixed d_sae, drawn as a level line
                g = [_f(r, "median_ms") for r in ok if r["name"] == "encoder_gemm" and int(r["d_sae"]) == fixed_val]
                ks = sorted({int(r["k"]) for r in ok if r["name"] == arch and int(r["d_sae"]) == fixed_val})
                gemm = {k: g[0] for k in ks} if g else {}
            for prov in providers:
                pts = sel(arch, "step", prov)
                if len(pts) < 2:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", color=COLORS.get(prov), lw=2, label=f"{prov} step")
                if prov != "eager":
                    eager = dict(sel(arch, "step", "eager"))
                    for xv, yv in pts:
                        if xv in eager:
                            ax.annotate(f"{eager[xv] / yv:.1f}×", (xv, yv), textcoords="offset points",
                                        xytext=(0, 7), ha="center", fontsize=9, fontweight="bold",
                                        color=COLORS.get(prov))
                    sparse = [(xv, yv - gemm[xv]) for xv, yv in pts if xv in gemm and yv > gemm[xv]]
                    if len(sparse) >= 2:
                        ax.plot(*zip(*sparse), "^-.", color=COLORS.get(prov), lw=1.2, alpha=0.8,
                                label=f"{prov} step − encoder GEMM (selection + sparse parts)")
            if gemm:
                xs = sorted(gemm)
                ax.plot(xs, [gemm[v] for v in xs], "s:", color="#888888", lw=1.5, label="encoder GEMM (dense floor)")
            if True:  # the decode of k (TopK) or L0 (JumpReLU) entries per row: the same op in both
                for prov in providers:
                    pts = sel("sparse_decode", "fwd+bwd", prov)
                    if len(pts) >= 2:
                        ax.plot(*zip(*pts), "x--", color=COLORS.get(prov), lw=1, alpha=0.7,
                                label=f"{prov} sparse_decode fwd+bwd (k / L0 entries per row)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            xlabel = "d_sae (latents)" if vary == "d_sae" else ("target L0" if arch == "jumprelu" else "k")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median time (ms), log scale")
            fixed_txt = f"{'k' if arch == 'topk' else 'L0'} = {fixed_val}" if vary == "d_sae" else f"d_sae = {fixed_val}"
            ax.set_title(f"{arch_title.get(arch, arch).split(' (')[0]} step vs {xlabel} ({fixed_txt})", fontsize=11)
            ax.grid(True, which="both", alpha=0.3)
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
            xt = sorted({int(r[vary]) for r in ok if r["name"] == arch and int(r[fixed_key]) == fixed_val})
            if xt:
                ax.set_xticks(xt)
                ax.set_xticklabels([str(v) for v in xt])
    fig.suptitle(title + "\n(labels: speed-up of each backend's step over eager at that size)", fontsize=12)
    ncol = 3
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    rows_of_legend = -(-len(legend) // ncol)
    fig.tight_layout(rect=(0, 0.025 * rows_of_legend + 0.01, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_runs(path: Path) -> list:
    """The runs recorded in an earlier ``machine.json`` (a file from before run lists counts as one run)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if "runs" in old:
        return list(old["runs"])
    keys = ("date_utc", "command", "git_commit", "git_uncommitted_kernel_files")
    return [{k: old.get(k) for k in keys}] if old.get("date_utc") else []


def save_machine(path: Path, info: dict) -> None:
    path.write_text(json.dumps(info, indent=2) + "\n")
