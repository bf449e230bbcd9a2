"""Random values for every parameter leaf: zero-initialised heads and unit norms would hide
mistakes (a reward head at 0 scores every sequence 0)."""

from __future__ import annotations

import jax


def randomise(params, seed: int = 0, scale: float = 0.3):
    """`params` with N(0, scale^2) noise added to every leaf."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
