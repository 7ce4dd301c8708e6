"""Argument packs that both attention kernels (flash_fwd.py, hopper_fwd.py) take in the same
parameter order: the fused key-group probe and the block multiplier.

Each pack is a NamedTuple that a launch unpacks into the kernel's parameters; ``absent``
gives the placeholder a kernel receives when the extra is off (its pointers are never read).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

try:  # a rule the Gluon kernel also evaluates while compiling (called on the host it is a plain function)
    from triton.experimental.gluon import constexpr_function as _compile_time_rule
except ImportError:  # a Triton without Gluon: only the host calls it
    def _compile_time_rule(fn):
        return fn


class KeyGroupArgs(NamedTuple):
    """A fused key-group probe: per probed query row, the probability mass on each key group."""

    ids: torch.Tensor  # int32 group id per key ([N] or [B, N], unit token stride), -1 = none
    ids_batch_stride: int
    q0: int  # probed query rows [q0, q1)
    q1: int
    k0: int  # ids are read in [k0, k1)
    k1: int
    n_groups: int
    sums: torch.Tensor  # [B, H, q1 - q0, n_groups] fp32, written by the main pass
    # fp32 factor per group column, [B or 1, >= n_groups] (1 / group size for normalize="keys",
    # else ones): the epilogue applies it, so no kernel divides the sums afterwards
    column_scale: torch.Tensor
    column_scale_batch_stride: int

    @classmethod
    def absent(cls, ids_placeholder: torch.Tensor, sums_placeholder: torch.Tensor) -> "KeyGroupArgs":
        return cls(ids_placeholder, 0, 0, 0, 0, 0, 1, sums_placeholder, sums_placeholder, 0)


class MultiplierArgs(NamedTuple):
    """A block multiplier: the values with (batch, head, query, key) strides and its sub-block."""

    values: torch.Tensor  # [B, Mq, Mk] or [B, H, Mq, Mk], any float dtype and strides
    stride_b: int
    stride_h: int  # 0 when the heads share one block
    stride_q: int
    stride_k: int
    q0: int  # the sub-block [q0, q1) x [k0, k1)
    q1: int
    k0: int
    k1: int

    @classmethod
    def of(cls, m) -> "MultiplierArgs":
        """From an ``iidkern.BlockMultiplier``: no copy, any strides; a zero head stride when
        the heads share the values."""
        mv = m.values
        sb, sh, sq, sk = (mv.stride(0), 0, mv.stride(1), mv.stride(2)) if mv.dim() == 3 else mv.stride()
        q0, k0 = m.query_start, m.key_start
        return cls(mv, sb, sh, sq, sk, q0, q0 + mv.shape[-2], k0, k0 + mv.shape[-1])

    @classmethod
    def absent(cls, placeholder: torch.Tensor) -> "MultiplierArgs":
        return cls(placeholder, 0, 0, 0, 0, 0, 0, 0, 0)  # an empty sub-block


@_compile_time_rule
def scales_p_for_key_groups(has_multiplier: bool, fp16: bool) -> bool:
    """Whether a call with a fused key-group probe keeps its running max 14 below the true
    one, so that p carries 2^14 and the fp16 key-group product sees small p as normal numbers
    (hopper_fwd._softmax_tile, flash_fwd._attn_tile; bench/NOTES.md 53). Not where a block
    multiplier M meets fp16 inputs: 2^14 * M could pass fp16's largest value (65504) in the
    P @ V operand. There the Hopper kernel scales p by 2^14 for the group product alone, and
    the Triton kernel takes the fp32 product (``launch._kg_half_dot_mode``)."""
    return not (has_multiplier and fp16)

