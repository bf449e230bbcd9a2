"""Tiny deterministic "training" run that checkpoints every step; killed and restarted by
`tests/test_checkpointing.py::test_kill_and_resume_matches_uninterrupted_run`.

Each step draws noise from a typed PRNG key, reads one row of a fixed data table at the data
position, and takes an optax SGD-with-momentum step on the quadratic
``0.5 * ||w - (row + noise)||^2``. Everything the next step depends on -- parameters, optimiser
state, step, key and data position -- is in the checkpoint, so a resumed run must end bitwise
equal to an uninterrupted one.

Usage: ``python _ckpt_worker.py WORKDIR NUM_STEPS OUT_NPZ [BALLAST_FLOATS]``. ``BALLAST_FLOATS``
random float32s are saved with every step so that a save takes long enough to be killed in the
middle. Prints ``SAVING <step>`` just before each save and ``DONE`` at the end.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax.infra.cli import CACHE_ENV, enable_compilation_cache

DIM = 8
NUM_ROWS = 5
LEARNING_RATE = 0.1


def data_table() -> np.ndarray:
    return np.linspace(-1.0, 1.0, NUM_ROWS * DIM, dtype=np.float32).reshape(NUM_ROWS, DIM)


def init_state() -> dict:
    params = {"w": jnp.zeros((DIM,), jnp.float32)}
    return {"params": params, "opt": optax.sgd(LEARNING_RATE, momentum=0.9).init(params),
            "step": jnp.asarray(0, jnp.int32), "key": jax.random.key(42),
            "data_pos": jnp.asarray(0, jnp.int32)}


@jax.jit
def train_step(state: dict, table_NxD: jax.Array) -> dict:
    key, noise_key = jax.random.split(state["key"])
    target_D = table_NxD[state["data_pos"] % NUM_ROWS] + 0.1 * jax.random.normal(noise_key, (DIM,))
    grads = jax.grad(lambda p: 0.5 * jnp.sum((p["w"] - target_D) ** 2))(state["params"])
    updates, opt = optax.sgd(LEARNING_RATE, momentum=0.9).update(grads, state["opt"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
            "step": state["step"] + 1, "key": key, "data_pos": state["data_pos"] + 1}


def final_arrays(state: dict) -> dict[str, np.ndarray]:
    """Flat numpy view of the state (the key as its raw bits) for exact comparison."""
    flat = jax.tree_util.tree_flatten_with_path(
        {**state, "key": jax.random.key_data(state["key"])})[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def run_uninterrupted(num_steps: int) -> dict[str, np.ndarray]:
    state, table = init_state(), jnp.asarray(data_table())
    for _ in range(num_steps):
        state = train_step(state, table)
    return final_arrays(state)


def main(workdir: str, num_steps: int, out_path: str, ballast_floats: int) -> None:
    from infalign_jax.infra.checkpointing import Checkpointer

    ckpt = Checkpointer(workdir, max_to_keep=2)
    ballast = np.random.default_rng(0).standard_normal(ballast_floats).astype(np.float32)
    fresh = {"train": init_state(), "ballast": ballast}
    restored = ckpt.restore_latest(jax.eval_shape(lambda: fresh))
    state = fresh["train"] if restored is None else restored.state["train"]
    if restored is not None:
        # The JSON copy of the data position must agree with the array one.
        assert restored.meta["data_pos"] == int(state["data_pos"]) == restored.step, restored.meta
        print(f"RESUMED {restored.step}", flush=True)
    table = jnp.asarray(data_table())
    while int(state["step"]) < num_steps:
        state = train_step(state, table)
        step = int(state["step"])
        print(f"SAVING {step}", flush=True)
        ckpt.save(step, {"train": state, "ballast": ballast},
                  {"data_pos": int(state["data_pos"]), "config": {"lr": LEARNING_RATE}})
    ckpt.wait()
    ckpt.close()
    np.savez(out_path, **final_arrays(state))
    print("DONE", flush=True)


if __name__ == "__main__":
    # the tests' cache (conftest's INFALIGN_JAX_CACHE); none when run by hand without it
    enable_compilation_cache(os.environ.get(CACHE_ENV) or "off")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3],
         int(sys.argv[4]) if len(sys.argv) > 4 else 0)
