"""Step time of the Flux runner at real dimensions: PyTorch SDPA vs iidkern, with and without a probe.

``python -m iidkern.mmdit.benchmark`` builds FLUX.1-dev dimensions (24 heads x 128, 3072
wide) with a few blocks and random bf16 weights on CUDA, and times one forward pass (one
denoising step of a guidance-distilled model) for each backend. ``--probe`` adds a policy
that captures image x text attention maps at a single site, to show that a capture at one
(step, block) leaves the other calls at full speed. Prints one line per case; the lead's
``bench/`` scripts record the numbers.
"""
from __future__ import annotations

import argparse
import json

import torch

from ..policy import CapturePolicy
from ..specs import Probe, TokenGroups
from .flux import FluxConfig, FluxTransformer, image_ids


def time_forward(model, inputs, *, backend: str, policy=None, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of one forward pass (CUDA events)."""
    x, text, pooled, ids = inputs
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x, text, pooled, 0.5, img_ids=ids, guidance=3.5, policy=policy, step=0, num_steps=28,
                  backend=backend)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def penultimate_probe_policy() -> CapturePolicy:
    """IID's map: per head, each image token's mass on the text tokens, at the penultimate layer only."""
    return CapturePolicy(lambda s: s.layer == s.num_layers - 2,
                         lambda s: [Probe(TokenGroups.each(*s.image), TokenGroups.single(*s.text, s.seq_len),
                                          heads="keep")])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent /8, tokens /16)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "auto"])
    parser.add_argument("--probe", action="store_true", help="also time iidkern with a one-site probe policy")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")

    model = FluxTransformer.random(FluxConfig.dev(num_double=args.double, num_single=args.single), device="cuda",
                                   dtype=torch.bfloat16)
    side = args.resolution // 16
    g = torch.Generator("cpu").manual_seed(0)
    inputs = (torch.randn(args.batch, side * side, 64, generator=g).cuda(),
              torch.randn(args.batch, args.text_tokens, 4096, generator=g).cuda(),
              torch.randn(args.batch, 768, generator=g).cuda(), image_ids(side, side, device="cuda"))
    cases = [(b, None) for b in args.backends]
    if args.probe:
        cases.append(("auto", "probe"))
    with torch.no_grad():
        outputs = {b: model(*inputs[:3], 0.5, img_ids=inputs[3], guidance=3.5, backend=b).float()
                   for b in args.backends}
    for backend, extra in cases:
        policy = penultimate_probe_policy() if extra == "probe" else None
        ms = time_forward(model, inputs, backend=backend, policy=policy, iters=args.iters)
        row = dict(backend=backend, policy=extra, ms=round(ms, 3), image_tokens=side * side,
                   text_tokens=args.text_tokens, double=args.double, single=args.single, batch=args.batch,
                   device=torch.cuda.get_device_name())
        if backend in outputs and "sdpa" in outputs and backend != "sdpa":
            ref = outputs["sdpa"]
            row["rel_err_vs_sdpa"] = float((outputs[backend] - ref).norm() / ref.norm())
        print(json.dumps(row))


if __name__ == "__main__":
    main()
