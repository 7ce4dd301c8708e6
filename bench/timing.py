"""How the suite measures: CUDA events, warm-up, medians, CUDA graphs, peak memory.

* ``event_times_ms``: calls launched back to back (no host synchronization between them,
  so the GPU queue stays full and launch overhead hides behind the previous call), each
  bracketed by a pair of CUDA events; the per-call times are the event differences.
  Inputs rotate among several sets when one set fits in L2, so repeats do not measure
  the cache.
* ``graph_times_ms``: the same calls captured once in a CUDA graph (one call per input
  set) and replayed: the kernel time without Python launch overhead, which dominates at
  small shapes.
* ``paired_ratios`` / ``paired_graph_ratio``: a call's time over a baseline call's, the two
  interleaved call by call (or graph replay by graph replay): the target ratios (iidkern
  plain over cuDNN, a feature over iidkern's plain).
* ``peak_memory_bytes``: growth of ``max_memory_allocated`` over one call (outputs included).
* ``synced_clock``: the pytest-benchmark timer (synchronize, then the host clock).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch


def synced_clock() -> float:
    """Host clock read after the GPU finished its queue (pytest-benchmark's round timer)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def num_input_sets(bytes_per_set: int, max_sets: int = 8) -> int:
    """How many input sets to rotate so that consecutive calls miss in L2 (sets cover >= 3x L2)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)
    return max(1, min(max_sets, math.ceil(3 * l2 / max(1, bytes_per_set))))


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
    ts = sorted(times_ms)
    n = len(ts)
    return {
        "median_ms": statistics.median(ts),
        "min_ms": ts[0],
        "p10_ms": ts[int(0.1 * (n - 1))],
        "p90_ms": ts[int(0.9 * (n - 1))],
        "reps": n,
    }


def event_times_ms(fn: Callable[[int], object], n_sets: int, reps: int, warmup: int) -> List[float]:
    """Per-call device times of ``fn(i)`` (i = input set) launched back to back."""
    for i in range(warmup):
        fn(i % n_sets)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for i in range(reps):
        starts[i].record()
        fn(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _alternating_medians(first: Callable[[int, int], object], second: Callable[[int, int], object],
                         reps: int) -> Tuple[float, float]:
    """Median milliseconds of ``first(i, k)`` and ``second(i, k)`` called in ``reps`` pairs,
    each call bracketed by its own events, launched back to back; which goes first alternates
    from pair to pair, and ``k`` (0 or 1) says a call's place in its pair."""
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(reps)]
    torch.cuda.synchronize()
    for i, (s_f, e_f, s_b, e_b) in enumerate(events):
        calls = ((s_f, first, e_f), (s_b, second, e_b)) if i % 2 == 0 else ((s_b, second, e_b), (s_f, first, e_f))
        for k, (start, call, end) in enumerate(calls):
            start.record()
            call(i, k)
            end.record()
    torch.cuda.synchronize()
    return (statistics.median(s.elapsed_time(e) for s, e, _, _ in events),
            statistics.median(s.elapsed_time(e) for _, _, s, e in events))


def paired_ratios(fn: Callable[[int], object], base_fn: Callable[[int], object], n_sets: int, rounds: int = 5,
                  reps: int = 40) -> List[float]:
    """Per round, the median time of ``fn`` over that of ``base_fn``, the two calls
    interleaved one by one, each bracketed by its own events and launched back to back:
    clock and thermal state is the same for both, which separately timed cases do not get.
    Which of the two goes first alternates from pair to pair, and the second call of a pair
    takes the other input set where there are several, so neither reads what the other just
    brought into L2. (Whole blocks taken in turns showed an order effect of up to 8% on the
    H100: the block timed second in a round ran slower.)"""
    ratios = []
    shift = n_sets // 2
    for _ in range(rounds):
        for i in range(3):
            fn(i % n_sets)
            base_fn(i % n_sets)
        mine, base = _alternating_medians(lambda i, k: fn((i + k * shift) % n_sets),
                                          lambda i, k: base_fn((i + k * shift) % n_sets), reps)
        ratios.append(mine / base)
    return ratios


def paired_graph_ratio(fn: Callable[[int], object], base_fn: Callable[[int], object], n_sets: int,
                       reps: int = 40) -> float:
    """Median ratio of CUDA-graph replay times (one call per input set in each graph), the two
    graphs replayed in turns: the kernels' time ratio without launch overhead or drift."""
    captured = [_capture(fn, n_sets), _capture(base_fn, n_sets)]  # their outputs stay alive till return
    (g_f, _), (g_b, _) = captured
    for _ in range(3):
        g_f.replay()
        g_b.replay()
    mine, base = _alternating_medians(lambda i, k: g_f.replay(), lambda i, k: g_b.replay(), reps)
    return mine / base


def _capture(fn: Callable[[int], object], n_sets: int):
    """``(graph, outputs)``: one call of ``fn`` per input set captured in a CUDA graph, after a
    warm-up on a side stream (as capture requires); the outputs stay alive in its pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2 * n_sets):
            fn(i % n_sets)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep = [fn(i) for i in range(n_sets)]
    return graph, keep


def graph_times_ms(fn: Callable[[int], object], n_sets: int, reps: int, warmup: int = 3) -> List[float]:
    """Per-call device times from replays of a CUDA graph holding one call per input set.

    Raises whatever capture raises (a host synchronization inside ``fn``, say); the caller
    records the reason.
    """
    graph, keep = _capture(fn, n_sets)
    try:
        for _ in range(warmup):
            graph.replay()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize()
        for i in range(reps):
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / n_sets for s, e in zip(starts, ends)]
    finally:
        del keep, graph


def peak_memory_bytes(fn: Callable[[int], object]) -> int:
    """Device memory one call allocates at its peak, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


def timed_first_call(fn: Callable[[], object]):
    """(result, seconds) of a call, synchronized: the first call pays compilation/autotuning."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64; inf when shapes differ or anything is not finite."""
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    a, e = actual.double(), expected.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    denom = e.norm().item()
    err = (a - e).norm().item()
    return err / denom if denom > 0 else err
