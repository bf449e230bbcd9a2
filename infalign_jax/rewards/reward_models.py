"""Bradley-Terry reward models and reward ensembles (spec sections 0 and 6), pure and jittable.

    rm_step(state, batch) -> (state, metrics)           one optax step on the BT loss
    eval_fn(params, batch) -> metrics                   loss, accuracy, reward gap, ECE
    ensemble step: the same step `jax.vmap`-ed over a leading member axis E

A batch is the packed preference format of the data package: LEFT-padded prompts `prompt_BxP`,
`prompt_mask_BxP` and RIGHT-padded responses `chosen_BxL`, `chosen_mask_BxL`, `rejected_BxL`,
`rejected_mask_BxL`; optionally a per-pair `margin_B` (Llama 2's margin, replacing
`RMConfig.margin`) and, for ensembles, `member_idx_ExB`. The reward of (x, y) is the model's
reward head on [prompt | response], read at its last real token or averaged over its real tokens
(`ModelConfig.reward_pool`, `models.apply`).

Ensembles (Coste et al. 2023; the uncertainty-penalised BoN of Yang et al. 2024, arXiv 2402.13210):
every member starts from its own random initialisation (`init_ensemble`). Without
`member_idx_ExB` every member sees the same batch, so members differ by their initialisation only;
with it member e trains on rows `member_idx_ExB[e]` of the batch: its own bootstrap resample of the
training set (`bootstrap_counts`, drawn once), seen batch by batch (`bootstrap_indices`), so about
37% of the pairs never reach a member however many epochs it trains. The loss is the BT objective
of `preference_losses.bradley_terry_loss`, not restated here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import models
from infalign_jax.core.selection import uncertainty_penalised_scores
from infalign_jax.core.losses import check_rank, check_same_shape
from infalign_jax.core.preference_losses import bradley_terry_loss
from infalign_jax.core.types import RewardFn, TrainState, init_train_state
from infalign_jax.decoding.sampling import concat_prompt_response
from infalign_jax.infra.sharding import replicated, sharded_init, sharded_optimizer_init
from infalign_jax.infra import validate as check

Array = jax.Array
Params = Any
Batch = Mapping[str, Array]

BATCH_KEYS = ("prompt_BxP", "prompt_mask_BxP", "chosen_BxL", "chosen_mask_BxL", "rejected_BxL",
              "rejected_mask_BxL")


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """Reward-model training hyper-parameters; bad values fail here, naming the field.

    max_grad_norm: global-norm clipping (0 = none). total_steps > 0: linear warm-up over
    warmup_steps, then cosine decay to 10% of learning_rate at total_steps; total_steps = 0:
    warm-up (if any) then a constant rate.
    """

    learning_rate: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    margin: float = 0.0
    label_smoothing: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 0

    def __post_init__(self):
        check.numbers(self, ("learning_rate",), strict=True)
        check.numbers(self, ("weight_decay", "max_grad_norm", "margin"))
        # label_smoothing is the probability that the label is flipped: at 0.5 the loss is the
        # same for either label and pulls every reward gap to 0.
        if not (check.is_number(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5):
            check.fail(self, "label_smoothing", "a number in [0, 0.5) (at 0.5 a label says "
                                                "nothing)")
        check.ints(self, ("warmup_steps", "total_steps"), low=0)
        if self.total_steps and self.warmup_steps > self.total_steps:
            check.fail(self, "warmup_steps", f"<= total_steps={self.total_steps}")


def learning_rate_schedule(cfg: RMConfig) -> optax.Schedule:
    if cfg.total_steps > 0:
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps, 0.1 * cfg.learning_rate)
    if cfg.warmup_steps > 0:
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg: RMConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; weight decay only on matrices (not norms, biases)."""
    adamw = optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


# ------------------------------------------------------------------------------ rewards

def _check_reward_head(model_cfg: models.ModelConfig) -> None:
    if "reward" not in model_cfg.heads:
        raise ValueError(f"ModelConfig.heads must include 'reward' for a reward model, "
                         f"got {model_cfg.heads}")


def _check_batch(batch: Batch) -> int:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"preference batch is missing keys {missing}; expected {BATCH_KEYS}")
    b = batch["prompt_BxP"].shape[0]
    for key in BATCH_KEYS:
        shape = batch[key].shape
        if len(shape) != 2 or shape[0] != b:
            raise ValueError(f"batch[{key!r}] must be 2-D with {b} rows, got shape {shape}")
    for tokens, mask in zip(BATCH_KEYS[::2], BATCH_KEYS[1::2]):
        if batch[tokens].shape != batch[mask].shape:
            raise ValueError(f"batch[{mask!r}] shape {batch[mask].shape} must equal "
                             f"batch[{tokens!r}] shape {batch[tokens].shape}")
    return b


def sequence_rewards(model_cfg: models.ModelConfig, params: Params, prompt_BxP: Array,
                     prompt_mask_BxP: Array, response_BxL: Array, response_mask_BxL: Array
                     ) -> Array:
    """r(x, y) for each row: the reward head on [prompt | response], read where
    `model_cfg.reward_pool` says (`models.apply`)."""
    _check_reward_head(model_cfg)
    tokens_BxT, mask_BxT = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                                  response_mask_BxL)
    return models.apply(params, tokens_BxT, model_cfg, attention_mask_BxT=mask_BxT).reward


def _stacked_pairs(batch: Batch) -> tuple[int, tuple[Array, Array, Array, Array]]:
    """(B, (prompt, prompt_mask, response, response_mask)) of the 2B rows [chosen; rejected]."""
    b = _check_batch(batch)
    length = max(batch["chosen_BxL"].shape[1], batch["rejected_BxL"].shape[1])

    def stacked(chosen, rejected):  # right padding to a common length keeps masks valid
        return jnp.concatenate([jnp.pad(x, ((0, 0), (0, length - x.shape[1])))
                                for x in (batch[chosen], batch[rejected])])
    return b, (jnp.concatenate([batch["prompt_BxP"]] * 2),
               jnp.concatenate([batch["prompt_mask_BxP"]] * 2),
               stacked("chosen_BxL", "rejected_BxL"),
               stacked("chosen_mask_BxL", "rejected_mask_BxL").astype(bool))


def pair_rewards(model_cfg: models.ModelConfig, params: Params, batch: Batch
                 ) -> tuple[Array, Array]:
    """(r_chosen_B, r_rejected_B) from ONE forward pass over the 2B stacked sequences."""
    b, rows = _stacked_pairs(batch)
    r_2B = sequence_rewards(model_cfg, params, *rows)
    return r_2B[:b], r_2B[b:]


# The reward head's parameters: with a frozen trunk (and final norm), the reward is this head
# applied to a fixed feature per sequence (`pair_features`), so the head trains on cached features.
HEAD_KEYS = ("reward_head_kernel", "reward_head_bias")
FEATURE_KEYS = ("chosen_BxD", "rejected_BxD")


def sequence_features(model_cfg: models.ModelConfig, params: Params, prompt_BxP: Array,
                      prompt_mask_BxP: Array, response_BxL: Array, response_mask_BxL: Array
                      ) -> Array:
    """float32 BxD: the final (normed) hidden state of [prompt | response] where
    `sequence_rewards` reads the reward head (`model_cfg.reward_pool`: its last real token, or
    the mean over its real tokens; `models.pool_sequence`)."""
    _check_reward_head(model_cfg)
    tokens_BxT, mask_BxT = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                                  response_mask_BxL)
    hidden_BxTxD = models.apply(params, tokens_BxT, model_cfg, attention_mask_BxT=mask_BxT).hidden
    return models.pool_sequence(hidden_BxTxD, mask_BxT, model_cfg.reward_pool).astype(jnp.float32)


def pair_features(model_cfg: models.ModelConfig, params: Params, batch: Batch
                  ) -> tuple[Array, Array]:
    """(chosen_BxD, rejected_BxD) from one forward pass over the 2B stacked sequences."""
    b, rows = _stacked_pairs(batch)
    f_2BxD = sequence_features(model_cfg, params, *rows)
    return f_2BxD[:b], f_2BxD[b:]


def head_rewards(head: Params, features_BxD: Array) -> Array:
    """The reward head (`HEAD_KEYS`) on features: what `models.apply` computes at that token."""
    kernel, bias = head["reward_head_kernel"], head["reward_head_bias"]
    return (jnp.einsum("bd,do->bo", features_BxD.astype(jnp.float32), kernel.astype(jnp.float32))
            + bias.astype(jnp.float32))[:, 0]


def head_pair_rewards(head: Params, batch: Batch) -> tuple[Array, Array]:
    """(r_chosen_B, r_rejected_B) of a batch of cached features (`FEATURE_KEYS`)."""
    return tuple(head_rewards(head, batch[k]) for k in FEATURE_KEYS)


def _gap(r_chosen_B: Array, r_rejected_B: Array) -> Array:
    r_chosen_B = check_rank(r_chosen_B, 1, "r_chosen_B")
    r_rejected_B = check_rank(r_rejected_B, 1, "r_rejected_B")
    check_same_shape([r_chosen_B, r_rejected_B], "r_chosen_B vs r_rejected_B")
    return r_chosen_B - r_rejected_B


def pairwise_accuracy(r_chosen_B: Array, r_rejected_B: Array) -> Array:
    """mean_i ( 1[r_c,i > r_r,i] + 1/2 * 1[r_c,i = r_r,i] ): ties count 1/2 (spec 0); NaN
    where a reward is NaN (not a lost pair)."""
    gap_B = _gap(r_chosen_B, r_rejected_B)
    return jnp.mean(jnp.where(gap_B > 0, 1.0, jnp.where(gap_B == 0, 0.5,
                                                        jnp.where(jnp.isnan(gap_B), jnp.nan, 0.0))))


def expected_calibration_error(r_chosen_B: Array, r_rejected_B: Array, num_bins: int = 10
                               ) -> Array:
    """ECE of the Bradley-Terry probability p_i = sigmoid(r_c,i - r_r,i) (Guo et al. 2017).

    Symmetrised over the two orders: the 2B events are (p_i, outcome 1) and (1 - p_i, outcome 0),
    so the score does not depend on which response is listed first. With equal-width bins
    b = min(floor(p num_bins), num_bins - 1) over [0, 1],

        ECE = sum_b (n_b / 2B) |mean_b y - mean_b p| = sum_b |sum_b (y - p)| / 2B.
    """
    check.int_arg("num_bins", num_bins)
    gap_B = _gap(r_chosen_B, r_rejected_B)
    p_2B = jnp.concatenate([jax.nn.sigmoid(gap_B), jax.nn.sigmoid(-gap_B)])
    y_2B = jnp.concatenate([jnp.ones_like(gap_B), jnp.zeros_like(gap_B)])
    bins_2B = jnp.clip(jnp.floor(p_2B * num_bins).astype(jnp.int32), 0, num_bins - 1)
    onehot_2BxK = jax.nn.one_hot(bins_2B, num_bins, dtype=jnp.float32)
    gap_K = onehot_2BxK.T @ (y_2B - p_2B)
    return jnp.sum(jnp.abs(gap_K)) / p_2B.shape[0]


# ------------------------------------------------------------------------------ training

def init_rm_params(model_cfg: models.ModelConfig, rng: Array, mesh=None) -> Params:
    """Reward-model parameters; on a mesh, created directly in their sharded layout."""
    _check_reward_head(model_cfg)
    init_fn = functools.partial(models.init_params, model_cfg)
    if mesh is None:
        return jax.jit(init_fn)(rng)
    return sharded_init(init_fn, rng, mesh, models.param_logical_axes(model_cfg))


def init_rm_state(params: Params, optimizer: optax.GradientTransformation, mesh=None) -> TrainState:
    """State at step 0; on a mesh the optimizer moments take the parameters' shardings."""
    if mesh is None:
        return init_train_state(params, optimizer)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    return TrainState(params, sharded_optimizer_init(optimizer, params, mesh), step)


def _zero_bias_grad(grads: Params) -> Params:
    # The BT loss depends on r_c - r_r only, so the reward head's bias has gradient exactly 0;
    # what autodiff returns is rounding noise, which Adam would scale up to steps of size ~lr
    # (a random walk of the reward offset, different in every ensemble member).
    if isinstance(grads, Mapping) and "reward_head_bias" in grads:
        grads = dict(grads, reward_head_bias=jnp.zeros_like(grads["reward_head_bias"]))
    return grads


def stop_frozen_gradients(params: Params, trainable: Params | None) -> Params:
    """`params` with the gradient stopped where `trainable` (a tree of the same structure; each
    leaf True, False, or a bool array over the leaf's leading axes, e.g. (n_layers,) for the
    stacked layers) is False: frozen parameters get an exact zero gradient, and a wholly frozen
    leaf no backward pass at all. None: everything trains."""
    if trainable is None:
        return params

    def one(p, t):
        t = np.asarray(t, bool)
        if t.all():
            return p
        if not t.any():
            return jax.lax.stop_gradient(p)
        keep = jnp.asarray(t.reshape(t.shape + (1,) * (p.ndim - t.ndim)))
        return jnp.where(keep, p, jax.lax.stop_gradient(p))
    return jax.tree.map(one, params, trainable)


def make_rm_step(model_cfg: models.ModelConfig, cfg: RMConfig,
                 optimizer: optax.GradientTransformation, trainable: Params | None = None,
                 rewards: Callable[[Params, Batch], tuple[Array, Array]] | None = None
                 ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """The pure BT step. Metrics: loss, accuracy (ties 1/2), reward_gap (mean r_c - r_r), and
    grad_norm (global norm before clipping). Callers jit it (`jit_rm_step`). `trainable`: see
    `stop_frozen_gradients` (the optimizer must leave the frozen parameters alone too).
    `rewards(params, batch) -> (r_chosen_B, r_rejected_B)`: default `pair_rewards`;
    `head_pair_rewards` trains a reward head alone on cached features."""
    _check_reward_head(model_cfg)
    if rewards is None:
        rewards = functools.partial(pair_rewards, model_cfg)

    def rm_step(state: TrainState, batch: Batch):
        margin = batch.get("margin_B", cfg.margin)

        def loss_fn(params):
            params = stop_frozen_gradients(params, trainable)
            r_chosen_B, r_rejected_B = rewards(params, batch)
            return bradley_terry_loss(r_chosen_B, r_rejected_B, margin, cfg.label_smoothing)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = _zero_bias_grad(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": aux["accuracy"], "reward_gap": aux["reward_gap"],
                   "grad_norm": optax.tree.norm(grads)}
        return TrainState(params, opt_state, state.step + 1), metrics

    return rm_step


def jit_rm_step(rm_step: Callable, state: TrainState | None = None, mesh=None) -> Callable:
    """jit with the state donated. On a mesh, the state keeps its shardings and metrics are
    replicated; the batch keeps the layout it comes in with (`sharding.shard_batch`)."""
    if mesh is None:
        return jax.jit(rm_step, donate_argnums=0)
    if state is None:
        raise ValueError("jit_rm_step: a mesh needs the (sharded) state to read shardings from")
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    return jax.jit(rm_step, out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def make_rm_eval(model_cfg: models.ModelConfig, num_bins: int = 10
                 ) -> Callable[[Params, Batch], dict[str, Array]]:
    """eval_fn(params, batch): plain BT loss (no margin or smoothing), accuracy, reward_gap, ece."""
    _check_reward_head(model_cfg)

    def eval_fn(params: Params, batch: Batch) -> dict[str, Array]:
        r_chosen_B, r_rejected_B = pair_rewards(model_cfg, params, batch)
        loss, aux = bradley_terry_loss(r_chosen_B, r_rejected_B)
        return {"loss": loss, "accuracy": pairwise_accuracy(r_chosen_B, r_rejected_B),
                "reward_gap": aux["reward_gap"],
                "ece": expected_calibration_error(r_chosen_B, r_rejected_B, num_bins)}

    return eval_fn


# ------------------------------------------------------------------------------ ensembles

def init_ensemble(model_cfg: models.ModelConfig, rng: Array, size: int) -> Params:
    """`size` independently initialised reward models, every leaf stacked on a leading E axis."""
    _check_reward_head(model_cfg)
    check.int_arg("init_ensemble: size", size)
    keys = jax.random.split(rng, size)
    return jax.jit(jax.vmap(lambda key: models.init_params(model_cfg, key)))(keys)


def init_ensemble_state(params_E: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """One TrainState per member, stacked (the step counter too: shape (E,))."""
    return jax.vmap(lambda p: init_rm_state(p, optimizer))(params_E)


def bootstrap_counts(rng: Array, size: int, n: int) -> Array:
    """counts_ExN: how often each of the n training examples is in member e's bootstrap resample
    of the training set (n draws with replacement; for each member about 37% are 0). Drawn once
    per run, so the members' data differ for the whole run, not only batch by batch."""
    draws_ExN = jax.random.randint(rng, (size, n), 0, n)
    return jax.vmap(lambda d: jnp.bincount(d, length=n))(draws_ExN)


def bootstrap_indices(rng: Array, counts_ExB: Array) -> Array:
    """member_idx_ExB: for each member, B rows of the batch drawn with replacement in proportion
    to its counts of their examples (`bootstrap_counts` at the batch's rows): the member's resample
    seen through this batch, rows it left out never drawn. A member whose resample holds none of
    the batch's rows draws them uniformly (probability about 0.37^B)."""
    counts_ExB = jnp.asarray(counts_ExB, jnp.float32)
    none_Ex1 = jnp.sum(counts_ExB, axis=1, keepdims=True) == 0
    logits_ExB = jnp.log(jnp.where(none_Ex1, 1.0, counts_ExB))   # log 0 = -inf: never drawn
    size, batch = counts_ExB.shape
    return jax.random.categorical(rng, logits_ExB[:, None, :], axis=-1, shape=(size, batch))


def make_ensemble_rm_step(model_cfg: models.ModelConfig, cfg: RMConfig,
                          optimizer: optax.GradientTransformation,
                          trainable: Params | None = None
                          ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """`make_rm_step` vmapped over the member axis; every metric comes back with shape (E,).

    With `batch["member_idx_ExB"]` member e trains on the rows member_idx_ExB[e] of the batch
    (bootstrap); without it all members share the batch and differ only by initialisation.
    """
    rm_step = make_rm_step(model_cfg, cfg, optimizer, trainable)

    def member_step(state: TrainState, batch: Batch, idx_B: Array):
        return rm_step(state, jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), batch))

    def ensemble_step(state_E: TrainState, batch: Batch):
        shared = {k: v for k, v in batch.items() if k != "member_idx_ExB"}
        if "member_idx_ExB" not in batch:
            return jax.vmap(rm_step, in_axes=(0, None))(state_E, shared)
        idx_ExB = batch["member_idx_ExB"]
        num_members = state_E.step.shape[0]
        if idx_ExB.ndim != 2 or idx_ExB.shape[0] != num_members:
            raise ValueError(f"batch['member_idx_ExB'] must have shape ({num_members}, B), "
                             f"got {idx_ExB.shape}")
        return jax.vmap(member_step, in_axes=(0, None, 0))(state_E, shared, idx_ExB)

    return ensemble_step


def ensemble_rewards(model_cfg: models.ModelConfig, params_E: Params, tokens_BxT: Array,
                     mask_BxT: Array, ddof: int = 0) -> tuple[Array, Array, Array]:
    """(mean_B, std_B, all_ExB) of the members' rewards. `all_ExB.reshape(E, B, N)` is the
    `rewards_ExBxN` of `inference.uncertainty_bon` (same ddof convention: 0 population, 1 unbiased).
    """
    _check_reward_head(model_cfg)
    all_ExB = jax.vmap(lambda p: models.apply(p, tokens_BxT, model_cfg,
                                              attention_mask_BxT=mask_BxT).reward)(params_E)
    if ddof not in (0, 1) or all_ExB.shape[0] - ddof < 1:
        raise ValueError(f"ddof must be 0 or 1 and smaller than the ensemble size "
                         f"{all_ExB.shape[0]}, got {ddof}")
    return jnp.mean(all_ExB, axis=0), jnp.std(all_ExB, axis=0, ddof=ddof), all_ExB


def reward_fn_with_prompt_table(model_cfg: models.ModelConfig) -> RewardFn:
    """`core.types.RewardFn` of a reward model whose frozen parameters carry the (left-padded)
    prompt table: reward_params = {"params", "prompts_XxP", "prompt_mask_XxP"}; it scores
    [prompts_XxP[prompt_idx] | response]. The table is a jit argument (shardable), not a
    compile-time constant."""
    _check_reward_head(model_cfg)

    def reward_fn(reward_params, prompt_idx_R, response_RxL, response_mask_RxL):
        return sequence_rewards(model_cfg, reward_params["params"],
                                reward_params["prompts_XxP"][prompt_idx_R],
                                reward_params["prompt_mask_XxP"][prompt_idx_R],
                                response_RxL, response_mask_RxL)

    return reward_fn


def reward_fn_from_model(model_cfg: models.ModelConfig, prompts_XxP: Array,
                         prompt_mask_XxP: Array) -> RewardFn:
    """`core.types.RewardFn` of a reward model: reward_fn(params, prompt_idx_R, response_RxL, mask_RxL)
    scores [prompts_XxP[prompt_idx] | response]. The (left-padded) prompt table is captured in
    the closure, so under jit it is a compile-time constant: keep it to the prompts in play
    (`reward_fn_with_prompt_table` takes it as an argument instead)."""
    with_table = reward_fn_with_prompt_table(model_cfg)
    table = {"prompts_XxP": jnp.asarray(prompts_XxP),
             "prompt_mask_XxP": jnp.asarray(prompt_mask_XxP, bool)}

    def reward_fn(reward_params, prompt_idx_R, response_RxL, response_mask_RxL):
        return with_table({"params": reward_params, **table}, prompt_idx_R, response_RxL,
                          response_mask_RxL)

    return reward_fn


def ensemble_reward_fn_from_model(model_cfg: models.ModelConfig, prompts_XxP: Array,
                                  prompt_mask_XxP: Array, k: float, penalty: str = "std",
                                  ddof: int = 0) -> RewardFn:
    """`core.types.RewardFn` of an ensemble (reward_params = params_E): mu - k sigma ("std") or
    mu - k sigma^2 ("var") over members (Yang et al. 2024, via
    `inference.uncertainty_penalised_scores`)."""
    _check_reward_head(model_cfg)
    # Validates k and penalty now rather than at the first RL step.
    uncertainty_penalised_scores(jnp.zeros((1, 1)), jnp.zeros((1, 1)), k, penalty)
    prompts_XxP, prompt_mask_XxP = jnp.asarray(prompts_XxP), jnp.asarray(prompt_mask_XxP, bool)

    def reward_fn(params_E, prompt_idx_R, response_RxL, response_mask_RxL):
        tokens_RxT, mask_RxT = concat_prompt_response(
            prompts_XxP[prompt_idx_R], prompt_mask_XxP[prompt_idx_R], response_RxL,
            response_mask_RxL)
        mean_R, std_R, _ = ensemble_rewards(model_cfg, params_E, tokens_RxT, mask_RxT, ddof)
        return uncertainty_penalised_scores(mean_R[None], std_R[None], k, penalty)[0]

    return reward_fn
