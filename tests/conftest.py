"""Shared fixtures. On a CPU-only machine the Triton kernels run under the interpreter
(``iidkern.kernels`` sets TRITON_INTERPRET=1 before they are decorated)."""
import importlib

import pytest
import torch

import iidkern  # noqa: F401  (sets the interpreter up before any test imports a kernel)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; GPU tests run on the device machine (bench/gpu_run.sh)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def fresh_replays():
    """No plain-call launch recorded by one test is replayed in another: each test's first
    call of a signature takes the checked path (kernels/replay.py), which spies may watch."""
    replays = importlib.import_module("iidkern.attention")._REPLAYS
    replays.clear()
    yield
    replays.clear()


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def no_probe_pass(monkeypatch):
    """Fail if the second (probe) pass runs: a grouped-key probe must have been fused."""
    from iidkern.kernels import launch

    def refuse(*args, **kwargs):
        raise AssertionError("the probe pass ran; the grouped-key probe should ride in the main pass")
    monkeypatch.setattr(launch, "_run_probe", refuse)


@pytest.fixture
def probe_pass_calls(monkeypatch):
    """The probes that take the second (probe) pass, in call order; the pass still runs."""
    from iidkern.kernels import launch

    calls = []
    real = launch._run_probe

    def recording(p, *args, **kwargs):
        calls.append(p)
        return real(p, *args, **kwargs)
    monkeypatch.setattr(launch, "_run_probe", recording)
    return calls
