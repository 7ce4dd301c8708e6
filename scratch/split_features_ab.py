"""Scratch (GPU): the last wave's key split under the bench's feature calls (probes: IID's
key-group probe fused + the text x image map; multiplier for reference, never split now).
Paired ratios over the plain call (split, as shipped), split on vs off for the feature."""
import statistics

import torch

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

dev = torch.device("cuda")
for shape_name in ("flux_1024", "flux_edit"):
    shape = SHAPES[shape_name]
    sets = [random_qkv(shape, DTYPES["bf16"], dev, seed=s) for s in range(2)]
    w = build_workload(shape, DTYPES["bf16"], "probe", dev)
    kw = w.iidkern_kwargs()

    def plain(i):
        return iidkern.attention(*sets[i])
    for label, opts in (("probes split off", {"tail_split": False}), ("probes split auto", None)):
        fn = lambda i, opts=opts: iidkern.attention(*sets[i], kernel_options=opts, **kw)
        r = paired_ratios(fn, plain, 2, rounds=3, reps=30)
        gr = paired_graph_ratio(fn, plain, 2)
        print(f"{shape_name:10s} {label:20s} {statistics.median(r):.4f}x plain (rounds {min(r):.3f}-{max(r):.3f}) "
              f"graph {gr:.4f}x", flush=True)
