"""CPU op and step benchmarks under pytest-benchmark: ``pytest benchmarks --benchmark-only``.

Each benchmark is one case of ``fastsae.bench`` (same builders, same data) run by one provider, so
these numbers and the suite's tables measure the same thing.
"""
import pytest

from fastsae.bench.cases import OPS, build

from .conftest import CPU, PROVIDERS, case

OP_CASES = [(n, m) for n, m in OPS if n != "encoder_gemm"]


def _run(benchmark, provider, c):
    fn = build(provider, c, CPU)
    benchmark.group = f"{c.label} d_sae={c.d_sae} k={c.k}"
    benchmark.extra_info.update(provider=provider, d_in=c.d_in, d_sae=c.d_sae, batch=c.batch, k=c.k)
    # pedantic: a fixed number of rounds after one warm-up keeps the run CI-sized on a busy machine.
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op,mode", OP_CASES, ids=[f"{n}-{m}" for n, m in OP_CASES])
def test_op(benchmark, provider, op, mode):
    _run(benchmark, provider, case(op, mode))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk", "relu", "gated"])
def test_step(benchmark, provider, arch):
    _run(benchmark, provider, case(arch, "step"))
