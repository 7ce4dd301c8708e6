"""Compile the Hopper Gluon kernel for sm_90 without a GPU and print what its PTX holds (JSON).

Run as a script by tests/test_hopper_fwd.py in a process with ``TRITON_INTERPRET=0``: in
an interpreting process Triton's library functions (``gl.max``, ...) are interpreter
objects that the Gluon compiler cannot use.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from iidkern.kernels import hopper_fwd


def spill_instructions(cubin: bytes) -> int:
    """Local-memory loads and stores in the SASS (ptxas spills), or -1 without Triton's cuobjdump."""
    import triton.backends.nvidia as nvidia
    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\b(?:LDL|STL)\b", sass))


def compile_variant(dtype: str, has_hw: bool, store_lse: bool, g_pad: int = 0, has_mult: bool = False,
                    head_dim: int = 128, tags: str = "", split: bool = False, zero: bool = False,
                    m_dtype: str = "fp32") -> dict:
    """One specialization; ``g_pad`` > 0 adds a fused key-group probe with that many columns,
    ``has_mult`` a block multiplier (values of ``m_dtype``), ``tags`` a tag mask of that int type ("i32"/"i64"),
    ``split`` the last wave's key split (pieces writing partial outputs), ``zero`` the zeroed
    counters of the pair statistics' pass."""
    gl_dtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def desc(rows):
        block = [1, 1, rows, head_dim]
        layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
        return f"tensordesc<{dtype}[{','.join(map(str, block))}],{layout!r}>"
    signature = {"q_desc": desc(hopper_fwd.BLOCK_M), "k_desc": desc(hopper_fwd.BLOCK_N),
                 "v_desc": desc(hopper_fwd.BLOCK_N), "o_ptr": f"*{dtype}", "o_sb": "i32", "o_sh": "i32",
                 "o_sn": "i32", "lse_ptr": "*fp32", "hw_ptr": "*fp32", "hw_sb": "i32", "hw_sh": "i32",
                 "hw_sn": "i32", "kg_ptr": "*i32", "kg_sb": "i32", "kg_q0": "i32", "kg_q1": "i32", "kg_k0": "i32",
                 "kg_k1": "i32", "n_groups": "i32", "kgo_ptr": "*fp32", "kgc_ptr": "*fp32", "kgc_sb": "i32",
                 "m_ptr": f"*{m_dtype}", "m_sb": "i32", "m_sh": "i32", "m_sq": "i32", "m_sk": "i32", "m_q0": "i32",
                 "m_q1": "i32", "m_k0": "i32", "m_k1": "i32",
                 "qt_ptr": f"*{tags or 'i32'}", "qt_sb": "i32", "kt_ptr": f"*{tags or 'i32'}", "kt_sb": "i32",
                 "vis_ptr": "*i32", "vis_full_ptr": "*i32", "vis_count_ptr": "*i32",
                 "n_heads": "i32", "n_q": "i32", "n_k": "i32", "qk_scale": "fp32",
                 "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "part_kg_ptr": "*fp32", "n_whole": "i32", "n_qp": "i32",
                 "pieces_per_tile": "i32", "zero_ptr": "*i32", "n_zero": "i32"}
    constexprs = dict(BLOCK_M=hopper_fwd.BLOCK_M, BLOCK_N=hopper_fwd.BLOCK_N, HEAD_DIM=head_dim,
                      NBUF=hopper_fwd.NUM_BUFFERS, HAS_HW=has_hw, STORE_LSE=store_lse,
                      HAS_KG=g_pad > 0, G_PAD=max(g_pad, 8), HAS_MULT=has_mult, HAS_TAGS=bool(tags),
                      SPLIT=split, ZERO=zero, CONSUMER_REGS=hopper_fwd.CONSUMER_REGS, LOADER_REGS=hopper_fwd.LOADER_REGS)
    # As a launch of Flux's multiplier specializes them: a unit key stride is a constant; the
    # pointer, strides and sub-block bounds are 16-aligned (what lets its loads be vectorized).
    constexprs["m_sk"] = 1
    names = hopper_fwd.attn_fwd_hopper.arg_names
    aligned = ("m_ptr", "m_sb", "m_sh", "m_sq", "m_q0", "m_q1", "m_k0", "m_k1")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    signature.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(hopper_fwd.attn_fwd_hopper, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    return {"shared": compiled.metadata.shared,
            "wgmma_wait_1": ptx.count("wgmma.wait_group.sync.aligned 1"),
            "setmaxnreg": ptx.count("setmaxnreg"),
            "tma_4d": ptx.count("cp.async.bulk.tensor.4d"),
            "global_loads": ptx.count("ld.global"),
            "global_loads_vector": ptx.count("ld.global.v"),
            "global_stores": ptx.count("st.global"),
            "mma_sync": ptx.count("mma.sync.aligned"),
            "spills": spill_instructions(compiled.asm["cubin"])}


if __name__ == "__main__":
    variants = [(dt, hw, hw) for dt in ("bf16", "fp16") for hw in (False, True)]
    results = {f"{dt}-{hw}-{lse}": compile_variant(dt, hw, lse) for dt, hw, lse in variants}
    # A fused key-group probe, as IID asks for it (3 instructions: 8 columns) and at the most groups.
    results.update({f"{dt}-kg{g}": compile_variant(dt, False, True, g) for dt in ("bf16", "fp16") for g in (8, 32)})
    # HeadRouter's block multiplier, alone and beside IID's key-group probe.
    results.update({f"{dt}-mult": compile_variant(dt, False, False, has_mult=True) for dt in ("bf16", "fp16")})
    results.update({f"{dt}-mult-kg8": compile_variant(dt, has_hw=True, store_lse=True, g_pad=8, has_mult=True)
                    for dt in ("bf16", "fp16")})
    # IID's instruction masks (tags), alone, with int64 tags, and beside every other extra.
    results.update({f"{dt}-tags": compile_variant(dt, False, False, tags="i32") for dt in ("bf16", "fp16")})
    results["bf16-tags64"] = compile_variant("bf16", False, False, tags="i64")
    results["bf16-tags-all"] = compile_variant("bf16", True, True, g_pad=8, has_mult=True, tags="i32")
    # Head dim 64 (long SD3 sequences), plain and with every extra.
    results["bf16-d64"] = compile_variant("bf16", False, False, head_dim=64)
    results["bf16-d64-all"] = compile_variant("bf16", True, True, g_pad=8, has_mult=True, tags="i64", head_dim=64)
    # The last wave's key split: plain, and with head weights and LSE (both joined by the combine pass).
    results.update({f"{dt}-split": compile_variant(dt, False, False, split=True) for dt in ("bf16", "fp16")})
    results["bf16-split-hw-lse"] = compile_variant("bf16", True, True, split=True)
    results["bf16-split-kg8"] = compile_variant("bf16", False, True, g_pad=8, split=True)
    results["bf16-d64-split"] = compile_variant("bf16", True, True, head_dim=64, split=True)
    # A block multiplier's pieces: at head dim 64 they compile without spills (NOTES.md 69) ...
    results["bf16-d64-split-mult"] = compile_variant("bf16", True, True, has_mult=True, head_dim=64, split=True)
    # ... and at head dim 128 with 16-bit values, half the registers of fp32 ones (NOTES.md 71),
    # which keep whole tiles there: their split variant is compiled to compare.
    results["bf16-split-mult16"] = compile_variant("bf16", False, False, has_mult=True, split=True, m_dtype="bf16")
    results["bf16-split-mult32"] = compile_variant("bf16", False, False, has_mult=True, split=True)
    # Zeroed counters for the pair statistics' pass (HeadRouter's branch pairs), whole tiles and split.
    results["bf16-zero"] = compile_variant("bf16", False, False, zero=True)
    results["bf16-split-zero"] = compile_variant("bf16", False, False, split=True, zero=True)
    print(json.dumps(results))
    sys.stdout.flush()
