"""Scratch (no GPU): does triton keep a loop-carried QK^T of the next key tile in flight
while the softmax of the current tile runs (FA3's intra-warpgroup overlap)? Compiles a
minimal forward with and without that manual prefetch for sm_90 and writes the ttgir to
/tmp/pf*.ttgir: look for the `warp_group_dot_wait` after the prefetched dot (NOTES.md 26).
"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def _step(s, m_i, l_i, acc, v, qk_scale):
    """Online-softmax update with this tile's scores and values."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def fa(Q, K, V, O, n, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_t = n // BLOCK_N
    if PREFETCH:
        # the next tile's scores are issued before this tile's softmax (loop-carried)
        s = tl.dot(q, tl.trans(tl.load(K + offs_n0[:, None] * D + offs_d[None, :])))
        for j in range(0, n_t):
            jn = tl.minimum(j + 1, n_t - 1)
            s_next = tl.dot(q, tl.trans(tl.load(K + (jn * BLOCK_N + offs_n0)[:, None] * D + offs_d[None, :])))
            v = tl.load(V + (j * BLOCK_N + offs_n0)[:, None] * D + offs_d[None, :])
            m_i, l_i, acc = _step(s, m_i, l_i, acc, v, qk_scale)
            s = s_next
    else:
        for j in range(0, n_t):
            s = tl.dot(q, tl.trans(tl.load(K + (j * BLOCK_N + offs_n0)[:, None] * D + offs_d[None, :])))
            v = tl.load(V + (j * BLOCK_N + offs_n0)[:, None] * D + offs_d[None, :])
            m_i, l_i, acc = _step(s, m_i, l_i, acc, v, qk_scale)
    tl.store(O + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


for pf in (False, True):
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "n": "i32", "qk_scale": "fp32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D": "constexpr", "PREFETCH": "constexpr"}
    src = ASTSource(fn=fa, signature=sig, constexprs={(6,): 128, (7,): 64, (8,): 128, (9,): pf},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(5)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
    ir = k.asm["ttgir"]
    waits = [line.split("{")[1].split("}")[0] for line in ir.splitlines() if "warp_group_dot_wait" in line]
    print("PREFETCH", pf, "wgmma waits:", waits)
    open(f"/tmp/pf{int(pf)}.ttgir", "w").write(ir)
    print("PREFETCH", pf, "shared", k.metadata.shared)
