"""The shared run loop (`loops.skeleton.run_loop`) on a counter state: resume rules."""

import dataclasses
import os

import jax.numpy as jnp
import pytest

from infalign_jax.loops.skeleton import run_loop


@dataclasses.dataclass(frozen=True)
class _Settings:
    num_steps: int
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 2
    keep_checkpoints: int = 3
    async_checkpoint: bool = False
    tensorboard: bool = False
    init_from: str = ""


def _run(workdir, num_steps):
    """Steps of a state that counts them; its evaluation reports the count."""
    def step_fn(state, step, context):
        return {"count": state["count"] + 1}, {"loss": 0.0}

    def evaluate(state, step):
        return {"count": float(state["count"])}

    return run_loop(str(workdir), {"count": jnp.zeros((), jnp.int32)}, step_fn,
                    _Settings(num_steps), seed=0, manifest={"config": {"seed": 0}},
                    log=lambda _: None, progress_keys=("loss",), evaluate=evaluate)


def _snapshot(workdir):
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, workdir)] = f.read()
    return files


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    """A work dir trained to step 4, rerun with num_steps=2, would train nothing and report the
    step-4 state as step 2: it is refused, naming the field and both steps, writing nothing."""
    assert _run(tmp_path, 4).last_eval == {"count": 4.0}
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"config\.train\.num_steps=2 is below the checkpoint "
                                         r"step 4 .*num_steps >= 4 or use a fresh work dir"):
        _run(tmp_path, 2)
    assert _snapshot(tmp_path) == before
    # The same length reruns the final evaluation; a longer one trains on from step 4.
    assert _run(tmp_path, 4).last_eval == {"count": 4.0}
    longer = _run(tmp_path, 6)
    assert longer.resumed_from == 4 and longer.last_eval == {"count": 6.0}
