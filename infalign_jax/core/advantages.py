"""Per-token rewards and advantage estimators for KL-regularised RL (spec section 1.5).

The InfAlign-CTRL step (spec 1.5, Algorithm 1 line 3) is standard RLHF with the transformed
calibrated reward R = Phi(C) as the sequence score and a per-token KL penalty folded into the
reward. This module turns (score, log-probs, values, mask) into per-token rewards and advantages:

| function                 | formula                                  | paper                    |
|--------------------------|------------------------------------------|--------------------------|
| kl_shaped_rewards        | -beta k1_t (+ score at the last valid t) | Ziegler et al. 2019      |
| gae_advantages           | A_t = sum_l (gamma lam)^l delta_{t+l}    | Schulman et al. 2016     |
| discounted_returns       | G_t = sum_l gamma^l r_{t+l}              | Sutton & Barto           |
| rloo_advantages          | A_i = r_i - mean_{j != i} r_j            | Kool 2019; Ahmadian 2024 |
| mean_baseline_advantages | A_i = r_i - mean_j r_j                   | REINFORCE baseline       |
| whiten                   | (x - mean) / sqrt(var + eps), masked     | PPO practice             |

Masks (`mask_BxT`) mark valid response tokens; they need not be contiguous (a left-padded prompt
region and right padding may both be masked): the recursions skip masked positions, so "the next
token" always means the next *valid* one, and masked outputs are exactly 0. No jit inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infalign_jax.core.kl import kl_per_token
from infalign_jax.core.losses import (last_valid_index, mask_like, check_rank, check_same_shape, check_scalar,
                                      masked_mean)

Array = jax.Array


def kl_shaped_rewards(score_B: Array, logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array,
                      beta: float | Array, estimator: str = "k1") -> Array:
    """Per-token rewards of KL-regularised RLHF: r_t = -beta k(t) + 1[t = last valid] * score.

    This is the standard shaping (Ziegler et al. 2019, arXiv 1909.08593; Stiennon et al. 2020):
    the sequence reward R(x, y) = score - beta * sum_t (log pi - log pi_ref), split over tokens so
    that a per-token critic sees the penalty where it is incurred. With `estimator="k1"` the
    summed reward is exactly score - beta * log pi(y|x)/pi_ref(y|x). The score is the transformed
    calibrated reward Phi(C(x, y)) (spec 1.5). Rows with no valid token get all-zero rewards.
    Inputs are rollout data: no gradient is meant to flow through the result.
    """
    score_B = check_rank(score_B, 1, "score_B")
    logp_BxT = check_rank(logp_BxT, 2, "logp_BxT")
    if score_B.shape[0] != logp_BxT.shape[0]:
        raise ValueError(f"score_B has {score_B.shape[0]} rows, logp_BxT has {logp_BxT.shape[0]}")
    beta = check_scalar(beta, "beta", low=0.0)
    mask_BxT = mask_like(mask_BxT, logp_BxT)
    rewards_BxT = -beta * kl_per_token(estimator, logp_BxT, ref_logp_BxT, mask_BxT)
    last_B, has_valid_B = last_valid_index(mask_BxT)
    at_last_BxT = jnp.arange(logp_BxT.shape[1])[None, :] == last_B[:, None]
    at_last_BxT = at_last_BxT & has_valid_B[:, None]
    return rewards_BxT + jnp.where(at_last_BxT, score_B[:, None], 0.0)


def gae_advantages(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array,
                   gamma: float | Array = 1.0, lam: float | Array = 0.95,
                   last_value_B: Array | None = None
                   ) -> tuple[Array, Array]:
    """Generalised advantage estimation over masked sequences (Schulman et al. 2016,
    arXiv 1506.02438, eq. 16), and the matching value targets.

    delta_t = r_t + gamma V_{t'} - V_t,   A_t = delta_t + gamma lam A_{t'},
    with t' the next valid token; after the last valid token V = `last_value_B` (default 0: the
    response ended with EOS, a terminal state) and A = 0. Returns (advantages_BxT, returns_BxT)
    with returns = A + V (the TD(lambda) value target), both 0 on masked tokens. Computed by a
    reverse `jax.lax.scan` over time. lam = 1 gives Monte-Carlo returns minus V; lam = 0 one-step
    TD errors.
    """
    rewards_BxT = check_rank(rewards_BxT, 2, "rewards_BxT")
    values_BxT = check_rank(values_BxT, 2, "values_BxT")
    check_same_shape([rewards_BxT, values_BxT], "rewards_BxT vs values_BxT")
    mask_BxT = mask_like(mask_BxT, rewards_BxT)
    gamma = check_scalar(gamma, "gamma", low=0.0, high=1.0)
    lam = check_scalar(lam, "lam", low=0.0, high=1.0)
    B = rewards_BxT.shape[0]
    if last_value_B is None:
        last_value_B = jnp.zeros((B,), jnp.float32)
    last_value_B = check_rank(last_value_B, 1, "last_value_B")
    if last_value_B.shape[0] != B:
        raise ValueError(f"last_value_B has {last_value_B.shape[0]} rows, rewards_BxT has {B}")
    rewards_BxT = jnp.where(mask_BxT, rewards_BxT, 0.0)
    values_BxT = jnp.where(mask_BxT, values_BxT, 0.0)

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        r_B, v_B, m_B = xs
        adv_B = r_B + gamma * next_value_B - v_B + gamma * lam * next_adv_B
        # A masked position leaves the carry untouched, so it is skipped by the recursion.
        carry = (jnp.where(m_B, v_B, next_value_B), jnp.where(m_B, adv_B, next_adv_B))
        return carry, jnp.where(m_B, adv_B, 0.0)

    init = (last_value_B, jnp.zeros((B,), jnp.float32))
    _, adv_TxB = jax.lax.scan(step, init, (rewards_BxT.T, values_BxT.T, mask_BxT.T), reverse=True)
    advantages_BxT = adv_TxB.T
    returns_BxT = jnp.where(mask_BxT, advantages_BxT + values_BxT, 0.0)
    return advantages_BxT, returns_BxT


def discounted_returns(rewards_BxT: Array, mask_BxT: Array, gamma: float | Array = 1.0,
                       last_value_B: Array | None = None) -> Array:
    """Reward-to-go G_t = sum_{l >= 0} gamma^l r_{t+l} over valid tokens (+ gamma^k last value).

    GAE with V = 0 and lam = 1 is exactly this (the sum telescopes), which is how it is computed.
    """
    zeros_BxT = jnp.zeros(jnp.shape(rewards_BxT), jnp.float32)
    advantages_BxT, _ = gae_advantages(rewards_BxT, zeros_BxT, mask_BxT, gamma, 1.0, last_value_B)
    return advantages_BxT


def rloo_advantages(scores_BxM: Array) -> Array:
    """Leave-one-out advantages for M samples per prompt: A_i = r_i - (1/(M-1)) sum_{j != i} r_j.

    Kool et al. 2019 (ICLR workshop, "Buy 4 REINFORCE samples, get a baseline for free!");
    Ahmadian et al. 2024 (arXiv 2402.14740, RLOO for RLHF). The baseline of sample i does not
    depend on sample i, so the REINFORCE estimator stays unbiased. Equivalent to
    M/(M-1) (r_i - mean_j r_j). M = 1 has no other sample: the baseline is 0 and A = r (finite,
    plain REINFORCE).
    """
    scores_BxM = check_rank(scores_BxM, 2, "scores_BxM")
    M = scores_BxM.shape[1]
    others_BxM = jnp.sum(scores_BxM, axis=1, keepdims=True) - scores_BxM
    return scores_BxM - others_BxM / max(M - 1, 1)


def mean_baseline_advantages(scores_BxM: Array) -> Array:
    """A_i = r_i - mean_j r_j over the M samples of each prompt (the mean includes i itself).

    Biased by a factor (M-1)/M relative to RLOO's gradient; M = 1 gives A = 0.
    """
    scores_BxM = check_rank(scores_BxM, 2, "scores_BxM")
    return scores_BxM - jnp.mean(scores_BxM, axis=1, keepdims=True)


def whiten(x: Array, mask: Array | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> Array:
    """(x - mean) / sqrt(var + eps) with mean and (population) variance over valid entries only.

    `shift_mean=False` adds the original mean back afterwards, (x - mean) / std + mean, TRL's
    convention for rewards: unit spread around the old mean. It is not a rescaling of x (it does
    not keep signs: [0.1, 0.2, 0.3] -> [-1.02, 0.2, 1.42]). Masked entries come out 0. Any
    rank; mask of the same shape.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = mask_like(mask, x, "mask")
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(jnp.where(mask, x - mean, 0.0)), mask)
    out = jnp.where(mask, x - mean, 0.0) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0.0)
