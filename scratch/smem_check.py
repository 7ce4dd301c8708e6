"""Shared memory (and spills via ptxas -v) of the main kernel per feature at the D=64 and D=128 configs."""
import sys
sys.argv = ["x"]
src = open("scratch/compile_check.py").read().split("flash = load")[0]
exec(compile(src.replace('os.path.dirname(__file__)', '"scratch"'), "cc", "exec"))
flash = load("flash_fwd")
half = {n: "*bf16" for n in ("Q", "K", "V", "O")}
ints = {n: "*i32" for n in ("Q_TAGS", "K_TAGS", "PART_CNT", "PART_IDX", "FULL_CNT", "FULL_IDX", "RUN_START",
                           "RUN_STOP", "RAGGED_FULL", "KG_IDS", "TILES")}
ints.update({"Q_TAGS": "*i64", "K_TAGS": "*i64"})
import os, subprocess, tempfile, triton as _t
PTXAS = os.path.join(os.path.dirname(_t.__file__), "backends", "nvidia", "bin", "ptxas")
print("--- registers (ptxas -v)")
for d, bm, bn, w, st, mr in [(64, 64, 64, 4, 3, None), (64, 64, 64, 4, 3, 168), (128, 128, 64, 8, 3, None)]:
    base = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, X_PAD=16, G_PAD=16, STORE_LSE=False, COUNT_TILES=False,
                DOT_PRECISION="tf32", EVEN_D=True, X_PRECISION="tf32", UPCAST_DOTS=False, HAS_HW=False, HAS_X=False,
                KG_HALF_DOT=True)
    for label, extra in [("plain", {}), ("tags", dict(HAS_TAGS=True)), ("tags ragged", dict(HAS_TAGS=True, RAGGED_TAIL=True)), ("tags no lists", dict(HAS_TAGS=True, RAGGED_TAIL=True, HAS_LISTS=False)), ("mult split", dict(HAS_MULT=True)),
                         ("mult per-tile", dict(HAS_MULT=True, MULT_SPLIT=False)), ("kg split", dict(HAS_KG=True, KG_SPLIT=True)),
                         ("kg per-tile", dict(HAS_KG=True, KG_SPLIT=False))]:
        cfg = dict(base, HAS_TAGS=False, HAS_MULT=False, HAS_KG=False)
        cfg.update(extra)
        k = compile_kernel(flash.attn_fwd_kernel, {**half, **ints}, cfg, num_warps=w, num_stages=st, **({"maxnreg": mr} if mr else {}))
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([PTXAS.replace("ptxas", "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if "REG" in l]
        print(f"D={d} maxnreg={mr} {label:14s} {line[0].strip() if line else out.stdout[-300:] + out.stderr[-300:]}")
