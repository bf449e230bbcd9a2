"""Helpers for experiment configs: `configs/<experiment>.py:key=val,key=val` variants.

`get_config(arg)` in each config file parses its `arg` string with `parse_arg`, whose defaults
give both the known keys and their types, so a misspelt key or a badly typed value fails at
start-up with the key named.
"""

from __future__ import annotations

import dataclasses
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


def section(config: Any, name: str) -> dict[str, Any]:
    """`config[name]` as a plain dict; a missing section is an error naming it."""
    if name not in config:
        raise ValueError(f"config has no section {name!r}")
    value = config[name]
    return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def dataclass_from(cls: type, values: dict[str, Any], where: str, **extra: Any) -> Any:
    """`cls(**values, **extra)` with unknown keys and bad values reported as ``config.<where>``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config.{where}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        return cls(**values, **extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{where}: {e}") from e
