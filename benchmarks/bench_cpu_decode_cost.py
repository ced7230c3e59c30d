"""What the cpp inference forward spends besides the encoder GEMM: the scan + compaction, then the decode.

Times, interleaved in one process, ``torch.addmm`` into a preallocated output (the bare GEMM), ``threshold_encode``
without a decoder (GEMM + scan + compaction) and with one (+ the decode of every kept entry), and prints the
differences. Per-latent thresholds from the batch's own pre-activations keep about ``--l0`` latents per row.

    python benchmarks/bench_cpu_decode_cost.py --d-sae 8192 --threads 1 --clock cpu
"""
from __future__ import annotations

import argparse

import torch

from bench_cpu_common import CLOCKS, column_quantile, make_batch, time_interleaved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3, help="separate interleaved measurements, printed one per line")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    a = p.parse_args()
    from fastsae import _C  # noqa: F401  (registers torch.ops.fastsae.*)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = make_batch(a.batch, a.d_in)
    W_enc = torch.randn(a.d_in, a.d_sae) / a.d_in**0.5
    b_enc = torch.zeros(a.d_sae)
    W_dec = torch.randn(a.d_sae, a.d_in) / a.d_in**0.5
    b_dec = torch.zeros(a.d_in)
    threshold = column_quantile(x @ W_enc, a.l0 / a.d_sae).contiguous()
    out = torch.empty(a.batch, a.d_sae)
    encode = torch.ops.fastsae.threshold_encode
    fns = {
        "gemm": lambda: torch.addmm(b_enc, x, W_enc, out=out),
        "compact": lambda: encode(x, W_enc, b_enc, b_dec, threshold, True, None, False),
        "decode": lambda: encode(x, W_enc, b_enc, b_dec, threshold, True, W_dec, False),
    }
    kept = fns["compact"]()[0].ne(0).sum(1).float().mean().item()
    print(f"d_in {a.d_in}, d_sae {a.d_sae}, batch {a.batch}, kept per row {kept:.1f}, {a.threads} thread(s), "
          f"{a.clock} clock, torch {torch.__version__}")
    for _ in range(a.rounds):
        t = {k: v * 1e3 for k, v in time_interleaved(fns, a.repeats, a.clock).items()}
        print(f"gemm {t['gemm']:.1f} ms | + scan & compaction {t['compact'] - t['gemm']:.1f} ms | + decode "
              f"{t['decode'] - t['compact']:.1f} ms | encode+decode / gemm {t['decode'] / t['gemm']:.2f}x")


if __name__ == "__main__":
    main()
