"""Scratch: compile kernels/hopper_map.head_map_kernel for sm_90 without a GPU; print shared
memory, wgmma waits and spills per variant.

Needs scratch/gluon_map.patch applied (NOTES.md 65).
"""
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, "tests")
from hopper_compile import spill_instructions  # noqa: E402
from iidkern.kernels import hopper_map  # noqa: E402


def compile_map(dtype="bf16", head_dim=128, block_m=64, block_n=128, nbuf=2, has_coef=False, num_warps=4):
    gl_dtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def desc(rows):
        block = [1, 1, rows, head_dim]
        layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
        return f"tensordesc<{dtype}[{','.join(map(str, block))}],{layout!r}>"
    signature = {"q_desc": desc(block_m), "k_desc": desc(block_n), "lse_ptr": "*fp32", "coef_ptr": "*fp32",
                 "out_ptr": "*fp32", "coef_value": "fp32", "qk_scale": "fp32", "n_heads": "i32", "n_q": "i32",
                 "q_lo": "i32", "q_hi": "i32", "k_lo": "i32", "k_hi": "i32"}
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, NBUF=nbuf, HAS_COEF=has_coef)
    signature.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(hopper_map.head_map_kernel, signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    return {"shared": compiled.metadata.shared, "regs": getattr(compiled, "n_regs", None),
            "wgmma_wait_1": ptx.count("wgmma.wait_group.sync.aligned 1"),
            "wgmma_wait_0": ptx.count("wgmma.wait_group.sync.aligned 0"),
            "tma_4d": ptx.count("cp.async.bulk.tensor.4d"), "bar_sync": ptx.count("bar.sync"),
            "spills": spill_instructions(compiled.asm["cubin"])}


if __name__ == "__main__":
    out = {}
    for name, kw in {"d128": {}, "d128-fp16-coef": dict(dtype="fp16", has_coef=True), "d64": dict(head_dim=64),
                     "d128-3buf": dict(nbuf=3), "d128-m128": dict(block_m=128, num_warps=8)}.items():
        try:
            out[name] = compile_map(**kw)
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {str(exc)[-300:]} {exc.__cause__!r}"[-700:]
    print(json.dumps(out, indent=1))
