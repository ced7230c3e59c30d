"""The ``fastsae train`` command: its arguments (:func:`add_cli`), building the SAE (:func:`build_sae`), the
output folder, and :func:`cmd_train`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..sae import SAE
from .checkpoint import CHECKPOINT, METRICS, OLD_CHECKPOINT
from .loop import TrainingInterrupted, train


# ----------------------------------------------------------------------------------------------
# The `fastsae train` command
# ----------------------------------------------------------------------------------------------

#: the default job: about a minute of CPU on synthetic data with a known dictionary
#: (about 45 s on 2 idle CPU cores: 1024 true features in 128 dimensions, 3M tokens)
DEFAULT_JOB = dict(arch="topk", d_in=128, n_features=1024, width=2048, k=8, active=4.0, n_samples=500_000,
                   steps=3000, batch_size=1024)


def add_cli(sub) -> None:
    p = sub.add_parser(
        "train", help="train an SAE (default: a ~1-minute CPU job on synthetic data)",
        description="Train an SAE. With no options: a TopK SAE on synthetic sparse mixtures of known directions, "
                    "ending with a metrics table that includes feature recovery.")
    d = DEFAULT_JOB
    p.add_argument("--arch", default=d["arch"], choices=list(CLI_ARCHITECTURES))
    p.add_argument("--width", type=int, default=None, help=f"d_sae (default {d['width']} on synthetic data, "
                   "else 16 x d_in)")
    p.add_argument("--k", type=int, default=None, help=f"active latents for topk/batchtopk (default {d['k']})")
    p.add_argument("--l0-coefficient", "--lambda", dest="lam", type=float, default=None,
                   help="sparsity coefficient λ for jumprelu/relu/gated (default: the module's)")
    p.add_argument("--target-l0", type=float, default=None,
                   help="jumprelu/relu/gated: ask for this L0 instead of a λ (jumprelu: the quadratic target-L0 "
                        "loss; relu/gated: λ adjusted by a controller; default: none, train with λ)")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: per architecture)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (sparse mixtures of known directions), 'realistic' (the same with a mean "
                        "offset, Zipf frequencies, heavy-tailed magnitudes, correlated and hierarchical features and "
                        "noise: fastsae.data.realistic), or a folder / file of .npy or .safetensors shards")
    p.add_argument("--out", default="fastsae-run", help=f"output folder: {CHECKPOINT}, metrics.jsonl, sae/ "
                   "(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT} (starts fresh if none)")
    p.add_argument("--overwrite", action="store_true", help="replace the run OUT holds instead of refusing")
    p.add_argument("--latent-parallel", type=int, default=None, help="under torchrun: ranks that split the SAE's "
                   "latents (default: env FASTSAE_LATENT_PARALLEL or 1); the others are data parallel")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: steps/10)")
    p.add_argument("--log-every", type=int, default=None,
                   help="steps between metric records (default: min(100, steps/50))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for small jobs on a busy machine)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--d-in", type=int, default=d["d_in"])
    g.add_argument("--n-features", type=int, default=d["n_features"])
    g.add_argument("--active", type=float, default=d["active"], help="mean active features per sample")
    g.add_argument("--n-samples", type=int, default=d["n_samples"])
    p.set_defaults(func=cmd_train)


#: what ``fastsae train --arch`` builds; the ones in K_ARCHITECTURES take ``--k``, the others λ or ``--target-l0``
CLI_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu", "gated", "abstopk", "matryoshka_batchtopk")
K_ARCHITECTURES = ("topk", "batchtopk", "abstopk", "matryoshka_batchtopk")


def build_sae(arch: str, d_in: int, width: int, *, k: Optional[int] = None, lam: Optional[float] = None,
              target_l0: Optional[float] = None, backend: str = "auto", dtype: torch.dtype = torch.float32) -> SAE:
    from ..sae import ARCHITECTURES

    cls = ARCHITECTURES[arch]
    kw = dict(backend=backend, dtype=dtype)
    if arch == "matryoshka_batchtopk":
        kw["widths"] = cls.nested_widths(width)
    if arch in K_ARCHITECTURES:
        return cls(d_in, width, k if k is not None else DEFAULT_JOB["k"], **kw)
    if lam is not None:
        kw["sparsity_coefficient"] = lam
    if target_l0 is not None:
        kw["target_l0"] = target_l0
    return cls(d_in, width, **kw)


def _check_train_args(args) -> None:
    """Every argument checked before any data is generated or read (ValueError naming the option)."""
    positive = ["steps", "batch_size", "width", "k", "checkpoint_every", "log_every", "threads", "latent_parallel"]
    synthetic_data = args.data in ("synthetic", "realistic")
    if synthetic_data:
        positive += ["d_in", "n_features", "n_samples"]
    for name in positive:
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    for name, v, low in (("lr", args.lr, "> 0"), ("l0-coefficient", args.lam, ">= 0"),
                         ("target-l0", args.target_l0, "> 0")):
        if v is not None and not (math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0)):
            raise ValueError(f"--{name} must be a finite number {low}, got {v}")
    if args.target_l0 is not None and args.arch in K_ARCHITECTURES:
        raise ValueError(f"--target-l0 is for jumprelu/relu/gated; --arch {args.arch} takes --k")
    if synthetic_data:
        if not (math.isfinite(args.active) and 0 < args.active <= args.n_features):
            raise ValueError(f"--active must lie in (0, --n-features={args.n_features}], got {args.active}")
        width = args.width or DEFAULT_JOB["width"]
        if args.k is not None and args.k > width:
            raise ValueError(f"--k must lie in 1..--width={width}, got {args.k}")
        if args.target_l0 is not None and args.target_l0 > width:
            raise ValueError(f"--target-l0 must lie in (0, --width={width}], got {args.target_l0}")
    elif not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or folder (or pass --data synthetic)")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"--device {args.device!r} is not a device: {e}") from e
        if dev.type == "meta":
            raise ValueError("--device meta holds no data: train on a real device (cpu, cuda)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")


#: what a run writes into OUT (all of it, and nothing else, is removed by --overwrite)
_RUN_FILES = (CHECKPOINT, OLD_CHECKPOINT, "checkpoint.json", METRICS, "summary.json")


def _prepare_out(args, out: Path) -> None:
    """Refuse to write into a folder holding a run unless --resume or --overwrite; --overwrite removes that run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        if args.resume:
            print(f"fastsae: --resume: {out} holds no checkpoint; starting a fresh run")
        return
    held = [out / n for n in _RUN_FILES if (out / n).exists()] + sorted(out.glob("checkpoint-step*-latent*"))
    held += [out / "sae"] if (out / "sae").is_dir() else []
    has_ckpt = any(p.name.startswith("checkpoint") for p in held)
    if args.resume:
        if not has_ckpt:
            print(f"fastsae: --resume: {out} holds no checkpoint; starting a fresh run")
        return
    if held and not args.overwrite:
        finished = (out / "summary.json").is_file()
        raise ValueError(f"--out {out} already holds {'a finished' if finished else 'an unfinished'} run "
                         f"({', '.join(p.name for p in held)}); pass --resume to continue it"
                         f"{' with more --steps' if finished else ''} or --overwrite to replace it")
    import shutil

    for p in held:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _resume_hint(args) -> str:
    import shlex

    argv = [a for a in (getattr(args, "argv", None) or []) if a not in ("--resume", "--overwrite")]
    return shlex.join(["fastsae", *argv, "--resume"]) if argv else "the same command with --resume"


def cmd_train(args) -> int:
    from ..data import ShardSource, realistic, synthetic
    from ..metrics import evaluate

    _check_train_args(args)
    _prepare_out(args, Path(args.out))
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    synth = None
    if args.data in ("synthetic", "realistic"):
        make = synthetic if args.data == "synthetic" else realistic
        print(f"{args.data} synthetic data: {args.n_samples} samples, d_in={args.d_in}, {args.n_features} true "
              f"features, ~{args.active:g} active per sample")
        synth = make(args.n_samples, args.d_in, args.n_features, active=args.active, seed=args.seed)
        data, d_in = synth, args.d_in
        held_out = synth.sample(20_000, seed=args.seed + 1)
        width = args.width or DEFAULT_JOB["width"]
    else:
        data = ShardSource(args.data)
        d_in = data.d_in
        held_out = data.sample(20_000, seed=args.seed + 1)
        width = args.width or 16 * d_in
    sae = build_sae(args.arch, d_in, width, k=args.k, lam=args.lam, target_l0=args.target_l0, backend=args.backend,
                    dtype=getattr(torch, args.dtype)).to(device)
    sparsity = (f"k={sae.k}" if hasattr(sae, "k") else f"target L0={sae.target_l0:g}" if sae.target_l0
                else f"λ={sae.sparsity_coefficient:g}")
    print(f"training {type(sae).__name__}(d_in={d_in}, d_sae={width}, {sparsity}"
          + f") for {args.steps} steps of {args.batch_size} on {device}, writing {out}/")
    try:
        result = train(sae, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       device=device, progress=not args.no_progress, log_every=args.log_every, checkpoint_dir=out,
                       checkpoint_every=args.checkpoint_every, resume=args.resume,
                       latent_parallel=args.latent_parallel)
    except TrainingInterrupted as e:
        raise KeyboardInterrupt(f"stopped after step {e.step}; checkpoint written to {e.checkpoint}. "
                                f"Resume with: {_resume_hint(args)}") from None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return 0  # under torchrun: rank 0 saves, evaluates and reports
    sae.save(out / "sae")
    ev = evaluate(sae, held_out.to(torch.float32))
    rows = [
        ("steps", f"{result.steps}"),
        ("tokens", f"{result.tokens:,}"),
        ("time", f"{result.seconds:.1f} s ({result.run_tokens / max(result.seconds, 1e-9):,.0f} tokens/s"
                 + (", this run" if result.run_tokens != result.tokens else "") + ")"),
        ("train loss (last log)", f"{result.final.get('loss', float('nan')):.4g}"),
        ("train FVU (last log)", f"{result.final.get('fvu', float('nan')):.4f}"),
        ("held-out FVU", f"{ev['fvu']:.4f}"),
        ("held-out MSE", f"{ev['mse']:.4g}"),
        ("held-out L0", f"{ev['l0']:.2f}"),
        ("dead latents (held-out)", f"{100 * ev['dead']:.1f}%"),
        ("input scale (folded)", f"{result.input_scale:.4g}"),
    ]
    truth = synth.evaluate(sae) if synth is not None else None
    if truth is not None:
        rows += [("feature recovery (cos>0.9)", f"{100 * truth['recovery']:.1f}% of {args.n_features}"),
                 ("MCC / uniqueness", f"{truth['mcc']:.3f} / {truth['uniqueness']:.3f}"),
                 ("firing precision / recall / F1", f"{truth['precision']:.2f} / {truth['recall']:.2f} / "
                                                    f"{truth['f1']:.2f}"),
                 ("true L0 (data)", f"{synth.true_l0:.2f}")]
    rows.append(("saved", f"{out / 'sae'}  (fastsae.load)"))
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'metric':<{w}}  value")
    print(f"{'-' * w}  {'-' * 24}")
    for name, value in rows:
        print(f"{name:<{w}}  {value}")
    (out / "summary.json").write_text(json.dumps(dict(ev, steps=result.steps, tokens=result.tokens,
                                                      seconds=result.seconds, input_scale=result.input_scale,
                                                      recovery=truth["recovery"] if truth else None,
                                                      ground_truth=truth),
                                                 indent=2))
    return 0
