"""Compile every Triton kernel of fastsae for a GPU target on a machine without one.

``launch_matrix()`` runs the real launchers (the training step's encoders, decoders and backward
kernels, in every dtype the backend launches them with) on ``meta`` tensors of the benchmark size
inside ``capture_launches(as_gpu=True)``: nothing runs, every launch is recorded with its true
arguments. ``compile_variant()`` then specialises each one exactly as Triton's JIT would at run time
(the JIT's own binder: dtypes, 16-byte alignment, divisibility of the integer arguments), compiles it
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for each autotune config it
can pick, and reads back from ``ptxas -v`` (which Triton runs) the registers and spills, from the
kernel metadata the shared memory, from the PTX whether the GEMMs use ``wgmma`` (sm_90) / ``mma.sync``
(sm_80), and from the SASS (``nvdisasm``) whether any spill sits inside a loop.

Used by ``tests/test_triton_compile.py`` (a representative subset in CI) and
``benchmarks/triton_compile_report.py`` (the whole matrix, committed under ``benchmarks/results/compile``).
Relies on two internals of Triton's JIT (``create_function_from_signature``, ``JITFunction._pack_args``),
present from 3.5 (``MIN_TRITON``) to at least 3.9.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import os
import re
import subprocess
import tempfile
import time
from typing import Optional

import torch

import triton

#: The benchmark shape the matrix is captured at (specialisations depend on the sizes' divisibility).
BENCH = dict(B=4096, d_in=2304, d_sae=16384, k=64, cap=128)
#: Dtypes the backend launches on GPUs, with the threshold dtype the modules pair them with.
DTYPES = {"bfloat16": (torch.bfloat16, torch.float32), "float16": (torch.float16, torch.float32),
          "float32": (torch.float32, torch.float32), "float64": (torch.float64, torch.float64)}
ARCHS = (90, 80)
#: Shared memory per block: H100/H200 (sm_90) 227 KB, A100 (sm_80) 163 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclasses.dataclass
class Variant:
    """One launch site of one kernel in one dtype: its captured ``Launch`` and a readable name."""

    kernel: str
    site: str
    dtype: str
    launch: object

    @property
    def constexprs(self) -> dict:
        return {k: v for k, v in self.launch.kwargs.items()}

    def configs(self) -> list:
        return self.launch.kernel.candidate_configs(self.launch.named_args())


@contextlib.contextmanager
def _tf32():
    matmul = torch.backends.cuda.matmul
    prev = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = prev


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launch_matrix(dtypes=tuple(DTYPES), sizes=None) -> list[Variant]:
    """Every (kernel, launch site, dtype) the backend launches, captured at the benchmark size."""
    from . import decode, encode, jumprelu, topk
    from .triton_common import capture_launches

    with capture_launches(as_gpu=True):  # GPU geometry also for what is built outside the launches
        return _launch_matrix(dtypes, dict(BENCH, **(sizes or {})))


def _launch_matrix(dtypes, s) -> list[Variant]:
    from . import decode, encode, jumprelu, topk
    from .triton_common import capture_launches

    B, D, N, k, cap = s["B"], s["d_in"], s["d_sae"], s["k"], s["cap"]
    out: list[Variant] = []

    def record(site, dt, fn):
        with capture_launches(as_gpu=True) as got:
            fn()
        seen = set()
        for launch in got:  # a kernel launched again at one site (the next cuBLAS slab) is the same variant
            if launch.kernel.name not in seen:
                seen.add(launch.kernel.name)
                out.append(Variant(launch.kernel.name, site, dt, launch))

    for dt in dtypes:
        dtype, wide = DTYPES[dt]
        x, W_enc, b_enc = _meta(B, D, dtype=dtype), _meta(D, N, dtype=dtype), _meta(N, dtype=dtype)
        W_dec, b_dec = _meta(N, D, dtype=dtype), _meta(D, dtype=dtype)
        theta, eps = _meta(N, dtype=wide), _meta(N, dtype=wide)
        idx = _meta(B, cap, dtype=torch.int32)
        counts = _meta(B, dtype=torch.int32)
        pre_c = _meta(B, cap, dtype=dtype)
        g = _meta(B, D, dtype=dtype)
        nnz = B * k
        flat_v, flat_i = _meta(nnz, dtype=dtype), _meta(nnz, dtype=torch.int32)
        rows, row_ptr = _meta(nnz, dtype=torch.int32), _meta(B + 1, dtype=torch.int64)
        order, offsets = _meta(nnz, dtype=torch.int64), _meta(N + 1, dtype=torch.int64)
        vk, ik = _meta(B, k, dtype=dtype), _meta(B, k, dtype=torch.int64)
        pre_dense = _meta(B, N, dtype=dtype)

        for provider in encode.PROVIDERS:
            record(f"jumprelu encoder ({provider})", dt,
                   lambda: encode.jumprelu_lists(x, W_enc, b_enc, theta, eps, cap, provider))
            record(f"topk candidates ({provider})", dt, lambda: encode.topk_candidates(x, W_enc, b_enc, k, provider))
        if dt == "bfloat16":  # lists of 4096 x 2^19 slots: int64 list offsets (OFF64)
            record("jumprelu encoder (fused, lists past 2^31)", dt,
                   lambda: encode.jumprelu_lists(x, W_enc, b_enc, theta, eps, 2**19, "fused"))
        if dtype == torch.float32:  # the fused GEMMs also compile with TF32 operands (when torch allows TF32)
            with _tf32():
                record("jumprelu encoder (fused, tf32)", dt,
                       lambda: encode.jumprelu_lists(x, W_enc, b_enc, theta, eps, cap, "fused"))
                record("topk candidates (fused, tf32)", dt, lambda: encode.topk_candidates(x, W_enc, b_enc, k, "fused"))
        c = topk.Candidates(B, N, k, dtype, "meta")
        rows_f, tiles_f = _meta(B * 7, dtype=torch.int64), _meta(B * 7, dtype=torch.int32)
        record("topk repair (per row, GEMM)", dt, lambda: topk.recompute_gemm(x, W_enc, b_enc, c)(rows_f, tiles_f, k))
        record("batchtopk repair (GEMM)", dt, lambda: topk.recompute_gemm(x, W_enc, b_enc, c)(rows_f, tiles_f, 128))
        record("topk op (dense)", dt, lambda: topk.dense_candidates(c, pre_dense))
        record("topk op repair (dense)", dt, lambda: topk.recompute_dense(pre_dense, c)(rows_f, tiles_f, k))
        # decoders and backward
        record("topk decode", dt, lambda: decode.gather_rows(vk, ik, W_dec, b_dec))
        record("batchtopk decode (CSR)", dt, lambda: decode.gather_rows(flat_v, flat_i, W_dec, b_dec, row_ptr=row_ptr))
        record("jumprelu decode", dt,
               lambda: decode.gather_rows(pre_c, idx, W_dec, b_dec, counts=counts, threshold=theta))
        record("relu / gated decode (padded, counts)", dt,
               lambda: decode.gather_rows(pre_c, idx, W_dec, b_dec, counts=counts))
        record("grad x (W_enc.t() gather)", dt, lambda: decode.gather_rows(pre_c, idx, W_enc.t(), counts=counts))
        record("grad x (CSR)", dt, lambda: decode.gather_rows(flat_v, flat_i, W_enc.t(), row_ptr=row_ptr))
        record("grad values (SDDMM)", dt, lambda: decode._sddmm_launch(g, ik, W_dec))
        record("grad values (SDDMM, CSR)", dt, lambda: decode._sddmm_launch(g, flat_i, W_dec, rows=rows))
        # ReLU / Gated backward at padded lists, and Gated's magnitudes x_in · W_mag[:, j] at the open gates
        record("grad values, gated magnitudes (SDDMM, counts)", dt, lambda: decode._sddmm_launch(g, idx, W_dec, counts))
        record("jumprelu SDDMM", dt, lambda: decode._sddmm_launch(g, idx, W_dec, counts, pre_c, theta, eps,
                                                                   _meta(B, dtype=torch.float32)))
        record("grad W_dec (segments)", dt, lambda: decode.segment_rows(order, offsets, flat_v, g, k))
        record("grad W_dec + theta (segments)", dt,
               lambda: decode.segment_rows(order, offsets, flat_v, g, cap, t=_meta(nnz, dtype=wide), t_dtype=wide))
        record("grad W_enc, b_enc (segments, b_dec)", dt,
               lambda: decode.segment_rows(order, offsets, flat_v, x, k, t=flat_v, x_bias=b_dec, t_dtype=wide))
        record("grad W_enc, b_enc (segments, CSR)", dt,
               lambda: decode.segment_rows(order, offsets, flat_v, x, nnz, t=flat_v, t_dtype=wide, rows=rows))
        for step in (False, True):
            name = "step" if step else "jumprelu"
            record(f"{name} op", dt, lambda: jumprelu._forward(pre_dense, theta, step))
            record(f"{name} op backward", dt, lambda: jumprelu._backward(pre_dense, pre_dense, theta, eps, step))
    return out


# ----------------------------------------------------------------------------------------------
# Compiling one variant under one config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    kernel: str
    site: str
    dtype: str
    config: str
    arch: int
    ok: bool
    error: str = ""
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    loop_spill_insts: int = -1
    shared: int = -1
    mma: str = ""
    atomic_broadcast: Optional[bool] = None
    seconds: float = 0.0

    @property
    def smem_ok(self) -> bool:
        return 0 <= self.shared <= SMEM_LIMIT[self.arch]

    @property
    def green(self) -> bool:
        """Compiles, fits the arch's shared memory, and no spill inside a loop."""
        return self.ok and self.smem_ok and self.loop_spill_insts == 0


def config_name(c) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in c.kwargs.items())
    return f"{blocks} w{c.num_warps} s{c.num_stages}"


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_numbers(log: str) -> tuple[int, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0,
            int(spills.group(2)) if spills else 0)


def loop_spills(cubin: bytes) -> int:
    """Local-memory spill instructions (``STL``/``LDL``) inside any loop of the SASS (a backward branch)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    labels, insts, pending = {}, [], []
    for line in sass.splitlines():
        lab = re.match(r"\s*(\.L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if not m:
            continue
        addr, text = int(m.group(1), 16), m.group(2)
        for p in pending:
            labels[p] = addr
        pending = []
        insts.append((addr, text))
    loops = []
    for addr, text in insts:
        b = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text)
        if b and b.group(1) in labels and labels[b.group(1)] <= addr:
            loops.append((labels[b.group(1)], addr))
    return sum(1 for addr, text in insts if re.search(r"\b(STL|LDL)\b", text)
               and any(lo <= addr <= hi for lo, hi in loops))


def compile_variant(v: Variant, config, arch: int) -> tuple[Result, Optional[object]]:
    """Compile ``v`` under ``config`` for ``sm_<arch>``, as Triton's JIT would specialise it at run time."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = v.launch.kernel.fn
    res = Result(v.kernel, v.site, v.dtype, config_name(config), arch, ok=False)
    t0 = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(v.launch.kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if getattr(config, "maxnreg", None):
        kw["maxnreg"] = config.maxnreg
    bound, spec, opts = binder(*v.launch.args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    log = io.StringIO()
    prev = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    # always compile: a cache hit would skip ptxas and with it the register/spill log
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # a config that does not compile is a finding of the report, not a crash
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        res.seconds = time.perf_counter() - t0
        return res, None
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = prev
    res.ok = True
    res.registers, res.spill_stores, res.spill_loads = _ptxas_numbers(log.getvalue())
    res.shared = int(k.metadata.shared)
    ptx = k.asm["ptx"]
    res.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "")
    res.loop_spill_insts = loop_spills(k.asm["cubin"]) if (res.spill_stores or res.spill_loads) else 0
    res.atomic_broadcast = atomic_result_broadcast(ptx)
    res.seconds = time.perf_counter() - t0
    return res, k


def uses_dot(v: Variant) -> bool:
    return "tl.dot(" in inspect.getsource(v.launch.kernel.fn) or v.kernel in ("_encode_jumprelu_kernel",
                                                                                "_encode_topk_kernel")


def atomic_result_broadcast(ptx: str) -> Optional[bool]:
    """Does the PTX hand each ``atom.global`` result to every thread holding the element?

    When a layout replicates the atomic's elements over several threads, Triton issues the atomic from one
    owner thread only (its predicate is ``and.pred owner, mask``). Triton >= 3.5 (triton-lang/triton#7460)
    then stores the result to shared memory under the owner predicate, syncs, and reloads it in every
    thread; 3.4 stored it unpredicated from every thread (the non-owners' zeros race with the owner's
    value). An atomic predicated by its mask alone has one thread per element: nothing to broadcast.
    None: the PTX has no atomic.
    """
    lines = ptx.splitlines()
    found = False
    for i, line in enumerate(lines):
        m = re.search(r"@(%p\d+)\s+atom\.global\.\S+\s+(%r\d+),", line)
        if not m:
            continue
        found = True
        pred, reg = m.group(1), re.escape(m.group(2))
        defs = [re.search(r"and\.pred\s+" + re.escape(pred) + r",\s*(%p\d+),\s*(%p\d+);", x) for x in lines[:i]]
        defs = [d for d in defs if d]
        if not defs:
            continue  # predicated by the mask alone: no replicated element
        owners = "|".join(re.escape(p) for p in defs[-1].groups())
        window = "\n".join(lines[i + 1:i + 12])
        if not re.search(r"@(" + owners + r")\s+st\.shared\S*\s+\[[^\]]+\],\s*" + reg + r";", window):
            return False
    return True if found else None


def kernel_source(jit_fn) -> str:
    """The source of a kernel and of every ``@triton.jit`` helper it calls, transitively (what it compiles from)."""
    seen, out, todo = set(), [], [jit_fn]
    while todo:
        f = todo.pop()
        py = f.fn  # JITFunction and InterpretedFunction alike
        if py in seen:
            continue
        seen.add(py)
        out.append(inspect.getsource(py))
        for name in py.__code__.co_names:
            g = py.__globals__.get(name)
            if g is not None and hasattr(g, "fn") and callable(getattr(g, "fn")) and hasattr(g, "arg_names"):
                todo.append(g)
    return "\n".join(sorted(out))


def matrix_fingerprint(variants: list[Variant]) -> str:
    """A hash of what the report covers: each kernel's source (with its helpers), its configs, the launch
    constexprs, and the Triton version."""
    h = hashlib.sha256(triton.__version__.encode())
    for v in sorted(variants, key=lambda v: (v.kernel, v.site, v.dtype)):
        h.update(f"{v.kernel}|{v.site}|{v.dtype}|{sorted(v.constexprs.items())}|".encode())
        h.update("|".join(config_name(c) for c in v.configs()).encode())
    kernels = {v.kernel: v.launch.kernel.fn for v in variants}
    for name in sorted(kernels):
        h.update(kernel_source(kernels[name]).encode())
    return h.hexdigest()[:16]


def job_key(v: Variant, config, arch: int) -> str:
    """What one compile depends on: a cache key, so a rerun recompiles only what changed."""
    h = hashlib.sha256(f"{triton.__version__}|{v.kernel}|{v.site}|{v.dtype}|{arch}|{config_name(config)}|"
                       f"{sorted(v.constexprs.items())}|".encode())
    h.update(kernel_source(v.launch.kernel.fn).encode())
    for f in (compile_variant, _ptxas_numbers, loop_spills, atomic_result_broadcast):  # how results are read
        h.update(inspect.getsource(f).encode())
    h.update(repr([(type(a).__name__, getattr(a, "dtype", a), getattr(a, "shape", None), getattr(a, "stride", None)
                    and a.stride()) for a in v.launch.args]).encode())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------------------------
# Which compiles: the CI subset, the slow tier, the full matrix
# ----------------------------------------------------------------------------------------------

GEMMS = ("_encode_jumprelu_kernel", "_encode_topk_kernel")


def jobs(variants: list[Variant], which: str) -> list[tuple[int, int, int]]:
    """``(variant index, config index, arch)`` triples.

    ``ci``: every kernel once (its first bf16 launch site, first config) for sm_90, the fused GEMMs also
    for sm_80 and in float64 and TF32 float32 — the representative subset CI compiles (~1 min).
    ``slow``: every launch site in bf16 and float64 (the two config regimes) with its first config, sm_90.
    ``all``: every config of every site and dtype for every arch (the report).
    """
    out = []
    if which == "spill-probe":  # the loop-spill detector's own check: a loop kernel squeezed into 32 registers
        return [(next(i for i, v in enumerate(variants) if v.kernel == "_jumprelu_bwd_kernel"), 0, 90, 32)]
    if which == "all":
        for i, v in enumerate(variants):
            for j in range(len(v.configs())):
                out += [(i, j, a) for a in ARCHS]
        return out
    if which == "slow":
        return [(i, 0, 90) for i, v in enumerate(variants) if v.dtype in ("bfloat16", "float64")]
    assert which == "ci", which
    seen = set()
    for i, v in enumerate(variants):
        if v.dtype == "bfloat16" and v.kernel not in seen:
            seen.add(v.kernel)
            out.append((i, 0, 90))
            if v.kernel in GEMMS:
                out.append((i, 0, 80))
        if v.kernel in GEMMS and (v.dtype == "float64" or "tf32" in v.site) and "(fused" in v.site:
            out.append((i, 0, 90))
    return out


def run(which: str, n_jobs: int = 1, cache: Optional[str] = None, progress: bool = False) -> tuple[list[Result], str]:
    """Compile ``which`` in this process (it must not be interpreting): ``(results, matrix fingerprint)``.

    ``cache``: a JSON-lines file of earlier results by ``job_key``; only compiles not in it run (and are
    appended), so a report after changing one kernel recompiles that kernel only.
    """
    import json

    from .triton_common import INTERPRET

    assert not INTERPRET, "compiling for a GPU needs TRITON_INTERPRET unset (see compile_subprocess)"
    variants = launch_matrix()
    todo = jobs(variants, which)
    keys = [job_key(variants[i], variants[i].configs()[j], arch) for i, j, arch, *_ in todo]
    done: dict[str, Result] = {}
    if cache and os.path.exists(cache):
        with open(cache) as f:
            for line in f:
                d = json.loads(line)
                key = d.pop("key")
                done[key] = Result(**d)
    pending = [(t, k) for t, k in zip(todo, keys) if k not in done or len(t) > 3]

    def record(k, r, n):
        done[k] = r
        if cache and len(todo[0]) == 3:
            with open(cache, "a") as f:
                f.write(json.dumps(dict(dataclasses.asdict(r), key=k)) + "\n")
        if progress:
            print(f"[{n}/{len(pending)}] {'ok ' if r.green else 'BAD'} {r.kernel} | {r.site} | {r.dtype} | "
                  f"{r.config} | sm_{r.arch} {r.seconds:.1f}s", flush=True)

    if n_jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing as mp

        with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("fork")) as ex:
            for n, ((t, k), r) in enumerate(zip(pending, ex.map(_compile_job, [t for t, _ in pending])), 1):
                record(k, r, n)
    else:
        for n, (t, k) in enumerate(pending, 1):
            record(k, _compile_job(t), n)
    return [done[k] for k in keys], matrix_fingerprint(variants)


_variants_cache: Optional[list] = None


def _compile_job(job) -> Result:
    global _variants_cache
    if _variants_cache is None:
        _variants_cache = launch_matrix()
    i, j, arch, *maxnreg = job
    v = _variants_cache[i]
    c = v.configs()[j]
    if maxnreg:
        c = triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=maxnreg[0])
    return compile_variant(v, c, arch)[0]


def compile_subprocess(which: str, n_jobs: int = 1, timeout: Optional[float] = None) -> tuple[list[Result], str]:
    """``run`` in a fresh process with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit``
    makes interpreted functions, which cannot be compiled for a GPU."""
    import json
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        subprocess.run([sys.executable, "-m", "fastsae.ops.triton_compile", "--which", which, "--jobs", str(n_jobs),
                        "--json", path], env=env, check=True, timeout=timeout)
        with open(path) as f:
            data = json.load(f)
    finally:
        os.remove(path)
    return [Result(**r) for r in data["results"]], data["fingerprint"]


def current_fingerprint() -> str:
    return matrix_fingerprint(launch_matrix())


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(description="compile fastsae's Triton kernels for GPU targets (no GPU needed)")
    p.add_argument("--which", choices=["ci", "slow", "all", "spill-probe"], default="ci")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    results, fp = run(a.which, a.jobs)
    with open(a.json, "w") as f:
        json.dump({"fingerprint": fp, "results": [dataclasses.asdict(r) for r in results]}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
