"""CTRL hyper-parameters (`RLConfig`, validated on creation), optimisers and beta schedules.

Split from `rl.py`, which re-exports everything here; see its docstring for what each option does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from infalign_jax import models
from infalign_jax.decoding.sampling import SamplingConfig
from infalign_jax.core.transforms import Transform, get_transform
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import (SET_BY, UNUSED_OPTION_RULES, as_dict, config_section,
                                             dataclass_from)
from infalign_jax.models.lora import LoraConfig

Array = jax.Array

ALGORITHMS = ("rloo", "ppo")
KL_MODES = ("reward", "loss")
BETA_SCHEDULES = ("constant", "linear", "adaptive")
ADVANTAGES = ("rloo", "gae")
# Options read only under one setting: (the setting's field, its value that uses them, options).
USED_ONLY_WITH = (
    ("algorithm", "ppo", ("ppo_epochs", "ppo_clip")),
    ("advantage", "gae", ("gamma", "gae_lambda", "whiten_advantages", "value_model",
                          "value_learning_rate", "value_clip")),
    ("beta_schedule", "linear", ("beta_final", "beta_steps")),
    ("beta_schedule", "adaptive", ("kl_target", "kl_horizon")),
)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """CTRL hyper-parameters; bad values fail here, naming the field."""

    algorithm: str = "rloo"
    beta: float = 0.1            # the constant beta, or the schedule's initial beta
    # From the config's `transform` section (`core.transforms.transform_from_config`).
    transform: str = dataclasses.field(default="identity", metadata={SET_BY: "transform section"})
    transform_params: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, metadata={SET_BY: "transform section"})
    samples_per_prompt: int = 4
    max_new_tokens: int = 8
    eos_id: int | None = dataclasses.field(default=None, metadata={SET_BY: "task"})
    pad_id: int = dataclasses.field(default=0, metadata={SET_BY: "task"})
    learning_rate: float = 1e-3
    ppo_epochs: int = 4
    ppo_clip: float = 0.2
    kl_mode: str = "reward"
    max_grad_norm: float = 0.0   # 0 = no clipping
    # > 0: cosine decay of the learning rate (policy and critic) to 10% over this many RL steps,
    # whatever the optimiser updates per step (`ppo_epochs` under PPO, 1 / grad_accum_steps).
    decay_steps: int = 0
    full_kl: bool = True         # log the exact per-token full-vocabulary KL and the entropy
    # Teacher-forced passes (pi_ref's and the policy's log-probs, the full-vocabulary KL) run each
    # prompt once for its samples_per_prompt responses (`models.shared_prompt_hidden`) instead of
    # once per response; the same numbers up to float32 rounding. Needs a linear lm head.
    shared_prompt: bool = False
    beta_schedule: str = "constant"
    beta_final: float = 0.0      # "linear": beta after beta_steps steps (> 0)
    beta_steps: int = 0          # "linear": steps of the ramp (>= 1)
    kl_target: float = 0.0       # "adaptive": target sequence KL (> 0)
    kl_horizon: float = 10000.0  # "adaptive": horizon, in rollouts
    # Warm-up of beta (with "constant" / "linear"): for the first beta_anneal_steps steps beta is
    # multiplied by beta_anneal_factor ** (1 - step / beta_anneal_steps), a geometric decay from
    # factor x beta to the schedule's beta. The fixed point is unchanged (the run ends at beta);
    # see `scheduled_beta` for why this is needed when range(Phi) / beta is large.
    beta_anneal_steps: int = 0
    beta_anneal_factor: float = 10.0
    advantage: str = "rloo"
    gamma: float = 1.0           # "gae": discount
    gae_lambda: float = 0.95     # "gae": lambda
    whiten_advantages: bool = True
    value_model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig kwargs
    value_learning_rate: float = 1e-3
    value_clip: float = 0.2      # 0 = unclipped value loss
    grad_accum_steps: int = 1
    # LoRA (`models.lora`): rank > 0 trains adapters on pi_ref's frozen parameters instead of
    # the whole policy (the sub-section `config.rl.lora`: rank, alpha, targets).
    lora: Any = dataclasses.field(default_factory=lambda: config_section(LoraConfig))

    def __post_init__(self):
        def fail(field, expected):
            check.fail(self, field, expected)

        if not isinstance(self.lora, LoraConfig):
            values = as_dict(self.lora)
            if "targets" in values and not isinstance(values["targets"], str):
                values["targets"] = tuple(values["targets"] or ())   # a string: LoraConfig refuses
            object.__setattr__(self, "lora", dataclass_from(LoraConfig, values, "rl.lora"))

        check.choice(self, "algorithm", ALGORITHMS)
        check.numbers(self, ("beta", "learning_rate", "ppo_clip", "value_learning_rate",
                             "kl_horizon"), strict=True)
        try:
            get_transform(self.transform, **dict(self.transform_params))
        except ValueError as e:
            raise ValueError(f"RLConfig.transform: {e}") from e
        check.ints(self, ("samples_per_prompt", "max_new_tokens", "ppo_epochs", "grad_accum_steps"))
        if self.algorithm == "rloo" and self.samples_per_prompt < 2:
            fail("samples_per_prompt", ">= 2 for RLOO (a leave-one-out baseline)")
        check.choice(self, "kl_mode", KL_MODES)
        check.bools(self, ("full_kl", "shared_prompt", "whiten_advantages"))
        check.ints(self, ("decay_steps", "beta_anneal_steps"), low=0)
        check.numbers(self, ("max_grad_norm", "value_clip"))
        check.choice(self, "beta_schedule", BETA_SCHEDULES)
        if self.beta_schedule == "linear":
            check.numbers(self, ("beta_final",), strict=True)
            check.ints(self, ("beta_steps",))
        if self.beta_schedule == "adaptive":
            check.numbers(self, ("kl_target",), strict=True)
        # The warm-up starts at factor x beta.
        check.numbers(self, ("beta_anneal_factor",), low=1.0)
        if self.beta_anneal_steps and self.beta_schedule == "adaptive":
            fail("beta_anneal_steps", "0 with beta_schedule='adaptive' (the controller sets beta)")
        check.choice(self, "advantage", ADVANTAGES)
        if self.advantage == "gae":
            if self.algorithm != "ppo":
                fail("advantage", "'rloo' unless algorithm='ppo' ('gae' is per-token PPO)")
            check.numbers(self, ("gamma", "gae_lambda"), high=1.0)
            try:
                self.value_model_config()
            except (TypeError, ValueError) as e:
                raise ValueError(f"RLConfig.value_model: {e}") from e
        if self.grad_accum_steps > 1 and self.algorithm == "ppo" and self.ppo_epochs != 1:
            fail("grad_accum_steps", "1 with algorithm='ppo' and ppo_epochs > 1 (each epoch "
                 "would be accumulated as a separate micro-batch)")

    def get_transform(self) -> Transform:
        return get_transform(self.transform, **dict(self.transform_params))

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(n=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
                              eos_id=self.eos_id, pad_id=self.pad_id)

    def value_model_config(self) -> models.ModelConfig:
        """The critic's `ModelConfig`: `value_model` with heads=("value",)."""
        kw = dict(self.value_model)
        if not kw:
            raise ValueError("advantage='gae' needs value_model (ModelConfig keyword arguments, "
                             "at least vocab_size matching the policy)")
        if tuple(kw.pop("heads", ("value",))) != ("value",):
            raise ValueError("the critic has the single head 'value'; leave heads out")
        return models.ModelConfig(**kw, heads=("value",))


def unused_options(rl: Mapping[str, Any]) -> dict[str, str]:
    """The options an `rl` config section's settings leave unread, each with the setting that
    would read it (absent fields at their `RLConfig` defaults)."""
    fields = RLConfig.__dataclass_fields__

    def get(name):
        return rl[name] if name in rl else fields[name].default

    unused = {name: f"rl.{switch}={value!r} (this config has {get(switch)!r})"
              for switch, value, options in USED_ONLY_WITH
              if get(switch) != value for name in options}
    if not get("beta_anneal_steps"):
        unused["beta_anneal_factor"] = "rl.beta_anneal_steps > 0 (this config has 0)"
    lora_section = rl.get("lora") or {}
    if not lora_section.get("rank", 0):   # the adapters' settings, without adapters
        unused.update({f"lora.{name}": "rl.lora.rank > 0 (this config has 0)"
                       for name in lora_section if name != "rank"})
    return unused


# Overrides of these options are refused where the run would not read them.
UNUSED_OPTION_RULES.append(lambda config: {f"rl.{name}": reader for name, reader in
                                           unused_options(config["rl"]).items()}
                           if "rl" in config else {})


def _step_schedule(cfg: Any, learning_rate: float) -> optax.Schedule:
    """The cosine decay over `decay_steps` RL steps, as a function of Adam's update count c.

    PPO makes E = `ppo_epochs` updates per RL step; `grad_accum_steps` = k makes one per k steps
    (never both, see `RLConfig`); BoNBoN (no `algorithm`) one per step. Update c is made in RL step
    c k // E: every epoch of a step, and the update closing an accumulation window, uses the value
    at the first RL step whose gradient it applies.
    """
    # Decaying the step size averages out the REINFORCE noise around the fixed point.
    cosine = optax.cosine_decay_schedule(learning_rate, cfg.decay_steps, alpha=0.1)
    epochs = cfg.ppo_epochs if getattr(cfg, "algorithm", None) == "ppo" else 1
    accum = cfg.grad_accum_steps
    if epochs == 1 and accum == 1:
        return cosine
    return lambda count: cosine(count * accum // epochs)


def _adam(cfg: Any, learning_rate: float) -> optax.GradientTransformation:
    lr = _step_schedule(cfg, learning_rate) if cfg.decay_steps > 0 else learning_rate
    tx = optax.adam(lr)
    if cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, cfg.grad_accum_steps).gradient_transformation()
    return tx


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    """Adam (+ cosine decay, global-norm clipping, `optax.MultiSteps` accumulation as configured).

    Reads only learning_rate, decay_steps, max_grad_norm and grad_accum_steps (and algorithm /
    ppo_epochs where present, so that decay_steps counts RL steps), so any config with those
    fields (e.g. `bon_distillation.BoNBoNConfig`) can use it.
    """
    return _adam(cfg, cfg.learning_rate)


def pending_micro_steps(opt_state: Any) -> int:
    """How many micro-steps' gradients wait in `optax.MultiSteps` accumulators of `opt_state`
    (the largest over them; 0 without accumulation). A run whose steps were all applied ends at 0;
    a step the non-finite guard skipped leaves the accumulator where it was, so later windows
    close one step later and the last one may still be open when the run ends."""
    return max((int(jax.device_get(s.mini_step)) for s in _accumulators(opt_state)), default=0)


def _accumulators(opt_state: Any) -> list[optax.MultiStepsState]:
    """The `optax.MultiSteps` states inside `opt_state` (none without accumulation)."""
    return [s for s in jax.tree.leaves(opt_state,
                                       is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
            if isinstance(s, optax.MultiStepsState)]


def make_value_optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    return _adam(cfg, cfg.value_learning_rate)


def accumulation_start(cfg: RLConfig, step: Array, opt_state: Any = None) -> Array:
    """Where the schedules read the accumulation window that `step` (0-based) falls in: `step`
    itself without accumulation; with k = `grad_accum_steps` > 1, k times the window's index.
    With `opt_state` (holding `optax.MultiSteps` state) the index is the accumulator's count of
    applied updates (`gradient_step`), which is what the learning rate follows (`_step_schedule`):
    a step the non-finite guard skipped advances `step` but leaves the accumulator where it was,
    so a window whose micro-step was skipped still has one value for all its micro-batches, and
    the schedules then run behind `step` by the steps skipped. Without it, step - step % k (no
    step skipped)."""
    step = jnp.asarray(step)
    if cfg.grad_accum_steps == 1:
        return step
    found = _accumulators(opt_state) if opt_state is not None else []
    return (found[0].gradient_step.astype(step.dtype) * cfg.grad_accum_steps if found
            else step - step % cfg.grad_accum_steps)


def scheduled_beta(cfg: RLConfig, step: Array, opt_state: Any = None) -> Array:
    """beta at `step` (0-based) of the "constant" / "linear" schedules, times the warm-up factor.
    Under gradient accumulation (`grad_accum_steps` = k > 1) every step of an accumulation window
    uses one value, the schedule's at k times the window's index (`accumulation_start`; pass the
    policy's `opt_state` so that the windows are the accumulator's after a skipped step), so the k
    micro-batches whose mean gradient makes one update are one batch at one beta (as the
    learning rate, `_step_schedule`).

    Why the warm-up: with an autoregressive softmax policy, E[Phi] - beta KL has traps. Early on,
    while the continuations after a prefix are still those of pi_ref, a prefix whose *optimal*
    continuations are good can look bad and be pushed towards probability 0; once there, both
    the reward and the KL gradients of its logit scale with its probability, so it never comes
    back (reverse-KL mode seeking). Measured on the exact task with exact gradients: at
    KL(pi* || pi_ref) = 2 runs stalled at KL(pi || pi*) = 0.12-0.33 for every transform; starting
    at 10 x beta and decaying geometrically over 60% of the run they reached 0.002-0.006.
    Large beta keeps pi near pi_ref while the continuations learn, and the optimum moves slowly
    along pi*_beta as beta falls (a homotopy), so the policy stays in its basin.
    """
    step_f = accumulation_start(cfg, step, opt_state).astype(jnp.float32)
    if cfg.beta_schedule == "linear":
        frac = jnp.minimum(step_f / cfg.beta_steps, 1.0)
        beta = jnp.float32(cfg.beta) + (cfg.beta_final - cfg.beta) * frac
    else:
        beta = jnp.float32(cfg.beta)
    if cfg.beta_anneal_steps:
        left = jnp.maximum(1.0 - step_f / cfg.beta_anneal_steps, 0.0)
        beta = beta * jnp.float32(cfg.beta_anneal_factor) ** left
    return beta


def check_kl_horizon(kl_horizon: float, n_rollouts: int) -> None:
    """Refuses a controller horizon of n / 5 rollouts or less (see `adaptive_beta_update`)."""
    if not 0.2 * n_rollouts < kl_horizon:
        raise ValueError(f"rl.kl_horizon={kl_horizon:g} with {n_rollouts} rollouts per update: "
                         f"the adaptive controller's factor 1 + e * n / kl_horizon "
                         f"(e in [-0.2, 0.2]) reaches {1 - 0.2 * n_rollouts / kl_horizon:.3g}, so "
                         f"beta could turn 0 or negative; use kl_horizon > "
                         f"{0.2 * n_rollouts:g} (Ziegler et al.: 10000 rollouts)")


def adaptive_beta_update(beta: Array, kl: Array, kl_target: float, kl_horizon: float,
                         n_rollouts: int | Array) -> Array:
    """Ziegler et al. 2019 (arXiv 1909.08593, sec. 2.2) proportional controller:
    beta (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon). A horizon of n / 5 rollouts or
    less is refused (ValueError, with n a Python int): the factor would reach 0 or below at
    error -0.2, and beta would stop at 0 or turn negative, rewarding KL."""
    if isinstance(n_rollouts, int):
        check_kl_horizon(kl_horizon, n_rollouts)
    error = jnp.clip(kl / kl_target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_rollouts / kl_horizon)
