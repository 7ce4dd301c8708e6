"""A dataclass mixin whose field assignments pass the same checks as its constructor.

The editing and model configs check (and normalize) their fields in ``__post_init__``.
Without this mixin, ``cfg.sigma = -3`` after construction would skip those checks and fail
later, far from the assignment (after sampling up to IID's step S, say), or not at all.
With it, assigning a field builds a checked copy first (``dataclasses.replace``): a bad
value raises the constructor's TypeError / ValueError and leaves the config as it was; a
good one is stored normalized, as the constructor would store it.
"""
from __future__ import annotations

import dataclasses
import functools


class CheckedOnAssignment:
    """Mix into a ``@dataclass`` with a ``__post_init__``: assigning a field re-runs it."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check = cls.__dict__.get("__post_init__")
        if check is None:
            return

        @functools.wraps(check)
        def post_init(self):
            check(self)
            object.__setattr__(self, "_checked", True)  # from here on, assignments are checked

        cls.__post_init__ = post_init

    def __setattr__(self, name, value):
        fields = {f.name for f in dataclasses.fields(self)}
        if name not in fields or not self.__dict__.get("_checked", False):
            object.__setattr__(self, name, value)  # construction, or not a field
            return
        checked = dataclasses.replace(self, **{name: value})  # raises here, self unchanged
        for field in fields:
            object.__setattr__(self, field, getattr(checked, field))
