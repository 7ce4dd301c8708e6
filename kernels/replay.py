"""Replay the kernel launches of a plain attention call for later calls of the same signature.

A diffusion run makes thousands of attention calls with a handful of signatures. For a plain
call (no extras) everything but the data pointers depends on the signature alone: argument
checks, routing, tile shapes, strides, TMA descriptor shapes, the compiled kernels. At 256²
and 512² images that host work took longer than the GPU work (NOTES.md 34-35). So
``iidkern.attention`` runs the first call of a signature the normal way inside
``fast_launch.recording()``, turns its launches into a :class:`LaunchReplay`, and keeps it
keyed on the signature. A repeat call allocates its output and scratch tensors, puts its own
tensors where the recorded arguments held the first call's, and launches, in order, the
compiled kernels the launchers cached for that first call.

The record is taken only when it can be replayed exactly: every tensor in its launches is
one of the call's q, k, v, output, a scratch tensor made by ``fast_launch.workspace`` (the
last wave's key split, NOTES.md 50), a TMA descriptor over one of them, or a long-lived
placeholder. Anything else (a temporary tensor made otherwise) gives no replay, and that
signature keeps the normal path.
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


class _Launch:
    """One recorded launch: its arguments with this call's tensors taken out (``slots``:
    position, which tensor of the call, and for a descriptor its copy without a base)."""

    def __init__(self, launcher, grid, template: list, slots: list, kwargs: dict, run: Optional[Callable]):
        self.launcher, self.grid, self.template, self.slots, self.kwargs = launcher, grid, template, slots, kwargs
        # The compiled kernel the launcher cached for the recorded launch; None: the launcher's
        # own path every time (the interpreter, IIDKERN_FAST_LAUNCH=0).
        self.run = run

    @classmethod
    def of(cls, launch, tensors: Sequence[torch.Tensor], placeholders: Sequence[torch.Tensor]) -> Optional["_Launch"]:
        launcher, grid, args, kwargs = launch
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
        return cls(launcher, grid, template, slots, dict(kwargs), launcher.compiled_runner(grid, args, kwargs))

    def __call__(self, tensors: Sequence[torch.Tensor]) -> None:
        args = self.template.copy()
        for position, slot, descriptor in self.slots:
            args[position] = tensors[slot] if descriptor is None else _rebased(descriptor, tensors[slot])
        if self.run is not None:
            self.run(*args)
        else:
            self.launcher.launch(self.grid, args, self.kwargs)


class LaunchReplay:
    """``replay(q, k, v) -> out``: the recorded launches again, on this call's tensors.

    Built by :meth:`of`; the caller guarantees that the calls it replays have the recorded
    call's signature (shapes, strides, dtypes, devices, 16-byte alignment, aliasing among
    q, k and v, and every other argument of ``iidkern.attention``)."""

    def __init__(self, launches: list, out: torch.Tensor, workspaces: Sequence[tuple], alloc: Callable,
                 layout: str):
        self._launches = launches
        self.launcher = launches[0].launcher  # for tests and debugging: the first kernel it launches
        self.layout = layout  # for tests and debugging: which call this replays
        self._out_shape, self._out_dtype, self._out_device = tuple(out.shape), out.dtype, out.device
        self._workspaces = workspaces  # (shape, dtype, device) of each scratch tensor, in order
        self._alloc = alloc

    @classmethod
    def of(cls, launches: list, q, k, v, out, placeholders: Sequence[torch.Tensor], alloc: Callable,
           layout: str) -> Optional["LaunchReplay"]:
        """The replay of a recorded call, or None when it cannot be replayed exactly.

        ``launches`` are what ``fast_launch.recording()`` noted during the call (with the
        scratch tensors in ``launches.workspaces``), ``out`` the output it returned (allocated
        contiguous by ``alloc``), ``placeholders`` the tensors that outlive every call
        (pointer arguments a launch ignores)."""
        if not launches or not out.is_contiguous():
            return None
        workspaces = list(getattr(launches, "workspaces", ()))
        tensors = (q, k, v, out, *workspaces)
        recorded = [_Launch.of(launch, tensors, placeholders) for launch in launches]
        if any(r is None for r in recorded):
            return None
        return cls(recorded, out, [(tuple(w.shape), w.dtype, w.device) for w in workspaces], alloc, layout)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._alloc(self._out_shape, dtype=self._out_dtype, device=self._out_device)
        scratch = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in self._workspaces]
        tensors = (q, k, v, out, *scratch)
        for launch in self._launches:
            launch(tensors)
        return out
