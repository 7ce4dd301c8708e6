"""Compile, for real GPU targets and without a GPU, every Triton kernel specialization that a
matrix of calls launches; print one JSON line of what compiled and what did not.

The interpreter runs a kernel as Python: it never builds Triton IR, so a frontend error (a
shape mismatch in a branch the interpreter did not take, a constexpr misuse) and a ptxas
failure only show on a GPU (NOTES.md 76: a probe-pass change that passed every interpreter
test did not compile there). Here the package runs with ``TRITON_INTERPRET=0`` on CPU
tensors, its launches are recorded instead of run (so the launch code chooses the tiles,
warps and constexprs it chooses on a GPU, not the interpreter's), and each distinct
specialization is compiled for sm_90 (H100) and sm_80 (A100: the Triton kernels are the
fallback off Hopper); the Hopper path's join pass, a Triton kernel that only runs beside the
Gluon kernel, is launched here as that path builds it. The Gluon kernel itself has
tests/hopper_compile.py. Run by tests/test_triton_compile.py in a child process.
"""
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before iidkern: launch.py reads it at import

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import iidkern  # noqa: E402
import iidkern.kernels as kernels  # noqa: E402
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe  # noqa: E402
from iidkern.kernels import fast_launch, hopper_fwd, tail_split  # noqa: E402

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
ALL = None  # every case of calls()
# (dtypes, head dims, cases, targets): ~60 compiles, ~2.5 min on one core. Every case at bf16,
# head dims 128 and 40 (a head dim that is not a power of two has its own branches), for the
# H100; head dim 64's own configs (register caps, the inline ragged tile); the other dtypes
# where their precision changes the code (fp32's "ieee" products, fp16's key-group split
# modes); sm_80 once. IIDKERN_COMPILE_ALL=1: every case at every dtype, head dim and target.
MATRIX = [
    ((torch.bfloat16,), (128, 40), ALL, ("sm_90",)),
    ((torch.bfloat16,), (64,), ("plain", "probes", "tags_no_lists", "mult", "everything"), ("sm_90",)),
    ((torch.float16,), (128,), ("probes", "mult", "everything", "split_options"), ("sm_90",)),
    ((torch.float32,), (128,), ("plain", "probes", "everything"), ("sm_90",)),
    ((torch.bfloat16,), (128,), ("everything",), ("sm_80",)),
]
if os.environ.get("IIDKERN_COMPILE_ALL"):
    MATRIX = [((torch.bfloat16, torch.float16, torch.float32), (40, 64, 128), ALL, tuple(TARGETS))]
OPTION_NAMES = ("num_warps", "num_stages", "maxnreg", "num_ctas")
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
              torch.bool: "i1"}


def calls():
    """(label, q, k, v, keyword arguments of iidkern.attention, targets): each extra alone and
    together, at the dtypes and head dims of MATRIX (40 is not a power of two: channel-masked
    loads)."""
    g = torch.Generator().manual_seed(0)
    n_txt, n = 40, 300
    for dtypes, head_dims, chosen, targets in MATRIX:
        for dtype, d in ((dtype, d) for dtype in dtypes for d in head_dims):
            q, k, v = (torch.randn(2, 3, n, d, generator=g).to(dtype) for _ in range(3))
            segments = torch.full((n,), -1, dtype=torch.int32)
            segments[0:15], segments[15:30], segments[30:n_txt] = 0, 1, 2
            regions = torch.randint(-1, 4, (2, n), generator=g, dtype=torch.int32)
            many = torch.randint(-1, 40, (n,), generator=g, dtype=torch.int32)
            q_tags = torch.randint(1, 8, (2, n), generator=g)
            block = torch.where(torch.arange(n) < 128, 1, 2).expand(2, n)  # cuts on a tile boundary: no lists
            mult = BlockMultiplier(torch.rand(2, n - n_txt, n_txt, generator=g) + 0.5, query_start=n_txt)
            probes = {
                "map": Probe(TG.each(0, n_txt), TG.each(n_txt, n), heads="mean"),
                "iid": Probe(TG.each(n_txt, n), TG.ids(segments), heads="keep", normalize="keys"),
                "grouped": Probe(TG.ids(regions), TG.ids(segments), heads=torch.rand(2, 3, generator=g),
                                 normalize="both"),
                "many_groups": Probe(TG.each(n_txt, n), TG.ids(many), heads="sum"),
                "value": ValueProbe(torch.randn(n, 5, generator=g), TG.ids(regions), heads="mean"),
            }
            cases = {
                "plain": {},
                "lse_hw": dict(return_lse=True, head_weights=torch.rand(3, generator=g) + 0.5),
                "tags": dict(tags=iidkern.tag_mask(q_tags, q_tags)),
                "tags_no_lists": dict(tags=iidkern.tag_mask(block, block)),
                "probes": dict(probes=list(probes.values())),
                "probe_pass_only": dict(probes=[probes["iid"], probes["grouped"]],
                                        kernel_options={"fuse_key_groups": False}),
                "mult": dict(block_multiplier=mult),
                "mult_per_head_bf16": dict(block_multiplier=BlockMultiplier(
                    torch.rand(2, 3, n - n_txt, n_txt, generator=g).bfloat16(), query_start=n_txt)),
                "pairs": dict(pair_stats=[(0, 1)]),
                "everything": dict(probes=[probes["iid"], probes["value"], probes["map"]], block_multiplier=mult,
                                   tags=iidkern.tag_mask(q_tags, q_tags), head_weights=torch.rand(2, 3, generator=g),
                                   pair_stats=[(1, 0)], return_lse=True, count_tiles=True),
                "split_options": dict(probes=[probes["iid"]], block_multiplier=mult,
                                      kernel_options={"kg_split": True, "mult_split": True}),
                "no_half_dot": dict(probes=[probes["iid"]], kernel_options={"kg_half_dot": False}),
            }
            for name, kwargs in cases.items():
                if chosen is ALL or name in chosen:
                    yield f"{name}-{str(dtype)[6:]}-d{d}", q, k, v, kwargs, targets


def record_launches():
    """Every distinct launch the calls make, recorded (not run): (kernel, args, kwargs, the
    labels of the calls that made it, the targets to compile it for)."""
    kernels.INTERPRETING = True  # lets CPU tensors through attention()'s device check; launch.py stays compiled-mode
    recorded = []
    fast_launch.Launcher.launch = lambda self, grid, args, kwargs: recorded.append((self.kernel, args, kwargs))
    specs = {}
    for label, q, k, v, kwargs, targets in calls():
        del recorded[:]
        iidkern.attention(q, k, v, backend="triton", **kwargs)
        if not recorded:
            raise AssertionError(f"{label}: no kernel launched")
        for kernel, args, kw in recorded:
            spec = specs.setdefault(spec_key(kernel, args, kw), (kernel, args, kw, [], set()))
            spec[3].append(label)
            spec[4].update(targets)
    for label, kernel, args, kw in join_launches():
        spec = specs.setdefault(spec_key(kernel, args, kw), (kernel, args, kw, [], {"sm_90"}))
        spec[3].append(label)
    return list(specs.values())


def join_launches():
    """(label, kernel, args, kwargs) of the Hopper path's join pass as hopper_fwd launches it
    (CPU tensors of the dtypes it passes), for a few and many pieces, at both head dims, with
    and without head weights, LSE and key-group sums."""
    tile_rows, g_pad, n_q, heads = 2 * hopper_fwd.BLOCK_M, 16, 300, 3
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for pieces in (3, 12):
                for extras in (False, True):
                    pieces_p2, rows, warps = tail_split.combine_shape(pieces, tile_rows, head_dim)
                    part = pieces * tile_rows
                    out = torch.empty(1, heads, n_q, head_dim, dtype=dtype)
                    lse, hw, kgo = torch.empty(1, heads, n_q), torch.empty(1, heads, n_q), torch.empty(1, heads, n_q, 4)
                    args = (torch.empty(part, head_dim), torch.empty(part), out, lse if extras else out,
                            hw if extras else out, *out.stride()[:3], 0, n_q, 1, torch.empty(part, g_pad),
                            kgo if extras else out, 0, n_q, 4, 4, 3, pieces, heads, n_q)
                    kwargs = dict(TILE_ROWS=tile_rows, BLOCK_R=rows, HEAD_DIM=head_dim, G_PAD=g_pad,
                                  PIECES_P2=pieces_p2, HAS_HW=extras, STORE_LSE=extras, HAS_KG=extras,
                                  num_warps=warps)
                    label = f"join-{str(dtype)[6:]}-d{head_dim}-p{pieces}" + ("-extras" if extras else "")
                    yield label, tail_split.combine_kernel, args, kwargs


def arg_type(a) -> str:
    if isinstance(a, torch.Tensor):
        return "*" + TYPE_NAMES[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"no Triton type for a run-time argument {a!r}")


def aligned(a) -> bool:
    """Triton's divisibility specialization: pointers and integers that are multiples of 16."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr() % 16 == 0
    return isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0


def spec_key(kernel, args, kwargs):
    return (kernel.fn.__name__, tuple(arg_type(a) + ("/16" if aligned(a) else "") for a in args),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def compile_spec(kernel, args, kwargs, target):
    params = kernel.params
    runtime = [p for p in params if not p.is_constexpr]
    constexpr_values = {p.name: kwargs.get(p.name, p.default) for p in params if p.is_constexpr}
    signature = {p.name: arg_type(a) for p, a in zip(runtime, args)}
    signature.update({name: "constexpr" for name in constexpr_values})
    index = {p.name: i for i, p in enumerate(params)}
    constexprs = {(index[name],): value for name, value in constexpr_values.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args) if aligned(a)}
    options = {name: kwargs[name] for name in OPTION_NAMES if name in kwargs}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options)


def main():
    results = []
    for kernel, args, kwargs, labels, targets in record_launches():
        constexprs = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
        for target_name in sorted(targets):
            target = TARGETS[target_name]
            entry = {"kernel": kernel.fn.__name__, "target": target_name, "calls": labels[:3],
                     "n_calls": len(labels), "constexprs": {k: repr(v) for k, v in constexprs.items()}}
            start = time.perf_counter()
            try:
                compiled = compile_spec(kernel, args, kwargs, target)
                entry.update(ok=True, shared=compiled.metadata.shared, seconds=round(time.perf_counter() - start, 2))
            except Exception as e:  # noqa: BLE001 (reported, with the call that launched it)
                cause = f"\ncaused by {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else ""
                entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1200:]}{cause}")
            results.append(entry)
    print(json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
