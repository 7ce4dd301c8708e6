"""Which integer kernel arguments take the value 1 over a set of calls (recorded launches)."""
import inspect, sys, collections
import torch
sys.path.insert(0, "tests")
import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups, ValueProbe
from iidkern.kernels import fast_launch

def int_params(kernel):
    fn = kernel.fn
    return [n for n, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation)]

def ones(launches):
    seen = collections.defaultdict(lambda: collections.defaultdict(set))
    for launcher, grid, args, kwargs in launches:
        k = launcher.kernel
        name = k.fn.__name__
        for pname, a in zip(int_params(k), args):
            if type(a) is int:
                seen[name][pname].add(a == 1)
    return seen

if __name__ == "__main__":
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    q = torch.randn(2, 1, 40, 1, device=dev)
    with fast_launch.recording() as L:
        iidkern.attention(q, q, q, probes=[Probe(TokenGroups.each(1, 2), TokenGroups.segments([(1, 2)], 40)),
                                           ValueProbe(torch.randn(40, 1, device=dev), TokenGroups.each(0, 1))],
                          block_multiplier=BlockMultiplier(torch.rand(2, 1, 1, device=dev), query_start=1, key_start=1),
                          pair_stats=[(0, 1)], return_lse=True, backend="triton")
    for name, d in ones(L).items():
        print(name, {p: v for p, v in d.items()})
