"""Tile classification of token tags: which (query tile, key tile) pairs to skip, run
unmasked ("full") or run with the elementwise tag mask ("partial").

Like FlexAttention's BlockMask, the kernel never looks at a skipped tile: it walks two
short lists of key-tile indices per query tile. The lists depend on the tile shape, so a
:class:`TagMask` computes them lazily per ``(BLOCK_M, BLOCK_N)`` and caches them; build
one with :func:`iidkern.tag_mask` and reuse it across calls (IID reuses one mask for every
block and step after S).

Rules (exact, per tile pair):
* skip    iff ``OR(q tags) & OR(k tags) == 0``  (no pair of the tile may attend);
* full    iff ``AND(q tags) & AND(k tags) != 0`` (one bit shared by every query and key;
          a sufficient condition, so a few all-allowed tiles may run as partial, which
          is slower but still exact). A key tile that runs past ``Nk`` is never full;
* partial otherwise.

The Triton kernel's lists take one exception: a ragged last key tile whose real keys every
query of the tile may see ("full but ragged") is in no list; the kernel runs it like
untagged attention's ragged tile, bounds-masked and without tag loads
(:func:`ragged_tile_full`). As a one-entry list it cost SD3 1024² 5% (NOTES.md 48).

Full tiles are further split into the longest contiguous run (looped over as a plain
range, so the kernel pipelines it like untagged attention) and a list of the others.
The Hopper kernel, whose loader warp reads the list ahead of the consumers, takes one
list per query tile instead (:class:`VisitLists`: full tiles, then partial ones).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from .fast_launch import capturing


@dataclass
class TileLists:
    """Per query tile: partial tiles (masked), the longest contiguous run of full tiles
    ``[run_start, run_stop)`` (a plain pipelined loop, like untagged attention), and the
    other full tiles (a list)."""

    partial_count: torch.Tensor  # [B, Mt] int32
    partial_index: torch.Tensor  # [B, Mt, Nt] int32, the first partial_count entries are used
    full_count: torch.Tensor  # [B, Mt] int32, full tiles outside the run
    full_index: torch.Tensor  # [B, Mt, Nt] int32
    run_start: torch.Tensor  # [B, Mt] int32
    run_stop: torch.Tensor  # [B, Mt] int32 (== run_start: no run)
    ragged_full: torch.Tensor  # [B, Mt] int32: 1 where the ragged last key tile is full but ragged
    # False when every list is empty, so every visited tile is in the run or the ragged full
    # one (block-diagonal tags on tile boundaries, all-allowed tags): the kernel is then
    # compiled without the list loops (NOTES.md 54). True where that is unknown.
    has_lists: bool = True


def longest_run(sel: torch.Tensor):
    """``(start, stop)`` of the longest run of True along the last dim (first one on ties)."""
    idx = torch.arange(sel.shape[-1], device=sel.device)
    last_false = torch.cummax(torch.where(sel, -1, idx), dim=-1).values  # latest False at or before j
    run_len = idx - last_false  # length of the True run ending at j (0 on a False)
    best = run_len.max(-1)
    stop = torch.where(best.values > 0, best.indices + 1, 0)
    return (stop - best.values).to(torch.int32), stop.to(torch.int32)


def _tile_bits(tags: torch.Tensor, block: int, n_tiles: int, nbits: int):
    """Per tile, which bits some token has (OR) and which every real token has (AND)."""
    b, n = tags.shape
    shifts = torch.arange(nbits, device=tags.device, dtype=torch.int64)
    bits = ((tags.long().unsqueeze(-1) >> shifts) & 1).bool()  # [B, N, nbits]
    pad = n_tiles * block - n
    padded_or = torch.nn.functional.pad(bits, (0, 0, 0, pad), value=False).view(b, n_tiles, block, nbits)
    padded_and = torch.nn.functional.pad(bits, (0, 0, 0, pad), value=True).view(b, n_tiles, block, nbits)
    return padded_or.any(2), padded_and.all(2)


# Host integer helpers for the launch paths: triton.cdiv / next_power_of_2 are constexpr-function
# wrappers with per-call overhead in recent Tritons, and a Flux 256^2 call is ~30 us of GPU work.
def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers (tile counts)."""
    return -(-a // b)


def pow2_at_least(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``): padded tile widths."""
    return 1 << max(0, (int(x) - 1).bit_length())


def classify_tiles(q_tags: torch.Tensor, k_tags: torch.Tensor, block_m: int, block_n: int):
    """``(skip, full)`` bool tensors of shape ``[B, Mt, Nt]``."""
    nbits = 64 if torch.int64 in (q_tags.dtype, k_tags.dtype) else 32
    mt = cdiv(q_tags.shape[1], block_m)
    nt = cdiv(k_tags.shape[1], block_n)
    q_or, q_and = _tile_bits(q_tags, block_m, mt, nbits)
    k_or, k_and = _tile_bits(k_tags, block_n, nt, nbits)
    # A key tile with padding must mask the padding: make its AND empty so it is never full.
    if k_tags.shape[1] % block_n:
        k_and[:, -1] = False
    # Bit-set intersections as 0/1 matrix products (inner dim = number of bits; exact in fp32).
    meet_or = torch.einsum("zic,zjc->zij", q_or.float(), k_or.float())
    meet_and = torch.einsum("zic,zjc->zij", q_and.float(), k_and.float())
    return meet_or == 0, meet_and > 0


def ragged_tile_full(q_tags: torch.Tensor, k_tags: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """``[B, Mt]`` bool: the last key tile is ragged (``Nk`` not a multiple of ``block_n``) and
    one bit is shared by every query of the query tile and every real key of that tile, so
    only the padding needs a mask there."""
    b, mt = q_tags.shape[0], cdiv(q_tags.shape[1], block_m)
    n_k = k_tags.shape[1]
    if n_k % block_n == 0:
        return torch.zeros(b, mt, dtype=torch.bool, device=q_tags.device)
    nbits = 64 if torch.int64 in (q_tags.dtype, k_tags.dtype) else 32
    _, q_and = _tile_bits(q_tags, block_m, mt, nbits)
    _, k_and = _tile_bits(k_tags[:, n_k - n_k % block_n:], block_n, 1, nbits)  # real keys only
    return (q_and & k_and).any(-1)


@dataclass
class VisitLists:
    """Per query tile, every key tile to visit in one list: the full tiles first, then the
    partial ones, each part in increasing order (the Hopper kernel's loader walks it; its
    consumers mask only from position ``full_count`` on)."""

    index: torch.Tensor  # [B, Mt, Nt] int32, the first visit_count entries are used
    full_count: torch.Tensor  # [B, Mt] int32
    visit_count: torch.Tensor  # [B, Mt] int32


def _classify(q_tags: torch.Tensor, k_tags: torch.Tensor, block_m: int, block_n: int):
    """classify_tiles, through the optional CUDA extension when the tags are on a GPU."""
    from iidkern._ext import cuda_ext

    if cuda_ext is not None and q_tags.is_cuda:
        return cuda_ext.classify_tiles(q_tags.contiguous(), k_tags.contiguous(), block_m, block_n)
    return classify_tiles(q_tags, k_tags, block_m, block_n)


def build_visit_lists(q_tags: torch.Tensor, k_tags: torch.Tensor, block_m: int, block_n: int) -> VisitLists:
    skip, full = _classify(q_tags, k_tags, block_m, block_n)
    # Rank 0 = full, 1 = partial, 2 = skipped; a stable sort keeps each part in tile order.
    rank = torch.where(full, 0, torch.where(skip, 2, 1)).to(torch.int8)
    order = torch.argsort(rank, dim=-1, stable=True).to(torch.int32)
    return VisitLists(order.contiguous(), full.sum(-1, dtype=torch.int32).contiguous(),
                      (~skip).sum(-1, dtype=torch.int32).contiguous())


def build_tile_lists(q_tags: torch.Tensor, k_tags: torch.Tensor, block_m: int, block_n: int,
                     read_back: bool = True) -> TileLists:
    """The Triton kernel's lists. ``read_back``: whether ``has_lists`` may be read back to the
    host (one synchronization on a GPU); without it, it is True there (the loops are kept)."""
    skip, full = _classify(q_tags, k_tags, block_m, block_n)
    partial = ~skip & ~full

    def as_list(sel: torch.Tensor):
        # Stable sort puts the selected tile indices first, in increasing order.
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return sel.sum(-1, dtype=torch.int32).contiguous(), order.contiguous()

    # A list-driven loop reads each tile index before it can address K and V; the bulk of
    # the full tiles (all image tiles, for IID) form one contiguous run that runs as a
    # plain range instead.
    run_start, run_stop = longest_run(full)
    idx = torch.arange(full.shape[-1], device=full.device)
    in_run = (idx >= run_start[..., None]) & (idx < run_stop[..., None])
    ragged = ragged_tile_full(q_tags, k_tags, block_m, block_n)
    partial[..., -1] &= ~ragged  # the kernel runs such a tile outside the lists
    pc, pi = as_list(partial)
    fc, fi = as_list(full & ~in_run)
    return TileLists(pc, pi, fc, fi, run_start.contiguous(), run_stop.contiguous(), ragged.to(torch.int32).contiguous(),
                     has_lists=_any_listed(pc, fc, read_back))


def _any_listed(partial_count: torch.Tensor, full_count: torch.Tensor, read_back: bool) -> bool:
    """Whether some query tile has a listed tile. On a GPU, reading it back synchronizes: once
    per mask and tile shape for a reused mask (its lists are cached), but a call's own tags
    would pay it per call, and a CUDA graph being captured cannot at all. There the answer is
    True, which is always correct (the lists are then walked)."""
    if partial_count.is_cuda and (not read_back or capturing(partial_count)):
        return True
    return bool(torch.maximum(partial_count.amax(), full_count.amax()).item() > 0) if partial_count.numel() else False


@dataclass
class TagMask:
    """Query/key tags plus their per-tile-shape skip lists (built on first use, cached)."""

    q_tags: torch.Tensor  # [B, Nq] int32/int64
    k_tags: torch.Tensor  # [B, Nk] int32/int64
    # A mask reused across calls (iidkern.tag_mask) may read its list counts back to the host
    # once per tile shape to drop empty list loops (TileLists.has_lists); one call's own tags
    # (a tuple) do not, since that would synchronize every call.
    reused: bool = True
    _lists: Dict[tuple, object] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # The kernels step through a row of tags one element at a time: a strided view (a
        # transposed [N, B] tensor, say) would be misread, so such views are copied once here.
        self.q_tags, self.k_tags = (t if t.stride(-1) == 1 else t.contiguous() for t in (self.q_tags, self.k_tags))

    def batched(self, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The tags as ``[B, N]`` (``[N]`` and ``[1, N]`` tags are shared by the batch: stride 0)."""
        return tuple(t.expand(batch, t.shape[-1]) if t.dim() == 1 or t.shape[0] == 1 else t
                     for t in (self.q_tags, self.k_tags))

    def _cached(self, build, block_m: int, block_n: int, batch: int, **options):
        key = (build.__name__, block_m, block_n, batch)
        if key in self._lists:
            return self._lists[key]
        lists = build(*self.batched(batch), block_m, block_n, **options)
        # Lists built while a CUDA graph is captured hold their values only once the graph
        # replays: that graph uses them, but they are not kept for other calls.
        if not capturing(self.q_tags):
            self._lists[key] = lists
        return lists

    def tile_lists(self, block_m: int, block_n: int, batch: int = 1) -> TileLists:
        """The Triton kernel's lists for ``(block_m, block_n)`` tiles, built once per shape."""
        return self._cached(build_tile_lists, block_m, block_n, batch, read_back=self.reused)

    def visit_lists(self, block_m: int, block_n: int, batch: int = 1) -> VisitLists:
        """The one-list form of the tile classes (the Hopper kernel's), cached like tile_lists."""
        return self._cached(build_visit_lists, block_m, block_n, batch)

    def tile_counts(self, block_m: int, block_n: int, batch: int = 1) -> torch.Tensor:
        """Number of key tiles each query tile must visit, ``[B, Mt]`` (for tests and stats)."""
        lists = self.tile_lists(block_m, block_n, batch)
        return lists.partial_count + lists.full_count + (lists.run_stop - lists.run_start) + lists.ragged_full

    def sparsity(self, block_m: int, block_n: int, batch: int = 1) -> float:
        """Fraction of (query tile, key tile) pairs skipped."""
        nt = cdiv(self.k_tags.shape[-1], block_n)
        counts = self.tile_counts(block_m, block_n, batch)
        return 1.0 - counts.float().mean().item() / nt
