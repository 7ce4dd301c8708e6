"""Scratch prototypes (compile-only, NOT run on a GPU): plain Hopper attention forwards in
Triton 3.6's Gluon, the route NOTES.md 30 proposes for issue 5 target 1 at D=128.

* ``overlap``: one program, 8 warps, 128x128 tiles; QK^T of the next key tile is issued as
  an async wgmma before the current tile's softmax (FA3's intra-warpgroup overlap).
* ``pingpong``: warp-specialized, a TMA loader warp and two consumer warpgroups that take
  turns on the tensor cores through mbarriers (FA3's inter-warpgroup ping-pong).

Status: both compile for sm_90 without a GPU on triton 3.6 and 3.9
(``python scratch/gluon_fa.py overlap|pingpong`` writes /tmp/gluon_fa_<kind>.ptx/.ttgir
and prints the shared memory); correctness and speed untested. Assumptions: fp16, one
[B*H*N, D] row-major view per tensor, N a multiple of BN, no tags/probes/extras. Gluon
does not run under TRITON_INTERPRET, so this can only enter the engine as a GPU-tested
fast path beside the Triton kernel.
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
def attn_fwd(q_desc, k_desc, v_desc, o_ptr, seq_len, sm_scale,
             BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr):
    num_warps: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * seq_len + pid_m * BM
    kv_row = bh * seq_len
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_l)

    q_smem = gl.allocate_shared_memory(dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NBUF, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NBUF, BN, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NBUF):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q_smem)
    n_tiles = seq_len // BN
    for i in gl.static_range(NBUF):   # prologue: prefetch NBUF-1 tiles
        mbarrier.expect(k_bar.index(i), k_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row + i * BN, 0], k_bar.index(i), k_smem.index(i))
        mbarrier.expect(v_bar.index(i), v_desc.block_type.nbytes)
        _tma_load(v_desc, [kv_row + i * BN, 0], v_bar.index(i), v_smem.index(i))

    qk_scale = sm_scale * 1.4426950408889634
    m_i = gl.full([BM], -float("inf"), gl.float32, layout=row_l)
    l_i = gl.full([BM], 0.0, gl.float32, layout=row_l)
    acc = gl.zeros([BM, D], gl.float32, layout=o_l)
    s_zero = gl.zeros([BM, BN], gl.float32, layout=s_l)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    for j in range(1, n_tiles):
        prv = (j - 1) % NBUF
        cur = j % NBUF
        # K_j/V_j landed?
        mbarrier.wait(k_bar.index(cur), (j // NBUF) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(prv), ((j - 1) // NBUF) & 1)
        p16 = gl.convert_layout(p.to(dtype), p_l)
        o_tok = warpgroup_mma(p16, v_smem.index(prv), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])   # S_j ready, PV_{j-1} still in flight
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        # slot prv is now free (K_{j-1} and V_{j-1} consumed): refill with tile j-1+NBUF
        pf = j - 1 + NBUF
        do_pf = pf < n_tiles
        mbarrier.expect(k_bar.index(prv), k_desc.block_type.nbytes, pred=do_pf)
        _tma_load(k_desc, [kv_row + pf * BN, 0], k_bar.index(prv), k_smem.index(prv), pred=do_pf)
        mbarrier.expect(v_bar.index(prv), v_desc.block_type.nbytes, pred=do_pf)
        _tma_load(v_desc, [kv_row + pf * BN, 0], v_bar.index(prv), v_smem.index(prv), pred=do_pf)
    last = (n_tiles - 1) % NBUF
    mbarrier.wait(v_bar.index(last), ((n_tiles - 1) // NBUF) & 1)
    p16 = gl.convert_layout(p.to(dtype), p_l)
    o_tok = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, o_l))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + (q_row + rows)[:, None] * D + cols[None, :], acc.to(dtype))

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
    dtype: gl.constexpr = q_smem.dtype
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
        o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_smem.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
        mbarrier.arrive(kv_empty.index(slot))
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, o_l))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + (q_row + WG * BM + rows)[:, None] * D + cols[None, :], acc.to(dtype))

@gluon.jit
def _consumer_overlap(WG: gl.constexpr, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles,
                      qk_scale, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr):
    """Ping-pong plus intra-warpgroup overlap (FA3): one turn issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}
    back to back, hands the tensor cores over, then runs softmax_j while both GEMMs are in flight."""
    nw: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_smem.dtype
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, BN, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, D, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    q = q_smem.index(WG)
    acc = gl.zeros([BM, D], gl.float32, layout=o_l)
    s_zero = gl.zeros([BM, BN], gl.float32, layout=s_l)
    mbarrier.wait(q_bar, 0)
    # turn 0: S_0 only
    mbarrier.wait(kv_ready.index(0), 0)
    mbarrier.wait(pp_bar.index(WG), 0, pred=WG == 1)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.arrive(pp_bar.index(1 - WG))
    s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    for j in range(1, n_tiles):
        slot = j % NBUF
        prv = (j - 1) % NBUF
        mbarrier.wait(kv_ready.index(slot), (j // NBUF) & 1)
        mbarrier.wait(pp_bar.index(WG), (j & 1) ^ WG ^ 1)
        s_tok = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_smem.index(prv), acc, is_async=True)
        mbarrier.arrive(pp_bar.index(1 - WG))
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
        mbarrier.arrive(kv_empty.index(prv))          # K_{j-1} and V_{j-1} consumed
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
    last = (n_tiles - 1) % NBUF
    o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
    mbarrier.arrive(kv_empty.index(last))
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, o_l))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + (q_row + WG * BM + rows)[:, None] * D + cols[None, :], acc.to(dtype))


@gluon.jit
def attn_ws(q_desc, k_desc, v_desc, o_ptr, seq_len, sm_scale,
            BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NBUF: gl.constexpr, OVERLAP: gl.constexpr = False):
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * seq_len + pid_m * (2 * BM)
    kv_row = bh * seq_len
    n_tiles = seq_len // BN
    qk_scale = sm_scale * 1.4426950408889634
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NBUF, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NBUF, BN, D], v_desc.layout)
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
    if OVERLAP:
        gl.warp_specialize([
            (_consumer_overlap, (0, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles, qk_scale, BM, BN, D, NBUF)),
            (_consumer_overlap, (1, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles, qk_scale, BM, BN, D, NBUF)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row, n_tiles, BM, BN, NBUF)),
        ], [4, 1], [240, 24])
    else:
      gl.warp_specialize([
        (_consumer, (0, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles, qk_scale, BM, BN, D, NBUF)),
        (_consumer, (1, o_ptr, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, pp_bar, q_row, n_tiles, qk_scale, BM, BN, D, NBUF)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row, n_tiles, BM, BN, NBUF)),
    ], [4, 1], [240, 24])



_GL_DTYPE = {"fp16": gl.float16, "bf16": gl.bfloat16}
_KERNELS = {"overlap": (attn_fwd, 128, 8, 1), "pingpong": (attn_ws, 64, 4, 2), "pp_overlap": (attn_ws, 64, 4, 2)}   # kernel, BM, warps, Q tiles per program


def compile_only(kind, dt="fp16", BN=128, D=128, NBUF=2):
    """Compile for sm_90 without a GPU; writes the PTX/TTGIR to /tmp and prints the resources."""
    kernel, BM, nw, _ = _KERNELS[kind]
    ql = gl.NVMMASharedLayout.get_default_for([BM, D], _GL_DTYPE[dt])
    kl = gl.NVMMASharedLayout.get_default_for([BN, D], _GL_DTYPE[dt])
    sig = {"q_desc": f"tensordesc<{dt}[{BM},{D}],{ql!r}>", "k_desc": f"tensordesc<{dt}[{BN},{D}],{kl!r}>",
           "v_desc": f"tensordesc<{dt}[{BN},{D}],{kl!r}>", "o_ptr": f"*{dt}", "seq_len": "i32", "sm_scale": "fp32",
           "BM": "constexpr", "BN": "constexpr", "D": "constexpr", "NBUF": "constexpr"}
    extra = {"OVERLAP": True} if kind == "pp_overlap" else {}
    if extra:
        sig["OVERLAP"] = "constexpr"
    src = GluonASTSource(kernel, sig, constexprs={"BM": BM, "BN": BN, "D": D, "NBUF": NBUF, **extra})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
    open(f"/tmp/gluon_fa_{kind}.ptx", "w").write(k.asm["ptx"])
    open(f"/tmp/gluon_fa_{kind}.ttgir", "w").write(k.asm["ttgir"])
    print(kind, dt, "smem", k.metadata.shared, "num_warps", k.metadata.num_warps)


def launch(kind, q, k, v, scale=None, BN=128, NBUF=2, out=None):
    """Plain attention of contiguous [B, H, N, D] fp16/bf16 tensors, N a multiple of 128 (GPU)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    kernel, BM, nw, q_tiles = _KERNELS[kind]
    B, H, N, D = q.shape
    assert N % (BM * q_tiles) == 0 and N % BN == 0, N
    gdt = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[q.dtype]
    rows = [t.reshape(B * H * N, D) for t in (q, k, v)]
    ql = gl.NVMMASharedLayout.get_default_for([BM, D], gdt)
    kl = gl.NVMMASharedLayout.get_default_for([BN, D], gdt)
    qd = TensorDescriptor.from_tensor(rows[0], [BM, D], ql)
    kd = TensorDescriptor.from_tensor(rows[1], [BN, D], kl)
    vd = TensorDescriptor.from_tensor(rows[2], [BN, D], kl)
    o = torch.empty_like(q) if out is None else out
    scale = D ** -0.5 if scale is None else scale
    extra = {"OVERLAP": True} if kind == "pp_overlap" else {}
    launch.last = kernel[(N // (BM * q_tiles), B * H)](qd, kd, vd, o, N, scale, BM=BM, BN=BN, D=D, NBUF=NBUF,
                                                       num_warps=nw, **extra)
    return o


if __name__ == "__main__":
    compile_only(sys.argv[1] if len(sys.argv) > 1 else "overlap", sys.argv[2] if len(sys.argv) > 2 else "fp16")
