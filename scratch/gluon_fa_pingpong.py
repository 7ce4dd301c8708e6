"""Scratch prototype (compile-only, NOT run on a GPU): a plain Hopper attention forward in
Triton 3.6's Gluon, the route NOTES.md 30 proposes for issue 5 target 1 at D=128.

Status: compiles for sm_90 without a GPU on triton 3.6 and 3.9 (`python scratch/gluon_fa_pingpong.py`
writes its PTX/TTGIR next to /tmp and prints registers/spills/shared memory); correctness
and speed untested. Assumptions: fp16, one [B*H*N, D] row-major view per tensor, N a
multiple of BN, no tags/probes/extras. Gluon does not run under TRITON_INTERPRET, so this
can only enter the engine behind the Triton kernel as a GPU-tested fast path.
"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row, n_tiles,
            BM: gl.constexpr, BN: gl.constexpr, NBUF: gl.constexpr):
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [q_row + BM, 0], q_bar, q_smem.index(1))
    for j in range(n_tiles):
        slot = j % NBUF
        # wait for both consumers to release the slot (first pass: phase trick, passes immediately)
        mbarrier.wait(kv_empty.index(slot), ((j // NBUF) & 1) ^ 1)
        mbarrier.expect(kv_ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row + j * BN, 0], kv_ready.index(slot), k_smem.index(slot))
        _tma_load(v_desc, [kv_row + j * BN, 0], kv_ready.index(slot), v_smem.index(slot))

@gluon.jit
def _consumer(WG: gl.constexpr, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles, qk_scale,
              BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr):
    nw: gl.constexpr = gl.num_warps()
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, BN, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, D, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    q = q_smem.index(WG)
    m_i = gl.full([BM], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.full([BM], 0.0, gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BM, D], gl.float32, layout=o_l)
    s_zero = gl.zeros([BM, BN], gl.float32, layout=s_l)
    mbarrier.wait(q_bar, 0)
    for j in range(n_tiles):
        slot = j % NBUF
        ph = (j // NBUF) & 1
        mbarrier.wait(kv_ready.index(slot), ph)
        # ping-pong: wait my turn to issue GEMM0 (WG1 starts one turn later)
        mbarrier.wait(pp_bar.index(WG), (j & 1) ^ WG ^ 1, pred=j > 0 or WG == 1)
        s_tok = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        mbarrier.arrive(pp_bar.index(1 - WG))          # hand the tensor cores to the other WG
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        o_tok = warpgroup_mma(gl.convert_layout(p.to(gl.float16), p_l), v_smem.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
        mbarrier.arrive(kv_empty.index(slot))
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, o_l))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + (q_row + WG * BM + rows)[:, None] * D + cols[None, :], acc.to(gl.float16))

@gluon.jit
def attn_ws(q_desc, k_desc, v_desc, o_ptr, seq_len, sm_scale,
            BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr):
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * seq_len + pid_m * (2 * BM)
    kv_row = bh * seq_len
    n_tiles = seq_len // BN
    qk_scale = sm_scale * 1.4426950408889634
    q_smem = gl.allocate_shared_memory(gl.float16, [2, BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.float16, [NBUF, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float16, [NBUF, BN, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    pp_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NBUF):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)   # both consumer WGs release
    for i in gl.static_range(2):
        mbarrier.init(pp_bar.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (0, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles, qk_scale, BM, BN, D, NBUF)),
        (_consumer, (1, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles, qk_scale, BM, BN, D, NBUF)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row, n_tiles, BM, BN, NBUF)),
    ], [4, 1], [240, 24])

BM, BN, D, NBUF = 64, 128, 128, 2
ql = gl.NVMMASharedLayout.get_default_for([BM, D], gl.float16)
kl = gl.NVMMASharedLayout.get_default_for([BN, D], gl.float16)
sig = {"q_desc": f"tensordesc<fp16[{BM},{D}],{ql!r}>", "k_desc": f"tensordesc<fp16[{BN},{D}],{kl!r}>",
       "v_desc": f"tensordesc<fp16[{BN},{D}],{kl!r}>", "o_ptr": "*fp16", "seq_len": "i32", "sm_scale": "fp32",
       "BM": "constexpr", "BN": "constexpr", "D": "constexpr", "NBUF": "constexpr"}
src = GluonASTSource(attn_ws, sig, constexprs={"BM": BM, "BN": BN, "D": D, "NBUF": NBUF})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
open("/tmp/gluon_fa_pingpong.ptx", "w").write(k.asm["ptx"]); open("/tmp/gluon_fa_pingpong.ttgir", "w").write(k.asm["ttgir"])
print("smem", k.metadata.shared, "num_warps", k.metadata.num_warps)
