"""Inference-time selection procedures over N candidate responses per prompt (selection only).

Every procedure here picks one of N already-sampled candidates per prompt from arrays of
per-candidate numbers; nothing samples, embeds or scores text (the sampler, embedding functions and
reward models live elsewhere and hand their outputs in). All of them reduce to one rule,
`select_by_score`: argmax of a per-candidate score among the valid candidates.

| procedure            | score of candidate i                          | reference                      |
|----------------------|-----------------------------------------------|--------------------------------|
| best_of_n            | r_i                                           | BoN (spec section 0)           |
| worst_of_n           | -r_i                                          | WoN / BoN jailbreaking (1.2)   |
| rbon_kl              | r_i + beta * log pi_ref(y_i)                  | Jinnai et al. 2024, RBoN_KL    |
| rbon_wd              | r_i + beta * mean_j cos(e_i, e_j), j incl. i  | Jinnai et al. 2024, RBoN_WD    |
| uncertainty_bon      | mu_i - k sigma_i  or  mu_i - k sigma_i^2      | Yang et al. 2024 (spec 6)      |

Conventions (the same for every procedure, because they all go through `select_by_score`):
  * `valid_BxN` marks candidates that may be chosen (e.g. finished generations). A candidate whose
    score is NaN is treated as invalid too, so a broken reward never wins inside a jitted step.
  * Ties go to the lowest index (`jnp.argmax`), so results are deterministic.
  * A row with no valid candidate gets index -1 and `has_valid_B = False`; `select` then returns
    `fill_value` for it. These functions are pure and jittable, so they cannot raise on data;
    host code that must not continue calls `checked` on the result (raises `ValueError`).
  * `n` (a static Python int) restricts a call to the first n candidates, so one pool of N_max
    samples serves a whole grid of N. n < 1 or n > N raises `ValueError`: a fixed sample set cannot
    yield a best-of-n with more candidates than it has.

No `jax.jit` inside: callers jit and vmap (all functions are vmap-safe).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PENALTIES = ("std", "var")
# The inference-time procedures T: Best-of-N (keep the highest reward) and Worst-of-N (the lowest).
PROCEDURES = ("bon", "won")
# The win rates reported: standard (n = 1) and under each procedure.
WIN_RATES = ("standard",) + PROCEDURES
# What T(pi) is compared with: T(pi_ref) (the spec's main reading, 1/2 for pi = pi_ref) or plain
# pi_ref.
AGAINST = ("transformed", "base")


class Selection(NamedTuple):
    """Result of a selection (a pytree, so it passes through jit/vmap).

    Attributes:
      index_B: chosen candidate per prompt, int32 in [0, N), or -1 where the row had no valid one.
      has_valid_B: bool, False exactly where index_B == -1.
    """

    index_B: Array
    has_valid_B: Array


def _first_n(n: int | None, total: int, name: str) -> int:
    if n is None:
        return total
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{name}: n must be a Python int, got {n!r}")
    if n < 1:
        raise ValueError(f"{name}: n must be >= 1, got {n}")
    if n > total:
        raise ValueError(f"{name}: n={n} exceeds the {total} candidates available per prompt "
                         f"(a fixed sample set cannot give best-of-{n})")
    return int(n)


def _non_negative(name: str, value) -> None:
    # Traced values cannot be checked here; concrete scalars (Python, numpy or jax) can.
    if isinstance(value, jax.core.Tracer) or np.ndim(value) != 0:
        return
    if not float(value) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def select_by_score(scores_BxN: Array, valid_BxN: Array | None = None, n: int | None = None
                    ) -> Selection:
    """argmax_i scores[b, i] over valid, non-NaN candidates; lowest index wins ties.

    +inf and -inf scores are legitimate (e.g. r + beta * log pi_ref with log pi_ref = -inf): a
    valid candidate scored -inf is still preferred to any invalid one.
    """
    chex.assert_rank(scores_BxN, 2)
    if valid_BxN is None:
        valid_BxN = jnp.ones(scores_BxN.shape, bool)
    chex.assert_equal_shape([scores_BxN, valid_BxN])
    n = _first_n(n, scores_BxN.shape[1], "select_by_score")
    scores_BxN, valid_BxN = scores_BxN[:, :n], valid_BxN[:, :n]
    valid_BxN = valid_BxN.astype(bool) & ~jnp.isnan(scores_BxN)
    if jnp.issubdtype(scores_BxN.dtype, jnp.floating):
        lowest = -jnp.inf
    else:   # integer (or bool) scores stay exact: a float fill would round ints past 2^24
        scores_BxN = scores_BxN.astype(jnp.promote_types(scores_BxN.dtype, jnp.int32))
        lowest = jnp.iinfo(scores_BxN.dtype).min
    masked_BxN = jnp.where(valid_BxN, scores_BxN, lowest)
    index_B = jnp.argmax(masked_BxN, axis=1)
    # If every valid score is -inf the argmax may land on an invalid -inf; the first valid
    # candidate is then the correct (lowest-index) maximiser.
    chosen_ok_B = jnp.take_along_axis(valid_BxN, index_B[:, None], axis=1)[:, 0]
    index_B = jnp.where(chosen_ok_B, index_B, jnp.argmax(valid_BxN, axis=1))
    has_valid_B = jnp.any(valid_BxN, axis=1)
    return Selection(jnp.where(has_valid_B, index_B, -1).astype(jnp.int32), has_valid_B)


def best_of_n(rewards_BxN: Array, valid_BxN: Array | None = None, n: int | None = None
              ) -> Selection:
    """Best-of-N: the candidate with the highest reward (spec section 0, BoN_N)."""
    return select_by_score(rewards_BxN, valid_BxN, n)


def worst_of_n(rewards_BxN: Array, valid_BxN: Array | None = None, n: int | None = None
               ) -> Selection:
    """Worst-of-N (best-of-N jailbreaking, InfAlign 1.2): the lowest reward, lowest index on ties."""
    chex.assert_rank(rewards_BxN, 2)
    rewards_BxN = jnp.asarray(rewards_BxN)
    if not jnp.issubdtype(rewards_BxN.dtype, jnp.floating):
        # ~r = -r - 1 reverses the order of integers without -r's overflow at the type's minimum
        return select_by_score(~rewards_BxN.astype(jnp.promote_types(rewards_BxN.dtype,
                                                                      jnp.int32)), valid_BxN, n)
    return select_by_score(-rewards_BxN, valid_BxN, n)


def rbon_kl(rewards_BxN: Array, ref_logp_BxN: Array, beta: float | Array,
            valid_BxN: Array | None = None, n: int | None = None) -> Selection:
    """KL-regularised BoN (Jinnai et al. 2024, arXiv 2404.01054, RBoN_KL).

    y* = argmax_y R(x,y) - beta * KL(delta_y || pi_ref) = argmax_y R(x,y) + beta * log pi_ref(y|x),
    with log pi_ref(y|x) the summed token log-probability of the whole response (their code:
    `proxy + alpha * logprob`). beta = 0 is exactly BoN, even where log pi_ref = -inf.
    """
    chex.assert_rank([rewards_BxN, ref_logp_BxN], 2)
    chex.assert_equal_shape([rewards_BxN, ref_logp_BxN])
    _non_negative("beta", beta)
    beta = jnp.asarray(beta, jnp.float32)
    chex.assert_rank(beta, 0)
    # 0 * (-inf) would be NaN and disqualify the candidate; beta = 0 must mean plain BoN.
    penalty_BxN = jnp.where(beta == 0, 0.0, beta * ref_logp_BxN)
    return select_by_score(rewards_BxN + penalty_BxN, valid_BxN, n)


def mean_cosine_similarity(embeddings_BxNxD: Array, valid_BxN: Array | None = None) -> Array:
    """(1/|V|) sum_{j in V} cos(e_i, e_j) per candidate i, where V are the valid candidates.

    Includes j = i (cos = 1 for a non-zero embedding), as Jinnai et al.'s code averages the full
    similarity row. The empirical reference distribution is taken over valid candidates only, so
    padding rows cannot move the regulariser. An all-zero embedding has cosine 0 with everything.
    """
    chex.assert_rank(embeddings_BxNxD, 3)
    e_BxNxD = embeddings_BxNxD.astype(jnp.float32)
    norm_BxNx1 = jnp.linalg.norm(e_BxNxD, axis=-1, keepdims=True)
    unit_BxNxD = e_BxNxD / jnp.maximum(norm_BxNx1, 1e-12)
    cos_BxNxN = jnp.einsum("bid,bjd->bij", unit_BxNxD, unit_BxNxD)
    if valid_BxN is None:
        return jnp.mean(cos_BxNxN, axis=-1)
    chex.assert_shape(valid_BxN, embeddings_BxNxD.shape[:2])
    w_BxN = valid_BxN.astype(jnp.float32)
    # where, not a product with w: an invalid candidate's NaN embedding must not reach the others
    total_BxN = jnp.sum(jnp.where(valid_BxN[:, None, :], cos_BxNxN, 0.0), axis=-1)
    return total_BxN / jnp.maximum(jnp.sum(w_BxN, axis=-1, keepdims=True), 1.0)


def mean_pool(hidden_BxTxD: Array, mask_BxT: Array) -> Array:
    """Mean of the hidden states over real tokens: the default RBoN-WD embedding (a model's own
    mean-pooled last hidden states, as sentence-transformers pools all-MiniLM-L6-v2)."""
    chex.assert_rank([hidden_BxTxD, mask_BxT], [3, 2])
    w_BxT = mask_BxT.astype(jnp.float32)
    # padding may hold anything, NaN included (a fully masked attention row): left out, not x 0
    total_BxD = jnp.sum(jnp.where(mask_BxT[..., None], hidden_BxTxD.astype(jnp.float32), 0.0),
                        axis=1)
    return total_BxD / jnp.maximum(w_BxT.sum(axis=1, keepdims=True), 1.0)


def rbon_wd(rewards_BxN: Array, embeddings_BxNxD: Array, beta: float | Array,
            valid_BxN: Array | None = None, n: int | None = None) -> Selection:
    """Wasserstein-regularised BoN = MBR-BoN (Jinnai et al. 2024, RBoN_WD).

    y* = argmax_i R(x, y_i) + beta * (1/N) sum_j cos(emb(y_i), emb(y_j)), j running over all
    candidates including i. With cost 1 - cos this is R - beta * WD(delta_y, pi_ref_hat) + const.
    The embedding function (all-MiniLM-L6-v2 in their code) is pluggable upstream; this takes
    its output. Cost is O(N^2 D) per prompt.
    """
    chex.assert_rank([rewards_BxN, embeddings_BxNxD], [2, 3])
    chex.assert_equal_shape_prefix([rewards_BxN, embeddings_BxNxD], 2)
    if valid_BxN is not None:
        chex.assert_equal_shape([valid_BxN, rewards_BxN])
    total = _first_n(n, rewards_BxN.shape[1], "rbon_wd")
    rewards_BxN, embeddings_BxNxD = rewards_BxN[:, :total], embeddings_BxNxD[:, :total]
    if valid_BxN is not None:
        valid_BxN = valid_BxN[:, :total].astype(bool)
    _non_negative("beta", beta)
    beta = jnp.asarray(beta, jnp.float32)
    chex.assert_rank(beta, 0)
    # A candidate whose embedding is not finite is left out of the others' reference mean, and
    # its own closeness is NaN (it is disqualified) unless beta = 0, which is plain BoN.
    finite_BxN = jnp.all(jnp.isfinite(embeddings_BxNxD), axis=-1)
    reference_BxN = finite_BxN if valid_BxN is None else valid_BxN & finite_BxN
    closeness_BxN = jnp.where(finite_BxN,
                              mean_cosine_similarity(embeddings_BxNxD, reference_BxN), jnp.nan)
    penalty_BxN = jnp.where(beta == 0, 0.0, beta * closeness_BxN)
    return select_by_score(rewards_BxN + penalty_BxN, valid_BxN)


def uncertainty_penalised_scores(mean_BxN: Array, std_BxN: Array, k: float | Array,
                                 penalty: str = "std") -> Array:
    """mu - k * sigma ("std") or mu - k * sigma^2 ("var") (Yang et al. 2024, arXiv 2402.13210).

    mu, sigma come from a Laplace-LoRA predictive N(mu, sigma^2) or from a reward ensemble
    (`uncertainty_bon`). The exact form is spec-tagged [U]; both variants are offered.
    """
    chex.assert_rank([mean_BxN, std_BxN], 2)
    chex.assert_equal_shape([mean_BxN, std_BxN])
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    _non_negative("k (uncertainty penalty weight)", k)
    spread_BxN = std_BxN if penalty == "std" else jnp.square(std_BxN)
    return mean_BxN - jnp.asarray(k, jnp.float32) * spread_BxN


def uncertainty_bon(rewards_ExBxN: Array, k: float | Array, penalty: str = "std",
                    valid_BxN: Array | None = None, ddof: int = 0, n: int | None = None
                    ) -> Selection:
    """Uncertainty-penalised BoN from an ensemble of E reward models (Yang et al. 2024, spec 6).

    mu and sigma are the ensemble mean and standard deviation over E (ddof=0: population std,
    ddof=1: the unbiased variance, needs E >= 2). k = 0 is BoN on the ensemble mean.
    """
    chex.assert_rank(rewards_ExBxN, 3)
    num_members = rewards_ExBxN.shape[0]
    if ddof not in (0, 1) or num_members - ddof < 1:
        raise ValueError(f"ddof must be 0 or 1 and smaller than the ensemble size "
                         f"{num_members}, got {ddof}")
    mean_BxN = jnp.mean(rewards_ExBxN, axis=0)
    std_BxN = jnp.std(rewards_ExBxN, axis=0, ddof=ddof)
    return select_by_score(uncertainty_penalised_scores(mean_BxN, std_BxN, k, penalty), valid_BxN, n)


def select(samples_BxNx: Array, index_B: Array, fill_value: float | int = 0) -> Array:
    """Gathers samples[b, index[b], ...]; rows with index -1 (no valid candidate) get fill_value."""
    chex.assert_rank(index_B, 1)
    if samples_BxNx.ndim < 2 or samples_BxNx.shape[0] != index_B.shape[0]:
        raise ValueError(f"select: samples must be [B, N, ...] with B={index_B.shape[0]}, "
                         f"got shape {samples_BxNx.shape}")
    safe_B = jnp.clip(index_B, 0, samples_BxNx.shape[1] - 1)
    gather_idx = safe_B.reshape((-1, 1) + (1,) * (samples_BxNx.ndim - 2))
    picked_Bx = jnp.take_along_axis(samples_BxNx, gather_idx, axis=1)[:, 0]
    ok_Bx = (index_B >= 0).reshape((-1,) + (1,) * (picked_Bx.ndim - 1))
    return jnp.where(ok_Bx, picked_Bx, jnp.asarray(fill_value, samples_BxNx.dtype))


def checked(selection: Selection, what: str = "scores_BxN",
            row_names: Sequence[str] | None = None) -> Selection:
    """Host-side check: raises ValueError naming the rows that had no valid candidate (by
    `row_names[row]` when given, e.g. a prompt and a group of its candidates)."""
    has_valid_B = np.asarray(selection.has_valid_B)
    if not has_valid_B.all():
        rows = np.flatnonzero(~has_valid_B)
        named = rows[:10].tolist() if row_names is None else [row_names[i] for i in rows[:10]]
        raise ValueError(f"{what}: {rows.size} prompt row(s) have no valid, non-NaN candidate "
                         f"(rows {named}{' ...' if rows.size > 10 else ''})")
    return selection
