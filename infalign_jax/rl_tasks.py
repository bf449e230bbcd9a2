"""What the CTRL run loop trains on: a base model, prompts, a reward function, a reference table.

`RLTask` is the interface between a task and `train.py`: the loop never needs to know whether the
reward is a lookup table, a reward model or a text judge. `build_task(config)` picks the builder by
`config.task.name`:

* ``exact``: the enumerable task of `exact_task` (tiny vocabulary, fixed response length, random
  reward table). Its evaluation is exact: KL and standard / BoN_n / WoN_n win rates of the trained
  policy by enumerating every response, next to the exact CTRL target pi* ∝ pi_ref exp(Phi(C)/beta).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import exact_task as et
from infalign_jax import models
from infalign_jax.calibration import ReferenceTable, build_reference_table
from infalign_jax.rl import RewardFn

Params = Any


@dataclasses.dataclass(frozen=True)
class RLTask:
    """A task for the run loop (host-side numpy data; the loop shards it)."""

    name: str
    model_cfg: models.ModelConfig
    ref_params: Params                 # pi_ref; the policy starts from a copy
    prompt_ids: tuple[str, ...]
    prompts_PxS: np.ndarray            # int32, LEFT padded
    prompt_mask_PxS: np.ndarray        # bool
    reward_fn: RewardFn
    reward_params: Any
    reward_model_id: str
    base_model_id: str
    eos_id: int | None
    pad_id: int
    # reference_table(k, seed, partial_path=None, progress=None) -> ReferenceTable of K pi_ref
    # rewards per prompt id (a long calibration pass resumes from partial_path)
    reference_table: Callable[[int, int], ReferenceTable]
    # evaluate(params, transform, beta, ref_table) -> scalars (exact or estimated)
    evaluate: Callable[..., dict[str, float]] | None = None
    # Rollouts must use exactly this many new tokens (`config.rl.max_new_tokens`): a fixed-length
    # reward (the exact task), or the budget the reference table was drawn with (real tasks).
    response_length: int | None = None


def _exact_task(section: Any) -> RLTask:
    task = et.make_task(int(section.seed), vocab=int(section.vocab), length=int(section.length),
                        num_prompts=int(section.num_prompts), d_model=int(section.d_model))
    ids = tuple(f"p{i}" for i in range(task.prompts_PxS.shape[0]))
    tag = f"vocab={task.vocab},length={task.length},prompts={len(ids)},seed={int(section.seed)}"

    def reference_table(k: int, seed: int, partial_path: str | None = None,
                        progress: Any = None) -> ReferenceTable:
        del partial_path, progress  # exact sampling from the enumeration takes milliseconds
        sorted_PxK = et.sample_reference_table(task, k, seed=seed)
        return build_reference_table(ids, sorted_PxK, reward_model_id=f"exact_reward[{tag}]",
                                     base_model_id=f"exact_base[{tag}]")

    ref_probs_PxY = np.exp(et.policy_logprobs(task, task.ref_params))

    def evaluate(params: Params, transform, beta: float, table: ReferenceTable,
                 ns: tuple[int, ...] = (1, 2, 4)) -> dict[str, float]:
        got = et.policy_report(task, np.exp(et.policy_logprobs(task, params)), ns)
        sorted_PxK, _ = table.lookup(ids)
        cal = et.calibrated_table(task, sorted_PxK, transform.smoothed)
        target = et.target_policy(np.log(ref_probs_PxY), cal, transform, beta,
                                  raw_PxY=task.rewards_PxY)
        want = et.policy_report(task, target, ns)
        out = {f"exact_{k}": v for k, v in got.items()}
        out.update({f"target_{k}": v for k, v in want.items()})
        return out

    return RLTask(
        name="exact", model_cfg=task.model_cfg, ref_params=task.ref_params, prompt_ids=ids,
        prompts_PxS=task.prompts_PxS, prompt_mask_PxS=np.ones(task.prompts_PxS.shape, bool),
        reward_fn=functools.partial(et.table_reward_fn, vocab=task.vocab),
        reward_params=jnp.asarray(task.rewards_PxY), reward_model_id=f"exact_reward[{tag}]",
        base_model_id=f"exact_base[{tag}]", eos_id=None, pad_id=0,
        reference_table=reference_table, evaluate=evaluate, response_length=task.length)


_BUILDERS: dict[str, Callable[[Any], RLTask]] = {"exact": _exact_task}


def known_tasks() -> tuple[str, ...]:
    return tuple(sorted(_BUILDERS))


def build_task(task_section: Any) -> RLTask:
    name = task_section.name
    if name not in _BUILDERS:
        import infalign_jax.real_rl_tasks  # noqa: F401  (registers the SmolLM2 tasks; heavy)
    if name not in _BUILDERS:
        raise ValueError(f"config.task.name: unknown task {name!r}; known: {', '.join(known_tasks())}")
    return _BUILDERS[name](task_section)


def register_task(name: str, builder: Callable[[Any], RLTask]) -> None:
    """Adds a task builder (e.g. the real offline tasks) under `name`."""
    _BUILDERS[name] = builder


def replicate_params(params: Params) -> Params:
    """A copy of the parameters that owns its buffers (the policy is donated, pi_ref is not)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)
