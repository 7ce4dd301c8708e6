"""Fused flash-attention forward with token-tag masks, head weights, a post-softmax block
multiplier, a value probe and a key-group probe, after the Triton tutorial's fused attention.

Program-id mapping: ``program_id(0)`` = query tile, ``program_id(1)`` = batch * heads.
Each program streams key tiles with the online softmax in the log2 domain (the scale is
folded into ``qk_scale = scale * log2(e)`` so the inner loop uses ``exp2``).

Key tiles come in two kinds:
* *masked* tiles apply an elementwise mask (key bounds, and tags when given);
* *unmasked* tiles skip it. Without tags every tile but a ragged last one is unmasked;
  with tags the host passes, per query tile, a list of partial tiles, a contiguous run of
  full tiles and a list of the other full tiles (see ``tiles.py``); tiles on none of them
  are never loaded.

Side accumulators ride along the same online softmax: a value probe (``A @ x`` for a small
per-key signal) and one *key-group probe* (per query row, the probability mass on each of a
few key groups, e.g. IID's image x instruction map), the latter only over the key tiles of
its key span; both see the softmax probabilities before any multiplier.

Rows that see no allowed key keep ``m = -inf``; the ``m_safe`` guard keeps ``exp2`` from
producing NaN, and the epilogue writes zeros and ``lse = -inf`` for them.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, D] tile; full tiles of a power-of-two head dim load without masks so the
    compiler can issue wide vector loads."""
    if MASK_ROWS:
        return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _key_group_update(acc_g, m_g, p, m_new, m_safe, offs_n, kg_base, kg_k0, kg_k1,
                      G_PAD: tl.constexpr, X_PRECISION: tl.constexpr, KG_HALF_DOT: tl.constexpr,
                      UPCAST_DOTS: tl.constexpr):
    """Fold this tile's probabilities into the per-row key-group sums of a fused probe.

    ``acc_g`` is kept relative to ``m_g``, the running max at its last update, so tiles
    that do not touch the groups never rescale it (one correction in the epilogue).
    ``m_g = -inf`` means nothing was added yet; ``exp2(-inf) = 0`` then clears the
    (zero) sums without a NaN, as ``m_safe`` is always finite."""
    ids = tl.load(kg_base + offs_n, mask=(offs_n >= kg_k0) & (offs_n < kg_k1), other=-1)
    hit = ids[:, None] == tl.arange(0, G_PAD)[None, :]
    if KG_HALF_DOT:
        # p (<= 1, relative to the running max) as the sum of two fp16 numbers, hi + lo: two
        # fp16 products keep ~21 of fp32's 24 mantissa bits (one would keep 11, tf32 11), and
        # fp16 operands come from registers like P @ V (a tf32 one goes through shared memory).
        p_hi = p.to(tl.float16)
        p_lo = (p - p_hi.to(tl.float32)).to(tl.float16)
        if UPCAST_DOTS:
            one_hot = hit.to(tl.float32)
            g_sum = tl.dot(p_hi.to(tl.float32), one_hot, input_precision="ieee")
            g_sum += tl.dot(p_lo.to(tl.float32), one_hot, input_precision="ieee")
        else:
            one_hot = hit.to(tl.float16)
            g_sum = tl.dot(p_hi, one_hot)
            g_sum = tl.dot(p_lo, one_hot, g_sum)
    else:
        g_sum = tl.dot(p, hit.to(tl.float32), input_precision=X_PRECISION)
    acc_g = acc_g * tl.math.exp2(m_g - m_safe)[:, None] + g_sum
    return acc_g, m_new


@triton.jit
def _attn_tile(acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, start_n,
               k_base, v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale,
               k_tags_base,
               mult_base, stride_mq, stride_mk, mult_rows_hit, mult_q0, mult_q1, mult_k0,
               mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, X_PAD: tl.constexpr, G_PAD: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_TAGS: tl.constexpr, MULT_MODE: tl.constexpr,
               HAS_X: tl.constexpr, KG_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, X_PRECISION: tl.constexpr,
               KG_HALF_DOT: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """One key tile of the online softmax. ``MULT_MODE``: 0 no multiplier; 1 test at run time
    whether this tile meets the multiplier's sub-block (tag lists, ragged tail); 2 the caller
    knows it does (a key-tile range split at the sub-block), so the load is unconditional.
    ``KG_MODE`` does the same for the key range of a fused key-group probe."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    n_ok = offs_n < n_k
    # K is loaded as [N, D] and transposed in registers so that the score tile is q @ k^T.
    k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, MASKED, EVEN_D)
    if UPCAST_DOTS:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # raw scores; the scale rides in the FMA below
    if MASKED:
        allowed = n_ok[None, :]
        if HAS_TAGS:
            k_tags = tl.load(k_tags_base + offs_n, mask=n_ok, other=0)
            allowed = allowed & ((q_tags[:, None] & k_tags[None, :]) != 0)
        s = tl.where(allowed, s, float("-inf"))
    row_max = tl.max(s, 1) * qk_scale
    if KG_HALF_DOT == 2:
        # The running max is kept 14 below the true one, so p (and the row sums) carry a
        # factor 2^14: the key-group sums' fp16 split then sees p down to ~4e-9 of the row
        # max as normal numbers (fp16's smallest normal is 6.1e-5; a group of keys with p
        # ~1e-6 was summed from subnormals, some 3% off). The output, LSE (m + log2 l) and
        # sums are ratios or m + log2 l, so none needs a correction. (Scaling p itself
        # instead made the D=128 kernel fault on the H100, triton 3.6.) Mode 1 splits p
        # without the shift; the host no longer picks it: fp16 inputs with a block
        # multiplier M (where 2^14 * M could pass fp16's largest value in the P @ V
        # operand) take the fp32 product, mode 0 (launch._kg_half_dot_mode).
        row_max = row_max - 14.0
    m_new = tl.maximum(m_i, row_max)
    if MASKED:
        # A row that has seen no allowed key yet has m_new = -inf; shift by 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, MASKED, EVEN_D)
    p_out = p
    # Post-softmax multiplier on one sub-block (1 outside it); the normalizer l_i keeps p.
    if MULT_MODE == 2:
        # No control flow around the load, so the loop's software pipeline prefetches it
        # like K and V (a conditional load here is waited for in full on every tile).
        mult = tl.load(mult_base + (offs_m - mult_q0)[:, None] * stride_mq + (offs_n - mult_k0)[None, :] * stride_mk,
                       mask=((offs_m >= mult_q0) & (offs_m < mult_q1))[:, None]
                       & ((offs_n >= mult_k0) & (offs_n < mult_k1))[None, :], other=1.0)
        p_out = p * mult.to(tl.float32)
    if MULT_MODE == 1:
        if mult_rows_hit & (start_n < mult_k1) & (start_n + BLOCK_N > mult_k0):
            rows_in = (offs_m >= mult_q0) & (offs_m < mult_q1)
            cols_in = (offs_n >= mult_k0) & (offs_n < mult_k1)
            mult = tl.load(mult_base + (offs_m - mult_q0)[:, None] * stride_mq + (offs_n - mult_k0)[None, :] * stride_mk,
                           mask=rows_in[:, None] & cols_in[None, :], other=1.0)
            p_out = p * mult.to(tl.float32)
    if UPCAST_DOTS:
        # P keeps the rounding to the input dtype that the compiled kernel has.
        acc += tl.dot(p_out.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        acc += tl.dot(p_out.to(v.dtype), v, input_precision=DOT_PRECISION)
    if HAS_X:
        offs_c = tl.arange(0, X_PAD)
        x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_c[None, :], mask=n_ok[:, None], other=0.0)
        acc_x = acc_x * alpha[:, None] + tl.dot(p, x, input_precision=X_PRECISION)
    # Key-group probe: the softmax probabilities (before any multiplier), as the value probe.
    if KG_MODE == 2:
        acc_g, m_g = _key_group_update(acc_g, m_g, p, m_new, m_safe, offs_n, kg_base, kg_k0, kg_k1, G_PAD,
                                       X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
    if KG_MODE == 1:
        if kg_rows_hit & (start_n < kg_k1) & (start_n + BLOCK_N > kg_k0):
            acc_g, m_g = _key_group_update(acc_g, m_g, p, m_new, m_safe, offs_n, kg_base, kg_k0, kg_k1, G_PAD,
                                           X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
    return acc, acc_x, acc_g, l_i, m_new, m_g


@triton.jit
def _attn_range(acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, tile_begin, tile_end,
                k_base, v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base,
                mult_base, stride_mq, stride_mk, mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1,
                x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, X_PAD: tl.constexpr, G_PAD: tl.constexpr,
                EVEN_D: tl.constexpr, MULT_MODE: tl.constexpr, HAS_X: tl.constexpr, KG_MODE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, X_PRECISION: tl.constexpr, KG_HALF_DOT: tl.constexpr,
                UPCAST_DOTS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, MASKED: tl.constexpr = False):
    """Key tiles ``tile_begin <= j < tile_end`` of an untagged row of tiles: full tiles
    (unmasked), or with ``MASKED`` the ragged last one."""
    if WARP_SPECIALIZE:
        # Opt-in (kernel_options): Triton's automatic warp specialization splits loads and
        # math into producer/consumer warps. In a constexpr branch so that Tritons without
        # the keyword never see it.
        for j in tl.range(tile_begin, tile_end, warp_specialize=True):
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_tile(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, j * BLOCK_N, k_base, v_base,
                stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk,
                mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0,
                kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, MASKED, EVEN_D, False, MULT_MODE, HAS_X, KG_MODE,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
    else:
        for j in range(tile_begin, tile_end):
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_tile(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, j * BLOCK_N, k_base, v_base,
                stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk,
                mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0,
                kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, MASKED, EVEN_D, False, MULT_MODE, HAS_X, KG_MODE,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
    return acc, acc_x, acc_g, l_i, m_i, m_g


@triton.jit
def _attn_list(acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, index_base, count,
               k_base, v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base,
               mult_base, stride_mq, stride_mk, mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1,
               x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, X_PAD: tl.constexpr, G_PAD: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_TAGS: tl.constexpr, MULT_MODE: tl.constexpr,
               HAS_X: tl.constexpr, KG_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, X_PRECISION: tl.constexpr,
               KG_HALF_DOT: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """The key tiles listed at ``index_base[0:count]`` (a tag list): partial tiles with
    ``MASKED`` (the tag mask), full ones without."""
    # Tile indices are read one iteration ahead (loop-carried), so the next K/V addresses
    # are known before the current tile's math and the loads can be pipelined.
    next_n = tl.load(index_base, mask=count > 0, other=0) * BLOCK_N
    for i in range(0, count):
        start_n = next_n
        next_n = tl.load(index_base + i + 1, mask=i + 1 < count, other=0) * BLOCK_N
        acc, acc_x, acc_g, l_i, m_i, m_g = _attn_tile(
            acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, start_n, k_base, v_base, stride_kn,
            stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk, mult_rows_hit,
            mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1,
            BLOCK_N, BLOCK_D, X_PAD, G_PAD, MASKED, EVEN_D, HAS_TAGS, MULT_MODE, HAS_X, KG_MODE,
            DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
    return acc, acc_x, acc_g, l_i, m_i, m_g


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    num_heads, n_q, n_k, head_dim, qk_scale,
    Q_TAGS, K_TAGS, stride_qtb, stride_ktb,
    PART_CNT, PART_IDX, FULL_CNT, FULL_IDX, RUN_START, RUN_STOP, RAGGED_FULL, n_q_tiles, n_k_tiles,
    HW, stride_hwb, stride_hwh, stride_hwn,
    MULT, stride_mb, stride_mh, stride_mq, stride_mk, mult_q0, mult_q1, mult_k0, mult_k1,
    X, stride_xb, stride_xn, XO,
    KG_IDS, stride_kgb, kg_q0, kg_q1, kg_k0, kg_k1, n_groups, KGO, KG_COL_SCALE, stride_kgcb,
    TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, X_PAD: tl.constexpr,
    G_PAD: tl.constexpr,  # key-group columns of a fused probe, padded to a power of two >= 16
    HAS_TAGS: tl.constexpr, HAS_HW: tl.constexpr, HAS_MULT: tl.constexpr, HAS_X: tl.constexpr,
    HAS_KG: tl.constexpr,  # a probe with grouped keys rides in this pass (see launch.py)
    STORE_LSE: tl.constexpr, COUNT_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: full tiles load without masks
    X_PRECISION: tl.constexpr,  # precision of fp32-probability products (value probe, key groups)
    UPCAST_DOTS: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, fp32 operands are exact
    KG_HALF_DOT: tl.constexpr = 0,  # key-group sums as two fp16 products (hi + lo): 2 with p * 2^14, 1 without
    KG_SPLIT: tl.constexpr = True,  # key groups may own the branch-free middle key range (below)
    MULT_SPLIT: tl.constexpr = True,  # the multiplier may own it (it comes first)
    WARP_SPECIALIZE: tl.constexpr = False,  # untagged loop only; see the loop below
    RAGGED_TAIL: tl.constexpr = False,  # tags: n_k is not a multiple of BLOCK_N (the last key tile is ragged)
    HAS_LISTS: tl.constexpr = True,  # tags: some query tile has a partial or listed full tile (tiles.TileLists)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    b64 = b.to(tl.int64)  # batch/head offsets can exceed 2**31 elements at large B*N*H*D
    h64 = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOTS:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    mult_base = MULT + b64 * stride_mb + h64 * stride_mh
    x_base = X + b64 * stride_xb
    kg_base = KG_IDS + b64 * stride_kgb
    k_tags_base = K_TAGS + b64 * stride_ktb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_M, X_PAD], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)
    m_g = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # The multiplier's and the key-group probe's row ranges are known per program: tiles
    # outside them skip their loads.
    mult_rows_hit = (pid_m * BLOCK_M < mult_q1) & (pid_m * BLOCK_M + BLOCK_M > mult_q0)
    kg_rows_hit = (pid_m * BLOCK_M < kg_q1) & (pid_m * BLOCK_M + BLOCK_M > kg_q0)
    # Tag lists and the ragged last tile test each tile at run time (mode 1) for both.
    if HAS_TAGS:
        if HAS_LISTS:
            q_tags = tl.load(Q_TAGS + b64 * stride_qtb + offs_m, mask=m_ok, other=0)
            list_row = (b64 * n_q_tiles + pid_m) * n_k_tiles
            n_partial = tl.load(PART_CNT + b64 * n_q_tiles + pid_m)
            n_full = tl.load(FULL_CNT + b64 * n_q_tiles + pid_m)
            # The partial tiles (tag mask), then the full tiles outside the run.
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_list(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, PART_IDX + list_row, n_partial, k_base,
                v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk,
                mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0,
                kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, True, EVEN_D, HAS_TAGS, HAS_MULT, HAS_X, HAS_KG,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_list(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, FULL_IDX + list_row, n_full, k_base,
                v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk,
                mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0,
                kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, False, EVEN_D, HAS_TAGS, HAS_MULT, HAS_X, HAS_KG,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
        else:
            # Every visited tile is in the run or the ragged full one (tiles.TileLists.has_lists):
            # no list loops, so the run keeps the registers of untagged attention.
            q_tags = offs_m  # unused placeholder
            n_partial = 0
            n_full = 0
        # The contiguous run of full tiles: a plain range, pipelined like untagged attention.
        run_start = tl.load(RUN_START + b64 * n_q_tiles + pid_m)
        run_stop = tl.load(RUN_STOP + b64 * n_q_tiles + pid_m)
        acc, acc_x, acc_g, l_i, m_i, m_g = _attn_range(
            acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, run_start, run_stop, k_base, v_base,
            stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk,
            mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0,
            kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, EVEN_D, HAS_MULT, HAS_X, HAS_KG,
            DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS, WARP_SPECIALIZE)
        visited = n_partial + n_full + run_stop - run_start
        if RAGGED_TAIL:
            # A ragged last key tile that is full for its real keys is in no list (tiles.py):
            # it runs like untagged attention's, bounds-masked and without tag loads.
            n_ragged = tl.load(RAGGED_FULL + b64 * n_q_tiles + pid_m)
            if HAS_LISTS or HAS_X + HAS_KG > 0:
                # In a loop of 0 or 1 tiles: fewer registers than the tile inlined, which
                # beside the list loops pushed the register cap (NOTES.md 48); and the side
                # accumulators stay out of a tile outside a loop, as untagged attention's do
                # (NOTES.md 25).
                acc, acc_x, acc_g, l_i, m_i, m_g = _attn_range(
                    acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, n_k // BLOCK_N,
                    n_k // BLOCK_N + n_ragged, k_base, v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale,
                    k_tags_base, mult_base, stride_mq, stride_mk, mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1,
                    x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, EVEN_D,
                    HAS_MULT, HAS_X, HAS_KG, DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS, False, True)
            elif n_ragged > 0:
                # Without the lists the registers allow the tile inline, as untagged attention
                # has it: SD3 1024² tags_0 1.05x -> 0.99x plain (NOTES.md 54).
                acc, acc_x, acc_g, l_i, m_i, m_g = _attn_tile(
                    acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, (n_k // BLOCK_N) * BLOCK_N,
                    k_base, v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base,
                    stride_mq, stride_mk, mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn,
                    kg_base, kg_rows_hit, kg_k0, kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, True, EVEN_D, False,
                    HAS_MULT, HAS_X, HAS_KG, DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
            visited += n_ragged
    else:
        q_tags = offs_m  # unused placeholder
        n_whole = n_k // BLOCK_N
        # Whole key tiles run in up to three ranges [0, lo), [lo, hi), [hi, n_whole): the
        # middle one covers the columns of the multiplier (if any), else those of the key
        # groups, and does their loads with no branch around them, so the loop's software
        # pipeline prefetches them like K and V (a load under a run-time `if` is waited
        # for in full on every tile). The outer ranges never touch them. The split pays
        # off at D=128 and costs at D=64 (H100, NOTES.md): the host picks it per config.
        # Which extra owns the split (constexpr arithmetic on the flags); an extra that does
        # not is tested per tile (mode 1) in every range, the owner is branch-free (mode 2).
        SPLIT_MULT = HAS_MULT * MULT_SPLIT
        SPLIT_KG = HAS_KG * KG_SPLIT * (1 - SPLIT_MULT)
        OUT_MULT = HAS_MULT * (1 - SPLIT_MULT)
        OUT_KG = HAS_KG * (1 - SPLIT_KG)
        MID_MULT = 2 * SPLIT_MULT + OUT_MULT
        MID_KG = 2 * SPLIT_KG + OUT_KG
        if SPLIT_MULT == 1:
            split_hit = mult_rows_hit
            split_k0 = mult_k0
            split_k1 = mult_k1
        else:
            split_hit = kg_rows_hit
            split_k0 = kg_k0
            split_k1 = kg_k1
        if SPLIT_MULT + SPLIT_KG > 0:
            lo = tl.where(split_hit, tl.minimum(split_k0 // BLOCK_N, n_whole), 0)
            hi = tl.where(split_hit, tl.maximum(tl.minimum(tl.cdiv(split_k1, BLOCK_N), n_whole), lo), 0)
        else:
            lo = n_whole
            hi = n_whole
        acc, acc_x, acc_g, l_i, m_i, m_g = _attn_range(
            acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, 0, lo, k_base, v_base, stride_kn,
            stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk, mult_rows_hit,
            mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1,
            BLOCK_N, BLOCK_D, X_PAD, G_PAD, EVEN_D, OUT_MULT, HAS_X, OUT_KG,
            DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS, WARP_SPECIALIZE)
        if SPLIT_MULT + SPLIT_KG > 0:
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_range(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, lo, hi, k_base, v_base, stride_kn,
                stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk, mult_rows_hit,
                mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1,
                BLOCK_N, BLOCK_D, X_PAD, G_PAD, EVEN_D, MID_MULT, HAS_X, MID_KG,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS, WARP_SPECIALIZE)
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_range(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, hi, n_whole, k_base, v_base, stride_kn,
                stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk, mult_rows_hit,
                mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0, kg_k1,
                BLOCK_N, BLOCK_D, X_PAD, G_PAD, EVEN_D, OUT_MULT, HAS_X, OUT_KG,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS, WARP_SPECIALIZE)
        visited = n_whole
        if HAS_X + HAS_KG > 0:
            # The side accumulators ([BLOCK_M, 16] sums) update the ragged last tile in a
            # one-tile loop: outside a loop, triton 3.6 moved them through the wide wgmma
            # layout of the scores there (not so in the loops; NOTES.md 25).
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_range(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, n_whole, tl.cdiv(n_k, BLOCK_N), k_base,
                v_base, stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk,
                mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0,
                kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, EVEN_D, HAS_MULT, HAS_X, HAS_KG,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS, False, True)
            visited = tl.cdiv(n_k, BLOCK_N)
        elif n_k % BLOCK_N != 0:
            acc, acc_x, acc_g, l_i, m_i, m_g = _attn_tile(
                acc, acc_x, acc_g, l_i, m_i, m_g, q, q_tags, offs_m, offs_d, n_whole * BLOCK_N, k_base, v_base,
                stride_kn, stride_vn, n_k, head_dim, qk_scale, k_tags_base, mult_base, stride_mq, stride_mk,
                mult_rows_hit, mult_q0, mult_q1, mult_k0, mult_k1, x_base, stride_xn, kg_base, kg_rows_hit, kg_k0,
                kg_k1, BLOCK_N, BLOCK_D, X_PAD, G_PAD, True, EVEN_D, HAS_TAGS, HAS_MULT, HAS_X, HAS_KG,
                DOT_PRECISION, X_PRECISION, KG_HALF_DOT, UPCAST_DOTS)
            visited += 1

    # Epilogue: normalize (rows with no allowed key have l = 0 and acc = 0 -> output 0).
    empty_row = l_i == 0.0
    inv_l = 1.0 / tl.where(empty_row, 1.0, l_i)
    out = acc * inv_l[:, None]
    if HAS_HW:
        w = tl.load(HW + b64 * stride_hwb + h64 * stride_hwh + offs_m * stride_hwn, mask=m_ok, other=0.0)
        out = out * w.to(tl.float32)[:, None]
    tl.store(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    row = (b64 * num_heads + h64) * n_q + offs_m
    if STORE_LSE:
        lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i))) * 0.6931471805599453)
        tl.store(LSE + row, lse, mask=m_ok)
    if HAS_X:
        offs_c = tl.arange(0, X_PAD)
        tl.store(XO + row[:, None] * X_PAD + offs_c[None, :], acc_x * inv_l[:, None], mask=m_ok[:, None])
    if HAS_KG:
        # acc_g is relative to m_g (its last update): bring it to the final max, normalize.
        # Rows that never met a group (m_g = -inf, possibly m_i = -inf too) hold zeros:
        # subtracting 0 there gives exp2(-inf) = 0 instead of NaN.
        g_scale = tl.math.exp2(m_g - tl.where(m_g == float("-inf"), 0.0, m_i)) * inv_l
        offs_g = tl.arange(0, G_PAD)
        g_row = (b64 * num_heads + h64) * (kg_q1 - kg_q0) + (offs_m - kg_q0)
        g_rows_ok = (offs_m >= kg_q0) & (offs_m < kg_q1)
        # per group column: 1 / its size under normalize="keys", else 1
        col_scale = tl.load(KG_COL_SCALE + b64 * stride_kgcb + offs_g, mask=offs_g < n_groups, other=0.0)
        tl.store(KGO + g_row[:, None] * n_groups + offs_g[None, :], acc_g * g_scale[:, None] * col_scale[None, :],
                 mask=g_rows_ok[:, None] & (offs_g < n_groups)[None, :])
    if COUNT_TILES:
        tl.store(TILES + pid_bh * n_q_tiles + pid_m, visited)
