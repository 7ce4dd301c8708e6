"""Scratch helpers (GPU) of the pair-statistics A/Bs (NOTES.md 47): the relative error of
branch-pair statistics against float64 sums of the output (random pairs, a row paired with
itself included, both layouts) for each named set of kernel_options, and a table of paired
ratios per shape."""
import torch

import iidkern

CASES = ((2, 3, 1000, [[0, 1]]), (4, 5, 777, [[3, 0], [1, 2]]), (3, 2, 4100, [[2, 2], [0, 1]]),
         (5, 4, 300, [[4, 1], [1, 3], [0, 2], [2, 4]]))


def print_pair_errors(variants: dict, dev=torch.device("cuda")):
    g = torch.Generator().manual_seed(3)
    for b, h, n, pairs in CASES:
        for layout in ("bhnd", "bnhd"):
            shape = (b, h, n, 128) if layout == "bhnd" else (b, n, h, 128)
            q, k, v = (torch.randn(shape, generator=g).to(dev, torch.bfloat16) for _ in range(3))
            for name, options in variants.items():
                res = iidkern.attention(q, k, v, layout=layout, pair_stats=pairs,
                                        kernel_options=dict(options, poison=True))
                o = res.out.double() if layout == "bhnd" else res.out.double().transpose(1, 2)
                want = torch.stack([(o[a] * o[c]).sum((-1, -2)) for a, c in pairs])
                n0 = torch.stack([(o[a] * o[a]).sum((-1, -2)) for a, c in pairs])
                s = res.pair_stats
                e = max(((s.dot.double() - want).abs().max() / want.abs().max()).item(),
                        ((s.norm0_sq.double() - n0).abs().max() / n0.abs().max()).item())
                print(f"B={b} H={h} N={n} {layout} pairs={pairs} {name}: rel err {e:.1e}", flush=True)


def print_paired_table(cases, comparisons, dev=torch.device("cuda")):
    """Per (shape, pairs) of ``cases``: ``comparisons(call)`` gives (label, fn, base) triples,
    ``call(i, **kwargs)`` being iidkern.attention on input set i with the pairs; prints the
    paired eager ratio (median and range of 3 rounds) and the paired graph ratio of each."""
    import statistics
    from bench.timing import paired_graph_ratio, paired_ratios
    from bench.workloads import DTYPES, random_qkv
    for shape, pairs in cases:
        sets = [random_qkv(shape, DTYPES["bf16"], dev, seed=s) for s in range(2)]
        pt = torch.tensor(pairs, dtype=torch.int64)

        def call(i, sets=sets, pt=pt, **kwargs):
            return iidkern.attention(*sets[i], pair_stats=pt, **kwargs)

        def plain(i, sets=sets):
            return iidkern.attention(*sets[i])
        for label, fn, base in comparisons(call, plain):
            r = paired_ratios(fn, base, 2, rounds=3, reps=40)
            gr = paired_graph_ratio(fn, base, 2)
            print(f"{shape.name:13s} {label:24s} {statistics.median(r):.4f}x (rounds {min(r):.3f}-{max(r):.3f}) "
                  f"graph {gr:.4f}x", flush=True)


def pair_sums(out):
    """float64 ``[H, 3]``: (<O_0, O_1>, |O_0|^2, |O_1|^2) per head of batch rows 0 and 1 of a bhnd output."""
    o = out.double()
    return torch.stack([(o[0] * o[1]).sum((-1, -2)), (o[0] ** 2).sum((-1, -2)), (o[1] ** 2).sum((-1, -2))], -1)


def print_interleaved_rounds(variants: dict, plain, rounds: int = 2):
    """``rounds`` times over every named variant ``fn(i)``: its paired eager ratio over
    ``plain`` (median and range of 3 rounds x 40 pairs) and its paired graph ratio."""
    import statistics
    from bench.timing import paired_graph_ratio, paired_ratios
    for rnd in range(rounds):
        for name, fn in variants.items():
            r = paired_ratios(fn, plain, 2, rounds=3, reps=40)
            gr = paired_graph_ratio(fn, plain, 2)
            print(f"round {rnd} {name:9s} {statistics.median(r):.4f}x (rounds {min(r):.3f}-{max(r):.3f}) "
                  f"graph {gr:.4f}x", flush=True)

