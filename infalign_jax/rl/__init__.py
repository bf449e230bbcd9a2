"""The RL layer: CTRL's KL-regularised step, BoN distillation, the calibration pass and the tasks.

The public API of the step, defined in `rl.config` and `rl.step`, is re-exported here.
"""

from infalign_jax.rl.config import (RLConfig, adaptive_beta_update, make_optimizer,
                                    make_value_optimizer, pending_micro_steps, scheduled_beta)
from infalign_jax.rl.step import (Frozen, RLPrograms, RLState, Rollout, full_vocab_metrics,
                                  gae_rollout_advantages, host_rollout_rewards, init_extra_state,
                                  init_state, make_rl_programs, make_rl_split_step, make_rl_step,
                                  response_values, score_rollout)

__all__ = ["RLConfig", "adaptive_beta_update", "make_optimizer", "make_value_optimizer",
           "pending_micro_steps", "scheduled_beta", "Frozen", "RLPrograms", "RLState", "Rollout",
           "full_vocab_metrics", "gae_rollout_advantages", "host_rollout_rewards",
           "init_extra_state", "init_state", "make_rl_programs", "make_rl_split_step",
           "make_rl_step", "response_values", "score_rollout"]
