"""Attention forward for Hopper (sm_90) in Gluon: the fast path of calls without value probes.

Why a second kernel: Triton's compiler serializes each ``tl.dot`` with a ``wgmma.wait 0``, so
on an H100 the tensor cores idle while softmax runs, and the Triton kernel stays 1.15-1.3x
behind cuDNN at head_dim 128 (bench/NOTES.md 26, 30). Gluon (``triton.experimental.gluon``)
exposes what FlashAttention-3 is built from, and this kernel follows FA3's schedule:

* one **loader warp** streams K/V tiles by TMA into an ``NBUF``-slot ring (mbarriers
  ``kv_ready``/``kv_empty``);
* two **consumer warpgroups**, each owning ``BLOCK_M`` = 64 query rows, take turns on the
  tensor cores (**ping-pong**: mbarrier ``turn`` pair): while one runs its softmax, the other's
  GEMMs run;
* within a turn a consumer issues ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` back to back as
  async wgmmas (**intra-warpgroup overlap**) and computes softmax_j while ``PV_{j-1}`` is in
  flight; P stays in registers as the A operand.

Program-id mapping: axis 0 = a pair of query tiles (2 x BLOCK_M rows), axis 1 = (batch, head),
so programs that run together share one head's K/V in L2. With the last wave's key split
(``SPLIT``, ``tail_split.py``) the grid has one axis: the whole tiles in that order, then the
pieces of the last tiles' key ranges.

Scope: fp16/bf16, head_dim 128 (and 64 on long key sequences: ``serves_head_dim``), any
Nq/Nk (ragged last tiles: TMA zero-fills rows past the end, the last key tile is masked,
stores are masked), both layouts and any 16-byte aligned
strides (4-D TMA descriptors over the [B, H, N, D] view), optional head weights and LSE, and
optionally a fused key-group probe (IID's image x instruction map: per query row, the
probability mass on each of up to 32 key groups; see ``_key_group_update``) and a block
multiplier (HeadRouter's post-softmax weights on one sub-block; see ``_multiplier_tile``), and
token tags (IID's instruction masks): the loader walks a per-query-tile list of the key
tiles to visit (``tiles.VisitLists``: full tiles, then partial ones; skipped tiles are never
loaded), the consumers run the full ones unmasked and tag-mask the partial ones.
Gluon does not run under TRITON_INTERPRET: CPU CI compiles this kernel for sm_90
(tests/test_hopper_fwd.py); correctness is tested on the GPU against the reference.
"""
from __future__ import annotations

import functools
import re

import torch
import triton

from .fast_launch import Launcher, workspace
from .flash_fwd import LOG2E
from .kernel_args import KeyGroupArgs, MultiplierArgs, scales_p_for_key_groups
from .tail_split import MAX_PIECES, NO_SPLIT, SplitPlan, combine_kernel, combine_shape, plan_split
from .tiles import cdiv, pow2_at_least

# Gluon is experimental and its API moves between releases: the kernel is written for 3.6
# (run on the H100) and compiled by CPU CI on its newer Triton; older ones keep the Triton kernel.
MIN_TRITON = (3, 6)


def triton_supports_gluon_kernel(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    return bool(match) and (int(match.group(1)), int(match.group(2))) >= MIN_TRITON


try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load.
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    AVAILABLE = hasattr(gl, "warp_specialize") and triton_supports_gluon_kernel(triton.__version__)
except ImportError:  # a Triton without Gluon: the Triton kernel serves every call
    AVAILABLE = False

HEAD_DIMS = (128,)
# Head dim 64 (SD3) runs here only for long key sequences: H100, bf16, interleaved A/B against
# the Triton kernel (bench/NOTES.md 38): 1.07x slower at 4429 keys (SD3 1024²), where the
# Triton kernel's three programs per SM hide more latency, 0.91x at 16717 keys (2048²).
LONG_HEAD_DIMS = (64,)
LONG_MIN_KEYS = 16384
# ... but a call whose extras run inside the kernel (a block multiplier or a fused key-group
# probe, no tags) is faster here from far fewer keys (NOTES.md 68; ratios to the Triton plain
# call at SD3 1024², 4429 keys: multiplier 1.30x -> 1.26x, IID probe 1.14x -> 1.10x). At 1357
# keys graph replays were faster too but eager calls mixed, so the measured winning point is kept.
LONG_EXTRAS_MIN_KEYS = 4096
LIGHT_SPLIT_PIECES = 2  # the tail split's pieces a tile for those calls (hopper_attention)
# Block multiplier values that a head-dim-128 call may split with (two a register; NOTES.md 71).
HALF_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_M = 64  # query rows per consumer warpgroup (one wgmma M)
BLOCK_N = 128  # keys per tile
NUM_BUFFERS = 3  # K/V ring slots: 2 x 32 KB each at D=128, 224 KB shared memory in all
CONSUMER_REGS = 240  # registers per thread in the consumer warpgroups (setmaxnreg)
LOADER_REGS = 24


if AVAILABLE:

    @gluon.jit
    def _key_start(vis_base, i, BLOCK_N: gl.constexpr, HAS_TAGS: gl.constexpr):
        """First key of the i-th key tile a program visits: the i-th tile, or with tags the
        i-th entry of its query tile's visit list (skipped tiles are not in it)."""
        if HAS_TAGS:
            return gl.load(vis_base + i) * BLOCK_N
        else:
            return i * BLOCK_N

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty,
                batch, head, q_start, kt0, n_kt, vis_base, vis_count_ptr, list_row,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NBUF: gl.constexpr,
                HAS_TAGS: gl.constexpr):
        """One warp: both query tiles once, then K/V tiles into the ring as slots free up.
        Without tags the key tiles ``[kt0, kt0 + n_kt)`` (all of them, or a split piece's)."""
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [batch, head, q_start, 0], q_bar, q_smem.index(0).reshape([1, 1, BLOCK_M, HEAD_DIM]))
        _tma_load(q_desc, [batch, head, q_start + BLOCK_M, 0], q_bar,
                  q_smem.index(1).reshape([1, 1, BLOCK_M, HEAD_DIM]))
        if HAS_TAGS:
            # The visit list is read after Q is on its way, and each entry one tile ahead of
            # its use: the loads' latency would otherwise delay the ring's first tiles.
            n_visit = gl.load(vis_count_ptr + list_row)
            next_tile = gl.load(vis_base, mask=n_visit > 0, other=0)
        else:
            n_visit = n_kt
            next_tile = 0
        for i in range(n_visit):
            slot = i % NBUF
            if HAS_TAGS:
                key_start = next_tile * BLOCK_N
                next_tile = gl.load(vis_base + i + 1, mask=i + 1 < n_visit, other=0)
            else:
                key_start = (kt0 + i) * BLOCK_N
            # A fresh barrier counts as having completed the phase before phase 0, so the
            # first pass over the ring does not wait.
            mbarrier.wait(kv_empty.index(slot), ((i // NBUF) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [batch, head, key_start, 0], kv_ready.index(slot),
                      k_smem.index(slot).reshape([1, 1, BLOCK_N, HEAD_DIM]))
            _tma_load(v_desc, [batch, head, key_start, 0], kv_ready.index(slot),
                      v_smem.index(slot).reshape([1, 1, BLOCK_N, HEAD_DIM]))

    @gluon.jit
    def _masked_keys(s, key_start, n_k, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Scores of keys past the end (zero-filled by TMA) become -inf."""
        cols = key_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        return gl.where((cols < n_k)[None, :], s, -float("inf"))

    @gluon.jit
    def _tag_masked(s, q_tags, key_start, kt_base, n_k, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Scores a query may not see (no tag bit shared with the key) become -inf; keys past
        the end read tag 0, so this masks them too. The key tags load coalesced (a thread per
        key) and are then spread to the score layout, where a thread holds 32 columns."""
        nw: gl.constexpr = gl.num_warps()
        key_layout: gl.constexpr = gl.BlockedLayout([1], [32], [nw], [0])
        keys = key_start + gl.arange(0, BLOCK_N, layout=key_layout)
        k_tags = gl.load(kt_base + keys, mask=keys < n_k, other=0)
        k_tags = gl.convert_layout(k_tags, gl.SliceLayout(0, s_layout))
        return gl.where((q_tags[:, None] & k_tags[None, :]) != 0, s, -float("inf"))

    @gluon.jit
    def _tile_in_span(rows_hit, key_start, k0, k1, BLOCK_N: gl.constexpr):
        """Whether a key tile meets the key range [k0, k1) of an extra whose query rows this
        warpgroup holds (``rows_hit``): tiles outside it skip the extra's work."""
        return rows_hit & (key_start < k1) & (key_start + BLOCK_N > k0)

    @gluon.jit
    def _multiplier_tile(m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, row0, key_start,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """The block multiplier M on this key tile (1 outside the sub-block), fp32 in the score
        layout: P times it is what P @ V gets; the normalizer and the probes take P unweighted.

        M is read straight into the accumulator layout (a thread's two adjacent columns per
        8-column step: whole 32-byte sectors per warp, vector loads when the launch finds the
        pointer, strides and sub-block bounds 16-aligned); staging it through shared memory
        for a coalesced load would need 32 KB that the K/V ring leaves no room for.
        """
        rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        cols = key_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        inside = ((rows >= m_q0) & (rows < m_q1))[:, None] & ((cols >= m_k0) & (cols < m_k1))[None, :]
        m = gl.load(m_base + (rows - m_q0)[:, None] * m_sq + (cols - m_k0)[None, :] * m_sk, mask=inside, other=1.0)
        return m.to(gl.float32)

    @gluon.jit
    def _key_group_update(acc_g, m_g, p, m_use, m_new, key_start, kg_base, kg_k0, kg_k1,
                          BLOCK_N: gl.constexpr, G_PAD: gl.constexpr, SCALED_P: gl.constexpr,
                          g_layout: gl.constexpr):
        """Fold this key tile's probabilities into the per-row sums of each key group.

        The sums are ``P @ onehot(group id)``: a [BLOCK_N, G_PAD] one-hot built in registers
        and an mma.sync (``mma_v2``, both operands in registers): a wgmma would want the one-hot
        in shared memory, and the K/V ring leaves none. P enters as fp16 (one rounding of
        2^-11 per term; P @ V rounds it to the input dtype too): the sums' relative error is
        ~3e-5, where the Triton kernel's hi + lo split costs twice the products and registers
        this kernel does not have. With key groups P comes scaled by 2^14 (``_softmax_tile``),
        so a P down to ~4e-9 of the row max is a normal fp16 number, not a subnormal one.
        Where it does not (``SCALED_P`` off: fp16 inputs with a block multiplier, see
        ``_scaled_p``), P is scaled by 2^14 here, just for this product (p <= 1, so p * 2^14
        fits fp16), and the epilogue takes the factor out: the same range and precision.
        (A bf16 hi + lo split, fp32's range, doubled ptxas's spills there: 137 -> 277.)
        ``acc_g`` stays relative to ``m_g``, the running max at its last update, so key tiles
        outside the groups' span never rescale it (the epilogue brings it to the final max);
        ``m_g = -inf`` (nothing added yet) scales the zeros by 0.
        ``p`` is relative to ``m_use``: the running max ``m_new``, or 0 on a row that no key
        has reached yet (tags), which keeps ``m_g`` at -inf.
        """
        nw: gl.constexpr = gl.num_warps()
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=g_layout, k_width=2)
        # One coalesced load of the tile's ids (a thread per key), then spread to the operand
        # layout, where every thread holds 32 keys (32 scalar loads a thread if loaded there).
        id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [nw], [0])
        keys = key_start + gl.arange(0, BLOCK_N, layout=id_layout)
        ids = gl.load(kg_base + keys, mask=(keys >= kg_k0) & (keys < kg_k1), other=-1)
        ids = gl.convert_layout(ids, gl.SliceLayout(1, b_layout))
        groups = gl.arange(0, G_PAD, layout=gl.SliceLayout(0, b_layout))
        one_hot = (ids[:, None] == groups[None, :]).to(gl.float16)
        g_sum = gl.zeros([p.shape[0], G_PAD], gl.float32, layout=g_layout)
        if SCALED_P:
            p16 = p.to(gl.float16)
        else:  # the sums carry 2^14 here; the epilogue takes it out (g_scale in _consumer)
            p16 = (p * 16384.0).to(gl.float16)
        g_sum = mma_v2(gl.convert_layout(p16, a_layout), one_hot, g_sum)
        rescale = gl.exp2(m_g - m_use)
        acc_g = acc_g * gl.convert_layout(rescale, gl.SliceLayout(1, g_layout))[:, None] + g_sum
        return acc_g, m_new

    @gluon.constexpr_function
    def _scaled_p(has_kg, has_mult, dtype):
        """Whether p carries 2^14 (``_softmax_tile``): with key groups, as
        ``kernel_args.scales_p_for_key_groups`` rules."""
        return bool(has_kg) and scales_p_for_key_groups(bool(has_mult), dtype == gl.float16)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, qk_scale, MASKED: gl.constexpr, SCALED_P: gl.constexpr):
        """Online-softmax step on a score tile: (p, new running max, its usable value, rescale
        of the old sums, new row sum). On a masked tile a row may have no key yet (tags): its
        max stays -inf and the exponents use 0 instead, so p and the rescale are 0, not NaN.

        ``SCALED_P`` (with key groups; see ``_scaled_p``): the running max is kept 14 below
        the true one, so p, and the row sum with it, carry a factor 2^14 (p <= 16384 fits fp16
        and bf16; with a multiplier M on fp16 inputs 2^14 * M may not, so there it is off). The
        key-group product takes p as fp16, whose smallest normal is 6.1e-5: unscaled, a group
        of keys with p ~1e-6 of the row max would be summed from subnormals, some 3% off. Every
        result is a ratio of such sums or ``m + log2(l)``, so none needs a correction.
        (Shifting the max is one op per row; shifting p cost registers, and ptxas spills.)"""
        if SCALED_P:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale - 14.0)
        else:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        if MASKED:
            m_use = gl.where(m_new == -float("inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, m_use, alpha, l_i

    @gluon.jit
    def _mask_tile(s, key_start, n_k, q_tags, kt_base, BLOCK_N: gl.constexpr, HAS_TAGS: gl.constexpr,
                   s_layout: gl.constexpr):
        """A masked tile's scores: the tag mask with tags, else keys past the end."""
        if HAS_TAGS:
            return _tag_masked(s, q_tags, key_start, kt_base, n_k, BLOCK_N, s_layout)
        else:
            return _masked_keys(s, key_start, n_k, BLOCK_N, s_layout)

    @gluon.jit
    def _first_tile(q, k_smem, kv_ready, turn_bar, m_i, l_i, acc_g, m_g, key_start, n_k, qk_scale,
                    q_tags, kt_base, kg_base, kg_rows_hit, kg_k0, kg_k1,
                    m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                    WG: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    HAS_TAGS: gl.constexpr, HAS_KG: gl.constexpr, G_PAD: gl.constexpr, HAS_MULT: gl.constexpr,
                    s_layout: gl.constexpr, g_layout: gl.constexpr):
        """The first key tile a program visits: S alone, there is no P yet; warpgroup 1 starts
        one turn behind. ``MASK``: as in :func:`_turn`."""
        mbarrier.wait(kv_ready.index(0), 0)
        mbarrier.wait(turn_bar.index(WG), 0, pred=WG == 1)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(turn_bar.index(1 - WG))
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        if MASK:
            s = _mask_tile(s, key_start, n_k, q_tags, kt_base, BLOCK_N, HAS_TAGS, s_layout)
        p, m_i, m_use, alpha, l_i = _softmax_tile(s, m_i, l_i, qk_scale, MASK, _scaled_p(HAS_KG, HAS_MULT, q.dtype))
        if HAS_KG:
            if _tile_in_span(kg_rows_hit, key_start, kg_k0, kg_k1, BLOCK_N):
                acc_g, m_g = _key_group_update(acc_g, m_g, p, m_use, m_i, key_start, kg_base, kg_k0, kg_k1,
                                               BLOCK_N, G_PAD, _scaled_p(HAS_KG, HAS_MULT, q.dtype), g_layout)
        if HAS_MULT:
            if _tile_in_span(m_rows_hit, key_start, m_k0, m_k1, BLOCK_N):
                p = p * _multiplier_tile(m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, row0, key_start,
                                         BLOCK_M, BLOCK_N, s_layout)
        return p, m_i, l_i, acc_g, m_g

    @gluon.jit
    def _turn(q, k_smem, v_smem, kv_ready, kv_empty, turn_bar, p, m_i, l_i, acc, acc_g, m_g, i, key_start, n_k,
              qk_scale, q_tags, kt_base, kg_base, kg_rows_hit, kg_k0, kg_k1,
              m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
              WG: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NBUF: gl.constexpr,
              HAS_TAGS: gl.constexpr, HAS_KG: gl.constexpr, G_PAD: gl.constexpr, HAS_MULT: gl.constexpr,
              s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, g_layout: gl.constexpr):
        """The i-th visited key tile (i >= 1, its keys from ``key_start``): issue S_i and
        PV_{i-1}, hand the tensor cores over, softmax_i. ``MASK``: apply the tag mask (with
        tags) or the end-of-keys mask."""
        slot = i % NBUF
        prev = (i - 1) % NBUF
        mbarrier.wait(kv_ready.index(slot), (i // NBUF) & 1)
        mbarrier.wait(turn_bar.index(WG), (i & 1) ^ WG ^ 1)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        s_tok = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(gl.convert_layout(p.to(q.dtype), p_layout), v_smem.index(prev), acc, is_async=True)
        mbarrier.arrive(turn_bar.index(1 - WG))
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
        if MASK:
            s = _mask_tile(s, key_start, n_k, q_tags, kt_base, BLOCK_N, HAS_TAGS, s_layout)
        p, m_new, m_use, alpha, l_i = _softmax_tile(s, m_i, l_i, qk_scale, MASK,
                                                    _scaled_p(HAS_KG, HAS_MULT, q.dtype))
        if HAS_KG:  # while PV_{i-1} is in flight; only tiles in the groups' key span
            if _tile_in_span(kg_rows_hit, key_start, kg_k0, kg_k1, BLOCK_N):
                acc_g, m_g = _key_group_update(acc_g, m_g, p, m_use, m_new, key_start, kg_base, kg_k0, kg_k1,
                                               BLOCK_N, G_PAD, _scaled_p(HAS_KG, HAS_MULT, q.dtype), g_layout)
        if HAS_MULT:
            # M's tile loads while PV_{i-1} finishes, and weights P after its sums (l, probes):
            # multiplying before the wait cost more spills and was no faster (NOTES.md 33).
            # M lives only on the multiplied tiles, so each branch has its own wait.
            if _tile_in_span(m_rows_hit, key_start, m_k0, m_k1, BLOCK_N):
                m = _multiplier_tile(m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, row0, key_start,
                                     BLOCK_M, BLOCK_N, s_layout)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
                p = p * m
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
        mbarrier.arrive(kv_empty.index(prev))  # K_{i-1} and V_{i-1} are consumed
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        return p, m_new, l_i, acc, acc_g, m_g

    @gluon.jit
    def _store_output(acc, m_i, l_i, o_ptr, o_sb, o_sh, o_sn, lse_ptr, hw_ptr, hw_sb, hw_sh, hw_sn,
                      batch, head, n_heads, row0, n_q, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                      HAS_HW: gl.constexpr, STORE_LSE: gl.constexpr, HAS_TAGS: gl.constexpr,
                      s_layout: gl.constexpr, o_layout: gl.constexpr):
        """A warpgroup's rows of the output (normalized, head-weighted) and their LSE."""
        rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        row_ok = rows < n_q
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        if HAS_TAGS:  # a query with no allowed key gets a zero output (and LSE -inf)
            inv_l = gl.where(l_o > 0, 1.0 / l_o, 0.0)
        else:
            inv_l = 1.0 / l_o
        if HAS_HW:  # per-(batch, head, query) weight on the output, broadcast through zero strides
            inv_l = inv_l * gl.load(hw_ptr + batch * hw_sb + head * hw_sh + rows * hw_sn, mask=row_ok, other=0.0).to(gl.float32)
        out = acc * inv_l[:, None]
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_base = o_ptr + batch.to(gl.int64) * o_sb + head.to(gl.int64) * o_sh
        gl.store(o_base + rows.to(gl.int64)[:, None] * o_sn + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if STORE_LSE:  # natural-log LSE of the scaled scores: (m + log2 l) * ln 2; -inf for no key
            lse_rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            lse = (m_i + gl.log2(l_i)) / 1.4426950408889634
            gl.store(lse_ptr + (batch * n_heads + head).to(gl.int64) * n_q + lse_rows, lse, mask=lse_rows < n_q)

    @gluon.jit
    def _store_piece(acc, m_i, l_i, part_o_ptr, part_lse_ptr, piece, WG: gl.constexpr, BLOCK_M: gl.constexpr,
                     HEAD_DIM: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
        """A split piece's rows: the output over its keys alone, normalized, in fp32, and the
        log2-sum-exp of its scaled scores (``tail_split.combine_kernel`` weighs the pieces by it). Rows
        past the end are stored too (the workspace holds whole tiles; they are never read)."""
        rows = piece * (2 * BLOCK_M) + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        gl.store(part_o_ptr + rows.to(gl.int64)[:, None] * HEAD_DIM + cols[None, :], acc * (1.0 / l_o)[:, None])
        lse_rows = piece * (2 * BLOCK_M) + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        gl.store(part_lse_ptr + lse_rows, m_i + gl.log2(l_i))

    @gluon.jit
    def _consumer(WG: gl.constexpr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn_bar,
                  o_ptr, o_sb, o_sh, o_sn, lse_ptr, hw_ptr, hw_sb, hw_sh, hw_sn,
                  kg_ptr, kg_sb, kg_q0, kg_q1, kg_k0, kg_k1, n_groups, kgo_ptr, kgc_ptr, kgc_sb,
                  m_ptr, m_sb, m_sh, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1,
                  qt_ptr, qt_sb, kt_ptr, kt_sb, vis_base, vis_full_ptr, vis_count_ptr, list_row,
                  batch, head, n_heads, q_start, n_q, n_k, qk_scale, kt0, n_kt, piece, part_o_ptr, part_lse_ptr,
                  part_kg_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NBUF: gl.constexpr,
                  HAS_HW: gl.constexpr, STORE_LSE: gl.constexpr, HAS_KG: gl.constexpr, G_PAD: gl.constexpr,
                  HAS_MULT: gl.constexpr, HAS_TAGS: gl.constexpr, SPLIT: gl.constexpr):
        """One warpgroup: BLOCK_M query rows against the visited key tiles, online softmax in
        exp2. With tags, visit positions [0, n_full) hold full tiles and run unmasked, and
        [n_full, n_visit) partial ones, tag masked; without, the key tiles [kt0, kt0 + n_kt),
        the first and the last of them masked (keys past the end). A split piece
        (``piece >= 0``) writes its normalized partial output and log2-sum-exp for
        ``tail_split.combine_kernel`` instead of the output (and its key-group sums so too)."""
        nw: gl.constexpr = gl.num_warps()
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        # Key-group sums (a fused probe): mma.sync accumulators, one warp per 16 rows like S.
        g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1],
                                                           instr_shape=[16, 8])
        q = q_smem.index(WG)
        row0 = q_start + WG * BLOCK_M
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        acc_g = gl.zeros([BLOCK_M, G_PAD], gl.float32, layout=g_layout)
        m_g = gl.full([BLOCK_M], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        p = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        kg_base = kg_ptr + batch.to(gl.int64) * kg_sb
        kg_rows_hit = (row0 < kg_q1) & (row0 + BLOCK_M > kg_q0)
        m_base = m_ptr + batch.to(gl.int64) * m_sb + head.to(gl.int64) * m_sh
        m_rows_hit = (row0 < m_q1) & (row0 + BLOCK_M > m_q0)
        kt_base = kt_ptr + batch.to(gl.int64) * kt_sb
        if HAS_TAGS:  # read while Q loads; rows past the end read tag 0: no key, and are not stored
            tag_rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            q_tags = gl.load(qt_ptr + batch.to(gl.int64) * qt_sb + tag_rows, mask=tag_rows < n_q, other=0)
            n_full = gl.load(vis_full_ptr + list_row)
            n_visit = gl.load(vis_count_ptr + list_row)
        else:
            q_tags = 0
            n_visit = n_kt
            n_full = n_visit - 1
        mbarrier.wait(q_bar, 0)

        if HAS_TAGS:
            # Full tiles, then partial ones; a query tile whose keys are all skipped visits none.
            if n_full > 0:
                p, m_i, l_i, acc_g, m_g = _first_tile(
                    q, k_smem, kv_ready, turn_bar, m_i, l_i, acc_g, m_g, _key_start(vis_base, 0, BLOCK_N, HAS_TAGS),
                    n_k, qk_scale, q_tags, kt_base, kg_base, kg_rows_hit, kg_k0, kg_k1,
                    m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                    WG, False, BLOCK_M, BLOCK_N, HAS_TAGS, HAS_KG, G_PAD, HAS_MULT, s_layout, g_layout)
            elif n_visit > 0:
                p, m_i, l_i, acc_g, m_g = _first_tile(
                    q, k_smem, kv_ready, turn_bar, m_i, l_i, acc_g, m_g, _key_start(vis_base, 0, BLOCK_N, HAS_TAGS),
                    n_k, qk_scale, q_tags, kt_base, kg_base, kg_rows_hit, kg_k0, kg_k1,
                    m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                    WG, True, BLOCK_M, BLOCK_N, HAS_TAGS, HAS_KG, G_PAD, HAS_MULT, s_layout, g_layout)
            for i in range(1, n_full):
                p, m_i, l_i, acc, acc_g, m_g = _turn(
                    q, k_smem, v_smem, kv_ready, kv_empty, turn_bar, p, m_i, l_i, acc, acc_g, m_g, i,
                    _key_start(vis_base, i, BLOCK_N, HAS_TAGS), n_k, qk_scale, q_tags, kt_base,
                    kg_base, kg_rows_hit, kg_k0, kg_k1, m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                    WG, False, BLOCK_M, BLOCK_N, NBUF, HAS_TAGS, HAS_KG, G_PAD, HAS_MULT,
                    s_layout, o_layout, p_layout, g_layout)
            for i in range(gl.maximum(n_full, 1), n_visit):
                p, m_i, l_i, acc, acc_g, m_g = _turn(
                    q, k_smem, v_smem, kv_ready, kv_empty, turn_bar, p, m_i, l_i, acc, acc_g, m_g, i,
                    _key_start(vis_base, i, BLOCK_N, HAS_TAGS), n_k, qk_scale, q_tags, kt_base,
                    kg_base, kg_rows_hit, kg_k0, kg_k1, m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                    WG, True, BLOCK_M, BLOCK_N, NBUF, HAS_TAGS, HAS_KG, G_PAD, HAS_MULT,
                    s_layout, o_layout, p_layout, g_layout)
            if n_visit > 0:
                last = (n_visit - 1) % NBUF
                o_tok = warpgroup_mma(gl.convert_layout(p.to(q.dtype), p_layout), v_smem.index(last), acc,
                                      is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
                mbarrier.arrive(kv_empty.index(last))
        else:
            # Tile 0 masked, whole key tiles, then the last one with the key mask (a ragged
            # tail or not: it is one tile, and this keeps the loop body free of the mask).
            key0 = kt0 * BLOCK_N
            p, m_i, l_i, acc_g, m_g = _first_tile(
                q, k_smem, kv_ready, turn_bar, m_i, l_i, acc_g, m_g, key0, n_k, qk_scale, q_tags, kt_base,
                kg_base, kg_rows_hit, kg_k0, kg_k1, m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                WG, True, BLOCK_M, BLOCK_N, HAS_TAGS, HAS_KG, G_PAD, HAS_MULT, s_layout, g_layout)
            for j in range(1, n_visit - 1):
                p, m_i, l_i, acc, acc_g, m_g = _turn(
                    q, k_smem, v_smem, kv_ready, kv_empty, turn_bar, p, m_i, l_i, acc, acc_g, m_g, j, key0 + j * BLOCK_N,
                    n_k, qk_scale, q_tags, kt_base, kg_base, kg_rows_hit, kg_k0, kg_k1,
                    m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                    WG, False, BLOCK_M, BLOCK_N, NBUF, HAS_TAGS, HAS_KG, G_PAD, HAS_MULT,
                    s_layout, o_layout, p_layout, g_layout)
            if n_visit > 1:
                p, m_i, l_i, acc, acc_g, m_g = _turn(
                    q, k_smem, v_smem, kv_ready, kv_empty, turn_bar, p, m_i, l_i, acc, acc_g, m_g, n_visit - 1,
                    key0 + (n_visit - 1) * BLOCK_N, n_k, qk_scale, q_tags, kt_base, kg_base, kg_rows_hit, kg_k0, kg_k1,
                    m_base, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1, m_rows_hit, row0,
                    WG, True, BLOCK_M, BLOCK_N, NBUF, HAS_TAGS, HAS_KG, G_PAD, HAS_MULT,
                    s_layout, o_layout, p_layout, g_layout)
            last = (n_visit - 1) % NBUF
            o_tok = warpgroup_mma(gl.convert_layout(p.to(q.dtype), p_layout), v_smem.index(last), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
            mbarrier.arrive(kv_empty.index(last))

        if SPLIT and piece >= 0:  # (piece is -1, a constant, without SPLIT)
            _store_piece(acc, m_i, l_i, part_o_ptr, part_lse_ptr, piece, WG, BLOCK_M, HEAD_DIM, s_layout, o_layout)
        else:
            _store_output(acc, m_i, l_i, o_ptr, o_sb, o_sh, o_sn, lse_ptr, hw_ptr, hw_sb, hw_sh, hw_sn,
                          batch, head, n_heads, row0, n_q, BLOCK_M, HEAD_DIM, HAS_HW, STORE_LSE, HAS_TAGS,
                          s_layout, o_layout)
        if HAS_KG:  # kgo [B, H, kg_q1 - kg_q0, n_groups]: the sums at the final max, normalized
            g_scale = gl.exp2(m_g - gl.where(m_g == -float("inf"), 0.0, m_i)) / l_i
            if not _scaled_p(HAS_KG, HAS_MULT, q.dtype):  # _key_group_update scaled P by 2^14 for the product
                g_scale = g_scale * (1.0 / 16384.0)
            if HAS_TAGS:
                g_scale = gl.where(l_i > 0, g_scale, 0.0)
            g_scale = gl.convert_layout(g_scale, gl.SliceLayout(1, g_layout))
            g_rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, g_layout))
            g_cols = gl.arange(0, G_PAD, layout=gl.SliceLayout(0, g_layout))
            g_row = (batch * n_heads + head).to(gl.int64) * (kg_q1 - kg_q0) + (g_rows - kg_q0)
            g_ok = (g_rows >= kg_q0) & (g_rows < kg_q1)
            # per group column: 1 / its size under normalize="keys", else 1 (pieces too: the join is linear)
            col_scale = gl.load(kgc_ptr + batch.to(gl.int64) * kgc_sb + g_cols, mask=g_cols < n_groups, other=0.0)
            sums = acc_g * g_scale[:, None] * col_scale[None, :]
            if SPLIT and piece >= 0:  # normalized over the piece's keys: the join weighs them like its output
                p_rows = piece * (2 * BLOCK_M) + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, g_layout))
                gl.store(part_kg_ptr + p_rows.to(gl.int64)[:, None] * G_PAD + g_cols[None, :], sums)
            else:
                gl.store(kgo_ptr + g_row[:, None] * n_groups + g_cols[None, :], sums,
                         mask=g_ok[:, None] & (g_cols < n_groups)[None, :])

    @gluon.jit
    def attn_fwd_hopper(q_desc, k_desc, v_desc, o_ptr, o_sb, o_sh, o_sn, lse_ptr, hw_ptr, hw_sb, hw_sh, hw_sn,
                        kg_ptr, kg_sb, kg_q0, kg_q1, kg_k0, kg_k1, n_groups, kgo_ptr, kgc_ptr, kgc_sb,
                        m_ptr, m_sb, m_sh, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1,
                        qt_ptr, qt_sb, kt_ptr, kt_sb, vis_ptr, vis_full_ptr, vis_count_ptr,
                        n_heads, n_q, n_k, qk_scale, part_o_ptr, part_lse_ptr, part_kg_ptr, n_whole, n_qp,
                        pieces_per_tile, zero_ptr, n_zero,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        NBUF: gl.constexpr, HAS_HW: gl.constexpr, STORE_LSE: gl.constexpr,
                        HAS_KG: gl.constexpr, G_PAD: gl.constexpr, HAS_MULT: gl.constexpr, HAS_TAGS: gl.constexpr,
                        SPLIT: gl.constexpr, ZERO: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        LOADER_REGS: gl.constexpr):
        if ZERO:
            # The first program zeroes n_zero int32 counters for a pass that follows this
            # kernel on the stream (the pair statistics' tickets): a memset would be one more
            # launch per call, which costs what the tickets save (bench/NOTES.md 51, 52).
            if (gl.program_id(0) == 0) & (gl.program_id(1) == 0):
                zero_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
                offs_z = gl.arange(0, 128, layout=zero_layout)
                for z0 in range(0, n_zero, 128):
                    gl.store(zero_ptr + z0 + offs_z, gl.zeros([128], gl.int32, zero_layout), mask=z0 + offs_z < n_zero)
        n_key_tiles = gl.cdiv(n_k, BLOCK_N)
        if SPLIT:
            # One axis: the first n_whole programs are whole query tiles in the order of the
            # 2-D grid below (tile t = query-tile pair t % n_qp of (batch, head) t // n_qp);
            # each program after them is one piece of a later tile's key tiles. The pieces
            # come last, so they fill the last wave (tail_split.plan_split).
            pid = gl.program_id(0)
            if pid < n_whole:
                piece = -1
                tile = pid
                kt0 = 0
                n_kt = n_key_tiles
            else:
                piece = pid - n_whole
                tile = n_whole + piece // pieces_per_tile
                part = piece % pieces_per_tile
                kt0 = part * n_key_tiles // pieces_per_tile
                n_kt = (part + 1) * n_key_tiles // pieces_per_tile - kt0
            q_tile = tile % n_qp
            bh = tile // n_qp
        else:
            piece = -1
            kt0 = 0
            n_kt = n_key_tiles
            q_tile = gl.program_id(0)
            bh = gl.program_id(1)
        q_start = q_tile * (2 * BLOCK_M)
        batch = bh // n_heads
        head = bh % n_heads
        # The query tile's visit list (tiles.VisitLists for 2 * BLOCK_M x BLOCK_N tiles), read
        # inside the partitions (tags only; never with SPLIT), where the reads overlap the Q load.
        list_row = batch * n_qp + q_tile
        vis_base = vis_ptr + list_row.to(gl.int64) * gl.cdiv(n_k, BLOCK_N)
        dtype: gl.constexpr = q_desc.dtype
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        turn_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NBUF):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # both consumer warpgroups release a slot
        for i in gl.static_range(2):
            mbarrier.init(turn_bar.index(i), count=1)
        # The two consumers differ only in WG (which query tile, which turn barrier to wait on).
        gl.warp_specialize([
            (_consumer, (0, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn_bar,
                         o_ptr, o_sb, o_sh, o_sn, lse_ptr, hw_ptr, hw_sb, hw_sh, hw_sn,
                         kg_ptr, kg_sb, kg_q0, kg_q1, kg_k0, kg_k1, n_groups, kgo_ptr, kgc_ptr, kgc_sb,
                         m_ptr, m_sb, m_sh, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1,
                         qt_ptr, qt_sb, kt_ptr, kt_sb, vis_base, vis_full_ptr, vis_count_ptr, list_row,
                         batch, head, n_heads, q_start, n_q, n_k, qk_scale, kt0, n_kt, piece, part_o_ptr, part_lse_ptr,
                         part_kg_ptr, BLOCK_M, BLOCK_N, HEAD_DIM, NBUF, HAS_HW, STORE_LSE, HAS_KG, G_PAD, HAS_MULT, HAS_TAGS,
                         SPLIT)),  # default partition: 4 warps
            (_consumer, (1, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn_bar,
                         o_ptr, o_sb, o_sh, o_sn, lse_ptr, hw_ptr, hw_sb, hw_sh, hw_sn,
                         kg_ptr, kg_sb, kg_q0, kg_q1, kg_k0, kg_k1, n_groups, kgo_ptr, kgc_ptr, kgc_sb,
                         m_ptr, m_sb, m_sh, m_sq, m_sk, m_q0, m_q1, m_k0, m_k1,
                         qt_ptr, qt_sb, kt_ptr, kt_sb, vis_base, vis_full_ptr, vis_count_ptr, list_row,
                         batch, head, n_heads, q_start, n_q, n_k, qk_scale, kt0, n_kt, piece, part_o_ptr, part_lse_ptr,
                         part_kg_ptr, BLOCK_M, BLOCK_N, HEAD_DIM, NBUF, HAS_HW, STORE_LSE, HAS_KG, G_PAD, HAS_MULT, HAS_TAGS,
                         SPLIT)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty,
                       batch, head, q_start, kt0, n_kt, vis_base, vis_count_ptr, list_row, BLOCK_M, BLOCK_N,
                       HEAD_DIM, NBUF, HAS_TAGS)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


if AVAILABLE:
    # Cached compiled kernels: Triton's own launch path costs ~45 us of host time per call.
    # A length of 1 takes the kernel's generic twin: compiled for n_k == 1 with a fused
    # key-group probe, this kernel failed to compile (triton 3.6; fast_launch.generic_twin).
    _ATTN_HOPPER = Launcher(attn_fwd_hopper, generic_when_one=("n_q", "n_k"))
    _COMBINE = Launcher(combine_kernel, generic_when_one=("n_q",))


def device_index(device: torch.device) -> int:
    """A CUDA device's index: a tensor's device always has one; a bare ``"cuda"`` means the
    current device."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


@functools.lru_cache(maxsize=None)
def _smem_layout(dtype: torch.dtype, block: tuple):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float16 if dtype == torch.float16 else gl.bfloat16)


def _bhnd_shape_strides(t: torch.Tensor, layout: str):
    """[B, H, N, D] sizes and strides of ``t`` read in ``layout`` (no view is made: host time)."""
    if layout == "bhnd":
        return list(t.shape), list(t.stride())
    (b, n, h, d), (sb, sn, sh, sd) = t.shape, t.stride()
    return [b, h, n, d], [sb, sh, sn, sd]


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiples as strides (dims of size 1 aside)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and \
        all((s * size) % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def on_hopper(device: torch.device) -> bool:
    """Whether ``device`` is a GPU this kernel runs on (sm_90, with a Triton that has Gluon)."""
    return AVAILABLE and device.type == "cuda" and _is_sm90(device_index(device))


def serves_head_dim(head_dim: int, n_k: int, in_kernel_extras: bool = False) -> bool:
    """Whether calls of this head dim and key count belong here (where this kernel is faster);
    ``in_kernel_extras``: the call has a block multiplier or a fused key-group probe and no tags."""
    if head_dim in HEAD_DIMS:
        return True
    return head_dim in LONG_HEAD_DIMS and n_k >= (LONG_EXTRAS_MIN_KEYS if in_kernel_extras else LONG_MIN_KEYS)


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, in_kernel_extras: bool = False) -> bool:
    """Whether this kernel can serve a call on these tensors (the caller checks the extras;
    ``in_kernel_extras`` as in :func:`serves_head_dim`)."""
    if not (AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not serves_head_dim(q.shape[-1], k.shape[2] if layout == "bhnd" else k.shape[1], in_kernel_extras):
        return False
    if not _is_sm90(device_index(q.device)):
        return False
    return _tma_ready(q) and _tma_ready(k) and _tma_ready(v)


if AVAILABLE:
    class _CheckedDescriptor(TensorDescriptor):
        """A TensorDescriptor without its per-call asserts (~5 us each on the host): usable()
        has checked the alignment, and the sizes come from validated tensors."""

        def __post_init__(self):
            pass


def _descriptor(t: torch.Tensor, layout: str, block_rows: int):
    shape, strides = _bhnd_shape_strides(t, layout)
    # A dim of size 1 is never stepped; give it a legal stride whatever the tensor says.
    strides = [st if n > 1 else shape[-1] for st, n in zip(strides, shape)]
    block = (1, 1, block_rows, shape[-1])
    return _CheckedDescriptor(t, shape, strides, list(block), _smem_layout(t.dtype, block))


def tag_tile_shape() -> tuple:
    """The (query, key) tile shape a tag mask is classified in for this kernel: both
    consumer warpgroups of a program walk the same key tiles, so a query tile is theirs together."""
    return 2 * BLOCK_M, BLOCK_N


def split_plan_for(n_tiles: int, n_key_tiles: int, device: torch.device, split="auto",
                   max_pieces: int = MAX_PIECES) -> SplitPlan:
    """The tail split of a grid of ``n_tiles`` programs: ``split`` "auto" (the cost model's
    plan for this GPU's SM count, at most ``max_pieces`` a tile), False / None (none), or a
    forced ``(n_split, pieces)``, clamped to the grid (at most every tile, at most one piece
    per key tile)."""
    if split == "auto":
        if device.type != "cuda":  # launch tests on CPU: no SM count to plan for
            return NO_SPLIT
        return plan_split(n_tiles, n_key_tiles, sm_count(device_index(device)), max_pieces)
    if not split:
        return NO_SPLIT
    n_split, pieces = split
    return SplitPlan(min(int(n_split), n_tiles), max(1, min(int(pieces), n_key_tiles)))


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of a CUDA device (the split plan's and the pair pass's grids)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def hopper_attention(q, k, v, out, *, layout: str, scale: float, head_weights=None, head_weight_strides=(0, 0, 0),
                     lse=None, key_groups=None, multiplier=None, tags=None, split="auto",
                     zero_counters=None) -> None:
    """Write softmax(scale * q k^T) v into ``out`` (same layout as ``q``); ``lse`` [B, H, Nq] if given.
    With a block multiplier M the output is (P * M) v, P the unweighted probabilities.

    Inputs as validated by ``iidkern.attention`` and accepted by :func:`usable`; the head
    weights come with their (batch, head, query) broadcast strides. ``key_groups`` (a fused
    key-group probe) is a ``kernel_args.KeyGroupArgs``: int32 group ids per key (``-1`` = none,
    read in ``[k0, k1)``), and ``sums`` [B, H, q1 - q0, n_groups] fp32 receives each probed
    query row's probability mass per group (``n_groups`` up to ``launch.MAX_FUSED_KEY_GROUPS``, 32),
    times the group's ``column_scale`` factor (1 / its size under ``normalize="keys"``).
    ``multiplier`` (a block multiplier) is a ``kernel_args.MultiplierArgs``: the values with their
    (batch, head, query, key) strides and the sub-block's query and key ranges. ``tags`` (a
    ``tiles.TagMask``): query ``i`` sees key ``j`` iff their tags share a bit; key tiles are
    visited from the mask's ``visit_lists`` for this kernel's tile shape (:func:`tag_tile_shape`).

    ``split``: the last wave's key split (``tail_split``; calls without tags, and at head dim 128
    without a multiplier or with fp16/bf16 multiplier values): "auto", False, or a forced
    ``(n_split, pieces)`` (see :func:`split_plan_for`); "auto" takes at most
    ``LIGHT_SPLIT_PIECES`` pieces a tile where a plain call of the shape would not come here.
    ``zero_counters``: a contiguous int32 tensor that the kernel sets to zero, for a pass
    launched after it on the same stream (the pair statistics' tickets).
    """
    (batch, heads, n_q, head_dim), _ = _bhnd_shape_strides(q, layout)
    n_k = k.shape[2] if layout == "bhnd" else k.shape[1]
    o_strides = _bhnd_shape_strides(out, layout)[1]
    hw = head_weights if head_weights is not None else out  # a placeholder pointer when absent
    has_kg = key_groups is not None
    if not has_kg:
        key_groups = KeyGroupArgs.absent(out, out)
        g_pad = 8
    else:
        g_pad = max(8, pow2_at_least(key_groups.n_groups))  # an mma.sync N is 8 or more
    has_mult = multiplier is not None
    if not has_mult:
        multiplier = MultiplierArgs.absent(out)
    if tags is not None:
        q_tags, k_tags = tags.batched(batch)
        lists = tags.visit_lists(*tag_tile_shape(), batch)
        tag_args = (q_tags, q_tags.stride(0), k_tags, k_tags.stride(0),
                    lists.index, lists.full_count, lists.visit_count)
    else:
        tag_args = (out, 0, out, 0, out, out, out)  # placeholders, never read
    n_qp = cdiv(n_q, 2 * BLOCK_M)
    n_tiles, n_key_tiles = n_qp * batch * heads, cdiv(n_k, BLOCK_N)
    plan = NO_SPLIT
    # Tag lists keep whole tiles. So does a multiplier of fp32 (or wider) values at head dim
    # 128: a piece weighs (P*M)V like any other, but there ptxas spills 38 instructions' worth
    # instead of 4 (triton 3.6) and the split multiplier call ran 1% slower than the unsplit one
    # (bench s18, NOTES.md 50). At 64 (NOTES.md 69), or with fp16/bf16 values (half M's
    # registers, NOTES.md 71), the split variant compiles without spills.
    if tags is None and not (has_mult and head_dim > 64 and multiplier.values.dtype not in HALF_DTYPES):
        # A call that comes here only for its extras (head dim 64, fewer keys than a plain
        # call needs) takes the plan with the least scratch: its plain counterpart runs on
        # the Triton kernel with none (SD3 1024²: 2 pieces, 3.4 MiB, against the model's 5,
        # 8.6 MiB, which it ranks within 1%).
        light = not serves_head_dim(head_dim, n_k)
        plan = split_plan_for(n_tiles, n_key_tiles, q.device, split, LIGHT_SPLIT_PIECES if light else MAX_PIECES)
    if plan.active:
        # A piece without key tiles would wait forever on the ring (split_plan_for clamps).
        assert plan.n_split <= n_tiles and plan.pieces <= n_key_tiles, plan
        n_whole = n_tiles - plan.n_split
        n_pieces = plan.n_split * plan.pieces
        grid = (n_whole + n_pieces,)
        # Each piece's rows, normalized over its keys (fp32), and their log2-sum-exp.
        part_o = workspace((n_pieces * 2 * BLOCK_M, head_dim), torch.float32, q.device)
        part_lse = workspace((n_pieces * 2 * BLOCK_M,), torch.float32, q.device)
        # key-group sums per piece row, normalized over the piece's keys like its output
        part_kg = workspace((n_pieces * 2 * BLOCK_M, g_pad), torch.float32, q.device) if has_kg else out
        split_args = (part_o, part_lse, part_kg, n_whole, n_qp, plan.pieces)
    else:
        grid = (n_qp, batch * heads)
        split_args = (out, out, out, n_tiles, n_qp, 1)  # placeholders, never read
    lse_arg = lse if lse is not None else out
    _ATTN_HOPPER[grid](
        _descriptor(q, layout, BLOCK_M), _descriptor(k, layout, BLOCK_N), _descriptor(v, layout, BLOCK_N),
        out, o_strides[0], o_strides[1], o_strides[2], lse_arg, hw, *head_weight_strides,
        *key_groups, *multiplier, *tag_args, heads, n_q, n_k, scale * LOG2E, *split_args,
        zero_counters if zero_counters is not None else out, zero_counters.numel() if zero_counters is not None else 0,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim, NBUF=NUM_BUFFERS,
        HAS_HW=head_weights is not None, STORE_LSE=lse is not None, HAS_KG=has_kg,
        G_PAD=g_pad, HAS_MULT=has_mult, HAS_TAGS=tags is not None, SPLIT=plan.active, ZERO=zero_counters is not None,
        CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4,
    )
    if plan.active:
        pieces_p2, rows_block, combine_warps = combine_shape(plan.pieces, 2 * BLOCK_M, head_dim)
        _COMBINE[(plan.n_split, 2 * BLOCK_M // rows_block)](
            part_o, part_lse, out, lse_arg, hw, o_strides[0], o_strides[1], o_strides[2], *head_weight_strides,
            part_kg, key_groups.sums, key_groups.q0, key_groups.q1, key_groups.n_groups,
            n_whole, n_qp, plan.pieces, heads, n_q,
            TILE_ROWS=2 * BLOCK_M, BLOCK_R=rows_block, HEAD_DIM=head_dim, G_PAD=g_pad, PIECES_P2=pieces_p2,
            HAS_HW=head_weights is not None, STORE_LSE=lse is not None, HAS_KG=has_kg, num_warps=combine_warps,
        )
