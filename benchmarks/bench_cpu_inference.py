"""Inference on CPU: ``encode_sparse``, ``sae(x)`` and ``encode`` of every architecture on the cpp backend against
the bare encoder GEMM and the eager backend.

    python benchmarks/bench_cpu_inference.py                   # batch 4096, d_in 512, d_sae 16384, 2 threads
    python benchmarks/bench_cpu_inference.py --batch 1024 --d-sae 4096 --repeats 3

Each SAE is set to a trained-like sparsity from the batch's own pre-activations: JumpReLU thresholds, ReLU
encoder biases, Gated gate biases and a calibrated BatchTopK threshold at per-latent quantiles so that about
``--l0`` latents are active per row; TopK with ``k = --k``. Everything runs under ``torch.no_grad()`` in one
process, the providers interleaved, ``--repeats`` rounds after a warm-up, medians. ``gemm`` is
``torch.addmm(b_enc, x, W_enc)`` alone: the floor of any encoder. Written to
``benchmarks/results/cpu/inference.md``.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from bench_cpu_common import build as build_sae, make_batch, time_interleaved, write_table

ARCHS = ("jumprelu", "topk", "batchtopk", "relu", "gated")


HEADER = ("| arch | L0 | gemm ms | encode_sparse ms | vs gemm | sae(x) ms | vs gemm | encode ms | vs gemm "
          "| eager encode_sparse ms | eager sae(x) ms | encode_sparse vs eager | sae(x) vs eager |")
RULE = "|" + "---|" * (HEADER.count("|") - 1)


def fmt(r):
    skipped = "skipped (--no-eager)"
    ms = lambda s: skipped if math.isnan(s) else f"{1e3 * s:.0f}"  # noqa: E731
    ratio = lambda a, b: skipped if math.isnan(a) else f"{a / b:.2f}x"  # noqa: E731
    g = r["gemm"]
    return (f"| {r['arch']} | {r['l0']:.1f} | {ms(g)} | {ms(r['encode_sparse'])} | {ratio(r['encode_sparse'], g)} | "
            f"{ms(r['forward'])} | {ratio(r['forward'], g)} | {ms(r['encode'])} | {ratio(r['encode'], g)} | "
            f"{ms(r['eager_encode_sparse'])} | {ms(r['eager_forward'])} | "
            f"{ratio(r['eager_encode_sparse'], r['encode_sparse'])} | {ratio(r['eager_forward'], r['forward'])} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time instead of elapsed time (a busy machine; with --threads 1)")
    p.add_argument("--no-eager", action="store_true", help="skip the (slow) eager columns")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "inference.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = make_batch(args.batch, args.d_in)
    print(f"torch {torch.__version__}, {args.threads} threads, d_in={args.d_in}, d_sae={args.d_sae}, "
          f"batch={args.batch}, float32, no_grad")
    print(HEADER + "\n" + RULE)
    rows = []
    with torch.no_grad():
        for arch in args.archs:
            sae = build_sae(arch, "cpp", args.d_in, args.d_sae, x, args.l0 / args.d_sae, args.k, calibrate=True).eval()
            eager = build_sae(arch, "eager", args.d_in, args.d_sae, x, args.l0 / args.d_sae, args.k,
                              calibrate=True).eval()
            x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
            bias = sae.b_gate if arch == "gated" else sae.b_enc
            fns = dict(gemm=lambda: torch.addmm(bias, x_in, sae.W_enc), encode_sparse=lambda: sae.encode_sparse(x),
                       forward=lambda: sae(x), encode=lambda: sae.encode(x))
            if not args.no_eager:
                fns.update(eager_encode_sparse=lambda: eager.encode_sparse(x), eager_forward=lambda: eager(x))
            t = time_interleaved(fns, args.repeats, args.clock)
            t.setdefault("eager_encode_sparse", float("nan"))
            t.setdefault("eager_forward", float("nan"))
            values, _ = sae.encode_sparse(x)
            row = dict(arch=arch, l0=float((values != 0).sum(-1).float().mean()), **t)
            rows.append(row)
            print(fmt(row), flush=True)
            del sae, eager
    write_table(args.out, "Inference (no_grad) on CPU: cpp backend vs the bare encoder GEMM and eager", argv,
                f"{args.threads} threads, d_in={args.d_in}, d_sae={args.d_sae}, batch={args.batch}, float32, median "
                f"of {args.repeats} interleaved rounds, {args.clock} clock", [HEADER, RULE] + [fmt(r) for r in rows])


if __name__ == "__main__":
    main()
