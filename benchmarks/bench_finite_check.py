"""Cost of the per-step non-finite check (``fastsae.train.FiniteCheck.record``) relative to a training step.

Interleaved in one process: each repetition times one full ``train_step`` without the check (a no-op stand-in)
and one ``check.record`` on the same step's state; the ratio of medians is reported. CPU only (the GPU path is the
same fused reductions, asynchronous, with no device->host read).

    python benchmarks/bench_finite_check.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastsae
from fastsae.training import FiniteCheck, train_step


class _NoCheck:
    def record(self, x, loss):
        pass


def measure(sae, batch: int, reps: int) -> tuple[float, float]:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    check = FiniteCheck(sae, 0)
    x = torch.randn(batch, sae.d_in)
    step_t, check_t = [], []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        out = train_step(sae, opt, x, step=i, dead_mask=None, sparsity_coefficient=None, check=_NoCheck())
        t1 = time.perf_counter()
        check.record(x, out.loss)
        t2 = time.perf_counter()
        if i >= 3:  # warm-up
            step_t.append(t1 - t0)
            check_t.append(t2 - t1)
    check.raise_if_bad()
    return statistics.median(step_t), statistics.median(check_t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("topk", 128, 2048, 1024), ("jumprelu", 128, 2048, 1024), ("topk", 512, 8192, 1024),
             ("jumprelu", 512, 8192, 1024)]
    print(f"backend={args.backend} threads={args.threads} reps={args.reps}")
    print(f"{'arch':9s} {'d_in':>5s} {'d_sae':>6s} {'batch':>6s}  check/step")
    for arch, d_in, d_sae, batch in cases:
        torch.manual_seed(0)
        sae = (fastsae.TopKSAE(d_in, d_sae, 16, backend=args.backend) if arch == "topk"
               else fastsae.JumpReLUSAE(d_in, d_sae, backend=args.backend))
        step, check = measure(sae, batch, args.reps)
        print(f"{arch:9s} {d_in:5d} {d_sae:6d} {batch:6d}  {100 * check / step:8.2f} %")


if __name__ == "__main__":
    main()
