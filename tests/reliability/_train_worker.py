"""Runs `experiments/train_policy.py` unchanged, optionally with a poisoned task registered first.

Used by `tests/reliability/test_fault_injection.py`: the CLI cannot name a task that only a test
defines, so this worker registers one and then executes the entry point as `__main__` (same absl
flags, same exit codes).

    RELIABILITY_POISON=KIND:PROMPT python tests/reliability/_train_worker.py --config=... \
        --config.task.name=exact_poisoned ...

KIND is "nan" (reward NaN), "inf" (reward +inf) or "big" (reward 3e38, so that sums over the
batch overflow); PROMPT is the prompt index whose every response gets that reward. The poisoned
task is the exact task in every other respect, so its reference table, model ids and evaluation
are the exact task's.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POISONED_TASK = "exact_poisoned"
POISON_VALUES = {"nan": float("nan"), "inf": float("inf"), "big": 3e38}


def poisoned_builder(kind: str, prompt: int):
    """A task builder: the exact task whose reward is `POISON_VALUES[kind]` for one prompt."""
    import jax.numpy as jnp

    from infalign_jax.rl.tasks import exact as exact_tasks

    value = POISON_VALUES[kind]

    def build(section):
        exact = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        exact["name"] = "exact"
        task = exact_tasks.rl_task(_Section(exact))
        base = task.reward_fn

        def reward_fn(params, idx_R, tokens, mask):
            r = base(params, idx_R, tokens, mask)
            return jnp.where(idx_R == prompt, jnp.float32(value), r)

        return dataclasses.replace(task, reward_fn=reward_fn)

    return build


class _Section(dict):
    """Attribute access over a dict, like the ConfigDict section `_exact_task` reads."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def main() -> None:
    sys.path.insert(0, ROOT)
    poison = os.environ.get("RELIABILITY_POISON")
    if poison:
        from infalign_jax.rl import tasks as rl_tasks
        kind, prompt = poison.split(":")
        rl_tasks.register_task(POISONED_TASK, poisoned_builder(kind, int(prompt)))
    script = os.path.join(ROOT, "experiments", "train_policy.py")
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
