"""Scratch helper (GPU): a call of one Hopper-kernel module's ``hopper_attention`` on [B, H, N, D]
inputs, for A/Bs of a scratch copy of the kernel against the real one (same inputs, no routing)."""
import torch

from iidkern.kernels.kernel_args import MultiplierArgs


def hopper_call(module, q, k, v, multiplier=None):
    """``run(i=0)``: a fresh output of ``module.hopper_attention(q, k, v)`` with an optional
    ``iidkern.BlockMultiplier`` (``i``, the input set of bench.timing, is ignored: one set)."""
    args = MultiplierArgs.of(multiplier) if multiplier is not None else None
    scale = q.shape[-1] ** -0.5

    def run(i=0):
        out = torch.empty_like(q)
        module.hopper_attention(q, k, v, out, layout="bhnd", scale=scale, multiplier=args)
        return out
    return run
