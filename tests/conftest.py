"""Test setup: Triton through its interpreter on CPU, NaN-poisoned fresh outputs, seeded inputs."""
import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    # Must be set before triton.jit decorates the kernels: then they run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every torch.empty floating tensor starts as NaN, so an output tile nobody wrote fails the test."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    yield


# Fresh random inputs on every run (the kernels must be right on any valid input), reproducible
# by exporting the seed the header prints: ATTNCAP_SEED=<seed> make test.
SEED = int(os.environ.get("ATTNCAP_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    fuzz = os.environ.get("ATTNCAP_FUZZ_SEED", "17")  # tests/test_fuzz.py: hypothesis, derandomised
    return f"attncap random seed: ATTNCAP_SEED={SEED}; fuzz seed: ATTNCAP_FUZZ_SEED={fuzz}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + sum(map(ord, request.node.nodeid)))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): they gain
    nothing from intra-op threads, and on a busy CPU the threads' spin-waits cost several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
