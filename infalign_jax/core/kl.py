"""The KL family: per-token estimators, exact full-vocabulary KL, sequence estimates, BoN bounds.

| function                 | what                                                  | paper          |
|--------------------------|-------------------------------------------------------|----------------|
| kl_k1 / kl_k2 / kl_k3    | per token: d, d^2/2, e^-d - 1 + d  (d = logp - ref)    | Schulman 2020  |
| kl_from_logits           | per position: sum_v p (log p - log q), exact           | definition     |
| entropy_from_logits      | per position: -sum_v p log p                          | definition     |
| kl_score_function_loss   | sum_t rho_t (sum_{t'>=t} d_t' - b): grad of seq. KL    | Williams 1992  |
| kl_penalty_loss          | beta E k3 (a per-token penalty; not the seq. KL grad) | Schulman; GRPO |
| sequence_kl              | KLEstimate: per-sequence sums of k1/k2/k3, mean, s.e. | Schulman 2020  |
| sequence_kl_from_logits  | KLEstimate of the summed exact per-position KLs       | Rao-Blackwell  |
| bon_kl_bound             | KL(BoN_n(pi_ref) || pi_ref) <= log n - (n-1)/n          | Beirami 2024   |
| blockwise_cd_kl_bound    | (tokens/block) (log k - (k-1)/k) per sequence         | Mudgal 2024    |

Conventions (as `losses`): `mask_BxT` marks valid response tokens; masked positions are replaced
by 0 *before* any exp/log, so garbage after EOS (even inf/NaN) changes neither values nor
gradients; maths in float32; bad shapes raise `ValueError` naming the argument; no `jax.jit`
inside. The bounds are numpy float64 (they are numbers for a report, not device arrays).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.core.losses import (check_rank, check_same_shape, check_scalar, mask_like,
                                      masked_sum, reduce_tokens)

Array = jax.Array


# --------------------------------------------------------------------------- per token
def _log_ratio(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array | None) -> Array:
    logp_BxT = check_rank(logp_BxT, 2, "logp_BxT")
    ref_logp_BxT = check_rank(ref_logp_BxT, 2, "ref_logp_BxT")
    check_same_shape([logp_BxT, ref_logp_BxT], "logp_BxT vs ref_logp_BxT")
    mask_BxT = mask_like(mask_BxT, logp_BxT)
    d_BxT = logp_BxT.astype(jnp.float32) - ref_logp_BxT.astype(jnp.float32)
    return jnp.where(mask_BxT, d_BxT, 0.0)


def kl_k1(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array | None = None) -> Array:
    """k1 = log pi(y_t) - log pi_ref(y_t): unbiased for KL(pi || pi_ref) under y ~ pi, can be < 0.

    Schulman (2020), "Approximating KL divergence" (k1 = -log r with r = pi_ref / pi). 0 on masked
    tokens.
    """
    return _log_ratio(logp_BxT, ref_logp_BxT, mask_BxT)


def kl_k2(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array | None = None) -> Array:
    """k2 = (log pi - log pi_ref)^2 / 2: biased, low variance, >= 0 (Schulman 2020)."""
    return 0.5 * jnp.square(_log_ratio(logp_BxT, ref_logp_BxT, mask_BxT))


def kl_k3(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array | None = None) -> Array:
    """k3 = r - 1 - log r with r = pi_ref / pi: unbiased for KL(pi || pi_ref) and always >= 0.

    Schulman (2020): E_pi[r - 1] = 0, so adding it to k1 keeps the mean and, since
    log r <= r - 1, makes every sample non-negative. Written as expm1(-d) + d with d = log pi -
    log pi_ref for accuracy near d = 0; exactly 0 for identical policies.
    """
    d_BxT = _log_ratio(logp_BxT, ref_logp_BxT, mask_BxT)
    return jnp.expm1(-d_BxT) + d_BxT


KL_ESTIMATORS: dict[str, Callable[..., Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_per_token(estimator: str, logp_BxT: Array, ref_logp_BxT: Array,
                 mask_BxT: Array | None = None) -> Array:
    """The named estimator (one of KL_ESTIMATORS) per token."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp_BxT, ref_logp_BxT, mask_BxT)


def _live_logits(logits_BxTxV: Array, mask_BxT: Array) -> Array:
    """float32 logits with masked positions' replaced by 0 (a uniform row) before any exp/log."""
    return jnp.where(mask_BxT[..., None], logits_BxTxV.astype(jnp.float32), 0.0)


def kl_from_logits(logits_BxTxV: Array, ref_logits_BxTxV: Array,
                   mask_BxT: Array | None = None) -> Array:
    """KL(pi(.|prefix) || pi_ref(.|prefix)) per position, summed over the full vocabulary.

    sum_v p_v (log p_v - log q_v) with log-softmax in float32. Terms with p_v = 0 count 0 (also
    where q_v = 0); p_v > 0 = q_v gives +inf, as it should. 0 on masked tokens.
    """
    logits_BxTxV = check_rank(logits_BxTxV, 3, "logits_BxTxV")
    ref_logits_BxTxV = check_rank(ref_logits_BxTxV, 3, "ref_logits_BxTxV")
    check_same_shape([logits_BxTxV, ref_logits_BxTxV], "logits_BxTxV vs ref_logits_BxTxV")
    mask_BxT = mask_like(mask_BxT, logits_BxTxV[..., 0])
    # Masked positions' logits replaced before the softmax (module docstring): a NaN or inf
    # there made the gradient NaN through the dropped branch.
    logp_BxTxV = jax.nn.log_softmax(_live_logits(logits_BxTxV, mask_BxT), axis=-1)
    logq_BxTxV = jax.nn.log_softmax(_live_logits(ref_logits_BxTxV, mask_BxT), axis=-1)
    p_BxTxV = jnp.exp(logp_BxTxV)
    live_BxTxV = p_BxTxV > 0
    # -inf log-probs (masked tokens) replaced before the product too: where's gradient of the
    # branch it drops is 0 * (-inf) = NaN otherwise
    ratio_BxTxV = jnp.where(live_BxTxV, logp_BxTxV, 0.0) - jnp.where(live_BxTxV, logq_BxTxV, 0.0)
    terms_BxTxV = jnp.where(live_BxTxV, p_BxTxV * ratio_BxTxV, 0.0)
    return jnp.where(mask_BxT, jnp.sum(terms_BxTxV, axis=-1), 0.0)


def entropy_from_logits(logits_BxTxV: Array, mask_BxT: Array | None = None) -> Array:
    """H(pi(.|prefix)) = -sum_v p_v log p_v per position (float32; 0 on masked tokens)."""
    logits_BxTxV = check_rank(logits_BxTxV, 3, "logits_BxTxV")
    mask_BxT = mask_like(mask_BxT, logits_BxTxV[..., 0])
    logp_BxTxV = jax.nn.log_softmax(_live_logits(logits_BxTxV, mask_BxT), axis=-1)
    p_BxTxV = jnp.exp(logp_BxTxV)
    live_BxTxV = p_BxTxV > 0   # as in kl_from_logits: no -inf inside the product
    ent_BxT = -jnp.sum(jnp.where(live_BxTxV, p_BxTxV * jnp.where(live_BxTxV, logp_BxTxV, 0.0),
                                 0.0), axis=-1)
    return jnp.where(mask_BxT, ent_BxT, 0.0)


# --------------------------------------------------------------------------- in the loss
def kl_score_function_loss(logp_BxT: Array, old_logp_BxT: Array, ref_logp_BxT: Array,
                           mask_BxT: Array, baseline_B: Array | None = None) -> Array:
    """Surrogate whose gradient estimates grad_theta KL(pi_theta || pi_ref) over whole sequences.

    With d_t = log pi(y_t | y_<t) - log pi_ref(y_t | y_<t) and y ~ pi,
        KL = E[sum_t d_t],   grad KL = E[sum_t grad log pi(y_t | y_<t) * (G_t - b)],
    G_t = sum_{t' >= t} d_t' the KL-to-go: the score-function (REINFORCE) term of the sequence
    KL with causality (d_t' for t' < t does not depend on y_t) and a baseline b independent of
    the sample (e.g. the mean sequence KL of the other samples of its prompt). The pathwise term
    E[sum_t grad d_t] = E[sum_t grad log pi(y_t | .)] is 0 and left out. The surrogate is
    mean_b sum_t rho_t sg(G_t - b_b) with rho_t = exp(logp_t - sg(old_logp_t)), which equals 1
    and has gradient grad log pi_t at the sampling parameters (old = current): the gradient is
    then the estimator above (for PPO's later epochs, the importance-weighted one per token).

    This is the KL-in-the-loss whose fixed point is the KL-regularised optimum
    pi* ∝ pi_ref exp(R / beta). A per-token penalty (k1/k2/k3 of `kl_penalty_loss`) is not: its
    gradient ignores how y_t changes the distribution of the tokens after t, i.e. it regularises
    each next-token distribution on the current prefixes, and with k3 its expected gradient is
    that of KL(pi_ref || pi) (Tang and Munos 2025, arXiv 2506.09477). Masked tokens count 0.
    Old and reference log-probs are constants.
    """
    logp_BxT = check_rank(logp_BxT, 2, "logp_BxT")
    old_logp_BxT = check_rank(old_logp_BxT, 2, "old_logp_BxT")
    check_same_shape([logp_BxT, old_logp_BxT], "logp_BxT vs old_logp_BxT")
    mask_BxT = mask_like(mask_BxT, logp_BxT)
    d_BxT = _log_ratio(jax.lax.stop_gradient(old_logp_BxT), jax.lax.stop_gradient(ref_logp_BxT),
                       mask_BxT)
    # KL-to-go: reverse cumulative sum over valid tokens (masked d are already 0).
    to_go_BxT = jnp.flip(jnp.cumsum(jnp.flip(d_BxT, -1), -1), -1)
    if baseline_B is not None:
        baseline_B = check_rank(baseline_B, 1, "baseline_B")
        if baseline_B.shape[0] != logp_BxT.shape[0]:
            raise ValueError(f"baseline_B has {baseline_B.shape[0]} rows, logp_BxT has "
                             f"{logp_BxT.shape[0]}")
        to_go_BxT = to_go_BxT - baseline_B[:, None]
    log_ratio_BxT = jnp.where(mask_BxT, logp_BxT - jax.lax.stop_gradient(old_logp_BxT), 0.0)
    rho_BxT = jnp.exp(log_ratio_BxT)
    return reduce_tokens(rho_BxT * jax.lax.stop_gradient(to_go_BxT), mask_BxT, "sequence_sum")


def kl_penalty_loss(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array,
                    beta: float | Array, estimator: str = "k3",
                    reduction: str = "token") -> Array:
    """beta * reduce_t k(logp, ref_logp): a per-token KL penalty in the loss (GRPO style).

    Not the gradient of the sequence KL(pi || pi_ref): see `kl_score_function_loss`, which is
    what the CTRL step uses for `kl_mode="loss"`. With k3 the per-token gradient is
    (1 - pi_ref/pi) grad log pi, whose expectation under y_t ~ pi is grad KL(pi_ref || pi) of
    the next-token distribution (Tang and Munos 2025); k2's is grad KL(pi || pi_ref) of the
    next-token distribution on fixed prefixes. Kept for comparisons and tests.
    """
    beta = check_scalar(beta, "beta", low=0.0)
    k_BxT = kl_per_token(estimator, logp_BxT, jax.lax.stop_gradient(ref_logp_BxT), mask_BxT)
    mask_BxT = mask_like(mask_BxT, jnp.asarray(logp_BxT))
    return beta * reduce_tokens(k_BxT, mask_BxT, reduction)


# --------------------------------------------------------------------------- per sequence
class KLEstimate(NamedTuple):
    """Sequence-level KL estimate: mean over sequences, its standard error, per-sequence values.

    With one sequence per prompt, stderr = std(ddof=1) / sqrt(B). With `samples_per_prompt` M > 1
    (rows b*M .. b*M + M - 1 are prompt b's), the M samples of a prompt share it, so the standard
    error is that of the mean over prompts: std(ddof=1) of the B per-prompt means / sqrt(B)
    (treating the B*M sequences as independent understates it when KL varies between prompts).
    NaN when there is one prompt.
    """

    mean: Array
    stderr: Array
    per_sequence_B: Array


def summarise_sequences(per_sequence_B: Array, samples_per_prompt: int = 1) -> KLEstimate:
    num = per_sequence_B.shape[0]
    if samples_per_prompt < 1 or num % samples_per_prompt:
        raise ValueError(f"summarise_sequences: {num} sequences are not whole groups of "
                         f"samples_per_prompt={samples_per_prompt}")
    mean = jnp.mean(per_sequence_B)
    prompts = num // samples_per_prompt
    if prompts < 2:
        return KLEstimate(mean, jnp.full((), jnp.nan, jnp.float32), per_sequence_B)
    per_prompt = jnp.mean(per_sequence_B.reshape(prompts, samples_per_prompt), axis=1)
    return KLEstimate(mean, jnp.std(per_prompt, ddof=1) / jnp.sqrt(prompts), per_sequence_B)


def sequence_kl(estimator: str, logp_BxT: Array, ref_logp_BxT: Array,
                mask_BxT: Array, samples_per_prompt: int = 1) -> KLEstimate:
    """sum_t of the per-token estimator over the valid tokens of y ~ pi, summarised over sequences
    (`summarise_sequences`: rows b*M .. b*M + M - 1 are prompt b's M = `samples_per_prompt`).

    k1 and k3 are unbiased for the sequence KL(pi || pi_ref). k3 is clamped at 0 per token: it is
    non-negative in exact arithmetic and only rounding could push it below.
    """
    per_token_BxT = kl_per_token(estimator, logp_BxT, ref_logp_BxT, mask_BxT)
    if estimator == "k3":
        per_token_BxT = jnp.maximum(per_token_BxT, 0.0)
    return summarise_sequences(masked_sum(per_token_BxT, mask_BxT, axis=-1), samples_per_prompt)


def sequence_kl_from_logits(logits_BxTxV: Array, ref_logits_BxTxV: Array,
                            mask_BxT: Array, samples_per_prompt: int = 1) -> KLEstimate:
    """Sequence KL with exact per-token KLs summed over valid positions of sampled prefixes.

    Along prefixes sampled from pi this is an unbiased, lower-variance (Rao-Blackwellised)
    estimate of the sequence-level KL(pi||pi_ref). `samples_per_prompt` as in `sequence_kl`.
    """
    per_token_BxT = kl_from_logits(logits_BxTxV, ref_logits_BxTxV, mask_BxT)
    return summarise_sequences(jnp.sum(per_token_BxT, axis=-1), samples_per_prompt)


# --------------------------------------------------------------------------- bounds (numpy)
def _at_least_one(name: str, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all() or (x < 1).any():
        raise ValueError(f"{name} must be finite and >= 1, got {x.tolist()}")
    return x


def bon_kl_bound(n) -> np.ndarray:
    """KL(BoN_n(pi_ref) || pi_ref) <= log n - (n-1)/n (exact for continuous rewards;
    Beirami et al. 2024, arXiv 2401.01879; CD section 4.4). Works on scalars and arrays."""
    n = _at_least_one("n", n)
    return np.log(n) - (n - 1.0) / n


def blockwise_cd_kl_bound(num_tokens, block_size, num_candidates,
                          ceil_blocks: bool = False) -> np.ndarray:
    """CD blockwise best-of-k bound (tokens / block) * (log k - (k-1)/k) per sequence (Mudgal et
    al. 2024, section 4). CD reports E_x of this over prompts; take the mean of the returned array.
    ceil_blocks=True counts the ceil(tokens / block) blocks actually decoded (slightly looser).
    The fractional count (the default, CD's) can fall below the exact KL when a block is longer
    than the response; `controlled_decoding.blockwise_decode` reports the ceil count."""
    num_tokens = np.asarray(num_tokens, np.float64)
    if not np.isfinite(num_tokens).all() or (num_tokens < 0).any():
        raise ValueError(f"num_tokens must be finite and >= 0, got {num_tokens.tolist()}")
    blocks = num_tokens / _at_least_one("block_size", block_size)
    if ceil_blocks:
        blocks = np.ceil(blocks)
    return blocks * bon_kl_bound(_at_least_one("num_candidates", num_candidates))
