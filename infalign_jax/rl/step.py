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
  KL "loss" mode: score = Phi(C), and beta times `kl.kl_score_function_loss` is added to the
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
  uses lives in `RLState.beta`, so a checkpoint resumes it exactly; metric `beta` is the value
  this step used.
* Critic (`advantage="gae"`): a *separate* small value model (`value_model` = `ModelConfig` kwargs,
  head "value"), with its own parameters and optimiser state in `RLState.value_params` /
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
  with the mean gradient (clipping and the lr schedule act on the mean). Each RLOO step is one
  micro-step; PPO is only allowed with `ppo_epochs=1`, since epochs over one micro-batch would
  otherwise be accumulated as if they were different data. The "constant" / "linear" beta
  schedules and the warm-up hold each window at its first step's value (`scheduled_beta`); the
  adaptive controller updates after every micro-step, from that micro-batch's KL.
* Learning-rate decay (`decay_steps` > 0): the cosine counts RL steps whatever the updates per
  step, for the policy and the critic: all `ppo_epochs` updates of step s use its value at s, and
  the update closing an accumulation window its value at the window's first step.
* LoRA (`lora.rank` > 0, `models.lora`): `RLState.params` are the adapters only; the policy is
  `policy_params(cfg, state.params, frozen)` = pi_ref's parameters (`frozen.ref_params`, never
  differentiated) with the adapters attached (`lora.attach`: applied in factors inside each layer,
  no merged kernel), so gradients and optimiser state are adapter-sized
  and pi_ref stays the base. The rollout then needs `frozen` too (`RLPrograms.roll`'s 4th argument).

Metrics: response_length, reward, calibrated_reward (the spec's Eq. 12 quantile, also where the
transform reads a smoothed calibration, e.g. (K C + 1)/(K + 1): one meaning across transforms),
transformed_reward, kl_k1, kl_k3 (sequence sums, batch means), loss, grad_norm (first epoch),
clip_fraction, beta, and with `full_kl` kl_full_vocab, entropy; with advantage="gae" also
value_loss (first epoch), value_clip_fraction, explained_variance (1 - Var(R - V) / Var(R) over
valid tokens, before the update).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax.core import kl, losses
from infalign_jax import models
from infalign_jax.core.advantages import gae_advantages, kl_shaped_rewards, rloo_advantages, whiten
from infalign_jax.core.calibration import calibrate
from infalign_jax.decoding.sampling import (Samples, concat_prompt_response, flatten_samples,
                                            response_kl_entropy, response_positions, sample,
                                            sequence_logprobs, shared_prompt_path_terms,
                                            shared_sequence_logprobs)
from infalign_jax.core.types import DecoderFns
from infalign_jax.rl.config import (ADVANTAGES, ALGORITHMS, BETA_SCHEDULES, KL_MODES,  # noqa: F401
                                    RLConfig, adaptive_beta_update, make_optimizer,
                                    make_value_optimizer, scheduled_beta)
from infalign_jax.core.transforms import Transform
from infalign_jax.models import lora

from infalign_jax.core.types import Array, HostReward, Params, RewardFn, SplitStep

class RLState(NamedTuple):
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
    ref_sorted_XxK: Array     # indexed by the batch's prompt_idx
    ref_count_X: Array


def init_extra_state(cfg: RLConfig, rng: Array | None = None) -> dict[str, Any]:
    """The RLState fields after `step` for this config: `beta` always; for advantage="gae" a
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
               cfg: RLConfig | None = None, rng: Array | None = None) -> RLState:
    """Step-0 state; without `cfg` only params/opt_state/step (enough for constant beta + RLOO)."""
    extra = {} if cfg is None else init_extra_state(cfg, rng)
    return RLState(params, optimizer.init(params), jnp.zeros((), jnp.int32), **extra)


def policy_params(cfg: RLConfig, params: Params, frozen: Frozen | None,
                  layout: Callable[[Params], Params] | None = None) -> Params:
    """The policy's parameters: `params` itself, or with LoRA pi_ref's parameters with the
    adapters `params` attached (`lora.attach`: W + alpha / rank * A @ B, applied in factors).
    `layout` (e.g. the rollout's resharding) maps the full-size parameters, not the adapters."""
    layout = layout or (lambda p: p)
    if not cfg.lora.rank:
        return layout(params)
    if frozen is None:
        raise ValueError("RLConfig.lora.rank > 0: the policy is pi_ref's parameters plus the "
                         "adapters, so the rollout needs `frozen`: roll(state, batch, rng, "
                         "frozen)")
    return lora.attach(layout(frozen.ref_params), params, cfg.lora)


def check_critic_vocab(cfg: RLConfig, ref_params: Params) -> None:
    """Refuses a critic (`value_model`) whose vocabulary is smaller than the policy's (the rows of
    pi_ref's embedding): it would embed the policy's larger ids past its table, NaN values that
    the guard skips at every step without naming the cause."""
    embed = ref_params.get("embed") if isinstance(ref_params, Mapping) else None
    vocab = cfg.value_model_config().vocab_size
    if embed is not None and vocab < embed.shape[0]:
        raise ValueError(f"RLConfig.value_model vocab_size={vocab} is smaller than the policy's "
                         f"vocabulary ({embed.shape[0]} embedding rows): the critic reads the "
                         f"policy's tokens; set value_model vocab_size={embed.shape[0]}")


def current_beta(cfg: RLConfig, state: RLState) -> Array:
    if cfg.beta_schedule == "adaptive":
        if state.beta is None:
            raise ValueError("RLConfig.beta_schedule='adaptive' keeps beta in RLState.beta; "
                             "build the state with rl.init_state(params, optimizer, cfg) or pass "
                             "**rl.init_extra_state(cfg, rng) to RLState")
        return state.beta.astype(jnp.float32)
    return scheduled_beta(cfg, state.step, state.opt_state)


def score_rollout(cfg: RLConfig, transform: Transform, rewards_BxM: Array, ref_sorted_BxK: Array,
                  ref_count_B: Array) -> tuple[Array, Array]:
    """(calibrated C_hat, transformed Phi(C_hat)), both BxM; the calibration the transform asks for."""
    cal_BxM = calibrate(rewards_BxM, ref_sorted_BxK, ref_count_B, smoothing=transform.smoothing)
    return cal_BxM, transform(cal_BxM, raw=rewards_BxM)


def response_values(value_cfg: models.ModelConfig, value_params: Params, prompt_BxP: Array,
                    prompt_mask_BxP: Array, response_BxL: Array, response_mask_BxL: Array
                    ) -> Array:
    """Critic values V_t of the state before each response token (0 where masked): BxL."""
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    values_BxT = models.apply(value_params, tokens, value_cfg, attention_mask_BxT=mask).values
    values_BxL = response_positions(values_BxT, prompt_BxP.shape[1]).astype(jnp.float32)
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
    kl_BxL, ent_BxL = response_kl_entropy(fns, params, fns, ref_params, prompt_BxP,
                                          prompt_mask_BxP, response_BxL, response_mask_BxL)
    return _kl_entropy_metrics(kl_BxL, ent_BxL)


def _kl_entropy_metrics(kl_RxL: Array, entropy_RxL: Array) -> dict[str, Array]:
    return {"kl_full_vocab": jnp.mean(jnp.sum(kl_RxL, -1)),
            "entropy": jnp.mean(jnp.sum(entropy_RxL, -1))}


def path_terms_metrics(terms: Any) -> dict[str, Array]:
    """`full_vocab_metrics` from `sampling.shared_prompt_path_terms`' per-token terms."""
    return _kl_entropy_metrics(terms.kl_RxL, terms.entropy_RxL)


def check_shared_prompt(shared_prompt: bool, fns: DecoderFns) -> None:
    """Refuses `rl.shared_prompt` for a decoder whose prompt cannot be shared (no linear head)."""
    if shared_prompt and (fns.shared_hidden is None or fns.lm_kernel is None):
        raise ValueError("config.rl.shared_prompt=True needs a decoder with a linear lm head "
                         "(DecoderFns.shared_hidden and lm_kernel; soft-capped logits have none)")


# ---------------------------------------------------------------------------- the phases
class Rollout(NamedTuple):
    """Phase 1: R = B*M responses of the current policy, flattened (prompts repeated)."""

    tokens: tuple[Array, Array, Array, Array]   # (prompt_RxP, prompt_mask_RxP, resp_RxL, mask_RxL)
    old_logp_RxL: Array                          # log-probs under the sampling policy
    prompt_idx_B: Array
    prompt_idx_R: Array
    prompt: tuple[Array, Array]                  # (prompt_BxP, prompt_mask_BxP), not repeated

    @property
    def mask_RxL(self) -> Array:
        return self.tokens[3]


def rollout_logprobs(cfg: RLConfig, fns: DecoderFns, params: Params, ro: Rollout) -> Array:
    """Teacher-forced log-probs of the rollout's responses under `params` (RxL): each prompt run
    once for its samples with `cfg.shared_prompt`, else once per response."""
    if cfg.shared_prompt:
        return shared_sequence_logprobs(fns, params, *ro.prompt, *ro.tokens[2:])
    return sequence_logprobs(fns, params, *ro.tokens)


def rollout_full_vocab_metrics(cfg: RLConfig, fns: DecoderFns, params: Params,
                               ref_params: Params, ro: Rollout) -> dict[str, Array]:
    """`full_vocab_metrics` of the rollout (through each prompt's shared KV with
    `cfg.shared_prompt`)."""
    if not cfg.shared_prompt:
        return full_vocab_metrics(fns, params, ref_params, *ro.tokens)
    b, m = ro.prompt_idx_B.shape[0], cfg.samples_per_prompt
    resp_RxL, mask_RxL = ro.tokens[2:]
    samples = Samples(resp_RxL.reshape(b, m, -1), mask_RxL.reshape(b, m, -1),
                      ro.old_logp_RxL.reshape(b, m, -1))
    return path_terms_metrics(shared_prompt_path_terms(fns, params, fns, ref_params, *ro.prompt,
                                                       samples))


class Scores(NamedTuple):
    """Phases 2-3: raw rewards, calibrated C_hat (spec Eq. 12, whichever calibration the
    transform reads) and transformed Phi(C_hat) (BxM), with the reference log-probs and
    sequence KL estimates the regulariser needs."""

    rewards_BxM: Array
    calibrated_BxM: Array
    transformed_BxM: Array
    ref_logp_RxL: Array
    k1_R: Array
    k3_R: Array


class Advantages(NamedTuple):
    """Phase 4: what the policy (and critic) losses consume."""

    adv: Array                  # R (RLOO) or RxL (GAE)
    scale: Array                # what whitening divided by (1 without): divides the KL-loss term
    kl_baseline_R: Array        # kl_mode="loss": the other samples' mean KL
    returns_RxL: Array | None   # GAE value targets
    old_values_RxL: Array | None


def rollout(cfg: RLConfig, fns: DecoderFns, params: Params, batch: Mapping[str, Array],
            rng: Array) -> Rollout:
    """Phase 1: M samples per prompt from the policy."""
    prompt_BxP, pmask_BxP = batch["prompt_BxP"], batch["prompt_mask_BxP"]
    idx_B = batch["prompt_idx_B"]
    samples = sample(fns, params, prompt_BxP, pmask_BxP, rng, cfg.sampling())
    tokens = flatten_samples(prompt_BxP, pmask_BxP, samples)
    m = cfg.samples_per_prompt
    old_logp_RxL = samples.logp_BxNxL.reshape(prompt_BxP.shape[0] * m, -1)
    return Rollout(tokens, old_logp_RxL, idx_B, jnp.repeat(idx_B, m), (prompt_BxP, pmask_BxP))


def rollout_rewards(reward_fn: RewardFn, frozen: Frozen, ro: Rollout) -> Array:
    """Phase 2a: the raw reward of each response, R."""
    _, _, resp_RxL, rmask_RxL = ro.tokens
    return reward_fn(frozen.reward_params, ro.prompt_idx_R, resp_RxL, rmask_RxL)


def host_rollout_rewards(reward: HostReward, ro: Rollout) -> np.ndarray:
    """Phase 2a outside jitted code: the rollout's prompt indices and responses fetched once, the
    host reward (a text judge) on numpy arrays; float32 rewards, R."""
    idx_R, resp_RxL, mask_RxL = jax.device_get((ro.prompt_idx_R, ro.tokens[2], ro.tokens[3]))
    return np.asarray(reward.host(idx_R, resp_RxL, mask_RxL), np.float32)


def reference_rows(frozen: Frozen, prompt_idx_B: Array) -> tuple[Array, Array]:
    """The reference table's rows of the batch's prompts: (sorted rewards, counts). An index
    outside [0, X) gets count 0, which `calibrate` turns into NaN; a plain gather would clamp
    it (or wrap a negative one, as `mode="fill"` still does from -X to -1) and calibrate against
    another prompt's references."""
    num = frozen.ref_count_X.shape[0]
    inside_B = (prompt_idx_B >= 0) & (prompt_idx_B < num)
    idx_B = jnp.clip(prompt_idx_B, 0, num - 1)
    count_B = jnp.where(inside_B, frozen.ref_count_X[idx_B], 0)
    return frozen.ref_sorted_XxK[idx_B], count_B


def score(cfg: RLConfig, fns: DecoderFns, transform: Transform, frozen: Frozen, ro: Rollout,
          rewards_R: Array) -> Scores:
    """Phases 2b-3: calibrate each response's reward against its prompt's reference table and
    transform; score the rollout under pi_ref for the KL."""
    b, m = ro.prompt_idx_B.shape[0], cfg.samples_per_prompt
    rmask_RxL = ro.mask_RxL
    rewards_BxM = jnp.asarray(rewards_R, jnp.float32).reshape(b, m)
    ref_sorted_BxK, ref_count_B = reference_rows(frozen, ro.prompt_idx_B)
    cal_BxM, phi_BxM = score_rollout(cfg, transform, rewards_BxM, ref_sorted_BxK, ref_count_B)
    if transform.smoothing != "none":   # Phi reads a smoothed C; the metric is C (spec Eq. 12)
        cal_BxM = calibrate(rewards_BxM, ref_sorted_BxK, ref_count_B)
    ref_logp_RxL = jax.lax.stop_gradient(rollout_logprobs(cfg, fns, frozen.ref_params, ro))
    k1_R = losses.masked_sum(kl.kl_k1(ro.old_logp_RxL, ref_logp_RxL, rmask_RxL), rmask_RxL, -1)
    k3_R = losses.masked_sum(kl.kl_k3(ro.old_logp_RxL, ref_logp_RxL, rmask_RxL), rmask_RxL, -1)
    return Scores(rewards_BxM, cal_BxM, phi_BxM, ref_logp_RxL, k1_R, k3_R)


def advantages(cfg: RLConfig, state: RLState, beta: Array, ro: Rollout, sc: Scores
               ) -> tuple[Advantages, dict[str, Array]]:
    """Phase 4: RLOO advantages of Phi(C) - beta k1 per sequence, or GAE over KL-shaped
    per-token rewards with the critic (kl_mode="loss": the score alone, the KL goes in the loss)."""
    b, m = sc.rewards_BxM.shape
    reward_beta = beta if cfg.kl_mode == "reward" else 0.0
    # kl_mode="loss": each sample's KL gradient uses the other samples' mean KL as baseline.
    k1_BxM = sc.k1_R.reshape(b, m)
    kl_baseline_R = (k1_BxM - rloo_advantages(k1_BxM)).reshape(-1)
    if cfg.advantage != "gae":
        adv = rloo_advantages(sc.transformed_BxM - reward_beta * k1_BxM).reshape(b * m)
        return Advantages(adv, jnp.float32(1.0), kl_baseline_R, None, None), {}
    if state.value_params is None:
        raise ValueError("RLConfig.advantage='gae' trains a critic kept in RLState.value_params; "
                         "build the state with rl.init_state(params, optimizer, cfg, rng)")
    mask_RxL = ro.mask_RxL
    old_values_RxL = jax.lax.stop_gradient(
        response_values(cfg.value_model_config(), state.value_params, *ro.tokens))
    adv, returns_RxL, scale = gae_rollout_advantages(
        cfg, sc.transformed_BxM.reshape(-1), ro.old_logp_RxL, sc.ref_logp_RxL, old_values_RxL,
        mask_RxL, reward_beta)

    def var(x):
        return losses.masked_mean(jnp.square(x - losses.masked_mean(x, mask_RxL)), mask_RxL)

    explained = 1.0 - var(returns_RxL - old_values_RxL) / jnp.maximum(var(returns_RxL), 1e-8)
    return (Advantages(adv, scale, kl_baseline_R, returns_RxL, old_values_RxL),
            {"explained_variance": explained})


def policy_loss(cfg: RLConfig, fns: DecoderFns, params: Params, beta: Array, ro: Rollout,
                sc: Scores, av: Advantages) -> tuple[Array, dict[str, Array]]:
    """REINFORCE (RLOO) or PPO's clipped loss, plus beta times the sequence-KL score-function
    term in kl_mode="loss"."""
    logp_RxL = rollout_logprobs(cfg, fns, params, ro)
    aux = {"clip_fraction": jnp.zeros(())}
    if cfg.algorithm == "rloo":
        loss = losses.reinforce_loss(logp_RxL, ro.mask_RxL, av.adv)
    else:
        loss, ppo_m = losses.ppo_policy_loss(logp_RxL, ro.old_logp_RxL, av.adv, ro.mask_RxL,
                                             cfg.ppo_clip, reduction="sequence_sum")
        aux["clip_fraction"] = ppo_m["clip_fraction"]
    if cfg.kl_mode == "loss":
        loss = loss + beta / av.scale * kl.kl_score_function_loss(
            logp_RxL, ro.old_logp_RxL, sc.ref_logp_RxL, ro.mask_RxL, av.kl_baseline_R)
    return loss, aux


def update(cfg: RLConfig, fns: DecoderFns, optimizer: optax.GradientTransformation,
           state: RLState, beta: Array, ro: Rollout, sc: Scores, av: Advantages,
           frozen: Frozen | None = None
           ) -> tuple[tuple[Params, Any, Params, Any], dict[str, Array]]:
    """Phase 5: one (RLOO) or `ppo_epochs` (PPO) full-batch updates of the policy, and of the
    critic with GAE; returns the new (params, opt_state, value_params, value_opt_state) and the
    per-epoch metrics. With LoRA `frozen` holds the base the adapters are attached to."""
    def epoch(carry, _):
        grads, out = gradients(cfg, fns, beta, ro, sc, av, frozen, carry[0], carry[2])
        return apply_gradients(cfg, optimizer, carry, grads), out

    carry = (state.params, state.opt_state, state.value_params, state.value_opt_state)
    return jax.lax.scan(epoch, carry, None, length=update_epochs(cfg))


def update_epochs(cfg: RLConfig) -> int:
    """How many optimiser updates a step makes: 1 for RLOO, `ppo_epochs` for PPO."""
    return 1 if cfg.algorithm == "rloo" else cfg.ppo_epochs


def gradients(cfg: RLConfig, fns: DecoderFns, beta: Array, ro: Rollout, sc: Scores,
              av: Advantages, frozen: Frozen | None, params: Params, value_params: Params | None
              ) -> tuple[tuple[Params, Params | None], dict[str, Array]]:
    """One epoch's gradients of the policy loss (and of the critic's loss with GAE) at `params`
    (`value_params`), and its metrics."""
    (loss, aux), grads = jax.value_and_grad(
        lambda p: policy_loss(cfg, fns, policy_params(cfg, p, frozen), beta, ro, sc, av),
        has_aux=True)(params)
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           "clip_fraction": aux["clip_fraction"]}
    vgrads = None
    if cfg.advantage == "gae":
        value_cfg = cfg.value_model_config()
        value_clip = cfg.value_clip if cfg.value_clip > 0 else None

        def value_loss_fn(vp):
            values_RxL = response_values(value_cfg, vp, *ro.tokens)
            return losses.value_loss(values_RxL, av.old_values_RxL, av.returns_RxL, ro.mask_RxL,
                                     value_clip)

        (vloss, vaux), vgrads = jax.value_and_grad(value_loss_fn, has_aux=True)(value_params)
        out.update(value_loss=vloss, value_clip_fraction=vaux["clip_fraction"])
    return (grads, vgrads), out


def apply_gradients(cfg: RLConfig, optimizer: optax.GradientTransformation,
                    carry: tuple[Params, Any, Params, Any], grads: tuple[Params, Params | None]
                    ) -> tuple[Params, Any, Params, Any]:
    """The optimisers' update of (params, opt_state, value_params, value_opt_state) by one
    epoch's `gradients`."""
    params, opt_state, value_params, value_opt_state = carry
    updates, opt_state = optimizer.update(grads[0], opt_state, params)
    params = optax.apply_updates(params, updates)
    if cfg.advantage == "gae":
        vupdates, value_opt_state = make_value_optimizer(cfg).update(
            grads[1], value_opt_state, value_params)
        value_params = optax.apply_updates(value_params, vupdates)
    return params, opt_state, value_params, value_opt_state


def next_beta(cfg: RLConfig, state: RLState, beta: Array, k1_R: Array,
              opt_state: Any = None) -> Array | None:
    """The beta the next step uses: the adaptive controller's update from this batch's mean KL,
    or the schedule's value at step + 1 with `opt_state` this step's new optimiser state (None
    when the state keeps no beta)."""
    if state.beta is None:
        return None
    if cfg.beta_schedule == "adaptive":
        new = adaptive_beta_update(beta, jnp.mean(k1_R), cfg.kl_target, cfg.kl_horizon,
                                   k1_R.shape[0])
    else:
        new = scheduled_beta(cfg, state.step + 1, opt_state)
    return jax.lax.stop_gradient(new).astype(jnp.float32)


def step_metrics(cfg: RLConfig, ro: Rollout, sc: Scores, beta: Array,
                 per_epoch: dict[str, Array]) -> dict[str, Array]:
    """The logged metrics (see the module docstring); losses are the first epoch's."""
    metrics = {
        "response_length": jnp.mean(jnp.sum(ro.mask_RxL, -1)),
        "reward": jnp.mean(sc.rewards_BxM),
        "calibrated_reward": jnp.mean(sc.calibrated_BxM),
        "transformed_reward": jnp.mean(sc.transformed_BxM),
        "kl_k1": jnp.mean(sc.k1_R),
        "kl_k3": jnp.mean(sc.k3_R),
        "loss": per_epoch["loss"][0],
        "grad_norm": per_epoch["grad_norm"][0],
        "clip_fraction": jnp.mean(per_epoch["clip_fraction"]),
        "beta": beta,
    }
    if cfg.advantage == "gae":
        metrics.update(value_loss=per_epoch["value_loss"][0],
                       value_clip_fraction=jnp.mean(per_epoch["value_clip_fraction"]))
    return metrics


# ---------------------------------------------------------------------------- the step
class RLPrograms(NamedTuple):
    """The step in two pure programs around the reward call, for rewards computed on the host
    (text judges): jit each, and call the judge between them with plain arrays, so neither program
    holds a host callback (which would keep it out of JAX's persistent compilation cache).

      roll(state, batch, rng, frozen=None)        -> Rollout   (frozen needed with LoRA)
      learn(state, frozen, rollout, rewards_R)    -> (state, metrics)
    """

    roll: Callable[..., Rollout]
    learn: Callable[..., tuple[RLState, dict[str, Array]]]
    # `learn` as a SplitStep (prepare: the gradients and metrics; apply: the optimiser update and
    # the next beta), for a guard that keeps only one state (None for PPO with several epochs,
    # whose every epoch's gradients depend on the one before)
    learn_split: SplitStep | None = None


def make_rl_programs(cfg: RLConfig, fns: DecoderFns, optimizer: optax.GradientTransformation,
                     rollout_params: Callable[[Params], Params] | None = None) -> RLPrograms:
    """rollout, then (given the rewards) score -> advantages -> update -> next beta.

    `rollout_params` (hook): maps the policy parameters to the layout the rollout decodes from,
    once per step (`infra.sharding.rollout_resharder`); None decodes from them as they are."""
    transform = cfg.get_transform()
    check_shared_prompt(cfg.shared_prompt, fns)

    def roll(state: RLState, batch: Mapping[str, Array], rng: Array,
             frozen: Frozen | None = None) -> Rollout:
        params = policy_params(cfg, state.params, frozen, rollout_params)
        return rollout(cfg, fns, params, batch, rng)

    def scored(state: RLState, frozen: Frozen, ro: Rollout, rewards_R: Array):
        if cfg.advantage == "gae":
            check_critic_vocab(cfg, frozen.ref_params)
        beta = current_beta(cfg, state)
        sc = score(cfg, fns, transform, frozen, ro, rewards_R)
        av, metrics = advantages(cfg, state, beta, ro, sc)
        return beta, sc, av, metrics

    def all_metrics(metrics, state, frozen, ro, sc, beta, per_epoch):
        metrics.update(step_metrics(cfg, ro, sc, beta, per_epoch))
        if cfg.full_kl:
            metrics.update(jax.lax.stop_gradient(rollout_full_vocab_metrics(
                cfg, fns, policy_params(cfg, state.params, frozen), frozen.ref_params, ro)))
        return metrics

    def next_state(state: RLState, carry: tuple, beta: Array, k1_R: Array) -> RLState:
        params, opt_state, value_params, value_opt_state = carry
        return RLState(params, opt_state, state.step + 1,
                       next_beta(cfg, state, beta, k1_R, opt_state), value_params,
                       value_opt_state)

    def learn(state: RLState, frozen: Frozen, ro: Rollout, rewards_R: Array):
        beta, sc, av, metrics = scored(state, frozen, ro, rewards_R)
        carry, per_epoch = update(cfg, fns, optimizer, state, beta, ro, sc, av, frozen)
        return (next_state(state, carry, beta, sc.k1_R),
                all_metrics(metrics, state, frozen, ro, sc, beta, per_epoch))

    def prepare(state: RLState, frozen: Frozen, ro: Rollout, rewards_R: Array):
        beta, sc, av, metrics = scored(state, frozen, ro, rewards_R)
        grads, out = gradients(cfg, fns, beta, ro, sc, av, frozen, state.params,
                               state.value_params)
        per_epoch = {k: v[None] for k, v in out.items()}
        return (grads, beta, sc.k1_R), all_metrics(metrics, state, frozen, ro, sc, beta,
                                                   per_epoch)

    def apply(state: RLState, pending: Any) -> RLState:
        grads, beta, k1_R = pending
        carry = (state.params, state.opt_state, state.value_params, state.value_opt_state)
        return next_state(state, apply_gradients(cfg, optimizer, carry, grads), beta, k1_R)

    return RLPrograms(roll, learn, SplitStep(prepare, apply) if update_epochs(cfg) == 1 else None)


def make_rl_step(cfg: RLConfig, fns: DecoderFns, reward_fn: RewardFn,
                 optimizer: optax.GradientTransformation,
                 rollout_params: Callable[[Params], Params] | None = None
                 ) -> Callable[[RLState, Frozen, Mapping[str, Array], Array],
                               tuple[RLState, dict[str, Array]]]:
    """The pure step for this config. `batch` holds prompt_BxP, prompt_mask_BxP, prompt_idx_B.

    rollout -> reward -> score (calibrate, transform, pi_ref log-probs) -> advantages -> update
    -> next beta; each phase is a function of this module (`make_rl_programs` has the same step
    split around the reward call).
    """
    programs = make_rl_programs(cfg, fns, optimizer, rollout_params)

    def rl_step(state: RLState, frozen: Frozen, batch: Mapping[str, Array], rng: Array):
        ro = programs.roll(state, batch, rng, frozen)
        return programs.learn(state, frozen, ro, rollout_rewards(reward_fn, frozen, ro))

    return rl_step


def make_rl_split_step(cfg: RLConfig, fns: DecoderFns, reward_fn: RewardFn,
                       optimizer: optax.GradientTransformation,
                       rollout_params: Callable[[Params], Params] | None = None
                       ) -> SplitStep | None:
    """`make_rl_step` as a SplitStep (prepare: rollout, reward, score, advantages, gradients;
    apply: the update), or None where the update is not one optimiser step (PPO's epochs)."""
    programs = make_rl_programs(cfg, fns, optimizer, rollout_params)
    if programs.learn_split is None:
        return None
    split = programs.learn_split

    def prepare(state: RLState, frozen: Frozen, batch: Mapping[str, Array], rng: Array):
        ro = programs.roll(state, batch, rng, frozen)
        return split.prepare(state, frozen, ro, rollout_rewards(reward_fn, frozen, ro))

    return SplitStep(prepare, split.apply)
