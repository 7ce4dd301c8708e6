"""Compile the engine kernels for sm_90 on a machine without a GPU (frontend + ptxas).

Catches Triton frontend errors (constexpr handling, shapes, types) before a device run.
Usage: python scratch/compile_check.py  (uses the locally installed triton)
"""
import importlib.util
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "kernels")


def load(mod):
    spec = importlib.util.spec_from_file_location(mod, os.path.join(ROOT, f"{mod}.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def compile_kernel(fn, ptr_types, constexprs, num_warps=4, num_stages=3, **options):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ptr_types:
            sig[p.name] = ptr_types[p.name]
        elif p.name[0].isupper():
            sig[p.name] = "*fp32"
        elif "scale" in p.name or p.name == "coef_value":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    full = {p.name: p.default for p in fn.params if p.is_constexpr}
    full.update(constexprs)
    cst = {(i,): full[p.name] for i, p in enumerate(fn.params) if p.is_constexpr}
    # As on the device: pointers 16-byte aligned, strides multiples of 16 (Triton's "D" attribute).
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if not p.is_constexpr and (sig[p.name].startswith("*") or p.name.startswith("stride_"))}
    src = ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages, **options))


flash = load("flash_fwd")
probe = load("probe")
half = {n: "*bf16" for n in ("Q", "K", "V", "O")}
ints = {n: "*i32" for n in ("Q_TAGS", "K_TAGS", "PART_CNT", "PART_IDX", "FULL_CNT", "FULL_IDX", "RUN_START",
                           "RUN_STOP", "RAGGED_FULL", "KG_IDS", "TILES")}
ints.update({"Q_TAGS": "*i64", "K_TAGS": "*i64"})
base = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, X_PAD=16, G_PAD=16, STORE_LSE=True, COUNT_TILES=False,
            DOT_PRECISION="tf32", EVEN_D=True, X_PRECISION="tf32", UPCAST_DOTS=False)
fails = 0
combos = list(itertools.product([False, True], repeat=4))
for tags, mult, kg, split in combos:
    for half_dot in ([False, True] if kg else [False]):
        cfg = dict(base, HAS_TAGS=tags, HAS_HW=False, HAS_MULT=mult, HAS_X=False, HAS_KG=kg, KG_HALF_DOT=half_dot,
                   KG_SPLIT=split, MULT_SPLIT=split)
        label = f"tags={tags} mult={mult} kg={kg} split={split} half_dot={half_dot}"
        try:
            compile_kernel(flash.attn_fwd_kernel, {**half, **ints}, cfg, num_warps=8)
            print("ok  ", label)
        except Exception as e:  # noqa: BLE001
            fails += 1
            print("FAIL", label, type(e).__name__, str(e).splitlines()[:12])
# The value probe (HAS_X) beside the others, at both head-dim configs (its ragged last tile
# runs in a one-tile loop, NOTES.md 25).
for d, bm, bn, w, extra in [(128, 128, 64, 8, {}), (64, 64, 64, 4, {}), (128, 128, 64, 8, dict(HAS_KG=True)),
                            (64, 64, 64, 4, dict(HAS_KG=True, KG_HALF_DOT=True)), (128, 128, 64, 8, dict(HAS_TAGS=True))]:
    cfg = dict(base, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, HAS_TAGS=False, HAS_HW=False, HAS_MULT=False, HAS_X=True,
               HAS_KG=False)
    cfg.update(extra)
    label = f"x D={d} {extra}"
    try:
        compile_kernel(flash.attn_fwd_kernel, {**half, **ints}, cfg, num_warps=w)
        print("ok  ", label)
    except Exception as e:  # noqa: BLE001
        fails += 1
        print("FAIL", label, type(e).__name__, str(e).splitlines()[:12])
print("failures:", fails)
sys.exit(1 if fails else 0)
