"""Argument checks shared by the editing configs and pipelines.

Each raises a TypeError / ValueError naming the argument and what it got, at construction:
a wrong type found only at step S (after sampling up to it) or one that silently changes the
method (a string where names are expected is iterated letter by letter) is what they stop.
"""
import dataclasses
import math
from typing import Optional, Tuple

from ..specs import as_real, index_arg, is_sequence, scalar_dtype_kind


def integer(value, what: str, minimum: Optional[int] = None) -> int:
    """``value`` as an int (Python, numpy or 0-d tensor integer; not a bool or a float)."""
    i = index_arg(value, what)
    if minimum is not None and i < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {i}")
    return i


def optional_integer(value, what: str, minimum: Optional[int] = None) -> Optional[int]:
    return None if value is None else integer(value, what, minimum)


def real(value, what: str, finite: bool = True) -> float:
    """``value`` as a float (an int or float, or a 0-d numeric array; not a bool, a complex
    or a string), finite unless told."""
    x = as_real(value)
    if x is None:
        raise TypeError(f"{what} must be a real number, got {value!r} ({type(value).__name__})")
    if finite and not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x}")
    return x


def flag(value, what: str) -> bool:
    """A bool (numpy's and a 0-d bool tensor count; 0 / 1 and strings do not)."""
    if isinstance(value, bool):
        return value
    if scalar_dtype_kind(value) == "b":  # a 0-d bool array or tensor, numpy's bool
        return bool(value)
    raise TypeError(f"{what} must be a bool, got {value!r} ({type(value).__name__})")


def choice(value, options: Tuple[str, ...], what: str) -> str:
    """One of ``options`` (a ValueError naming ``what``, the options and the value)."""
    if value not in options:
        raise ValueError(f"{what} must be one of {options}, got {value!r}")
    return value


def names(value, what: str) -> Optional[Tuple[str, ...]]:
    """``None`` or a sequence of names as a tuple; a bare string is refused (it would be
    read letter by letter)."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{what} must be a sequence of names, e.g. ({value!r},), got the string {value!r}")
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of names, got {value!r} ({type(value).__name__})") from None
    if not all(isinstance(n, str) for n in out):
        raise TypeError(f"{what} must hold strings, got {value!r}")
    return out


def sequence(value, what: str, expected: str) -> tuple:
    """``value``'s items as a tuple: a list, tuple, 1-D array or tensor; not a string (read
    letter by letter), a number or a 0-d array (a TypeError naming ``what``)."""
    if not is_sequence(value):
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    return tuple(value)


def index_pairs(value, what: str, example: str) -> Tuple[Tuple[int, int], ...]:
    """A sequence of ``(a, b)`` integer pairs, e.g. ``((0, 1),)``."""
    try:
        items = [tuple(pair) for pair in value]
    except TypeError:
        items = None
    if items is None or any(len(pair) != 2 for pair in items):
        raise TypeError(f"{what} must be a sequence of (a, b) pairs, e.g. {example}, got {value!r}")
    return tuple((integer(a, what), integer(b, what)) for a, b in items)


def pair(value, what: str, expected: str) -> Tuple[object, object]:
    """Two items (a tuple, list, 1-D array or tensor of two), not a string."""
    items = sequence(value, what, expected)
    if len(items) != 2:
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    return items


def step_window(value, what: str) -> Optional[Tuple[int, int]]:
    """``None`` or ``(start, stop)`` with ``0 <= start < stop``."""
    if value is None:
        return None
    first, last = pair(value, what, "None or a (start, stop) pair of steps")
    start, stop = integer(first, f"{what} start", 0), integer(last, f"{what} stop", 0)
    if stop <= start:
        raise ValueError(f"{what} must satisfy start < stop (no step would run), got {(start, stop)}")
    return start, stop


def config(value, cls, what: str):
    """``value``, an instance of the dataclass ``cls`` (None: its defaults), checked again as its
    constructor checks it: a field assigned a bad value after construction raises here, where
    a policy or pipeline takes the config, not at step S. Returns ``value`` itself (not a copy)."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{what} must be an instance of {cls.__name__} (or None for the defaults), "
                        f"got {type(value).__name__}")
    dataclasses.replace(value)  # __post_init__ on a copy: raises the constructor's error
    return value
