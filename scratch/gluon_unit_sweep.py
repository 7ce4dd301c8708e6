"""Session 31: compile the Gluon kernel (sm_90, no GPU, triton 3.6) with each integer argument
as the constant 1, as Triton specializes a launch whose argument holds 1 (n_k == 1 failed to
compile with a fused key-group probe, NOTES.md 80). Variants: every extra, and the split.
Usage: TRITON_INTERPRET=0 PYTHONPATH=. python scratch/gluon_unit_sweep.py"""
import sys

sys.path.insert(0, "tests")
import hopper_compile as hc  # noqa: E402

ORIG = hc.GluonASTSource
ONE = []


def patched(fn, signature, constexprs=None, attrs=None):
    for name in ONE:
        constexprs[name] = 1
        signature[name] = "constexpr"
        attrs = {k: v for k, v in attrs.items() if k != (fn.arg_names.index(name),)}
    return ORIG(fn, signature, constexprs=constexprs, attrs=attrs)


hc.GluonASTSource = patched
VARIANTS = {"all": dict(dtype="bf16", has_hw=True, store_lse=True, g_pad=8, has_mult=True, tags="i32"),
            "split-kg": dict(dtype="bf16", has_hw=True, store_lse=True, g_pad=8, split=True),
            "kg16": dict(dtype="bf16", has_hw=True, store_lse=False, g_pad=16)}
NAMES = sys.argv[1].split(",") if len(sys.argv) > 1 else [
    "n_heads", "n_q", "n_k", "kg_q0", "kg_q1", "kg_k0", "kg_k1", "n_groups", "kg_sb", "kgc_sb", "m_q0", "m_q1", "m_k0",
    "m_k1", "m_sb", "m_sh", "m_sq", "hw_sb", "hw_sh", "hw_sn", "qt_sb", "kt_sb", "o_sb", "o_sh", "o_sn", "n_whole",
    "n_qp", "pieces_per_tile", "n_zero"]
for variant, kw in VARIANTS.items():
    for name in NAMES:
        ONE[:] = [name]
        try:
            hc.compile_variant(**kw)
            print(variant, name, "ok", flush=True)
        except Exception as e:  # noqa: BLE001
            print(variant, name, "FAIL", type(e).__name__, str(e)[-120:].replace("\n", " "), flush=True)
