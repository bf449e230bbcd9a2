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
  KL "loss" mode: score = Phi(C), and beta times `losses.kl_score_function_loss` is added to the
  loss: the score-function gradient of the *sequence* KL(pi || pi_ref) with the KL-to-go of each
  token and the other samples' mean KL as baseline, so its fixed point is the same pi*. (A
  per-token k1/k2/k3 penalty, GRPO style, has another fixed point; see that function.) It is not
  clipped by PPO; with whitened GAE advantages it is divided by the whitening scale, so whitening
  changes the step size but not the effective beta.
* PPO (Schulman et al. 2017): `ppo_epochs` full-batch epochs over the rollout with the clipped
  ratio against the sampling policy's log-probs. Advantages: per-sequence RLOO (`advantage="rloo"`)
  or per-token GAE(gamma, lambda) with a learned critic (`advantage="gae"`, below). Token terms are
  summed per sequence and averaged over sequences (`reduction="sequence_sum"`), so at ratio 1 the
  gradient is RLOO's sum_t A_t grad log pi(y_t) whatever the response lengths.
* beta schedules (`beta_schedule`): "constant"; "linear" from `beta` to `beta_final` over
  `beta_steps` steps; "adaptive", the proportional KL controller of Ziegler et al. 2019
  (arXiv 1909.08593, section 2.2): e = clip(KL / kl_target - 1, -0.2, 0.2),
  beta <- beta (1 + e n / kl_horizon), with n the rollouts in the (global) batch and KL the batch
  mean of the summed k1 (the sequence-level KL estimate the paper uses). The beta the *next* step
  uses lives in `TrainState.beta`, so a checkpoint resumes it exactly; metric `beta` is the value
  this step used.
* Critic (`advantage="gae"`): a *separate* small value model (`value_model` = `ModelConfig` kwargs,
  head "value"), with its own parameters and optimiser state in `TrainState.value_params` /
  `value_opt_state`. Not a head on the policy trunk: a shared trunk lets the regression loss move
  the policy, so the policy's fixed point would no longer be the KL-regularised target
  pi_ref exp(Phi / beta) the exact-task tests check, and a value loss coefficient would have to be
  tuned against the policy loss; InstructGPT (Ouyang et al. 2022) also keeps a separate value model.
  V_t is read at the position that predicts response token t (the state where action y_t is taken);
  per-token rewards are `advantages.kl_shaped_rewards` (Phi(C) at the last valid token,
  -beta k1 per token; in kl_mode="loss" only the score), advantages `gae_advantages`, whitened over
  valid tokens (`whiten_advantages`), the critic trained on the GAE returns with `losses.value_loss`
  (clipped at `value_clip`; 0 = plain squared error), one critic update per PPO epoch.
* Gradient accumulation (`grad_accum_steps` = k > 1): the optimisers are wrapped in
  `optax.MultiSteps`, so every `optimizer.update` is a micro-step and parameters move once per k,
  with the mean gradient (clipping and the lr schedule act on the mean; `decay_steps` counts real
  updates). Each RLOO step is one micro-step; PPO is only allowed with `ppo_epochs=1`, since epochs
  over one micro-batch would otherwise be accumulated as if they were different data.

Metrics: response_length, reward, calibrated_reward, transformed_reward, kl_k1, kl_k3 (sequence
sums, batch means), loss, grad_norm (first epoch), clip_fraction, beta, and with `full_kl`
kl_full_vocab, entropy; with advantage="gae" also value_loss (first epoch), value_clip_fraction,
explained_variance (1 - Var(R - V) / Var(R) over valid tokens, before the update).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from infalign_jax import losses, models
from infalign_jax.advantages import gae_advantages, kl_shaped_rewards, rloo_advantages, whiten
from infalign_jax.calibration import calibrate
from infalign_jax.evaluation import token_kl_full_vocab
from infalign_jax.sampling import (DecoderFns, concat_prompt_response, sample,
                                   sequence_logprobs)
from infalign_jax.rl_config import (ADVANTAGES, ALGORITHMS, BETA_SCHEDULES, KL_MODES,  # noqa: F401
                                    RLConfig, adaptive_beta_update, make_optimizer,
                                    make_value_optimizer, scheduled_beta)
from infalign_jax.transforms import Transform

Array = jax.Array
Params = Any
# reward_fn(reward_params, prompt_idx_B, response_BxL, response_mask_BxL) -> rewards_B
RewardFn = Callable[[Any, Array, Array, Array], Array]

class TrainState(NamedTuple):
    """Trainable state. The fields after `step` default to None (a plain constant-beta RLOO/PPO
    run does not need them); `init_state` / `init_extra_state` fill them for the config."""

    params: Params
    opt_state: Any
    step: Array
    beta: Array | None = None          # float32 scalar: the beta the next step uses
    value_params: Params | None = None  # critic (advantage="gae")
    value_opt_state: Any = None


class Frozen(NamedTuple):
    """Inputs that never train: pi_ref, the reward model, per-prompt sorted reference rewards."""

    ref_params: Params
    reward_params: Any
    ref_sorted_PxK: Array     # indexed by the batch's prompt_idx
    ref_count_P: Array


def init_extra_state(cfg: RLConfig, rng: Array | None = None) -> dict[str, Any]:
    """The TrainState fields after `step` for this config: `beta` always; for advantage="gae" a
    freshly initialised critic (`rng` needed) and its optimiser state."""
    first = cfg.beta if cfg.beta_schedule == "adaptive" else scheduled_beta(cfg, 0)
    extra: dict[str, Any] = {"beta": jnp.asarray(first, jnp.float32)}
    if cfg.advantage == "gae":
        if rng is None:
            raise ValueError("init_extra_state: advantage='gae' needs rng to initialise the critic")
        value_params = models.init_params(cfg.value_model_config(), rng)
        extra.update(value_params=value_params,
                     value_opt_state=make_value_optimizer(cfg).init(value_params))
    return extra


def init_state(params: Params, optimizer: optax.GradientTransformation,
               cfg: RLConfig | None = None, rng: Array | None = None) -> TrainState:
    """Step-0 state; without `cfg` only params/opt_state/step (enough for constant beta + RLOO)."""
    extra = {} if cfg is None else init_extra_state(cfg, rng)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), **extra)


def current_beta(cfg: RLConfig, state: TrainState) -> Array:
    if cfg.beta_schedule == "adaptive":
        if state.beta is None:
            raise ValueError("RLConfig.beta_schedule='adaptive' keeps beta in TrainState.beta; "
                             "build the state with rl.init_state(params, optimizer, cfg) or pass "
                             "**rl.init_extra_state(cfg, rng) to TrainState")
        return state.beta.astype(jnp.float32)
    return scheduled_beta(cfg, state.step)


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


def response_values(value_cfg: models.ModelConfig, value_params: Params, prompt_BxP: Array,
                    prompt_mask_BxP: Array, response_BxL: Array, response_mask_BxL: Array
                    ) -> Array:
    """Critic values V_t of the state before each response token (0 where masked): BxL."""
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    values_BxT = models.apply(value_params, tokens, value_cfg, attention_mask_BxT=mask).values
    values_BxL = values_BxT[:, prompt_BxP.shape[1] - 1:-1].astype(jnp.float32)
    return jnp.where(response_mask_BxL.astype(bool), values_BxL, 0.0)


def gae_rollout_advantages(cfg: RLConfig, score_R: Array, logp_RxL: Array, ref_logp_RxL: Array,
                           values_RxL: Array, mask_RxL: Array, beta: float | Array
                           ) -> tuple[Array, Array, Array]:
    """(advantages, value targets, scale), RxL, RxL and a scalar, of the critic path: KL-shaped
    per-token rewards (Ziegler et al. 2019), GAE(gamma, lambda) (Schulman et al. 2016), whitened
    if configured. `scale` is what whitening divided the advantages by (1 without whitening): a
    KL term kept outside the advantages (kl_mode="loss") must be divided by it too, or whitening
    changes the effective beta and with it the fixed point."""
    token_rewards_RxL = kl_shaped_rewards(score_R, logp_RxL, ref_logp_RxL, mask_RxL, beta)
    adv_RxL, returns_RxL = gae_advantages(token_rewards_RxL, values_RxL, mask_RxL, cfg.gamma,
                                          cfg.gae_lambda)
    scale = jnp.float32(1.0)
    if cfg.whiten_advantages:
        white_RxL = whiten(adv_RxL, mask_RxL)
        centred_RxL = adv_RxL - losses.masked_mean(adv_RxL, mask_RxL)
        # whiten() = centred / scale on valid tokens; recover the scale it used
        scale = jax.lax.stop_gradient(jnp.sqrt(losses.masked_mean(
            jnp.square(centred_RxL), mask_RxL) + 1e-8))
        adv_RxL = white_RxL
    return adv_RxL, returns_RxL, scale


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
    gae = cfg.advantage == "gae"
    value_cfg = cfg.value_model_config() if gae else None
    value_opt = make_value_optimizer(cfg) if gae else None
    value_clip = cfg.value_clip if cfg.value_clip > 0 else None

    def rl_step(state: TrainState, frozen: Frozen, batch: Mapping[str, Array], rng: Array):
        prompt_BxP, pmask_BxP = batch["prompt_BxP"], batch["prompt_mask_BxP"]
        idx_B = batch["prompt_idx_B"]
        b = prompt_BxP.shape[0]
        beta = current_beta(cfg, state)
        samples = sample(fns, state.params, prompt_BxP, pmask_BxP, rng, scfg)
        resp_RxL = samples.tokens_BxNxL.reshape(b * m, -1)
        rmask_RxL = samples.mask_BxNxL.reshape(b * m, -1)
        old_logp_RxL = samples.logp_BxNxL.reshape(b * m, -1)
        prompt_RxP = jnp.repeat(prompt_BxP, m, axis=0)
        pmask_RxP = jnp.repeat(pmask_BxP, m, axis=0)
        idx_R = jnp.repeat(idx_B, m)
        rollout = (prompt_RxP, pmask_RxP, resp_RxL, rmask_RxL)

        rewards_BxM = reward_fn(frozen.reward_params, idx_R, resp_RxL, rmask_RxL).reshape(b, m)
        cal_BxM, phi_BxM = score_rollout(cfg, transform, rewards_BxM,
                                         frozen.ref_sorted_PxK[idx_B], frozen.ref_count_P[idx_B])
        ref_logp_RxL = jax.lax.stop_gradient(sequence_logprobs(
            fns, frozen.ref_params, *rollout))
        k1_R = losses.masked_sum(losses.kl_k1(old_logp_RxL, ref_logp_RxL, rmask_RxL), rmask_RxL, -1)
        k3_R = losses.masked_sum(losses.kl_k3(old_logp_RxL, ref_logp_RxL, rmask_RxL), rmask_RxL, -1)
        reward_beta = beta if cfg.kl_mode == "reward" else 0.0
        # kl_mode="loss": each sample's KL gradient uses the other samples' mean KL as baseline.
        kl_baseline_R = (k1_R.reshape(b, m) - rloo_advantages(k1_R.reshape(b, m))).reshape(-1)
        metrics: dict[str, Array] = {}
        if gae:
            old_values_RxL = jax.lax.stop_gradient(
                response_values(value_cfg, state.value_params, *rollout))
            adv, returns_RxL, adv_scale = gae_rollout_advantages(
                cfg, phi_BxM.reshape(-1), old_logp_RxL, ref_logp_RxL, old_values_RxL, rmask_RxL,
                reward_beta)
            resid = returns_RxL - old_values_RxL
            var = lambda x: losses.masked_mean(  # noqa: E731
                jnp.square(x - losses.masked_mean(x, rmask_RxL)), rmask_RxL)
            metrics["explained_variance"] = 1.0 - var(resid) / jnp.maximum(var(returns_RxL), 1e-8)
        else:
            adv = rloo_advantages(phi_BxM - reward_beta * k1_R.reshape(b, m)).reshape(b * m)
            adv_scale = jnp.float32(1.0)

        def loss_fn(params):
            logp_RxL = sequence_logprobs(fns, params, *rollout)
            aux = {"clip_fraction": jnp.zeros(())}
            if cfg.algorithm == "rloo":
                loss = losses.reinforce_loss(logp_RxL, rmask_RxL, adv)
            else:
                loss, ppo_m = losses.ppo_policy_loss(logp_RxL, old_logp_RxL, adv, rmask_RxL,
                                                     cfg.ppo_clip, reduction="sequence_sum")
                aux["clip_fraction"] = ppo_m["clip_fraction"]
            if cfg.kl_mode == "loss":
                loss = loss + beta / adv_scale * losses.kl_score_function_loss(
                    logp_RxL, old_logp_RxL, ref_logp_RxL, rmask_RxL, kl_baseline_R)
            return loss, aux

        def value_loss_fn(value_params):
            values_RxL = response_values(value_cfg, value_params, *rollout)
            return losses.value_loss(values_RxL, old_values_RxL, returns_RxL, rmask_RxL,
                                     value_clip)

        def update(carry, _):
            params, opt_state, value_params, value_opt_state = carry
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "clip_fraction": aux["clip_fraction"]}
            if gae:
                (vloss, vaux), vgrads = jax.value_and_grad(value_loss_fn, has_aux=True)(
                    value_params)
                vupdates, value_opt_state = value_opt.update(vgrads, value_opt_state, value_params)
                value_params = optax.apply_updates(value_params, vupdates)
                out.update(value_loss=vloss, value_clip_fraction=vaux["clip_fraction"])
            return (params, opt_state, value_params, value_opt_state), out

        if gae and state.value_params is None:
            raise ValueError("RLConfig.advantage='gae' trains a critic kept in "
                             "TrainState.value_params; build the state with "
                             "rl.init_state(params, optimizer, cfg, rng)")
        epochs = 1 if cfg.algorithm == "rloo" else cfg.ppo_epochs
        carry = (state.params, state.opt_state, state.value_params, state.value_opt_state)
        (params, opt_state, value_params, value_opt_state), per_epoch = jax.lax.scan(
            update, carry, None, length=epochs)
        metrics.update({
            "response_length": jnp.mean(jnp.sum(rmask_RxL, -1)),
            "reward": jnp.mean(rewards_BxM),
            "calibrated_reward": jnp.mean(cal_BxM),
            "transformed_reward": jnp.mean(phi_BxM),
            "kl_k1": jnp.mean(k1_R),
            "kl_k3": jnp.mean(k3_R),
            "loss": per_epoch["loss"][0],
            "grad_norm": per_epoch["grad_norm"][0],
            "clip_fraction": jnp.mean(per_epoch["clip_fraction"]),
            "beta": beta,
        })
        if gae:
            metrics.update(value_loss=per_epoch["value_loss"][0],
                           value_clip_fraction=jnp.mean(per_epoch["value_clip_fraction"]))
        if cfg.full_kl:
            metrics.update(jax.lax.stop_gradient(full_vocab_metrics(
                fns, state.params, frozen.ref_params, *rollout)))
        next_beta = state.beta
        if state.beta is not None:
            if cfg.beta_schedule == "adaptive":
                next_beta = adaptive_beta_update(beta, jnp.mean(k1_R), cfg.kl_target,
                                                 cfg.kl_horizon, b * m)
            else:
                next_beta = scheduled_beta(cfg, state.step + 1)
            next_beta = jax.lax.stop_gradient(next_beta).astype(jnp.float32)
        return TrainState(params, opt_state, state.step + 1, next_beta, value_params,
                          value_opt_state), metrics

    return rl_step
