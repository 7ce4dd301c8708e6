"""Every integer argument of every kernel, at the value 1.

Triton compiles an integer argument that equals 1 as the constant 1 (and one divisible by 16
with that hint): code that no other value runs. Session 31 found such code faulting for one
key (bench/NOTES.md 80); the sequence lengths now take generic twins (test_unit_lengths.py).
The other integer arguments (head counts, head dims, strides, the bounds of a block multiplier
or of a probe's groups, group counts, tile counts, the tail split's counts) are each 1 in some
call below, each call checked against the float64 oracle with poisoned outputs. The coverage
test records the launches of those calls and fails when a kernel gains an integer argument
that no call sets to 1, unless ``NEVER_ONE`` says why no call can.

On CPU the kernels run under the interpreter (which specializes nothing, so there the calls
only check that they reach the values); the GPU runs are the point. There the calls run on
the kernel that routing picks (the Hopper kernel on an H100/H200 at head dim 128) and again
on the Triton kernel (``kernel_options={"hopper": False}``).
"""
import collections
import inspect

import pytest
import torch

from iidkern import BlockMultiplier, Probe, TokenGroups, ValueProbe
from iidkern.kernels import fast_launch, hopper_fwd
from test_attention_fuzz_extras import check_call, run_call

# (kernel, parameter): why no valid call passes 1 there.
NEVER_ONE = {
    ("attn_fwd_hopper", "o_sb"): "the output's batch stride: heads x queries x a head dim of 64 or 128",
    ("attn_fwd_hopper", "o_sh"): "the output's head stride: a head dim of 64 or 128, or that times the queries",
    ("attn_fwd_hopper", "o_sn"): "the Hopper kernel serves head dims 64 and 128 only: a row stride of 1 is a head dim of 1",
    ("attn_fwd_hopper", "n_whole"): "the tail split keeps whole the tiles of full waves: a multiple of the SM count",
    ("combine_kernel", "stride_ob"): "the output's batch stride, as for attn_fwd_hopper's o_sb",
    ("combine_kernel", "stride_oh"): "the output's head stride, as for attn_fwd_hopper's o_sh",
    ("combine_kernel", "stride_on"): "the Hopper kernel's head dims only (64, 128)",
    ("combine_kernel", "n_whole"): "a multiple of the SM count, as for attn_fwd_hopper",
    ("combine_kernel", "pieces"): "a split tile has at least two pieces",
    ("attn_fwd_kernel", "stride_xn"): "value probes share a side channel padded to 16 or more columns",
    ("attn_fwd_kernel", "stride_xb"): "the padded side channel's batch stride: keys x 16 or more (or 0)",
}
# Kernels that every device's calls must reach, and those only a Hopper GPU runs.
KERNELS = {"attn_fwd_kernel", "probe_kernel", "pair_stats_kernel"}
HOPPER_KERNELS = {"attn_fwd_hopper", "combine_kernel"}


def base_call(seed, b, h, nq, nk, d, dtype=torch.bfloat16, layout="bhnd"):
    return dict(layout=layout, packed=False, b=b, h=h, nq=nq, nk=nk, d=d, dtype=dtype, seed=seed, scale=None,
                tags=None, head_weights=None, probes=[], block_multiplier=None, pair_stats=None, return_lse=False,
                count_tiles=False, tiles=None)


def unit_argument_calls(gpu: bool):
    """Named calls that between them pass 1 to every integer argument of each kernel (but
    those of ``NEVER_ONE``). Head dim 128 reaches the Hopper kernel on a GPU; ``gpu=False``
    keeps the same structure at sizes the interpreter runs quickly."""
    g = torch.Generator().manual_seed(31)
    d_big = 128 if gpu else 16
    calls = {}

    # Head dim 1, one head, one query, one key: strides of 1 everywhere (in both layouts),
    # one-row multiplier and tag rows, a one-column value probe, one group.
    c = base_call(1, b=2, h=1, nq=1, nk=1, d=1, dtype=torch.float16)
    c.update(tags=("bn", torch.tensor([[1], [3]]), torch.tensor([[1], [2]])),
             head_weights=torch.rand(2, 1, generator=g) + 0.5,
             block_multiplier=BlockMultiplier(torch.rand(2, 1, 1, generator=g) * 2),
             probes=[ValueProbe(torch.randn(2, 1, 1, generator=g), TokenGroups.each(0, 1), heads="sum"),
                     Probe(TokenGroups.each(0, 1), TokenGroups.ids(torch.zeros(2, 1, dtype=torch.int32)),
                           heads="mean", normalize="keys"),
                     Probe(TokenGroups.each(0, 1), TokenGroups.each(0, 1), heads="mean"),
                     Probe(TokenGroups.ids(torch.zeros(2, 1, dtype=torch.int64)),
                           TokenGroups.ids(torch.zeros(2, 1, dtype=torch.int16)), heads="keep")],
             pair_stats=[(0, 1)], return_lse=True, count_tiles=True)
    calls["d1_units"] = c

    # The same at the Hopper kernel's head dim (on a GPU).
    c = base_call(11, b=2, h=1, nq=1, nk=1, d=d_big)
    c.update(tags=("bn", torch.tensor([[1], [3]]), torch.tensor([[1], [2]])),
             head_weights=torch.rand(2, 1, generator=g) + 0.5,
             block_multiplier=BlockMultiplier(torch.rand(2, 1, 1, 1, generator=g) * 2),
             probes=[Probe(TokenGroups.each(0, 1), TokenGroups.ids(torch.zeros(2, 1, dtype=torch.int32)),
                           heads="mean", normalize="keys")],
             pair_stats=[(0, 1)], return_lse=True)
    calls["units"] = c

    c = base_call(2, b=3, h=1, nq=17, nk=33, d=1, dtype=torch.bfloat16, layout="bnhd")
    c.update(head_weights=torch.rand(3, 1, 17, generator=g) + 0.5,
             probes=[ValueProbe(torch.randn(33, 1, generator=g), TokenGroups.each(2, 9), heads="keep"),
                     Probe(TokenGroups.each(0, 17), TokenGroups.each(0, 33), heads="sum", normalize="both")],
             pair_stats=[(1, 2), (0, 0)], return_lse=True)
    calls["d1_bnhd"] = c

    c = base_call(3, b=1, h=1, nq=1, nk=1, d=1, dtype=torch.float32)
    c.update(probes=[Probe(TokenGroups.each(0, 1), TokenGroups.each(0, 1), heads="keep")], pair_stats=[(0, 0)])
    calls["d1_single"] = c

    # Ranges that start at token 1: the multiplier's and the probes' lower bounds.
    c = base_call(4, b=2, h=2, nq=70, nk=90, d=d_big)
    kg = torch.full((90,), -1, dtype=torch.int32)
    kg[1:5], kg[5:9] = 0, 1
    c.update(head_weights=torch.rand(2, generator=g) + 0.5,
             block_multiplier=BlockMultiplier(torch.rand(2, 2, 40, 50, generator=g) * 2, query_start=1, key_start=1),
             probes=[Probe(TokenGroups.each(1, 60), TokenGroups.ids(kg), heads="mean", normalize="keys"),
                     Probe(TokenGroups.each(1, 70), TokenGroups.each(1, 90), heads="mean")],
             return_lse=True)
    calls["starts_at_1"] = c

    # Ranges that end at token 1: the upper bounds, one-row and one-column outputs.
    c = base_call(5, b=2, h=2, nq=70, nk=90, d=d_big, dtype=torch.float16)
    kg = torch.full((90,), -1, dtype=torch.int32)
    kg[0] = 0
    c.update(tags=("n", torch.randint(1, 4, (70,), generator=g), torch.randint(0, 4, (90,), generator=g) | 1),
             block_multiplier=BlockMultiplier(torch.rand(2, 2, 1, 1, generator=g) * 2),
             probes=[Probe(TokenGroups.each(0, 1), TokenGroups.ids(kg), heads="sum"),
                     Probe(TokenGroups.each(0, 1), TokenGroups.each(0, 1), heads="mean")],
             pair_stats=[(0, 1)], return_lse=True, count_tiles=True)
    calls["ends_at_1"] = c

    # One head at head dim 128 with every extra the Hopper kernel takes.
    c = base_call(6, b=1, h=1, nq=200, nk=300, d=d_big, dtype=torch.float16)
    kg = torch.randint(-1, 3, (300,), generator=g, dtype=torch.int32)
    c.update(tags=("bn", torch.randint(1, 4, (1, 200), generator=g), torch.randint(0, 4, (1, 300), generator=g) | 1),
             head_weights=torch.rand(1, 1, generator=g) + 0.5,
             block_multiplier=BlockMultiplier(torch.rand(1, 1, 50, 60, generator=g) * 2, query_start=20, key_start=7),
             probes=[Probe(TokenGroups.each(0, 200), TokenGroups.ids(kg), heads="keep")],
             pair_stats=[(0, 0)], return_lse=True)
    calls["one_head"] = c

    # Short sequences: one query tile and one key tile.
    c = base_call(7, b=2, h=3, nq=9, nk=13, d=d_big)
    c.update(tags=("bn", torch.randint(1, 4, (2, 9), generator=g), torch.randint(0, 4, (2, 13), generator=g) | 1),
             probes=[Probe(TokenGroups.each(0, 9), TokenGroups.each(0, 13), heads="keep")],
             return_lse=True, count_tiles=True)
    calls["one_tile"] = c

    if gpu:
        # The Hopper kernel's tail split with one head, one query-tile pair and a group probe
        # from query 1: the grid is one tile, split along its keys (from 4096 keys at D=64).
        for d, nk in ((128, 2000), (64, 4200)):
            c = base_call(8 + d, b=1, h=1, nq=100, nk=nk, d=d)
            kg = torch.full((nk,), -1, dtype=torch.int32)
            kg[3] = 0
            c.update(head_weights=torch.rand((1, 1, 100) if d == 128 else (1, 1), generator=g) + 0.5,
                     probes=[Probe(TokenGroups.each(1, 100), TokenGroups.ids(kg), heads="mean")], return_lse=True)
            calls[f"split_d{d}"] = c
            c = dict(c, seed=c["seed"] + 1, nq=1, head_weights=c["head_weights"][..., :1] if d == 128 else None,
                     probes=[Probe(TokenGroups.each(0, 1), TokenGroups.ids(kg))])
            calls[f"split_one_query_d{d}"] = c
    return calls


def runs(gpu: bool):
    """(name, call): each call on the routed kernel and, on a GPU, on the Triton kernel too."""
    out = []
    for name, call in unit_argument_calls(gpu).items():
        out.append((name, call))
        if gpu:
            out.append((name + "-triton", dict(call, kernel_options={"hopper": False})))
    return out


def integer_parameters(kernel) -> list:
    fn = getattr(kernel, "fn", kernel)
    return [name for name, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation)]


def integer_values(launches) -> dict:
    """{kernel name: {parameter: set of values}} over the recorded launches (twins count as
    their kernel)."""
    seen = collections.defaultdict(lambda: collections.defaultdict(set))
    for launcher, _, args, _ in launches:
        name = getattr(launcher.kernel, "fn", launcher.kernel).__name__
        for param, arg in zip(integer_parameters(launcher.kernel), args):
            if type(arg) is int:  # Triton specializes plain ints; tensors, floats and descriptors not
                seen[name][param].add(arg)
    return seen


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CPU_NAMES = [name for name, _ in runs(gpu=False)]
GPU_NAMES = [name for name, _ in runs(gpu=True)]


@pytest.mark.parametrize("name", CPU_NAMES)
def test_unit_argument_call_cpu(name):
    check_call(dict(runs(gpu=False))[name], torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("name", GPU_NAMES)
def test_unit_argument_call_cuda(name):
    check_call(dict(runs(gpu=True))[name], torch.device("cuda"))


@pytest.mark.parametrize("dev", DEVICES)
def test_every_integer_argument_is_one_in_some_call(dev):
    device = torch.device(dev)
    gpu = device.type == "cuda"
    with fast_launch.recording() as launches:
        for _, call in runs(gpu):
            run_call(call, device)
    seen = integer_values(launches)
    want = KERNELS | (HOPPER_KERNELS if gpu and hopper_fwd.on_hopper(device) else set())
    assert want <= set(seen), f"kernels not reached: {sorted(want - set(seen))}"
    missing = {name: {param: sorted(values)[:6] for param, values in seen[name].items()
                      if 1 not in values and (name, param) not in NEVER_ONE}
               for name in want}
    missing = {name: params for name, params in missing.items() if params}
    assert not missing, f"integer arguments no call sets to 1 (values seen): {missing}"
    # An exemption that a call does reach is stale.
    reached = [key for key in NEVER_ONE if key[0] in seen and 1 in seen[key[0]].get(key[1], ())]
    assert not reached, f"NEVER_ONE entries that a call does set to 1: {reached}"
