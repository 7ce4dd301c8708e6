"""Probe pass: exact grouped sums of attention probabilities, never holding Nq x Nk.

Runs after the main pass, which stored the row log-sum-exp. (One probe with few key
groups per call is folded into the main pass instead; see ``launch._fused_probe_index``.) For the probed sub-block only,
it recomputes the scores and the exact probabilities ``p = exp2(s * qk_scale - lse2)``
(tag mask applied), and reduces them into the output groups.

Each side of a probe is either *spread* (every token of a range is its own group, so an
output tile row/column is a token tile) or *grouped* (an int id per token; an output tile
row/column is a chunk of ``G_BLOCK`` group ids and tokens are folded in with a one-hot
matrix product). Program-id mapping: ``program_id(0)`` = output row tile (query tile or
query-group chunk), ``program_id(1)`` = output column tile, ``program_id(2)`` = batch *
output heads. A program owns its output tile and loops over everything reduced into it
(heads, and the tokens of grouped sides), so every output element is written once, by
one program, without atomics: results are deterministic.
"""
import triton
import triton.language as tl


@triton.jit
def _fold_split(values, onehot, VALUES_LEFT: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """``values @ onehot`` (or ``onehot @ values``) to fp32's precision at 16-bit product rates:
    fp32 values as the sum of three bf16 pieces (8 + 8 + 8 of fp32's 24 mantissa bits, each
    residual exact in fp32, and bf16 has fp32's exponent range) and three bf16 products with
    fp32 accumulation, against a one-hot matrix that bf16 holds exactly. A tf32 product
    truncates each value to 11 bits, ~1e-3 of it (NOTES.md 76)."""
    hi = values.to(tl.bfloat16)
    rest = values - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    # One return at the end: Triton compiles every statement after a return nested in a
    # constexpr `if`, so the other side's product (shapes that do not match) would be built too.
    if UPCAST_DOTS:  # the interpreter (its bf16 tl.dot is wrong): the same pieces, multiplied exactly
        one = onehot.to(tl.float32)
        hi, mid, lo = hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)
        if VALUES_LEFT:
            folded = tl.dot(hi, one, input_precision="ieee") + tl.dot(mid, one, input_precision="ieee") + \
                tl.dot(lo, one, input_precision="ieee")
        else:
            folded = tl.dot(one, hi, input_precision="ieee") + tl.dot(one, mid, input_precision="ieee") + \
                tl.dot(one, lo, input_precision="ieee")
    else:
        one = onehot.to(tl.bfloat16)
        # Smallest piece first: the fp32 accumulator adds the large one last.
        if VALUES_LEFT:
            folded = tl.dot(hi, one, tl.dot(mid, one, tl.dot(lo, one)))
        else:
            folded = tl.dot(one, hi, tl.dot(one, mid, tl.dot(one, lo)))
    return folded


@triton.jit
def probe_kernel(
    Q, K, LSE, OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    num_heads, n_q, n_k, head_dim, qk_scale,
    Q_TAGS, K_TAGS, stride_qtb, stride_ktb,
    Q_GROUPS, K_GROUPS, stride_qgb, stride_kgb,
    q_lo, q_hi, k_lo, k_hi,
    n_q_out, n_k_out,
    HEAD_COEF, coef_value, out_heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G_BLOCK: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
    HAS_COEF: tl.constexpr,  # per-(batch, head) weights in HEAD_COEF; else every head gets coef_value
    KEEP_HEADS: tl.constexpr,
    Q_SPREAD: tl.constexpr, K_SPREAD: tl.constexpr, HAS_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOLD_SPLIT: tl.constexpr,  # folding p into groups: three bf16 products (half inputs) ...
    ONEHOT_PRECISION: tl.constexpr,  # ... else one product: "tf32" for half inputs, "ieee" for fp32
    UPCAST_DOTS: tl.constexpr,  # the interpreter: fp32 operands are exact (its bf16 tl.dot is wrong)
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_z = tl.program_id(2)
    b = pid_z // out_heads
    h_out = pid_z % out_heads
    b64 = b.to(tl.int64)

    # Output tile: rows are query tokens (spread) or query-group ids (grouped); likewise columns.
    if Q_SPREAD:
        q_begin = q_lo + pid_r * BLOCK_M
        q_end = q_begin + BLOCK_M  # one query tile
        row_ids = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        q_begin = q_lo
        q_end = q_hi
        row_ids = pid_r * G_BLOCK + tl.arange(0, G_BLOCK)
    if K_SPREAD:
        k_begin = k_lo + pid_c * BLOCK_N
        k_end = k_begin + BLOCK_N
        col_ids = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    else:
        k_begin = k_lo
        k_end = k_hi
        col_ids = pid_c * G_BLOCK + tl.arange(0, G_BLOCK)

    # "keep" gives one output head per program; reductions loop over every head.
    if KEEP_HEADS:
        h_begin = h_out
        n_h = 1
    else:
        h_begin = 0
        n_h = num_heads
    # One flat loop over (head, query tile, key tile) work items: a single innermost loop is
    # what Triton software-pipelines, so the next item's loads overlap this item's math.
    # Spread sides contribute exactly one tile.
    if Q_SPREAD:
        n_qt = 1
    else:
        n_qt = tl.cdiv(q_end - q_begin, BLOCK_M)
    if K_SPREAD:
        n_kt = 1
    else:
        n_kt = tl.cdiv(k_end - k_begin, BLOCK_N)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    # With one head and one query tile per program (spread queries, heads kept) the query
    # tile is loop-invariant: load it once instead of once per key tile.
    if Q_SPREAD and KEEP_HEADS:
        offs_m0 = q_begin + tl.arange(0, BLOCK_M)
        m_ok0 = offs_m0 < q_hi
        q0 = tl.load(Q + b64 * stride_qb + h_begin * stride_qh + offs_m0[:, None] * stride_qn + offs_d[None, :],
                     mask=m_ok0[:, None] & d_ok[None, :], other=0.0)
        lse0 = tl.load(LSE + (b64 * num_heads + h_begin) * n_q + offs_m0, mask=m_ok0, other=0.0) * 1.4426950408889634
    for item in range(0, n_h * n_qt * n_kt):
        kt = item % n_kt
        qt = (item // n_kt) % n_qt
        h = h_begin + item // (n_kt * n_qt)
        if HAS_COEF:
            coef = tl.load(HEAD_COEF + b64 * num_heads + h)
        else:
            coef = coef_value
        offs_m = q_begin + qt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = k_begin + kt * BLOCK_N + tl.arange(0, BLOCK_N)
        if Q_SPREAD:
            m_ok = offs_m < q_hi
        else:
            q_group = tl.load(Q_GROUPS + b64 * stride_qgb + offs_m, mask=offs_m < q_hi, other=-1)
            m_ok = q_group >= 0
        if K_SPREAD:
            n_ok = offs_n < k_hi
        else:
            k_group = tl.load(K_GROUPS + b64 * stride_kgb + offs_n, mask=offs_n < k_hi, other=-1)
            n_ok = k_group >= 0
        if Q_SPREAD and KEEP_HEADS:
            q = q0
            lse2 = lse0
        else:
            q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse2 = tl.load(LSE + (b64 * num_heads + h) * n_q + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        k = tl.load(K + b64 * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST_DOTS:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION) * qk_scale
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if Q_SPREAD and K_SPREAD and not HAS_TAGS:
            # A token x token map without tags: every row has allowed keys (finite lse), and a
            # padded row or column only fills an output element that is never stored, so no
            # select per score (one instruction of the few per exp).
            p = tl.math.exp2(s - lse2[:, None])
        else:
            valid = m_ok[:, None] & n_ok[None, :]
            if HAS_TAGS:
                q_tags = tl.load(Q_TAGS + b64 * stride_qtb + offs_m, mask=m_ok, other=0)
                k_tags = tl.load(K_TAGS + b64 * stride_ktb + offs_n, mask=n_ok, other=0)
                valid = valid & ((q_tags[:, None] & k_tags[None, :]) != 0)
            # Masked entries and rows with no allowed key (lse = -inf) contribute 0; grouped
            # sides fold every column and row through a one-hot product, so 0, not garbage.
            p = tl.math.exp2(tl.where(valid, s - lse2[:, None], float("-inf")))
        # The head's coefficient scales the folded sums (one multiply per output, not per p).
        if K_SPREAD:
            p_cols = p
        else:
            k_onehot = k_group[:, None] == col_ids[None, :]  # [BLOCK_N, G_BLOCK]
            if FOLD_SPLIT:
                p_cols = _fold_split(p, k_onehot, True, UPCAST_DOTS)
            else:
                p_cols = tl.dot(p, k_onehot.to(tl.float32), input_precision=ONEHOT_PRECISION)
        if Q_SPREAD:
            acc += p_cols * coef  # spread x spread: the same exp2 -> * coef -> + acc chain as ever
        else:
            q_onehot_t = row_ids[:, None] == q_group[None, :]  # [G_BLOCK, BLOCK_M]
            if FOLD_SPLIT:
                acc += _fold_split(p_cols, q_onehot_t, False, UPCAST_DOTS) * coef
            else:
                acc += tl.dot(q_onehot_t.to(tl.float32), p_cols, input_precision=ONEHOT_PRECISION) * coef

    rows_ok = row_ids < n_q_out
    cols_ok = col_ids < n_k_out
    out_base = OUT + (b64 * out_heads + h_out) * n_q_out * n_k_out
    tl.store(out_base + row_ids[:, None] * n_k_out + col_ids[None, :], acc, mask=rows_ok[:, None] & cols_ok[None, :])
