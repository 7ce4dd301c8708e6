"""Shared fixtures. On a CPU-only machine the Triton kernels run under the interpreter
(``iidkern.kernels`` sets TRITON_INTERPRET=1 before they are decorated)."""
import fcntl
import importlib
import json
import os
import subprocess
import sys

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


@pytest.fixture(scope="session")
def compile_script(request, tmp_path_factory):
    """``run(script)``: the JSON that a tests/ script compiling kernels for real GPUs prints
    on its last line, run in a child process without the interpreter. Under pytest-xdist
    the first worker to ask runs it and the others read its result: each run compiles for
    minutes, and every worker would otherwise run it for its own share of the tests."""
    here = os.path.dirname(__file__)

    def run(script: str):
        def child() -> str:
            env = dict(os.environ, TRITON_INTERPRET="0")
            env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
            proc = subprocess.run([sys.executable, os.path.join(here, script)], capture_output=True, text=True,
                                  env=env, timeout=1200)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout.strip().splitlines()[-1]
        if getattr(request.config, "workerinput", None) is None:  # not an xdist worker
            return json.loads(child())
        shared = tmp_path_factory.getbasetemp().parent / f"{script}.json"  # this session's, all workers'
        with open(f"{shared}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait for the first
            if not shared.exists():
                shared.write_text(child())
        return json.loads(shared.read_text())
    return run


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
