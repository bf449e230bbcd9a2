"""Field checks for the validated config dataclasses: one wording for every refusal.

Each check raises ``ValueError("<Owner>.<field> must be <expected>, got <value>")`` where
``Owner`` is the dataclass name (or the config section, e.g. ``config.train``), so a bad value is
always reported with the key that holds it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite real number (bools are not numbers here)."""
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:   # an int past float's range (10**400)
        return False


def owner_of(obj: Any) -> str:
    return getattr(obj, "_config_owner", type(obj).__name__)


def fail(obj: Any, field: str, expected: str) -> None:
    raise ValueError(f"{owner_of(obj)}.{field} must be {expected}, got {getattr(obj, field)!r}")


def ints(obj: Any, fields: Iterable[str], low: int = 1, *, optional: bool = False) -> None:
    """Each field is an integer >= low (or None when `optional`)."""
    for field in fields:
        value = getattr(obj, field)
        if optional and value is None:
            continue
        if not (is_int(value) and value >= low):
            wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
            fail(obj, field, ("None or " if optional else "") + wanted)


def int_tuple(obj: Any, field: str, expected: str, low: int = 1, *, high: int | None = None,
              distinct: bool = False) -> None:
    """The field is a non-empty sequence of integers in [low, high] (without repeats when
    `distinct`), stored back as a tuple; `expected` words the error."""
    value = getattr(obj, field)
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        value = tuple(value)
        object.__setattr__(obj, field, value)
        if value and all(is_int(n) and n >= low and (high is None or n <= high) for n in value) \
                and not (distinct and len(set(value)) != len(value)):
            return
    fail(obj, field, expected)


def numbers(obj: Any, fields: Iterable[str], low: float = 0.0, *, strict: bool = False,
            high: float | None = None) -> None:
    """Each field is a finite number >= low (> low when `strict`), and <= high if given."""
    for field in fields:
        value = getattr(obj, field)
        ok = is_number(value) and (value > low if strict else value >= low) and \
            (high is None or value <= high)
        if not ok:
            bound = f"> {low:g}" if strict else f">= {low:g}"
            fail(obj, field, f"a finite number {bound}" + (f" and <= {high:g}" if high is not None
                                                            else ""))


def choice(obj: Any, field: str, options: Iterable[Any]) -> None:
    options = tuple(options)
    if getattr(obj, field) not in options:
        fail(obj, field, f"one of {options}")


def normalized(obj: Any, field: str, normalize: Any, expected: str) -> None:
    """Sets `field` of frozen dataclass `obj` to `normalize(value)`, failing with `expected` where
    that is None."""
    value = normalize(getattr(obj, field))
    if value is None:
        fail(obj, field, expected)
    object.__setattr__(obj, field, value)


def bools(obj: Any, fields: Iterable[str]) -> None:
    for field in fields:
        if not isinstance(getattr(obj, field), bool):
            fail(obj, field, "a bool")


def int_arg(name: str, value: Any, low: int = 1, *, optional: bool = False) -> Any:
    """A function argument that must be a Python/numpy integer >= low (or None when `optional`);
    returns it, or raises ``ValueError("<name> must be ..., got <value>")``."""
    if optional and value is None:
        return value
    if not (is_int(value) and value >= low):
        wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{wanted}, got {value!r}")
    return value
