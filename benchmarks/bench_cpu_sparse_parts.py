"""Sparse parts of the cpp step alone: 1 thread, CPU time (process_time), median of 5, B=2048, d_in=512.

    python benchmarks/bench_cpu_sparse_parts.py
"""
# sparse parts alone (1 thread, CPU time, median of 5) at fixed L0=64 / k=32 as d_sae grows
import torch, time
from fastsae.ops import cpp
torch.set_num_threads(1)
B, d_in = 2048, 512
def T(f, n=5):
    ts = []
    for _ in range(n):
        t = time.process_time(); f(); ts.append(time.process_time() - t)
    return sorted(ts)[n // 2] * 1e3
print("| d_sae | decode (L0=64) | SDDMM+scatter, values only (k=32) | full sparse backward (k=32) | zero-fill of the two dense grads |")
for d_sae in [4096, 8192, 16384, 32768]:
    W = torch.randn(d_sae, d_in) / d_in ** 0.5; We = W.t().contiguous(); bd = torch.zeros(d_in)
    x = torch.randn(B, d_in); g = torch.randn(B, d_in)
    v64 = torch.rand(B, 64); i64 = torch.randint(0, d_sae, (B, 64))
    v = torch.rand(B, 32); i = torch.randint(0, d_sae, (B, 32)); rp = torch.arange(0, B * 32 + 1, 32)
    dec = T(lambda: cpp.sparse_decode(v64, i64, W, None))
    sv = T(lambda: torch.ops.fastsae.sparse_decode_backward(g, v, i, W, True, False))
    bw = T(lambda: torch.ops.fastsae.sparse_sae_backward(g, None, None, x, We, W, bd, False, rp, i.reshape(-1), v.reshape(-1), None, None, None))
    z = T(lambda: (torch.zeros(d_in, d_sae), torch.zeros(d_sae, d_in)))
    print(f"| {d_sae} | {dec:.1f} | {sv:.1f} | {bw:.1f} | {z:.1f} |", flush=True)
