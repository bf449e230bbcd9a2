"""Checking a step's split form (`core.types.SplitStep`) against its whole form under the
non-finite guard (`loops.train.guard_nonfinite`)."""

from __future__ import annotations

import jax
import numpy as np


def run_both_guarded(whole_step, split_step, state, frozen, bad_frozen, batch, steps: int = 4,
                     bad_step: int = 1, state_atol: float = 1e-6):
    """Runs the two jitted guarded steps side by side from `state` for `steps` steps, step
    `bad_step` with `bad_frozen` (a NaN reward), and asserts at every step: the same skip (only
    the bad step), the step counter advanced, every state leaf equal (rtol 1e-5, `state_atol`),
    the same metric keys and NaN pattern, and every metric equal (rtol 1e-5, atol 1e-6).
    Returns the whole step's final state."""
    a = b = state
    for i in range(steps):
        fz = bad_frozen if i == bad_step else frozen
        a, ma = whole_step(a, fz, batch, jax.random.key(i))
        b, mb = split_step(b, fz, batch, jax.random.key(i))
        assert int(ma["skipped"]) == int(mb["skipped"]) == (i == bad_step)
        assert int(a.step) == int(b.step) == i + 1
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=state_atol)
        np.testing.assert_equal({k: np.isnan(np.asarray(v)) for k, v in ma.items()},
                                {k: np.isnan(np.asarray(v)) for k, v in mb.items()})
        for k in ma:
            np.testing.assert_allclose(np.asarray(ma[k]), np.asarray(mb[k]), rtol=1e-5, atol=1e-6,
                                       err_msg=k)
    return a
