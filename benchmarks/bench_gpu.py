"""One SAE training step (forward + backward) on a CUDA GPU: the ``triton`` backend against eager,
``torch.compile(eager)`` and (TopK, if installed) EleutherAI sparsify's fused-encoder + Triton-decoder path.

    python benchmarks/bench_gpu.py                       # d_in 2304, batch 4096, d_sae 16384 and 65536, bf16
    python benchmarks/bench_gpu.py --dtype float32 --d-sae 16384
    python benchmarks/bench_gpu.py --d-sae 65536 --write-table   # also store the encoder provider choice
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke   # no GPU: run every code path at toy sizes on CPU
    python benchmarks/bench_gpu.py --crossover --d-sae 16384     # the triton row of fastsae.dispatch.CROSSOVERS

What it does, in order:
1. Refuses politely without CUDA (unless ``--smoke`` under ``TRITON_INTERPRET=1``).
2. Checks correctness on the device: every triton op and the three fused SAE steps against the eager
   reference in float32 at small odd sizes (TF32 off), then the benchmark-size bf16 step against an
   float32 eager step (relative errors printed). Any failure stops the run before timing.
3. Times one training step per architecture with ``triton.testing.do_bench`` (median, ms):
   JumpReLU at L0 ≈ ``--l0`` (θ set per latent from the batch's quantiles, ε = 1e-3, inputs with
   E‖x‖² = 1), TopK and BatchTopK at k = ``--k``. Providers: eager, compiled eager, triton
   (and sparsify for TopK). Peak memory is ``max_memory_allocated`` during one step above the level
   before it. The encoder is timed alone: both providers — the fused Triton GEMM (compaction / top-k
   in its epilogue) and cuBLAS slabs (``torch.addmm`` per bounded column slab + a Triton compaction
   kernel) — against a bare ``torch.matmul`` of the same shape, in TFLOP/s.
4. Writes ``benchmarks/results/<gpu-name>/bench_gpu.md`` and ``.csv`` (device, versions, command) and
   ``encoder_table.json``: the faster provider per (arch, B, d_in, d_sae, dtype). ``--write-table`` also
   merges it into ``fastsae/ops/encoder_table.json``, which ``encode.encoder_plan`` reads.

The triton provider is the fused kernels (``set_crossover("sparse", backend="triton")``): the backend's dense
formulation is eager's, timed as eager. ``--crossover`` instead times each architecture's triton step forced
sparse and forced dense over a sweep of densities (SAEs set up as ``bench_cpu_crossover.py`` does), prints the
table and the measured ``("triton", "cuda-sm<xy>")`` row for ``CROSSOVERS``, and writes
``benchmarks/results/<gpu-name>/crossover.md``.

Targets (from the issue): JumpReLU step >= 3x eager and >= 2x compiled, peak memory <= 1/3 of eager;
TopK step >= 1.3x sparsify; fused encoder within 1.25x of the bare GEMM. The table says which are met.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import os
import platform
import re
import statistics
import sys
import time

import torch

import fastsae
from fastsae import reference as ref

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------


def bench_ms(fn, device, warmup_ms=100, rep_ms=500) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # smoke mode: wall clock, median of a few
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------------------------
# problem set-up
# ----------------------------------------------------------------------------------------------


def make_params(d_in, d_sae, batch, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g)
    x = x / x.pow(2).sum(-1).mean().sqrt()  # E‖x‖² = 1, the paper's scale for ε = 1e-3
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t().contiguous() + 0.01 * torch.randn(d_in, d_sae, generator=g)
    b_enc = 0.01 * torch.randn(d_sae, generator=g)
    b_dec = 0.01 * torch.randn(d_in, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return x.to(device=device, dtype=dtype), cast(W_enc), cast(b_enc), cast(W_dec), cast(b_dec)


def thresholds_for_l0(x, W_enc, b_enc, l0):
    """Per-latent θ so that each latent fires on a fraction l0/d_sae of the batch: L0 ≈ l0 per row."""
    with torch.no_grad():
        pre = (x @ W_enc + b_enc).float()
        B, N = pre.shape
        keep = max(1, round(B * l0 / N))
        # midway between two order statistics, so no pre-activation sits exactly on θ (a GEMM's last
        # bit would then decide H(pre - θ), and eager and fused encoders would disagree by design)
        lo = pre.kthvalue(B - keep, dim=0).values
        hi = pre.kthvalue(B - keep + 1, dim=0).values
        return (0.5 * (lo + hi)).clamp_min(0).contiguous().requires_grad_()


def zero_grads(ps):
    for p in ps:
        p.grad = None


# ----------------------------------------------------------------------------------------------
# sparsify baseline (only if installed): its fused encoder + its decoder_impl, adapted by signature
# ----------------------------------------------------------------------------------------------


def sparsify_topk_loss(W_dec_ref):
    try:
        from sparsify.fused_encoder import fused_encoder
        from sparsify.utils import decoder_impl
    except Exception as e:  # not installed / incompatible: a skipped row, said so in the table
        return None, f"sparsify not importable ({type(e).__name__})"
    takes_activation = "activation" in inspect.signature(fused_encoder).parameters

    def encode(x_in, W_enc_t, b_enc, k):
        out = fused_encoder(x_in, W_enc_t, b_enc, k, "topk") if takes_activation else fused_encoder(x_in, W_enc_t, b_enc, k)
        return out[0], out[1]

    # Versions differ in the decoder's weight layout: pick the one that reproduces the reference.
    def pick_layout():
        v = torch.randn(3, 2, device=W_dec_ref.device, dtype=W_dec_ref.dtype)
        i = torch.randint(0, W_dec_ref.shape[0], (3, 2), device=W_dec_ref.device)
        want = ref.sparse_decode(v.float(), i, W_dec_ref.detach().float())
        for layout in ("mT", "rows"):
            try:
                W = W_dec_ref.detach().mT if layout == "mT" else W_dec_ref.detach()
                got = decoder_impl(i, v, W)
                if got.shape == want.shape and torch.allclose(got.float(), want, atol=5e-2, rtol=5e-2):
                    return layout
            except Exception:
                continue
        return None

    layout = pick_layout()
    if layout is None:
        return None, "sparsify decoder_impl did not match the reference in either weight layout"

    def loss(x, W_enc_t, b_enc, W_dec, b_dec, k):
        vals, idx = encode(x - b_dec, W_enc_t, b_enc, k)
        W = W_dec.mT if layout == "mT" else W_dec
        x_hat = decoder_impl(idx, vals.to(W_dec.dtype), W) + b_dec
        return ref.mse(x_hat, x)

    return loss, "sparsify fused_encoder + decoder_impl"


# ----------------------------------------------------------------------------------------------
# correctness on the device
# ----------------------------------------------------------------------------------------------


def check_correctness(device, small=False) -> list[str]:
    """Every triton path against eager at small odd sizes, float32, TF32 off. Returns failures."""
    from fastsae.dispatch import get

    failures = []
    matmul = torch.backends.cuda.matmul
    # the fp32_precision API: setting or reading the legacy allow_tf32 raises once it was used (torch >= 2.9)
    prev = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        tri, eag = get("triton", device), get("eager", device)
        torch.manual_seed(0)
        B, d_in, N, k = (13, 20, 41, 5) if small else (37, 45, 301, 7)
        x = torch.randn(B, d_in, device=device)
        W_enc = (torch.randn(d_in, N, device=device) / d_in**0.5).requires_grad_()
        b_enc = (0.1 * torch.randn(N, device=device)).requires_grad_()
        W_dec = torch.randn(N, d_in, device=device).requires_grad_()
        b_dec = (0.1 * torch.randn(d_in, device=device)).requires_grad_()
        theta = (0.3 * torch.rand(N, device=device)).requires_grad_()
        eps = 0.05 + 0.2 * torch.rand(N, device=device)
        params = [W_enc, b_enc, W_dec, b_dec]
        r_mag = (0.3 * torch.randn(N, device=device)).requires_grad_()
        b_mag = (0.1 * torch.randn(N, device=device)).requires_grad_()
        cases = {
            "jumprelu_sae": (lambda be, a: be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, a),
                             params + [theta]),
            "jumprelu_sae(ste, values)": (lambda be, a: be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, a,
                                                                       ste_to_input=True, need_values=True),
                                          params + [theta]),
            "topk_sae": (lambda be, a: be.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, a), params),
            "batchtopk_sae": (lambda be, a: be.batchtopk_sae(x, W_enc, b_enc, W_dec, b_dec, k, a), params),
            "relu_sae": (lambda be, a: be.relu_sae(x, W_enc, b_enc, W_dec, b_dec, a), params),
            "gated_sae": (lambda be, a: be.gated_sae(x, W_enc, b_enc, r_mag, b_mag, W_dec, b_dec, a),
                          params + [r_mag, b_mag]),
        }
        for name, (fn, ps) in cases.items():
            for apply_b_dec in (False, True):
                outs = []
                for be in (eag, tri):
                    out = fn(be, apply_b_dec)
                    loss = ref.mse(out.x_hat, x) + 0.3 * out.l0.mean()
                    for extra in (out.sparsity, out.aux):
                        loss = loss if extra is None else loss + 0.3 * extra.mean()
                    if "values" in name:  # the tanh penalty on the code (eager's values are always there)
                        loss = loss + ref.tanh_sparsity(out.values, out.indices, W_dec, 1.5, B)
                    outs.append((out, torch.autograd.grad(loss, ps, allow_unused=True)))
                (oe, ge), (ot, gt) = outs
                try:
                    torch.testing.assert_close(ot.x_hat, oe.x_hat, atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(ot.l0, oe.l0)
                    assert torch.equal(ot.fired, oe.fired), "fired"
                    for a, e in zip(gt, ge):
                        if e is not None:
                            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
                except AssertionError as err:
                    failures.append(f"{name}(apply_b_dec={apply_b_dec}): {str(err).splitlines()[0]}")
        # the functional ops
        pre = torch.randn(B, N, device=device, requires_grad=True)
        for fname in ("jumprelu", "step"):
            got = getattr(tri, fname)(pre, theta, eps)
            want = getattr(eag, fname)(pre, theta, eps)
            g = torch.randn_like(got)
            try:
                torch.testing.assert_close(got, want)
                for a, e in zip(torch.autograd.grad(got, [pre, theta], g), torch.autograd.grad(want, [pre, theta], g)):
                    torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
            except AssertionError as err:
                failures.append(f"{fname}: {str(err).splitlines()[0]}")
        v, i = tri.topk(pre, 2 * k)
        rv, ri = torch.topk(pre, 2 * k)
        if not torch.equal(v, rv):
            failures.append("topk values")
        vals = torch.randn(B, k, device=device, requires_grad=True)
        idx = torch.randint(0, N, (B, k), device=device)
        got, want = tri.sparse_decode(vals, idx, W_dec, b_dec), eag.sparse_decode(vals, idx, W_dec, b_dec)
        g = torch.randn_like(got)
        try:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for a, e in zip(torch.autograd.grad(got, [vals, W_dec], g), torch.autograd.grad(want, [vals, W_dec], g)):
                torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
        except AssertionError as err:
            failures.append(f"sparse_decode: {str(err).splitlines()[0]}")
    finally:
        matmul.fp32_precision = prev
    return failures


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def run(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("bench_gpu.py needs a CUDA GPU (none found here); nothing was timed.\n"
              "On a machine without one, `TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke` runs every "
              "code path at toy sizes on CPU.")
        return 0
    if "triton" not in fastsae.backends():
        import importlib

        print(f"the triton backend is unavailable here: {importlib.import_module('fastsae.backends').status()['triton'][1]}")
        return 1
    from fastsae.dispatch import get, set_crossover
    from fastsae.ops import encode as enc
    from fastsae.ops.topk import recompute_gemm, select_rows

    if args.crossover:
        return crossover_sweep(args, device)
    # the fused kernels, whatever the density: the backend's dense formulation is eager's, timed as "eager"
    set_crossover("sparse", backend="triton")
    if args.smoke:
        args.d_in, args.d_sae, args.batch, args.l0, args.k = 24, [70], 33, 4, 4
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-interpreter-{platform.machine()}"
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    print(f"device: {gpu}   torch {torch.__version__}   triton {__import__('triton').__version__}   dtype {dtype}")

    print("checking correctness on the device ...", flush=True)
    failures = check_correctness(device, small=args.smoke)
    if failures:
        print("CORRECTNESS FAILURES (no timing):\n  " + "\n  ".join(failures))
        return 1
    print("  all triton ops and fused steps match eager (float32, TF32 off)")

    tri = get("triton", device)
    rows, table = [], []
    lam = 1e-3
    for d_sae in args.d_sae:
        x, W_enc, b_enc, W_dec, b_dec = make_params(args.d_in, d_sae, args.batch, dtype, device)
        theta = thresholds_for_l0(x, W_enc, b_enc, args.l0)
        eps = torch.full((d_sae,), 1e-3, device=device)
        ps = [W_enc, b_enc, W_dec, b_dec, theta]
        shape = f"B={args.batch} d_in={args.d_in} d_sae={d_sae}"

        # --- JumpReLU ------------------------------------------------------------------
        def jr_eager():
            return ref.jumprelu_loss(x, W_enc, b_enc, W_dec, b_dec, theta, eps, lam)["loss"]

        def jr_triton():
            out = tri.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
            return ref.mse(out.x_hat, x) + lam * out.l0.mean()

        # benchmark-size accuracy: bf16 triton vs float32 eager (the reference in full precision)
        with torch.no_grad():
            out_t = tri.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
        l0 = float(out_t.l0.mean())
        loss_t = jr_triton()
        gt = torch.autograd.grad(loss_t, ps)
        p32 = [p.detach().float().requires_grad_() for p in ps]
        loss_e = ref.jumprelu_loss(x.float(), *p32[:4], p32[4], eps, lam)["loss"]
        ge = torch.autograd.grad(loss_e, p32)
        errs = {n: rel_err(a, e) for n, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec", "theta"], gt, ge)}
        print(f"[jumprelu {shape}] L0={l0:.1f}  rel. err vs float32 eager: loss {rel_err(loss_t.detach(), loss_e.detach()):.2e} "
              + " ".join(f"{n} {v:.1e}" for n, v in errs.items()))
        del gt, ge, p32

        compile_backend = "inductor" if device.type == "cuda" else "aot_eager"  # smoke: no C++ toolchain needed
        compiled_jr = torch.compile(jr_eager, backend=compile_backend)
        providers = {"eager": jr_eager, "compile": compiled_jr, "triton": jr_triton}
        res = {}
        for name, lf in providers.items():
            step = (lambda lf=lf: (zero_grads(ps), lf().backward()))
            try:
                res[name] = (bench_ms(step, device), peak_mib(step, device))
            except Exception as e:  # e.g. out of memory for eager at the largest size: say so, keep going
                res[name] = (float("nan"), float("nan"))
                print(f"  {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            zero_grads(ps)
            torch.cuda.empty_cache() if device.type == "cuda" else None
        rows.append(dict(arch="jumprelu", shape=shape, l0_or_k=f"L0={l0:.1f}", **_row(res, "triton")))

        # --- TopK / BatchTopK -------------------------------------------------------------
        for arch in ("topk", "batchtopk"):
            ps4 = ps[:4]
            fwd = ref.topk_sae_forward if arch == "topk" else ref.batchtopk_sae_forward
            tri_fwd = tri.topk_sae if arch == "topk" else tri.batchtopk_sae

            def tk_eager(fwd=fwd):
                return ref.mse(fwd(x, W_enc, b_enc, W_dec, b_dec, args.k, True).x_hat, x)

            def tk_triton(tri_fwd=tri_fwd):
                return ref.mse(tri_fwd(x, W_enc, b_enc, W_dec, b_dec, args.k, True).x_hat, x)

            providers = {"eager": tk_eager, "compile": torch.compile(tk_eager, backend=compile_backend), "triton": tk_triton}
            note = ""
            if arch == "topk":
                sp_loss, note = sparsify_topk_loss(W_dec)
                if sp_loss is not None:
                    W_enc_t = W_enc.detach().t().contiguous().requires_grad_()
                    ps4 = ps4 + [W_enc_t]
                    providers["sparsify"] = lambda: sp_loss(x, W_enc_t, b_enc, W_dec, b_dec, args.k)
                else:
                    print(f"  sparsify baseline skipped: {note}")
            res = {}
            for name, lf in providers.items():
                step = (lambda lf=lf: (zero_grads(ps4), lf().backward()))
                try:
                    res[name] = (bench_ms(step, device), peak_mib(step, device))
                except Exception as e:
                    res[name] = (float("nan"), float("nan"))
                    print(f"  {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                zero_grads(ps4)
            rows.append(dict(arch=arch, shape=shape, l0_or_k=f"k={args.k}", sparsify_note=note, **_row(res, "triton")))

        # --- the encoder alone: both providers against a bare matmul -----------------------------------
        flops = 2.0 * args.batch * args.d_in * d_sae
        with torch.no_grad():
            Wd, bd, th = W_enc.detach(), b_enc.detach(), theta.detach()
            t_mm = bench_ms(lambda: torch.matmul(x, Wd), device)
            timed = [("torch.matmul", None, None, t_mm)]
            for provider in enc.PROVIDERS:
                t_jr = bench_ms(lambda: enc.encode_jumprelu(x, Wd, bd, th, eps, provider), device)
                cap = enc._capacity_hint[(args.batch, d_sae)]
                t_jr_lists = bench_ms(lambda: enc.jumprelu_lists(x, Wd, bd, th, eps, cap, provider), device)
                t_tk_cand = bench_ms(lambda: enc.topk_candidates(x, Wd, bd, args.k, provider), device)

                def topk_full(provider=provider):
                    c = enc.topk_candidates(x, Wd, bd, args.k, provider)
                    return select_rows(c, args.k, recompute_gemm(x, Wd, bd, c))

                t_tk = bench_ms(topk_full, device)
                timed += [(f"{provider}: jumprelu lists (one pass)", provider, "jumprelu", t_jr_lists),
                          (f"{provider}: jumprelu encoder op (with capacity check, sort)", provider, None, t_jr),
                          (f"{provider}: topk candidates", provider, None, t_tk_cand),
                          (f"{provider}: topk exact selection", provider, "topk", t_tk)]
        for name, provider, arch, t in timed:
            rows.append(dict(arch="encoder GEMM", shape=shape, l0_or_k=name, ms=t, tflops=flops / t / 1e9,
                             vs_matmul=t / t_mm, provider=provider or "", table_arch=arch or ""))
        for arch in ("jumprelu", "topk"):
            ts = {r["provider"]: r["ms"] for r in rows if r.get("table_arch") == arch and r["shape"] == shape}
            if len(ts) == 2:
                table.append(dict(device=gpu, dtype=str(dtype).removeprefix("torch."), arch=arch, B=args.batch,
                                  d_in=args.d_in, d_sae=d_sae, fused_ms=ts["fused"], slab_ms=ts["slab"],
                                  best=min(ts, key=ts.get)))
        torch.cuda.empty_cache() if device.type == "cuda" else None

    write_results(rows, gpu, dtype, args)
    write_table(table, gpu, args)
    return 0


def write_table(table, gpu, args):
    """The measured provider choice: ``results/<gpu>/encoder_table.json``; merged into the package's table
    (``fastsae/ops/encoder_table.json``, read by ``encode.encoder_plan``) with ``--write-table``."""
    import json

    from fastsae.ops import encode as enc

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu).strip("_")
    out_dir = os.path.join(HERE, "results", safe)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "encoder_table.json"), "w") as f:
        json.dump({"entries": table}, f, indent=1)
    for e in table:
        print(f"encoder provider for {e['arch']} B={e['B']} d_sae={e['d_sae']}: {e['best']} "
              f"(fused {e['fused_ms']:.3g} ms, slab {e['slab_ms']:.3g} ms)")
    if args.write_table and not args.smoke:
        try:
            with open(enc.TABLE_PATH) as f:
                entries = json.load(f).get("entries", [])
        except (OSError, ValueError):
            entries = []
        same = lambda a, b: all(a[k] == b[k] for k in ("device", "dtype", "arch", "B", "d_in", "d_sae"))  # noqa: E731
        entries = [e for e in entries if not any(same(e, t) for t in table)] + table
        with open(enc.TABLE_PATH, "w") as f:
            json.dump({"entries": entries}, f, indent=1)
        print(f"merged {len(table)} entries into {enc.TABLE_PATH}")


def _row(res, mine):
    out = {}
    for name, (ms, mib) in res.items():
        out[f"{name}_ms"] = ms
        out[f"{name}_MiB"] = mib
    t = res[mine][0]
    for name, (ms, mib) in res.items():
        if name != mine:
            out[f"speedup_vs_{name}"] = ms / t if t == t and t > 0 else float("nan")
            out[f"mem_vs_{name}"] = res[mine][1] / mib if mib == mib and mib > 0 else float("nan")
    return out


def _fmt(v):
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_results(rows, gpu, dtype, args):
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu).strip("_")
    out_dir = os.path.join(HERE, "results", safe)
    os.makedirs(out_dir, exist_ok=True)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(os.path.join(out_dir, "bench_gpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "dtype"] + keys)
        w.writeheader()
        for r in rows:
            w.writerow({"device": gpu, "dtype": str(dtype).removeprefix("torch."), **r})
    smoke = ["**Smoke run through the Triton interpreter on CPU: it checks the script, the timings mean nothing.**", ""] \
        if args.smoke else []
    lines = [f"# One SAE training step on {gpu}", ""] + smoke + [
             f"`{' '.join(['python', 'benchmarks/bench_gpu.py'] + sys.argv[1:])}` — "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, dtype {dtype}; medians of `triton.testing.do_bench` (ms); "
             "peak = max_memory_allocated during one step above the level before it.", ""]
    step_rows = [r for r in rows if r["arch"] != "encoder GEMM"]
    cols = [k for k in keys if k.endswith("_ms") or k.endswith("_MiB") or k.startswith("speedup") or k.startswith("mem_vs")]
    lines += ["| arch | shape | sparsity | " + " | ".join(cols) + " | targets |",
              "|" + "---|" * (len(cols) + 4)]
    for r in step_rows:
        lines.append(f"| {r['arch']} | {r['shape']} | {r['l0_or_k']} | " + " | ".join(_fmt(r.get(c, float('nan'))) for c in cols)
                     + f" | {_targets(r)} |")
    lines += ["", "| encoder (provider: what) | shape | ms | TFLOP/s | time vs torch.matmul |", "|---|---|---|---|---|"]
    for r in rows:
        if r["arch"] == "encoder GEMM":
            lines.append(f"| {r['l0_or_k']} | {r['shape']} | {_fmt(r['ms'])} | {_fmt(r['tflops'])} | {_fmt(r['vs_matmul'])} |")
    lines += ["", "Targets: JumpReLU >= 3x eager, >= 2x compile, peak <= 1/3 eager; TopK >= 1.3x sparsify; "
              "encoder (either provider's one pass) <= 1.25x torch.matmul."]
    notes = {r.get("sparsify_note") for r in rows if r.get("sparsify_note")}
    lines += [f"TopK baseline: {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "bench_gpu.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out_dir}/bench_gpu.md and bench_gpu.csv")


def _targets(r):
    got = []
    if r["arch"] == "jumprelu":
        got.append(f"3x eager: {'met' if r.get('speedup_vs_eager', 0) >= 3 else 'NOT met'}")
        got.append(f"2x compile: {'met' if r.get('speedup_vs_compile', 0) >= 2 else 'NOT met'}")
        got.append(f"mem <= 1/3: {'met' if r.get('mem_vs_eager', 9) <= 1 / 3 else 'NOT met'}")
    if r["arch"] == "topk" and "speedup_vs_sparsify" in r:
        got.append(f"1.3x sparsify: {'met' if r['speedup_vs_sparsify'] >= 1.3 else 'NOT met'}")
    return "; ".join(got)


def crossover_sweep(args, device) -> int:
    """Each architecture's triton step forced sparse and forced dense, by density: the measured crossover row."""
    from bench_cpu_common import build
    from bench_cpu_crossover import ARCHS, DENSITIES, crossover
    from fastsae.dispatch import device_kind, override_crossover

    if args.smoke:
        args.d_in, args.d_sae, args.batch = 24, [70], 33
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    d_sae = args.d_sae[0]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-interpreter-{platform.machine()}"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, args.d_in, generator=g)
    x = (x / x.pow(2).sum(-1).mean().sqrt()).to(device)  # E‖x‖² = 1
    densities = DENSITIES[:4] if args.smoke else DENSITIES

    def step(sae, xx, mode):
        def run():
            for p in sae.parameters():
                p.grad = None
            with override_crossover(mode, backend="triton"):
                sae.training_forward(xx).loss.backward()
        return run

    header = "| arch | density | dense ms | sparse ms | sparse/dense | dense peak MiB | sparse peak MiB |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    print(f"device: {gpu}   dtype {dtype}   B={args.batch} d_in={args.d_in} d_sae={d_sae}\n" + "\n".join(lines))
    rows = []
    for arch in ARCHS:
        for target in densities:
            k = max(1, round(target * d_sae))
            sae = build(arch, "triton", args.d_in, d_sae, x, target, k, dtype=dtype)
            xx = x.to(dtype)
            step(sae, xx, "sparse")()
            tri = sae.ops()
            density = (sae.k if arch in ("topk", "batchtopk") else tri.density.last(sae.W_enc)) / d_sae
            t = {m: bench_ms(step(sae, xx, m), device) for m in ("dense", "sparse")}
            mem = {m: peak_mib(step(sae, xx, m), device) for m in ("dense", "sparse")}
            rows.append(dict(arch=arch, density=density, dense=t["dense"], sparse=t["sparse"]))
            line = (f"| {arch} | {density:.4f} | {t['dense']:.2f} | {t['sparse']:.2f} | {t['sparse'] / t['dense']:.2f} | "
                    f"{mem['dense']:.0f} | {mem['sparse']:.0f} |")
            lines.append(line)
            print(line, flush=True)
            del sae
    found = {a: crossover([r for r in rows if r["arch"] == a]) for a in ARCHS}
    row = f'    ("triton", "{device_kind(device)}"): dict(' + ", ".join(f"{a}={v:.3g}" for a, v in found.items()) + "),"
    print("\nmeasured crossovers (paste into fastsae/dispatch.py CROSSOVERS):\n" + row)
    out = os.path.join(HERE, "results", re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu).strip("_"))  # as write_results
    os.makedirs(out, exist_ok=True)
    cmd = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])
    with open(os.path.join(out, "crossover.md"), "w") as f:
        f.write(f"# Sparse vs dense triton training step, by density\n\n`{cmd}` — {gpu}, torch {torch.__version__}, "
                f"{dtype}, B={args.batch} d_in={args.d_in} d_sae={d_sae}; medians of triton.testing.do_bench, peak "
                f"memory above the level before a step.\n\n" + "\n".join(lines) + f"\n\n```\n{row}\n```\n")
    print(f"wrote {out}/crossover.md")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l0", type=float, default=64)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--smoke", action="store_true", help="toy sizes; on CPU needs TRITON_INTERPRET=1")
    p.add_argument("--crossover", action="store_true",
                   help="measure the triton crossover row of fastsae.dispatch.CROSSOVERS (first --d-sae)")
    p.add_argument("--write-table", action="store_true",
                   help="merge the measured encoder provider choice into fastsae/ops/encoder_table.json")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
