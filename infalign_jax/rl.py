"""One InfAlign-CTRL RL step (InfAlign Algorithm 1, spec section 1.5), pure and jittable.

    rl_step(state, frozen, batch, rng) -> (state, metrics)

rollout M samples per prompt from the policy -> raw reward r (a pluggable reward *function*) ->
calibrate against the prompt's reference table of K pi_ref rewards (Eq. 12) -> transform Phi ->
KL-regularised advantage -> loss -> optax update.

Design:
* `frozen` (reference params, reward params, reference tables) is a separate input, never a leaf
  of the trainable state, so it is not donated and gets no gradient (STYLE habit 3).
* Static things (decoder functions, reward function, transform, optimizer, config) are closed over
  by `make_rl_step`; the returned function is what callers `jax.jit` (with `donate_argnums=0`).
* KL "reward" mode (default): score = Phi(C) - beta * sum_t k1_t, where k1 = log pi - log pi_ref
  (standard RLHF, spec 1.5 JAX recipe). With the RLOO leave-one-out baseline (Kool et al. 2019;
  Ahmadian et al. 2024, arXiv 2402.14740) the REINFORCE gradient is unbiased for
  grad (E_pi[Phi(C)] - beta KL(pi || pi_ref)), whose maximiser is pi* ∝ pi_ref exp(Phi(C) / beta).
  KL "loss" mode: score = Phi(C) and beta * k3 (Schulman 2020), summed over tokens, is added to
  the loss (GRPO style; its gradient is a per-token, not a sequence-level, KL gradient).
* PPO (Schulman et al. 2017): the same per-sequence RLOO advantages, `ppo_epochs` full-batch
  epochs over the rollout with the clipped ratio against the sampling policy's log-probs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from infalign_jax import losses
from infalign_jax.advantages import rloo_advantages
from infalign_jax.calibration import calibrate
from infalign_jax.evaluation import token_kl_full_vocab
from infalign_jax.sampling import (DecoderFns, SamplingConfig, concat_prompt_response, sample,
                                   sequence_logprobs)
from infalign_jax.transforms import Transform, get_transform

Array = jax.Array
Params = Any
# reward_fn(reward_params, prompt_idx_B, response_BxL, response_mask_BxL) -> rewards_B
RewardFn = Callable[[Any, Array, Array, Array], Array]

ALGORITHMS = ("rloo", "ppo")
KL_MODES = ("reward", "loss")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """CTRL hyper-parameters; bad values fail here, naming the field."""

    algorithm: str = "rloo"
    beta: float = 0.1
    transform: str = "identity"
    transform_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    samples_per_prompt: int = 4
    max_new_tokens: int = 8
    eos_id: int | None = None
    pad_id: int = 0
    learning_rate: float = 1e-3
    ppo_epochs: int = 4
    ppo_clip: float = 0.2
    kl_mode: str = "reward"
    max_grad_norm: float = 0.0   # 0 = no clipping
    decay_steps: int = 0         # > 0: cosine decay of the learning rate to 10% over these steps
    full_kl: bool = True         # log the exact per-token full-vocabulary KL and the entropy

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"RLConfig.{field}: {msg} (got {getattr(self, field)!r})")
        if self.algorithm not in ALGORITHMS:
            fail("algorithm", f"must be one of {ALGORITHMS}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            fail("beta", "must be > 0")
        try:
            get_transform(self.transform, **dict(self.transform_params))
        except ValueError as e:
            raise ValueError(f"RLConfig.transform: {e}") from e
        for field in ("samples_per_prompt", "max_new_tokens", "ppo_epochs"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(field, "must be a positive integer")
        if self.algorithm == "rloo" and self.samples_per_prompt < 2:
            fail("samples_per_prompt", "RLOO needs >= 2 samples per prompt")
        if not self.learning_rate > 0:
            fail("learning_rate", "must be > 0")
        if not self.ppo_clip > 0:
            fail("ppo_clip", "must be > 0")
        if self.kl_mode not in KL_MODES:
            fail("kl_mode", f"must be one of {KL_MODES}")
        if not (isinstance(self.decay_steps, int) and self.decay_steps >= 0):
            fail("decay_steps", "must be an integer >= 0")
        if not self.max_grad_norm >= 0:
            fail("max_grad_norm", "must be >= 0")

    def get_transform(self) -> Transform:
        return get_transform(self.transform, **dict(self.transform_params))

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(n=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
                              eos_id=self.eos_id, pad_id=self.pad_id)


class TrainState(NamedTuple):
    params: Params
    opt_state: Any
    step: Array


class Frozen(NamedTuple):
    """Inputs that never train: pi_ref, the reward model, per-prompt sorted reference rewards."""

    ref_params: Params
    reward_params: Any
    ref_sorted_PxK: Array     # indexed by the batch's prompt_idx
    ref_count_P: Array


def make_optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    lr = cfg.learning_rate
    if cfg.decay_steps > 0:
        # Decaying the step size averages out the REINFORCE noise around the fixed point.
        lr = optax.cosine_decay_schedule(cfg.learning_rate, cfg.decay_steps, alpha=0.1)
    adam = optax.adam(lr)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam)
    return adam


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def score_rollout(cfg: RLConfig, transform: Transform, rewards_BxM: Array, ref_sorted_BxK: Array,
                  ref_count_B: Array) -> tuple[Array, Array]:
    """(calibrated C_hat, transformed Phi(C_hat)), both BxM; the calibration the transform asks for."""
    cal_BxM = calibrate(rewards_BxM, ref_sorted_BxK, ref_count_B, smoothed=transform.smoothed)
    return cal_BxM, transform(cal_BxM, raw=rewards_BxM)


def response_logits(fns: DecoderFns, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
                    response_BxL: Array, response_mask_BxL: Array) -> Array:
    """float32 logits predicting each response token (teacher forcing): BxLxV."""
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    logits_BxTxV = fns.logits(params, tokens, mask).astype(jnp.float32)
    return logits_BxTxV[:, prompt_BxP.shape[1] - 1:-1]


def full_vocab_metrics(fns: DecoderFns, params: Params, ref_params: Params, prompt_BxP: Array,
                       prompt_mask_BxP: Array, response_BxL: Array, response_mask_BxL: Array
                       ) -> dict[str, Array]:
    """Mean over sequences of the summed exact per-token KL(pi || pi_ref) and entropy of pi.

    Along the sampled prefixes, sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t)) has expectation
    KL(pi || pi_ref) over sequences (chain rule) with much lower variance than k1.
    """
    args = (prompt_BxP, prompt_mask_BxP, response_BxL, response_mask_BxL)
    logits = response_logits(fns, params, *args)
    ref_logits = response_logits(fns, ref_params, *args)
    mask = response_mask_BxL.astype(bool)
    kl_BxL = jnp.where(mask, token_kl_full_vocab(logits, ref_logits), 0.0)
    ent_BxL = losses.entropy_from_logits(logits, mask)
    return {"kl_full_vocab": jnp.mean(jnp.sum(kl_BxL, -1)), "entropy": jnp.mean(jnp.sum(ent_BxL, -1))}


def make_rl_step(cfg: RLConfig, fns: DecoderFns, reward_fn: RewardFn,
                 optimizer: optax.GradientTransformation
                 ) -> Callable[[TrainState, Frozen, Mapping[str, Array], Array],
                               tuple[TrainState, dict[str, Array]]]:
    """The pure step for this config. `batch` holds prompt_BxP, prompt_mask_BxP, prompt_idx_B."""
    transform = cfg.get_transform()
    scfg = cfg.sampling()
    m = cfg.samples_per_prompt

    def rl_step(state: TrainState, frozen: Frozen, batch: Mapping[str, Array], rng: Array):
        prompt_BxP, pmask_BxP = batch["prompt_BxP"], batch["prompt_mask_BxP"]
        idx_B = batch["prompt_idx_B"]
        b = prompt_BxP.shape[0]
        samples = sample(fns, state.params, prompt_BxP, pmask_BxP, rng, scfg)
        resp_RxL = samples.tokens_BxNxL.reshape(b * m, -1)
        rmask_RxL = samples.mask_BxNxL.reshape(b * m, -1)
        old_logp_RxL = samples.logp_BxNxL.reshape(b * m, -1)
        prompt_RxP = jnp.repeat(prompt_BxP, m, axis=0)
        pmask_RxP = jnp.repeat(pmask_BxP, m, axis=0)
        idx_R = jnp.repeat(idx_B, m)

        rewards_BxM = reward_fn(frozen.reward_params, idx_R, resp_RxL, rmask_RxL).reshape(b, m)
        cal_BxM, phi_BxM = score_rollout(cfg, transform, rewards_BxM,
                                         frozen.ref_sorted_PxK[idx_B], frozen.ref_count_P[idx_B])
        ref_logp_RxL = jax.lax.stop_gradient(sequence_logprobs(
            fns, frozen.ref_params, prompt_RxP, pmask_RxP, resp_RxL, rmask_RxL))
        k1_R = losses.masked_sum(losses.kl_k1(old_logp_RxL, ref_logp_RxL, rmask_RxL), rmask_RxL, -1)
        k3_R = losses.masked_sum(losses.kl_k3(old_logp_RxL, ref_logp_RxL, rmask_RxL), rmask_RxL, -1)
        score_BxM = phi_BxM
        if cfg.kl_mode == "reward":
            score_BxM = phi_BxM - cfg.beta * k1_R.reshape(b, m)
        adv_R = rloo_advantages(score_BxM).reshape(b * m)

        def loss_fn(params):
            logp_RxL = sequence_logprobs(fns, params, prompt_RxP, pmask_RxP, resp_RxL, rmask_RxL)
            aux = {"clip_fraction": jnp.zeros(())}
            if cfg.algorithm == "rloo":
                loss = losses.reinforce_loss(logp_RxL, rmask_RxL, adv_R)
            else:
                pg, ppo_m = losses.ppo_policy_loss(logp_RxL, old_logp_RxL, adv_R, rmask_RxL,
                                                   cfg.ppo_clip, reduction="sequence")
                # "sequence" averages over tokens; scale back to the sequence sum so the step
                # size matches RLOO's per-sequence REINFORCE loss.
                loss = pg * rmask_RxL.shape[1]
                aux["clip_fraction"] = ppo_m["clip_fraction"]
            if cfg.kl_mode == "loss":
                k3 = losses.kl_k3(logp_RxL, ref_logp_RxL, rmask_RxL)
                loss = loss + cfg.beta * jnp.mean(losses.masked_sum(k3, rmask_RxL, -1))
            return loss, aux

        def update(carry, _):
            params, opt_state = carry
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), (loss, optax.tree.norm(grads), aux["clip_fraction"])

        epochs = 1 if cfg.algorithm == "rloo" else cfg.ppo_epochs
        (params, opt_state), (loss_E, gnorm_E, clip_E) = jax.lax.scan(
            update, (state.params, state.opt_state), None, length=epochs)
        metrics = {
            "response_length": jnp.mean(jnp.sum(rmask_RxL, -1)),
            "reward": jnp.mean(rewards_BxM),
            "calibrated_reward": jnp.mean(cal_BxM),
            "transformed_reward": jnp.mean(phi_BxM),
            "kl_k1": jnp.mean(k1_R),
            "kl_k3": jnp.mean(k3_R),
            "loss": loss_E[0],
            "grad_norm": gnorm_E[0],
            "clip_fraction": jnp.mean(clip_E),
        }
        if cfg.full_kl:
            metrics.update(jax.lax.stop_gradient(full_vocab_metrics(
                fns, state.params, frozen.ref_params, prompt_RxP, pmask_RxP, resp_RxL, rmask_RxL)))
        return TrainState(params, opt_state, state.step + 1), metrics

    return rl_step
