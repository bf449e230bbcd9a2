"""What the non-finite guard costs in the update's memory, at SmolLM2-135M's parameter shapes.

    .venv/bin/python bench/guard_memory.py

The non-finite guard (`loops.train.guard_nonfinite`) keeps the old state where the new one is not
finite. Guarding a whole step's new state holds old and new state together until the branch; a
`SplitStep` (the trainer's, where the update is one optimiser step) computes the update once for
the check and again inside the branch, in place. This compiles one Adam update
(`rl.make_optimizer` with the RL defaults: global-norm clipping, Adam) of the SmolLM2-135M
parameter tree (its config, `smollm2_weights.SMOLLM2_135M_CONFIG`; shapes only, no weights: a
stand-in gradient, sin(params + x), so the numbers are the update's own) with the state donated,
under the ways of guarding it, and prints `compiled.memory_analysis()`'s temp and the compile time:

  unguarded       the update alone
  whole step      `lax.cond(ok, new, old)` on the checked new state (the guard of a plain step)
  where           a select per leaf between new and old state
  split step      the update computed once for the check only, then again inside
                  `lax.cond(ok, update, keep)` from the gradients (the guard of a SplitStep)

Each guarded variant is also run on finite and on NaN input and compared with the unguarded
update (equal where finite, the old state kept where not). CPU figures: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import smollm2_weights  # noqa: E402
from infalign_jax import models, rl  # noqa: E402
from infalign_jax.core.types import SplitStep  # noqa: E402
from infalign_jax.loops.train import all_finite, guard_nonfinite  # noqa: E402
from infalign_jax.models import hf_import  # noqa: E402


def main():
    cfg = hf_import.config_from_hf(smollm2_weights.SMOLLM2_135M_CONFIG, source="bench")
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    opt = rl.make_optimizer(rl.RLConfig())
    state = rl.RLState(params, opt.init(params), jnp.zeros((), jnp.int32))

    def prepare(st, x):   # a stand-in gradient and metric
        return jax.tree.map(lambda a: jnp.sin(a + x), st.params), {"m": x}

    def apply(st, g):
        u, o = opt.update(g, st.opt_state, st.params)
        return rl.RLState(optax.apply_updates(st.params, u), o, st.step + 1)

    def step(st, x):
        g, metrics = prepare(st, x)
        return apply(st, g), metrics

    def where(st, x):   # the alternative to one branch: a select per leaf
        new, metrics = step(st, x)
        ok = all_finite(new, metrics)
        kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, st)
        return kept._replace(step=st.step + 1), {**metrics, "skipped": (~ok).astype(jnp.int32)}

    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"SmolLM2-135M parameter tree: {len(jax.tree.leaves(params))} leaves, {n / 1e6:.1f}M "
          f"parameters, state (params + Adam) {3 * n * 4 / 2**30:.2f} GiB; "
          f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})")
    ref = jax.jit(step)(state, jnp.float32(1.0))[0]
    for name, fn in (("unguarded", step), ("whole step", guard_nonfinite(step)),
                     ("where", where), ("split step", guard_nonfinite(SplitStep(prepare, apply)))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, jnp.float32(1.0)).compile()
        seconds = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        run = jax.jit(fn)
        got, _ = run(state, jnp.float32(1.0))
        same = all(bool(jnp.array_equal(a, b)) for a, b in
                   zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
        kept, met = run(state, jnp.float32(np.nan))
        held = all(bool(jnp.array_equal(a, b)) for a, b in
                   zip(jax.tree.leaves(kept.params), jax.tree.leaves(state.params)))
        guard = "" if name == "unguarded" else (
            f"  NaN input: old state kept {held and int(met['skipped']) == 1}")
        print(f"{name:12s} temp {mem.temp_size_in_bytes / 2**30:5.2f} GiB  compile {seconds:4.1f} s"
              f"  finite input: equals the unguarded update {same}{guard}")


if __name__ == "__main__":
    main()
