"""Reward transforms Phi of the calibrated reward (InfAlign, spec section 1.4).

A transform maps the calibrated reward u = C(x, y) in [0, 1] to the reward R = Phi(u) that
KL-regularised RL then maximises; the optimal policy is pi_ref * exp(Phi(C) / beta). Only
Phi / beta matters, so every family here is normalised to be increasing with Phi'(0) of order 1
and additive constants are irrelevant.

Each transform is a small frozen object of pure array functions, looked up by name in one
registry. An unknown name fails with the list of known names.

| name       | Phi(u)                              | what it matches                              |
|------------|-------------------------------------|----------------------------------------------|
| identity   | u                                   | calibrated RLHF; optimal for N = 1           |
| log        | log u   (smoothed calibration)      | BoN distillation / vBoN (beta = 1/(N-1))     |
| exp        | (exp(t u) - 1) / t, t=0 -> u        | InfAlign: t > 0 for BoN, t < 0 for WoN       |
| power      | (u^p - 1) / p, p=0 -> log u (smoothed) | Box-Cox family between log and identity   |
| logistic   | sigmoid(s (u - c))                  | soft threshold at quantile c                 |
| logit      | log(u / (1 - u))   (centred calib.) | idealised Bradley-Terry raw reward           |
| probit     | Gaussian quantile of u (centred)    | idealised Gaussian raw reward                |
| raw        | the uncalibrated reward r(x, y)     | standard RLHF baseline                       |
| optimal    | tabulated Phi*, linear interpolation| fixed point of the analytic solver           |

For t < 0, (exp(t u) - 1)/t = (1 - exp(-|t| u))/|t| is the paper's -exp(-|t| u) up to an
affine map, i.e. the same policy family.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import statistics
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from infalign_jax.infra.config_utils import as_dict

Array = jax.Array

# Calibrated rewards are clipped into [EPS, 1 - EPS] by transforms that diverge at the ends.
EPS = 1e-6
# The largest |Phi(u)| on [0, 1] a transform may reach: RL squares rewards and advantages in
# float32 (whitening, value errors; max 3.4e38), with room for sums over a batch.
MAX_ABS_REWARD = 1e15


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named reward transform.

    Attributes:
      name: registry name.
      params: the parameters it was built with (for logging and manifests).
      fn: pure function of the calibrated reward array (same shape out).
      uses_raw: if True, the transform ignores the calibration and returns the raw reward.
      smoothing: the calibration it reads (`calibration.calibrate`'s `smoothing`): "none",
        C itself; "add_one", (K C + 1) / (K + 1), never 0 (the log transform needs that;
        without ties it is vBoN's (#{ref < r} + 1) / (K + 1)); "centred", (K C + 1/2) / (K + 1),
        never 0 or 1 (logit, probit, which diverge at both ends).
      sup_abs: max |Phi(u)| over u in [0, 1], worked out in float64 without JAX (so building a
        transform never starts a backend); None when unknown (raw, a hand-made transform).
    """

    name: str
    params: Mapping[str, Any]
    fn: Callable[[Array], Array]
    uses_raw: bool = False
    smoothing: str = "none"
    sup_abs: float | None = None

    def __call__(self, calibrated: Array, raw: Array | None = None) -> Array:
        if self.uses_raw:
            if raw is None:
                raise ValueError(f"transform {self.name!r} needs the raw reward (raw=...)")
            return jnp.asarray(raw, jnp.float32)
        return self.fn(jnp.asarray(calibrated, jnp.float32))


def _finite(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"transform parameter {name!r} must be a number, got {value!r}") from e
    if not math.isfinite(value):
        raise ValueError(f"transform parameter {name!r} must be finite, got {value}")
    return value


def _floor(transform: str, floor: float) -> float:
    """The floor below which log-type transforms clamp u: finite and in (0, 1)."""
    floor = _finite("floor", floor)
    if not 0.0 < floor < 1.0:
        raise ValueError(f"transform {transform!r}: floor must be in (0, 1), got {floor}")
    return floor


def _identity() -> Transform:
    return Transform("identity", {}, lambda u: u, sup_abs=1.0)


def _log(floor: float = EPS) -> Transform:
    floor = _floor("log", floor)
    return Transform("log", {"floor": floor}, lambda u: jnp.log(jnp.maximum(u, floor)),
                     smoothing="add_one", sup_abs=-math.log(floor))


# Below this |t| (or |p|) the exp (power) transform is its t -> 0 limit, the identity (log):
# the difference is under float32's resolution, and a tiny t such as 1e-40 would be 0 in float32
# (0 / 0 everywhere).
LIMIT_BELOW = 1e-8


def _exp(t: float = 1.0) -> Transform:
    t = _finite("t", t)
    if abs(t) < LIMIT_BELOW:
        return Transform("exp", {"t": t}, lambda u: u, sup_abs=1.0)
    return Transform("exp", {"t": t}, lambda u: jnp.expm1(t * u) / t,
                     sup_abs=abs(_expm1(t) / t))   # at u = 1


def _power(p: float = 0.5, floor: float = EPS) -> Transform:
    p = _finite("p", p)
    floor = _floor("power", floor)
    if abs(p) < LIMIT_BELOW:
        return Transform("power", {"p": p}, lambda u: jnp.log(jnp.maximum(u, floor)),
                         smoothing="add_one", sup_abs=-math.log(floor))
    # Every p reads the smoothed calibration, as its p -> 0 limit log does: for p < 0 the
    # transform diverges at u = 0, and for small p > 0 the lowest rank's value would be the
    # floor's (p = 1e-7: -13.8 against -1.6 at p = -1e-7), so a sweep over p jumped at 0. At
    # p = 1 it is an affine map of C, the same policy at another beta.
    # expm1(p log u) / p, not (u^p - 1) / p: for small p, u^p is within a few float32 steps of 1
    # and the subtraction would lose every digit (p = 1e-6: Phi(0.99) = 0, ties between ranks).
    log_floor = math.log(floor)
    at_floor = _expm1(p * log_floor) / p if p * log_floor < 700 else math.inf
    return Transform("power", {"p": p},
                     lambda u: jnp.expm1(p * jnp.log(jnp.maximum(u, floor))) / p,
                     smoothing="add_one", sup_abs=abs(at_floor))   # at u = 0 (0 at u = 1)


def _logistic(s: float = 10.0, c: float = 0.5) -> Transform:
    s, c = _finite("s", s), _finite("c", c)
    if s <= 0:
        raise ValueError(f"transform 'logistic': s must be > 0, got {s}")
    return Transform("logistic", {"s": s, "c": c}, lambda u: jax.nn.sigmoid(s * (u - c)),
                     sup_abs=1.0 / (2.0 + _expm1(-s * (1.0 - c))))   # at u = 1


def _logit() -> Transform:
    def fn(u):
        u = jnp.clip(u, EPS, 1.0 - EPS)
        return jnp.log(u) - jnp.log1p(-u)
    return Transform("logit", {}, fn, smoothing="centred", sup_abs=math.log((1.0 - EPS) / EPS))


def _probit() -> Transform:
    return Transform("probit", {},
                     lambda u: jax.scipy.special.ndtri(jnp.clip(u, EPS, 1.0 - EPS)),
                     smoothing="centred", sup_abs=-statistics.NormalDist().inv_cdf(EPS))


def _raw() -> Transform:
    return Transform("raw", {}, lambda u: u, uses_raw=True)


def _optimal(u: Any = None, phi: Any = None, path: str | None = None) -> Transform:
    """Tabulated transform (u_grid, phi) from the analytic solver, linearly interpolated."""
    if path is not None:
        try:
            with np.load(path) as table:
                u, phi = table["u"], table["phi"]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"transform 'optimal': cannot read a (u, phi) table from {path!r}: "
                             f"{e}") from e
    if u is None or phi is None:
        raise ValueError("transform 'optimal' needs a table: u=..., phi=... or path=... (.npz)")
    u = np.asarray(u, np.float64)
    phi = np.asarray(phi, np.float64)
    if u.ndim != 1 or u.shape != phi.shape or u.size < 2:
        raise ValueError(f"transform 'optimal': u and phi must be 1-D of equal length >= 2, "
                         f"got {u.shape} and {phi.shape}")
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(phi))):
        raise ValueError("transform 'optimal': table contains non-finite values")
    if np.any(np.diff(u) <= 0):
        raise ValueError("transform 'optimal': u grid must be strictly increasing")
    u_32, phi_32 = u.astype(np.float32), phi.astype(np.float32)   # numpy: no backend started
    return Transform("optimal", {"path": path, "size": int(u.size)},
                     lambda c: jnp.interp(c, u_32, phi_32), sup_abs=float(np.abs(phi).max()))


_REGISTRY: dict[str, Callable[..., Transform]] = {
    "identity": _identity,
    "log": _log,
    "exp": _exp,
    "power": _power,
    "logistic": _logistic,
    "logit": _logit,
    "probit": _probit,
    "raw": _raw,
    "optimal": _optimal,
}


def known_transforms() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_transform(name: str, *, float32_range: bool = True, **params: Any) -> Transform:
    """Builds the transform `name` with `params`; unknown names list the known ones. Its float32
    values, what RL computes with, must stay within MAX_ABS_REWARD (`float32_range`; the analytic
    tool, which evaluates `fn` in float64, turns this off)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown transform {name!r}; known transforms: {', '.join(known_transforms())}")
    try:
        transform = _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"transform {name!r}: bad parameters {sorted(params)}: {e}") from e
    if float32_range:
        _check_range(transform)
    return transform


def _check_range(transform: Transform) -> None:
    """Refuses a transform whose values on [0, 1] (`sup_abs`) exceed MAX_ABS_REWARD, e.g. exp
    with t above ~38: (e^t - 1) / t; power with p = -3 and floor 1e-6."""
    if transform.sup_abs is None or transform.sup_abs <= MAX_ABS_REWARD:
        return
    hint = {"exp": " (for t > 0 the range grows like e^t / t, so t must stay below ~38; for "
                   "Best-of-N at large N use transform 'optimal', the analytic solver's table)",
            "power": " (for p < 0 it is (floor^p - 1) / p at u = 0: raise the floor)",
            }.get(transform.name, "")
    raise ValueError(
        f"transform {transform.name!r} with {transform.params}: |Phi(u)| reaches "
        f"{transform.sup_abs:.3g} on [0, 1], beyond the {MAX_ABS_REWARD:.0e} that float32 RL "
        f"arithmetic holds{hint}")


def _expm1(x: float) -> float:
    try:
        return math.expm1(x)
    except OverflowError:
        return math.inf


def transform_param_names(name: str) -> tuple[str, ...]:
    """The keyword parameters transform `name` accepts (from its factory's signature)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown transform {name!r}; known transforms: {', '.join(known_transforms())}")
    return tuple(inspect.signature(_REGISTRY[name]).parameters)


def _unset(default: Any) -> Any:
    """The unset value of a parameter in a config section: a typed placeholder (None, so
    ``--config.transform.t=4`` can still set it), or "" for a file path."""
    from ml_collections.config_dict import placeholder
    return "" if isinstance(default, str) else placeholder(type(default))


def _section_defaults() -> dict[str, Any]:
    """{parameter: its default} over every family (numbers as floats; a file path as "")."""
    values: dict[str, Any] = {}
    for factory in _REGISTRY.values():
        for p in inspect.signature(factory).parameters.values():
            if isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
                values.setdefault(p.name, float(p.default))
            elif p.name == "path":
                values.setdefault(p.name, "")
    return values


def transform_section(name: str, **params: Any) -> Any:
    """The `config.transform` section (a ConfigDict): `name`, the parameters family `name` takes
    at their defaults, then `params`; every other family's parameters are present but unset
    (None, "" for a path), so ``--config.transform.t=4`` reaches the section whatever the
    default name, and a run refuses a set parameter its transform does not take
    (`transform_from_config(..., strict=True)`). A parameter `name` does not take is an error."""
    import ml_collections
    defaults = _section_defaults()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"transform_section: unknown parameters {unknown}; known: "
                         f"{sorted(defaults)}")
    taken = transform_param_names(name)
    foreign = sorted(set(params) - set(taken))
    if foreign:
        raise ValueError(f"transform_section: transform {name!r} does not take "
                         f"{', '.join(foreign)} ({_takes(name)})")
    get_transform(name, **params)
    values = {k: (v if k in taken else _unset(v)) for k, v in defaults.items()}
    return ml_collections.ConfigDict({"name": name, **values, **params})


def transform_overrides(name: str, **params: Any) -> dict[str, Any]:
    """Dotted overrides ("transform.<key>": value) that turn a config's transform section into
    `transform_section(name, **params)`: the parameters of other families unset, so a section
    switched from exp t=3 to identity does not keep t (which a run would refuse)."""
    return {f"transform.{k}": v for k, v in transform_section(name, **params).items()}


def _takes(name: str) -> str:
    taken = [p for p in transform_param_names(name) if p in _section_defaults()]
    return f"it takes {', '.join(taken)}" if taken else "it takes no parameters"


def is_set(value: Any) -> bool:
    """Whether a transform parameter in a config section is set (None and "" mean unset)."""
    return value is not None and value != ""


def transform_from_config(section: Mapping[str, Any], *, strict: bool = False
                          ) -> tuple[str, dict[str, Any]]:
    """(name, params) from a config section such as ``{name: "exp", t: 4.0, p: None, path: ""}``.

    A config section carries the parameters of every family so that ``--config.transform.t=4``
    works whatever the default name; the set ones (not None, not "") that the chosen family takes
    are passed on. Keys no family accepts are an error, so typos do not pass silently. With
    `strict` (a run's config), a set parameter the chosen family does not take is an error too
    (``transform.name=identity`` with ``t=10`` is refused, naming config.transform.t), instead
    of being ignored as when code switches the family of a section.
    """
    section = as_dict(section)
    if "name" not in section:
        raise ValueError("transform config needs a 'name' "
                         f"(one of {', '.join(known_transforms())})")
    name = section.pop("name")
    known = set().union(*(transform_param_names(n) for n in _REGISTRY))
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"transform config: unknown keys {unknown}; parameters of the known "
                         f"families: {sorted(known)}")
    accepted = transform_param_names(name)
    params = {k: v for k, v in section.items() if k in accepted and is_set(v)}
    try:   # fail now, naming the section, if the values are bad
        get_transform(name, **params)
    except ValueError as e:
        raise ValueError(f"config.transform: {e}") from e
    foreign = sorted(k for k, v in section.items() if k not in accepted and is_set(v))
    if strict and foreign:
        key = foreign[0]
        owners = [n for n in known_transforms() if key in transform_param_names(n)]
        raise ValueError(f"config.transform.{key}={section[key]!r}: transform {name!r} does not "
                         f"take {key} ({_takes(name)}; {key} is a parameter of "
                         f"{', '.join(repr(n) for n in owners)}). To switch transforms, use "
                         f"the config file's argument, e.g. --config=<file>:transform={name}")
    return name, params
