"""What the cpp inference forward spends besides the encoder GEMM: the scan + compaction, then the decode.

Times, in one process, ``torch.addmm`` into a preallocated output (the bare GEMM), ``threshold_encode`` without a
decoder (GEMM + scan + compaction) and with one (+ the decode of every kept entry), and prints the differences.
A threshold is set so each row keeps about ``--l0`` latents. Medians of ``--repeats``; use ``--clock cpu`` on a
shared machine.

    python benchmarks/bench_cpu_decode_cost.py --d-sae 8192 --threads 1 --clock cpu
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    a = p.parse_args()
    from fastsae import _C  # noqa: F401  (registers torch.ops.fastsae.*)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    x = torch.randn(a.batch, a.d_in)
    W_enc = torch.randn(a.d_in, a.d_sae) / a.d_in**0.5
    b_enc = torch.zeros(a.d_sae)
    W_dec = torch.randn(a.d_sae, a.d_in) / a.d_in**0.5
    b_dec = torch.zeros(a.d_in)
    threshold = (x @ W_enc).kthvalue(a.d_sae - a.l0, dim=1).values.median().expand(a.d_sae).contiguous()
    out = torch.empty(a.batch, a.d_sae)
    enc = torch.ops.fastsae.threshold_encode

    def median_ms(f) -> float:
        ts = []
        for _ in range(a.repeats):
            t0 = clock()
            f()
            ts.append(clock() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    kept = enc(x, W_enc, b_enc, b_dec, threshold, True, None, False)[0].ne(0).sum(1).float().mean().item()
    print(f"d_in {a.d_in}, d_sae {a.d_sae}, batch {a.batch}, kept per row {kept:.1f}, {a.threads} thread(s), "
          f"{a.clock} clock, torch {torch.__version__}")
    for _ in range(a.rounds):
        gemm = median_ms(lambda: torch.addmm(b_enc, x, W_enc, out=out))
        compact = median_ms(lambda: enc(x, W_enc, b_enc, b_dec, threshold, True, None, False))
        decode = median_ms(lambda: enc(x, W_enc, b_enc, b_dec, threshold, True, W_dec, False))
        print(f"gemm {gemm:.1f} ms | + scan & compaction {compact - gemm:.1f} ms | + decode {decode - compact:.1f} ms"
              f" | encode+decode / gemm {decode / gemm:.2f}x")


if __name__ == "__main__":
    main()
