"""The benchmark suite: ``python -m pytest bench/ --benchmark-only [--benchmark-json=out.json]``.

Each case (shape x dtype x feature x implementation, see ``bench/cases.py``):
1. builds the workload and times the first call (compilation / autotuning / plan build);
2. checks the result against an independent implementation (relative error);
3. times ``REPS`` calls with CUDA events (median is the headline), then the same calls
   replayed from a CUDA graph (kernel time without Python launch overhead);
4. measures the peak memory of one call;
5. for iidkern, times it against its target's baseline, call by call interleaved (plain:
   cuDNN; a feature: iidkern's plain call), the ratio the targets table reads (``paired_*``);
6. lets pytest-benchmark time rounds of back-to-back calls with a synchronizing clock.
Everything goes into ``benchmark.extra_info`` (and ``BENCH_RECORDS``), which
``python -m bench.render`` turns into RESULTS.md.

An implementation that cannot run a case (an SDPA backend refusing a shape or a mask, the
naive path not fitting in memory) is skipped with the reason recorded.
"""
import itertools
import os

import pytest
import torch

from bench.cases import Case, all_cases, quick_mode
from bench.implementations import Unsupported, first_call_or_unsupported, make_impl, make_reference
from bench.timing import (event_times_ms, graph_times_ms, num_input_sets, paired_graph_ratio, paired_ratios,
                          peak_memory_bytes, relative_error, summarize, synced_clock, timed_first_call)
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

QUICK = quick_mode()
REPS = int(os.environ.get("BENCH_REPS", "50" if QUICK else "100"))
NAIVE_REPS = max(3, REPS // 10)
USE_GRAPHS = os.environ.get("BENCH_GRAPHS", "1") not in ("", "0")
USE_PAIRED = os.environ.get("BENCH_PAIRED", "1") not in ("", "0")
CHECK_TOL = 2e-2  # relative error vs an independent bf16/fp16 implementation
CASES = all_cases(QUICK)

pytestmark = pytest.mark.benchmark(timer=synced_clock, disable_gc=True)

_reference_cache = {}  # {group: named reference tensors}; one group kept (cases arrive grouped)


def _reference(case: Case, workload, q, k, v):
    if case.group not in _reference_cache:
        _reference_cache.clear()
        ref = make_reference(workload)
        _reference_cache[case.group] = {n: t.detach() for n, t in ref.extract(ref.call(q, k, v)).items()}
    return _reference_cache[case.group]


def _check(case: Case, impl, workload, result, q, k, v) -> dict:
    if case.impl == "naive" or (case.impl.startswith("sdpa") and case.feature == "plain"):
        return {"check_against": "self (reference)"}
    try:
        ref = _reference(case, workload, q, k, v)
    except Unsupported as e:
        return {"check_against": f"none ({e})"}
    named = impl.extract(result)
    errors = {n: relative_error(named[n], t) for n, t in ref.items() if n in named}
    return {"check_against": "naive" if case.feature in ("probe", "block_mult") else "sdpa (+torch)",
            "check_errors": errors, "check_ok": all(e <= CHECK_TOL for e in errors.values())}


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _paired(case: Case, shape, dtype, device, workload, impl, fn, inputs, n_sets, record) -> dict:
    """The case against its target's baseline, interleaved (bench/timing.paired_ratios):
    iidkern's plain call against cuDNN's, a feature call against iidkern's plain call."""
    baseline = "sdpa_cudnn" if case.feature == "plain" else "iidkern"
    try:
        base_workload = workload if case.feature == "plain" else build_workload(shape, dtype, "plain", device)
        base = make_impl(baseline, base_workload)
        first_call_or_unsupported(base, *inputs[0])  # compiled and warm before the rounds
    except Unsupported as e:
        return {"paired_error": str(e)[:300]}

    def base_fn(i):
        return base.call(*inputs[i])
    ratios = paired_ratios(fn, base_fn, n_sets)
    out = {"paired_baseline": baseline, "paired_ratio": sorted(ratios)[len(ratios) // 2],
           "paired_ratio_min": min(ratios), "paired_ratio_max": max(ratios)}
    if USE_GRAPHS and impl.graphable and base.graphable and "graph_median_ms" in record:
        try:
            out["paired_graph_ratio"] = paired_graph_ratio(fn, base_fn, n_sets)
        except Exception as e:  # noqa: BLE001 - keep the eager pair
            out["paired_graph_error"] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_attention(case: Case, benchmark, bench_records):
    shape, dtype, device = SHAPES[case.shape], DTYPES[case.dtype], torch.device("cuda")
    record = {"kind": "case", "id": case.id, "group": case.group, "shape": case.shape, "dtype": case.dtype,
              "feature": case.feature, "impl": case.impl, "batch": shape.batch, "heads": shape.heads,
              "n_q": shape.tokens, "n_k": shape.tokens, "head_dim": shape.head_dim, "text": shape.text,
              "image": shape.image, "flops": shape.flops()}
    try:
        workload = build_workload(shape, dtype, case.feature, device)
        impl = make_impl(case.impl, workload)
        first = random_qkv(shape, dtype, device, seed=0)
        bytes_per_set = sum(t.numel() * t.element_size() for t in first)
        n_sets = 1 if case.impl == "naive" else num_input_sets(bytes_per_set)
        inputs = [first] + [random_qkv(shape, dtype, device, seed=s) for s in range(1, n_sets)]
        result, first_call_s = timed_first_call(lambda: first_call_or_unsupported(impl, *first))
    except Unsupported as e:
        bench_records.write({**record, "kind": "skip", "reason": str(e)})
        pytest.skip(str(e))
    except Exception as e:
        bench_records.write({**record, "kind": "error", "reason": f"{type(e).__name__}: {e}"[:500]})
        raise

    record.update(workload.info, first_call_s=first_call_s, n_input_sets=n_sets)
    record.update(_check(case, impl, workload, result, *first))
    del result

    def fn(i):
        return impl.call(*inputs[i])

    reps = NAIVE_REPS if case.impl == "naive" else REPS
    timing = summarize(event_times_ms(fn, n_sets, reps, warmup=2 if case.impl == "naive" else 10))
    record.update(timing, tflops=shape.flops() / (timing["median_ms"] * 1e-3) / 1e12)
    if USE_GRAPHS and impl.graphable:
        try:
            g = summarize(graph_times_ms(fn, n_sets, reps))
            record.update(graph_median_ms=g["median_ms"], graph_tflops=shape.flops() / (g["median_ms"] * 1e-3) / 1e12)
        except Exception as e:  # noqa: BLE001 - record why, keep the eager numbers
            record["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.synchronize()
    elif not impl.graphable:
        record["graph_error"] = "not capturable (host synchronization or memory)"
    record["peak_mem_bytes"] = peak_memory_bytes(fn)
    if USE_PAIRED and case.impl == "iidkern":
        record.update(_paired(case, shape, dtype, device, workload, impl, fn, inputs, n_sets, record))

    benchmark.group = case.group
    benchmark.extra_info.update(record)
    cycle = itertools.cycle(range(n_sets))
    rounds, iterations = (3, 2) if case.impl == "naive" else (10, 10)
    benchmark.pedantic(lambda: fn(next(cycle)), rounds=rounds, iterations=iterations, warmup_rounds=1)
    bench_records.write(record)

    if "check_errors" in record:
        assert record["check_ok"], f"{case.id}: relative errors {record['check_errors']} exceed {CHECK_TOL}"
