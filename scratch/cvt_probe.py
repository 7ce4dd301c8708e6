"""Does a warp-local blocked [64,128] fp32 tile convert to the wgmma accumulator layout
without shared memory on this Triton? Compile-only for sm_90 (no GPU)."""
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

@gluon.jit
def k(m_ptr, o_ptr, m_sq, MODE: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16])
    if MODE == 0:
        L: gl.constexpr = s_layout
    elif MODE == 1:
        L: gl.constexpr = gl.BlockedLayout([16, 4], [1, 32], [4, 1], [1, 0])
    else:
        L: gl.constexpr = gl.BlockedLayout([2, 4], [8, 4], [4, 1], [1, 0])
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, L))
    cols = gl.arange(0, 128, layout=gl.SliceLayout(0, L))
    m = gl.load(m_ptr + rows[:, None] * m_sq + cols[None, :])
    m = gl.convert_layout(m, s_layout)
    rs = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    cs = gl.arange(0, 128, layout=gl.SliceLayout(0, s_layout))
    gl.store(o_ptr + rs[:, None] * 128 + cs[None, :], m * 2.0)

for mode in (0, 1, 2):
    src = GluonASTSource(k, {"m_ptr": "*fp32", "o_ptr": "*fp32", "m_sq": "i32", "MODE": "constexpr"},
                         constexprs={"MODE": mode}, attrs={(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = c.asm["ptx"]
    print(mode, "shared", c.metadata.shared, "ld.global", ptx.count("ld.global"), "v4", ptx.count("ld.global.v4"),
          "v2", ptx.count("ld.global.v2"), "shfl", ptx.count("shfl"), "st.shared", ptx.count("st.shared"), "ld.shared", ptx.count("ld.shared"),
          "prmt", ptx.count("prmt"), "selp", ptx.count("selp"))
