"""Every Triton kernel specialization that the package launches compiles for sm_90 and sm_80.

The interpreter runs kernels as Python and never builds their IR, so errors that only the
compiler sees (a branch that does not type-check, a constexpr misuse, ptxas) would first show
on a GPU. tests/triton_compile.py records the launches of a matrix of calls with the
package in compiled mode (the tiles, warps and constexprs a GPU gets) and compiles each for
real targets, in a child process: this process interprets.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="this Triton has no NVIDIA backend to compile with")


# The flags each compiled both ways (UPCAST_DOTS, the interpreter's, never on a GPU).
BRANCHES = {
    "attn_fwd_kernel": ("HAS_TAGS", "HAS_HW", "HAS_MULT", "HAS_X", "HAS_KG", "STORE_LSE", "COUNT_TILES", "KG_SPLIT",
                        "MULT_SPLIT", "EVEN_D", "HAS_LISTS"),
    "probe_kernel": ("Q_SPREAD", "K_SPREAD", "HAS_COEF", "KEEP_HEADS", "HAS_TAGS"),
    "combine_kernel": ("HAS_HW", "STORE_LSE", "HAS_KG"),
}


def _seen(compiled, kernel, name):
    return {e["constexprs"][name] for e in compiled if e["kernel"] == kernel and name in e["constexprs"]}


def test_every_launched_specialization_compiles():
    """One test, not several: pytest-xdist would run a shared fixture once per worker, and
    the compiles take minutes."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile.py")], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])

    failed = [f"{e['kernel']} for {e['target']}, launched by {e['calls']}: {e['error']}"
              for e in compiled if not e["ok"]]
    assert not failed, "\n\n".join(failed)

    # The matrix is not vacuous: every kernel, both targets, each branch both ways, each precision.
    assert {e["kernel"] for e in compiled} == {"attn_fwd_kernel", "probe_kernel", "pair_stats_kernel", "combine_kernel"}
    assert {e["target"] for e in compiled} == {"sm_90", "sm_80"}
    for kernel, flags in BRANCHES.items():
        for flag in flags:
            assert _seen(compiled, kernel, flag) == {"False", "True"}, f"{kernel} {flag}"
    assert _seen(compiled, "attn_fwd_kernel", "UPCAST_DOTS") == {"False"}
    assert _seen(compiled, "attn_fwd_kernel", "KG_HALF_DOT") >= {"0", "2"}  # fp32 products, the fp16 split
    assert _seen(compiled, "attn_fwd_kernel", "DOT_PRECISION") == {"'tf32'", "'ieee'"}
    assert _seen(compiled, "attn_fwd_kernel", "BLOCK_D") == {"64", "128"}
