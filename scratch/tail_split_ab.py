"""Scratch (GPU): the Hopper kernel's last-wave key split (kernels/tail_split.py).

1. Exactness against float32 SDPA (math) on fresh random inputs: odd shapes, both layouts,
   bf16 / fp16, forced plans (every tile split, one piece per key tile, ...), with head
   weights and LSE.
2. Paired ratios over cuDNN (bench.timing, as the targets table) and graph ratios, per shape:
   no split, the planner's split, and forced alternatives.
"""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, random_qkv
from iidkern.kernels import hopper_fwd


def forced(tiles, pieces):
    return {"tail_split_tiles": tiles, "tail_split_pieces": pieces}


def exactness(dev):
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    cases = [(1, 24, 1536, 1536, None), (2, 5, 1300, 1300, forced(7, 3)), (1, 3, 1000, 1037, forced(100, 64)),
             (3, 2, 700, 2049, forced(2, 5)), (1, 24, 4608, 4608, None), (2, 24, 4608, 4608, None),
             (1, 4, 513, 1100, forced(1, 2)), (2, 3, 1400, 1250, forced(12, 10))]
    for b, h, nq, nk, opts in cases:
        for layout in ("bhnd", "bnhd"):
            for dtype in (torch.bfloat16, torch.float16):
                def mk(n):
                    shape = (b, h, n, 128) if layout == "bhnd" else (b, n, h, 128)
                    return (torch.randn(shape, generator=g) * 1.5).to(dev, dtype)
                q, k, v = mk(nq), mk(nk), mk(nk)
                hw = torch.rand(b, h, generator=g).to(dev)
                ko = dict(opts or {}, poison=True)
                res = iidkern.attention(q, k, v, layout=layout, kernel_options=ko, return_lse=True, head_weights=hw)
                plain = iidkern.attention(q, k, v, layout=layout, kernel_options=ko)
                t = (lambda x: x) if layout == "bhnd" else (lambda x: x.transpose(1, 2))
                qf, kf, vf = (t(x).float() for x in (q, k, v))
                with sdpa_kernel([SDPBackend.MATH]):
                    ref = F.scaled_dot_product_attention(qf, kf, vf)
                lse_ref = torch.logsumexp(qf @ kf.transpose(-1, -2) / 128 ** 0.5, -1)
                e_plain = (t(plain).float() - ref).abs().max().item()
                e_hw = (t(res.out).float() - ref * hw[..., None, None]).abs().max().item()
                e_lse = (res.lse - lse_ref).abs().max().item()
                nan = bool(torch.isnan(plain).any() or torch.isnan(res.out).any())
                plan = hopper_fwd.split_plan_for(-(-nq // 128) * b * h, -(-nk // 128), q.device,
                                                 (opts["tail_split_tiles"], opts["tail_split_pieces"]) if opts else "auto")
                print(f"B={b} H={h} Nq={nq} Nk={nk} {layout} {dtype} plan={tuple(plan)}: out {e_plain:.1e} "
                      f"hw {e_hw:.1e} lse {e_lse:.1e} nan {nan}", flush=True)
                worst = max(worst, e_plain, e_hw, e_lse * 0.1) if not nan else float("inf")
    print(f"worst {worst:.1e}", flush=True)
    return worst


def timing(dev, shapes, extra):
    for name in shapes:
        shape = SHAPES[name]
        sets = [random_qkv(shape, DTYPES["bf16"], dev, seed=s) for s in range(2)]
        b, h, n, d = sets[0][0].shape
        n_tiles = -(-n // 128) * b * h
        auto = hopper_fwd.split_plan_for(n_tiles, -(-n // 128), dev)

        def cudnn(i):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(*sets[i])

        def ours(opts):
            return lambda i: iidkern.attention(*sets[i], kernel_options=opts)
        variants = {"nosplit": {"tail_split": False}, f"auto{tuple(auto)}": None}
        variants.update({f"force{p}": forced(*p) for p in extra.get(name, ())})
        for label, opts in variants.items():
            r = paired_ratios(ours(opts), cudnn, 2, rounds=3, reps=30)
            gr = paired_graph_ratio(ours(opts), cudnn, 2)
            print(f"{name:14s} {label:18s} {statistics.median(r):.4f}x cuDNN (rounds {min(r):.3f}-{max(r):.3f}) "
                  f"graph {gr:.4f}x", flush=True)


if __name__ == "__main__":
    dev = torch.device("cuda")
    if "--timing-only" in sys.argv:
        timing(dev, ["flux_1024", "flux_1024_b2", "flux_512", "flux_edit"], {})
        sys.exit(0)
    if exactness(dev) > 5e-2:
        print("NOT EXACT", flush=True)
        sys.exit(1)
    extra = {"flux_1024": [(72, 2), (72, 4), (72, 6), (204, 3)], "flux_1024_b2": [(12, 4), (12, 12)],
             "flux_512": [(24, 2), (24, 6)], "flux_edit": [(48, 2), (48, 3)]}
    timing(dev, ["flux_1024", "flux_1024_b2", "flux_512", "flux_edit"], extra)
