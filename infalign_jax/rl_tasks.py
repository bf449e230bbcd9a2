"""What the CTRL run loop trains on: a base model, prompts, a reward function, a reference table.

`RLTask` is the interface between a task and `train.py`: the loop never needs to know whether the
reward is a lookup table, a reward model or a text judge. `build_task(config)` picks the builder by
`config.task.name`:

* ``exact``: the enumerable task of `exact_task` (tiny vocabulary, fixed response length or EOS
  with lengths 1..L, random reward table). Its evaluation is exact: KL, standard / BoN_n / WoN_n
  win rates of the trained policy by enumerating every response, next to the exact CTRL target
  pi* ∝ pi_ref exp(Phi(C)/beta), and the distance KL(pi || pi*) that says whether it converged.
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
    # beta_for_kl(kl, transform, ref_table) -> the beta whose exact target has this KL (tasks
    # with an exact target only; `config.task.kl_budget`)
    beta_for_kl: Callable[..., float] | None = None
    # With an exact target: `evaluate` reports exact_kl_to_target = KL(pi || pi*), and a run is
    # converged when it is <= converged_kl.
    converged_kl: float | None = None


EXACT_TASK_KEYS = ("name", "seed", "vocab", "length", "num_prompts", "d_model", "init_std",
                   "eos", "kl_budget")


def exact_task_from_section(section: Any) -> et.ExactTask:
    """The exact task of a config's `task` section (keys EXACT_TASK_KEYS; others are refused)."""
    unknown = sorted(set(section) - set(EXACT_TASK_KEYS))
    if unknown:
        raise ValueError(f"config.task: unknown keys {unknown} for the exact task; known: "
                         f"{list(EXACT_TASK_KEYS)}")
    return et.make_task(int(section.seed), vocab=int(section.vocab), length=int(section.length),
                        num_prompts=int(section.num_prompts), d_model=int(section.d_model),
                        init_std=float(section.get("init_std", 0.2)),
                        eos=bool(section.get("eos", False)))


def _exact_task(section: Any) -> RLTask:
    task = exact_task_from_section(section)
    ids = tuple(f"p{i}" for i in range(task.prompts_PxS.shape[0]))
    tag = (f"vocab={task.vocab},length={task.length},prompts={len(ids)},seed={int(section.seed)}"
           f",init_std={task.model_cfg.init_std:g},eos={task.eos_id is not None}")

    def reference_table(k: int, seed: int, partial_path: str | None = None,
                        progress: Any = None) -> ReferenceTable:
        del partial_path, progress  # exact sampling from the enumeration takes milliseconds
        sorted_PxK = et.sample_reference_table(task, k, seed=seed)
        return build_reference_table(ids, sorted_PxK, reward_model_id=f"exact_reward[{tag}]",
                                     base_model_id=f"exact_base[{tag}]")

    ref_logp_PxY = et.policy_logprobs(task, task.ref_params)

    def target_logp(transform, beta: float, table: ReferenceTable) -> np.ndarray:
        sorted_PxK, _ = table.lookup(ids)
        cal = et.calibrated_table(task, sorted_PxK, transform.smoothed)
        return et.target_logprobs(ref_logp_PxY, cal, transform, beta, raw_PxY=task.rewards_PxY)

    def evaluate(params: Params, transform, beta: float, table: ReferenceTable,
                 ns: tuple[int, ...] = (1, 2, 4)) -> dict[str, float]:
        logp = et.policy_logprobs(task, params)
        got = et.policy_report(task, np.exp(logp), ns)
        target = target_logp(transform, beta, table)
        want = et.policy_report(task, np.exp(target), ns)
        out = {f"exact_{k}": v for k, v in got.items()}
        out.update({f"target_{k}": v for k, v in want.items()})
        out["exact_kl_to_target"] = et.kl_from_logprobs(logp, target)
        sorted_PxK, _ = table.lookup(ids)
        out["range_phi_over_beta"] = et.target_sharpness(
            et.calibrated_table(task, sorted_PxK, transform.smoothed), transform, beta,
            task.rewards_PxY)
        return out

    def beta_for_kl(kl: float, transform, table: ReferenceTable) -> float:
        sorted_PxK, _ = table.lookup(ids)
        cal = et.calibrated_table(task, sorted_PxK, transform.smoothed)
        return et.beta_for_kl(ref_logp_PxY, cal, task.rewards_PxY, transform, kl)

    return RLTask(
        name="exact", model_cfg=task.model_cfg, ref_params=task.ref_params, prompt_ids=ids,
        prompts_PxS=task.prompts_PxS, prompt_mask_PxS=np.ones(task.prompts_PxS.shape, bool),
        reward_fn=et.reward_fn(task), reward_params=jnp.asarray(task.rewards_PxY),
        reward_model_id=f"exact_reward[{tag}]", base_model_id=f"exact_base[{tag}]",
        eos_id=task.eos_id, pad_id=task.pad_id, reference_table=reference_table,
        evaluate=evaluate, response_length=task.length, beta_for_kl=beta_for_kl,
        converged_kl=et.CONVERGED_KL)


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
