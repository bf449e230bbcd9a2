"""Helpers for experiment configs: `configs/<experiment>.py:key=val,key=val` variants.

`get_config(arg)` in each config file parses its `arg` string with `parse_arg`, whose defaults
give both the known keys and their types, so a misspelt key or a badly typed value fails at
start-up with the key named.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def _coerce(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config arg {key!r}: expected a boolean, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError as e:
            raise ValueError(f"config arg {key!r}: expected an integer, got {text!r}") from e
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError as e:
            raise ValueError(f"config arg {key!r}: expected a number, got {text!r}") from e
    if isinstance(default, tuple):
        parts = [p for p in text.split(";") if p]
        inner = default[0] if default else ""
        return tuple(_coerce(key, p, inner) for p in parts)
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "key=val,key=val" against `defaults`; tuples are written "a;b;c"."""
    values = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config arg {item!r} is not key=value (arg was {arg!r})")
        key, text = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {', '.join(sorted(defaults))}")
        values[key] = _coerce(key, text, defaults[key])
    return ml_collections.ConfigDict(values)
