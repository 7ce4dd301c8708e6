"""The last wave's key split: which query tiles to cut into key pieces, and the pass that
joins the pieces.

The Hopper kernel runs one program (two 64-row query tiles, every key tile) per SM. With T
programs on S SMs the last wave holds T mod S programs and leaves the other SMs idle for a
whole program's time: at Flux 1024² (864 programs on 132 SMs, 6.55 waves) that is 7% of the
call, at 512² (288 programs, 2.18 waves) 27%. FlashAttention's split-KV answer, applied to
the tail only: the last ``n_split`` tiles are cut into ``pieces`` runs of key tiles, each a
program of its own that writes its output normalized over its keys and its log-sum-exp; a
small pass (:func:`combine_kernel`) weighs the pieces of each row by their sums. The pieces
come last in the grid, so they are what fills the last wave (bench/NOTES.md 50).
"""
from __future__ import annotations

import functools
import heapq
from typing import NamedTuple

import triton
import triton.language as tl

from .tiles import pow2_at_least

# Cost model of plan_split, in units of one key tile of one program (two query tiles against
# one 128-key tile: ~1.8 us on an H100 at head dim 128). A program's fill and epilogue; a
# piece's, whose epilogue writes fp32; the join pass, per call and per piece it reads (its
# time after the attention, measured against skipping it: ~1.4 units at Flux 512² with 96
# pieces, ~2.5 at Flux 1024² with 216; bench/NOTES.md 62).
PROGRAM_OVERHEAD = 0.5
PIECE_OVERHEAD = 1.0
COMBINE_OVERHEAD = 1.0
COMBINE_PER_PIECE = 0.007
MAX_PIECES = 16
# A split must beat the unsplit estimate by this fraction (the model is rough).
MIN_GAIN = 0.02


class SplitPlan(NamedTuple):
    """Cut the last ``n_split`` of the grid's tiles into ``pieces`` key ranges each (0, 1: none)."""
    n_split: int
    pieces: int

    @property
    def active(self) -> bool:
        return self.n_split > 0 and self.pieces > 1


NO_SPLIT = SplitPlan(0, 1)


def piece_range(part: int, pieces: int, n_key_tiles: int) -> tuple:
    """Key tiles ``[start, stop)`` of piece ``part`` (as the kernel computes them)."""
    return part * n_key_tiles // pieces, (part + 1) * n_key_tiles // pieces


def estimated_time(n_tiles: int, n_key_tiles: int, n_sms: int, plan: SplitPlan) -> float:
    """Makespan in key-tile units when programs start in grid order on the first free SM (one
    program an SM), the join pass included."""
    if plan.active and not (plan.n_split <= n_tiles and plan.pieces <= n_key_tiles):
        raise ValueError(f"plan {tuple(plan)} does not fit a grid of {n_tiles} tiles of {n_key_tiles} key tiles")
    n_whole = n_tiles - (plan.n_split if plan.active else 0)
    whole = n_key_tiles + PROGRAM_OVERHEAD
    waves, extra = divmod(n_whole, n_sms)
    finish = [(waves + 1) * whole] * extra + [waves * whole] * (n_sms - extra)
    if not plan.active:
        return max(finish)
    heapq.heapify(finish)
    lengths = [b - a for a, b in (piece_range(p, plan.pieces, n_key_tiles) for p in range(plan.pieces))]
    for _ in range(plan.n_split):
        for length in lengths:
            heapq.heappush(finish, heapq.heappop(finish) + length + PIECE_OVERHEAD)
    return max(finish) + COMBINE_OVERHEAD + COMBINE_PER_PIECE * plan.n_split * plan.pieces


@functools.lru_cache(maxsize=1024)
def plan_split(n_tiles: int, n_key_tiles: int, n_sms: int, max_pieces: int = MAX_PIECES) -> SplitPlan:
    """The split of the grid's last tiles that the cost model finds fastest, or ``NO_SPLIT``
    where none gains ``MIN_GAIN`` (no tail, a tail that fills most of a wave, few key tiles).
    Only the tail itself is split: splitting one more wave's tiles too never won, in the model
    (over 3328 grids) or on the H100 (Flux 1024²: (204, 3) 1.068x cuDNN, (72, 3) 1.023x).
    ``max_pieces`` bounds the pieces of a tile (each holds fp32 rows of scratch)."""
    tail = n_tiles % n_sms
    if tail == 0 or n_key_tiles < 2:
        return NO_SPLIT
    best, best_time = NO_SPLIT, estimated_time(n_tiles, n_key_tiles, n_sms, NO_SPLIT)
    unsplit = best_time
    for pieces in range(2, min(n_key_tiles, max_pieces) + 1):
        plan = SplitPlan(tail, pieces)
        t = estimated_time(n_tiles, n_key_tiles, n_sms, plan)
        if t < best_time:
            best, best_time = plan, t
    return best if best_time <= unsplit * (1 - MIN_GAIN) else NO_SPLIT


# The join's programs: one warp each, holding every piece of its rows at once (64 fp32 of
# partial output a thread). Many small programs measured faster than few large ones (H100,
# Flux 512²: 4 rows a warp 1.040x cuDNN, 32 rows with 4 warps 1.062x; bench/NOTES.md 62).
COMBINE_VALUES_PER_WARP = 2048  # (pieces padded) x rows x head_dim that one warp holds: 64 a thread
COMBINE_WARPS = 1


def combine_shape(pieces: int, tile_rows: int, head_dim: int) -> tuple:
    """``(pieces padded to a power of two, rows a program, warps)`` of the join pass."""
    pieces_p2 = pow2_at_least(pieces)
    rows = max(1, min(tile_rows, COMBINE_VALUES_PER_WARP * COMBINE_WARPS // (pieces_p2 * head_dim)))
    return pieces_p2, 1 << (rows.bit_length() - 1), COMBINE_WARPS


@triton.jit
def combine_kernel(PART_O, PART_LSE, O, LSE, HW, stride_ob, stride_oh, stride_on, hw_sb, hw_sh, hw_sn,
                   PART_KG, KGO, kg_q0, kg_q1, n_groups, n_whole, n_qp, pieces, n_heads, n_q,
                   TILE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr,
                   PIECES_P2: tl.constexpr, HAS_HW: tl.constexpr, STORE_LSE: tl.constexpr, HAS_KG: tl.constexpr):
    """Join the pieces of split tile ``program_id(0)`` for rows block ``program_id(1)``.

    Piece ``j`` of split tile ``t`` holds, for the tile's ``TILE_ROWS`` rows, the output over
    its keys normalized by its own sum (``PART_O`` [pieces of all tiles, TILE_ROWS, HEAD_DIM]
    fp32) and ``log2`` of that sum at the scaled scores (``PART_LSE``). The output is their
    average weighted by ``2^lse``; the tile is grid tile ``n_whole + t`` (query-tile pair
    ``% n_qp`` of (batch, head) ``// n_qp``). Key-group sums (a fused probe, ``PART_KG``
    [..., G_PAD] per piece row, normalized over the piece's keys) are joined alike into
    ``KGO`` [B, H, kg_q1 - kg_q0, n_groups]; head weights do not touch them.

    Every piece's rows are loaded at once (``PIECES_P2`` >= ``pieces``, a power of two): the
    pass is one round trip to memory, not one per piece. Its time after the attention is
    what the split costs (bench/NOTES.md 62), so programs are small and many."""
    t = tl.program_id(0)
    tile = n_whole + t
    bh = tile // n_qp
    batch = bh // n_heads
    head = bh % n_heads
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = (tile % n_qp) * TILE_ROWS + r
    row_ok = rows < n_q
    cols = tl.arange(0, HEAD_DIM)
    js = tl.arange(0, PIECES_P2)
    j_ok = js < pieces
    part_rows = ((t * pieces + js)[:, None] * TILE_ROWS + r[None, :]).to(tl.int64)  # [PIECES_P2, BLOCK_R]
    lse = tl.load(PART_LSE + part_rows, mask=j_ok[:, None], other=-float("inf"))
    part_o = tl.load(PART_O + part_rows[:, :, None] * HEAD_DIM + cols[None, None, :], mask=j_ok[:, None, None],
                     other=0.0)
    # Every piece has real keys, so its log2-sum is finite; absent pieces weigh exp2(-inf) = 0.
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m[None, :])
    total = tl.sum(w, 0)
    acc = tl.sum(w[:, :, None] * part_o, 0)
    scale = 1.0 / total
    if HAS_HW:
        scale = scale * tl.load(HW + batch * hw_sb + head * hw_sh + rows * hw_sn, mask=row_ok, other=0.0).to(tl.float32)
    o_base = O + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_base + rows.to(tl.int64)[:, None] * stride_on + cols[None, :],
             (acc * scale[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    if HAS_KG:
        g_cols = tl.arange(0, G_PAD)
        part_g = tl.load(PART_KG + part_rows[:, :, None] * G_PAD + g_cols[None, None, :], mask=j_ok[:, None, None],
                         other=0.0)
        acc_g = tl.sum(w[:, :, None] * part_g, 0)
        g_ok = row_ok & (rows >= kg_q0) & (rows < kg_q1)
        g_row = bh.to(tl.int64) * (kg_q1 - kg_q0) + (rows - kg_q0)
        tl.store(KGO + g_row[:, None] * n_groups + g_cols[None, :], acc_g / total[:, None],
                 mask=g_ok[:, None] & (g_cols < n_groups)[None, :])
    if STORE_LSE:  # natural log, as the kernel's own LSE
        tl.store(LSE + bh.to(tl.int64) * n_q + rows, (m + tl.log2(total)) * 0.6931471805599453, mask=row_ok)
