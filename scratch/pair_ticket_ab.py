"""Scratch (GPU): the pair-statistics pass with tickets zeroed by the Hopper kernel
(NOTES.md 52) against the plain call, Flux 1024² B=2, bf16, pair (0, 1); paired ratios over
the plain call (3 rounds x 40 pairs) and the graph ratio, twice; then exactness."""
import statistics

import torch

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, random_qkv


def main():
    dev = torch.device("cuda")
    sets = [random_qkv(SHAPES["flux_1024_b2"], DTYPES["bf16"], dev, seed=s) for s in range(2)]
    pairs = [(0, 1)]

    def shipped(i):
        return iidkern.attention(*sets[i], pair_stats=pairs)

    def plain(i):
        return iidkern.attention(*sets[i])

    res = shipped(0)
    o = res.out.double()
    want = torch.stack([(o[0] * o[1]).sum((-1, -2)), (o[0] ** 2).sum((-1, -2)), (o[1] ** 2).sum((-1, -2))], -1)
    got = torch.stack([res.pair_stats.dot[0], res.pair_stats.norm0_sq[0], res.pair_stats.norm1_sq[0]], -1).double()
    print(f"rel err {((got - want).abs().max() / want.abs().max()).item():.1e}", flush=True)
    for rnd in range(2):
        r = paired_ratios(shipped, plain, 2, rounds=3, reps=40)
        gr = paired_graph_ratio(shipped, plain, 2)
        print(f"round {rnd} ticket {statistics.median(r):.4f}x (rounds {min(r):.3f}-{max(r):.3f}) graph {gr:.4f}x",
              flush=True)


if __name__ == "__main__":
    main()
