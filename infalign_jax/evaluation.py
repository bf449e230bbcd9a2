"""Evaluation maths: plug-in (inference-time) win rates, bootstrap CIs, KL estimators, KL bounds.

Two array back-ends, on purpose:
  * Win rates, bootstrap CIs and KL bounds are **numpy, float64, host-side**. They run once per
    evaluation on small [prompts x samples] tables of judge scores; float64 keeps the
    tie-sensitive sums exact to ~1e-15 (a policy against itself gives 1/2 to machine precision),
    and input checks can raise `ValueError` naming the argument.
  * KL estimators are **JAX, float32** pure functions (STYLE.md habit 5: log-probs and KL in float32),
    since they consume model outputs (`logits_BxTxV`) on the device; callers jit them.

Plug-in win rates (spec 1.2, ties count 1/2). Per prompt, pi_hat is the empirical distribution of
the M policy judge scores and pi_ref_hat that of the K reference scores (uniform over samples, so
repeated values carry their multiplicity). For X ~ T_n(pi_hat), Y ~ T_m(pi_ref_hat), with T_n the
max (BoN) or min (WoN) of n i.i.d. draws *with replacement*,
    W = P(X > Y) + 1/2 P(X = Y) = sum_v P(X = v) [P(Y < v) + 1/2 P(Y = v)].
With F(v) = P(pi_hat <= v), F-(v) = P(pi_hat < v) (H, H- for the reference):
    BoN: P(X <= v) = F^n, so P(X = v) = F^n - F-^n;  P(Y < v) + P(Y = v)/2 = (H-^m + H^m) / 2.
    WoN: P(X >= v) = (1 - F-)^n, so P(X = v) = (1 - F-)^n - (1 - F)^n;
         P(Y < v) + P(Y = v)/2 = 1 - ((1 - H-)^m + (1 - H)^m) / 2.
The sum over distinct values v is taken as a sum over policy samples i, each carrying
P(X = p_i) / c_i where c_i = M (F(p_i) - F-(p_i)) is the number of copies of p_i. This is exact
for any ties. `against="transformed"` uses m = n (W_r(T(pi) > T(pi_ref)), the spec's main
reading, which gives exactly 1/2 for pi = pi_ref); `against="base"` uses m = 1 (T(pi) vs plain
pi_ref, the alternative reading). n = 1 is the standard win rate.

n may exceed M: draws are with replacement, so the plug-in is defined for every n >= 1. It is the
exact win rate between the *empirical* distributions; as an estimate of the population quantity its
bias grows as n approaches M (the top sample is over-represented), so keep M a few times n.

Entry points: `plugin_win_rates` (per prompt, [B, G] over an n grid), `win_rate` (mean over
prompts with a bootstrap CI over prompts and a NaN policy), `bootstrap_mean` for any per-prompt
metric. The judge scores are whatever judge the caller used (spec 1.5: the reward r itself or
another judge).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PROCEDURES = ("bon", "won")
AGAINST = ("transformed", "base")
NAN_POLICIES = ("raise", "skip")


# ---------------------------------------------------------------- plug-in win rates (numpy)

def _mask(name: str, scores: np.ndarray, valid) -> np.ndarray:
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"{name} must be [num_prompts, num_samples>=1], got shape {scores.shape}")
    valid = np.ones(scores.shape, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid mask for {name} must have shape {scores.shape}, got {valid.shape}")
    return valid


def _scores(name: str, scores, valid) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    valid = _mask(name, scores, valid)
    bad = valid & np.isnan(scores)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} NaN judge score(s) in prompt rows "
                         f"{np.flatnonzero(bad.any(1))[:10].tolist()} (mask them out or use "
                         f"nan_policy='skip')")
    empty = ~valid.any(1)
    if empty.any():
        raise ValueError(f"{name}: prompt rows {np.flatnonzero(empty)[:10].tolist()} have no valid "
                         f"sample")
    return scores, valid


def _ns(ns) -> np.ndarray:
    ns_G = np.atleast_1d(np.asarray(ns))
    if ns_G.ndim != 1 or ns_G.size == 0 or not np.issubdtype(ns_G.dtype, np.integer):
        raise ValueError(f"ns must be an int or a 1-D sequence of ints, got {ns!r}")
    if (ns_G < 1).any():
        raise ValueError(f"ns must all be >= 1, got {ns_G.tolist()}")
    return ns_G.astype(np.float64)


def _fractions_le_lt(values_BxK: np.ndarray, valid_BxK: np.ndarray, queries_BxM: np.ndarray,
                     chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per row b: fraction of valid values <= q and < q, for each query q. O(B M K) memory-chunked."""
    count_B = valid_BxK.sum(1, keepdims=True).astype(np.float64)
    le_BxM = np.empty(queries_BxM.shape)
    lt_BxM = np.empty(queries_BxM.shape)
    for s in range(0, values_BxK.shape[0], chunk):
        v = values_BxK[s:s + chunk, None, :]
        w = valid_BxK[s:s + chunk, None, :]
        q = queries_BxM[s:s + chunk, :, None]
        le_BxM[s:s + chunk] = ((v <= q) & w).sum(-1)
        lt_BxM[s:s + chunk] = ((v < q) & w).sum(-1)
    return le_BxM / count_B, lt_BxM / count_B


def plugin_win_rates(pol_BxM, ref_BxK, ns=1, procedure: str = "bon", against: str = "transformed",
                     pol_valid_BxM=None, ref_valid_BxK=None) -> np.ndarray:
    """Exact per-prompt plug-in win rate of T_n(pi_hat) against T_m(pi_ref_hat); returns [B, G].

    See the module docstring for the formula. Invalid (masked) samples are dropped from the
    empirical distributions; every prompt needs at least one valid sample on each side.
    """
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be one of {PROCEDURES}, got {procedure!r}")
    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST}, got {against!r}")
    pol_BxM, pol_valid_BxM = _scores("pol_BxM", pol_BxM, pol_valid_BxM)
    ref_BxK, ref_valid_BxK = _scores("ref_BxK", ref_BxK, ref_valid_BxK)
    if pol_BxM.shape[0] != ref_BxK.shape[0]:
        raise ValueError(f"pol_BxM and ref_BxK must have the same number of prompts, got "
                         f"{pol_BxM.shape[0]} and {ref_BxK.shape[0]}")
    n_G = _ns(ns)
    m_G = n_G if against == "transformed" else np.ones_like(n_G)

    f_le, f_lt = _fractions_le_lt(pol_BxM, pol_valid_BxM, pol_BxM)
    h_le, h_lt = _fractions_le_lt(ref_BxK, ref_valid_BxK, pol_BxM)
    f_le, f_lt, h_le, h_lt = (a[..., None] for a in (f_le, f_lt, h_le, h_lt))  # [B, M, 1]
    if procedure == "bon":
        mass_BxMxG = f_le ** n_G - f_lt ** n_G
        below_BxMxG = 0.5 * (h_lt ** m_G + h_le ** m_G)
    else:
        mass_BxMxG = (1.0 - f_lt) ** n_G - (1.0 - f_le) ** n_G
        below_BxMxG = 1.0 - 0.5 * ((1.0 - h_lt) ** m_G + (1.0 - h_le) ** m_G)
    # Split P(X = p_i) evenly over the copies of p_i; copies_i >= 1 for every valid sample.
    copies_BxMx1 = np.rint((f_le - f_lt) * pol_valid_BxM.sum(1)[:, None, None])
    share_BxMxG = np.where(pol_valid_BxM[..., None],
                           mass_BxMxG / np.maximum(copies_BxMx1, 1.0), 0.0)
    return np.sum(share_BxMxG * below_BxMxG, axis=1)


def standard_win_rate(pol_BxM, ref_BxK, pol_valid_BxM=None, ref_valid_BxK=None) -> np.ndarray:
    """Per-prompt W_r(pi > pi_ref) = mean over pairs of 1{p > r} + 1/2 1{p = r}; returns [B]."""
    return plugin_win_rates(pol_BxM, ref_BxK, 1, "bon", "transformed",
                            pol_valid_BxM, ref_valid_BxK)[:, 0]


def paired_win_rate(pol_B, ref_B) -> np.ndarray:
    """1{a > b} + 1/2 1{a = b} per prompt, for one selected output per side (spec 1.5 eval 3)."""
    pol_B, ref_B = np.asarray(pol_B, np.float64), np.asarray(ref_B, np.float64)
    if pol_B.shape != ref_B.shape or pol_B.ndim != 1:
        raise ValueError(f"pol_B and ref_B must be 1-D of equal length, got {pol_B.shape}, "
                         f"{ref_B.shape}")
    for name, a in (("pol_B", pol_B), ("ref_B", ref_B)):
        if np.isnan(a).any():
            raise ValueError(f"{name} has {int(np.isnan(a).sum())} NaN judge score(s)")
    return (pol_B > ref_B) + 0.5 * (pol_B == ref_B)


# ---------------------------------------------------------------- bootstrap over prompts

@dataclasses.dataclass(frozen=True)
class Estimate:
    """Mean over prompts with a bootstrap percentile interval (arrays shaped like one row)."""

    point: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    stderr: np.ndarray
    num_prompts: int
    skipped_prompts: int = 0
    skipped_samples: int = 0


def bootstrap_mean(values_B, num_resamples: int = 1000, seed: int | np.random.Generator = 0,
                   level: float = 0.95) -> Estimate:
    """Mean over prompts (axis 0) with a percentile bootstrap CI, resampling prompts.

    stderr is the standard deviation of the bootstrap means (~ s / sqrt(B)).
    """
    values_B = np.asarray(values_B, np.float64)
    if values_B.ndim < 1 or values_B.shape[0] < 1:
        raise ValueError(f"values_B needs at least one prompt, got shape {values_B.shape}")
    if not np.isfinite(values_B).all():
        raise ValueError("values_B contains non-finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    num = values_B.shape[0]
    idx_RxB = rng.integers(0, num, size=(num_resamples, num))
    means_R = values_B[idx_RxB].mean(axis=1)
    lower, upper = np.quantile(means_R, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return Estimate(values_B.mean(0), lower, upper, means_R.std(0, ddof=1), num)


def win_rate(pol_BxM, ref_BxK, ns: int | Sequence[int] = 1, procedure: str = "bon",
             against: str = "transformed", pol_valid_BxM=None, ref_valid_BxK=None,
             nan_policy: str = "raise", num_resamples: int = 1000, seed=0,
             level: float = 0.95) -> Estimate:
    """Plug-in win rate averaged over prompts, with a bootstrap CI; arrays over the ns grid.

    nan_policy="raise": a NaN judge score raises ValueError naming pol_BxM / ref_BxK.
    nan_policy="skip": NaN scores are dropped (counted in skipped_samples) and prompts left
    without a valid sample on either side are dropped (counted in skipped_prompts).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    pol = np.asarray(pol_BxM, np.float64)
    ref = np.asarray(ref_BxK, np.float64)
    skipped_samples = skipped_prompts = 0
    if nan_policy == "skip":
        pol_valid = _mask("pol_BxM", pol, pol_valid_BxM)
        ref_valid = _mask("ref_BxK", ref, ref_valid_BxK)
        nan_pol, nan_ref = pol_valid & np.isnan(pol), ref_valid & np.isnan(ref)
        skipped_samples = int(nan_pol.sum() + nan_ref.sum())
        pol_valid, ref_valid = pol_valid & ~nan_pol, ref_valid & ~nan_ref
        if pol.shape[0] != ref.shape[0]:
            raise ValueError(f"pol_BxM and ref_BxK must have the same number of prompts, got "
                             f"{pol.shape[0]} and {ref.shape[0]}")
        keep_B = pol_valid.any(1) & ref_valid.any(1)
        skipped_prompts = int((~keep_B).sum())
        if not keep_B.any():
            raise ValueError("win_rate: no prompt has a valid, non-NaN score on both sides")
        pol, ref = pol[keep_B], ref[keep_B]
        pol_valid_BxM, ref_valid_BxK = pol_valid[keep_B], ref_valid[keep_B]
    per_prompt_BxG = plugin_win_rates(pol, ref, ns, procedure, against, pol_valid_BxM,
                                      ref_valid_BxK)
    est = bootstrap_mean(per_prompt_BxG, num_resamples, seed, level)
    return dataclasses.replace(est, skipped_prompts=skipped_prompts,
                               skipped_samples=skipped_samples)


# ---------------------------------------------------------------- KL estimators (JAX, float32)

class KLEstimate(NamedTuple):
    """Sequence-level KL estimate: mean over sequences, its standard error, per-sequence values.

    stderr = std(ddof=1) / sqrt(B); NaN when B = 1.
    """

    mean: Array
    stderr: Array
    per_sequence_B: Array


def _summarise(per_sequence_B: Array) -> KLEstimate:
    num = per_sequence_B.shape[0]
    mean = jnp.mean(per_sequence_B)
    if num < 2:
        return KLEstimate(mean, jnp.full((), jnp.nan, jnp.float32), per_sequence_B)
    return KLEstimate(mean, jnp.std(per_sequence_B, ddof=1) / jnp.sqrt(num), per_sequence_B)


def _masked_sum(values_BxT: Array, mask_BxT: Array) -> Array:
    # where (not multiply): padded positions may hold inf/NaN after EOS.
    return jnp.sum(jnp.where(mask_BxT.astype(bool), values_BxT, 0.0), axis=1)


def kl_k1(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array) -> KLEstimate:
    """k1: sum_t (log pi - log pi_ref) over valid tokens of y ~ pi; unbiased for KL(pi||pi_ref).

    Inputs are the log-probs of the sampled tokens (CD's KL metric E[log pi - log pi_ref]).
    """
    chex.assert_rank([logp_BxT, ref_logp_BxT, mask_BxT], 2)
    chex.assert_equal_shape([logp_BxT, ref_logp_BxT, mask_BxT])
    diff_BxT = logp_BxT.astype(jnp.float32) - ref_logp_BxT.astype(jnp.float32)
    return _summarise(_masked_sum(diff_BxT, mask_BxT))


def token_k3(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
    """k3 per token: (rho - 1) - log rho with rho = pi_ref / pi (Schulman 2020); >= 0, unbiased.

    Clamped at 0: the expression is non-negative in exact arithmetic and only rounding could
    push it below.
    """
    chex.assert_equal_shape([logp_BxT, ref_logp_BxT])
    log_rho = ref_logp_BxT.astype(jnp.float32) - logp_BxT.astype(jnp.float32)
    return jnp.maximum(jnp.expm1(log_rho) - log_rho, 0.0)


def kl_k3(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array) -> KLEstimate:
    """Sum over valid tokens of token_k3; per-token unbiased for KL(pi(.|prefix)||pi_ref(.|prefix))."""
    chex.assert_rank([logp_BxT, ref_logp_BxT, mask_BxT], 2)
    chex.assert_equal_shape([logp_BxT, ref_logp_BxT, mask_BxT])
    return _summarise(_masked_sum(token_k3(logp_BxT, ref_logp_BxT), mask_BxT))


def token_kl_full_vocab(logits_BxTxV: Array, ref_logits_BxTxV: Array) -> Array:
    """Exact KL(pi(.|prefix_t) || pi_ref(.|prefix_t)) = sum_v p log(p/q) per position, float32.

    Vocabulary entries with p = 0 contribute 0 (no 0 * inf NaN); q = 0 where p > 0 gives +inf.
    """
    chex.assert_rank([logits_BxTxV, ref_logits_BxTxV], 3)
    chex.assert_equal_shape([logits_BxTxV, ref_logits_BxTxV])
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    logq_BxTxV = jax.nn.log_softmax(ref_logits_BxTxV.astype(jnp.float32), axis=-1)
    p_BxTxV = jnp.exp(logp_BxTxV)
    terms_BxTxV = jnp.where(p_BxTxV > 0, p_BxTxV * (logp_BxTxV - logq_BxTxV), 0.0)
    return jnp.sum(terms_BxTxV, axis=-1)


def kl_full_vocab(logits_BxTxV: Array, ref_logits_BxTxV: Array, mask_BxT: Array) -> KLEstimate:
    """Sequence KL with exact per-token KLs summed over valid positions of sampled prefixes.

    Along prefixes sampled from pi this is an unbiased, lower-variance (Rao-Blackwellised)
    estimate of the sequence-level KL(pi||pi_ref).
    """
    chex.assert_rank(mask_BxT, 2)
    chex.assert_equal_shape_prefix([logits_BxTxV, mask_BxT], 2)
    return _summarise(_masked_sum(token_kl_full_vocab(logits_BxTxV, ref_logits_BxTxV), mask_BxT))


# ---------------------------------------------------------------- KL bounds (numpy)

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


def blockwise_cd_kl_bound(num_tokens_L, block_size_M, num_candidates_K,
                          ceil_blocks: bool = False) -> np.ndarray:
    """CD blockwise best-of-K bound (L/M) * (log K - (K-1)/K) per sequence (Mudgal et al. 2024,
    section 4). CD reports E_x of this over prompts; take the mean of the returned array.
    ceil_blocks=True counts the ceil(L/M) blocks actually decoded (a slightly looser bound)."""
    num_tokens_L = np.asarray(num_tokens_L, np.float64)
    if not np.isfinite(num_tokens_L).all() or (num_tokens_L < 0).any():
        raise ValueError(f"num_tokens_L must be finite and >= 0, got {num_tokens_L.tolist()}")
    block_size_M = _at_least_one("block_size_M", block_size_M)
    blocks = num_tokens_L / block_size_M
    if ceil_blocks:
        blocks = np.ceil(blocks)
    return blocks * bon_kl_bound(_at_least_one("num_candidates_K", num_candidates_K))
