"""What only a GPU can show about the Triton backend, in one run that fits a borrowed H100/H200's 15 minutes.

    python benchmarks/gpu_probe.py                               # (a)-(d), then bench_gpu.py --d-sae 65536
    python benchmarks/gpu_probe.py --skip-bench                  # (a)-(d) only (~5 min cold)
    TRITON_INTERPRET=1 python benchmarks/gpu_probe.py --smoke    # no GPU: every stage at toy sizes on CPU

Stages, in order (each prints PASS/FAIL lines; the first failing check does not stop the others):

(a) Every autotune config of every encoder and decoder kernel, forced one at a time, at the benchmark
    size (B 4096, d_in 2304, d_sae 16384, bf16) against a float64 reference: every (row, latent) pair
    of every list unique, list membership exact except within bf16 rounding of a decision boundary,
    values within bf16 rounding; decoders / SDDMM / segment reductions within bf16 output rounding.
(b) Each architecture's full step (JumpReLU, TopK, BatchTopK: backend forward, loss, backward; and the
    modules' ``training_forward`` with AuxK) against a float32 eager step, with asserted tolerances;
    the TopK/BatchTopK steps under ``torch.cuda.set_sync_debug_mode("error")`` (no device→host sync),
    the JumpReLU step counted (at most one).
(c) The steps with ``torch.empty`` NaN-filled (``torch.use_deterministic_algorithms(True, warn_only=True)``
    fills uninitialised memory): every output finite and equal to the unfilled run (no kernel reads
    memory it did not write), then a bit-for-bit repeat (no race).
(d) The 2^20-latent addressing case: d_sae = 2^20, d_in 2304 (offsets past 2^31 elements), a TopK and
    a JumpReLU step with ``W_enc`` contiguous and as the strided view ``W_dec.t()``, against float32 eager.
Then ``benchmarks/bench_gpu.py --d-sae 65536 --write-table`` (timings, and the encoder provider table).

Writes ``benchmarks/results/<gpu>/gpu_probe.md`` and ``gpu_probe.json``. Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastsae  # noqa: E402
from fastsae import reference as ref  # noqa: E402


class Probe:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.rows: list[dict] = []
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        # the interpreter has no bf16: smoke runs float32 (the float64 references are the same code)
        self.dtype = torch.bfloat16 if cuda else torch.float32
        if smoke:
            self.B, self.d_in, self.d_sae, self.k, self.l0 = 24, 20, 70, 5, 6
        else:
            self.B, self.d_in, self.d_sae, self.k, self.l0 = 4096, 2304, 16384, 64, 64
        # relative rounding of one value in the data dtype (bf16: 2^-8 half-ulp; float32 under smoke)
        self.rtol = 2.0 ** -7 if self.dtype == torch.bfloat16 else 1e-5

    def check(self, stage: str, name: str, fn):
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # a failed check is a result: record it and go on
            ok, detail = False, f"{type(e).__name__}: {str(e)[:600]}"
            if not isinstance(e, AssertionError):
                detail += "\n" + "".join(traceback.format_exc().splitlines(True)[-4:])
        dt = time.perf_counter() - t0
        self.rows.append(dict(stage=stage, name=name, ok=ok, detail=str(detail), seconds=round(dt, 2)))
        print(f"[{stage}] {'PASS' if ok else 'FAIL'} {name} ({dt:.1f}s) {detail if not ok else detail[:200]}",
              flush=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return ok

    # ------------------------------------------------------------------------------------
    # shared set-up
    # ------------------------------------------------------------------------------------
    def params(self, d_sae=None, B=None, seed=0):
        """Unit-norm decoder rows, encoder near their transpose, inputs with E‖x‖² = 1 (the paper's scale)."""
        d_sae, B = d_sae or self.d_sae, B or self.B
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(seed)  # on the device: 2^20-latent weights in seconds
        x = torch.randn(B, self.d_in, generator=g, device=dev)
        x = x / x.pow(2).sum(-1).mean().sqrt()
        W_dec = torch.randn(d_sae, self.d_in, generator=g, device=dev)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.t().contiguous().add_(torch.randn(self.d_in, d_sae, generator=g, device=dev), alpha=0.01)
        b_enc = 0.01 * torch.randn(d_sae, generator=g, device=dev)
        b_dec = 0.01 * torch.randn(self.d_in, generator=g, device=dev)
        return [t.to(self.dtype) for t in (x, W_enc, b_enc, W_dec, b_dec)]

    def thresholds(self, x, W_enc, b_enc, l0=None):
        """θ per latent midway between two order statistics of pre, so L0 ≈ l0 and no pre sits on θ."""
        l0 = l0 or self.l0
        with torch.no_grad():
            pre = (x.double() @ W_enc.double() + b_enc.double())
            B, N = pre.shape
            keep = max(1, round(B * l0 / N))
            lo = pre.kthvalue(B - keep, dim=0).values
            hi = pre.kthvalue(B - keep + 1, dim=0).values
            return (0.5 * (lo + hi)).clamp_min(0).float()

    def tol(self, ref_vals, scale):
        """Allowed |value - float64 reference|: rounding of the value plus fp32 accumulation of a d_in-long dot."""
        return self.rtol * ref_vals.abs() + 1e-5 * scale * self.d_in ** 0.5 + (1e-6 if self.smoke else 0)

    # ------------------------------------------------------------------------------------
    # (a) every config of every encoder / decoder kernel
    # ------------------------------------------------------------------------------------
    def stage_a(self):
        from fastsae.ops import decode, encode, topk
        from fastsae.ops.triton_common import TritonKernel, keys_to_values

        x, W_enc, b_enc, W_dec, b_dec = self.params()
        theta = self.thresholds(x, W_enc, b_enc)
        eps = torch.full_like(theta, 1e-3)
        pre64 = x.double() @ W_enc.double() + b_enc.double()
        scale = float(x.double().norm(dim=1).max() * W_enc.double().norm(dim=0).max())
        N, B, k = self.d_sae, self.B, self.k

        def configs(kernel):
            return [None] if self.smoke and torch.device(self.device).type != "cuda" else kernel.configs

        def check_lists(idx, pre, counts):
            # every (row, latent) unique; membership exact away from the boundaries; values within rounding
            valid = torch.arange(idx.shape[1], device=idx.device) < counts[:, None]
            key = torch.where(valid, idx.long(), N)
            s = key.sort(dim=1).values
            assert not bool(((s[:, 1:] == s[:, :-1]) & (s[:, 1:] < N)).any()), "a (row, latent) pair is listed twice"
            listed = torch.zeros(B, N + 1, dtype=torch.bool, device=idx.device).scatter_(1, key, True)[:, :N]
            u = (pre64 - theta.double()) / eps.double()
            want = (pre64 > theta.double()) | ((u > -0.5) & (u < 0.5))
            t = self.tol(pre64, scale)
            near = ((pre64 - theta.double()).abs() <= t) | ((pre64 - (theta.double() - eps.double() / 2)).abs() <= t) \
                | ((pre64 - (theta.double() + eps.double() / 2)).abs() <= t)
            wrong = (listed != want) & ~near
            assert not bool(wrong.any()), f"{int(wrong.sum())} list memberships differ beyond rounding"
            r64 = pre64.gather(1, idx.long())
            err = ((pre.double() - r64).abs() - self.tol(r64, scale)) * valid
            assert float(err.max()) <= 0, f"value off by {float(err.max()):.3g} beyond bf16 rounding"
            return f"L0 {float(counts.float().mean()):.1f}, width {idx.shape[1]}"

        def check_topk(v, i):
            s = i.sort(dim=1).values
            assert not bool((s[:, 1:] == s[:, :-1]).any()), "a row lists a latent twice"
            relu64 = pre64.clamp_min(0)
            r = relu64.gather(1, i)
            assert float(((v.double() - r).abs() - self.tol(r, scale)).max()) <= 0, "values beyond rounding"
            kth = torch.topk(relu64, k, dim=1).values[:, -1:]
            assert bool((r >= kth - 2 * self.tol(kth, scale)).all()), "a pick below the exact k-th value"

        for provider in encode.PROVIDERS:
            main = encode._encode_jumprelu if provider == "fused" else encode._compact_jumprelu
            for c in configs(main):
                def run(c=c, provider=provider, main=main):
                    with main.forced(c):
                        idx, pre, counts = encode.encode_jumprelu(x, W_enc, b_enc, theta, eps, provider)
                    return check_lists(idx, pre, counts)
                self.check("a", f"jumprelu lists, {provider}, {_cfg(c)}", run)
            main = encode._encode_topk if provider == "fused" else topk._dense_topk
            for c in configs(main):
                def run(c=c, provider=provider, main=main):
                    with main.forced(c):
                        v, i = encode.encode_topk(x, W_enc, b_enc, k, provider)
                        check_topk(v, i)
                        vals, idx, rows, row_ptr = encode.encode_batchtopk(x, W_enc, b_enc, k, provider)
                    pair = rows.long() * N + idx.long()
                    assert pair.numel() == B * k and pair.unique().numel() == pair.numel(), "BatchTopK pair repeated"
                    r = pre64.clamp_min(0).reshape(-1)[pair]
                    assert float(((vals.double() - r).abs() - self.tol(r, scale)).max()) <= 0, "BatchTopK values"
                    cut = torch.topk(pre64.clamp_min(0).reshape(-1), B * k).values[-1]
                    assert bool((r >= cut - 2 * self.tol(cut, scale)).all()), "a BatchTopK pick below the cut"
                self.check("a", f"topk + batchtopk, {provider}, {_cfg(c)}", run)
        for c in configs(topk._repair):
            def run(c=c):
                # concentrate winners in one tile per row so the repair recomputes it
                b2 = b_enc.clone()
                b2[128:128 + k] += 10.0
                p64 = x.double() @ W_enc.double() + b2.double()
                with topk._repair.forced(c):
                    v, i = encode.encode_topk(x, W_enc, b2, k, "fused")
                r = p64.clamp_min(0).gather(1, i)
                assert float(((v.double() - r).abs() - self.tol(r, scale)).max()) <= 0
                assert bool((i.sort(1).values[:, 1:] != i.sort(1).values[:, :-1]).all())
            self.check("a", f"topk repair, {_cfg(c)}", run)

        # decoders and backward kernels on random lists
        g = torch.Generator(device=self.device).manual_seed(1)
        K = k
        idx = torch.randint(0, N, (B, K), generator=g, device=self.device)
        vals = torch.randn(B, K, generator=g, device=self.device).to(self.dtype)
        grad = torch.randn(B, self.d_in, generator=g, device=self.device).to(self.dtype)
        out_tol = 2 * self.rtol
        for c in configs(decode._gather_rows):
            def run(c=c):
                with decode._gather_rows.forced(c):
                    got = decode.gather_rows(vals, idx, W_dec, b_dec)
                want = torch.einsum("bk,bkd->bd", vals.double(), W_dec.double()[idx]) + b_dec.double()
                _close(got, want, out_tol)
            self.check("a", f"gather rows (decode), {_cfg(c)}", run)
        for c in configs(decode._sddmm):
            def run(c=c):
                with decode._sddmm.forced(c):
                    got = decode.sddmm(grad, idx, W_dec)
                want = torch.einsum("bd,bkd->bk", grad.double(), W_dec.double()[idx])
                _close(got, want, out_tol)
            self.check("a", f"SDDMM, {_cfg(c)}", run)
        for c in configs(decode._segment):
            def run(c=c):
                from fastsae.ops.triton_common import segments

                order, offsets = segments(idx, None, N)
                with decode._segment.forced(c):
                    out, _ = decode.segment_reduce(order, offsets, vals.reshape(-1), grad, K)
                want = torch.zeros(N, self.d_in, dtype=torch.float64, device=self.device).index_add_(
                    0, idx.reshape(-1), (vals.double().unsqueeze(-1) * grad.double().unsqueeze(1)).reshape(-1, self.d_in))
                _close(out, want, out_tol)
            self.check("a", f"segment reduce, {_cfg(c)}", run)
        del TritonKernel, keys_to_values

    # ------------------------------------------------------------------------------------
    # (b) full steps against float32 eager, and host syncs
    # ------------------------------------------------------------------------------------
    def steps(self, d_sae=None, B=None, strided=False):
        """(name, triton step, eager float32 step, params) per architecture; a step returns (loss, grads)."""
        from fastsae.dispatch import get

        x, W_enc, b_enc, W_dec, b_dec = self.params(d_sae, B)
        theta = self.thresholds(x, W_enc, b_enc)
        eps = torch.full_like(theta, 1e-3)
        if strided:  # W_enc as a view of W_dec (tied layout): stride_wn = d_in
            W_enc = W_dec.t()
        tri, eag = get("triton", self.device), get("eager", self.device)
        lam, k = 1e-3, self.k
        out = []
        # ReLU / Gated at JumpReLU's L0: the biases shifted by θ keep pre > θ (the gate open) where JumpReLU fires
        b_shift = (b_enc.float() - theta.detach()).to(b_enc.dtype)
        r_mag = 0.1 * torch.randn(theta.shape, device=self.device)
        b_mag = 0.01 * torch.randn(theta.shape, device=self.device)
        for arch in ("jumprelu", "topk", "batchtopk", "relu", "gated"):
            def make(be, dtype, arch=arch):
                def step():
                    ps = [t.detach().to(dtype).requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
                    th = theta.detach().clone().requires_grad_()
                    xx = x.to(dtype)
                    if arch == "jumprelu":
                        o = be.jumprelu_sae(xx, *ps, th, eps, False)
                        loss = ref.mse(o.x_hat, xx) + lam * o.l0.mean()
                        ps = ps + [th]
                    elif arch == "relu":
                        ps[1] = b_shift.detach().to(dtype).requires_grad_()
                        o = be.relu_sae(xx, *ps, False)
                        loss = ref.mse(o.x_hat, xx) + lam * o.sparsity.mean()
                    elif arch == "gated":
                        ps[1] = b_shift.detach().to(dtype).requires_grad_()
                        ps = ps[:2] + [t.detach().to(dtype).requires_grad_() for t in (r_mag, b_mag)] + ps[2:]
                        o = be.gated_sae(xx, *ps, True)
                        loss = ref.mse(o.x_hat, xx) + lam * o.sparsity.mean() + o.aux
                    else:
                        fn = be.topk_sae if arch == "topk" else be.batchtopk_sae
                        o = fn(xx, *ps, k, True)
                        loss = ref.mse(o.x_hat, xx)
                    grads = torch.autograd.grad(loss, ps)
                    return loss.detach(), [gr.detach() for gr in grads], o
                return step
            out.append((arch, make(tri, self.dtype), make(eag, torch.float32)))
        return out

    def compare(self, got, want, arch):
        (lt, gt, _), (le, ge, _) = got, want
        errs = [_rel(a, e) for a, e in zip(gt, ge)]
        names = (["W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"] if arch == "gated" else
                 ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"])[:len(errs)]
        loss_err = _rel(lt, le)
        bound = 2e-2 if self.dtype == torch.bfloat16 else 1e-4
        assert loss_err < bound, f"loss rel. err {loss_err:.2e}"
        for n, e in zip(names, errs):
            # θ's gradient counts window entries, whose membership bf16 rounding of pre can flip
            lim = (0.15 if n == "threshold" else 5e-2) if self.dtype == torch.bfloat16 else 1e-3
            assert e < lim, f"{arch} grad {n} rel. err {e:.2e} >= {lim}"
        return f"loss {loss_err:.1e} " + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs))

    def stage_b(self):
        for provider in PROVIDERS:
            with encoder_provider(provider):
                for arch, tri, eag in self.steps():
                    self.check("b", f"{arch} step ({provider}) vs float32 eager", lambda tri=tri, eag=eag, arch=arch:
                               self.compare(tri(), eag(), arch))
                    if self.device.type == "cuda":
                        expect = 1 if arch in ("jumprelu", "relu", "gated") else 0  # the lists' width
                        self.check("b", f"{arch} step ({provider}): device→host syncs <= {expect}",
                                   lambda tri=tri, expect=expect: _count_syncs(tri, expect))
        self.check("b", "modules' training_forward (AuxK, λ) vs float32 eager", self.modules)

    def modules(self):
        x, *_ = self.params(B=min(self.B, 1024))
        res = []
        for arch in ("jumprelu", "topk", "batchtopk"):
            outs = []
            for be, dtype in (("triton", self.dtype), ("eager", torch.float32)):
                torch.manual_seed(3)
                if arch == "jumprelu":
                    sae = fastsae.JumpReLUSAE(self.d_in, self.d_sae, bandwidth=0.05, threshold_init=0.05, backend=be,
                                              device=self.device)
                else:
                    cls = fastsae.TopKSAE if arch == "topk" else fastsae.BatchTopKSAE
                    sae = cls(self.d_in, self.d_sae, k=self.k, k_aux=2 * self.k, backend=be, device=self.device)
                sae = sae.to(dtype)
                dead = torch.zeros(self.d_sae, dtype=torch.bool, device=self.device)
                dead[::3] = True
                o = sae.training_forward(x.to(dtype), dead_mask=dead)
                o.loss.backward()
                outs.append((o.loss.detach().float(), {n: p.grad.float() for n, p in sae.named_parameters()}))
            (lt, gt), (le, ge) = outs
            err = max(_rel(gt[n], ge[n]) for n in ge)
            lim = 0.15 if self.dtype == torch.bfloat16 else 1e-3
            assert _rel(lt, le) < lim / 5 and err < lim, f"{arch}: loss {_rel(lt, le):.2e}, worst grad {err:.2e}"
            res.append(f"{arch} loss {_rel(lt, le):.1e} grad {err:.1e}")
        return "; ".join(res)

    # ------------------------------------------------------------------------------------
    # (c) NaN-filled torch.empty, and a bit-for-bit repeat
    # ------------------------------------------------------------------------------------
    def stage_c(self):
        for provider in PROVIDERS:
            with encoder_provider(provider):
                self._stage_c(provider)

    def _stage_c(self, provider):
        for arch, tri, _ in self.steps():
            def run(tri=tri):
                base = tri()
                with nan_filled_empty():
                    filled = tri()
                again = tri()
                for a, b in zip([base[0]] + base[1], [filled[0]] + filled[1]):
                    assert bool(torch.isfinite(b).all()), "a non-finite value: a kernel read uninitialised memory"
                    assert torch.equal(a, b), "differs with NaN-filled torch.empty"
                for a, b in zip([base[0]] + base[1], [again[0]] + again[1]):
                    assert torch.equal(a, b), "a repeat differs: a race"
                return "finite, equal, repeatable"
            self.check("c", f"{arch} step ({provider}): NaN-filled empty + bit-for-bit repeat", run)

    # ------------------------------------------------------------------------------------
    # (d) 2^20 latents
    # ------------------------------------------------------------------------------------
    def stage_d(self):
        d_sae = 2**20 if not self.smoke else 96
        B = 512 if not self.smoke else 12
        for provider in PROVIDERS:
            with encoder_provider(provider):
                for strided in (False, True):
                    for arch, tri, eag in self.steps(d_sae=d_sae, B=B, strided=strided):
                        if arch == "batchtopk":
                            continue  # the TopK kernels again (CSR decode aside, which (b) covers)
                        layout = "W_enc = W_dec.t()" if strided else "W_enc contiguous"
                        self.check("d", f"{arch} step ({provider}), d_sae {d_sae}, {layout}",
                                   lambda tri=tri, eag=eag, arch=arch: self.compare(tri(), eag(), arch))

    # ------------------------------------------------------------------------------------
    def write(self, seconds):
        gpu = torch.cuda.get_device_name() if self.device.type == "cuda" else f"cpu-interpreter-{platform.machine()}"
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu).strip("_") + ("-smoke" if self.smoke else "")
        out = os.path.join(HERE, "results", safe)
        os.makedirs(out, exist_ok=True)
        import triton

        meta = dict(device=gpu, torch=torch.__version__, triton=triton.__version__, dtype=str(self.dtype),
                    date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", seconds=round(seconds, 1),
                    command=" ".join(["python", "benchmarks/gpu_probe.py"] + sys.argv[1:]),
                    sizes=dict(B=self.B, d_in=self.d_in, d_sae=self.d_sae, k=self.k, l0=self.l0))
        with open(os.path.join(out, "gpu_probe.json"), "w") as f:
            json.dump(dict(meta=meta, checks=self.rows), f, indent=1)
        lines = [f"# GPU probe on {gpu}", ""]
        if self.smoke:
            lines += ["**Smoke run (toy sizes, Triton interpreter on CPU): it checks the script, not a GPU.**", ""]
        lines += [f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
                  f"{meta['dtype']}, {meta['seconds']} s.", "",
                  f"{sum(r['ok'] for r in self.rows)} of {len(self.rows)} checks pass.", "",
                  "| stage | check | result | detail | s |", "|---|---|---|---|---|"]
        for r in self.rows:
            detail = r["detail"].replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {r['stage']} | {r['name']} | {'PASS' if r['ok'] else 'FAIL'} | {detail} | {r['seconds']} |")
        with open(os.path.join(out, "gpu_probe.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out}/gpu_probe.md and gpu_probe.json")


PROVIDERS = ("fused", "slab")


@contextlib.contextmanager
def encoder_provider(name):
    """Every encoder call inside uses this provider (``FASTSAE_ENCODER``, read by ``encode.encoder_plan``)."""
    prev = os.environ.get("FASTSAE_ENCODER")
    os.environ["FASTSAE_ENCODER"] = name
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("FASTSAE_ENCODER", None)
        else:
            os.environ["FASTSAE_ENCODER"] = prev


def _cfg(c):
    if c is None:
        return "interpreter blocks"
    return ",".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _close(got, want, rtol):
    err = (got.double() - want).abs().max()
    lim = rtol * want.abs().max() + 1e-6
    assert float(err) <= float(lim), f"max error {float(err):.3g} > {float(lim):.3g}"


@contextlib.contextmanager
def nan_filled_empty():
    """``torch.empty`` returns NaN-filled memory while inside (deterministic mode's uninitialised-memory fill)."""
    import torch.utils.deterministic as det

    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        det.fill_uninitialized_memory = prev[2]


def _count_syncs(step, expect):
    """Run the step (already warm) with CUDA's sync debug mode warning on every synchronising call."""
    step()  # warm: autotuning and compiles sync on their first run only
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the step's own autograd.grad / loss.detach make no sync; everything counted is the backend's
    n = sum("synchroniz" in str(x.message) for x in w)
    assert n <= expect, f"{n} synchronising calls (allowed {expect}): " + "; ".join(str(x.message)[:120] for x in w[:3])
    return f"{n} synchronising call(s)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes; on CPU needs TRITON_INTERPRET=1")
    p.add_argument("--skip-bench", action="store_true", help="stop after (d)")
    p.add_argument("--stages", default="abcd", help="which of the stages a, b, c, d to run (default: all)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not (a.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        print("gpu_probe.py needs a CUDA GPU; without one run `TRITON_INTERPRET=1 python benchmarks/gpu_probe.py "
              "--smoke` (every stage at toy sizes on CPU).")
        return 0
    if "triton" not in fastsae.backends():
        print(f"the triton backend is unavailable: {fastsae.backends.__module__}")
        return 1
    from fastsae.dispatch import set_crossover

    # the probe checks the fused kernels at every size: the triton backend's dense formulation is eager's
    set_crossover("sparse", backend="triton")
    probe = Probe(a.smoke)
    t0 = time.perf_counter()
    print(f"device {probe.device} dtype {probe.dtype} sizes B={probe.B} d_in={probe.d_in} d_sae={probe.d_sae} "
          f"k={probe.k}", flush=True)
    for stage in a.stages:
        getattr(probe, f"stage_{stage}")()
    probe.write(time.perf_counter() - t0)
    failed = [r for r in probe.rows if not r["ok"]]
    print(f"{len(probe.rows) - len(failed)} of {len(probe.rows)} checks pass ({time.perf_counter() - t0:.0f} s)")
    rc = 1 if failed else 0
    if not a.skip_bench:
        cmd = [sys.executable, os.path.join(HERE, "bench_gpu.py")] + (["--smoke"] if a.smoke else
                                                                        ["--d-sae", "65536", "--write-table"])
        print("running", " ".join(cmd), flush=True)
        # the checkout this probe imported fastsae from, also when fastsae is not installed
        root = os.path.dirname(os.path.dirname(os.path.abspath(fastsae.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        rc = max(rc, subprocess.run(cmd, env=env).returncode)
    return rc


if __name__ == "__main__":
    sys.exit(main())
