"""The analytic tool in calibrated space (InfAlign, spec sections 0, 1.3, 1.4 and 7).

For rank-based inference-time procedures (best-of-N, worst-of-N) every policy worth considering is
pi = pi_ref * g(C), with C the calibrated reward and g a density on [0, 1]; the KL is int g log g
and every win rate is a functional of the CDF G. KL-RLHF with reward Phi(C) and coefficient beta
gives g proportional to exp(Phi(u) / beta). This module evaluates these quantities on a midpoint
grid u_i = (i + 1/2) / U with bin masses p_i = g(u_i) / U (softmax of Phi / beta):

    KL = sum_i p_i log(p_i U),        G_k = sum_{i<k} p_i,       S_k = 1 - G_k = sum_{i>=k} p_i,
    standard:            W = sum_i u_i p_i
    BoN_N vs BoN_N(ref): W = sum_i u_i^N (G_{i+1}^N - G_i^N)            (= int u^N d(G^N))
    WoN_N vs WoN_N(ref): W = sum_i (1 - (1 - u_i)^N) (S_i^N - S_{i+1}^N)
    BoN_N vs plain ref:  W = sum_i u_i (G_{i+1}^N - G_i^N)              (= 1 - int G^N)
    WoN_N vs plain ref:  W = sum_i u_i (S_i^N - S_{i+1}^N)              (= 1 - int 1 - (1-G)^N)

`against="transformed"` (default) is the spec's main reading W_r(T(pi) > T(pi_ref)); `"base"`
compares T(pi) with plain pi_ref (the same choice as `evaluation.plugin_win_rates`). The tail S is accumulated from the top so that 1 - G keeps full
precision where G is close to 1.

Design choices:
  * float64 inside `jax.enable_x64(True)` contexts (the rest of the library runs in float32 and
    the global flag is never flipped): G^32 and tilts with Phi / beta ~ 1e3 need it.
  * The KL target is met by bisection on log(theta), theta = range(Phi) / beta, with Phi
    normalised to [-1, 0] (only Phi / beta matters), vectorised over a batch of transforms so that
    the exp-t search is one jitted call. KL is strictly increasing in theta for non-constant Phi.
  * A KL is "unreachable" when the transform cannot produce it even as beta -> 0 (e.g. Phi flat on
    the top of [0, 1]); a KL that needs densities narrower than ~`MIN_BINS` bins is refused as
    unresolved by the grid (the tilted density at KL k has width ~ exp(-(k + 1))).

Accuracy at the default grid U = 4000 (measured against the closed forms of spec section 0; the
error falls as 1/U^2, 256x from U = 1000 to 16000): BoN_N(pi_ref) as the log tilt with
beta = 1/(N-1), N in {2, 4, 8, 16, 32}: KL within 2.5e-6, BoN-vs-BoN win rate within 5e-6,
standard win rate within 2e-7; exponential tilt c in {1, 5, 20}: KL within 1.1e-6, W within
1.1e-7. Solving beta for the KL target reproduces N/(N+1) at KL = log N - (N-1)/N within 5e-6.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.core import transforms
from infalign_jax.core.transforms import Transform, get_transform
from infalign_jax.core.selection import AGAINST, WIN_RATES

Array = jax.Array

DEFAULT_GRID = 4000
MIN_BINS = 20
# The largest change of a reported win rate (or of a KL, relative to max(1, KL)) between the grid
# and one twice as fine that the single-transform functions accept: identity, log and exp tilts
# move by < 5e-6 (1/U^2 convergence); logit and probit, whose tilts pile their mass into the last
# bins below u = 1, and BoN_N at N ~ 1000, whose selected density lies inside a few bins, moved
# by 1e-4 to 4e-3 while being 1e-3 to 3e-2 off the truth.
RESOLUTION_TOL = 1e-4
# Bisection bracket on log(theta) for Phi normalised to a unit range.
# The top is large because steep exp-t (t = -400, the far end of `best_t`'s grid) needs
# theta ~ exp(|t| u0) to cut below u0; theta * Phi stays finite in float64 up to log theta ~709.
LOG_THETA_LO, LOG_THETA_HI, BISECTION_STEPS = -20.0, 700.0, 72
GAUSS_NODES = 4
_T_OUTER = np.arange(40.0, 301.0, 10.0)
DEFAULT_T_GRID = np.concatenate([-_T_OUTER[::-1], np.linspace(-30.0, 30.0, 61), _T_OUTER])
_GL_X, _GL_W = np.polynomial.legendre.leggauss(GAUSS_NODES)
_GL_X, _GL_W = (_GL_X + 1.0) / 2.0, _GL_W / 2.0  # nodes and weights on [0, 1]


# ------------------------------------------------------------------------------ validation

def check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) and not (
            isinstance(n, (float, np.floating)) and float(n).is_integer()):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if int(n) < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return int(n)


def check_procedure(procedure: str, n: Any, against: str = "transformed") -> int:
    """Validates (procedure, n, against) and returns n as an int."""
    if procedure not in WIN_RATES:
        raise ValueError(f"unknown procedure {procedure!r}; expected one of {WIN_RATES}")
    if against not in AGAINST:
        raise ValueError(f"unknown against {against!r}; expected one of {AGAINST}")
    n = check_n(n)
    if procedure == "standard" and n != 1:
        raise ValueError(f"procedure 'standard' is the single-sample win rate: n must be 1, got {n}")
    return n


def _positive_finite(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from e
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


# Below this the quadrature's KL is float64 noise (identity's beta off by 2x at KL 1e-16 and
# pinned to the bracket's end below 1e-17); a KL budget that small is no budget.
MIN_KL = 1e-12


def check_kl(kl: Any) -> float:
    kl = _positive_finite("kl", kl)
    if kl < MIN_KL:
        raise ValueError(f"kl must be >= {MIN_KL:g} (below it the KL integral is rounding noise), "
                         f"got {kl!r}")
    return kl


def check_grid(m: Any) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or int(m) < 16:
        raise ValueError(f"grid must be an integer >= 16, got {m!r}")
    return int(m)


def max_resolved_kl(m: int) -> float:
    """Largest KL whose tilted density still spans ~MIN_BINS bins of an U-bin grid."""
    return math.log(m / MIN_BINS) - 1.0


def resolve_transform(transform: str | Transform, **params: Any) -> Transform:
    """A Transform from a registry name (+ params) or a Transform; `raw` is refused. Its values
    are computed in float64 here, so exp's t may pass what float32 RL holds (t > ~38)."""
    if isinstance(transform, str):
        transform = get_transform(transform, float32_range=False, **params)
    elif not isinstance(transform, Transform):
        raise ValueError(f"transform must be a registry name or a Transform, got {transform!r}")
    elif params:
        raise ValueError(f"transform params {sorted(params)} given with a built Transform")
    if transform.uses_raw:
        raise ValueError("transform 'raw' depends on the reward distribution, not only on the "
                         "calibrated reward; use 'logit' (Bradley-Terry) or 'probit' (Gaussian)")
    return transform


# ------------------------------------------------------------------------------ grid maths

def grid(m: int = DEFAULT_GRID) -> np.ndarray:
    """Midpoint grid u_i = (i + 1/2) / U on [0, 1] (float64)."""
    m = check_grid(m)
    return (np.arange(m, dtype=np.float64) + 0.5) / m


def phi_table(transform: str | Transform, m: int = DEFAULT_GRID, **params: Any) -> np.ndarray:
    """Phi(u_i) on the grid, float64."""
    tr = resolve_transform(transform, **params)
    t = tr.params.get("t", 0.0) if tr.name == "exp" else 0.0
    if t <= -transforms.LIMIT_BELOW:
        # (e^{tu} - 1)/t = 1/|t| - e^{tu}/|t|. The constant cancels in every tilt and is left
        # out: float64 rounds 1/|t| - e^{tu}/|t| to 1/|t| near u = 1 once t << 0 (t = -80).
        phi_U = -np.exp(t * grid(m)) / abs(t)
    else:
        with jax.enable_x64(True):
            phi_U = np.asarray(tr.fn(jnp.asarray(grid(m))), np.float64)
    if phi_U.shape != (m,) or not np.all(np.isfinite(phi_U)):
        raise ValueError(f"transform {tr.name!r} gave non-finite or mis-shaped values on the grid")
    return phi_U


def tilted_log_masses(phi_U: Array, beta: Array) -> Array:
    """log p_i, p = softmax(Phi(u) / beta): the KL-RLHF optimum in calibrated space (spec 0)."""
    chex.assert_rank(phi_U, 1)
    return jax.nn.log_softmax(phi_U / beta)


def kl_from_log_masses(logp_U: Array) -> Array:
    """KL(g || Unif) = int g log g = sum_i p_i log(p_i U)."""
    chex.assert_rank(logp_U, 1)
    m = logp_U.shape[0]
    p_U = jnp.exp(logp_U)
    return jnp.sum(p_U * (logp_U + jnp.log(m)))


def win_rate_from_masses(p_U: Array, u_U: Array, procedure: str, n: int,
                         against: str = "transformed") -> Array:
    """Win rate of the piecewise-constant density with bin masses p (spec 1.3 table).

    The grid policy is g = p_i / du on bin i, so G is piecewise linear; each Stieltjes integral of
    the module docstring is computed per bin with GAUSS_NODES-point Gauss-Legendre, e.g. for BoN
        int u^N d(G^N) = sum_i p_i sum_q w_q N u_q^N G(u_q)^(N-1),  G(u_q) = G_i + x_q p_i.
    (A midpoint rule is not enough: BoN_32 of a tilt lives in the top 1/1000 of [0, 1].)
    p need not sum to 1: jax.grad of this function with respect to p is the functional derivative
    delta W / delta g averaged over each bin (spec 1.3), up to an additive constant.
    """
    chex.assert_rank([p_U, u_U], 1)
    chex.assert_equal_shape([p_U, u_U])
    if procedure == "standard" or n == 1:
        return jnp.sum(u_U * p_U)
    m = u_U.shape[0]
    x_Q = jnp.asarray(_GL_X, p_U.dtype)
    w_Q = jnp.asarray(_GL_W, p_U.dtype)
    uq_UxQ = (u_U - 0.5 / m)[:, None] + x_Q[None] / m
    if procedure == "bon":
        lower_U = jnp.cumsum(p_U) - p_U
        cdf_UxQ = lower_U[:, None] + p_U[:, None] * x_Q[None]
        weight_UxQ = uq_UxQ ** n if against == "transformed" else uq_UxQ
    else:
        upper_U = jnp.cumsum(p_U[::-1])[::-1]
        cdf_UxQ = upper_U[:, None] - p_U[:, None] * x_Q[None]  # the tail S = 1 - G
        weight_UxQ = -jnp.expm1(n * jnp.log1p(-uq_UxQ)) if against == "transformed" else uq_UxQ
    inner_U = jnp.sum(w_Q[None] * weight_UxQ * n * cdf_UxQ ** (n - 1), axis=1)
    return jnp.sum(p_U * inner_U)


def as_probability(w: Any) -> np.ndarray:
    """A reported win rate, clipped to [0, 1] (NaN kept): the quadrature's rounding can put one
    ~1e-14 outside (best_t("won", 32, kl=2) gave 1 + 2.3e-14). The differentiable
    `win_rate_from_masses` itself is left unclipped, for its gradient."""
    return np.clip(np.asarray(w, np.float64), 0.0, 1.0)


# ------------------------------------------------------------------------------ batched KL solve

def _normalise(phi_BxM: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top = phi_BxM.max(axis=1, keepdims=True)
    scale = top[:, 0] - phi_BxM.min(axis=1)
    if np.any(scale <= 0):
        raise ValueError("transform is constant on the grid: every beta gives pi_ref (KL 0)")
    return (phi_BxM - top) / scale[:, None], scale


@functools.partial(jax.jit, static_argnames=("procedure", "n", "against"))
def _solve_rows(phin_BxM, u_U, kl, *, procedure, n, against):
    """Bisection on log theta per row for KL(softmax(theta phin)) = kl; win rate at the root."""
    kl_of = jax.vmap(lambda ph, lt: kl_from_log_masses(tilted_log_masses(ph, jnp.exp(-lt))),
                     in_axes=(0, 0))
    b = phin_BxM.shape[0]
    lo = jnp.full((b,), LOG_THETA_LO, phin_BxM.dtype)
    hi = jnp.full((b,), LOG_THETA_HI, phin_BxM.dtype)
    kl_max = kl_of(phin_BxM, hi)

    def body(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        above = kl_of(phin_BxM, mid) > kl
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, body, (lo, hi))
    log_theta = 0.5 * (lo + hi)
    logp_BxM = jax.vmap(tilted_log_masses)(phin_BxM, jnp.exp(-log_theta))
    wins = jax.vmap(lambda lp: win_rate_from_masses(jnp.exp(lp), u_U, procedure, n, against))(
        logp_BxM)
    return log_theta, wins, kl_max


def solve_rows_at_kl(phi_BxM: np.ndarray, kl: float, procedure: str, n: int = 1,
                     against: str = "transformed", names: list[str] | None = None,
                     unreachable: str = "raise") -> tuple[np.ndarray, np.ndarray]:
    """For each row Phi_b of a [B, U] table: (beta_b, win rate_b) at KL(g_beta || Unif) = kl.

    Raises ValueError if kl exceeds the grid's resolution, or if a row cannot reach kl (flat top)
    unless unreachable="nan", which gives NaN for those rows instead.
    """
    kl = check_kl(kl)
    n = check_procedure(procedure, n, against)
    if unreachable not in ("raise", "nan"):
        raise ValueError(f"unreachable must be 'raise' or 'nan', got {unreachable!r}")
    phi_BxM = np.asarray(phi_BxM, np.float64)
    m = phi_BxM.shape[1]
    if kl > max_resolved_kl(m):
        raise ValueError(f"kl={kl} needs densities narrower than {MIN_BINS} bins of a {m}-bin grid "
                         f"(max resolved KL {max_resolved_kl(m):.2f}); raise the grid")
    phin_BxM, scale_B = _normalise(phi_BxM)
    with jax.enable_x64(True):
        log_theta, wins, kl_max = _solve_rows(jnp.asarray(phin_BxM), jnp.asarray(grid(m)),
                                              jnp.asarray(kl), procedure=procedure, n=n,
                                              against=against)
    kl_max = np.asarray(kl_max)
    bad = np.nonzero(kl_max < kl * (1 - 1e-9))[0]
    wins, beta = as_probability(wins), scale_B / np.exp(np.asarray(log_theta))
    if unreachable == "nan":
        wins[bad], beta[bad] = np.nan, np.nan
    elif bad.size:
        who = names[bad[0]] if names else f"row {bad[0]}"
        raise ValueError(f"kl={kl} is unreachable by transform {who}: its KL saturates at "
                         f"{kl_max[bad[0]]:.4g} as beta -> 0 (range(Phi) / beta up to "
                         f"e^{LOG_THETA_HI:g})")
    return beta, wins


# ------------------------------------------------------------------------------ public API

def tilted_density(transform: str | Transform, beta: float, *, grid_size: int = DEFAULT_GRID,
                   **params: Any) -> tuple[np.ndarray, np.ndarray]:
    """(u, g) with g = softmax(Phi(u) / beta) / du, the density of pi / pi_ref over C."""
    beta = _check_beta(beta)
    phi_U = phi_table(transform, grid_size, **params)
    with jax.enable_x64(True):
        logp_U = np.asarray(tilted_log_masses(jnp.asarray(phi_U), beta))
    return grid(grid_size), np.exp(logp_U) * grid_size


def kl_and_win_rate(transform: str | Transform, beta: float, procedure: str = "standard",
                    n: int = 1, *, against: str = "transformed", grid_size: int = DEFAULT_GRID,
                    **params: Any) -> tuple[float, float]:
    """(KL, win rate) of the tilt g proportional to exp(Phi / beta). A beta whose KL is past what
    the grid resolves (`max_resolved_kl`: the tilt within ~MIN_BINS bins, where the grid's KL
    flattens towards log(grid_size)) is refused, as `win_rate_at_kl` refuses such a KL."""
    beta = _check_beta(beta)
    kl, w = _tilt_kl_and_win_rate(transform, beta, procedure, n, against, grid_size, params)
    if not kl <= max_resolved_kl(grid_size):   # NaN too
        raise ValueError(f"beta={beta:g}: KL {kl:.3f} is past what grid {grid_size} resolves "
                         f"(max resolved KL {max_resolved_kl(grid_size):.2f}); raise the grid")
    kl2, w2 = _tilt_kl_and_win_rate(transform, beta, procedure, n, against, 2 * grid_size,
                                    params)
    _check_resolved(transform, f"at beta={beta:g}", procedure, n, grid_size, (kl, kl2), (w, w2))
    return kl, w


def _resolved(kls: tuple[float, float], wins: tuple[float, float]) -> bool:
    """Whether a (KL, win rate) moves by at most RESOLUTION_TOL (the KL relative to max(1, KL))
    from a grid to one twice as fine; False for NaN."""
    return bool(abs(wins[0] - wins[1]) <= RESOLUTION_TOL
                and abs(kls[0] - kls[1]) <= RESOLUTION_TOL * max(1.0, abs(kls[0])))


def _check_resolved(transform: str | Transform, where: str, procedure: str, n: int,
                    grid_size: int, kls: tuple[float, float], wins: tuple[float, float]) -> None:
    """Refuses a result that moves by more than RESOLUTION_TOL on a grid twice as fine."""
    name = transform if isinstance(transform, str) else transform.name
    if not _resolved(kls, wins):
        raise ValueError(
            f"transform {name!r} {where}, {procedure}{n if procedure != 'standard' else ''}: "
            f"grid {grid_size} does not resolve it (KL {kls[0]:.5f} / {kls[1]:.5f}, win rate "
            f"{wins[0]:.5f} / {wins[1]:.5f} on grids {grid_size} / {2 * grid_size}: moved by more "
            f"than {RESOLUTION_TOL:g}); the tilt or the selected density lies within a few bins "
            f"(near u = 1 for logit and probit, or at a large N): a larger grid_size may resolve "
            f"it")


def _tilt_kl_and_win_rate(transform: str | Transform, beta: float, procedure: str, n: int,
                          against: str, grid_size: int, params: dict) -> tuple[float, float]:
    """(KL, win rate) of the tilt on the grid, whether or not the grid resolves it."""
    n = check_procedure(procedure, n, against)
    phi_U = phi_table(transform, grid_size, **params)
    with jax.enable_x64(True):
        logp_U = tilted_log_masses(jnp.asarray(phi_U), beta)
        w = win_rate_from_masses(jnp.exp(logp_U), jnp.asarray(grid(grid_size)), procedure, n,
                                 against)
        return float(kl_from_log_masses(logp_U)), float(as_probability(w))


def curve(transform: str | Transform, betas: Any, procedure: str = "standard", n: int = 1, *,
          against: str = "transformed", grid_size: int = DEFAULT_GRID, **params: Any) -> dict:
    """KL and win rate along a beta sweep: {"beta", "kl", "win_rate"} arrays; NaN at the betas
    whose KL is past what the grid resolves (a warning names them: the curve used to flatten
    there at KL ~ log(grid_size)), or whose KL or win rate moves by more than RESOLUTION_TOL on a
    grid twice as fine."""
    betas = np.asarray(betas, np.float64).reshape(-1)
    pts, fine = ([_tilt_kl_and_win_rate(transform, _check_beta(b), procedure, n, against, m,
                                        params) for b in betas]
                 for m in (grid_size, 2 * grid_size))
    resolved = [kl <= max_resolved_kl(grid_size) and _resolved((kl, kl2), (w, w2))
                for (kl, w), (kl2, w2) in zip(pts, fine)]   # NaN too
    pts = [p if ok else (math.nan, math.nan) for p, ok in zip(pts, resolved)]
    past = [float(b) for b, ok in zip(betas, resolved) if not ok]
    if past:
        warnings.warn(f"curve: {len(past)} of {betas.size} betas ({past[:5]}) give a KL past "
                      f"what grid {grid_size} resolves (max {max_resolved_kl(grid_size):.2f}), "
                      f"or a KL or win rate that moves by more than {RESOLUTION_TOL:g} on a grid "
                      f"twice as fine: NaN there; raise grid_size", stacklevel=2)
    return {"beta": betas, "kl": np.array([p[0] for p in pts]),
            "win_rate": np.array([p[1] for p in pts])}


def beta_at_kl(transform: str | Transform, kl: float, *, grid_size: int = DEFAULT_GRID,
               **params: Any) -> float:
    """The beta at which the tilt by Phi has KL(pi || pi_ref) = kl."""
    name = transform if isinstance(transform, str) else transform.name
    beta, _ = solve_rows_at_kl(phi_table(transform, grid_size, **params)[None], kl, "standard",
                               names=[name])
    return float(beta[0])


def win_rate_at_kl(transform: str | Transform, kl: float, procedure: str = "standard",
                   n: int = 1, *, against: str = "transformed", grid_size: int = DEFAULT_GRID,
                   **params: Any) -> float:
    """Win rate of the Phi-tilt whose KL(pi || pi_ref) equals kl (beta solved by bisection);
    refused when it moves by more than RESOLUTION_TOL on a grid twice as fine."""
    n = check_procedure(procedure, n, against)
    name = transform if isinstance(transform, str) else transform.name
    wins = [float(solve_rows_at_kl(phi_table(transform, m, **params)[None], kl, procedure, n,
                                   against, names=[name])[1][0])
            for m in (grid_size, 2 * grid_size)]
    _check_resolved(transform, f"at KL {kl:g}", procedure, n, grid_size, (kl, kl), tuple(wins))
    return wins[0]


def exp_family_table(t_B: Any, m: int = DEFAULT_GRID) -> np.ndarray:
    """[B, U] table (a row per t in t_B) of the exp family, in a form exact near the top of [0, 1].

    (exp(t u) - 1) / t equals expm1(t (u - 1)) / t (t > 0) or -exp(t u) (t <= -1) up to a
    positive scale and a shift, i.e. the same tilts; these forms avoid the cancellation
    1/|t| - tiny near u = 1 for t << 0 (and |t| < 1e-8 is the identity).
    """
    t_B = np.asarray(t_B, np.float64).reshape(-1)
    if not np.all(np.isfinite(t_B)):
        raise ValueError(f"t must be finite, got {t_B}")
    u_U = grid(m)[None]
    t = t_B[:, None]
    safe_t = np.where(np.abs(t) < 1e-8, 1.0, t)
    with np.errstate(over="ignore"):  # overflow only in branches that np.where discards
        return _exp_rows(t, safe_t, u_U)


def _exp_rows(t, safe_t, u_U):
    small_neg = -np.expm1(safe_t * u_U) / np.abs(safe_t)  # exact for small |t|, t < 0
    return np.where(np.abs(t) < 1e-8, u_U,
                    np.where(t > 0, np.expm1(safe_t * (u_U - 1.0)) / safe_t,
                             np.where(t > -1.0, small_neg, -np.exp(safe_t * u_U))))


def best_t(procedure: str, n: int, kl: float, t_grid: Any = None, *, against: str = "transformed",
           grid_size: int = DEFAULT_GRID, refine: int = 2) -> tuple[float, float]:
    """(t, win rate) of the best exp-t transform (exp(t u) - 1) / t at KL budget kl.

    A coarse t grid (default -30..30 step 1, then step 10 out to +-300: BoN_32 wants t > 100,
    cut at |t| <= grid_size / 10, beyond which the tilt's action lies inside ~10 bins of the
    grid), extended geometrically while the best t is on its edge and below that limit (a
    warning says when the limit binds, or when a given t_grid's best t lies beyond it), then
    `refine` rounds of a 21-point grid spanning the neighbours of the current best, each 10x
    finer.
    """
    n = check_procedure(procedure, n, against)
    kl = check_kl(kl)
    t_B = DEFAULT_T_GRID if t_grid is None else np.asarray(t_grid, np.float64)
    if t_B.ndim != 1 or t_B.size < 1 or not np.all(np.isfinite(t_B)):
        raise ValueError(f"t_grid must be a 1-D array of finite values, got {t_grid!r}")
    t_B = np.unique(t_B)
    names = {"procedure": procedure, "n": n, "against": against, "unreachable": "nan"}
    t_max = grid_size / 10.0  # |t| beyond this puts the reward's action inside ~10 bins
    if t_grid is None:   # the default grid's +-300 is past the limit of grids below 3000
        t_B = t_B[np.abs(t_B) <= t_max]

    def evaluate(ts):
        _, wins = solve_rows_at_kl(exp_family_table(ts, grid_size), kl, **names)
        if np.all(np.isnan(wins)):
            raise ValueError(f"kl={kl} is unreachable by every exp-t with t in {ts}")
        return wins

    wins = evaluate(t_B)
    k = int(np.nanargmax(wins))
    # The best t sits on an edge of the grid: extend it geometrically while the grid resolves it.
    while t_grid is None and k in (0, t_B.size - 1) and abs(t_B[k]) * 1.1 < t_max:
        edge = t_B[k]
        extra = np.sign(edge) * np.geomspace(abs(edge) * 1.1, min(abs(edge) * 3, t_max), 8)
        t_B = np.unique(np.concatenate([t_B, extra]))
        wins = evaluate(t_B)
        k = int(np.nanargmax(wins))
    if (t_grid is None and k in (0, t_B.size - 1)) or abs(t_B[k]) > t_max:
        warnings.warn(f"best_t({procedure}, n={n}, kl={kl}): best t={t_B[k]:g} is at or past "
                      f"|t| = {t_max:g}, the edge that grid {grid_size} resolves; use a larger "
                      f"grid_size", stacklevel=2)
    for _ in range(refine):
        lo, hi = t_B[max(k - 1, 0)], t_B[min(k + 1, t_B.size - 1)]
        t_B = np.linspace(lo, hi, 21)
        wins = evaluate(t_B)
        k = int(np.nanargmax(wins))
    return float(t_B[k]), float(wins[k])


def _check_beta(beta: Any) -> float:
    return _positive_finite("beta", beta)
