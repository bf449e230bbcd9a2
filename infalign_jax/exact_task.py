"""An enumerable alignment task on which every CTRL quantity is exact (the trainer's validation).

The task: P prompts of fixed length over a vocabulary of V content tokens; responses are every
sequence in {0..V-1}^L (fixed length, no EOS, so |Y| = V^L); the base policy pi_ref is a small
randomly initialised `infalign_jax.models` decoder sampled at temperature 1; the reward is a seeded
random table r[x, y] with distinct values per prompt (so the calibrated reward has no ties).

Because Y is small, pi_ref(y|x) is exact (teacher-forced log-probs over the whole enumeration),
and so are, for any policy given by its probability table:
  * KL(pi || pi_ref) = mean_x sum_y pi log(pi / pi_ref);
  * the standard win rate  P_{Y~pi, Z~pi_ref}[r(Y) > r(Z)] + 1/2 P[r(Y) = r(Z)];
  * the BoN_N / WoN_N win rates: the same with Y ~ T(pi), Z ~ T(pi_ref) (InfAlign's reading,
    spec section 1.2), where in reward order F the selected output has
    P[BoN_N = y] = F(<= y)^N - F(< y)^N and P[WoN_N = y] = (1 - F(< y))^N - (1 - F(<= y))^N.
    Ties happen only when both sides pick the same response (rewards are distinct), counted 1/2.

The exact CTRL target (spec section 0): pi*(y|x) ∝ pi_ref(y|x) exp(Phi(C(x,y)) / beta). Which C:
the trainer calibrates against a *finite* reference table of K samples of pi_ref (InfAlign Eq. 12),
so `target_policy` takes the calibrated reward table the trainer itself sees (`calibrated_table`,
computed with `calibration.calibrate` on the same reference table and the same smoothing), which
makes the target exactly the fixed point of the trainer's objective. With K large (thousands) this
is close to the population calibration, but the comparison never depends on that.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax.calibration import calibrate
from infalign_jax.sampling import sequence_logprobs
from infalign_jax.transforms import Transform

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExactTask:
    """The task's data: the base model, the prompts and the reward table (numpy, host side)."""

    model_cfg: models.ModelConfig
    ref_params: Any
    prompts_PxS: np.ndarray        # int32 prompt tokens (all real, no padding)
    responses_YxL: np.ndarray      # int32, every response, row index = response code
    rewards_PxY: np.ndarray        # float32, distinct within each prompt

    @property
    def vocab(self) -> int:
        return self.model_cfg.vocab_size

    @property
    def length(self) -> int:
        return self.responses_YxL.shape[1]


def enumerate_responses(vocab: int, length: int) -> np.ndarray:
    """All vocab**length responses; row i is i written in base `vocab`, most significant first."""
    return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)


def response_codes(tokens_BxL: Array, vocab: int) -> Array:
    """Row index into `enumerate_responses` of each response (the inverse of the enumeration)."""
    length = tokens_BxL.shape[-1]
    weights_L = vocab ** jnp.arange(length - 1, -1, -1)
    return jnp.sum(tokens_BxL.astype(jnp.int32) * weights_L, axis=-1)


def make_task(seed: int = 0, *, vocab: int = 4, length: int = 3, num_prompts: int = 2,
              prompt_len: int = 2, d_model: int = 32, n_layers: int = 2,
              init_std: float = 0.5) -> ExactTask:
    """A seeded task. `init_std` well above the usual 0.02 makes pi_ref far from uniform."""
    cfg = models.ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=2,
                             n_kv_heads=2, head_dim=16, d_ff=2 * d_model, max_len=32,
                             init_std=init_std)
    params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    rs = np.random.RandomState(seed)
    prompts = rs.randint(0, vocab, size=(num_prompts, prompt_len)).astype(np.int32)
    n_resp = vocab ** length
    # A random permutation per prompt: distinct rewards by construction.
    rewards = np.stack([rs.permutation(n_resp) for _ in range(num_prompts)]).astype(np.float32)
    rewards = rewards / n_resp + 0.1 * rs.randn(num_prompts, 1).astype(np.float32)
    return ExactTask(cfg, params, prompts, enumerate_responses(vocab, length), rewards)


def table_reward_fn(rewards_PxY: Array, prompt_idx_B: Array, tokens_BxL: Array,
                    mask_BxL: Array, *, vocab: int) -> Array:
    """The task's reward as a reward function (what `rl.RLConfig`'s trainer calls): a lookup."""
    del mask_BxL  # responses have fixed length
    return rewards_PxY[prompt_idx_B, response_codes(tokens_BxL, vocab)]


@functools.lru_cache(maxsize=None)
def _jitted_logprobs(cfg: models.ModelConfig):
    # Op-by-op dispatch of the enumeration forward pass takes seconds; compiled it takes ms.
    return jax.jit(functools.partial(sequence_logprobs, models.decoder_fns(cfg)))


def policy_logprobs(task: ExactTask, params: Any) -> np.ndarray:
    """log pi(y|x) for every prompt and response under `params` (teacher forced, exact): PxY."""
    n_p, n_y = task.rewards_PxY.shape
    prompt = jnp.asarray(np.repeat(task.prompts_PxS, n_y, axis=0))
    resp = jnp.asarray(np.tile(task.responses_YxL, (n_p, 1)))
    logp_BxL = _jitted_logprobs(task.model_cfg)(params, prompt, jnp.ones(prompt.shape, bool), resp,
                                                jnp.ones(resp.shape, bool))
    return np.asarray(jnp.sum(logp_BxL, axis=-1), np.float64).reshape(n_p, n_y)


def sample_reference_table(task: ExactTask, k: int, seed: int = 0) -> np.ndarray:
    """K rewards of pi_ref per prompt, sorted: draws from the exact pi_ref probabilities (PxK)."""
    probs = np.exp(policy_logprobs(task, task.ref_params))
    rs = np.random.RandomState(seed)
    rows = []
    for p in range(probs.shape[0]):
        idx = rs.choice(probs.shape[1], size=k, p=probs[p] / probs[p].sum())
        rows.append(np.sort(task.rewards_PxY[p, idx]))
    return np.stack(rows).astype(np.float32)


def calibrated_table(task: ExactTask, ref_sorted_PxK: np.ndarray, smoothed: bool) -> np.ndarray:
    """C_hat(x, y) for every response, with the same `calibrate` the trainer uses: PxY."""
    return np.asarray(calibrate(jnp.asarray(task.rewards_PxY), jnp.asarray(ref_sorted_PxK),
                                smoothed=smoothed), np.float64)


def target_policy(ref_logp_PxY: np.ndarray, calibrated_PxY: np.ndarray, transform: Transform,
                  beta: float, raw_PxY: np.ndarray | None = None) -> np.ndarray:
    """pi* ∝ pi_ref exp(Phi(C) / beta) (spec section 0, KL-RLHF solution): probabilities PxY."""
    phi = np.asarray(transform(jnp.asarray(calibrated_PxY), raw=raw_PxY), np.float64)
    logits = ref_logp_PxY + phi / beta
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def exact_kl(probs_PxY: np.ndarray, ref_probs_PxY: np.ndarray) -> float:
    """mean over prompts of KL(pi(.|x) || pi_ref(.|x))."""
    p, q = np.asarray(probs_PxY, np.float64), np.asarray(ref_probs_PxY, np.float64)
    terms = np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0)
    return float(terms.sum(axis=1).mean())


def _selected(probs_Y: np.ndarray, order_Y: np.ndarray, n: int, how: str) -> np.ndarray:
    """Distribution of the best (or worst) of n i.i.d. draws, responses given in reward order."""
    p_sorted = probs_Y[order_Y]
    cdf_le = np.cumsum(p_sorted)
    cdf_lt = cdf_le - p_sorted
    if how == "bon":
        sel = cdf_le ** n - cdf_lt ** n
    else:
        sel = (1.0 - cdf_lt) ** n - (1.0 - cdf_le) ** n
    out = np.empty_like(sel)
    out[order_Y] = sel
    return out


def exact_win_rate(probs_PxY: np.ndarray, ref_probs_PxY: np.ndarray, rewards_PxY: np.ndarray,
                   n: int = 1, how: str = "bon") -> float:
    """mean_x P[r(T(pi)) > r(T(pi_ref))] + 1/2 P[=], T = BoN_n ("bon") or WoN_n ("won").

    n = 1 is the standard win rate. Rewards must be distinct within a prompt.
    """
    if how not in ("bon", "won"):
        raise ValueError(f"how must be 'bon' or 'won', got {how!r}")
    rates = []
    for p, q, r in zip(np.asarray(probs_PxY, np.float64), np.asarray(ref_probs_PxY, np.float64),
                       np.asarray(rewards_PxY)):
        if len(np.unique(r)) != len(r):
            raise ValueError("rewards_PxY must be distinct within each prompt")
        order = np.argsort(r)
        sp, sq = _selected(p, order, n, how)[order], _selected(q, order, n, how)[order]
        q_below = np.cumsum(sq) - sq
        rates.append(float(np.sum(sp * (q_below + 0.5 * sq))))
    return float(np.mean(rates))


def policy_report(task: ExactTask, probs_PxY: np.ndarray, ns: tuple[int, ...] = (1, 2, 4)
                  ) -> dict[str, float]:
    """KL and standard / BoN_n / WoN_n win rates of a policy's probability table against pi_ref."""
    ref = np.exp(policy_logprobs(task, task.ref_params))
    out = {"kl": exact_kl(probs_PxY, ref)}
    for n in ns:
        out[f"bon{n}"] = exact_win_rate(probs_PxY, ref, task.rewards_PxY, n, "bon")
        out[f"won{n}"] = exact_win_rate(probs_PxY, ref, task.rewards_PxY, n, "won")
    return out


def trained_report(task: ExactTask, params: Any, ns: tuple[int, ...] = (1, 2, 4)
                   ) -> dict[str, float]:
    """`policy_report` of a trained model, by enumerating its probabilities."""
    return policy_report(task, np.exp(policy_logprobs(task, params)), ns)

