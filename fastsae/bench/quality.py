"""The quality benchmark (``python -m benchmarks quality``, ``fastsae bench --only quality``): how good an SAE each
architecture trains with its defaults, not how fast.

For each dataset (:func:`fastsae.data.realistic` — mean offset, Zipf frequencies, heavy tails, correlated and
hierarchical features, noise — and the clean toy job of :func:`fastsae.data.synthetic`) and each architecture, an
L0 sweep at multiples of the data's true L0: ``target_l0`` where the architecture takes one (JumpReLU, Gated,
ReLU), ``k`` for the TopK family, λ otherwise. Every point trains with :func:`fastsae.train` and the module's
defaults for ``steps × batch_size`` tokens and is scored on held-out samples against the true dictionary
(:meth:`SyntheticData.evaluate`: FVU, L0, recovery, MCC, uniqueness, F1, dead). SAELens's own trainer trains
JumpReLU (its quadratic target-L0 mode) and TopK on the same rows, same budget, in a subprocess (usually a side
venv: ``--peer-python``; see :mod:`.saelens_worker`), scored the same way.

Writes ``quality.md``, ``quality.csv``, ``quality.json`` and ``quality.png`` (FVU vs L0 and recovery vs L0, one
line per architecture and library) to ``benchmarks/results/quality/`` (``quality-quick/`` with ``--quick``).
"""
from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["QualityConfig", "QUALITY", "QUALITY_QUICK", "ARCH_CLASSES", "COLUMNS", "run_quality", "saelens_python"]

#: architecture name -> class name in ``fastsae``; missing classes are skipped, so an architecture that arrives
#: with another branch joins the benchmark by being listed here
ARCH_CLASSES = {
    "jumprelu": "JumpReLUSAE",
    "topk": "TopKSAE",
    "batchtopk": "BatchTopKSAE",
    "matryoshka": "MatryoshkaBatchTopKSAE",
    "gated": "GatedSAE",
    "relu": "ReLUSAE",
}


def _fastsae():
    import fastsae  # imported when used, as everywhere in this module

    return fastsae


#: constructor arguments an architecture needs beyond its knob, from the config
ARCH_EXTRA_ARGS = {
    "matryoshka": lambda cfg: dict(widths=_fastsae().MatryoshkaBatchTopKSAE.nested_widths(cfg.d_sae)),
}
#: the architectures SAELens's trainer runs in the peer column
SAELENS_ARCHS = ("jumprelu", "topk")

#: the table's columns, in order (also the CSV header)
COLUMNS = ("dataset", "arch", "library", "knob", "target", "l0", "fvu", "recovery", "mcc", "uniqueness", "f1",
           "dead", "train_s", "status")


@dataclass(frozen=True)
class QualityConfig:
    """Sizes of one quality run. ``multipliers``: the sweep, as multiples of the data's true L0 (per dataset)."""

    name: str
    d_in: int
    n_features: int
    d_sae: int
    active: float
    n_train: int
    n_eval: int
    steps: int
    batch_size: int
    multipliers: dict = field(default_factory=dict)  # dataset -> tuple of multiples of the true L0
    seed: int = 0
    peers: bool = True

    def with_(self, **kw) -> "QualityConfig":
        return replace(self, **kw)

    @property
    def datasets(self) -> tuple:
        return tuple(self.multipliers)

    def describe(self) -> str:
        sweeps = "; ".join(f"{d}: {', '.join(f'{m:g}' for m in ms)} × true L0" for d, ms in self.multipliers.items())
        return (f"d_in={self.d_in}, {self.n_features} true features (~{self.active:g} active), d_sae={self.d_sae}, "
                f"{self.steps} steps × {self.batch_size} = {self.steps * self.batch_size:,} tokens per point "
                f"(from {self.n_train:,} training rows), held-out n={self.n_eval:,}, seed {self.seed}; sweep {sweeps}")


# The default: 1M tokens per point, sized so the whole run (~30 fastsae points + 8 SAELens points) takes ~25 min
# on one busy CPU thread. At this size TopK at the true L0 recovers ~85% of the realistic features (the issue's
# 128-dim job with 3M tokens reaches ~95%): it separates the recipes without minutes per point.
QUALITY = QualityConfig("default", d_in=64, n_features=256, d_sae=512, active=4.0, n_train=250_000, n_eval=16384,
                        steps=1000, batch_size=1024,
                        multipliers={"realistic": (0.5, 1.0, 2.0), "clean": (1.0,)})
QUALITY_QUICK = QualityConfig("quick", d_in=16, n_features=32, d_sae=64, active=3.0, n_train=20_000, n_eval=4096,
                              steps=150, batch_size=256, multipliers={"realistic": (1.0,), "clean": (1.0,)})


def _log(msg: str) -> None:
    print(msg, flush=True)


def make_data(name: str, cfg: QualityConfig):
    from fastsae.data import realistic, synthetic

    make = {"realistic": realistic, "clean": synthetic}.get(name)
    if make is None:
        raise ValueError(f"dataset must be 'realistic' or 'clean', got {name!r}")
    return make(cfg.n_train, cfg.d_in, cfg.n_features, active=cfg.active, seed=cfg.seed)


def _knob(cls) -> str:
    """How an architecture is asked for an L0: ``k`` (TopK family), ``target_l0``, or ``lambda``."""
    params = inspect.signature(cls.__init__).parameters
    if "k" in params:
        return "k"
    return "target_l0" if "target_l0" in params else "lambda"


def _target(knob: str, l0: float, default_lambda: float, multiplier: float):
    if knob == "k":
        return max(1, round(l0))
    if knob == "target_l0":
        return round(l0, 2)
    return default_lambda / multiplier  # no L0 knob: a larger λ for a smaller L0 (not proportional, but monotone)


def fastsae_point(cls, knob: str, value, data, cfg: QualityConfig, arch: str = "") -> dict:
    """Train one fastsae SAE with its defaults and score it on held-out samples."""
    from fastsae.training import train

    torch.manual_seed(cfg.seed)
    kw = {"k": {}, "target_l0": dict(target_l0=value), "lambda": dict(sparsity_coefficient=value)}[knob]
    kw.update(ARCH_EXTRA_ARGS.get(arch, lambda cfg: {})(cfg))
    sae = cls(cfg.d_in, cfg.d_sae, value, **kw) if knob == "k" else cls(cfg.d_in, cfg.d_sae, **kw)
    t0 = time.perf_counter()
    train(sae, data, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, progress=False)
    seconds = time.perf_counter() - t0
    return dict(data.evaluate(sae, n=cfg.n_eval), train_s=seconds, status="ok")


# ----------------------------------------------------------------------------------------------
# SAELens, in a subprocess
# ----------------------------------------------------------------------------------------------


def saelens_python(explicit: Optional[str] = None) -> tuple[Optional[str], str]:
    """The interpreter that runs SAELens, and why: ``explicit`` (``--peer-python``), else ``$FASTSAE_PEER_PYTHON``,
    else this interpreter when it has sae-lens. ``(None, reason)`` when there is none."""
    candidate = explicit or os.environ.get("FASTSAE_PEER_PYTHON")
    if not candidate:
        import importlib.util

        if importlib.util.find_spec("sae_lens") is None:
            return None, ("skipped: sae-lens not installed here (pass --peer-python or set FASTSAE_PEER_PYTHON "
                          "to a venv's python that has it)")
        candidate = sys.executable
    try:
        probe = subprocess.run([candidate, "-c", "import sae_lens; from importlib.metadata import version; "
                                "print(version('sae-lens'))"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"skipped: cannot run {candidate} ({type(e).__name__}: {e})"
    if probe.returncode != 0:
        return None, f"skipped: {candidate} cannot import sae-lens ({probe.stderr.strip().splitlines()[-1:]})"
    return candidate, f"sae-lens {probe.stdout.strip()} ({candidate})"


def run_saelens_jobs(python: str, specs: list, x_train, x_eval, threads: int, log: Callable[[str], None],
                     consume: Callable[[dict, dict], dict]) -> list:
    """Train ``specs`` (the worker's jobs, without ``out``) with SAELens's trainer in one subprocess of ``python``
    (:mod:`.saelens_worker`) on ``x_train``, evaluated on ``x_eval``. For each job, ``consume(info, tensors)`` of its
    ``RESULT`` line and output tensors, or ``dict(status="failed: ...")``."""
    from safetensors.torch import load_file, save_file

    worker = Path(__file__).with_name("saelens_worker.py")
    results = []
    with tempfile.TemporaryDirectory(prefix="fastsae-saelens-") as tmp:
        tmp = Path(tmp)
        save_file({"x_train": x_train.contiguous(), "x_eval": x_eval.contiguous()}, str(tmp / "in.safetensors"))
        specs = [dict(spec, threads=threads, out=str(tmp / f"out{i}.safetensors")) for i, spec in enumerate(specs)]
        (tmp / "jobs.json").write_text(json.dumps(specs))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled", TQDM_DISABLE="1")
        env.pop("PYTHONPATH", None)  # SAELens's process sees the side venv only, never this tree's fastsae
        t0 = time.perf_counter()
        proc = subprocess.Popen([python, str(worker), str(tmp / "in.safetensors"), str(tmp / "jobs.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        done = {}
        for line in proc.stdout:
            if line.startswith("RESULT "):
                info = json.loads(line[len("RESULT "):])
                done[info["out"]] = info
                log(f"    saelens {len(done)}/{len(specs)} trained ({info['seconds']:.0f}s)")
        stderr = proc.stderr.read()
        proc.wait()
        for spec in specs:
            info = done.get(spec["out"])
            if info is None:
                tail = stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
                results.append(dict(status=f"failed: {tail[0][:200]}"))
                continue
            results.append(consume(info, load_file(spec["out"])))
        log(f"    saelens subprocess: {time.perf_counter() - t0:.0f}s (including imports)")
    return results


def saelens_points(python: str, jobs: list, data, x_eval, codes_eval, cfg: QualityConfig, threads: int,
                   log: Callable[[str], None]) -> list:
    """Train ``jobs`` (``[(arch, knob, value)]``) with SAELens's trainer in one subprocess; score each."""
    specs = [{"arch": arch, knob: value, "d_sae": cfg.d_sae, "steps": cfg.steps, "batch_size": cfg.batch_size,
              "seed": cfg.seed} for arch, knob, value in jobs]

    def consume(info, t):
        m = data.score(t["W_dec"], x_eval, codes_eval, t["fired"].bool(), t["x_hat"])
        return dict(m, train_s=info["seconds"], status="ok", peer=info)

    return run_saelens_jobs(python, specs, data.x, x_eval, threads, log, consume)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run_quality(cfg: QualityConfig = QUALITY, out_dir: Optional[Path] = None, *, archs: Optional[Sequence[str]] = None,
                threads: int = 1, peer_python: Optional[str] = None, command: str = "", plot: bool = True,
                verbose: bool = True) -> Path:
    """Run the quality benchmark; write quality.{md,csv,json,png} to ``out_dir``; return it."""
    import fastsae

    log = _log if verbose else (lambda m: None)
    torch.set_num_threads(threads)
    if out_dir is None:
        out_dir = Path("benchmarks") / "results" / ("quality" if cfg.name == "default" else f"quality-{cfg.name}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archs = tuple(archs) if archs else tuple(ARCH_CLASSES)
    unknown = [a for a in archs if a not in ARCH_CLASSES]
    if unknown:
        raise ValueError(f"--archs: unknown {unknown}; choose from {','.join(ARCH_CLASSES)}")
    classes, skipped = {}, {}
    for a in archs:
        cls = getattr(fastsae, ARCH_CLASSES[a], None)
        if cls is None:
            skipped[a] = f"skipped: fastsae.{ARCH_CLASSES[a]} does not exist in this version"
        else:
            classes[a] = cls
    python, peer_status = (saelens_python(peer_python) if cfg.peers else (None, "skipped: --no-peers"))
    from .report import machine_info

    info = machine_info(torch.device("cpu"), threads, command, {"saelens": peer_status})
    info.update(suite=f"quality-{cfg.name}", config=asdict(cfg), size=cfg.describe(), skipped_archs=skipped)
    log(f"[fastsae bench] quality ({cfg.name}) on {info['cpu_model']}, {threads} thread(s): {cfg.describe()}")
    log(f"  archs: {', '.join(classes)}" + "".join(f"; {a}: {why}" for a, why in skipped.items()))
    log(f"  saelens: {peer_status}")
    t_start = time.perf_counter()
    rows = []

    def flush():
        info["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(out_dir, rows, info, plot=False)

    for ds in cfg.datasets:
        t0 = time.perf_counter()
        data = make_data(ds, cfg)
        true_l0 = data.true_l0
        info.setdefault("true_l0", {})[ds] = true_l0
        log(f"  {ds}: {cfg.n_train:,} rows in {time.perf_counter() - t0:.0f}s, true L0 {true_l0:.2f}")
        peer_jobs = []
        for arch, cls in classes.items():
            knob = _knob(cls)
            default_lambda = inspect.signature(cls.__init__).parameters.get("sparsity_coefficient")
            default_lambda = None if default_lambda is None else default_lambda.default
            for m in cfg.multipliers[ds]:
                value = _target(knob, m * true_l0, float(default_lambda or 0.0), m)
                row = dict(dataset=ds, arch=arch, library="fastsae", knob=knob, target=value, multiplier=m)
                try:
                    row.update(fastsae_point(cls, knob, value, data, cfg, arch))
                except Exception as e:  # one broken architecture must not lose the others' rows
                    row.update(status=f"failed: {type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                log("    " + _line(row))
                flush()
                if arch in SAELENS_ARCHS and python is not None and knob in ("k", "target_l0"):
                    peer_jobs.append((arch, knob, value, m))
        if peer_jobs:
            x_eval, codes_eval = data.sample(cfg.n_eval, 12345, return_codes=True)
            results = saelens_points(python, [j[:3] for j in peer_jobs], data, x_eval, codes_eval, cfg, threads, log)
            for (arch, knob, value, m), res in zip(peer_jobs, results):
                row = dict(dataset=ds, arch=arch, library="saelens", knob=knob, target=value, multiplier=m, **res)
                rows.append(row)
                log("    " + _line(row))
            flush()
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_outputs(out_dir, rows, info, plot=plot)
    log(f"[fastsae bench] quality done in {info['wall_s']:.0f}s: {out_dir / 'quality.md'}")
    return out_dir


def _line(r: dict) -> str:
    head = f"{r['dataset']:9s} {r['arch']:10s} {r['library']:7s} {r['knob']}={_fmt(r['target'])}"
    if r.get("status") != "ok":
        return f"{head}: {r.get('status')}"
    return (f"{head}: L0 {r['l0']:.2f} FVU {r['fvu']:.3f} recovery {100 * r['recovery']:.1f}% MCC {r['mcc']:.3f} "
            f"dead {100 * r['dead']:.1f}% ({r['train_s']:.0f}s)")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def _ordered(rows: list) -> list:
    arch_rank = {a: i for i, a in enumerate(ARCH_CLASSES)}
    ds_rank = {"realistic": 0, "clean": 1}
    return sorted(rows, key=lambda r: (ds_rank.get(r["dataset"], 9), arch_rank.get(r["arch"], 99),
                                       r["library"] != "fastsae", r["multiplier"]))


def write_outputs(out_dir: Path, rows: list, info: dict, plot: bool = True) -> None:
    rows = _ordered(rows)
    (out_dir / "quality.json").write_text(json.dumps(dict(info, rows=rows), indent=1, default=str))
    with open(out_dir / "quality.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS) + ["multiplier", "precision", "recall", "shrinkage"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    has_plot = plot_quality(out_dir / "quality.png", rows, info) if plot else (out_dir / "quality.png").exists()
    (out_dir / "quality.md").write_text(markdown(rows, info, has_plot))


def markdown(rows: list, info: dict, has_plot: bool = False) -> str:
    cfg = info.get("config", {})
    lines = [f"# fastsae quality benchmark ({cfg.get('name', '?')})", "",
             f"`{info.get('command') or 'python -m benchmarks quality'}` — git {info.get('git_commit')}, "
             f"{info.get('date_utc')}, {info.get('cpu_model')}, {info.get('torch_threads')} thread(s), "
             f"wall time {info.get('wall_s', 0):.0f} s.", "",
             f"Size: {info.get('size')}.", "",
             "Each row: one SAE trained with the library's defaults for the same token budget on the same rows, asked "
             "for an L0 through `knob` (`target_l0`, `k`, or λ), scored on held-out samples against the true "
             "dictionary: `recovery` = true features matched by a decoder row at cosine > 0.9, `mcc` = mean cosine of "
             "the optimal one-to-one matching, `uniqueness` = distinct features among matched latents, `f1` = firing "
             "F1 of each feature's matched latent, `fvu` = held-out fraction of variance unexplained, `dead` = latents "
             "that never fire on the held-out set. SAELens: its `SAETrainer` with its defaults (JumpReLU in its "
             "quadratic target-L0 mode), in a subprocess: " + str(info.get("peers", {}).get("saelens")) + ".", ""]
    for a, why in (info.get("skipped_archs") or {}).items():
        lines.append(f"- {a}: {why}")
    if info.get("skipped_archs"):
        lines.append("")
    true_l0 = info.get("true_l0", {})
    head = ["arch", "library", "knob", "L0", "FVU", "recovery", "MCC", "uniqueness", "F1", "dead", "train s"]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        lines += [f"## {ds} (true L0 {true_l0.get(ds, float('nan')):.2f})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if r["dataset"] != ds:
                continue
            knob = f"{r['knob']}={_fmt(r['target'])}"
            if r.get("status") != "ok":
                lines.append(f"| {r['arch']} | {r['library']} | {knob} | " + r.get("status", "?") + " |" * 8)
                continue
            lines.append(f"| {r['arch']} | {r['library']} | {knob} | {r['l0']:.2f} | {r['fvu']:.3f} | "
                         f"{100 * r['recovery']:.1f}% | {r['mcc']:.3f} | {r['uniqueness']:.3f} | {r['f1']:.3f} | "
                         f"{100 * r['dead']:.1f}% | {r['train_s']:.0f} |")
        lines.append("")
    if has_plot:
        lines += ["![FVU and recovery against L0](quality.png)", ""]
    return "\n".join(lines)


def plot_quality(path: Path, rows: list, info: dict) -> bool:
    """FVU vs L0 (top) and recovery vs L0 (bottom), one column per dataset, one line per arch and library."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.get("status") == "ok"]
    datasets = list(dict.fromkeys(r["dataset"] for r in ok))
    if not datasets:
        return False
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 8), squeeze=False)
    colours = {a: f"C{i}" for i, a in enumerate(ARCH_CLASSES)}
    for j, ds in enumerate(datasets):
        for (arch, lib) in dict.fromkeys((r["arch"], r["library"]) for r in ok if r["dataset"] == ds):
            pts = sorted((r for r in ok if r["dataset"] == ds and r["arch"] == arch and r["library"] == lib),
                         key=lambda r: r["l0"])
            style = dict(color=colours.get(arch, "k"), marker="o" if lib == "fastsae" else "s",
                         linestyle="-" if lib == "fastsae" else "--", label=f"{arch} ({lib})")
            axes[0][j].plot([r["l0"] for r in pts], [r["fvu"] for r in pts], **style)
            axes[1][j].plot([r["l0"] for r in pts], [100 * r["recovery"] for r in pts], **style)
        tl0 = info.get("true_l0", {}).get(ds)
        for i, ylabel in enumerate(("held-out FVU", "recovery (% of true features, cos > 0.9)")):
            ax = axes[i][j]
            if tl0:
                ax.axvline(tl0, color="grey", linewidth=0.8, linestyle=":")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("held-out L0")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0][j].set_title(f"{ds} (true L0 {tl0:.2f}, dotted)" if tl0 else ds)
    axes[1][0].legend(fontsize=7, loc="best")
    cfg = info.get("config", {})
    fig.suptitle(f"fastsae quality ({cfg.get('name')}): d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}, "
                 f"{cfg.get('steps', 0) * cfg.get('batch_size', 0):,} tokens per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
