"""The SAE encoder in Triton: ``pre = x @ W_enc + b_enc`` turned straight into a compact code.

The dense ``[B, d_sae]`` pre-activation tensor is never held whole (DESIGN.md §2). Two providers
compute ``pre`` and hand each tile of it to the same compaction routines:

- ``fused``: one Triton GEMM whose epilogue compacts its own tile (nothing of ``pre`` is written).
- ``slab``: ``torch.addmm`` (cuBLAS) on column slabs of bounded width (``SLAB_BYTES`` per slab), each
  followed by a Triton compaction kernel over the slab. cuBLAS speed, memory bounded by one slab.
  ``encoder_plan`` picks the provider from the table the GPU benchmark fills (``encoder_table.json``),
  else by a default; ``FASTSAE_ENCODER=fused|slab`` forces one.

Compaction:

- JumpReLU (``encode_jumprelu``): keep the *active* entries ``pre > θ`` and the *window* entries
  ``|pre - θ| < ε/2`` (needed only for the θ-gradient), appended to per-row lists: one ``tl.atomic_add``
  per (tile, row) reserves the row's slots, an in-tile prefix sum places each entry (``append_lists``).
  The lists have a capacity chosen from the previous call (a power-of-two bucket above the last need);
  a row that overflows still counts its entries, so one retry at the exact bucket always suffices. The
  one device→host read of a JumpReLU step is the longest list (its width is the output's size).
- TopK / BatchTopK (``encode_topk`` / ``encode_batchtopk``): each tile keeps its top ``kp`` entries per
  row (``topk.tile_topk_store``); ``topk.select_rows`` / ``select_batch`` merge them exactly, recomputing
  the few tiles the merge cannot vouch for — all without a device→host read. BatchTopK's lists are CSR
  (``rows``, ``row_ptr``): their per-row lengths are known only on the device.
- ``sampled_encoder``: attaches the encoder's *sparse* backward to the compact pre-activations:
  ``grad W_enc[:, j] = Σ_{entries at j} g · x_in[row]`` and ``grad b_enc[j] = Σ g`` in one segment pass over
  entries sorted by latent, ``grad b_dec = -W_enc @ grad b_enc`` (batch summed first, then one mat-vec),
  and ``grad x`` (only when ``x`` itself requires grad) by gathering ``W_enc`` columns.

The encode ops are opaque ``custom_op``s (the JumpReLU capacity check looks at data); the JumpReLU
output width is a dynamic size for ``torch.compile``. Everything they launch is a plain kernel.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from .decode import _check_lists, gather_sum, segment_reduce
from .topk import (Candidates, dense_candidates, order_key, absent_key, recompute_gemm, relu_keep_nan,
                   select_batch, select_rows, tile_topk_store)
from .triton_common import (NS, TritonKernel, bucket, cfg, flat_grid, gpu_geometry, kernel_op, keys_to_values,
                            matmul_fp32_precision)

#: Shared memory per block on sm_90 (H100/H200): the pipelined operand tiles of a config must fit.
SMEM_BYTES = 227 * 1024


def gemm_prune(configs, named):
    """The fused GEMM configs a launch may use (found by ``benchmarks/results/compile``).

    float64 data, and float32 without TF32, multiply on CUDA cores (no tensor-core MMA): only the last,
    small config — larger tiles spill inside the K loop on sm_80. Otherwise the configs whose operand
    pipeline ``stages · (BLOCK_M·BLOCK_K + BLOCK_K·BLOCK_N) · itemsize`` fits 227 KB (4-byte TF32
    operands drop the 256-row tile).
    """
    if named.get("ACC64") or named.get("PRECISION") == "ieee":
        return configs[-1:]
    x = named.get("x_ptr")
    size = x.element_size() if isinstance(x, torch.Tensor) else 2
    bn = named.get("BLOCK_N")

    def fits(c):
        k = c.kwargs
        return c.num_stages * (k["BLOCK_M"] + k.get("BLOCK_N", bn)) * k["BLOCK_K"] * size <= SMEM_BYTES

    return [c for c in configs if fits(c)] or configs[-1:]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: ``GROUP_M`` row-tiles sweep the columns together so ``W_enc`` tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _encoder_tile(x_ptr, w_ptr, b_ptr, rm, rn, M, N, Kd, stride_xm, stride_xk, stride_wk, stride_wn,
                  ACC64: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pre = x[rm] @ W_enc[:, rn] + b_enc[rn]`` for one tile, accumulated in float32 (float64 for float64),
    returned rounded to the data dtype as eager's ``pre`` is. Row and column offsets are int64: a
    strided ``W_enc`` (``W_dec.t()``: ``stride_wn = d_in``) passes 2^31 elements at d_sae = 2^20."""
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    for k0 in range(0, Kd, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm64[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < Kd), other=0.0)
        b = tl.load(w_ptr + rk.to(tl.int64)[:, None] * stride_wk + rn64[None, :] * stride_wn,
                    mask=(rk[:, None] < Kd) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(ACC)
    return (acc + bias[None, :]).to(x_ptr.dtype.element_ty)


@triton.jit
def append_lists(pre, rm, rn, inside, M, thr_ptr, eps_ptr, idx_ptr, out_ptr, cnt_ptr, CAP, WIDE64: tl.constexpr,
                 OFF64: tl.constexpr):
    """Append the active ∪ window entries of the tile ``pre [BM, BN]`` (rows ``rm``, latents ``rn``;
    ``inside`` masks the tile's real cells) to the rows' lists ``[M, CAP]``.

    θ and ε stay in their own (float32-or-wider) precision, as in ``reference._kernel_window``. One
    atomic per (row, tile) reserves this tile's slots in the row's list; rows with nothing to append
    skip it. The atomic's result must reach every thread that holds the row (Triton >= 3.5.0, see
    ``MIN_TRITON``). Counts keep growing past ``CAP`` so the caller learns the exact size to retry with.
    List offsets are int32 unless ``OFF64`` (``M · CAP`` past 2^31): per-element int64 offsets were
    what spilled the epilogue's registers (benchmarks/results/compile).
    """
    WIDE: tl.constexpr = tl.float64 if WIDE64 else tl.float32
    pw = pre.to(WIDE)
    th = tl.load(thr_ptr + rn, mask=rn >= 0, other=0.0).to(WIDE)
    ep = tl.load(eps_ptr + rn, mask=rn >= 0, other=1.0).to(WIDE)
    u = (pw - th[None, :]) / ep[None, :]
    keep = ((pw > th[None, :]) | ((u > -0.5) & (u < 0.5))) & inside
    ki = keep.to(tl.int32)
    count = tl.sum(ki, axis=1)
    base = tl.atomic_add(cnt_ptr + rm, count, mask=(rm < M) & (count > 0), sem="relaxed")
    pos = base[:, None] + tl.cumsum(ki, axis=1) - ki
    ok = keep & (pos < CAP)
    if OFF64:
        off = rm.to(tl.int64)[:, None] * CAP + pos
    else:
        off = rm[:, None] * CAP + pos
    tl.store(idx_ptr + off, (rn[None, :] + 0 * pos).to(tl.int32), mask=ok)
    tl.store(out_ptr + off, pre, mask=ok)


@triton.jit
def _encode_jumprelu_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, eps_ptr, idx_ptr, pre_ptr, cnt_ptr,
    M, N, Kd, CAP, stride_xm, stride_xk, stride_wk, stride_wn,
    ACC64: tl.constexpr, WIDE64: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pre = _encoder_tile(x_ptr, w_ptr, b_ptr, rm, rn, M, N, Kd, stride_xm, stride_xk, stride_wk, stride_wn,
                        ACC64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    append_lists(pre, rm, tl.where(rn < N, rn, -1), inside, M, thr_ptr, eps_ptr, idx_ptr, pre_ptr, cnt_ptr, CAP,
                 WIDE64, OFF64)


_ENC_CONFIGS = [
    # Hopper GEMM shapes for bf16 with float32 accumulation (d_in = 2304 is a multiple of 64). Every
    # config compiles for sm_90 and sm_80 within shared memory and without spills in the K loop
    # (benchmarks/results/compile/). 32 tile elements per thread keep the list-building epilogue in
    # registers; 64 per thread spill a few hundred bytes there (once per tile, kept for the larger
    # tile's GEMM efficiency: the autotuner weighs the two). Dropped: 128x256 (256 KB of shared memory
    # on sm_90, over its 227 KB), 256x128 w8 and 128x128 w4 (2.3-2.4 KB of epilogue spills per thread).
    cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    cfg(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    # last: small enough for float64 operands in shared memory (float64 launches tune over it alone)
    cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
]

_encode_jumprelu = TritonKernel(
    _encode_jumprelu_kernel, _ENC_CONFIGS, key=["M", "N", "Kd"], bucketed=["M"],
    interp=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2), reset_to_zero=["cnt_ptr"], prune=gemm_prune,
)


@triton.jit
def _compact_jumprelu_kernel(
    pre_ptr, thr_ptr, eps_ptr, idx_ptr, out_ptr, cnt_ptr, M, N, col0, CAP, stride_pm,
    WIDE64: tl.constexpr, OFF64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The JumpReLU compaction of a dense slab ``pre [M, N]`` whose column 0 is latent ``col0``."""
    n_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    rm = (pid // n_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_local = (pid % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rm[:, None] < M) & (rn_local[None, :] < N)
    pre = tl.load(pre_ptr + rm.to(tl.int64)[:, None] * stride_pm + rn_local[None, :], mask=inside, other=0.0)
    rn = tl.where(rn_local < N, col0 + rn_local, -1)
    append_lists(pre, rm, rn, inside, M, thr_ptr, eps_ptr, idx_ptr, out_ptr, cnt_ptr, CAP, WIDE64, OFF64)


_compact_jumprelu = TritonKernel(
    _compact_jumprelu_kernel,
    [cfg(BLOCK_M=32, BLOCK_N=128, num_warps=4), cfg(BLOCK_M=64, BLOCK_N=128, num_warps=8),
     cfg(BLOCK_M=16, BLOCK_N=256, num_warps=4)],
    key=["M", "N"], bucketed=["M"], interp=dict(BLOCK_M=8, BLOCK_N=16), reset_to_zero=["cnt_ptr"],
)


@triton.jit
def _encode_topk_kernel(
    x_ptr, w_ptr, b_ptr, key_ptr, idx_ptr, drop_ptr,
    M, N, Kd, n_tiles, stride_xm, stride_xk, stride_wk, stride_wn,
    ACC64: tl.constexpr, PRECISION: tl.constexpr, KP: tl.constexpr, KEY64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pre = _encoder_tile(x_ptr, w_ptr, b_ptr, rm, rn, M, N, Kd, stride_xm, stride_xk, stride_wk, stride_wn,
                        ACC64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    keys = tl.where(rn[None, :] < N, order_key(relu_keep_nan(pre), KEY64), absent_key((BLOCK_M, BLOCK_N), KEY64))
    tile_topk_store(keys, rm, pid_n * BLOCK_N, M, pid_n, n_tiles, key_ptr, idx_ptr, drop_ptr, KP, KEY64)


# BLOCK_N is fixed by topk.tile_shape (the candidate buffers are sized by it), so it is not tuned here.
_encode_topk = TritonKernel(
    _encode_topk_kernel,
    [cfg(BLOCK_M=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
     cfg(BLOCK_M=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
     cfg(BLOCK_M=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
     cfg(BLOCK_M=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)],  # fits float64
    key=["M", "N", "Kd", "KP"], bucketed=["M"], interp=dict(BLOCK_M=16, BLOCK_K=16, GROUP_M=2), prune=gemm_prune,
)


# ----------------------------------------------------------------------------------------------
# Providers: which computes pre (fused GEMM or cuBLAS slabs), and the slab width
# ----------------------------------------------------------------------------------------------

PROVIDERS = ("fused", "slab")

#: Bytes of one cuBLAS slab of ``pre`` (``FASTSAE_SLAB_MIB``, default 64 MiB): the slab provider's memory bound.
SLAB_BYTES = int(float(os.environ.get("FASTSAE_SLAB_MIB", "64")) * 2**20)

#: Measured provider choices, written by ``benchmarks/bench_gpu.py --write-table``.
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encoder_table.json")
_table_cache: Optional[list] = None


def _table() -> list:
    global _table_cache
    if _table_cache is None:
        try:
            with open(TABLE_PATH) as f:
                _table_cache = list(json.load(f).get("entries", []))
        except (OSError, ValueError):
            _table_cache = []
    return _table_cache


def encoder_plan(B: int, N: int, Kd: int, dtype: torch.dtype, device: torch.device, arch: str) -> str:
    """``"fused"`` or ``"slab"`` for an encoder of this size (``arch``: ``"jumprelu"`` or ``"topk"``).

    ``FASTSAE_ENCODER`` forces one; else the measured table entry for this GPU, dtype and arch nearest
    to ``(B, N, Kd)`` (log distance); else the default: ``slab`` on CUDA (cuBLAS speed; the fused GEMM
    is estimated at 55–75 % of cuBLAS on Hopper), ``fused`` in the interpreter (where the kernels are
    what is being tested).
    """
    forced = os.environ.get("FASTSAE_ENCODER")
    if forced in PROVIDERS:
        return forced
    if device.type != "cuda":
        return "fused"
    name, dt = torch.cuda.get_device_name(device), str(dtype).removeprefix("torch.")
    rows = [e for e in _table() if e.get("device") == name and e.get("dtype") == dt and e.get("arch") == arch
            and e.get("best") in PROVIDERS]
    if rows:
        def dist(e):
            return sum(abs(math.log2(max(1, a)) - math.log2(max(1, b)))
                       for a, b in ((e["B"], B), (e["d_sae"], N), (e["d_in"], Kd)))
        return min(rows, key=dist)["best"]
    return "slab"


def slab_width(B: int, N: int, itemsize: int, block_n: int) -> int:
    """Columns per cuBLAS slab: a multiple of ``block_n`` with ``B · width · itemsize <= SLAB_BYTES``
    (at least one block), at most ``N``."""
    w = max(block_n, SLAB_BYTES // max(1, B * itemsize) // block_n * block_n)
    return min(w, triton.cdiv(N, block_n) * block_n)


def _slabs(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, block_n: int):
    """``(col0, pre[:, col0:col0+w])`` for each slab, computed by ``torch.addmm`` into one reused buffer."""
    B, N = x_in.shape[0], W_enc.shape[1]
    w = slab_width(B, N, x_in.element_size(), block_n)
    buf = torch.empty(B * w, dtype=x_in.dtype, device=x_in.device)
    bias = b_enc.to(x_in.dtype)
    for col0 in range(0, N, w):
        n = min(w, N - col0)
        out = buf[: B * n].view(B, n)
        torch.addmm(bias[col0:col0 + n], x_in, W_enc[:, col0:col0 + n], out=out)
        yield col0, out


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _precision(x: Tensor) -> str:
    """``tl.dot`` input precision. It only matters for float32 operands: match what eager's matmul does
    on this device (TF32 only where torch allows it). bf16/fp16 keep Triton's default."""
    if x.dtype == torch.float32:
        on_gpu = x.is_cuda or (x.device.type == "meta" and gpu_geometry())  # meta: what a GPU launch would get
        return "tf32" if (on_gpu and matmul_fp32_precision() == "tf32") else "ieee"
    return "ieee" if x.dtype == torch.float64 else "tf32"


def _gemm_grid(M, N, block_n=None):
    def grid(m):
        bn = block_n or m["BLOCK_N"]
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, bn),)
    return grid


#: capacity used last time for a (B, d_sae) shape: the next call starts there (L0 drifts slowly).
_capacity_hint: dict[tuple[int, int], int] = {}
#: the longest row of the last :func:`encode_jumprelu` of a (B, d_sae) shape, read on the host to size its lists
_last_need: dict[tuple[int, int], int] = {}


def longest_list(B: int, d_sae: int) -> Optional[int]:
    """The longest row's entry count of the last :func:`encode_jumprelu` call on a ``[B, ·] x [·, d_sae]`` input
    (``None`` before any). The op reads it to size its lists anyway, so a caller that needs it (the backend's
    density-aware dispatch, inference's exact output width) gets it without a second device→host read."""
    return _last_need.get((B, d_sae))


def jumprelu_lists(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, bandwidth: Tensor,
                   capacity: int, provider: str = "fused") -> tuple[Tensor, Tensor, Tensor]:
    """One pass at a fixed ``capacity``: ``(indices [B, cap] int32, pre [B, cap], counts [B] int32)``.

    ``counts`` are the true per-row totals; a row with ``counts > capacity`` lost entries (retry).
    """
    B, Kd = x_in.shape
    N = W_enc.shape[1]
    # Padding slots hold latent 0 with value 0, so every index stays in range for whoever reads them.
    idx = torch.zeros(B, capacity, dtype=torch.int32, device=x_in.device)
    pre = torch.zeros(B, capacity, dtype=x_in.dtype, device=x_in.device)
    counts = torch.zeros(B, dtype=torch.int32, device=x_in.device)
    if not (B and N):
        return idx, pre, counts
    wide64 = torch.float64 in (x_in.dtype, threshold.dtype)
    off64 = B * capacity >= 2**31
    if provider == "slab":
        for col0, slab in _slabs(x_in, W_enc, b_enc, 128 if gpu_geometry() else 16):
            n = slab.shape[1]
            _compact_jumprelu(
                flat_grid(lambda m: triton.cdiv(B, m["BLOCK_M"]), lambda m, n=n: triton.cdiv(n, m["BLOCK_N"])),
                slab, threshold, bandwidth, idx, pre, counts, B, n, col0, capacity, slab.stride(0), WIDE64=wide64,
                OFF64=off64)
    else:
        _encode_jumprelu(
            _gemm_grid(B, N), x_in, W_enc, b_enc, threshold, bandwidth, idx, pre, counts,
            B, N, Kd, capacity, x_in.stride(0), x_in.stride(1), W_enc.stride(0), W_enc.stride(1),
            ACC64=x_in.dtype == torch.float64, WIDE64=wide64, PRECISION=_precision(x_in), OFF64=off64,
        )
    return idx, pre, counts


def _provider(provider: str, x_in: Tensor, W_enc: Tensor, arch: str) -> str:
    if provider == "auto":
        return encoder_plan(x_in.shape[0], W_enc.shape[1], x_in.shape[1], x_in.dtype, x_in.device, arch)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be 'auto' or one of {list(PROVIDERS)}, got {provider!r}")
    return provider


@custom_op(f"{NS}::encode_jumprelu", mutates_args=())
def encode_jumprelu(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: Tensor, provider: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU encoder: the active ∪ window entries of ``pre = x_in @ W_enc + b_enc``, per row.

    Returns ``(indices [B, K] int32, pre [B, K], counts [B] int32)``: row ``b``'s entries are its first
    ``counts[b]`` slots, by latent, the rest padding (latent 0, value 0); ``K`` is the
    :func:`bucket` of the longest row (a dynamic size, padded so that tuning keys do not drift). Not
    differentiable: pass ``pre`` through :func:`sampled_encoder` for gradients.
    """
    provider = _provider(provider, x_in, W_enc, "jumprelu")
    B = x_in.shape[0]
    N = W_enc.shape[1]
    key = (B, N)
    # Cheap bound for the first call: 1/16 of the latents (L0 is a few per mille when trained);
    # later calls start from the last exact need plus 25 % headroom, in buckets.
    cap = min(N, max(1, _capacity_hint.get(key, bucket(max(16, N // 16)))))
    idx, pre, counts = jumprelu_lists(x_in, W_enc, b_enc, threshold, bandwidth, cap, provider)
    need = int(counts.max()) if B else 0  # the step's one device→host read
    _last_need[key] = need
    if need > cap:
        # The counters kept counting past the capacity: a retry at the bucket of the exact need fits
        # (same inputs, same entries), so it needs no second read; the device checks it all the same.
        cap = min(N, bucket(need))
        idx, pre, counts = jumprelu_lists(x_in, W_enc, b_enc, threshold, bandwidth, cap, provider)
        torch._assert_async(counts.max() <= cap, "encode_jumprelu: the capacity retry overflowed")
    _capacity_hint[key] = min(N, bucket(need + need // 4 + 16))
    width = min(cap, bucket(need))
    # The atomics place a row's entries in whatever order its tiles finished: sort each row by latent
    # (padding last) so the lists, and every sum over them, are the same bit for bit on every run.
    order = torch.sort(torch.where(torch.arange(cap, device=idx.device) < counts[:, None], idx,
                                   torch.full_like(idx, N)), dim=1, stable=True).indices[:, :width]
    idx, pre = idx.gather(1, order), pre.gather(1, order)
    return idx, pre, counts


@encode_jumprelu.register_fake
def _(x_in, W_enc, b_enc, threshold, bandwidth, provider="auto"):
    K = torch.library.get_ctx().new_dynamic_size()
    B = x_in.shape[0]
    return (x_in.new_empty(B, K, dtype=torch.int32), x_in.new_empty(B, K), x_in.new_empty(B, dtype=torch.int32))


def topk_candidates(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, provider: str = "fused") -> Candidates:
    """Per-tile candidates of ``relu(x_in @ W_enc + b_enc)`` from either provider."""
    B, Kd = x_in.shape
    N = W_enc.shape[1]
    c = Candidates(B, N, k, x_in.dtype, x_in.device)
    if not B:
        return c
    if provider == "slab":
        for col0, slab in _slabs(x_in, W_enc, b_enc, c.block_n):
            dense_candidates(c, slab, col0, relu=True)
    else:
        _encode_topk(
            _gemm_grid(B, N, c.block_n), x_in, W_enc, b_enc, c.keys, c.idx, c.drop, B, N, Kd, c.n_tiles,
            x_in.stride(0), x_in.stride(1), W_enc.stride(0), W_enc.stride(1),
            ACC64=x_in.dtype == torch.float64, PRECISION=_precision(x_in), KP=c.kp, KEY64=c.key64,
            BLOCK_N=c.block_n,
        )
    return c


@custom_op(f"{NS}::encode_topk", mutates_args=())
def encode_topk(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, provider: str = "auto") -> tuple[Tensor, Tensor]:
    """TopK encoder: ``(values [B, k], indices [B, k] int64)`` of ``relu(x_in @ W_enc + b_enc)``, sorted
    descending (NaN first, as ``torch.topk``). Not differentiable: pass ``values`` through
    :func:`sampled_encoder`."""
    provider = _provider(provider, x_in, W_enc, "topk")
    c = topk_candidates(x_in, W_enc, b_enc, k, provider)
    keys, cols = select_rows(c, k, recompute_gemm(x_in, W_enc, b_enc, c))
    return keys_to_values(keys, x_in.dtype), cols


@encode_topk.register_fake
def _(x_in, W_enc, b_enc, k, provider="auto"):
    B = x_in.shape[0]
    return x_in.new_empty(B, k), x_in.new_empty(B, k, dtype=torch.int64)


@custom_op(f"{NS}::encode_batchtopk", mutates_args=())
def encode_batchtopk(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                     provider: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchTopK encoder: the ``B·k`` largest entries of ``relu(x_in @ W_enc + b_enc)`` over the batch, as
    CSR lists sorted by row: ``(values [nnz], indices [nnz] int32, rows [nnz] int32, row_ptr [B+1] int64)``
    with ``nnz = min(B·k, B·d_sae)`` (a size known on the host, so no device→host read)."""
    provider = _provider(provider, x_in, W_enc, "topk")
    B, N = x_in.shape[0], W_enc.shape[1]
    n_keep = min(B * k, B * N)
    c = topk_candidates(x_in, W_enc, b_enc, k, provider)
    keys, rows, cols = select_batch(c, n_keep, recompute_gemm(x_in, W_enc, b_enc, c))
    vals = keys_to_values(keys, x_in.dtype)
    order = torch.argsort(rows * N + cols)  # by row, then latent: one order on every run (keys are unique)
    rows, cols, vals = rows[order], cols[order], vals[order]
    row_ptr = torch.searchsorted(rows, torch.arange(B + 1, device=rows.device, dtype=rows.dtype))
    return vals, cols.to(torch.int32), rows.to(torch.int32), row_ptr


@encode_batchtopk.register_fake
def _(x_in, W_enc, b_enc, k, provider="auto"):
    B, N = x_in.shape[0], W_enc.shape[1]
    n = min(B * k, B * N)
    return (x_in.new_empty(n), x_in.new_empty(n, dtype=torch.int32), x_in.new_empty(n, dtype=torch.int32),
            x_in.new_empty(B + 1, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# The encoder's sparse backward
# ----------------------------------------------------------------------------------------------


@kernel_op("sampled_encoder")
def sampled_encoder(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], indices: Tensor,
                    counts: Optional[Tensor], pre: Tensor, order: Tensor, offsets: Tensor,
                    rows: Optional[Tensor] = None, row_ptr: Optional[Tensor] = None, checked: bool = True) -> Tensor:
    """Returns ``pre`` unchanged, differentiable as ``pre[b, e] = x_in[b] · W_enc[:, indices[b, e]] + b_enc[indices[b, e]]``
    with ``x_in = x - b_dec`` (``x`` when ``b_dec`` is None).

    ``pre`` must hold exactly those values — the encoders compute them, so the forward recomputes
    nothing. Padded lists ``[B, K]``: slots ``e >= counts[b]`` are padding and get no gradient. CSR lists
    (``rows``, ``row_ptr``): 1-D ``indices``/``pre``. ``order``/``offsets`` group the entries by latent
    (``triton_common.segments``). ``checked=False`` skips the index check (lists fastsae made).
    """
    if checked:
        _check_lists("sampled_encoder", indices, W_enc.shape[1], order, rows, x.shape[0])
    return pre.clone()


def _sampled_encoder_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, indices, counts, pre, order, offsets, rows, row_ptr, checked = inputs
    ctx.has_b_dec = b_dec is not None
    ctx.has_counts = counts is not None
    ctx.save_for_backward(x, W_enc, b_enc, b_dec, indices, counts, order, offsets, rows, row_ptr)


def _sampled_encoder_backward(ctx, grad):
    x, W_enc, b_enc, b_dec, indices, counts, order, offsets, rows, row_ptr = ctx.saved_tensors
    grad = grad.contiguous()
    K = grad.shape[-1]
    need_x, need_W, need_b, need_bd = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2], (
        ctx.has_b_dec and ctx.needs_input_grad[3])
    grad_x = grad_W = grad_b = grad_bd = None
    if need_W or need_b or need_bd:
        # One pass over the entries sorted by latent gives both grad W_enc (transposed) and grad b_enc.
        flat = grad.reshape(-1)
        W_t, gb = segment_reduce(order, offsets, flat, x, K, None, b_dec if ctx.has_b_dec else None, rows, False)
        gb = gb.to(b_enc.dtype)
        if need_W:
            grad_W = W_t.t().to(W_enc.dtype)
        if need_b:
            grad_b = gb
        if need_bd:
            grad_bd = -(W_enc @ gb.to(W_enc.dtype)).to(b_dec.dtype)
    if need_x:
        grad_x = gather_sum(grad, indices, W_enc.t(), counts if ctx.has_counts else None, row_ptr, False).to(x.dtype)
    return grad_x, grad_W, grad_b, grad_bd, None, None, None, None, None, None, None, None


sampled_encoder.register_autograd(_sampled_encoder_backward, setup_context=_sampled_encoder_setup)
