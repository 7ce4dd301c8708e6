"""The benchmark's correctness check (CPU, no kernels run): iidkern's checked first call
fills its outputs with NaN first, so an element its kernels never write fails the check
instead of passing with a value that reused memory happened to hold (NOTES.md 25); the
timed calls keep the caller's options untouched."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ lives in the checkout, it is not installed with the package
    sys.path.insert(0, str(ROOT))
from bench import implementations  # noqa: E402
from bench.workloads import SHAPES, build_workload  # noqa: E402


@pytest.mark.parametrize("feature", ["plain", "probe", "block_mult"])
def test_checked_first_call_poisons_and_timed_calls_do_not(monkeypatch, feature):
    seen = []
    monkeypatch.setattr(implementations.iidkern, "attention", lambda q, k, v, **kw: seen.append(kw) or q)
    w = build_workload(SHAPES["flux_256"], torch.bfloat16, feature, "cpu")
    impl = implementations.make_impl("iidkern", w)
    q = k = v = torch.zeros(1)
    implementations.first_call_or_unsupported(impl, q, k, v)
    impl.call(q, k, v)
    checked, timed = seen
    assert checked["kernel_options"] == {"poison": True}
    assert "kernel_options" not in timed
    assert {key: val for key, val in checked.items() if key != "kernel_options"}.keys() == timed.keys()
