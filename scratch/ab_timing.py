"""Scratch helper (GPU): interleaved A/B timing for the NOTES.md experiments.

Each round times every variant once (median of CUDA-event times over back-to-back calls)
and divides by the baseline of the same round, so clock drift between rounds hits all
variants alike; the report is the median ratio over rounds with its spread.
"""
import statistics
from typing import Callable, Dict

import torch


def median_ms(fn: Callable[[], object], reps: int = 100, warmup: int = 5) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def interleaved_ratios(variants: Dict[str, Callable[[], object]], baseline: str, rounds: int = 7,
                       label: str = "") -> Dict[str, list]:
    """Per variant, its time over the baseline's in each round; prints a line per round and a summary."""
    for _ in range(3):
        median_ms(variants[baseline])  # clocks up first
    ratios = {name: [] for name in variants}
    for r in range(rounds):
        times = {name: median_ms(fn) for name, fn in variants.items()}
        for name in variants:
            ratios[name].append(times[name] / times[baseline])
        print(f"{label} round {r}: " + " ".join(f"{name}={t:.4f}" for name, t in times.items()), flush=True)
    for name, rs in ratios.items():
        print(f"{label:9s} {name:46s} {statistics.median(rs):.3f}x {baseline} (min {min(rs):.3f}, max {max(rs):.3f})")
    return ratios


def bench_inputs(name: str, dtype: str = "bf16", device: str = "cuda"):
    """The bench's shape ``name``, its dtype, and input sets rotated as the bench rotates them
    (bench.timing.num_input_sets): ``(shape, dtype, inputs, n_sets)``."""
    from bench.timing import num_input_sets
    from bench.workloads import DTYPES, SHAPES, random_qkv
    shape, torch_dtype, dev = SHAPES[name], DTYPES[dtype], torch.device(device)
    first = random_qkv(shape, torch_dtype, dev, seed=0)
    n_sets = num_input_sets(sum(t.numel() * t.element_size() for t in first))
    inputs = [first] + [random_qkv(shape, torch_dtype, dev, seed=s) for s in range(1, n_sets)]
    return shape, torch_dtype, inputs, n_sets


def paired_summary(call: Callable[[int], object], plain: Callable[[int], object], n_sets: int, rounds: int = 3) -> str:
    """``call`` over ``plain`` (each takes an input-set index): the median of ``rounds`` paired
    ratios with their range, and the paired CUDA-graph ratio, as one line of text."""
    from bench.timing import paired_graph_ratio, paired_ratios
    call(0)
    r = sorted(paired_ratios(call, plain, n_sets, rounds=rounds))
    g = paired_graph_ratio(call, plain, n_sets)
    return f"{r[len(r) // 2]:.4f}x plain (min {r[0]:.4f} max {r[-1]:.4f}) graph {g:.4f}x"
