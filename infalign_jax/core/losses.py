"""Pure losses of KL-regularised RL and preference learning (spec sections 1.5, 4, 5).

Everything here is a function of arrays (log-probs of the sampled tokens, logits, masks, rewards,
values); models and trainers live elsewhere and call these inside their own `jax.jit`.

| function              | formula                                   | paper                   |
|-----------------------|-------------------------------------------|-------------------------|
| ppo_policy_loss       | E max(-A rho, -A clip(rho, 1-eps, 1+eps)) | Schulman 2017, eq. 7    |
| value_loss            | E 1/2 max((V-R)^2, (V_clip-R)^2)          | baselines ppo2 practice |
| reinforce_loss        | -A sum_t log pi                           | Williams 1992; RLOO     |

The KL family (estimators, exact KL, the KL-in-the-loss term) lives in `kl.py`; preference
losses (Bradley-Terry, DPO, IPO, BoNBoN) in `preference_losses.py`; advantages
(KL-shaped rewards, GAE, RLOO) in `advantages.py`.

Conventions:
  * `mask_BxT` marks valid response tokens (bool or 0/1). Masked positions never count: inputs
    there are replaced by 0 *before* any exp/log, so garbage after EOS (even inf/NaN) changes
    neither values nor gradients (a plain `mask * f(x)` would leak NaN through 0 * inf).
  * All maths in float32 (STYLE habit 5), whatever the input dtype.
  * Bad shapes or options raise `ValueError` naming the argument. Scalars such as `beta` may be
    traced arrays (a KL controller adapts beta inside the jitted step); they are only range-checked
    when they are concrete Python numbers.
  * No `jax.jit` inside; callers jit and vmap.
"""

from __future__ import annotations

import math
import numbers

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

REDUCTIONS = ("token", "sequence", "sequence_sum")


# --------------------------------------------------------------------------- checks and masks
def check_rank(x: Array, rank: int, name: str) -> Array:
    """float32 copy of x after a rank check that raises ValueError naming the tensor."""
    x = jnp.asarray(x)
    chex.assert_rank(x, rank, custom_message=name, exception_type=ValueError)
    return x.astype(jnp.float32)


def check_same_shape(arrays: list[Array], names: str) -> None:
    chex.assert_equal_shape(arrays, custom_message=names, exception_type=ValueError)


def check_scalar(value: float | Array, name: str, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> Array:
    """A float32 scalar; range-checked only when it is a concrete Python/NumPy number."""
    arr = jnp.asarray(value, jnp.float32)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
        if low is not None and (v < low or (low_open and v == low)):
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
        if high is not None and (v > high or (high_open and v == high)):
            raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return arr


def mask_like(mask_BxT: Array | None, x_BxT: Array, name: str = "mask_BxT") -> Array:
    """Boolean mask of x's shape (all True when None)."""
    if mask_BxT is None:
        return jnp.ones(x_BxT.shape, bool)
    mask_BxT = jnp.asarray(mask_BxT)
    check_same_shape([x_BxT, mask_BxT], f"{name} must match the token tensor")
    return mask_BxT.astype(bool)


def last_valid_index(mask_BxT: Array) -> tuple[Array, Array]:
    """(index_B, has_valid_B): the position of the last valid token per row (0 where none)."""
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    T = mask_BxT.shape[-1]
    index_B = T - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=-1)
    has_valid_B = jnp.any(mask_BxT, axis=-1)
    return jnp.where(has_valid_B, index_B, 0).astype(jnp.int32), has_valid_B


def masked_sum(x_BxT: Array, mask_BxT: Array, axis: int | None = None) -> Array:
    """sum of x over valid tokens (masked entries contribute exactly 0, even if inf/NaN)."""
    x_BxT = jnp.asarray(x_BxT, jnp.float32)
    mask_BxT = mask_like(mask_BxT, x_BxT)
    return jnp.sum(jnp.where(mask_BxT, x_BxT, 0.0), axis=axis)


def masked_mean(x_BxT: Array, mask_BxT: Array, axis: int | None = None) -> Array:
    """Mean over valid tokens; 0 where there is no valid token (never NaN)."""
    count = masked_sum(jnp.ones(jnp.shape(x_BxT), jnp.float32), mask_BxT, axis)
    return masked_sum(x_BxT, mask_BxT, axis) / jnp.maximum(count, 1.0)


def reduce_tokens(loss_BxT: Array, mask_BxT: Array, reduction: str = "token") -> Array:
    """Scalar from per-token values.

    "token":        sum_{b,t} m l / sum_{b,t} m   (every valid token weighs the same);
    "sequence":     mean over sequences with >= 1 valid token of the per-sequence token mean
                    (every sequence weighs the same, whatever its length);
    "sequence_sum": sum_{b,t} m l / B, the per-sequence token *sum* averaged over sequences.
    Only "sequence_sum" gives a policy-gradient surrogate sum_t A_t log pi(y_t) the gradient of
    the sequence objective when responses have different lengths: "sequence" weighs each
    sequence by 1/len (its stationary point is not pi*), and "token" divides by the batch's
    token count, which depends on the sampled lengths (Liu et al. 2025, arXiv 2503.20783, "Dr. GRPO").
    """
    if reduction == "token":
        return masked_mean(loss_BxT, mask_BxT)
    if reduction == "sequence":
        per_seq_B = masked_mean(loss_BxT, mask_BxT, axis=-1)
        has_B = jnp.any(jnp.asarray(mask_BxT).astype(bool), axis=-1)
        return masked_mean(per_seq_B, has_B)
    if reduction == "sequence_sum":
        return jnp.sum(masked_sum(loss_BxT, mask_BxT, axis=-1)) / loss_BxT.shape[0]
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# --------------------------------------------------------------------------- policy gradient
def _token_advantages(advantages: Array, like_BxT: Array) -> Array:
    """Per-token advantages: a BxT array as is, or a per-sequence B array broadcast over T."""
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], like_BxT.shape)
    chex.assert_rank(advantages, 2, custom_message="advantages (B or BxT)",
                     exception_type=ValueError)
    check_same_shape([advantages, like_BxT], "advantages vs logp_BxT")
    # Advantages are targets: no gradient may flow into the critic or the reward through them.
    return jax.lax.stop_gradient(advantages)


def ppo_policy_loss(logp_BxT: Array, old_logp_BxT: Array, advantages: Array, mask_BxT: Array,
                    clip_eps: float = 0.2, reduction: str = "token") -> tuple[Array, dict]:
    """PPO clipped surrogate, as a loss to minimise (Schulman et al. 2017, arXiv 1707.06347, eq. 7).

    rho_t = exp(log pi_theta(y_t) - log pi_old(y_t));
    loss = reduce_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)).

    `advantages` is BxT (e.g. GAE) or B (one value per sequence, e.g. RLOO), treated as a constant.
    `reduction` is "token" or "sequence" (see `reduce_tokens`). At rho = 1 the gradient equals the
    plain policy gradient -A grad log pi; outside [1 - eps, 1 + eps], in the direction that would
    move rho further out, it is 0.

    Metrics: clip_fraction (share of valid tokens with |rho - 1| > eps), approx_kl (masked mean of
    k3 of pi_old vs pi_theta, i.e. (rho - 1) - log rho: an estimate of KL(pi_old || pi_theta)
    under the old samples), ratio_mean.
    """
    clip_eps = check_scalar(clip_eps, "clip_eps", low=0.0, low_open=True)
    logp_BxT = check_rank(logp_BxT, 2, "logp_BxT")
    old_logp_BxT = check_rank(old_logp_BxT, 2, "old_logp_BxT")
    check_same_shape([logp_BxT, old_logp_BxT], "logp_BxT vs old_logp_BxT")
    mask_BxT = mask_like(mask_BxT, logp_BxT)
    adv_BxT = _token_advantages(advantages, logp_BxT)
    log_ratio_BxT = jnp.where(
        mask_BxT, logp_BxT - jax.lax.stop_gradient(old_logp_BxT), 0.0)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps)
    loss_BxT = jnp.maximum(-adv_BxT * ratio_BxT, -adv_BxT * clipped_BxT)
    loss = reduce_tokens(loss_BxT, mask_BxT, reduction)
    ratio_BxT = jax.lax.stop_gradient(ratio_BxT)
    metrics = {
        "clip_fraction": masked_mean((jnp.abs(ratio_BxT - 1.0) > clip_eps).astype(jnp.float32),
                                     mask_BxT),
        "approx_kl": masked_mean(jnp.expm1(jax.lax.stop_gradient(log_ratio_BxT))
                                 - jax.lax.stop_gradient(log_ratio_BxT), mask_BxT),
        "ratio_mean": masked_mean(ratio_BxT, mask_BxT),
    }
    return loss, metrics


def value_loss(values_BxT: Array, old_values_BxT: Array, returns_BxT: Array, mask_BxT: Array,
               clip_eps: float | None = 0.2, reduction: str = "token") -> tuple[Array, dict]:
    """Clipped value loss: reduce_t 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2).

    The clipping is not in the PPO paper; it is the OpenAI baselines `ppo2` practice (studied by
    Engstrom et al. 2020, "Implementation matters in deep policy gradients"). `clip_eps=None`
    gives the plain squared error 1/2 (V - R)^2. Returns are constants (stop-gradient).
    Metric: clip_fraction, the share of valid tokens where the clipped term is the larger one.
    """
    values_BxT = check_rank(values_BxT, 2, "values_BxT")
    old_values_BxT = check_rank(old_values_BxT, 2, "old_values_BxT")
    returns_BxT = check_rank(returns_BxT, 2, "returns_BxT")
    check_same_shape([values_BxT, old_values_BxT, returns_BxT],
                     "values_BxT vs old_values_BxT vs returns_BxT")
    mask_BxT = mask_like(mask_BxT, values_BxT)
    values_BxT = jnp.where(mask_BxT, values_BxT, 0.0)
    old_BxT = jnp.where(mask_BxT, jax.lax.stop_gradient(old_values_BxT), 0.0)
    returns_BxT = jnp.where(mask_BxT, jax.lax.stop_gradient(returns_BxT), 0.0)
    plain_BxT = 0.5 * jnp.square(values_BxT - returns_BxT)
    if clip_eps is None:
        return reduce_tokens(plain_BxT, mask_BxT, reduction), {"clip_fraction": jnp.float32(0)}
    clip_eps = check_scalar(clip_eps, "clip_eps", low=0.0, low_open=True)
    clipped_v_BxT = old_BxT + jnp.clip(values_BxT - old_BxT, -clip_eps, clip_eps)
    clipped_BxT = 0.5 * jnp.square(clipped_v_BxT - returns_BxT)
    loss = reduce_tokens(jnp.maximum(plain_BxT, clipped_BxT), mask_BxT, reduction)
    frac = masked_mean((clipped_BxT > plain_BxT).astype(jnp.float32), mask_BxT)
    return loss, {"clip_fraction": jax.lax.stop_gradient(frac)}


def reinforce_loss(logp_BxT: Array, mask_BxT: Array, advantages_B: Array) -> Array:
    """REINFORCE with a baseline: mean_b -A_b sum_t log pi(y_bt) (Williams 1992).

    With RLOO advantages (`advantages.rloo_advantages`) this is the RLOO estimator of Kool et al.
    2019 ("Buy 4 REINFORCE samples, get a baseline for free!") as used for RLHF by Ahmadian et al.
    2024 (arXiv 2402.14740). A is a constant (stop-gradient); the log-prob is the sequence sum.
    """
    logp_BxT = check_rank(logp_BxT, 2, "logp_BxT")
    advantages_B = check_rank(advantages_B, 1, "advantages_B")
    if advantages_B.shape[0] != logp_BxT.shape[0]:
        raise ValueError(f"advantages_B has {advantages_B.shape[0]} rows, logp_BxT has "
                         f"{logp_BxT.shape[0]}")
    seq_logp_B = masked_sum(logp_BxT, mask_like(mask_BxT, logp_BxT), axis=-1)
    return jnp.mean(-jax.lax.stop_gradient(advantages_B) * seq_logp_B)


