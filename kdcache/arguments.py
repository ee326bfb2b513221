"""Checks of the library API's arguments, each refusal one line naming the argument, the value and what is valid.

Python's typing does not stop ``CachedTeachers("a0a1")`` (a str is a sequence of str) or ``epoch(True)`` (a bool
is an int); these checks do, before any work, with an :class:`kdcache.errors.ArgumentError` (also a TypeError or
ValueError) instead of a numpy error from deep inside.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from kdcache.errors import ArgumentTypeError, ArgumentValueError


def _a(value: object) -> str:
    """The type of ``value`` with its article: "a float", "an int"."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _given(value: object) -> str:
    """``value`` as the end of a message: its repr and type."""
    return f"got {value!r}, {_a(value)}"


def integer(name: str, value: object, *, low: int, high: int | None = None, why: str = "") -> int:
    """``value`` as a Python int in ``low`` .. ``high`` (no upper bound when None); numpy integers are accepted,
    bools and floats refused. ``why`` ends the message (where the range comes from)."""
    span = f"of at least {low}" if high is None else f"between {low} and {high}"
    tail = f"; {why}" if why else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer {span} ({_given(value)}){tail}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ArgumentValueError(f"{name} must be {span.removeprefix('of ')} (got {number}){tail}")
    return number


def optional_integer(name: str, value: object, *, low: int) -> int | None:
    """None, or ``value`` as :func:`integer` checks it."""
    return None if value is None else integer(name, value, low=low)


def fraction(name: str, value: object) -> float:
    """``value`` as a float in [0, 1] (ints and numpy numbers accepted, bools and NaN refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number between 0 and 1 ({_given(value)})")
    number = float(value)
    if not (math.isfinite(number) and 0 <= number <= 1):
        raise ArgumentValueError(f"{name} must be between 0 and 1 (got {value!r})")
    return number


def flag(name: str, value: object) -> bool:
    """``value`` as a bool; anything but True or False (numpy's included) is refused, 0 and 1 too."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False ({_given(value)})")
    return bool(value)


def text(name: str, value: object, *, optional: bool = False) -> str | None:
    """``value`` as a str (None too when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a str{' or None' if optional else ''} ({_given(value)})")
    return value


def path(name: str, value: object) -> Path | None:
    """None, or ``value`` (a str or os.PathLike) as a Path."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a path (a str or pathlib.Path) or None ({_given(value)})")
    return Path(value)


def ids(name: str, value: object, *, what: str = "store ids or unique prefixes") -> list[str]:
    """``value`` as a list of str: a list, tuple or other iterable of str. One str is refused, not read as its
    characters, and so is one that is not iterable."""
    if isinstance(value, (str, bytes)):
        raise ArgumentTypeError(f"{name} takes a list of {what}, not one {type(value).__name__}: pass a list of ids, "
                                f"e.g. [{value!r}] (got {value!r})")
    if not isinstance(value, Iterable):
        raise ArgumentTypeError(f"{name} takes a list of {what}, e.g. [\"a0a1\"] ({_given(value)})")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ArgumentTypeError(f"{name} takes a list of {what}, each a str; item {i} is {item!r}, {_a(item)}")
    return items
