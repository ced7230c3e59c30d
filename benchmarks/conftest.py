"""pytest-benchmark set-up for ``pytest benchmarks --benchmark-only`` (CPU op and step benchmarks).

Sizes are the ``--quick`` suite's (small enough for CI on 2 cores); ``fastsae bench`` is the full
side-by-side run with tables and plots. Compare providers within a group in pytest-benchmark's table
(``--benchmark-group-by=group``, the default): each op/step is one group, each backend one row.
"""
import pytest
import torch

from fastsae.bench import QUICK_CPU
from fastsae.bench.cases import Case, fastsae_providers

CPU = torch.device("cpu")
PROVIDERS = fastsae_providers(CPU)  # eager, plus cpp when the extension is built


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Same thread count as the suite: numbers comparable between the two and across runs.
    torch.set_num_threads(2)
    yield


def case(name: str, mode: str, cfg=QUICK_CPU) -> Case:
    group = "step" if mode == "step" else "op"
    return Case(group, name, mode, cfg.d_in, cfg.main_d_sae, cfg.batch, cfg.main_k)
