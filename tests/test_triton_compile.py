"""Every Triton kernel specialization that the package launches compiles for sm_90 and sm_80.

The interpreter runs kernels as Python and never builds their IR, so errors that only the
compiler sees (a branch that does not type-check, a constexpr misuse, ptxas) would first show
on a GPU. tests/triton_compile.py records the launches of a matrix of calls with the
package in compiled mode (the tiles, warps and constexprs a GPU gets) and compiles each for
real targets, in a child process: this process interprets.
"""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="this Triton has no NVIDIA backend to compile with")


@pytest.fixture(scope="module")
def compiled(compile_script):
    return compile_script("triton_compile.py")


def _seen(compiled, kernel, name):
    return {e["constexprs"][name] for e in compiled if e["kernel"] == kernel and name in e["constexprs"]}


def test_every_launched_specialization_compiles(compiled):
    failed = [f"{e['kernel']} for {e['target']}, launched by {e['calls']}: {e['error']}"
              for e in compiled if not e["ok"]]
    assert not failed, "\n\n".join(failed)


@pytest.mark.parametrize("kernel,flag", [
    *[("attn_fwd_kernel", f) for f in ("HAS_TAGS", "HAS_HW", "HAS_MULT", "HAS_X", "HAS_KG", "STORE_LSE", "COUNT_TILES",
                                       "KG_SPLIT", "MULT_SPLIT", "EVEN_D", "HAS_LISTS")],
    *[("probe_kernel", f) for f in ("Q_SPREAD", "K_SPREAD", "HAS_COEF", "KEEP_HEADS", "HAS_TAGS", "FOLD_SPLIT")],
    *[("combine_kernel", f) for f in ("HAS_HW", "STORE_LSE", "HAS_KG")],
])
def test_the_calls_compile_each_branch_both_ways(compiled, kernel, flag):
    """The matrix is not vacuous: each flag's branch and its absence are compiled."""
    assert _seen(compiled, kernel, flag) == {"False", "True"}


def test_the_calls_reach_every_kernel_precision_and_target(compiled):
    assert {e["kernel"] for e in compiled} == {"attn_fwd_kernel", "probe_kernel", "pair_stats_kernel", "combine_kernel"}
    assert {e["target"] for e in compiled} == {"sm_90", "sm_80"}
    assert _seen(compiled, "attn_fwd_kernel", "UPCAST_DOTS") == {"False"}  # the interpreter's, never a GPU's
    assert _seen(compiled, "attn_fwd_kernel", "KG_HALF_DOT") >= {"0", "2"}  # fp32 products, the fp16 split
    assert _seen(compiled, "attn_fwd_kernel", "DOT_PRECISION") == {"'tf32'", "'ieee'"}
    assert _seen(compiled, "attn_fwd_kernel", "BLOCK_D") == {"64", "128"}
