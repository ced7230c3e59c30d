"""``fastsae bench`` (also ``python -m benchmarks`` from the repository root): every backend side by side
with the eager reference, ``torch.compile`` of it, and — when installed — SAELens and sparsify.

The CPU suite always runs; the GPU suite runs too when CUDA is present. Results go to
``benchmarks/results/<device>/``: ``results.csv``, ``results.md``, ``scaling.png``, ``machine.json``.

Layout: :mod:`.harness` (timing, memory, one harness for everything), :mod:`.cases` (what is
measured, at which sizes, and how each fastsae provider runs it), :mod:`.peers` (SAELens, sparsify),
:mod:`.report` (CSV, markdown, plot).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cases import ARCHS, FULL_CPU, QUICK_CPU, Case, SuiteConfig, build, plan
from .harness import Measurement, Skip, measure_providers, peak_memory_bytes, speedups

__all__ = ["run_suite", "SuiteConfig", "FULL_CPU", "QUICK_CPU", "FULL_GPU", "QUICK_GPU", "Case", "Measurement", "Skip",
           "measure_providers", "peak_memory_bytes", "main", "add_cli"]

# On a GPU the interesting sizes are those of real SAEs (d_in of a mid-sized LM, 2^15..2^17 latents).
FULL_GPU = FULL_CPU.with_(d_in=2048, batch=4096, d_saes=(16384, 32768, 65536, 131072), ks=(32, 64, 128, 256),
                          main_d_sae=65536, main_k=64, repeats=10, compile="main", max_case_seconds=60.0)
QUICK_GPU = QUICK_CPU.with_(d_in=512, batch=1024, d_saes=(4096, 8192, 16384), ks=(16, 32, 64), main_d_sae=8192,
                            main_k=32, repeats=5)


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_suite(
    cfg: SuiteConfig,
    device: str = "cpu",
    out_dir: Optional[Path] = None,
    *,
    threads: Optional[int] = None,
    groups: Sequence[str] = ("step", "op", "scale"),
    resume: bool = False,
    providers: Optional[Sequence[str]] = None,
    command: str = "",
    plot: bool = True,
    verbose: bool = True,
) -> Path:
    """Run one suite on one device; write the CSV/markdown/plot/machine description; return the folder.

    ``resume``: keep the rows already in ``results.csv`` and run only the missing (case, provider) pairs.
    ``providers``: run only these (eager always runs too: speed-ups are measured in the same process)
    and replace their rows, keeping the others' — e.g. re-measure ``cpp`` after a kernel change.
    """
    from . import peers, report

    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if out_dir is None:  # a quick run never overwrites the full run's results
        tag = report.device_tag(device) + ("" if cfg.name == "full" else f"-{cfg.name}")
        out_dir = Path("benchmarks") / "results" / tag
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    peer_status = peers.available() if cfg.peers else {"saelens": "skipped: --no-peers", "sparsify": "skipped: --no-peers"}
    info = report.machine_info(device, torch.get_num_threads(), command, peer_status)
    info["device_tag"] = report.device_tag(device)
    info["suite"] = cfg.name
    keep = bool(resume or providers)
    # A run that adds to results.csv keeps the list of the runs its rows came from.
    this_run = {k: info.get(k) for k in ("date_utc", "command", "git_commit", "git_uncommitted_kernel_files")}
    info["runs"] = (report.load_runs(out_dir / "machine.json") if keep else []) + [this_run]
    report.save_machine(out_dir / "machine.json", info)

    rows = report.read_csv(csv_path) if keep else []
    done = {(r["name"], r["mode"], int(r["d_in"]), int(r["d_sae"]), int(r["batch"]), int(r["k"]), r["provider"])
            for r in rows if r["status"] == "ok" and r["device"] == str(device)}
    todo = [(c, p) for c, p in plan(cfg, device) if c.group in groups]
    log = _log if verbose else (lambda m: None)
    log(f"[fastsae bench] {cfg.name} suite on {device} ({info['cpu_model']}, {torch.get_num_threads()} threads): "
        f"{len(todo)} cases -> {out_dir}")
    if cfg.peers:
        log("  peers: " + "; ".join(f"{k}: {v}" for k, v in peer_status.items()))
    t_start = time.perf_counter()
    only = None if providers is None else set(providers) | {"eager"}
    for i, (case, case_providers) in enumerate(todo):
        wanted = [p for p in case_providers if case.key + (p,) not in done] if resume else list(case_providers)
        if only is not None:
            wanted = [p for p in wanted if p in only]
        if not wanted:
            continue
        if "eager" not in wanted:
            wanted = ["eager"] + wanted  # speed-ups need eager measured in the same process
        t0 = time.perf_counter()
        # Bind case/provider now: the harness calls each builder later.
        builders = {p: (lambda p=p: build(p, case, device)) for p in wanted}
        res = measure_providers(builders, device, cfg.repeats, max_seconds=cfg.max_case_seconds)
        sp = speedups(res)
        rows = [r for r in rows if not (
            (r["name"], r["mode"], int(r["d_in"]), int(r["d_sae"]), int(r["batch"]), int(r["k"])) == case.key
            and r["provider"] in res and r["device"] == str(device))]
        rows += report.rows_for(case, device, res, sp)
        report.write_csv(csv_path, rows)
        report.write_markdown(out_dir / "results.md", rows, info, cfg)
        parts = []
        for p, m in res.items():
            if m.status == "ok":
                parts.append(f"{p} {m.median_ms:.3g}ms" + (f" x{sp[p]:.2f}" if p != "eager" and sp[p] == sp[p] else ""))
            else:
                parts.append(f"{p} {m.status}")
        log(f"  [{i + 1}/{len(todo)}] {case.group:5s} {case.label:22s} d_sae={case.d_sae:<6d} k={case.k:<4d} "
            f"{time.perf_counter() - t0:6.1f}s | " + ", ".join(parts))
    if plot:
        title = (f"fastsae {cfg.name} suite on {info.get('gpu') or info['cpu_model']} "
                 f"({torch.get_num_threads()} threads), d_in={cfg.d_in}, batch={cfg.batch}")
        if report.plot_scaling(out_dir / "scaling.png", rows, cfg, title):
            report.write_markdown(out_dir / "results.md", rows, info, cfg)
    log(f"[fastsae bench] done in {time.perf_counter() - t_start:.0f}s: {out_dir / 'results.md'}")
    return out_dir


def _bench_gpu_script() -> Optional[Path]:
    """``benchmarks/bench_gpu.py`` of a source checkout (the Triton kernels' own benchmark), if present."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = root / "benchmarks" / "bench_gpu.py"
        if p.exists():
            return p
    return None


def _describe(args) -> list:
    """The options of this run, as they would be typed (for the machine description)."""
    out = []
    for name, value in sorted(vars(args).items()):
        if name in ("func", "command", "_argv") or value in (None, False) or (name, value) in (
                ("device", "auto"), ("threads", 2)):
            continue
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


#: the speed groups (all run by default); ``--only`` also takes ``quality`` (fastsae.bench.quality: how good an SAE
#: each architecture trains, an L0 sweep on ground-truth data; minutes, so never part of the default run)
GROUPS = ("step", "op", "scale")
QUALITY_GROUP = "quality"


def cmd_bench(args) -> int:
    command = "fastsae bench" + "".join(" " + shlex.quote(a) for a in _describe(args))
    want = args.device
    devices = ["cpu"]
    if want in ("auto", "cuda") and torch.cuda.is_available():
        devices.append("cuda")
    elif want == "cuda":
        print("[fastsae bench] CUDA is not available here: running the CPU suite only", flush=True)
    if want == "cuda" and "cuda" in devices:
        devices = ["cuda"]
    from .quality import ARCH_CLASSES

    groups = tuple(args.only.split(",")) if args.only else GROUPS
    quality = QUALITY_GROUP in groups
    groups = tuple(g for g in groups if g != QUALITY_GROUP)
    known_archs = tuple(dict.fromkeys(ARCHS + tuple(ARCH_CLASSES))) if quality else ARCHS
    for option, given, known in (("--only", groups, GROUPS), ("--archs", (args.archs or "").split(",") if args.archs
                                                               else (), known_archs)):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise ValueError(f"{option}: unknown {unknown}; choose from {','.join(known)}")
    for option, v in (("--threads", args.threads), ("--repeats", args.repeats)):
        if v is not None and v <= 0:
            raise ValueError(f"{option} must be a positive integer, got {v}")
    if quality:
        _run_quality(args, command)
        if not groups:
            return 0
    for dev in devices:
        if dev == "cpu":
            cfg = QUICK_CPU if args.quick else FULL_CPU
        else:
            cfg = QUICK_GPU if args.quick else FULL_GPU
        if args.repeats:
            cfg = cfg.with_(repeats=args.repeats)
        if args.no_compile:
            cfg = cfg.with_(compile="none")
        if args.no_peers:
            cfg = cfg.with_(peers=False)
        if args.archs:
            cfg = cfg.with_(archs=tuple(args.archs.split(",")))
        out = Path(args.out) / dev if (args.out and len(devices) > 1) else (Path(args.out) if args.out else None)
        run_suite(cfg, dev, out, threads=(args.threads or 2) if dev == "cpu" else None, groups=groups,
                  resume=args.resume, providers=args.providers.split(",") if args.providers else None,
                  command=command)
        if dev == "cuda" and not args.quick:
            script = _bench_gpu_script()
            if script is not None:
                print(f"[fastsae bench] running {script}", flush=True)
                subprocess.run([sys.executable, str(script)], check=False)
    return 0


def _run_quality(args, command: str) -> None:
    from .quality import QUALITY, QUALITY_QUICK, run_quality

    cfg = QUALITY_QUICK if args.quick else QUALITY
    if args.no_peers:
        cfg = cfg.with_(peers=False)
    archs = [a for a in args.archs.split(",")] if args.archs else None
    # one thread by default: the quality numbers do not depend on it, and a long run must not crowd a shared machine
    run_quality(cfg, Path(args.out) / "quality" if args.out else None, archs=archs, threads=args.threads or 1,
                peer_python=args.peer_python, command=command)


def add_cli(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark every backend against eager, torch.compile and SAELens/sparsify (tables + plot)",
        description="Side-by-side speed and memory of every fastsae backend, the eager reference, torch.compile "
        "of it, and SAELens / sparsify when installed (pip install 'fastsae[bench]' sae-lens eai-sparsify). "
        "Writes benchmarks/results/<device>/{results.csv,results.md,scaling.png,machine.json}.",
    )
    p.add_argument("--quick", action="store_true", help="CI-sized run (small sizes, few repeats; 1-3 minutes)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the CPU suite, plus the GPU suite when CUDA is present")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device>, <device>-quick with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; quality: 1)")
    p.add_argument("--repeats", type=int, help="timed runs per case (median reported)")
    p.add_argument("--only", help="comma-separated groups to run: step,op,scale (the default), or quality: the "
                   "training-quality L0 sweep (also `python -m benchmarks quality`; ~25 min, --quick ~1 min)")
    p.add_argument("--archs", help="comma-separated architectures of the step table (or of the quality sweep)")
    p.add_argument("--peer-python", help="quality: the python of a venv with sae-lens, for the SAELens column "
                   "(default: $FASTSAE_PEER_PYTHON, else this interpreter if it has sae-lens, else skipped)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager reference")
    p.add_argument("--no-peers", action="store_true", help="skip SAELens and sparsify")
    p.add_argument("--resume", action="store_true", help="keep the rows already in results.csv, run the rest")
    p.add_argument("--providers", help="comma-separated providers to (re-)run, keeping the other rows of results.csv "
                   "(eager always runs: speed-ups are measured in the same process)")
    p.set_defaults(func=cmd_bench)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks [options]`` == ``fastsae bench [options]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [QUALITY_GROUP]:  # ``python -m benchmarks quality [options]`` == ``--only quality``
        argv = ["--only", QUALITY_GROUP] + argv[1:]
    args = parser.parse_args(["bench"] + argv)
    return int(args.func(args) or 0)
