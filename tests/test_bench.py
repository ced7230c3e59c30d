"""Smoke tests of the benchmark harness (fastsae.bench): a tiny run writes every output, the memory
and timing helpers measure what they claim, and failures are reported instead of raised.
No timing is asserted: benchmarks are scripts, not tests."""
import csv
import math

import pytest
import torch

from fastsae.bench import QUICK_CPU, Skip, main, measure_providers, peak_memory_bytes, run_suite
from fastsae.bench.cases import Case, build, make_data, plan
from fastsae.bench.harness import max_rel_diff, speedups

TINY = QUICK_CPU.with_(
    name="tiny", d_in=16, batch=24, d_saes=(64, 96), ks=(4,), main_d_sae=64, main_k=4, repeats=1,
    archs=("topk",), ops=(("jumprelu", "bwd"),), scale_archs=("topk",), compile="none", peers=False,
    max_case_seconds=None,
)


def test_tiny_run_writes_table_plot_csv_and_machine(tmp_path):
    out = run_suite(TINY, "cpu", tmp_path, threads=2, command="test", verbose=False)
    assert out == tmp_path
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["group"] for r in rows} == {"step", "op", "scale"}
    eager = [r for r in rows if r["provider"] == "eager"]
    assert eager and all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in eager)
    assert all(float(r["speedup_vs_eager"]) == 1.0 for r in eager)
    # Every fast backend's output was compared with eager's on the same inputs, and agrees.
    others = [r for r in rows if r["provider"] != "eager" and r["status"] == "ok" and r["max_rel_diff"]]
    assert all(float(r["max_rel_diff"]) < 1e-4 for r in others)
    md = (tmp_path / "results.md").read_text()
    assert "## One training step" in md and "| topk |" in md and "![scaling](scaling.png)" in md
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    machine = (tmp_path / "machine.json").read_text()
    assert "cpu_model" in machine and torch.__version__ in machine


def test_peak_memory_counts_live_bytes_on_cpu():
    n = 1 << 20  # 4 MiB of float32

    def two_live_one_freed():
        a = torch.ones(n)
        b = a * 2  # a and b live at once: 8 MiB
        del a
        c = b + 1  # a was freed: the peak stays at 8 MiB
        return c

    out, peak = peak_memory_bytes(two_live_one_freed, torch.device("cpu"))
    assert out.shape == (n,)
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_failures_and_skips_are_reported_not_raised():
    def broken():
        raise RuntimeError("boom")

    def skipped():
        raise Skip("not here")

    ones = torch.ones(3)
    res = measure_providers(
        {"eager": lambda: (lambda: ones * 2), "bad": lambda: broken, "off": skipped, "wrong": lambda: (lambda: ones * 3)},
        torch.device("cpu"), repeats=3, memory=False,
    )
    assert res["eager"].status == "ok" and len(res["eager"].times_ms) == 3
    assert res["bad"].status == "failed" and "boom" in res["bad"].reason
    assert res["off"].status == "skipped" and res["off"].reason == "not here"
    assert res["wrong"].max_rel_diff == pytest.approx(0.5)  # |3 - 2| / 2
    sp = speedups(res)
    assert sp["eager"] == 1.0 and math.isnan(sp["bad"])


def test_max_rel_diff():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert max_rel_diff(a, a.clone()) == 0.0
    assert max_rel_diff((a, a * 1.5), (a, a)) == pytest.approx(0.5)  # |6 - 4| / 4
    assert max_rel_diff(a, torch.ones(2)) == math.inf
    assert max_rel_diff(None, a) is None


def test_jumprelu_thresholds_hit_the_target_l0():
    case = Case("step", "jumprelu", "step", d_in=32, d_sae=256, batch=128, k=8)
    data = make_data(case, torch.device("cpu"))
    l0 = (data.pre > data.params["threshold"]).sum(-1).float().mean().item()
    assert l0 == pytest.approx(8, rel=0.05)


def test_plan_dedupes_and_covers_every_group():
    cases = plan(TINY, torch.device("cpu"))
    keys = [c.key for c, _ in cases]
    assert len(keys) == len(set(keys))
    step = [(c, p) for c, p in cases if c.group == "step"]
    assert step and all(p[0] == "eager" for _, p in step)


def test_op_builder_returns_a_runnable_case():
    case = Case("op", "sparse_decode", "fwd", d_in=8, d_sae=16, batch=4, k=3)
    fn = build("eager", case, torch.device("cpu"))
    assert fn().shape == (4, 8)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_unknown_groups_and_archs_are_refused_before_anything_runs(capsys):
    from fastsae.cli import main

    for args, says in ((["--only", "step,bogus"], "--only: unknown ['bogus']"), (["--archs", "topk,nope"], "--archs"),
                       (["--threads", "0"], "--threads")):
        assert main(["bench", "--quick", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fastsae: error:") and says in err and len(err.splitlines()) == 1, err
