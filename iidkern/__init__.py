"""iidkern: a kernel-accelerated attention engine for training-free image editing with MM-DiTs.

The public surface is one call, :func:`attention`, plus the declarative specs it takes
(:class:`Probe`, :class:`ValueProbe`, :class:`TokenGroups`, :class:`BlockMultiplier`,
token tags) and :func:`router_weights` for HeadRouter's per-head routing.
"""
from .attention import attention, tag_mask
from .routing import router_weights
from .specs import (ALL_BITS, AttentionResult, BlockMultiplier, PairStats, Probe, TokenGroups, ValueProbe,
                    allowed_pairs, instruction_tags, tags_from_segments)

__version__ = "0.1.0"

__all__ = [
    "attention", "tag_mask", "router_weights", "AttentionResult", "BlockMultiplier", "PairStats", "Probe",
    "TokenGroups", "ValueProbe", "ALL_BITS", "allowed_pairs", "instruction_tags", "tags_from_segments",
]
