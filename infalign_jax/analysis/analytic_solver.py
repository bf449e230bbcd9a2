"""The optimal transform of InfAlign (spec 1.3): the coupled fixed point in calibrated space.

For a rank-based procedure T the KL-regularised objective J(g) = W(g) - beta KL(g) over densities
g on [0, 1] is maximised by g* proportional to exp(Phi*(u) / beta) with
    Phi*(v) = delta W / delta g(v) evaluated at g*        (InfAlign's reward transformation),
e.g. for BoN_N, Phi*(v) = -N^2 int_v^1 (u G(u))^(N-1) du. Here Phi* is `jax.grad` of the
discretised win rate (`analytic.win_rate_from_masses`) with respect to the bin masses, which
equals the closed forms of the spec table up to an additive constant (checked in the tests).

Solver (spec 1.3 "Solver used here"):
  1. damped log-space iteration log p <- 0.7 log p + 0.3 log softmax(Phi*(p) / beta), until the
     largest change of log p is below `tol`;
  2. where that does not converge (BoN with large N at small beta oscillates), the same damped
     map with Anderson acceleration (memory 8), from the uniform start;
  3. where that fails too, L-BFGS (optax) on the softmax logits of -J.
For BoN, J is strictly concave (unique optimum); for WoN, W is convex in g, so the solution is a
stationary point that we check against the best exp-t transform (optimum >= every exp-t).

`optimal_win_rate_at_kl` meets a KL budget by a safeguarded secant search on log beta (KL of the
optimum is decreasing in beta), warm-starting each solve from the previous one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax.analysis import analytic as A
from infalign_jax.infra.files import write_npz

DAMPING = 0.3
SATURATED = 1e-6  # win rates this close to 1 make the fixed point degenerate
MARCH_STEP = 0.35  # log-beta step of the continuation in optimal_at_kl
START_DECADES = 15  # optimal_at_kl: decades above the first guess of beta tried for a start


@dataclasses.dataclass(frozen=True)
class OptimalSolution:
    """The optimum at one beta: grid, density, Phi* table, KL, win rate and solver report."""
    beta: float
    u: np.ndarray
    g: np.ndarray
    phi: np.ndarray
    kl: float
    win_rate: float
    method: str
    iterations: int
    residual: float


def functional_derivative(p_U: jax.Array, u_U: jax.Array, procedure: str, n: int,
                          against: str = "transformed") -> jax.Array:
    """Phi*(u_i) = dW/dp_i: delta W / delta g (spec 1.3 table), up to an additive constant."""
    return jax.grad(A.win_rate_from_masses)(p_U, u_U, procedure, n, against)


def _objective(logits_U, u_U, beta, procedure, n, against):
    logp_U = jax.nn.log_softmax(logits_U)
    w = A.win_rate_from_masses(jnp.exp(logp_U), u_U, procedure, n, against)
    return w - beta * A.kl_from_log_masses(logp_U)


@functools.partial(jax.jit, static_argnames=("procedure", "n", "against", "max_iter"))
def _fixed_point(logp_U, u_U, beta, tol, *, procedure, n, against, max_iter):
    def target(logp):
        phi = functional_derivative(jnp.exp(logp), u_U, procedure, n, against)
        return jax.nn.log_softmax(phi / beta)

    def cond(state):
        _, it, delta = state
        return (it < max_iter) & (delta > tol) & jnp.isfinite(delta)

    def body(state):
        logp, it, _ = state
        new = jax.nn.log_softmax((1.0 - DAMPING) * logp + DAMPING * target(logp))
        return new, it + 1, jnp.max(jnp.abs(new - logp))

    # Start "not converged" with a finite delta: a non-finite one stops the loop (divergence).
    return jax.lax.while_loop(cond, body, (logp_U, 0, jnp.asarray(1e300, logp_U.dtype)))


@functools.partial(jax.jit, static_argnames=("procedure", "n", "against", "max_iter", "memory"))
def _anderson(logp_U, u_U, beta, tol, *, procedure, n, against, max_iter, memory=8):
    """Anderson-accelerated (type II) damped iteration on log p, for the oscillating cases."""
    m = logp_U.shape[0]

    def residual(x):
        phi = functional_derivative(jnp.exp(x), u_U, procedure, n, against)
        return jax.nn.log_softmax(phi / beta) - x

    def cond(state):
        it, delta = state[-2], state[-1]
        return (it < max_iter) & (delta > tol) & jnp.isfinite(delta)

    def body(state):
        x, x_prev, f_prev, dx_UxW, df_UxW, it, _ = state
        f = residual(x)
        col = it % memory
        have = it > 0
        dx_UxW = jnp.where(have, dx_UxW.at[:, col].set(x - x_prev), dx_UxW)
        df_UxW = jnp.where(have, df_UxW.at[:, col].set(f - f_prev), df_UxW)
        gram = df_UxW.T @ df_UxW
        reg = 1e-10 * jnp.trace(gram) + 1e-300
        gamma = jnp.linalg.solve(gram + reg * jnp.eye(memory), df_UxW.T @ f)
        new = x + DAMPING * f - (dx_UxW + DAMPING * df_UxW) @ gamma
        return (jax.nn.log_softmax(new), x, f, dx_UxW, df_UxW, it + 1, jnp.max(jnp.abs(f)))

    zeros = jnp.zeros((m, memory), logp_U.dtype)
    init = (logp_U, logp_U, jnp.zeros_like(logp_U), zeros, zeros, 0,
            jnp.asarray(1e300, logp_U.dtype))
    x, *_, it, delta = jax.lax.while_loop(cond, body, init)
    return x, it, delta


@functools.partial(jax.jit, static_argnames=("procedure", "n", "against", "max_iter"))
def _lbfgs(logits_U, u_U, beta, tol, *, procedure, n, against, max_iter):
    def loss(z):
        return -_objective(z, u_U, beta, procedure, n, against)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def cond(state):
        _, _, it, gnorm = state
        return (it < max_iter) & (gnorm > tol)

    def body(state):
        z, opt_state, it, _ = state
        value, grad = value_and_grad(z, state=opt_state)
        updates, opt_state = opt.update(grad, opt_state, z, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(z, updates), opt_state, it + 1, jnp.max(jnp.abs(grad))

    init = (logits_U, opt.init(logits_U), 0, jnp.asarray(jnp.inf, logits_U.dtype))
    z, _, it, gnorm = jax.lax.while_loop(cond, body, init)
    return jax.nn.log_softmax(z), it, gnorm


def solve_optimal(procedure: str, n: int, beta: float, *, against: str = "transformed",
                  grid_size: int = A.DEFAULT_GRID, init_logp: np.ndarray | None = None,
                  tol: float = 1e-10, max_iter: int = 3000) -> OptimalSolution:
    """The optimal policy density and transform Phi* for (procedure, n) at KL coefficient beta."""
    n = A.check_procedure(procedure, n, against)
    beta = A._check_beta(beta)
    m = A.check_grid(grid_size)
    u = A.grid(m)
    kw = dict(procedure=procedure, n=n, against=against)
    with jax.enable_x64(True):
        u_U = jnp.asarray(u)
        logp0 = (jnp.full((m,), -math.log(m)) if init_logp is None
                 else jax.nn.log_softmax(jnp.asarray(init_logp, jnp.float64)))
        # Where the damped map converges it does so in < 150 steps; past that it oscillates.
        logp, it, delta = _fixed_point(logp0, u_U, beta, tol, max_iter=min(max_iter, 400), **kw)
        method, iters, residual = "fixed_point", int(it), float(delta)
        if not residual <= tol:
            logp, it, delta = _anderson(logp0, u_U, beta, tol, max_iter=max_iter, **kw)
            method, iters, residual = "anderson", iters + int(it), float(delta)
        if not residual <= tol:
            start = logp if bool(jnp.all(jnp.isfinite(logp))) else logp0
            # Gradient of -J wrt the logits is p * (centred Phi* - beta log(p U)): scale tol by 1/U.
            logp, it, gnorm = _lbfgs(start, u_U, beta, tol / m, max_iter=max_iter, **kw)
            method, iters, residual = "lbfgs", iters + int(it), float(gnorm) * m
        p_U = jnp.exp(logp)
        phi = functional_derivative(p_U, u_U, **kw)
        # Validate any method by the fixed-point equation itself, on the bins where the equation
        # puts mass (a collapsed L-BFGS vertex has vanishing gradients but fails this).
        target = jax.nn.log_softmax(phi / beta)
        check = float(jnp.max(jnp.where(target > -40.0, jnp.abs(target - logp), 0.0)))
        if not check <= 1e-6:
            raise RuntimeError(f"optimal solver did not converge for {procedure} n={n} "
                               f"beta={beta:g} ({method}): fixed-point residual {check:.3g}")
        win = A.win_rate_from_masses(p_U, u_U, **kw)
        kl = A.kl_from_log_masses(logp)
        phi = np.asarray(phi - jnp.max(phi))
        return OptimalSolution(beta=beta, u=u, g=np.asarray(p_U) * m, phi=phi, kl=float(kl),
                               win_rate=float(A.as_probability(win)), method=method,
                               iterations=iters, residual=residual)


class UnresolvedOptimum(RuntimeError):
    """The optimum's win rate moves by more than analytic.RESOLUTION_TOL on a grid twice as fine."""


def optimal_at_kl(kl: float, procedure: str, n: int = 1, *, against: str = "transformed",
                  grid_size: int = A.DEFAULT_GRID, rtol: float = 1e-7,
                  max_solves: int = 100) -> OptimalSolution:
    """The optimum whose KL(pi* || pi_ref) equals kl (continuation in log beta, then regula falsi).

    The two phases are one root-finder in x = log beta that shares its iterates, warm starts and
    solve budget (the regula falsi is `_illinois`, given what the march left of the budget).
    The optimum is solved again on a grid twice as fine (warm-started from this one); a win rate
    that moves by more than analytic.RESOLUTION_TOL is refused (`UnresolvedOptimum`): BoN_32's
    optimum lies within a few bins of u = 1 and at grid 4000 read 0.99816 at KL 1 for 0.99871.
    """
    kl = A.check_kl(kl)
    n = A.check_procedure(procedure, n, against)
    m = A.check_grid(grid_size)
    if kl > A.max_resolved_kl(m):
        raise ValueError(f"kl={kl} exceeds the grid's resolution (max {A.max_resolved_kl(m):.2f} "
                         f"for grid {m}); raise the grid")
    kw = dict(against=against, rtol=rtol, max_solves=max_solves)
    sol = _optimal_at_kl(kl, procedure, n, m, **kw)
    fine = _optimal_at_kl(kl, procedure, n, 2 * m, start=sol, **kw)
    if not A._resolved((sol.kl, fine.kl), (sol.win_rate, fine.win_rate)):
        raise UnresolvedOptimum(
            f"optimal_at_kl: grid {m} does not resolve the optimum of {procedure} n={n} at "
            f"kl={kl}: win rate {sol.win_rate:.6f} on grid {m}, {fine.win_rate:.6f} on grid "
            f"{2 * m} (moved by more than {A.RESOLUTION_TOL:g}); a larger grid_size may resolve it")
    return sol


def _optimal_at_kl(kl: float, procedure: str, n: int, m: int, *, against: str, rtol: float,
                   max_solves: int, start: OptimalSolution | None = None) -> OptimalSolution:
    """optimal_at_kl on one grid of m bins, from `start` (a solution on the grid of m / 2 bins:
    its beta, and its density repeated to this grid) when given."""
    if start is None:
        # Initial beta: tilt by Phi* at g = 1 (pi = pi_ref), which is exact for n = 1.
        with jax.enable_x64(True):
            phi0 = np.asarray(functional_derivative(
                jnp.full((m,), 1.0 / m), jnp.asarray(A.grid(m)), procedure, n, against))
        beta0 = A.solve_rows_at_kl(phi0[None], kl, "standard")[0][0]
        first = None
    else:
        beta0, first = start.beta, np.repeat(start.g, 2)

    def solve(x, init):
        g = init if init is None or isinstance(init, np.ndarray) else init.g
        sol = solve_optimal(procedure, n, math.exp(x), against=against, grid_size=m,
                            init_logp=None if g is None else np.log(np.maximum(g / m, 1e-300)))
        return sol, math.log(sol.kl) - math.log(kl)

    # 0) Start: the n = 1 guess can be decades too small for other procedures (Worst-of-32:
    #    1e-13 where the optimum at KL 0.2 has beta ~1e-3), where the solver fails; larger beta
    #    is closer to pi_ref and converges, so step up a decade at a time until a solve does.
    x = math.log(beta0)
    for tries in range(START_DECADES + 1):
        try:
            sol, f = solve(x, first if tries == 0 else None)
            break
        except RuntimeError as err:
            if tries == START_DECADES:
                raise RuntimeError(f"optimal_at_kl: no converged optimum for {procedure} n={n} "
                                   f"from beta {beta0:.3g} to {math.exp(x):.3g}") from err
            x += math.log(10.0)
    # 1) Continuation in log beta (small steps, each warm-started) until kl is bracketed;
    #    f = log KL - log kl is decreasing in x = log beta.
    step, solves = MARCH_STEP, 1
    while abs(f) >= rtol:
        direction = 1.0 if f > 0 else -1.0
        if direction < 0 and sol.win_rate > 1.0 - SATURATED:
            raise RuntimeError(
                f"frontier saturated for {procedure} n={n}: win rate {sol.win_rate:.10f} already "
                f"at KL {sol.kl:.4g} < {kl}; the optimum at kl is within {SATURATED:g} of 1")
        try:
            new_sol, new_f = solve(x + direction * step, sol)
        except RuntimeError as err:
            step /= 2
            if step < 1e-3:
                raise RuntimeError(
                    f"optimal_at_kl: kl={kl} not reached for {procedure} n={n}: the solver "
                    f"converges up to KL {sol.kl:.4g} (beta {math.exp(x):.3g}, win rate "
                    f"{sol.win_rate:.10f}, 1 - W = {1.0 - sol.win_rate:.2g}) and fails "
                    f"beyond it") from err
            continue
        solves += 1
        if solves > max_solves:
            raise RuntimeError(f"optimal_at_kl: kl={kl} not bracketed ({procedure}, n={n})")
        if (new_f > 0) != (f > 0):
            break
        x, sol, f = x + direction * step, new_sol, new_f
    else:
        return sol
    # 2) Illinois regula falsi inside the bracket [a (KL too big), b (KL too small)].
    pts = sorted([(x, f, sol), (x + direction * step, new_f, new_sol)], key=lambda t: t[0])
    return _illinois(solve, pts[0], pts[1], rtol, max_solves - solves,
                     f"kl={kl} ({procedure}, n={n})")


def _illinois(solve: Callable[[float, Any], tuple[Any, float]], lo: tuple, hi: tuple,
              rtol: float, max_solves: int, what: str) -> Any:
    """The Illinois variant of regula falsi for a decreasing residual f bracketed by lo = (x,
    f > 0, solution) and hi = (x, f < 0, solution); `solve(x, warm start) -> (solution, f)`.
    Returns the solution of the first iterate with |f| < rtol (a RuntimeError naming `what`
    after `max_solves` solves)."""
    (a, fa, sa), (b, fb, sb) = lo, hi
    # ta, tb: the true residuals, for the stopping test and the answer; fa, fb: the weights of
    # the interpolation, which Illinois halves on the side that stays (halving the residual the
    # test reads stopped at points whose true |f| was above rtol)
    ta, tb = fa, fb
    side, solves = 0, 0
    while abs(tb) >= rtol and abs(ta) >= rtol:
        c = b - fb * (b - a) / (fb - fa)
        sc, fc = solve(c, sa if abs(c - a) < abs(c - b) else sb)
        solves += 1
        if solves > max_solves:
            raise RuntimeError(f"optimal_at_kl: no convergence for {what}")
        if fc > 0:
            a, fa, ta, sa = c, fc, fc, sc
            if side == -1:
                fb /= 2
            side = -1
        else:
            b, fb, tb, sb = c, fc, fc, sc
            if side == 1:
                fa /= 2
            side = 1
    return sa if abs(ta) < rtol else sb


def optimal_win_rate_at_kl(kl: float, procedure: str, n: int = 1, *, against: str = "transformed",
                           grid_size: int = A.DEFAULT_GRID) -> float:
    """The optimal frontier: the largest win rate of any policy with KL(pi || pi_ref) = kl."""
    return optimal_at_kl(kl, procedure, n, against=against, grid_size=grid_size).win_rate


def optimal_transform_table(kl: float, procedure: str, n: int = 1, *, against: str = "transformed",
                            grid_size: int = A.DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """(u, phi / beta) of the optimum at KL budget kl, for get_transform("optimal", u=, phi=).

    The table is scaled by 1/beta, so that the registry transform reproduces the optimum at
    beta = 1 (and the whole frontier for other beta only approximately: Phi* depends on beta).
    """
    sol = optimal_at_kl(kl, procedure, n, against=against, grid_size=grid_size)
    return sol.u, sol.phi / sol.beta


def save_optimal_table(path: str, u: np.ndarray, phi: np.ndarray) -> str:
    """Writes the table as .npz with keys `u`, `phi` (the registry's `optimal` path= format),
    atomically; ".npz" is appended to `path` unless it ends in it. Returns the file's path."""
    path = path if path.endswith(".npz") else path + ".npz"
    return write_npz(path, u=np.asarray(u, np.float64), phi=np.asarray(phi, np.float64))


def exp_family_gap(procedure: str, n: int, kl: float, *, against: str = "transformed",
                   grid_size: int = A.DEFAULT_GRID) -> dict:
    """Best exp-t transform vs the optimum at KL budget kl: t, both win rates and the gap."""
    t, w_t = A.best_t(procedure, n, kl, against=against, grid_size=grid_size)
    w_opt = optimal_win_rate_at_kl(kl, procedure, n, against=against, grid_size=grid_size)
    return {"t": t, "win_rate_exp": w_t, "win_rate_optimal": w_opt, "gap": w_opt - w_t}
