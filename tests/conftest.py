import os

import pytest
import torch

import fastsae

# Triton is exercised on CPU tensors through its interpreter; .ci/run sets TRITON_INTERPRET=1.
BACKENDS = fastsae.backends()
FAST_BACKENDS = [b for b in BACKENDS if b != "eager"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: small sequential tests are slower with several threads spinning on a
    shared 2-core machine (oversubscription). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    return f"fastsae backends here: {BACKENDS} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
