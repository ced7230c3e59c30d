"""64-bit addressing and CUDA grid limits of the Triton kernels, checked without a GPU.

Offsets such as ``d * stride`` wrap in int32 once they pass 2^31 elements (d_in 2304 at d_sae 2^20 for
``W_enc.t()``). The interpreter does int32 arithmetic exactly as a GPU does (numpy int32 wraps), so a
kernel whose offsets pass 2^31 reads the wrong address there too. The weights below are views of
huge tensors that are never touched except at the entries the test writes: ``torch.empty`` of a few
GiB maps no memory until written, so these tests need a few MiB, not GiB.

A wrapped offset reads far outside the tensor — on a GPU an illegal address, under the interpreter a
segfault — so the checks run in one child process (``_child``), and each test asserts its check's
outcome there: a regression fails the tests instead of killing the test run.

Grid limits: every launch the backend makes at d_sae = 2^24 is recorded (``capture_launches`` on
``meta`` tensors, nothing runs) and its grid checked against CUDA's limits (y, z <= 65,535).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastsae

pytestmark = pytest.mark.skipif("triton" not in fastsae.backends(),
                                reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
S = 2**27  # a stride whose 16th multiple is 2^31


def ops():
    from fastsae.ops import decode, encode, topk, triton_common

    return decode, encode, topk, triton_common


def strided(rows: int, cols: int, dtype=torch.float16):
    """``W [rows, cols]`` with strides ``(1, S)``: element ``(r, c)`` at ``r + c·S``, past 2^31 for ``c >= 16``.

    Returns ``(W, values)`` with ``values`` a dense copy of what was written (the only touched memory)."""
    store = torch.empty((cols - 1) * S + rows, dtype=dtype, device=DEV)
    W = store.as_strided((rows, cols), (1, S))
    vals = (torch.randn(rows, cols, device=DEV) / rows ** 0.5).to(dtype)
    W.copy_(vals)
    return W, vals


def check_gather_sum_through_a_stride_past_2_31():
    """``gather_sum(g, idx, W_enc.t())`` (the encoder backward's grad x): ``d * stride_wd`` passes 2^31."""
    decode, *_ = ops()
    W, vals = strided(40, 20)  # 40 latents, d_in 20: d * S >= 2^31 for d >= 16
    g = torch.randn(3, 5, device=DEV)
    idx = torch.randint(0, 40, (3, 5), device=DEV)
    got = decode.gather_sum(g, idx, W)
    want = torch.einsum("bk,bkd->bd", g, vals.float()[idx])
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def check_sddmm_with_a_strided_W_dec_past_2_31():
    decode, *_ = ops()
    W, vals = strided(40, 20)
    g = torch.randn(3, 20, device=DEV)
    idx = torch.randint(0, 40, (3, 6), device=DEV)
    got = decode.sddmm(g, idx, W)
    want = torch.einsum("bd,bkd->bk", g, vals.float()[idx])
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    # CSR lists (BatchTopK): the same products per flat entry
    rows = torch.tensor([0, 0, 1, 2, 2, 2], dtype=torch.int32, device=DEV)
    flat = torch.randint(0, 40, (6,), dtype=torch.int32, device=DEV)
    got = decode.sddmm(g, flat, W, rows)
    torch.testing.assert_close(got.float(), (g[rows.long()] * vals.float()[flat.long()]).sum(-1), atol=2e-2, rtol=2e-2)


def check_encoder_tile_with_a_strided_W_enc_past_2_31(kind):
    """The encoder GEMM tile's ``rn * stride_wn`` for ``W_enc = W_dec.t()`` (stride_wn = d_in): the fused
    JumpReLU and TopK kernels and the exact-tile recompute, with latents 16..19 past 2^31."""
    decode, encode, topk, common = ops()
    Kd, N, B = 24, 20, 5
    W, vals = strided(Kd, N)
    x = torch.randn(B, Kd, device=DEV).half()
    b = (0.1 * torch.randn(N, device=DEV)).half()
    dense = x.float() @ vals.float() + b.float()
    if kind == "jumprelu":
        theta = torch.full((N,), -10.0, device=DEV)  # everything active: every latent's value is checked
        eps = torch.full((N,), 1e-3, device=DEV)
        idx, pre, counts = encode.jumprelu_lists(x, W, b, theta, eps, N, "fused")
        assert torch.equal(counts, torch.full((B,), N, dtype=torch.int32, device=DEV))
        got = torch.zeros(B, N, device=DEV).scatter(1, idx.long(), pre.float())
    elif kind == "topk":
        c = encode.topk_candidates(x, W, b, N, "fused")  # k = N: every entry is a candidate
        cols = torch.where(c.keys != c.absent, c.idx.long(), N)  # absent slots (narrow last tile) to a spare column
        got = torch.zeros(B, N + 1, device=DEV).scatter(1, cols, common.keys_to_values(c.keys, torch.float32))[:, :N]
        dense = torch.relu(dense)
    else:
        c = topk.Candidates(B, N, N, torch.float16, DEV)
        rows = torch.arange(B, device=DEV).repeat_interleave(2)
        tiles = torch.tensor([0, 1] * B, dtype=torch.int32, device=DEV)  # tile 1 holds latents 16..19
        keys, cols = topk.recompute_gemm(x, W, b, c)(rows, tiles, 16)
        cols = torch.where(keys != c.absent, cols.long(), N)  # absent slots (narrow tile) to a spare column
        got = torch.zeros(B, N + 1, device=DEV)
        got.view(-1).scatter_(0, (rows.unsqueeze(1) * (N + 1) + cols).reshape(-1),
                              common.keys_to_values(keys, torch.float32).reshape(-1))
        got, dense = got[:, :N], torch.relu(dense)
    torch.testing.assert_close(got, dense, atol=2e-2, rtol=2e-2)


def check_d_sae_2_20_backward_addressing():
    """The realistic case: ``W_enc [2304, 2^20]`` fp16 (4.5 GiB, untouched but for 64 latents), the encoder
    backward's ``gather_sum(grad, idx, W_enc.t())`` and an SDDMM through ``W_enc.t()`` as a tied ``W_dec``,
    at the last 64 latents, where ``d * 2^20`` passes 2^31 for every d >= 2048."""
    decode, *_ = ops()
    d_in, d_sae = 2304, 2**20
    W_enc = torch.empty(d_in, d_sae, dtype=torch.float16, device=DEV)
    lat = torch.arange(d_sae - 64, d_sae, device=DEV)
    cols = (torch.randn(d_in, 64, device=DEV) / 48).half()
    W_enc[:, d_sae - 64:] = cols
    B, K = 4, 16
    idx = lat[torch.randint(0, 64, (B, K), device=DEV)]
    g = torch.randn(B, K, device=DEV)
    dense = cols.float().t()  # [64, d_in]: the rows of W_enc.t() at `lat`
    local = idx - (d_sae - 64)
    got = decode.gather_sum(g, idx, W_enc.t())
    torch.testing.assert_close(got.float(), torch.einsum("bk,bkd->bd", g, dense[local]), atol=2e-2, rtol=2e-2)
    gx = torch.randn(B, d_in, device=DEV)
    got = decode.sddmm(gx, idx, W_enc.t())
    torch.testing.assert_close(got.float(), torch.einsum("bd,bkd->bk", gx, dense[local]), atol=5e-2, rtol=2e-2)


CHECKS = {
    "gather_sum": check_gather_sum_through_a_stride_past_2_31,
    "sddmm": check_sddmm_with_a_strided_W_dec_past_2_31,
    "encoder_jumprelu": lambda: check_encoder_tile_with_a_strided_W_enc_past_2_31("jumprelu"),
    "encoder_topk": lambda: check_encoder_tile_with_a_strided_W_enc_past_2_31("topk"),
    "encoder_repair": lambda: check_encoder_tile_with_a_strided_W_enc_past_2_31("repair"),
    "d_sae_2_20": check_d_sae_2_20_backward_addressing,
}


def _child(names):
    """Run the checks in this (child) process, one JSON line per outcome."""
    torch.manual_seed(0)
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        try:
            CHECKS[name]()
            out = {"name": name, "ok": True}
        except Exception as e:  # reported to the parent test
            out = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        print(json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def outcomes():
    """Every check's outcome from one child process (a crash is the outcome of the check it crashed in)."""
    cmd = [sys.executable, os.path.abspath(__file__), *CHECKS]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    got, started = {}, None
    for line in p.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if "start" in d:
            started = d["start"]
        else:
            got[d["name"]] = d
            started = None
    if started is not None:
        got[started] = {"ok": False, "error": f"the child process died in this check (exit {p.returncode}): "
                                              f"{p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else ''}"}
    return got


@pytest.mark.parametrize("name", [n for n in CHECKS if n != "d_sae_2_20"])
def test_offsets_past_2_31(outcomes, name):
    d = outcomes.get(name, {"ok": False, "error": "not run (the child died earlier)"})
    assert d["ok"], d["error"]


@pytest.mark.slow
def test_d_sae_2_20_backward_addressing(outcomes):
    d = outcomes.get("d_sae_2_20", {"ok": False, "error": "not run (the child died earlier)"})
    assert d["ok"], d["error"]


# ------------------------------------------------------------------------------------------
# Grid limits
# ------------------------------------------------------------------------------------------


def test_every_grid_fits_cuda_limits_at_d_sae_2_24(monkeypatch):
    """Every kernel launch of a training step (all providers, dtypes, configs) at d_sae = 2^24, L0 4096."""
    from fastsae.ops import encode, triton_compile
    from fastsae.ops.triton_common import GRID_LIMITS

    monkeypatch.setattr(encode, "SLAB_BYTES", 2**40)  # one slab as wide as d_sae: the largest slab grid

    variants = triton_compile.launch_matrix(dtypes=("bfloat16", "float64"), sizes=dict(d_sae=2**24, cap=4096))
    assert {v.kernel for v in variants} >= {"_encode_jumprelu_kernel", "_dense_topk_kernel", "_sddmm_kernel",
                                             "_jumprelu_fwd_kernel", "_segment_kernel", "_repair_kernel"}
    for v in variants:
        for grid in v.launch.grids():
            assert all(n <= lim for n, lim in zip(grid, GRID_LIMITS)), (v.kernel, v.site, grid)


def test_a_grid_past_the_limits_is_refused_before_launch():
    *_, common = ops()
    from fastsae.ops import decode

    with pytest.raises(ValueError, match="exceeds CUDA's limit"):
        decode._gather_rows._check_grid(lambda m: (4, 70000), [dict(BLOCK_D=32)])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _child(sys.argv[1:])
