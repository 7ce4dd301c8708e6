"""Replay the one kernel launch of a plain attention call for later calls of the same signature.

A diffusion run makes thousands of attention calls with a handful of signatures. For a plain
call (no extras) everything but the data pointers depends on the signature alone: argument
checks, routing, tile shapes, strides, TMA descriptor shapes, the compiled kernel. At 256² and
512² images that host work took longer than the GPU work (NOTES.md 34-35). So
``iidkern.attention`` runs the first call of a signature the normal way inside
``fast_launch.recording()``, turns its launch into a :class:`LaunchReplay`, and keeps it keyed
on the signature. A repeat call allocates its output, puts its own tensors where the
recorded arguments held the first call's, and launches the compiled kernel the launcher
cached for that first call.

The record is taken only when it can be replayed exactly: one launch, and every tensor in it
is one of the call's q, k, v, output (or a TMA descriptor over one of them) or a
long-lived placeholder. Anything else (a temporary tensor, a second kernel) gives no replay,
and that signature keeps the normal path.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .fast_launch import _is_descriptor

_NO_SLOT = -1


def _rebased(descriptor, base: torch.Tensor):
    """The descriptor over another tensor of the same shape, strides and dtype.

    A field-by-field copy: the descriptor classes differ between Triton versions in their
    fields (and their constructors check what the signature already guarantees)."""
    new = object.__new__(type(descriptor))
    new.__dict__.update(descriptor.__dict__)  # AttributeError: no __dict__ (slots)
    new.base = base  # raises for a frozen dataclass
    return new


def _slot_of(a, tensors: Sequence[torch.Tensor]) -> int:
    for i, t in enumerate(tensors):
        if a is t:
            return i
    return _NO_SLOT


class LaunchReplay:
    """``replay(q, k, v) -> out``: the recorded launch again, on this call's tensors.

    Built by :meth:`of`; the caller guarantees that the calls it replays have the recorded
    call's signature (shapes, strides, dtypes, devices, 16-byte alignment, aliasing among
    q, k and v, and every other argument of ``iidkern.attention``)."""

    def __init__(self, launcher, grid, template: list, slots: list, kwargs: dict, run: Optional[Callable],
                 out: torch.Tensor, alloc: Callable, layout: str):
        self.launcher = launcher
        self.layout = layout  # for tests and debugging: which call this replays
        self._grid, self._template, self._slots, self._kwargs = grid, template, slots, kwargs
        self._out_shape, self._out_dtype, self._out_device = tuple(out.shape), out.dtype, out.device
        self._alloc = alloc
        # The compiled kernel the launcher cached for the recorded launch; None: the launcher's
        # own path every time (the interpreter, IIDKERN_FAST_LAUNCH=0).
        self._run = run

    @classmethod
    def of(cls, launches: list, q, k, v, out, placeholders: Sequence[torch.Tensor], alloc: Callable,
           layout: str) -> Optional["LaunchReplay"]:
        """The replay of a recorded call, or None when it cannot be replayed exactly.

        ``launches`` are what ``fast_launch.recording()`` noted during the call, ``out`` the
        output it returned (allocated contiguous by ``alloc``), ``placeholders`` the tensors
        that outlive every call (pointer arguments a launch ignores)."""
        if len(launches) != 1 or not out.is_contiguous():
            return None
        launcher, grid, args, kwargs = launches[0]
        tensors = (q, k, v, out)
        template, slots = list(args), []
        for position, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                slot = _slot_of(a, tensors)
                if slot == _NO_SLOT:
                    if not any(a is p for p in placeholders):
                        return None  # a tensor of this call only: the replay would reuse it
                    continue
                slots.append((position, slot, None))
            elif _is_descriptor(a):
                slot = _slot_of(a.base, tensors)
                if slot == _NO_SLOT:
                    return None  # over a tensor of this call only
                try:  # kept without its base (this call's tensor); a class _rebased cannot copy: no replay
                    unbased = _rebased(a, None)
                except (AttributeError, TypeError):
                    return None
                slots.append((position, slot, unbased))
            else:
                continue
            template[position] = None  # keep no reference to this call's tensors
        run = launcher.compiled_runner(grid, args, kwargs)
        return cls(launcher, grid, template, slots, dict(kwargs), run, out, alloc, layout)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._alloc(self._out_shape, dtype=self._out_dtype, device=self._out_device)
        tensors = (q, k, v, out)
        args = self._template.copy()
        for position, slot, descriptor in self._slots:
            args[position] = tensors[slot] if descriptor is None else _rebased(descriptor, tensors[slot])
        if self._run is not None:
            self._run(*args)
        else:
            self.launcher.launch(self._grid, args, self._kwargs)
        return out
