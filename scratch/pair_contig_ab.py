"""Scratch (GPU): the pair-statistics pass with one contiguous run of token tiles a program
(``CONTIG``) instead of tiles strided by the program count, at 2, 4 and 8 programs an SM
(``launch.PAIR_CONTIG`` / ``PAIR_PER_SM``, A/B switches of ``scratch/pair_contig.patch``, which must be
applied; NOTES.md 63); Flux 1024² B=2, bf16, pair (0, 1),
paired over the plain call (3 rounds x 40 pairs) and graph ratios, two interleaved rounds;
first the statistics' error against float64 sums (scratch/pair_ab_common.print_pair_errors)."""
import torch

import iidkern
from bench.workloads import DTYPES, SHAPES, random_qkv
from iidkern.kernels import launch
from pair_ab_common import print_interleaved_rounds, print_pair_errors

CONFIGS = {"shipped": (False, 4), "contig4": (True, 4), "contig2": (True, 2), "contig8": (True, 8)}


def configured(contig, per_sm, fn):
    def run(*args, **kwargs):
        launch.PAIR_CONTIG[0], launch.PAIR_PER_SM[0] = contig, per_sm
        return fn(*args, **kwargs)
    return run


def main():
    dev = torch.device("cuda")
    for name in ("shipped", "contig4"):
        launch.PAIR_CONTIG[0], launch.PAIR_PER_SM[0] = CONFIGS[name]
        print_pair_errors({name: {}})
    sets = [random_qkv(SHAPES["flux_1024_b2"], DTYPES["bf16"], dev, seed=s) for s in range(2)]
    variants = {name: configured(*cfg, lambda i: iidkern.attention(*sets[i], pair_stats=[(0, 1)]))
                for name, cfg in CONFIGS.items()}
    print_interleaved_rounds(variants, lambda i: iidkern.attention(*sets[i]))


if __name__ == "__main__":
    main()
