"""Pairwise preference losses: Bradley-Terry reward models, DPO, IPO, BoNBoN (spec sections 4, 5).

Inputs are per-sequence numbers: rewards r(x, y) for reward-model training, or sequence
log-probabilities log pi(y|x) = sum_t log pi(y_t | x, y_<t) of the policy and the frozen
reference for the direct-alignment losses. With

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)),

| function           | per-pair loss                                | paper                       |
|--------------------|----------------------------------------------|-----------------------------|
| bradley_terry_loss | -log sigmoid(r_w - r_l - margin)             | Bradley & Terry 1952        |
| dpo_loss           | -log sigmoid(beta h)                         | Rafailov et al. 2023, eq. 7 |
| ipo_loss           | (h - 1/(2 beta))^2                           | Azar et al. 2023, eq. 17    |
| bonbon_loss        | alpha NLL(y_best) + (1 - alpha) IPO(beta*_n) | Gui et al. 2024             |

bonbon_beta(n) = 1/(2 (n-1) H_{n-1}) comes from the identity E[h] = (n-1) H_{n-1} for the exact
BoN_n policy between the best and worst of n draws (spec 4); vbon_beta(n) = 1/(n-1) is the KL
coefficient that makes RLHF with reward log F(r) target BoN_n (Amini et al. 2024, spec 5).

Label smoothing (Bradley-Terry, DPO) is the conservative form of Mitchell 2023 ("cDPO"): the
label is taken as flipped with probability eps. Accuracies count ties as 1/2, the project's tie
convention (spec 0). Losses are batch means; metrics are stop-gradient scalars. No jit inside.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from infalign_jax.core.losses import check_rank, check_same_shape, check_scalar
from infalign_jax.infra import validate as check

Array = jax.Array

BONBON_VARIANTS = ("ipo", "dpo")


def _pairs(names: tuple[str, ...], *arrays: Array) -> list[Array]:
    out = [check_rank(a, 1, n) for a, n in zip(arrays, names)]
    check_same_shape(out, " vs ".join(names))
    return out


def _mean(x_B: Array, mask_B: Array | None) -> Array:
    """Mean over the pairs `mask_B` keeps (all when None); 0 when it keeps none."""
    if mask_B is None:
        return jnp.mean(x_B)
    mask_B = jnp.asarray(mask_B, x_B.dtype)
    return jnp.sum(jnp.where(mask_B > 0, x_B, 0.0)) / jnp.maximum(jnp.sum(mask_B), 1.0)


def _win_accuracy(diff_B: Array, mask_B: Array | None = None) -> Array:
    """Share of pairs with diff > 0; ties count 1/2."""
    diff_B = jax.lax.stop_gradient(diff_B)
    return _mean(jnp.where(diff_B > 0, 1.0, jnp.where(diff_B == 0, 0.5, 0.0)), mask_B)


def _smoothed_logistic(z_B: Array, label_smoothing: Array) -> Array:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z), per pair."""
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B)
            - label_smoothing * jax.nn.log_sigmoid(-z_B))


def bradley_terry_loss(r_chosen_B: Array, r_rejected_B: Array, margin: float | Array = 0.0,
                       label_smoothing: float = 0.0) -> tuple[Array, dict]:
    """Reward-model loss under the Bradley-Terry model P(y_w > y_l) = sigmoid(r_w - r_l).

    Bradley & Terry 1952; as the RLHF reward-model objective: Ouyang et al. 2022, eq. 1.
    loss = mean -(1-eps) log sigmoid(d) - eps log sigmoid(-d), d = r_w - r_l - margin, where the
    optional margin (scalar or per pair, Touvron et al. 2023 "Llama 2", eq. 2) demands a larger gap
    for more clearly preferred pairs. Metrics: accuracy (P[r_w > r_l], ties 1/2), mean gap.
    """
    r_chosen_B, r_rejected_B = _pairs(("r_chosen_B", "r_rejected_B"), r_chosen_B, r_rejected_B)
    label_smoothing = check_scalar(label_smoothing, "label_smoothing", low=0.0, high=0.5,
                                   high_open=True)
    margin = jnp.asarray(margin, jnp.float32)
    if margin.ndim not in (0, 1) or (margin.ndim == 1 and margin.shape != r_chosen_B.shape):
        raise ValueError(f"margin must be a scalar or of shape {r_chosen_B.shape}, "
                         f"got {margin.shape}")
    gap_B = r_chosen_B - r_rejected_B
    loss = jnp.mean(_smoothed_logistic(gap_B - margin, label_smoothing))
    return loss, {"accuracy": _win_accuracy(gap_B),
                  "reward_gap": jax.lax.stop_gradient(jnp.mean(gap_B))}


def preference_log_ratio(policy_chosen_logp_B: Array, policy_rejected_logp_B: Array,
                         ref_chosen_logp_B: Array, ref_rejected_logp_B: Array) -> Array:
    """h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), per pair (reference is constant)."""
    names = ("policy_chosen_logp_B", "policy_rejected_logp_B", "ref_chosen_logp_B",
             "ref_rejected_logp_B")
    pw, pl, rw, rl = _pairs(names, policy_chosen_logp_B, policy_rejected_logp_B,
                            ref_chosen_logp_B, ref_rejected_logp_B)
    ref_B = jax.lax.stop_gradient(rw - rl)
    return (pw - pl) - ref_B


def _direct_metrics(h_B: Array, beta: Array, mask_B: Array | None) -> dict:
    h_mean = jax.lax.stop_gradient(_mean(h_B, mask_B))
    return {"accuracy": _win_accuracy(h_B, mask_B), "h_mean": h_mean,
            "implicit_reward_margin": beta * h_mean}


def _pair_mask(mask_B: Array | None, h_B: Array) -> Array | None:
    if mask_B is None:
        return None
    mask_B = jnp.asarray(mask_B)
    check_same_shape([mask_B, h_B], "pair_mask_B vs the log-probs")
    return mask_B


def dpo_loss(policy_chosen_logp_B: Array, policy_rejected_logp_B: Array,
             ref_chosen_logp_B: Array, ref_rejected_logp_B: Array, beta: float | Array,
             label_smoothing: float = 0.0, pair_mask_B: Array | None = None
             ) -> tuple[Array, dict]:
    """Direct preference optimisation: mean -log sigmoid(beta h) (Rafailov et al. 2023,
    arXiv 2305.18290, eq. 7); with label smoothing eps the conservative cDPO form
    -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (Mitchell 2023).

    Metrics: accuracy (P[h > 0], ties 1/2), h_mean, implicit_reward_margin (beta * mean h).
    `pair_mask_B` (1 = a pair, 0 = none, e.g. a chosen response that is the rejected one): the
    loss and metrics are means over the pairs it keeps (0 when it keeps none).
    """
    beta = check_scalar(beta, "beta", low=0.0, low_open=True)
    label_smoothing = check_scalar(label_smoothing, "label_smoothing", low=0.0, high=0.5,
                                   high_open=True)
    h_B = preference_log_ratio(policy_chosen_logp_B, policy_rejected_logp_B,
                               ref_chosen_logp_B, ref_rejected_logp_B)
    mask_B = _pair_mask(pair_mask_B, h_B)
    loss = _mean(_smoothed_logistic(beta * h_B, label_smoothing), mask_B)
    return loss, _direct_metrics(h_B, beta, mask_B)


def ipo_loss(policy_chosen_logp_B: Array, policy_rejected_logp_B: Array,
             ref_chosen_logp_B: Array, ref_rejected_logp_B: Array,
             beta: float | Array, pair_mask_B: Array | None = None) -> tuple[Array, dict]:
    """Identity preference optimisation: mean (h - 1/(2 beta))^2 (Azar et al. 2023,
    arXiv 2310.12036v2, eq. 17; their tau is beta here). Minimised at h = 1/(2 beta): unlike DPO
    the target log-ratio gap stays finite even for deterministic preferences. `pair_mask_B` as
    for `dpo_loss`.
    """
    beta = check_scalar(beta, "beta", low=0.0, low_open=True)
    h_B = preference_log_ratio(policy_chosen_logp_B, policy_rejected_logp_B,
                               ref_chosen_logp_B, ref_rejected_logp_B)
    mask_B = _pair_mask(pair_mask_B, h_B)
    loss = _mean(jnp.square(h_B - 1.0 / (2.0 * beta)), mask_B)
    return loss, _direct_metrics(h_B, beta, mask_B)


def _check_n(n: int, name: str) -> int:
    # Best of at least two samples.
    return check.int_arg(f"{name}: n", n, low=2)


def harmonic_number(k: int) -> float:
    """H_k = sum_{i=1}^k 1/i (H_0 = 0)."""
    check.int_arg("harmonic_number: k", k, low=0)
    return math.fsum(1.0 / i for i in range(1, k + 1))


def bonbon_beta(n: int) -> float:
    """beta*_n = 1/(2 (n-1) H_{n-1}) (Gui et al. 2024, arXiv 2406.00832; spec 4).

    For the exact best-of-n policy pi_n = n pi_0 Q^{n-1}, E[h(y_best, y_worst)] = (n-1) H_{n-1},
    so the IPO target 1/(2 beta) must equal it. beta*_8 = 0.0275482094 (their README value).
    """
    n = _check_n(n, "bonbon_beta")
    return 1.0 / (2.0 * (n - 1) * harmonic_number(n - 1))


def vbon_beta(n: int) -> float:
    """beta = 1/(n-1): RLHF with reward log F(r) then targets BoN_n (Amini et al. 2024,
    arXiv 2407.06057; their README: "n = 1/beta + 1"; spec 5)."""
    n = _check_n(n, "vbon_beta")
    return 1.0 / (n - 1)


def bonbon_loss(policy_best_logp_B: Array, policy_worst_logp_B: Array, ref_best_logp_B: Array,
                ref_worst_logp_B: Array, n: int, alpha: float,
                beta: float | Array | None = None, variant: str = "ipo",
                pair_mask_B: Array | None = None) -> tuple[Array, dict]:
    """BoNBoN alignment loss (Gui et al. 2024, arXiv 2406.00832; spec 4):

        L = alpha * mean(-log pi(y_best)) + (1 - alpha) * L_pref(h; beta),

    on pairs (best, worst) of the same n draws from pi_0, with beta = beta*_n by default.
    variant="ipo" (the paper): L_pref = mean (h - 1/(2 beta))^2.
    variant="dpo": L_pref = mean -log sigmoid(beta h). Their released trainers.py calls the
    preference loss with ipo=False for 'bonbon', so their code computes this logistic form while
    logging it as ".../ipo" (spec 4, code caveat); offered for reproducing their runs.
    The NLL is of the whole sequence (summed token log-probs), as in their code; pass a length-
    normalised log-prob to get a per-token NLL. Metrics: nll, pref, h_mean, accuracy, beta.
    `pair_mask_B` = 0 where the best and worst responses are one and the same (all n rewards
    tied): such a prompt has no preference pair, so L_pref and its metrics average over the
    others, while its best response still enters the NLL; metric `tied` is the share left out.
    """
    n = _check_n(n, "bonbon_loss")
    alpha = check_scalar(alpha, "alpha", low=0.0, high=1.0)
    if variant not in BONBON_VARIANTS:
        raise ValueError(f"bonbon_loss: variant must be one of {BONBON_VARIANTS}, got {variant!r}")
    beta = bonbon_beta(n) if beta is None else beta
    pref_fn = ipo_loss if variant == "ipo" else dpo_loss
    pref, metrics = pref_fn(policy_best_logp_B, policy_worst_logp_B, ref_best_logp_B,
                            ref_worst_logp_B, beta, pair_mask_B=pair_mask_B)
    nll = -jnp.mean(check_rank(policy_best_logp_B, 1, "policy_best_logp_B"))
    loss = alpha * nll + (1.0 - alpha) * pref
    tied = (jnp.float32(0.0) if pair_mask_B is None
            else 1.0 - jnp.mean(jnp.asarray(pair_mask_B, jnp.float32)))
    metrics = dict(metrics, nll=jax.lax.stop_gradient(nll), pref=jax.lax.stop_gradient(pref),
                   beta=jnp.asarray(beta, jnp.float32), tied=tied)
    return loss, metrics
