"""Scratch (GPU): forced tail-split plans at Flux 1024² and 512² against the planner's pick,
paired over cuDNN with graph ratios (scratch/tail_split_ab.timing), after the join pass became
one round trip (bench/NOTES.md 62): does a cheaper join move the best plan?"""
import torch

from tail_split_ab import timing

timing(torch.device("cuda"), ["flux_1024", "flux_512"],
       {"flux_1024": [(72, 2), (72, 4), (72, 6)], "flux_512": [(24, 2), (24, 3), (24, 6)]})
