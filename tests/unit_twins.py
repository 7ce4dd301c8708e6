"""Print (JSON) which integer parameters each engine kernel and its generic twin leave
unspecialized, as compiled (not interpreted) Triton sees them: Triton reads
``KernelParam.do_not_specialize`` when it builds a launch's specialization, so an argument of 1
there stays a run-time ``i32`` instead of the constant 1. Run by tests/test_unit_lengths.py in a
process with ``TRITON_INTERPRET=0`` (the interpreter's functions have no parameters to read)."""
import json
import sys

from iidkern.kernels import hopper_fwd, launch

launchers = {"attn": launch._ATTN, "probe": launch._PROBE, "pair_stats": launch._PAIR_STATS}
if hopper_fwd.AVAILABLE:
    launchers.update(hopper=hopper_fwd._ATTN_HOPPER, combine=hopper_fwd._COMBINE)


def unspecialized(kernel):
    return [p.name for p in kernel.params if p.do_not_specialize]


print(json.dumps({name: {"kind": type(lc.kernel).__name__, "primary": unspecialized(lc.kernel),
                         "twin": unspecialized(lc._twin.kernel), "twin_kind": type(lc._twin.kernel).__name__}
                  for name, lc in launchers.items()}))
sys.stdout.flush()
