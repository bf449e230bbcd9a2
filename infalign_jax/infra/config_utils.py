"""The one configuration mechanism: ConfigDicts built from the validated dataclasses' defaults.

* A config file (`configs/<experiment>.py`) builds each section with `config_section(Cls, **changes)`:
  the section holds every field of the dataclass at the library's default, with only the
  experiment's changes written out (so no default is restated), and `--config.<section>.<key>=v`
  overrides any of them from the command line.
* Its `get_config(arg)` reads the `:key=val,key=val` variant string with `parse_arg`, whose defaults
  give the known keys and their types.
* The library turns each section into its dataclass once, with `dataclass_from`; unknown keys and
  bad values fail at start-up naming `config.<section>.<key>`. Fields the code sets (marked
  `metadata={"set_by": ...}`, e.g. the EOS id the task sets) are not in sections and are refused
  there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Iterable, Mapping

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


def float_text(value: float) -> str:
    """A float as text for a name or an id: `:g` where that loses nothing (2.0 -> "2", 0.2 ->
    "0.2"), else in full (repr: 2.0000001 stays itself), so two values never share one text."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def comma_list(text: Any) -> tuple[str, ...]:
    """The names of a comma-separated option ("bon, won," -> ("bon", "won")): each stripped,
    empty ones dropped."""
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "key=val,key=val" against `defaults`; tuples are written "a;b;c"."""
    values, given = dict(defaults), {}
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config arg {item!r} is not key=value (arg was {arg!r})")
        key, text = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {', '.join(sorted(defaults))}")
        if key in given:
            raise ValueError(f"config arg {key!r} is given twice ({given[key]!r} and {text!r} "
                             f"in {arg!r}); give it once")
        given[key] = text
        values[key] = _coerce(key, text, defaults[key])
    return ml_collections.ConfigDict(values)


def arg_keys(arg: str | None) -> set[str]:
    """The keys written in a "key=val,key=val" arg (not those left at their defaults), so a
    config can tell a value asked for from a default, e.g. a transform parameter to refuse."""
    return {item.split("=", 1)[0].strip() for item in (arg or "").split(",") if "=" in item}


def as_dict(values: Any) -> dict[str, Any]:
    """A ConfigDict (or any mapping) as a plain dict."""
    return dict(values.to_dict() if hasattr(values, "to_dict") else values)


def section(config: Any, name: str) -> dict[str, Any]:
    """`config[name]` as a plain dict; a missing section is an error naming it."""
    if name not in config:
        raise ValueError(f"config has no section {name!r}")
    return as_dict(config[name])


SET_BY = "set_by"

# Rules giving the options a resolved config leaves unread: each maps the config (a plain dict) to
# {"<section>.<option>": the setting that would read it}. `rl.config` registers the RL section's
# own switches, `rl.bon_distillation` the RL options that method="bonbon" leaves unread.
UNUSED_OPTION_RULES: list[Callable[[Mapping[str, Any]], dict[str, str]]] = []


def refuse_unused_overrides(config: Any, keys: Iterable[str], source: str) -> None:
    """Refuses an override (a command-line flag, a sweep point) that the resolved `config` does
    not read (`UNUSED_OPTION_RULES`), e.g. ``rl.ppo_clip`` with ``rl.algorithm='rloo'``: the run
    would be the same as without it. An override inside an unread option (``rl.value_model.*``)
    is refused with it. A config file may set such options ahead (its ``ppo_epochs`` for when
    the algorithm is switched); only overrides are refused. `source` names them in the message
    ("--config.", "sweep override ")."""
    keys = list(keys)
    if not keys:
        return
    values = as_dict(config)
    readers: dict[str, list[str]] = {}
    for rule in UNUSED_OPTION_RULES:
        for option, reader in rule(values).items():
            readers.setdefault(option, []).append(reader)
    for key in keys:
        parts = key.split(".")
        for option in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if option in readers:
                raise ValueError(
                    f"{source}{key} is not used by this run: it is read only with "
                    f"{' and '.join(readers[option])}; set "
                    f"{'that' if len(readers[option]) == 1 else 'those'} too, or leave {key} out")


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` a config section holds (not those marked `set_by`)."""
    return [f for f in dataclasses.fields(cls) if SET_BY not in f.metadata]


def config_section(cls: type, exclude: tuple[str, ...] = (), **changes: Any
                   ) -> ml_collections.ConfigDict:
    """A config section of dataclass `cls`: every config field at its default, then `changes`.

    A field without a default must be among `changes`; a change to an unknown or code-set field is
    an error naming it. `exclude` leaves out fields the caller sets itself (e.g. the reward
    model's vocabulary size, which its tokenizer fixes).
    """
    fields = {f.name: f for f in config_fields(cls) if f.name not in exclude}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(f"config_section({cls.__name__}): unknown keys {unknown}; "
                         f"known: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        if name in changes:
            values[name] = changes[name]
        elif f.default is not dataclasses.MISSING:
            values[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[name] = f.default_factory()
        else:
            raise ValueError(f"config_section({cls.__name__}): {name!r} has no default; give it")
    return ml_collections.ConfigDict(values)


def dataclass_from(cls: type, values: dict[str, Any], where: str, **extra: Any) -> Any:
    """`cls(**values, **extra)` with unknown keys and bad values reported as ``config.<where>``."""
    known = {f.name for f in config_fields(cls)}
    code_set = {f.name: f.metadata[SET_BY] for f in dataclasses.fields(cls) if SET_BY in f.metadata}
    for key in sorted(set(values) & set(code_set)):
        raise ValueError(f"config.{where}.{key} is set by the {code_set[key]}, not the config; "
                         f"remove it")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config.{where}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        return cls(**values, **extra)
    except (TypeError, ValueError) as e:
        message = str(e)  # the field checks of `config.<where>` sections already name it
        raise ValueError(message if message.startswith(f"config.{where}.")
                         else f"config.{where}: {message}") from e


def load_config_module(path: str) -> Any:
    """Imports a config file (``configs/x.py``, optionally ``configs/x.py:arg``) as a module."""
    path = path.split(":", 1)[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
