"""Compile every Triton kernel of fastsae for sm_90 (H100/H200) and sm_80 (A100) on this machine — no GPU
needed — and write the resource report: per kernel × launch site × dtype × autotune config × arch,
registers, spills (and whether any spill sits inside a loop), shared memory, and whether the GEMMs use
``wgmma`` (sm_90) / ``mma.sync`` (sm_80).

    python benchmarks/triton_compile_report.py             # the whole matrix (~800 compiles, ~25 min on 1 core)
    python benchmarks/triton_compile_report.py --jobs 4    # in parallel
    python benchmarks/triton_compile_report.py --which ci  # the subset CI compiles (~1 min)

Writes ``benchmarks/results/compile/report.json`` and ``report.md`` (with ``--which all``; other subsets
print only). ``tests/test_triton_compile.py`` checks that the committed report covers the current
kernels and configs (its fingerprint) and that every row is green: compiles, fits the arch's shared
memory (227 KB on sm_90, 163 KB on sm_80), no spill inside a loop, and the list-building atomics
broadcast their result (``MIN_TRITON``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "compile")


def _md(results, fingerprint, meta) -> str:
    from fastsae.ops.triton_compile import SMEM_LIMIT

    lines = ["# Triton kernels compiled for GPU targets (no GPU)", "",
             f"`{meta['command']}` — {meta['date']}, triton {meta['triton']}, torch {meta['torch']}, "
             f"{len(results)} compiles ({sum(r.seconds for r in results):.0f} s of compile time) on {meta['machine']}. "
             f"Matrix fingerprint `{fingerprint}`.", "",
             "Sizes of the captured launches: B 4096, d_in 2304, d_sae 16384, k 64 (the benchmark), specialised "
             "as Triton's JIT specialises them at run time. **green** = compiles, shared memory within the "
             f"arch's limit ({SMEM_LIMIT[90] // 1024} KB sm_90, {SMEM_LIMIT[80] // 1024} KB sm_80), no spill "
             "instruction inside a loop (SASS). Spills outside loops (the GEMM epilogues) are listed: they cost "
             "once per tile, not per K step. `mma`: wgmma = Hopper warpgroup MMA, mma = mma.sync. `atomic`: "
             "the list-building atomic's result is broadcast to every thread holding the row (Triton >= 3.5).", ""]
    bad = [r for r in results if not r.green or r.atomic_broadcast is False]
    by_kernel = collections.defaultdict(list)
    for r in results:
        by_kernel[r.kernel].append(r)
    lines += ["## Summary", "", "| kernel | compiles | green | max registers | max spill bytes (stores) | "
              "loop spills | max smem KB (sm_90 / sm_80) | mma (sm_90 / sm_80) |", "|---|---|---|---|---|---|---|---|"]
    for k, rs in sorted(by_kernel.items()):
        ok = [r for r in rs if r.ok]
        smem = {a: max([r.shared for r in ok if r.arch == a], default=0) / 1024 for a in (90, 80)}
        mma = {a: sorted({r.mma for r in ok if r.arch == a and r.mma}) for a in (90, 80)}
        lines.append(f"| `{k}` | {len(rs)} | {sum(r.green for r in rs)} | {max([r.registers for r in ok], default=-1)} | "
                     f"{max([r.spill_stores for r in ok], default=-1)} | {sum(max(r.loop_spill_insts, 0) for r in ok)} | "
                     f"{smem[90]:.0f} / {smem[80]:.0f} | {','.join(mma[90]) or '-'} / {','.join(mma[80]) or '-'} |")
    lines += ["", f"Not green: {len(bad)}.", ""]
    lines += ["## Every compile", "", "| kernel | launch site | dtype | config | arch | status | regs | spill st/ld B | "
              "loop spills | smem B | mma | atomic | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.kernel, r.site, r.dtype, r.config, -r.arch)):
        status = "green" if r.green else ("ERROR " + r.error if not r.ok else "NOT GREEN")
        atom = {True: "yes", False: "NO", None: ""}[r.atomic_broadcast]
        lines.append(f"| `{r.kernel}` | {r.site} | {r.dtype} | {r.config} | sm_{r.arch} | {status} | {r.registers} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.loop_spill_insts} | {r.shared} | {r.mma} | {atom} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--which", choices=["ci", "slow", "all"], default="all")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiles (processes)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "fastsae", "compile.jsonl"),
                   help="earlier results by what they depend on: only changed kernels recompile ('' for none)")
    a = p.parse_args(argv)
    import torch
    import triton

    from fastsae.ops import triton_compile as tc
    from fastsae.ops.triton_common import INTERPRET

    t0 = time.time()
    if INTERPRET:
        results, fingerprint = tc.compile_subprocess(a.which, a.jobs)
    else:
        if a.cache:
            os.makedirs(os.path.dirname(a.cache), exist_ok=True)
        results, fingerprint = tc.run(a.which, a.jobs, cache=a.cache or None, progress=True)
    meta = dict(command=" ".join(["python", "benchmarks/triton_compile_report.py"] + (argv or sys.argv[1:])),
                date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", triton=triton.__version__,
                torch=torch.__version__, machine=f"{platform.machine()} CPU ({os.cpu_count()} cores)",
                seconds=time.time() - t0, which=a.which)
    text = _md(results, fingerprint, meta)
    bad = [r for r in results if not r.green or r.atomic_broadcast is False]
    if a.which == "all":
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "report.json"), "w") as f:
            json.dump({"fingerprint": fingerprint, "meta": meta, "results": [dataclasses.asdict(r) for r in results]},
                      f, indent=1)
        with open(os.path.join(OUT, "report.md"), "w") as f:
            f.write(text)
        print(f"wrote {OUT}/report.md and report.json")
    print(text.split("## Every compile")[0])
    for r in bad:
        print(f"NOT GREEN: {r.kernel} | {r.site} | {r.dtype} | {r.config} | sm_{r.arch} | {r.error or ''} "
              f"smem={r.shared} loop_spills={r.loop_spill_insts} atomic={r.atomic_broadcast}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
