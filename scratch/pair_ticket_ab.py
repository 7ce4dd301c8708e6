"""Scratch (GPU): the pair-statistics pass with tickets zeroed by the Hopper kernel
(NOTES.md 52, shipped) against the pass it replaced (slots, then ``partial.sum``: the "cur"
variant of pair_order_ab.py) and against that file's ticket variant (a counter zeroed once
and reset by the last program), Flux 1024² B=2, bf16, pair (0, 1); paired ratios over the
plain call (3 rounds x 40 pairs) and the graph ratio, interleaved rounds; then exactness."""
import torch
import triton

import iidkern
from bench.workloads import DTYPES, SHAPES, random_qkv
from pair_ab_common import pair_sums, print_interleaved_rounds
from pair_order_ab import pass_kernel


def main():
    dev = torch.device("cuda")
    sets = [random_qkv(SHAPES["flux_1024_b2"], DTYPES["bf16"], dev, seed=s) for s in range(2)]
    pairs = [(0, 1)]
    B, H, N, D = sets[0][0].shape
    n_progs = min(triton.cdiv(N, 16), 4 * torch.cuda.get_device_properties(0).multi_processor_count // H)
    partial = torch.empty((H, n_progs, 3), device=dev, dtype=torch.float32)
    final = torch.empty((H, 3), device=dev, dtype=torch.float32)
    counter = torch.zeros(H, device=dev, dtype=torch.int32)

    def old_or_scratch_ticket(fuse):
        def run(i):
            out = iidkern.attention(*sets[i])
            pass_kernel[(n_progs, H)](out, partial, final, counter, 0, 1, *out.stride()[:3], H, N, D, n_progs,
                                      BLOCK_T=16, BLOCK_D=D, REV_H=False, REV_T=False, FUSE_SUM=fuse,
                                      NP_POW2=triton.next_power_of_2(n_progs), num_warps=8)
            return final if fuse else partial.sum(1)
        return run

    def shipped(i):
        return iidkern.attention(*sets[i], pair_stats=pairs)

    def plain(i):
        return iidkern.attention(*sets[i])

    res = shipped(0)
    want = pair_sums(res.out)
    got = torch.stack([res.pair_stats.dot[0], res.pair_stats.norm0_sq[0], res.pair_stats.norm1_sq[0]], -1).double()
    print(f"shipped rel err {((got - want).abs().max() / want.abs().max()).item():.1e}", flush=True)
    variants = {"shipped": shipped, "old": old_or_scratch_ticket(False), "ticket51": old_or_scratch_ticket(True)}
    print_interleaved_rounds(variants, plain)


if __name__ == "__main__":
    main()
