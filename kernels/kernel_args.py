"""Argument packs that both attention kernels (flash_fwd.py, hopper_fwd.py) take in the same
parameter order: the fused key-group probe and the block multiplier.

Each pack is a NamedTuple that a launch unpacks into the kernel's parameters; ``absent``
gives the placeholder a kernel receives when the extra is off (its pointers are never read).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


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

    @classmethod
    def absent(cls, ids_placeholder: torch.Tensor, sums_placeholder: torch.Tensor) -> "KeyGroupArgs":
        return cls(ids_placeholder, 0, 0, 0, 0, 0, 1, sums_placeholder)


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
