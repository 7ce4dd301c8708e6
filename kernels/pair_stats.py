"""Branch-pair head statistics (HeadRouter's IARouter) in one cheap pass over the output.

For each pair of batch rows ``(b0, b1)`` and head ``h``: ``<O_b0,h, O_b1,h>``,
``||O_b0,h||^2`` and ``||O_b1,h||^2`` over all tokens and channels. Program-id mapping:
``program_id(0)`` = token chunk, ``program_id(1)`` = head; one launch per pair. Each program writes
its partial sums to its own slot (no atomics); the host adds the chunks, so the result
is deterministic.
"""
import triton
import triton.language as tl


# Batch rows as plain (not specialized) scalars: Triton turns an int argument equal to 1
# into a compile-time constant, on which ``.to`` does not exist, and would compile one
# kernel per distinct (b0 == 1, b1 == 1) combination.
@triton.jit(do_not_specialize=["b0", "b1"])
def pair_stats_kernel(
    O, PARTIAL, b0, b1,
    stride_ob, stride_oh, stride_on,
    num_heads, n_tokens, head_dim, n_chunks,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b0 = b0.to(tl.int64)
    b1 = b1.to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_t < n_tokens)[:, None] & (offs_d < head_dim)[None, :]
    rel = h * stride_oh + offs_t[:, None] * stride_on + offs_d[None, :]
    x0 = tl.load(O + b0 * stride_ob + rel, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(O + b1 * stride_ob + rel, mask=ok, other=0.0).to(tl.float32)
    slot = PARTIAL + (h * n_chunks + pid_t) * 3
    tl.store(slot, tl.sum(tl.sum(x0 * x1, 1), 0))
    tl.store(slot + 1, tl.sum(tl.sum(x0 * x0, 1), 0))
    tl.store(slot + 2, tl.sum(tl.sum(x1 * x1, 1), 0))
