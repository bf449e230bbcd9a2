"""Comparing parameters that two computations of the same step (other shardings, a shared-prompt
pass) moved with Adam.

Adam's step for one entry is lr * m_hat / (sqrt(v_hat) + eps): normalised, so where an entry's
gradient is within rounding of 0 (or of eps), rounding decides the step's size and sign. Two
computations that agree on the gradient up to float rounding can then disagree on such an entry by
up to twice the step, while every other entry agrees to rounding. So the parameters are compared
twice: every entry within Adam's largest possible displacement, and all but a small fraction of
the entries to a tight tolerance. Whether the gradients themselves agree is for the caller to
check tightly through the step's metrics (loss, grad_norm, KL).
"""

from __future__ import annotations

import jax
import numpy as np


def adam_step_bound(t: int, b1: float = 0.9, b2: float = 0.999) -> float:
    """The largest |m_hat| / sqrt(v_hat) of `optax.adam` (bias-corrected, eps -> 0) at update t
    over every gradient sequence: m_hat = sum_k w_k g_k and v_hat = sum_k u_k g_k^2, so by
    Cauchy-Schwarz the ratio is at most sqrt(sum_k w_k^2 / u_k) (1 at t = 1, 1.007 at t = 4)."""
    k = np.arange(t)                                    # k updates before the last
    w = (1 - b1) * b1 ** k / (1 - b1 ** t)
    u = (1 - b2) * b2 ** k / (1 - b2 ** t)
    return float(np.sqrt(np.sum(w ** 2 / u)))


def assert_agree_after_adam(got, want, *, learning_rate: float, updates: int,
                            min_fraction: float, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Every entry of the trees `got` and `want` within 2 x Adam's largest displacement over
    `updates` updates of step size <= `learning_rate`, and at least `min_fraction` of each leaf's
    entries within rtol / atol."""
    bound = 2 * learning_rate * sum(adam_step_bound(t) for t in range(1, updates + 1))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        diff = np.abs(a - b)
        assert diff.max() <= bound, (diff.max(), bound)
        close = np.isclose(a, b, rtol=rtol, atol=atol).mean()
        assert close >= min_fraction, (close, min_fraction)
