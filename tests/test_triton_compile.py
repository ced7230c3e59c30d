"""The Triton kernels compile for the GPUs they target — on a machine without one.

``fastsae.ops.triton_compile`` captures every launch of a training step (all providers, dtypes) at the
benchmark size and compiles it as Triton's JIT would at run time, for ``GPUTarget("cuda", 90, 32)``
(H100/H200) and ``("cuda", 80, 32)`` (A100). CI compiles a representative subset (every kernel once,
the GEMMs on both archs, in float64 and with TF32); the ``slow`` test compiles every launch site in
bf16 and float64; ``benchmarks/triton_compile_report.py`` compiles every autotune config of all of them and
commits ``benchmarks/results/compile/report.json``, whose coverage and verdicts are checked here.

Compiling needs ``TRITON_INTERPRET`` unset (interpreted kernels cannot be lowered), so the compiles
run in one child process per test tier.
"""
import json
import os

import pytest
import torch

from fastsae.ops import triton_compile as tc

REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                      "compile", "report.json")


@pytest.fixture(scope="module")
def ci_results():
    results, fingerprint = tc.compile_subprocess("ci", timeout=900)
    return results


def _label(r):
    return f"{r.kernel} | {r.site} | {r.dtype} | {r.config} | sm_{r.arch}: {r.error} smem={r.shared} " \
           f"loop_spills={r.loop_spill_insts}"


def test_representative_subset_compiles_green(ci_results):
    kernels = {v.kernel for v in tc.launch_matrix(dtypes=("bfloat16",))}
    assert {r.kernel for r in ci_results} == kernels  # every kernel is in the subset
    for r in ci_results:
        assert r.green, _label(r)


def test_gemms_use_tensor_core_mma(ci_results):
    """The fused encoders lower ``tl.dot`` to Hopper's ``wgmma`` on sm_90 and to ``mma.sync`` on sm_80
    (float64 has no wgmma: ``mma`` on both)."""
    gemm = [r for r in ci_results if r.kernel in tc.GEMMS]
    assert {(r.dtype, r.arch) for r in gemm} >= {("bfloat16", 90), ("bfloat16", 80), ("float64", 90)}
    for r in gemm:
        want = "wgmma" if (r.arch == 90 and r.dtype != "float64") else "mma"
        assert r.mma == want, _label(r)


def test_list_building_atomics_broadcast_their_result(ci_results):
    """The JumpReLU lists reserve slots with a masked vector atomic whose old value must reach every thread
    holding the row: the PTX stores it to shared memory from the owning thread and reloads it in all
    (Triton >= 3.5.0, triton-lang/triton#7460; 3.4.0 emits an unpredicated store from every thread)."""
    rows = [r for r in ci_results if r.kernel in ("_encode_jumprelu_kernel", "_compact_jumprelu_kernel")]
    assert {r.kernel for r in rows} == {"_encode_jumprelu_kernel", "_compact_jumprelu_kernel"}
    for r in rows:
        assert r.atomic_broadcast is True, _label(r)


def test_atomic_broadcast_check_tells_fixed_from_broken_ptx():
    """``atomic_result_broadcast`` on PTX shaped as Triton 3.5 emits it for a replicated row vector
    (owner-predicated st.shared of the atomic's register, then bar.sync and a reload), as 3.4 did
    (unpredicated st.shared: checked against real 3.4.0 and 3.5.0 output when this was written), and for a
    layout with one thread per row (nothing to broadcast)."""
    fixed = """
    setp.eq.b32 %p36, %r175, 0;
    and.pred %p35, %p36, %p215;
    @%p35 atom.global.gpu.relaxed.add.u32 %r72, [ %rd1 + 0 ], %r70;
    add.s32 %r71, %r405, %r514;
    @%p36 st.shared.b32 [ %r71 + 0 ], %r72;
    bar.sync 0;
    ld.shared.b32 %r515, [%r71];"""
    broken = """
    and.pred %p35, %p100, %p215;
    @%p35 atom.global.gpu.relaxed.add.u32 %r69, [ %rd1 + 0 ], %r70;
    bar.sync 0;
    st.shared.b32 [%r563], %r69;
    bar.sync 0;"""
    one_thread_per_row = """
    setp.ne.b16 %p51, %rs362, 0;
    @%p51 atom.global.gpu.relaxed.add.u32 %r270, [ %rd167 + 0 ], %r271;
    bar.sync 0;
    st.shared.b32 [%r912], %r270;"""
    assert tc.atomic_result_broadcast(fixed) is True
    assert tc.atomic_result_broadcast(broken) is False
    assert tc.atomic_result_broadcast(one_thread_per_row) is True
    assert tc.atomic_result_broadcast("mov.u32 %r1, 0;") is None


def test_loop_spill_detector_sees_spills_in_a_loop():
    """The verdict's spill check is not blind: the JumpReLU backward (a loop over rows) squeezed into 32
    registers spills inside its loop, and the SASS scan finds it."""
    (r,), _ = tc.compile_subprocess("spill-probe", timeout=600)
    assert r.ok and r.spill_stores > 0 and r.loop_spill_insts > 0 and not r.green, _label(r)


def test_report_covers_the_current_kernels_and_is_green():
    """The committed report was made from the kernels and configs in this tree (matrix fingerprint), covers
    every (launch site, dtype, config, arch), and every row is green. Regenerate it with
    ``python benchmarks/triton_compile_report.py`` after changing a kernel or a config list."""
    with open(REPORT) as f:
        report = json.load(f)
    variants = tc.launch_matrix()
    assert report["fingerprint"] == tc.matrix_fingerprint(variants), "stale report: rerun triton_compile_report.py"
    got = {(r["kernel"], r["site"], r["dtype"], r["config"], r["arch"]) for r in report["results"]}
    want = {(v.kernel, v.site, v.dtype, tc.config_name(c), a) for v in variants for c in v.configs() for a in tc.ARCHS}
    assert got == want
    bad = [tc.Result(**r) for r in report["results"]]
    bad = [r for r in bad if not r.green or r.atomic_broadcast is False]
    assert not bad, [_label(r) for r in bad]


@pytest.mark.slow
def test_every_launch_site_compiles_for_sm90_in_bf16_and_float64():
    results, _ = tc.compile_subprocess("slow", timeout=1800)
    assert len(results) == len(tc.launch_matrix(dtypes=("bfloat16", "float64")))
    for r in results:
        assert r.green, _label(r)
