"""The interface between a task and the run loop (`loops.train`): `RLTask`.

The loop never needs to know whether the reward is a lookup table, a reward model or a text judge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax.core.calibration import ReferenceTable
from infalign_jax.core.types import Params, RewardFn
from infalign_jax.infra import validate as check


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """`config.reference`: K base-policy samples per prompt for the calibration table, and the
    seed that draws them."""

    _config_owner = "config.reference"
    k: int = 4096
    seed: int = 1

    def __post_init__(self):
        check.ints(self, ("k",))
        check.ints(self, ("seed",), low=0)


@dataclasses.dataclass(frozen=True)
class RLTask:
    """A task for the run loop (host-side numpy data; the loop shards it)."""

    name: str
    model_cfg: models.ModelConfig
    ref_params: Params                 # pi_ref; the policy starts from a copy
    prompt_ids: tuple[str, ...]
    prompts_XxP: np.ndarray            # int32, LEFT padded
    prompt_mask_XxP: np.ndarray        # bool
    reward_fn: RewardFn
    reward_params: Any
    reward_model_id: str
    base_model_id: str
    eos_id: int | None
    pad_id: int
    # reference_table(k, seed, partial_path=None, progress=None) -> ReferenceTable of K pi_ref
    # rewards per prompt id (a long calibration pass resumes from partial_path)
    reference_table: Callable[[int, int], ReferenceTable]
    # evaluate(params, transform, beta, ref_table, bon_n=None) -> scalars (exact or estimated);
    # bon_n: the run distills BoN_n(pi_ref) (method="bonbon"), which is then the exact target
    evaluate: Callable[..., dict[str, float]] | None = None
    # Rollouts must use exactly this many new tokens (`config.rl.max_new_tokens`): a fixed-length
    # reward (the exact task), or the budget the reference table was drawn with (real tasks).
    response_length: int | None = None
    # The temperature the reference table samples pi_ref at; rollouts sample at 1, so training
    # needs 1 (other temperatures serve calibrate/evaluate runs).
    reference_temperature: float = 1.0
    # Whether the reference table keeps only pi_ref's samples that emitted EOS; the RL step
    # scores every rollout, truncated or not, so training needs False.
    reference_require_eos: bool = False
    # reference_draw(k) -> {config key: (the key the table records in `created`, its value)}:
    # how the calibration pass splits the draws (prompts per batch, samples per chunk), which
    # picks the samples (each chunk its own key); a table drawn otherwise is another table.
    reference_draw: Callable[[int], dict[str, tuple[str, int]]] | None = None
    # beta_for_kl(kl, transform, ref_table) -> the beta whose exact target has this KL (tasks
    # with an exact target only; `config.task.kl_budget`)
    beta_for_kl: Callable[..., float] | None = None
    # With an exact target: `evaluate` reports exact_kl_to_target = KL(pi || pi*) (or
    # KL(pi || BoN_n) with bon_n), and a run is converged when it is <= converged_kl.
    converged_kl: float | None = None


def replicate_params(params: Params) -> Params:
    """A copy of the parameters that owns its buffers (the policy is donated, pi_ref is not)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)
