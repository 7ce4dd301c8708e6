"""The ``iidkern`` command: ``edit``, ``demo`` and ``bench``.

* ``iidkern edit --image in.png --instruction "..." --instruction "..." --method iid|step|combined``
* ``iidkern edit --image in.png --source "..." --target "..." --method headrouter``
* ``iidkern demo`` — the whole thing on an embedded tiny random model (no downloads).
* ``iidkern bench`` — a quick 3-shape attention timing table on the current GPU (iidkern plain, with
  IID's probe and with IID's tags, against PyTorch SDPA); the full benchmark suite behind
  ``bench/RESULTS.md`` is ``bench/gpu_run.sh`` (pytest-benchmark, in the repository).

``edit`` writes, into ``--out``: ``edited.png``, ``source.png``, one ``mask_<i>_<label>.png`` per
mask, ``overlay.png`` (masks tinted over the source) and ``timings.json``; HeadRouter adds
``reconstruction.png``. ``demo`` writes the same set into ``--out/<method>/`` for each method,
with ``demo_input.png`` and ``summary.json`` at the top. Bad arguments exit with code 2 and a
message saying what is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import List, Optional

TINY_NOTICE = ("NOTE: this runs an embedded tiny model with RANDOM weights and hash-seeded word vectors in place of "
               "a text encoder: the pictures it makes are meaningless. It shows that the whole pipeline runs (masks, "
               "masked attention, routing, inversion) and what it writes; pass --model DIR for real weights.")
METHODS = ("iid", "step", "combined", "headrouter")


# --------------------------------------------------------------------------- arguments
def _add_run_options(p: argparse.ArgumentParser, default_steps: int, default_size: int, size_help: str):
    p.add_argument("--out", default="iidkern_out", help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=default_steps, help="denoising steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, shared by every method (default: %(default)s)")
    p.add_argument("--size", type=int, default=default_size, help=size_help)
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="iidkern attention backend (default: triton on CUDA, the reference on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# The IID options' defaults, filled in after parsing: parsed as None, an option that was given
# is told apart from one that was not (they belong to --method iid only).
IID_DEFAULTS = dict(map_layer=-2, sigma=1.0, threshold="otsu", threshold_value=0.5, background="none")


def _add_iid_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("IID (--method iid only)")
    g.add_argument("--map-step", type=int, default=None, help="step S of the maps (default: 27/50 of the steps)")
    g.add_argument("--map-layer", type=int, default=None, help="attention layer of the maps (default: -2, penultimate)")
    g.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing of the maps, in tokens (0: off; "
                   "default: 1)")
    g.add_argument("--threshold", default=None, choices=("otsu", "fixed", "top"),
                   help="mask threshold rule (default: otsu)")
    g.add_argument("--threshold-value", type=float, default=None,
                   help="value of the 'fixed' / 'top' rules (default: 0.5)")
    g.add_argument("--background", default=None, choices=("none", "all"),
                   help="what image tokens outside every mask see after S (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iidkern", description="Kernel-accelerated training-free image editing "
                                     "with MM-DiTs (IID, HeadRouter).")
    sub = parser.add_subparsers(dest="command", metavar="{edit,demo,bench}")
    sub.required = True

    edit = sub.add_parser("edit", help="edit a picture", description="Edit a picture with IID (several instructions "
                          "at once), its baselines, or HeadRouter (source -> target prompt).")
    edit.add_argument("--image", required=True, help="input picture (PNG, JPEG, ...)")
    edit.add_argument("--instruction", action="append", default=[],
                      help="an editing instruction (repeat for several); methods iid, step, combined")
    edit.add_argument("--source", default=None, help="prompt describing the input picture (headrouter)")
    edit.add_argument("--target", default=None, help="prompt describing the wanted picture (headrouter)")
    edit.add_argument("--method", default="iid", choices=METHODS, help="editing method (default: %(default)s)")
    edit.add_argument("--model", default="tiny",
                      help="local Flux pipeline directory (transformer/, text encoders, vae/; loading these needs "
                           "pip install 'iidkern[diffusers]'), or 'tiny' for the embedded random model (default)")
    edit.add_argument("--allow-stand-ins", action="store_true",
                      help="with --model DIR lacking text encoders / VAE: use the tiny model's hash word vectors and "
                           "pixel codec (for saved test models; a real model gives garbage with them)")
    edit.add_argument("--layout", default=None, choices=("concat", "kontext"),
                      help="how the source enters an instruction-editing model (default: concat for a channel-concat "
                           "model, else kontext)")
    _add_run_options(edit, default_steps=28, default_size=512,
                     size_help="resize the longer side to this many pixels (>= 32), both sides then rounded down to "
                               "a multiple of 16 (0: keep the size, still rounded down; default: %(default)s)")
    _add_iid_options(edit)

    demo = sub.add_parser("demo", help="run every method on an embedded tiny random model (no downloads)")
    _add_run_options(demo, default_steps=12, default_size=128,
                     size_help="side of the generated demo picture, >= 32 (0: the default, %(default)s)")
    demo.set_defaults(out="iidkern_demo")

    bench = sub.add_parser("bench", help="quick attention timing table on the current GPU (the full suite: "
                           "bench/gpu_run.sh)")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions")
    return parser


def _check_edit_args(parser, args):
    if not os.path.isfile(args.image):
        parser.error(f"--image: file not found: {args.image!r}")
    if args.method == "headrouter":
        if args.instruction:
            parser.error("--method headrouter takes --source and --target, not --instruction")
        if args.layout is not None:  # it always runs a text-to-image model
            parser.error("--layout belongs to --method iid, step and combined; --method headrouter inverts a "
                         "text-to-image model")
        if not (args.source and args.source.strip()) or not (args.target and args.target.strip()):
            parser.error("--method headrouter needs --source \"<prompt of the input>\" and --target \"<wanted prompt>\"")
    else:
        if args.source or args.target:
            parser.error(f"--source/--target belong to --method headrouter; --method {args.method} takes --instruction")
        if not args.instruction:
            parser.error(f"--method {args.method} needs at least one --instruction \"...\"")
        if any(not s.strip() for s in args.instruction):
            parser.error("--instruction: an instruction is empty")
        if args.method == "iid" and len(args.instruction) > MAX_IID_INSTRUCTIONS:
            parser.error(f"--method iid masks at most {MAX_IID_INSTRUCTIONS} instructions (one tag bit each), "
                         f"got {len(args.instruction)} --instruction")
    _check_run_args(parser, args)
    _check_iid_args(parser, args)
    if args.model != "tiny" and not os.path.isdir(args.model):
        parser.error(f"--model: directory not found: {args.model!r} (a local Flux pipeline folder, or 'tiny')")


MAX_STEPS = 10_000  # iidkern.edit.pipeline.MAX_STEPS (not imported: --help stays free of torch)
MAX_IID_INSTRUCTIONS = 62  # iidkern.edit.iid.MAX_MASKED_INSTRUCTIONS: one int64 tag bit each
MAX_SIZE = 16_384  # pixels a side: past any MM-DiT's resolution, and a typo would otherwise exhaust memory


def _check_run_args(parser, args):
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must be in [1, {MAX_STEPS}], got {args.steps}")
    if not (args.size == 0 or 32 <= args.size <= MAX_SIZE):
        parser.error(f"--size must be 0 (keep) or in [32, {MAX_SIZE}], got {args.size}")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cuda", "cpu") or (device.type == "cpu" and device.index):
            parser.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if getattr(args, "map_step", None) is not None and not 0 <= args.map_step < args.steps:
        parser.error(f"--map-step must be in [0, --steps={args.steps}), got {args.map_step}")
    if not -2**63 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        parser.error(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    _check_out_dir(parser, args.out)


def _make_out_dir(parser, out: str):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out!r}: cannot create the directory ({e.strerror or e})")


def _check_out_dir(parser, out: str):
    """``--out`` can be made and written: a file there or an unwritable place is named before
    any sampling, not after it (``_make_out_dir`` creates it once every option is checked)."""
    if not out:
        parser.error("--out must name a directory, got ''")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"--out {out!r}: {existing!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out {out!r}: cannot write in {existing!r}")


def _check_iid_args(parser, args):
    """The IID options: given only with --method iid (the other methods would ignore them), then
    their defaults filled in, and the ranges that need no model checked (--map-layer:
    :func:`_check_map_layer`)."""
    from .edit.masks import sigma_problem, threshold_value_problem

    given = [name for name in ("map_step", *IID_DEFAULTS) if getattr(args, name) is not None]
    if given and args.method != "iid":
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"{options}: IID options belong to --method iid, not --method {args.method}")
    for name, default in IID_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    problem = sigma_problem(args.sigma)
    if problem is not None:
        parser.error(f"--sigma {problem}")
    problem = threshold_value_problem(args.threshold, args.threshold_value)
    if problem is not None:
        parser.error(f"--threshold-value: {problem} (--threshold {args.threshold})")


def _check_map_layer(parser, args, model):
    """--map-layer against the loaded model, before any sampling (else: "no maps captured" after S)."""
    n = model.transformer.num_attention_layers
    if not -n <= args.map_layer < n:
        parser.error(f"--map-layer must be in [{-n}, {n - 1}] for this model ({n} attention layers: negative counts "
                     f"from the end), got {args.map_layer}")


# --------------------------------------------------------------------------- outputs
def _slug(text: str, limit: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "mask"


def write_outputs(result, out_dir: str, info: dict) -> List[str]:
    """Edited picture, source, masks, overlay and timings.json; returns the written paths."""
    from .edit.codec import save_png, to_uint8
    from .edit.masks import mask_to_image, overlay_masks

    os.makedirs(out_dir, exist_ok=True)
    written = [save_png(to_uint8(result.image), os.path.join(out_dir, "edited.png")),
               save_png(to_uint8(result.source), os.path.join(out_dir, "source.png"))]
    for name, picture in result.extra.items():
        if picture.dim() == 4 and picture.shape[1] == 3:
            written.append(save_png(to_uint8(picture), os.path.join(out_dir, f"{name}.png")))
    source = to_uint8(result.source)
    size = (source.shape[1], source.shape[0])
    areas = []
    if result.masks is not None:
        for i, mask in enumerate(result.masks):
            label = result.mask_labels[i] if i < len(result.mask_labels) else str(i)
            written.append(save_png(mask_to_image(mask, result.grid, size),
                                    os.path.join(out_dir, f"mask_{i}_{_slug(label)}.png")))
            areas.append(float(mask.float().mean()))
        overlay = overlay_masks(source, result.masks, result.grid)
    else:
        overlay = source
    written.append(save_png(overlay, os.path.join(out_dir, "overlay.png")))
    report = dict(info, method=result.method, grid=list(result.grid), mask_labels=list(result.mask_labels),
                  mask_area_fraction=areas, timings_s={k: round(v, 6) for k, v in result.timings.items()})
    path = os.path.join(out_dir, "timings.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    written.append(path)
    return written


# --------------------------------------------------------------------------- commands
def _device(args):
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _tiny_threads(device):
    """The tiny model's matrices are 32 wide: on the CPU intra-op threads bring no speed, only
    contention (10-100x slower on a busy machine), so it runs on one thread."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(1)


def _iid_config(args):
    from .edit.iid import IIDConfig

    return IIDConfig(map_step=args.map_step, map_layer=args.map_layer, sigma=args.sigma, threshold=args.threshold,
                     threshold_value=args.threshold_value, background=args.background)


def _run_one(model, image, args, method, instructions=(), source=None, target=None, iid_config=None):
    from .edit.pipeline import headrouter_edit, iid_edit

    if method == "headrouter":
        return headrouter_edit(model, image, source, target, num_steps=args.steps, seed=args.seed,
                               progress=not args.no_progress)
    return iid_edit(model, image, list(instructions), method=method, num_steps=args.steps, seed=args.seed,
                    config=iid_config, progress=not args.no_progress)


def cmd_edit(parser, args) -> int:
    import time

    from .edit.codec import load_image
    from .edit.models import EditModel

    _check_edit_args(parser, args)
    device = _device(args)
    t0 = time.perf_counter()
    layout = "t2i" if args.method == "headrouter" else args.layout
    if args.model == "tiny":
        print(TINY_NOTICE, file=sys.stderr)
        _tiny_threads(device)
        model = EditModel.tiny(layout or "concat", device=device, backend=args.backend)
    else:
        try:
            model = EditModel.from_dir(args.model, layout, device=device, backend=args.backend,
                                       stand_ins=args.allow_stand_ins)
        except (FileNotFoundError, ValueError) as e:  # missing parts, strict-loader errors: say what and exit 2
            parser.error(f"--model {args.model!r}: {e}")
    load_s = time.perf_counter() - t0
    _check_map_layer(parser, args, model)
    _make_out_dir(parser, args.out)  # every option checked: before any sampling
    try:
        image = load_image(args.image, args.size)
    except Exception as e:  # PIL cannot read it
        parser.error(f"--image {args.image!r}: cannot read the picture ({e})")
    result = _run_one(model, image, args, args.method, args.instruction, args.source, args.target,
                      _iid_config(args))
    info = dict(model=model.name, tiny_random_model=model.is_tiny_random, device=str(device), backend=args.backend,
                steps=args.steps, seed=args.seed, image=os.path.abspath(args.image), load_s=round(load_s, 6),
                instructions=list(args.instruction), source=args.source, target=args.target)
    for path in write_outputs(result, args.out, info):
        print(path)
    return 0


DEMO_INSTRUCTIONS = ("make the sky a sunset", "turn the house into a red barn")
DEMO_SOURCE, DEMO_TARGET = "a white house on a green hill", "a stone castle on a green hill"


def cmd_demo(parser, args) -> int:
    import time

    from .edit.codec import demo_picture, save_png, to_uint8
    from .edit.iid import IIDConfig
    from .edit.models import EditModel

    _check_run_args(parser, args)
    device = _device(args)
    print(TINY_NOTICE)
    _tiny_threads(device)
    size = args.size or 128
    size = max(32, size // 16 * 16)
    image = demo_picture(size)
    _make_out_dir(parser, args.out)
    save_png(to_uint8(image), os.path.join(args.out, "demo_input.png"))
    summary = {}
    runs = [("iid", "concat"), ("step", "concat"), ("combined", "concat"), ("headrouter", "t2i")]
    models = {}
    for method, layout in runs:
        if layout not in models:
            models[layout] = EditModel.tiny(layout, device=device, backend=args.backend)
        t0 = time.perf_counter()
        result = _run_one(models[layout], image, args, method, DEMO_INSTRUCTIONS, DEMO_SOURCE, DEMO_TARGET,
                          IIDConfig())
        info = dict(model=models[layout].name, tiny_random_model=True, device=str(device), backend=args.backend,
                    steps=args.steps, seed=args.seed, notice=TINY_NOTICE,
                    instructions=list(DEMO_INSTRUCTIONS) if method != "headrouter" else [],
                    source=DEMO_SOURCE if method == "headrouter" else None,
                    target=DEMO_TARGET if method == "headrouter" else None)
        out = os.path.join(args.out, method)
        write_outputs(result, out, info)
        summary[method] = dict(out=out, seconds=round(time.perf_counter() - t0, 4), timings_s=result.timings)
        print(f"{method:>10}: {out}  ({summary[method]['seconds']:.2f} s)")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(dict(notice=TINY_NOTICE, device=str(device), steps=args.steps, seed=args.seed, runs=summary), f,
                  indent=2)
    print(f"wrote {args.out}/ (edited.png, masks, overlay.png, timings.json per method). {TINY_NOTICE.split(':')[0]}: "
          "the pictures are meaningless.")
    return 0


def cmd_bench(parser, args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("iidkern bench: no CUDA GPU on this machine; the attention table times the Triton kernels on a GPU "
              "(the CPU runs them only under Triton's slow interpreter). Run it on a machine with an NVIDIA GPU.",
              file=sys.stderr)
        return 1
    _builtin_bench(quick=args.quick)
    return 0


BENCH_SHAPES = (  # name, heads, text tokens, image tokens, head dim
    ("Flux 1024^2", 24, 512, 4096, 128),
    ("Kontext 1024^2 (+source)", 24, 512, 8192, 128),
    ("SD3 1024^2", 24, 333, 4096, 64),
)


def _builtin_bench(quick: bool = False):
    """A small table: iidkern (plain, + IID probe, + IID tags) vs PyTorch SDPA, bf16, batch 1, milliseconds."""
    import torch
    import torch.nn.functional as F
    import triton

    import iidkern
    from .specs import Probe, TokenGroups, instruction_tags

    rep = 30 if quick else 100
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")  # noqa: E731
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'shape':<28}{'SDPA':>9}{'iidkern':>9}{'+probe':>9}{'+IID tags':>11}{'TFLOP/s':>9}")
    for name, h, nt, ni, d in BENCH_SHAPES:
        n = nt + ni
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        thirds = [(0, nt // 3), (nt // 3, 2 * nt // 3), (2 * nt // 3, nt)]
        probe = Probe(TokenGroups.each(nt, n), TokenGroups.segments(thirds, n), heads="keep", normalize="keys")
        g = torch.Generator().manual_seed(0)
        masks = torch.rand(3, ni, generator=g) < 0.3
        tags = iidkern.tag_mask(*(t.cuda() for t in instruction_tags(n, image=(nt, n), instructions=thirds,
                                                                     region_masks=masks)))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        t_ours = bench(lambda: iidkern.attention(q, k, v, layout="bnhd"))
        t_probe = bench(lambda: iidkern.attention(q, k, v, layout="bnhd", probes=[probe]))
        t_tags = bench(lambda: iidkern.attention(q, k, v, layout="bnhd", tags=tags))
        tflops = 4 * h * n * n * d / (t_ours * 1e-3) / 1e12
        print(f"{name:<28}{t_sdpa:>9.3f}{t_ours:>9.3f}{t_probe:>9.3f}{t_tags:>11.3f}{tflops:>9.1f}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    handler = {"edit": cmd_edit, "demo": cmd_demo, "bench": cmd_bench}[args.command]
    return handler(sub, args)


if __name__ == "__main__":
    sys.exit(main())
