"""Branch-pair head statistics (HeadRouter's IARouter) in one cheap pass over the output.

For each pair of batch rows ``(b0, b1)`` and head ``h``: ``<O_b0,h, O_b1,h>``,
``||O_b0,h||^2`` and ``||O_b1,h||^2`` over all tokens and channels. Program-id mapping:
``program_id(0)`` = one of ``n_progs`` programs of a head, which walks the token tiles
``pid, pid + n_progs, ...``; ``program_id(1)`` = head; one launch per pair. A few programs
an SM, each looping, read the two outputs faster than one program per tile (H100, Flux
1024² B=2: 25.3 against 30.8 µs, bench/NOTES.md 42).

Each program writes its partial sums to its own slot, then takes a ticket from its head's
counter; the program that takes the last ticket adds the head's slots, in slot order, into
the result. So the pass is one launch (no separate sum: bench/NOTES.md 52) and the result is
deterministic. The counters must be zero when the pass starts: the caller zeroes them
earlier on the same stream (the Hopper attention kernel does it in the same call).
"""
import triton
import triton.language as tl


# Batch rows as plain (not specialized) scalars: Triton turns an int argument equal to 1
# into a compile-time constant, on which ``.to`` does not exist, and would compile one
# kernel per distinct (b0 == 1, b1 == 1) combination.
@triton.jit(do_not_specialize=["b0", "b1"])
def pair_stats_kernel(
    O, PARTIAL, COUNTERS, RESULT, b0, b1,
    stride_ob, stride_oh, stride_on,
    num_heads, n_tokens, head_dim, n_progs,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PROGS_POW2: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    base0 = O + b0.to(tl.int64) * stride_ob + h * stride_oh
    base1 = O + b1.to(tl.int64) * stride_ob + h * stride_oh
    offs_d = tl.arange(0, BLOCK_D)
    # Elementwise accumulators: one reduction at the end instead of one per tile.
    dot = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    sq0 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    sq1 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for t0 in range(pid * BLOCK_T, n_tokens, n_progs * BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < n_tokens)[:, None] & (offs_d < head_dim)[None, :]
        rel = offs_t[:, None] * stride_on + offs_d[None, :]
        x0 = tl.load(base0 + rel, mask=ok, other=0.0).to(tl.float32)
        x1 = tl.load(base1 + rel, mask=ok, other=0.0).to(tl.float32)
        dot += x0 * x1
        sq0 += x0 * x0
        sq1 += x1 * x1
    slot = PARTIAL + (h * n_progs + pid) * 3
    tl.store(slot, tl.sum(tl.sum(dot, 1), 0))
    tl.store(slot + 1, tl.sum(tl.sum(sq0, 1), 0))
    tl.store(slot + 2, tl.sum(tl.sum(sq1, 1), 0))
    # Every thread's slot store happens before the ticket (the barrier), and the ticket
    # releases them to the program that takes the last one, whose acquire makes every
    # head's slot visible to its loads.
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNTERS + h, 1, sem="acq_rel", scope="gpu")
    if ticket == n_progs - 1:
        offs_p = tl.arange(0, PROGS_POW2)
        slots = PARTIAL + (h * n_progs + offs_p) * 3
        for c in tl.static_range(3):
            vals = tl.load(slots + c, mask=offs_p < n_progs, other=0.0, volatile=True)
            tl.store(RESULT + h * 3 + c, tl.sum(vals, 0))
