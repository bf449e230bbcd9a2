"""Matching a trained policy's KL to a target by moving along its line from pi_ref in weight space.

A short run's KL(pi || pi_ref) scatters widely across seeds even under the adaptive beta
controller (16 LoRA steps: 0.53 to 0.98 nats at one beta), and a comparison of methods at matched
KL needs every policy at the same KL. `match_kl` evaluates the trained policy, and while its
held-out KL is farther than `band` (relative) from the target, evaluates instead

    theta(alpha) = theta_ref + alpha * (theta - theta_ref)

(with LoRA: the adapters' product scaled by alpha), alpha chosen by `next_alpha`. Near pi_ref the
KL is quadratic in alpha (KL ~ alpha^2 * delta' F delta / 2), so the first guess is
alpha = sqrt(target / KL(1)); after that the exponent is fitted to the last two evaluations.
alpha = 0 is pi_ref itself, alpha = 1 the trained policy; alpha > 1 extrapolates along the
training direction (capped at `max_alpha`). The same move towards the initialisation trades KL for
reward in WARP's LITI (Rame et al., 2024, "WARP: On the Benefits of Weight Averaged Rewarded
Policies"). Where the KL is exact (no sampling), `alpha_at_kl` bisects for it instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

MAX_ALPHA = 2.0   # the farthest extrapolation along the training direction


def interpolate(ref_params: Any, params: Any, alpha: float) -> Any:
    """theta_ref + alpha (theta - theta_ref), leaf by leaf, in each leaf's dtype."""
    def one(r, p):
        r, p = np.asarray(r), np.asarray(p)
        if not jnp.issubdtype(p.dtype, jnp.floating):   # bfloat16 too
            if not np.array_equal(r, p):
                raise ValueError("a non-float parameter differs between the policy and pi_ref")
            return p
        return (r + alpha * (p.astype(np.float64) - r)).astype(p.dtype)
    return jax.tree.map(one, ref_params, params)


def next_alpha(history: list[tuple[float, float]], target: float, max_alpha: float = MAX_ALPHA
               ) -> float:
    """The next alpha from the evaluated (alpha, KL) pairs (alpha > 0, KL > 0): KL = c alpha^p
    with p = 2 from one point, or p fitted (in [1, 4]) to the last two. Once two evaluations
    bracket the target, inside the tightest bracket: the power law through its ends (any p > 0),
    or the geometric mean of the two alphas where KL does not grow with alpha there."""
    below = [(a, k) for a, k in history if 0 < k < target]
    above = [(a, k) for a, k in history if k > target]
    if below and above:
        (a0, k0), (a1, k1) = max(below), min(above)
        if a0 >= a1:   # KL does not grow with alpha there
            return float(math.sqrt(a0 * a1))
        p = math.log(k1 / k0) / math.log(a1 / a0)   # > 0: k1 > k0 and a1 > a0
        return float(a0 * (target / k0) ** (1.0 / p))
    a1, k1 = history[-1]
    p = 2.0
    if len(history) >= 2:
        a0, k0 = history[-2]
        if a0 != a1 and k0 > 0 and k1 > 0:
            p = math.log(k1 / k0) / math.log(a1 / a0)
            p = min(max(p, 1.0), 4.0) if math.isfinite(p) else 2.0
    return float(min(a1 * (target / k1) ** (1.0 / p), max_alpha))


def alpha_at_kl(kl_of: Callable[[float], float], target: float, rtol: float = 1e-6,
                max_alpha: float = MAX_ALPHA, max_evaluations: int = 80) -> float | None:
    """The alpha in (0, max_alpha] at which an *exact* KL along the line (`kl_of(alpha)`, 0 at
    alpha = 0) equals `target` to `rtol`, by bisection between 0 and the first of 1, max_alpha
    whose KL exceeds the target; None when KL(max_alpha) does not reach it. For KLs computed
    without sampling noise (the exact task's enumeration); sampled ones are `match_kl`'s."""
    if not target > 0:
        raise ValueError(f"alpha_at_kl needs target > 0, got {target}")
    lo, hi = 0.0, None
    for end in (1.0, max_alpha):
        kl = kl_of(end)
        if abs(kl / target - 1) <= rtol:
            return end
        if kl > target:
            hi = end
            break
        lo = end
    if hi is None:
        return None
    for _ in range(max_evaluations):
        mid = 0.5 * (lo + hi)
        kl = kl_of(mid)
        if abs(kl / target - 1) <= rtol:
            return mid
        lo, hi = (mid, hi) if kl < target else (lo, mid)
    raise RuntimeError(f"alpha_at_kl: KL {target} not reached to rtol {rtol} in "
                       f"{max_evaluations} bisections (bracket [{lo}, {hi}])")


def match_kl(evaluate: Callable[[Any], dict[str, Any]], ref_params: Any, params: Any,
             target: float, band: float, tries: int = 2, max_alpha: float = MAX_ALPHA,
             log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """`evaluate(params)` (returning per-prompt "kl_B" among its entries) of the trained policy
    and, while its KL is more than `band` (relative) from `target`, of up to `tries`
    interpolations; returns the evaluation nearest the target with "alpha" (its weight) and
    "alpha_history_Ax2" (every (alpha, KL) evaluated) added."""
    if not target > 0 or not band > 0:
        raise ValueError(f"match_kl needs target > 0 and band > 0, got {target}, {band}")
    got = evaluate(params)
    best, best_alpha = got, 1.0
    history = [(1.0, float(got["kl_B"].mean()))]
    for _ in range(tries):
        alpha, kl = history[-1]
        if abs(kl / target - 1) <= band:
            break
        if not math.isfinite(kl):
            log(f"KL {kl} at alpha {alpha:g}: not finite; the nearest evaluation kept")
            break
        if kl <= 0:
            log(f"KL {kl:.3g} at alpha {alpha:g}: no direction to scale; kept")
            break
        new = next_alpha(history, target, max_alpha)
        if new == alpha:
            break
        got = evaluate(interpolate(ref_params, params, new))
        history.append((new, float(got["kl_B"].mean())))
        log(f"alpha {new:.3f}: KL {history[-1][1]:.3f} (target {target:.3f})")
        if abs(history[-1][1] / target - 1) < abs(float(best["kl_B"].mean()) / target - 1):
            best, best_alpha = got, new
    return {**best, "alpha": np.float64(best_alpha),
            "alpha_history_Ax2": np.asarray(history, np.float64)}
