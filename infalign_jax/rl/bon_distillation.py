"""Best-of-N distillation baselines on the CTRL data path: vBoN and BoNBoN (spec sections 4, 5).

* vBoN (Amini et al. 2024, arXiv 2407.06057; spec 5): the practical lower bound of
  -KL(pi || pi_bon) is RLHF with reward log F(r) and beta = 1/(N-1) ("n = 1/beta + 1" in their
  README). Here that is the CTRL step itself with the `log` transform of the smoothed calibration
  (#{ref < r} + 1)/(K + 1), the F estimate of their code, with ties to references counted half
  (`calibration`): `vbon_rl_config(n, **kw)`.
* BoNBoN (Gui et al. 2024, arXiv 2406.00832; spec 4): for each prompt draw N responses from
  pi_ref, keep the best and the worst by reward and minimise
  alpha * NLL(y_best) + (1 - alpha) * L_pref(h; beta*_N), h the log-ratio gap of (best, worst)
  (`preference_losses.bonbon_loss`, variant "ipo" as in the paper or "dpo" as in their code).
  SFT on best-of-N draws alone has the exact BoN_N policy as its minimiser; the IPO term with
  beta*_N = 1/(2 (N-1) H_{N-1}) matches BoN_N's mean log-ratio gap (N-1) H_{N-1}.

`make_bonbon_step(cfg, fns, reward_fn, optimizer)` returns a pure
`step(state, frozen, batch, rng) -> (state, metrics)` with the signature and state (`rl.RLState`,
`rl.Frozen`) of `rl.make_rl_step`, so the run loop can use either; `rl.make_optimizer(cfg)` accepts a
`BoNBoNConfig`. `make_bonbon_split_step` is the same step as a `SplitStep` (gradients, then the
update), which the run loop's non-finite guard checks without holding two states.
Data: `data="online"` draws fresh pi_ref samples inside the step (an unbounded offline data set,
same distribution), `pairs_per_prompt` independent sets of n for each prompt (each its own
best/worst pair); `data="offline"` reads one set a prompt from the batch (`response_BxNxL`,
`response_mask_BxNxL`, e.g. made once by `sample_reference_responses`).
Ties in reward are broken by the first index (argmax / argmin); a prompt whose n rewards all
tie has one response as both best and worst, so no preference pair: it is left out of L_pref
(metric `tied`, the share of such prompts) and its best response still enters the NLL.
A NaN reward among a step's pi_ref draws makes best_reward and worst_reward NaN, so the run
loop's non-finite guard skips the step (and `train.nan_policy="stop"` stops, naming them), as it
does for a CTRL step; a best or worst pick that passed over NaN-scored draws is not trained on.

Metrics: loss, nll, pref, h_mean, accuracy, tied, beta (beta*_N or the configured one),
grad_norm, best_reward, worst_reward (of the pi_ref draws); from `monitor_samples` policy samples per prompt
(the same quantities the RL step logs): reward, calibrated_reward, kl_k1, kl_k3,
response_length, and with `full_kl` kl_full_vocab, entropy. With monitor_samples = 0 only
response_length is kept (of y_best). With `shared_prompt` (the rl section's) each prompt is run
once for its best/worst pair and for the monitor's samples, as in the CTRL step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from infalign_jax.core import kl, losses
from infalign_jax import rl
from infalign_jax.core.calibration import calibrate
from infalign_jax.core.preference_losses import BONBON_VARIANTS, bonbon_beta, bonbon_loss, vbon_beta
from infalign_jax.core.selection import best_of_n, select, worst_of_n
from infalign_jax.decoding.sampling import (Samples, SamplingConfig, flatten_samples, sample,
                                            sequence_logprobs, shared_prompt_path_terms,
                                            shared_sequence_logprobs)
from infalign_jax.core.types import DecoderFns, RewardFn, SplitStep
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import SET_BY, UNUSED_OPTION_RULES
from infalign_jax.models import lora
from infalign_jax.rl.step import check_shared_prompt, path_terms_metrics, reference_rows

Array = jax.Array
DATA_MODES = ("online", "offline")


def vbon_rl_config(n: int, **kw: Any) -> rl.RLConfig:
    """`rl.RLConfig` of vBoN for BoN_n: transform "log", beta = 1/(n-1); other fields from kw."""
    beta = vbon_beta(n)
    for field, fixed in (("transform", "log"), ("beta", beta), ("beta_schedule", "constant")):
        if field in kw and kw[field] != fixed:
            raise ValueError(f"vbon_rl_config: {field} is fixed to {fixed!r} by n={n}, "
                             f"got {kw[field]!r}")
    if kw.get("transform_params"):
        raise ValueError(f"vbon_rl_config: transform_params is fixed to {{}}, "
                         f"got {kw['transform_params']!r}")
    return rl.RLConfig(**{**kw, "transform": "log", "transform_params": {}, "beta": beta})


@dataclasses.dataclass(frozen=True)
class BoNBoNConfig:
    """BoNBoN hyper-parameters; bad values fail here, naming the field."""

    n: int = 8                  # draws per prompt (BoN_n is the target)
    alpha: float = 0.5          # weight of the SFT NLL on y_best
    variant: str = "ipo"
    beta: float = 0.0           # 0: beta*_n = 1/(2 (n-1) H_{n-1})
    data: str = "online"
    # Sampling length, learning rate and decay are the rl section's; the ids are the task's.
    max_new_tokens: int = dataclasses.field(default=8, metadata={SET_BY: "rl section"})
    eos_id: int | None = dataclasses.field(default=None, metadata={SET_BY: "task"})
    pad_id: int = dataclasses.field(default=0, metadata={SET_BY: "task"})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={SET_BY: "rl section"})
    decay_steps: int = dataclasses.field(default=0, metadata={SET_BY: "rl section"})
    # Each prompt run once for its responses (the pair, the monitor's samples): rl.shared_prompt.
    shared_prompt: bool = dataclasses.field(default=False, metadata={SET_BY: "rl section"})
    max_grad_norm: float = 0.0
    grad_accum_steps: int = 1
    # independent (best, worst) pairs per prompt a step, each from its own n draws (online data)
    pairs_per_prompt: int = 1
    monitor_samples: int = 4    # policy samples per prompt for the KL / reward metrics
    full_kl: bool = True

    def __post_init__(self):
        check.ints(self, ("n",), low=2)
        check.ints(self, ("max_new_tokens", "grad_accum_steps", "pairs_per_prompt"))
        check.ints(self, ("decay_steps", "monitor_samples"), low=0)
        check.numbers(self, ("alpha",), high=1.0)
        check.choice(self, "variant", BONBON_VARIANTS)
        check.numbers(self, ("beta", "max_grad_norm"))   # beta 0 = beta*_n
        check.choice(self, "data", DATA_MODES)
        if self.pairs_per_prompt > 1 and self.data != "online":
            raise ValueError(f"BoNBoNConfig.pairs_per_prompt={self.pairs_per_prompt} draws each "
                             f"pair's n responses in the step: it needs data='online' (offline "
                             f"responses hold one pair's n per prompt)")
        check.bools(self, ("shared_prompt", "full_kl"))
        check.numbers(self, ("learning_rate",), strict=True)

    @property
    def pref_beta(self) -> float:
        return self.beta if self.beta > 0 else bonbon_beta(self.n)

    def sampling(self, n: int | None = None) -> SamplingConfig:
        return SamplingConfig(n=self.n if n is None else n, max_new_tokens=self.max_new_tokens,
                              eos_id=self.eos_id, pad_id=self.pad_id)


# The rl section's options a method="bonbon" run reads besides those above marked SET_BY
# "rl section": the adapters' settings. (Not rl.beta: the evaluation's target is BoN_n(pi_ref).)
RL_OPTIONS_READ = ("lora",)
# The rl options that have a BoNBoN counterpart in the bonbon section.
OWN_OPTIONS = {"samples_per_prompt": "bonbon.n / bonbon.monitor_samples",
               "max_grad_norm": "bonbon.max_grad_norm",
               "grad_accum_steps": "bonbon.grad_accum_steps", "full_kl": "bonbon.full_kl"}


def unused_rl_options(config: Mapping[str, Any]) -> dict[str, str]:
    """The rl options a method="bonbon" config leaves unread (none under another method)."""
    if config.get("method") != "bonbon" or "rl" not in config:
        return {}
    read = {f.name for f in dataclasses.fields(BoNBoNConfig)
            if f.metadata.get(SET_BY) == "rl section"} | set(RL_OPTIONS_READ)
    return {f"rl.{name}": ("method='ctrl' (this config has 'bonbon'"
                           + (f"; BoNBoN's own is {OWN_OPTIONS[name]})" if name in OWN_OPTIONS
                              else ")"))
            for name in config["rl"] if name not in read}


def unused_method_sections(config: Mapping[str, Any]) -> dict[str, str]:
    """The bonbon section is read under method="bonbon" only, the transform under "ctrl" only
    (a sweep over transform.t under BoNBoN gave identical points under different labels); so is
    mesh.rollout, the CTRL rollout's layout (BoNBoN's monitor samples decode from the training
    layout)."""
    method = config.get("method", "ctrl")
    unread = "transform" if method == "bonbon" else "bonbon"
    other = "ctrl" if method == "bonbon" else "bonbon"
    rules = {f"{unread}.{name}": f"method={other!r} (this config has {method!r})"
             for name in (config.get(unread) or {})}
    if method == "bonbon" and "rollout" in (config.get("mesh") or {}):
        rules["mesh.rollout"] = "method='ctrl' (this config has 'bonbon')"
    if method == "bonbon" and not (config.get("bonbon") or {}).get("monitor_samples", 1):
        rules["bonbon.full_kl"] = "config.bonbon.monitor_samples > 0 (the KL of monitor samples)"
    return rules


UNUSED_OPTION_RULES.append(unused_rl_options)
UNUSED_OPTION_RULES.append(unused_method_sections)


def sample_reference_responses(cfg: BoNBoNConfig, fns: DecoderFns, ref_params: Any,
                               prompt_BxP: Array, prompt_mask_BxP: Array, rng: Array) -> Samples:
    """N draws per prompt from pi_ref: the data of one BoNBoN step (what "online" draws itself
    with the first half of `jax.random.split(rng)`)."""
    return sample(fns, ref_params, prompt_BxP, prompt_mask_BxP, rng, cfg.sampling())


def _check_offline(tokens_BxNxL: Array, mask_BxNxL: Array, b: int, n: int) -> None:
    """Offline responses must hold bonbon.n per prompt (a set drawn for another n was re-cut by the
    reshape into rows of other lengths) and a mask of their shape (static shapes: at trace)."""
    if tokens_BxNxL.ndim != 3 or tokens_BxNxL.shape[:2] != (b, n):
        raise ValueError(f"offline BoNBoN data: response_BxNxL must hold bonbon.n={n} responses "
                         f"for each of the batch's {b} prompts, shape ({b}, {n}, L); got "
                         f"{tokens_BxNxL.shape}")
    if mask_BxNxL.shape != tokens_BxNxL.shape:
        raise ValueError(f"offline BoNBoN data: response_mask_BxNxL must have response_BxNxL's "
                         f"shape {tokens_BxNxL.shape}, got {mask_BxNxL.shape}")


def make_bonbon_step(cfg: BoNBoNConfig, fns: DecoderFns, reward_fn: RewardFn,
                     optimizer: optax.GradientTransformation,
                     lora_cfg: lora.LoraConfig | None = None
                     ) -> Callable[[rl.RLState, rl.Frozen, Mapping[str, Array], Array],
                                   tuple[rl.RLState, dict[str, Array]]]:
    """The pure BoNBoN step; `batch` as for `rl_step` (+ the responses when data="offline").
    With `lora_cfg` of rank > 0 the state's params are LoRA adapters on pi_ref's parameters
    (`lora.attach`), as in the CTRL step. With `cfg.shared_prompt` each prompt is run once for its
    best/worst pair and for the monitor's samples (a decoder without a linear lm head is refused,
    ValueError). `make_bonbon_split_step` is the same step in its two halves."""
    prepare, apply = make_bonbon_split_step(cfg, fns, reward_fn, optimizer, lora_cfg)

    def step(state: rl.RLState, frozen: rl.Frozen, batch: Mapping[str, Array], rng: Array):
        grads, metrics = prepare(state, frozen, batch, rng)
        return apply(state, grads), metrics

    return step


def make_bonbon_split_step(cfg: BoNBoNConfig, fns: DecoderFns, reward_fn: RewardFn,
                           optimizer: optax.GradientTransformation,
                           lora_cfg: lora.LoraConfig | None = None) -> SplitStep:
    """`make_bonbon_step` as a SplitStep (prepare: pi_ref's draws, their rewards, the pair's
    gradients and the metrics; apply: the optimiser's update), for the run loop's guard to hold
    one state (`loops.train.guard_nonfinite`)."""
    n, beta = cfg.n, cfg.pref_beta
    check_shared_prompt(cfg.shared_prompt, fns)

    def policy(params: Any, frozen: rl.Frozen) -> Any:
        if lora_cfg is None or not lora_cfg.rank:
            return params
        return lora.attach(frozen.ref_params, params, lora_cfg)

    def prepare(state: rl.RLState, frozen: rl.Frozen, batch: Mapping[str, Array], rng: Array):
        data_key, monitor_key = jax.random.split(rng)
        # Each prompt's `pairs_per_prompt` pairs are its row repeated (rows b*G .. b*G + G-1),
        # so below B counts pairs; the monitor samples the batch's own prompts.
        prompt_BxP, pmask_BxP, idx_B = (jnp.repeat(batch[k], cfg.pairs_per_prompt, 0) for k in
                                        ("prompt_BxP", "prompt_mask_BxP", "prompt_idx_B"))
        b = prompt_BxP.shape[0]
        if cfg.data == "offline":
            tokens_BxNxL, mask_BxNxL = batch["response_BxNxL"], batch["response_mask_BxNxL"]
            _check_offline(tokens_BxNxL, mask_BxNxL, b, n)
        else:
            s = sample_reference_responses(cfg, fns, frozen.ref_params, prompt_BxP, pmask_BxP,
                                           data_key)
            tokens_BxNxL, mask_BxNxL = s.tokens_BxNxL, s.mask_BxNxL
        rewards_BxN = reward_fn(frozen.reward_params, jnp.repeat(idx_B, n),
                                tokens_BxNxL.reshape(b * n, -1),
                                mask_BxNxL.reshape(b * n, -1)).reshape(b, n)
        best_B, worst_B = best_of_n(rewards_BxN).index_B, worst_of_n(rewards_BxN).index_B
        # Rows 2b and 2b+1 are prompt b's best and worst responses: one forward pass for both.
        resp_2BxL = jnp.stack([select(tokens_BxNxL, best_B), select(tokens_BxNxL, worst_B)],
                              1).reshape(2 * b, -1)
        rmask_2BxL = jnp.stack([select(mask_BxNxL, best_B), select(mask_BxNxL, worst_B)],
                               1).reshape(2 * b, -1)

        def pair_logprobs(params):     # B x 2: (best, worst)
            return losses.masked_sum(_logprobs(cfg, fns, params, prompt_BxP, pmask_BxP, resp_2BxL,
                                               rmask_2BxL), rmask_2BxL, -1).reshape(b, 2)

        ref_Bx2 = jax.lax.stop_gradient(pair_logprobs(frozen.ref_params))

        def loss_fn(params):
            logp_Bx2 = pair_logprobs(policy(params, frozen))
            return bonbon_loss(logp_Bx2[:, 0], logp_Bx2[:, 1], ref_Bx2[:, 0], ref_Bx2[:, 1], n,
                               cfg.alpha, beta, cfg.variant, pair_mask_B=best_B != worst_B)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # A NaN reward would otherwise leave the selection quietly (a row without any finite
        # one trains on an empty "tied" pair): the draws' reward metrics carry it, so the guarded
        # step is skipped, as a CTRL step with a NaN reward is.
        scored_B = ~jnp.any(jnp.isnan(rewards_BxN), axis=1)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "best_reward": jnp.mean(jnp.where(scored_B, select(rewards_BxN, best_B),
                                                     jnp.nan)),
                   "worst_reward": jnp.mean(jnp.where(scored_B, select(rewards_BxN, worst_B),
                                                      jnp.nan)),
                   "response_length": jnp.mean(jnp.sum(rmask_2BxL[::2], -1)),
                   **{k: aux[k] for k in ("nll", "pref", "h_mean", "accuracy", "beta", "tied")}}
        if cfg.monitor_samples:
            metrics.update(_monitor(cfg, fns, reward_fn, policy(state.params, frozen), frozen,
                                    batch["prompt_BxP"], batch["prompt_mask_BxP"],
                                    batch["prompt_idx_B"], monitor_key))
        return grads, metrics

    def apply(state: rl.RLState, grads: Any) -> rl.RLState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state._replace(params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, step=state.step + 1)

    return SplitStep(prepare, apply)


def _logprobs(cfg: BoNBoNConfig, fns: DecoderFns, params: Any, prompt_BxP: Array,
              pmask_BxP: Array, resp_RxL: Array, rmask_RxL: Array) -> Array:
    """Teacher-forced log-probs (RxL) of R = B*M responses, rows b*M + j continuing prompt b:
    each prompt run once with `cfg.shared_prompt`, else once per response."""
    if cfg.shared_prompt:
        return shared_sequence_logprobs(fns, params, prompt_BxP, pmask_BxP, resp_RxL, rmask_RxL)
    m = resp_RxL.shape[0] // prompt_BxP.shape[0]
    return sequence_logprobs(fns, params, jnp.repeat(prompt_BxP, m, 0),
                             jnp.repeat(pmask_BxP, m, 0), resp_RxL, rmask_RxL)


def _monitor(cfg: BoNBoNConfig, fns: DecoderFns, reward_fn: RewardFn, params: Any,
             frozen: rl.Frozen, prompt_BxP: Array, pmask_BxP: Array, idx_B: Array, rng: Array
             ) -> dict[str, Array]:
    """The RL step's rollout metrics for the current policy (no gradient)."""
    m = cfg.monitor_samples
    b = prompt_BxP.shape[0]
    s = sample(fns, params, prompt_BxP, pmask_BxP, rng, cfg.sampling(m))
    rollout = flatten_samples(prompt_BxP, pmask_BxP, s)
    rmask_RxL, logp_RxL = rollout[3], s.logp_BxNxL.reshape(b * m, -1)
    rewards_BxM = reward_fn(frozen.reward_params, jnp.repeat(idx_B, m), rollout[2],
                            rmask_RxL).reshape(b, m)
    cal_BxM = calibrate(rewards_BxM, *reference_rows(frozen, idx_B))
    out = {"reward": jnp.mean(rewards_BxM), "calibrated_reward": jnp.mean(cal_BxM),
           "response_length": jnp.mean(jnp.sum(rmask_RxL, -1))}
    if cfg.full_kl and cfg.shared_prompt:      # pi_ref's log-probs come with the KL terms
        terms = shared_prompt_path_terms(fns, params, fns, frozen.ref_params, prompt_BxP,
                                         pmask_BxP, s)
        ref_RxL = terms.ref_logp_RxL
        out.update(path_terms_metrics(terms))
    else:
        ref_RxL = _logprobs(cfg, fns, frozen.ref_params, prompt_BxP, pmask_BxP, *rollout[2:])
        if cfg.full_kl:
            out.update(rl.full_vocab_metrics(fns, params, frozen.ref_params, *rollout))
    for name, estimator in (("kl_k1", kl.kl_k1), ("kl_k3", kl.kl_k3)):
        per_token_RxL = estimator(logp_RxL, ref_RxL, rmask_RxL)
        out[name] = jnp.mean(losses.masked_sum(per_token_RxL, rmask_RxL, -1))
    return jax.lax.stop_gradient(out)
