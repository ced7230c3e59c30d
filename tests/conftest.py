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


def assert_matches_oracle(module, out, loss, x_hat, l0=None) -> None:
    """``module.training_forward``'s result ``out`` against an oracle's ``loss`` and ``x_hat``: both values and
    the gradient of every parameter (float64-checked tolerances), and the batch's mean L0 where given."""
    params = list(module.parameters())
    grads = torch.autograd.grad(out.loss, params)
    expected = torch.autograd.grad(loss, params)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.x_hat, x_hat)
    for (name, _), g, e in zip(module.named_parameters(), grads, expected):
        torch.testing.assert_close(g, e, msg=name)
    if l0 is not None:
        assert float(out.l0) == pytest.approx(l0)


def pytest_report_header(config):
    return f"fastsae backends here: {BACKENDS} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
