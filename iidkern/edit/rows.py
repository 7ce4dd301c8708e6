"""Batch rows of a tensor without a host-device synchronization.

Indexing a GPU tensor with a Python list (``x[[1, 3]]``) copies the list to the device
through pageable memory, which waits for the stream's queued work: a synchronization in
every attention call of a policy that does it. The editing policies select and replace
rows here.
"""
from __future__ import annotations

from typing import Sequence

import torch


def batch_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``x[rows]`` along the first axis: a view for a run of consecutive rows, else a stack.
    Negative rows count from the end and a row outside ``x`` is an IndexError, as in indexing."""
    n = x.shape[0]
    rows = [int(r) for r in rows]
    outside = [r for r in rows if not -n <= r < n]
    if outside:
        raise IndexError(f"batch_rows: rows {outside} are out of range for {n} rows")
    rows = [r % n for r in rows]
    if not rows:
        return x[:0]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]:rows[0] + len(rows)]
    return torch.stack([x[r] for r in rows])


def replace_rows(base: torch.Tensor, rows: Sequence[int], source: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` whose ``rows`` are ``source``'s, written row by row."""
    new = base.clone()
    for r in rows:
        new[r] = source[r]
    return new
