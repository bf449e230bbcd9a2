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

Entry points: `plugin_win_rates` (per prompt, [B, G] over an n grid), `subset_win_rates` (the
unbiased estimate of the same quantities, n of the M samples drawn without replacement; needs
M >= n), `win_rate` (mean over
prompts with a bootstrap CI over prompts and a NaN policy), `bootstrap_mean` for any per-prompt
metric. The judge scores are whatever judge the caller used (spec 1.5: the reward r itself or
another judge).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from infalign_jax.core.selection import AGAINST, PROCEDURES

Array = jax.Array

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


def check_ns(ns) -> np.ndarray:
    """The procedure sizes `ns` (an int or a 1-D sequence of ints, each >= 1) as a float64 array;
    anything else (2.7, a nested list, 0) is refused."""
    ns_G = np.atleast_1d(np.asarray(ns))
    if ns_G.ndim != 1 or ns_G.size == 0 or not np.issubdtype(ns_G.dtype, np.integer):
        raise ValueError(f"ns must be an int or a 1-D sequence of ints, got {ns!r}")
    if (ns_G < 1).any():
        raise ValueError(f"ns must all be >= 1, got {ns_G.tolist()}")
    return ns_G.astype(np.float64)


def _fractions_le_lt(values_BxK: np.ndarray, weights_BxK: np.ndarray, queries_BxM: np.ndarray,
                     chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per row b: the weight share of values <= q and < q, for each query q (weights sum to 1 per
    row; 0 for invalid samples). O(B M K), memory-chunked over rows."""
    le_BxM = np.empty(queries_BxM.shape)
    lt_BxM = np.empty(queries_BxM.shape)
    for s in range(0, values_BxK.shape[0], chunk):
        v = values_BxK[s:s + chunk, None, :]
        w = weights_BxK[s:s + chunk, None, :]
        q = queries_BxM[s:s + chunk, :, None]
        le_BxM[s:s + chunk] = np.sum(np.where(v <= q, w, 0.0), -1)
        lt_BxM[s:s + chunk] = np.sum(np.where(v < q, w, 0.0), -1)
    return le_BxM, lt_BxM


def _weights(name: str, valid_BxM: np.ndarray, weights) -> np.ndarray:
    """Per-row probabilities of the samples: uniform over valid ones, or `weights` normalised."""
    if weights is None:
        w = valid_BxM.astype(np.float64)
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != valid_BxM.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights for {name} must be finite, >= 0 and of shape "
                             f"{valid_BxM.shape}")
        w = np.where(valid_BxM, w, 0.0)
    total = w.sum(1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError(f"{name}: prompt rows {np.flatnonzero(total[:, 0] <= 0)[:10].tolist()} "
                         f"have no weight on a valid sample")
    return w / total


def check_against(against: str) -> None:
    """Refuses a win-rate reading other than `AGAINST`'s, naming them."""
    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST}, got {against!r}")


def _pair(pol_BxM, ref_BxK, pol_valid_BxM, ref_valid_BxK, procedure: str, against: str):
    """The checked inputs of a per-prompt win rate: scores as float64 and their valid masks."""
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be one of {PROCEDURES}, got {procedure!r}")
    check_against(against)
    pol_BxM, pol_valid_BxM = _scores("pol_BxM", pol_BxM, pol_valid_BxM)
    ref_BxK, ref_valid_BxK = _scores("ref_BxK", ref_BxK, ref_valid_BxK)
    if pol_BxM.shape[0] != ref_BxK.shape[0]:
        raise ValueError(f"pol_BxM and ref_BxK must have the same number of prompts, got "
                         f"{pol_BxM.shape[0]} and {ref_BxK.shape[0]}")
    return pol_BxM, pol_valid_BxM, ref_BxK, ref_valid_BxK


def plugin_win_rates(pol_BxM, ref_BxK, ns=1, procedure: str = "bon", against: str = "transformed",
                     pol_valid_BxM=None, ref_valid_BxK=None, pol_weights_BxM=None,
                     ref_weights_BxK=None) -> np.ndarray:
    """Exact per-prompt win rate of T_n(pi_hat) against T_m(pi_ref_hat); returns [B, G].

    See the module docstring for the formula. pi_hat is uniform over the valid samples (the
    plug-in estimate) or, with `pol_weights_BxM`, puts those weights on them: with the outcomes of
    a discrete policy and their probabilities this is that policy's exact win rate (the exact
    task's). Invalid (masked) samples are dropped; every prompt needs at least one valid sample
    on each side.
    """
    pol_BxM, pol_valid_BxM, ref_BxK, ref_valid_BxK = _pair(
        pol_BxM, ref_BxK, pol_valid_BxM, ref_valid_BxK, procedure, against)
    pol_w_BxM = _weights("pol_BxM", pol_valid_BxM, pol_weights_BxM)
    ref_w_BxK = _weights("ref_BxK", ref_valid_BxK, ref_weights_BxK)
    n_G = check_ns(ns)
    m_G = n_G if against == "transformed" else np.ones_like(n_G)

    f_le, f_lt = _fractions_le_lt(pol_BxM, pol_w_BxM, pol_BxM)
    h_le, h_lt = _fractions_le_lt(ref_BxK, ref_w_BxK, pol_BxM)
    h_le, h_lt = h_le[..., None], h_lt[..., None]                                  # [B, M, 1]
    if procedure == "bon":
        below_BxMxG = 0.5 * (h_lt ** m_G + h_le ** m_G)
    else:
        below_BxMxG = 1.0 - 0.5 * ((1.0 - h_lt) ** m_G + (1.0 - h_le) ** m_G)
    share_BxMxG = _selected_shares(f_le, f_lt, pol_w_BxM, n_G, procedure)
    return np.sum(share_BxMxG * below_BxMxG, axis=1)


def _selected_shares(f_le_BxM: np.ndarray, f_lt_BxM: np.ndarray, w_BxM: np.ndarray,
                     n_G: np.ndarray, procedure: str) -> np.ndarray:
    """[B, M, G]: P(T_n = sample i), T_n the best (BoN) or worst (WoN) of n draws with
    replacement from the weighted samples. P(X = p_i) is split over the samples tied at p_i in
    proportion to their weights (a tie between draws goes to one of them, which is distributed as
    the weights restricted to the tie); f_le - f_lt >= w_i > 0 for every sample with weight."""
    f_le, f_lt, w = f_le_BxM[..., None], f_lt_BxM[..., None], w_BxM[..., None]
    if procedure == "bon":
        mass_BxMxG = f_le ** n_G - f_lt ** n_G
    else:
        mass_BxMxG = (1.0 - f_lt) ** n_G - (1.0 - f_le) ** n_G
    tied = np.where(w > 0, np.maximum(f_le - f_lt, w), 1.0)
    return mass_BxMxG * w / tied


def selected_probs(scores_BxM, n: int, procedure: str = "bon", weights_BxM=None,
                   valid_BxM=None) -> np.ndarray:
    """[B, M]: the distribution of T_n(pi) over the samples, T_n = BoN_n / WoN_n with
    replacement, pi uniform over the valid samples or the given weights. With a discrete policy's
    outcomes and probabilities this is T_n(pi) exactly, e.g. the BoN_n(pi_ref) that Best-of-N
    distillation targets (spec 4, 5). Rows sum to 1."""
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be one of {PROCEDURES}, got {procedure!r}")
    if np.ndim(n) != 0:   # a list was accepted and its first entry used
        raise ValueError(f"selected_probs: n must be one int (one procedure size), got {n!r}")
    scores_BxM, valid_BxM = _scores("scores_BxM", scores_BxM, valid_BxM)
    w_BxM = _weights("scores_BxM", valid_BxM, weights_BxM)
    f_le, f_lt = _fractions_le_lt(scores_BxM, w_BxM, scores_BxM)
    return _selected_shares(f_le, f_lt, w_BxM, check_ns(n), procedure)[..., 0]


_LGAMMA = np.frompyfunc(math.lgamma, 1, 1)


def _log_comb(a, k) -> np.ndarray:
    """log C(a, k) elementwise for integer arrays, -inf where k > a or a < 0 (log space, so
    that C(2000, 1000) does not overflow a float)."""
    a, k = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(k, np.float64))
    ok = (a >= 0) & (k >= 0) & (k <= a)
    a1, k1 = np.where(ok, a, 0.0), np.where(ok, k, 0.0)
    out = (_LGAMMA(a1 + 1) - _LGAMMA(k1 + 1) - _LGAMMA(a1 - k1 + 1)).astype(np.float64)
    return np.where(ok, out, -np.inf)


def _subset_extreme_weights(name: str, scores_BxM: np.ndarray, valid_BxM: np.ndarray,
                            n_G: np.ndarray, procedure: str) -> np.ndarray:
    """[B, M, G]: the probability that sample i is the best (BoN) or worst (WoN) of n samples
    drawn *without* replacement from the row's valid samples, ties broken by position: with rank
    r (1-based, ascending) among M_b valid samples, C(r - 1, n - 1) / C(M_b, n) for the best and
    C(M_b - r, n - 1) / C(M_b, n) for the worst."""
    count_B = valid_BxM.sum(1)
    short = count_B < n_G.max()
    if short.any():
        raise ValueError(f"{name}: prompt rows {np.flatnonzero(short)[:10].tolist()} have fewer "
                         f"valid samples ({int(count_B.min())}) than n = {int(n_G.max())}; the "
                         f"unbiased estimator draws n of them without replacement (the plug-in "
                         f"`plugin_win_rates` draws with replacement and takes any n)")
    # valid samples first (ascending), masked ones after, whatever their values (even +inf)
    order = np.lexsort((np.where(valid_BxM, scores_BxM, 0.0), ~valid_BxM), axis=1)
    rank_BxM = np.empty_like(order)
    np.put_along_axis(rank_BxM, order, np.arange(1, scores_BxM.shape[1] + 1)[None], axis=1)
    r, m_b = rank_BxM[..., None], count_B[:, None, None]
    n = n_G.astype(np.int64)[None, None, :]
    above = _log_comb(r - 1, n - 1) if procedure == "bon" else _log_comb(m_b - r, n - 1)
    return np.where(valid_BxM[..., None], np.exp(above - _log_comb(m_b, n)), 0.0)


def subset_win_rates(pol_BxM, ref_BxK, ns=1, procedure: str = "bon", against: str = "transformed",
                     pol_valid_BxM=None, ref_valid_BxK=None) -> np.ndarray:
    """Unbiased per-prompt win rate of T_n(pi) against T_m(pi_ref); returns [B, G].

    The plug-in (`plugin_win_rates`) is the exact win rate between the *empirical* distributions,
    draws with replacement; as an estimate of the policies' win rate it is biased towards the
    middle when n is close to M (at M = n = 4, a policy with a calibrated CDF u^2 scores WoN_4
    0.756 in expectation where the truth is 0.802). This is the two-sample U-statistic instead:
    the mean of 1{max > max} + 1/2 1{max = max} (min for WoN) over every n-subset of the M policy
    samples and every m-subset of the K reference samples, drawn without replacement; its
    expectation is the win rate itself for i.i.d. samples. It needs M >= n and K >= m valid
    samples on every row and takes no sample weights. At n = 1 it equals the plug-in.
    """
    pol_BxM, pol_valid_BxM, ref_BxK, ref_valid_BxK = _pair(
        pol_BxM, ref_BxK, pol_valid_BxM, ref_valid_BxK, procedure, against)
    n_G = check_ns(ns)
    m_G = n_G if against == "transformed" else np.ones_like(n_G)
    p_BxMxG = _subset_extreme_weights("pol_BxM", pol_BxM, pol_valid_BxM, n_G, procedure)
    q_BxKxG = _subset_extreme_weights("ref_BxK", ref_BxK, ref_valid_BxK, m_G, procedure)
    out = np.empty((pol_BxM.shape[0], n_G.size))
    for g in range(n_G.size):
        h_le, h_lt = _fractions_le_lt(ref_BxK, q_BxKxG[..., g], pol_BxM)
        out[:, g] = np.sum(p_BxMxG[..., g] * 0.5 * (h_le + h_lt), axis=1)
    return out


WIN_RATE_ESTIMATORS = {"plugin": plugin_win_rates, "unbiased": subset_win_rates}


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

def _bootstrap_rng(level: float, num_resamples: int, seed: int | np.random.Generator
                   ) -> np.random.Generator:
    """The resampling generator, after checking the interval's level and resample count."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


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
                   level: float = 0.95, value_range: tuple[float, float] | None = None
                   ) -> Estimate:
    """Mean over prompts (axis 0) with a bootstrap CI, resampling prompts.

    The bounds are the wider of the percentile bootstrap interval and the Student-t interval
    mean +- t_{B-1} s / sqrt(B): the percentile interval alone is too narrow over few prompts
    (simulated coverage at a nominal 0.95: 0.46-0.49 at 2 prompts, 0.71-0.87 at 3 to 5, 0.89 at
    10; with the t bound 0.88-0.95), and the two agree over many prompts. `value_range` (lo, hi),
    where every value lies, clips the bounds (a win rate's interval stays in [0, 1]).
    stderr is the standard deviation of the bootstrap means (~ s / sqrt(B)). One prompt has no
    spread over prompts to resample: its bounds and stderr are NaN (not the point itself, a
    zero-width interval).
    """
    values_B = np.asarray(values_B, np.float64)
    if values_B.ndim < 1 or values_B.shape[0] < 1:
        raise ValueError(f"values_B needs at least one prompt, got shape {values_B.shape}")
    if not np.isfinite(values_B).all():
        raise ValueError("values_B contains non-finite values")
    rng = _bootstrap_rng(level, num_resamples, seed)
    num = values_B.shape[0]
    if num == 1:
        nan = np.full(values_B.shape[1:], np.nan)
        return Estimate(values_B.mean(0), nan, nan, nan, num)
    idx_RxB = rng.integers(0, num, size=(num_resamples, num))
    means_R = values_B[idx_RxB].mean(axis=1)
    lower, upper = np.quantile(means_R, [(1 - level) / 2, (1 + level) / 2], axis=0)
    from scipy import stats
    mean = values_B.mean(0)
    half = stats.t.ppf((1 + level) / 2, num - 1) * values_B.std(0, ddof=1) / math.sqrt(num)
    lower, upper = np.minimum(lower, mean - half), np.maximum(upper, mean + half)
    if value_range is not None:
        lower, upper = np.clip(lower, *value_range), np.clip(upper, *value_range)
    return Estimate(mean, lower, upper, means_R.std(0, ddof=1), num)


def win_rate(pol_BxM, ref_BxK, ns: int | Sequence[int] = 1, procedure: str = "bon",
             against: str = "transformed", pol_valid_BxM=None, ref_valid_BxK=None,
             nan_policy: str = "raise", num_resamples: int = 1000, seed=0,
             level: float = 0.95, estimator: str = "unbiased") -> Estimate:
    """Win rate averaged over prompts, with a bootstrap CI; arrays over the ns grid.

    `estimator` (`WIN_RATE_ESTIMATORS`): "unbiased" (the default; `subset_win_rates`, which
    needs N valid samples a side) or "plugin" (`plugin_win_rates`). The plug-in's bias does not shrink
    with more prompts, so its intervals lose coverage as prompts are added when N is close to
    the samples per prompt (WoN_16 from 16 samples on 256 prompts: 0.21, simulated); at N = 1
    both are the same.
    nan_policy="raise": a NaN judge score raises ValueError naming pol_BxM / ref_BxK.
    nan_policy="skip": NaN scores are dropped (counted in skipped_samples) and prompts left
    without enough valid samples on either side (1; N under "unbiased", on pi_ref's side only
    against="transformed") are dropped (counted in skipped_prompts).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if estimator not in WIN_RATE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(WIN_RATE_ESTIMATORS)}, got "
                         f"{estimator!r}")
    need = max(np.atleast_1d(ns)) if estimator == "unbiased" else 1
    # against="base": pi_ref's side is single samples, so one valid one is enough
    need_ref = need if against == "transformed" else 1
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
        keep_B = (pol_valid.sum(1) >= need) & (ref_valid.sum(1) >= need_ref)
        skipped_prompts = int((~keep_B).sum())
        if not keep_B.any():
            raise ValueError(f"win_rate: no prompt has {need} valid, non-NaN score"
                             f"{'s' if need > 1 else ''} for the policy and {need_ref} for "
                             f"pi_ref")
        pol, ref = pol[keep_B], ref[keep_B]
        pol_valid_BxM, ref_valid_BxK = pol_valid[keep_B], ref_valid[keep_B]
    per_prompt_BxG = WIN_RATE_ESTIMATORS[estimator](pol, ref, ns, procedure, against,
                                                    pol_valid_BxM, ref_valid_BxK)
    est = bootstrap_mean(per_prompt_BxG, num_resamples, seed, level, value_range=(0.0, 1.0))
    return dataclasses.replace(est, skipped_prompts=skipped_prompts,
                               skipped_samples=skipped_samples)




def paired_difference(a_SxB, b_SxB, level: float = 0.95, what: str = "") -> Estimate:
    """Mean over prompts of method a minus method b, each trained with several seeds, with a
    confidence interval that carries the prompt sampling and the seed-to-seed spread (the
    reproduction's "difference against calibrated identity").

    `a_SxB` / `b_SxB`: a per-prompt quantity (e.g. the per-prompt BoN_N win rate against pi_ref)
    for S_a / S_b independently trained seeds of each method on the same B evaluation prompts.
    Each method's table is read as x_sb = mu + alpha_s + beta_b + e_sb (seed, prompt, residual),
    so Var(mean a - mean b) is the sum of
      * the prompt term: the variance over prompts of d_b = mean_s a_sb - mean_s b_sb, over B
        (paired by prompt: the prompts' common difficulty cancels), B - 1 degrees of freedom;
      * a seed term per method: sigma_alpha^2 / S, with sigma_alpha^2 = Var_s(row means) -
        MS_residual / B (clipped at 0), S - 1 degrees of freedom; 0 with one seed, which holds
        no seed spread.
    The interval is point +- t * sqrt(Var), t at Welch-Satterthwaite's degrees of freedom, but
    at most S - 1 of a method with S > 1 seeds (the smaller S of the two), whatever its seed
    term's estimate: with 2-5 seeds the seed variance is known to 1-4 degrees of freedom, and an
    estimate that came out small or clipped at 0 is the likeliest to be too small. Coverage of
    the 95% interval simulated by `bench/interval_coverage.py` (4000 trials a cell; seed sd
    0-0.3, residual 0.2, prompt difficulty 0 or 0.2, prompt x method 0 or 0.1, B = 32 or 128;
    two methods, or one method's gain over a constant 1/2), lowest over the cells:
      * this rule, 3 seeds: 0.985 (two methods), 0.949 (gain), for intervals 1.28x / 1.38x as
        wide on average as the earlier rule's, up to 2.1x where the seeds add nothing (which
        3 seeds cannot tell); 5 seeds: 0.973 / 0.939 (at seed sd 0.3, where the two rules
        agree), 1.12x / 1.15x; 2 seeds: 0.993 / 0.963, 1.6x / 2.0x;
      * the earlier rule (S - 1 only where the seed terms held half of Var or more): 0.934 /
        0.902 with 3 seeds, 0.922 / 0.832 with 2: a small seed spread, under-estimated or
        clipped at 0, let the count run to about B - 1.
    (Resampling seeds and prompts together counts the residual twice: 1.48x the true standard
    error with residual noise alone.) point = mean(a) - mean(b); stderr = sqrt(Var). `what`
    names the quantity in errors.
    """
    from scipy import stats
    a = np.asarray(a_SxB, np.float64)
    b = np.asarray(b_SxB, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] < 2:
        raise ValueError(f"a_SxB and b_SxB must be [seeds, prompts] over the same prompts (at "
                         f"least 2), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"paired_difference{' of ' + what if what else ''}: non-finite values "
                         f"(a: {int((~np.isfinite(a)).sum())}, b: {int((~np.isfinite(b)).sum())})")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    num = a.shape[1]
    d_B = a.mean(0) - b.mean(0)
    terms = [(d_B.var(ddof=1) / num, num - 1)] + [_seed_term(x) for x in (a, b)]
    var = sum(v for v, _ in terms)
    point = a.mean() - b.mean()
    if var > 0:
        dof = var ** 2 / sum(v ** 2 / k for v, k in terms if v > 0)
        seeded = [len(x) - 1 for x in (a, b) if len(x) > 1]
        if seeded:
            dof = min(dof, min(seeded))
        half = stats.t.ppf((1 + level) / 2, dof) * math.sqrt(var)
    else:
        half = 0.0
    return Estimate(np.asarray(point), np.asarray(point - half), np.asarray(point + half),
                    np.asarray(math.sqrt(var)), num)


def _seed_term(x_SxB: np.ndarray) -> tuple[float, int]:
    """(sigma_alpha^2 / S, S - 1) of a seeds x prompts table (additive two-way model)."""
    seeds, num = x_SxB.shape
    if seeds < 2:
        return 0.0, 1
    rows_S, cols_B = x_SxB.mean(1), x_SxB.mean(0)
    resid = x_SxB - rows_S[:, None] - cols_B[None, :] + x_SxB.mean()
    ms_resid = (resid ** 2).sum() / ((seeds - 1) * (num - 1))
    return max(rows_S.var(ddof=1) - ms_resid / num, 0.0) / seeds, seeds - 1
