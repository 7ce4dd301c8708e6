"""Scratch: look in the compiled IR (ttgir, sm_90, local triton) of the main kernel for
layout conversions of the [BLOCK_M, 16] side accumulators (value probe, key groups)
between two wgmma layouts. NOTES.md 25: such conversions sat in the ragged-tail code when
the fused key-group probe failed on the H100 (triton 3.6); the loops have none.

Usage: python scratch/ir_scan.py   (no GPU needed; run it in a venv with triton 3.6 too)
"""
import re
import sys

sys.argv = ["x"]
src = open("scratch/compile_check.py").read().split("flash = load")[0]
exec(compile(src.replace('os.path.dirname(__file__)', '"scratch"'), "cc", "exec"))
flash = load("flash_fwd")  # noqa: F821 (defined by compile_check's first half)
half = {n: "*bf16" for n in ("Q", "K", "V", "O")}
ints = {n: "*i32" for n in ("Q_TAGS", "K_TAGS", "PART_CNT", "PART_IDX", "FULL_CNT", "FULL_IDX", "RUN_START",
                           "RUN_STOP", "RAGGED_FULL", "KG_IDS", "TILES")}
ints.update({"Q_TAGS": "*i64", "K_TAGS": "*i64"})
found = 0
for d, bm, bn, w, mr in [(64, 64, 64, 4, 168), (128, 128, 64, 8, None)]:
    for label, extra in [("kg split", dict(HAS_KG=True)), ("kg per-tile", dict(HAS_KG=True, KG_SPLIT=False)),
                         ("kg+mult", dict(HAS_KG=True, HAS_MULT=True)), ("x", dict(HAS_X=True)),
                         ("kg+tags", dict(HAS_KG=True, HAS_TAGS=True))]:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, X_PAD=16, G_PAD=16, STORE_LSE=False, COUNT_TILES=False,
                   DOT_PRECISION="tf32", EVEN_D=True, X_PRECISION="tf32", UPCAST_DOTS=False, HAS_HW=False,
                   HAS_X=False, KG_HALF_DOT=True, HAS_TAGS=False, HAS_MULT=False, HAS_KG=False)
        cfg.update(extra)
        k = compile_kernel(flash.attn_fwd_kernel, {**half, **ints}, cfg, num_warps=w, num_stages=3,  # noqa: F821
                           **({"maxnreg": mr} if mr else {}))
        ir = k.asm["ttgir"]
        conv = re.findall(r"ttg.convert_layout %\S+ : tensor<(\d+)x16xf32, (#mma\d*)> -> tensor<\d+x16xf32, (#mma\d*)>", ir)
        found += len(conv)
        print(f"D={d} {label:12s} [*, 16] f32 conversions between wgmma layouts: {conv or 'none'}")
print("conversions found:", found)
