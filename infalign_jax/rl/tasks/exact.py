"""An enumerable alignment task on which every CTRL quantity is exact (the trainer's validation).

The task: P prompts of fixed length; responses are every sequence the sampler can produce with a
budget of L new tokens, so the response set Y is small enough to enumerate:
  * without EOS (default), every sequence in {0..V-1}^L (|Y| = V^L);
  * with EOS (`eos=True`; token V-1 is EOS), every c_1..c_{k-1} EOS for k = 1..L plus the L-token
    responses that never emit EOS (|Y| = sum_{k<=L} (V-1)^{k-1} + (V-1)^L; 40 for V=4, L=3), so
    response lengths vary from 1 to L, as with a real tokenizer's end-of-sequence token.
The base policy pi_ref is a small randomly initialised `infalign_jax.models` decoder sampled at
temperature 1; the reward is a seeded random table r[x, y] with distinct values per prompt (so the
calibrated reward has no ties).

Because Y is small, pi_ref(y|x) is exact (teacher-forced log-probs over the whole enumeration),
and so are, for any policy given by its probability table:
  * KL(pi || pi_ref) = mean_x sum_y pi log(pi / pi_ref);
  * the standard win rate  P_{Y~pi, Z~pi_ref}[r(Y) > r(Z)] + 1/2 P[r(Y) = r(Z)];
  * the BoN_N / WoN_N win rates: the same with Y ~ T(pi), Z ~ T(pi_ref) (InfAlign's reading,
    spec section 1.2), where in reward order F the selected output has
    P[BoN_N = y] = F(<= y)^N - F(< y)^N and P[WoN_N = y] = (1 - F(< y))^N - (1 - F(<= y))^N.
    Ties happen only when both sides pick the same response (rewards are distinct), counted 1/2;
  * the convergence of a trained policy: KL(pi || pi*) (`exact_kl`), which is
    (J(pi*) - J(pi)) / beta for the trainer's objective J = E_pi[Phi] - beta KL(pi || pi_ref).

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
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax.analysis import evaluation
from infalign_jax.core.calibration import ReferenceTable, build_reference_table, calibrate
from infalign_jax.decoding.sampling import sequence_logprobs
from infalign_jax.core.transforms import Transform
from infalign_jax.core.types import Params
from infalign_jax.rl.tasks.base import RLTask
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import as_dict, dataclass_from, float_text

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExactTask:
    """The task's data: the base model, the prompts and the reward table (numpy, host side)."""

    model_cfg: models.ModelConfig
    ref_params: Any
    prompts_XxP: np.ndarray        # int32 prompt tokens (all real, no padding)
    responses_YxL: np.ndarray      # int32, every response (pad_id after EOS), row = response index
    rewards_XxY: np.ndarray        # float32, distinct within each prompt
    response_mask_YxL: np.ndarray | None = None  # bool, True up to and including EOS
    eos_id: int | None = None
    pad_id: int = 0

    @property
    def vocab(self) -> int:
        return self.model_cfg.vocab_size

    @property
    def length(self) -> int:
        return self.responses_YxL.shape[1]

    @property
    def mask_YxL(self) -> np.ndarray:
        if self.response_mask_YxL is None:
            return np.ones(self.responses_YxL.shape, bool)
        return self.response_mask_YxL

    @functools.cached_property
    def key_to_index(self) -> np.ndarray:
        """`response_keys` value -> row of the enumeration (-1: not a response of this task)."""
        keys = np.asarray(response_keys(jnp.asarray(self.responses_YxL),
                                        jnp.asarray(self.mask_YxL), self.vocab))
        lookup = np.full((self.vocab + 1) ** self.length, -1, np.int32)
        lookup[keys] = np.arange(len(keys), dtype=np.int32)
        return lookup


def enumerate_responses(vocab: int, length: int) -> np.ndarray:
    """All vocab**length responses; row i is i written in base `vocab`, most significant first."""
    return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)


def enumerate_eos_responses(vocab: int, length: int, eos_id: int, pad_id: int = 0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_YxL, mask_YxL) of every response with a budget of `length` tokens: content tokens
    (every id but `eos_id`) ending with EOS at position k = 1..length, then those with no EOS."""
    content = [v for v in range(vocab) if v != eos_id]
    rows, masks = [], []
    for k in range(1, length + 1):
        for head in itertools.product(content, repeat=k - 1):
            rows.append(list(head) + [eos_id] + [pad_id] * (length - k))
            masks.append([True] * k + [False] * (length - k))
    for full in itertools.product(content, repeat=length):
        rows.append(list(full))
        masks.append([True] * length)
    return np.array(rows, np.int32), np.array(masks, bool)


def response_codes(tokens_BxL: Array, vocab: int) -> Array:
    """Row index into `enumerate_responses` of each fixed-length response (its inverse)."""
    length = tokens_BxL.shape[-1]
    weights_L = vocab ** jnp.arange(length - 1, -1, -1)
    return jnp.sum(tokens_BxL.astype(jnp.int32) * weights_L, axis=-1)


def response_keys(tokens_BxL: Array, mask_BxL: Array, vocab: int) -> Array:
    """An integer per response that ignores what follows EOS: the valid tokens as base-(V+1)
    digits token + 1, masked positions as digit 0."""
    length = tokens_BxL.shape[-1]
    digits_BxL = jnp.where(jnp.asarray(mask_BxL, bool), tokens_BxL.astype(jnp.int32) + 1, 0)
    return jnp.sum(digits_BxL * (vocab + 1) ** jnp.arange(length - 1, -1, -1), axis=-1)


def make_task(seed: int = 0, *, vocab: int = 4, length: int = 3, num_prompts: int = 2,
              prompt_len: int = 2, d_model: int = 32, n_layers: int = 2,
              init_std: float = 0.2, eos: bool = False) -> ExactTask:
    """A seeded task. `init_std` above the usual 0.02 makes pi_ref clearly non-uniform (0.2: its
    largest response probability is 6x uniform for seed 0); much larger values (0.5) saturate the
    random network, pi_ref becomes nearly deterministic for some seeds (max probability 0.994)
    and the saturated softmaxes stall even exact-gradient training (docs/results.md)."""
    cfg = models.ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=2,
                             n_kv_heads=2, head_dim=16, d_ff=2 * d_model, max_len=32,
                             init_std=init_std)
    params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    rs = np.random.RandomState(seed)
    content = vocab - 1 if eos else vocab
    if num_prompts > content ** prompt_len:
        raise ValueError(f"num_prompts={num_prompts} exceeds the {content ** prompt_len} distinct "
                         f"prompts of length {prompt_len} over {content} content tokens")
    # Distinct prompts: two equal prompts with different reward tables have no common optimum.
    codes = rs.choice(content ** prompt_len, size=num_prompts, replace=False)
    prompts = np.array([[(c // content ** i) % content for i in range(prompt_len)]
                        for c in codes], np.int32)
    if eos:
        eos_id = vocab - 1
        responses, mask = enumerate_eos_responses(vocab, length, eos_id)
    else:
        eos_id, responses, mask = None, enumerate_responses(vocab, length), None
    n_resp = responses.shape[0]
    # A random permutation per prompt: distinct rewards by construction.
    rewards = np.stack([rs.permutation(n_resp) for _ in range(num_prompts)]).astype(np.float32)
    rewards = rewards / n_resp + 0.1 * rs.randn(num_prompts, 1).astype(np.float32)
    return ExactTask(cfg, params, prompts, responses, rewards, mask, eos_id)


def table_reward_fn(rewards_XxY: Array, prompt_idx_B: Array, tokens_BxL: Array,
                    mask_BxL: Array, *, vocab: int, key_to_index: Array | None = None) -> Array:
    """The task's reward as a reward function (what `rl.RLConfig`'s trainer calls): a lookup.

    Without `key_to_index` responses have fixed length (`response_codes`); with it (EOS tasks,
    `ExactTask.key_to_index`) the row is looked up from `response_keys`.
    """
    if key_to_index is None:
        return rewards_XxY[prompt_idx_B, response_codes(tokens_BxL, vocab)]
    rows_B = jnp.asarray(key_to_index)[response_keys(tokens_BxL, mask_BxL, vocab)]
    return rewards_XxY[prompt_idx_B, rows_B]


def reward_fn(task: ExactTask):
    """`table_reward_fn` bound to this task (reward params: `task.rewards_XxY`)."""
    if task.eos_id is None:
        return functools.partial(table_reward_fn, vocab=task.vocab)
    return functools.partial(table_reward_fn, vocab=task.vocab,
                             key_to_index=jnp.asarray(task.key_to_index))


@functools.lru_cache(maxsize=None)
def _jitted_logprobs(cfg: models.ModelConfig):
    # Op-by-op dispatch of the enumeration forward pass takes seconds; compiled it takes ms.
    return jax.jit(functools.partial(sequence_logprobs, models.decoder_fns(cfg)))


def policy_logprobs(task: ExactTask, params: Any) -> np.ndarray:
    """log pi(y|x) for every prompt and response under `params` (teacher forced, exact): PxY."""
    n_p, n_y = task.rewards_XxY.shape
    prompt = jnp.asarray(np.repeat(task.prompts_XxP, n_y, axis=0))
    resp = jnp.asarray(np.tile(task.responses_YxL, (n_p, 1)))
    mask = jnp.asarray(np.tile(task.mask_YxL, (n_p, 1)))
    logp_BxL = _jitted_logprobs(task.model_cfg)(params, prompt, jnp.ones(prompt.shape, bool), resp,
                                                mask)
    return np.asarray(jnp.sum(logp_BxL, axis=-1), np.float64).reshape(n_p, n_y)


def sample_reference_table(task: ExactTask, k: int, seed: int = 0) -> np.ndarray:
    """K rewards of pi_ref per prompt, sorted: draws from the exact pi_ref probabilities (PxK)."""
    probs = np.exp(policy_logprobs(task, task.ref_params))
    rs = np.random.RandomState(seed)
    rows = []
    for p in range(probs.shape[0]):
        idx = rs.choice(probs.shape[1], size=k, p=probs[p] / probs[p].sum())
        rows.append(np.sort(task.rewards_XxY[p, idx]))
    return np.stack(rows).astype(np.float32)


def calibrated_table(task: ExactTask, ref_sorted_XxK: np.ndarray, smoothing: str) -> np.ndarray:
    """C_hat(x, y) (or its `smoothing`) for every response, with the trainer's `calibrate`: PxY."""
    return np.asarray(calibrate(jnp.asarray(task.rewards_XxY), jnp.asarray(ref_sorted_XxK),
                                smoothing=smoothing), np.float64)


def target_logprobs(ref_logp_XxY: np.ndarray, calibrated_XxY: np.ndarray, transform: Transform,
                    beta: float, raw_XxY: np.ndarray | None = None) -> np.ndarray:
    """log pi*, pi* ∝ pi_ref exp(Phi(C) / beta) (spec section 0, KL-RLHF solution): PxY, float64,
    exact even where pi* underflows to 0."""
    phi = np.asarray(transform(jnp.asarray(calibrated_XxY), raw=raw_XxY), np.float64)
    logits = np.asarray(ref_logp_XxY, np.float64) + phi / beta
    top = logits.max(axis=1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


def target_policy(ref_logp_XxY: np.ndarray, calibrated_XxY: np.ndarray, transform: Transform,
                  beta: float, raw_XxY: np.ndarray | None = None) -> np.ndarray:
    """pi* ∝ pi_ref exp(Phi(C) / beta): probabilities PxY."""
    return np.exp(target_logprobs(ref_logp_XxY, calibrated_XxY, transform, beta, raw_XxY))


def bon_logprobs(ref_logp_XxY: np.ndarray, rewards_XxY: np.ndarray, n: int) -> np.ndarray:
    """log BoN_n(pi_ref): PxY, float64, the policy Best-of-N distillation (BoNBoN, vBoN) targets,
    P[BoN_n = y] = F(<= y)^n - F(< y)^n in reward order (`evaluation.selected_probs`)."""
    probs = evaluation.selected_probs(rewards_XxY, n, "bon", weights_BxM=np.exp(ref_logp_XxY))
    with np.errstate(divide="ignore"):
        return np.log(probs)


def kl_from_logprobs(logp_XxY: np.ndarray, logq_XxY: np.ndarray) -> float:
    """mean over prompts of KL(p || q) from log-probabilities (finite where q underflows)."""
    logp, logq = np.asarray(logp_XxY, np.float64), np.asarray(logq_XxY, np.float64)
    p = np.exp(logp)
    return float(np.where(p > 0, p * (logp - logq), 0.0).sum(axis=1).mean())


# A run has converged when KL(pi || pi*) <= this (nats, mean over prompts). Chosen from
# measurement (docs/results.md, "Convergence"): runs whose KL(pi || pi_ref) is within 2% of the
# target's and whose exact win rates are within 0.005 of it sit below 0.01, while the stalled
# runs of the same measurement (a prefix pushed to probability ~0) sit at 0.05-0.4.
CONVERGED_KL = 0.01


def beta_for_kl(ref_logp_XxY: np.ndarray, cal_XxY: np.ndarray, raw_XxY: np.ndarray,
                transform: Transform, kl: float, lo: float = 1e-5, hi: float = 1e5) -> float:
    """beta whose exact target has KL(pi* || pi_ref) = kl (bisection in log beta; KL falls with beta)."""
    ref = np.exp(ref_logp_XxY)

    def kl_at(beta: float) -> float:
        return exact_kl(target_policy(ref_logp_XxY, cal_XxY, transform, beta, raw_XxY), ref)

    if not kl_at(hi) < kl < kl_at(lo):
        raise ValueError(f"KL budget {kl} outside the reachable range ({kl_at(hi):.3g}, "
                         f"{kl_at(lo):.3g}) of transform {transform.name}")
    a, b = math.log(lo), math.log(hi)
    for _ in range(60):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if kl_at(math.exp(mid)) > kl else (a, mid)
    return math.exp(0.5 * (a + b))


def target_sharpness(calibrated_XxY: np.ndarray, transform: Transform, beta: float,
                     raw_XxY: np.ndarray | None = None) -> float:
    """range(Phi) / beta: the largest spread over a prompt's responses of Phi(C) / beta, i.e. of
    log pi*/pi_ref. Large values (tens) mean a sharp target that is slow to reach (see
    `rl_config.scheduled_beta`)."""
    phi = np.asarray(transform(jnp.asarray(calibrated_XxY), raw=raw_XxY), np.float64)
    return float(np.max(phi.max(axis=1) - phi.min(axis=1)) / beta)


def exact_kl(probs_XxY: np.ndarray, ref_probs_XxY: np.ndarray) -> float:
    """mean over prompts of KL(pi(.|x) || pi_ref(.|x))."""
    p, q = np.asarray(probs_XxY, np.float64), np.asarray(ref_probs_XxY, np.float64)
    terms = np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0)
    return float(terms.sum(axis=1).mean())


def exact_win_rate(probs_XxY: np.ndarray, ref_probs_XxY: np.ndarray, rewards_XxY: np.ndarray,
                   n: int = 1, how: str = "bon") -> float:
    """mean_x P[r(T(pi)) > r(T(pi_ref))] + 1/2 P[=], T = BoN_n ("bon") or WoN_n ("won"), exactly:
    `evaluation.plugin_win_rates` with the enumerated responses weighted by their probabilities.
    n = 1 is the standard win rate."""
    rewards = np.asarray(rewards_XxY, np.float64)
    return float(np.mean(evaluation.plugin_win_rates(
        rewards, rewards, n, how, "transformed", pol_weights_BxM=probs_XxY,
        ref_weights_BxK=ref_probs_XxY)))


def policy_report(task: ExactTask, probs_XxY: np.ndarray, ns: tuple[int, ...] = (1, 2, 4)
                  ) -> dict[str, float]:
    """KL and standard / BoN_n / WoN_n win rates of a policy's probability table against pi_ref."""
    ref = np.exp(policy_logprobs(task, task.ref_params))
    out = {"kl": exact_kl(probs_XxY, ref)}
    for n in ns:
        out[f"bon{n}"] = exact_win_rate(probs_XxY, ref, task.rewards_XxY, n, "bon")
        out[f"won{n}"] = exact_win_rate(probs_XxY, ref, task.rewards_XxY, n, "won")
    return out


def trained_report(task: ExactTask, params: Any, ns: tuple[int, ...] = (1, 2, 4)
                   ) -> dict[str, float]:
    """`policy_report` of a trained model, by enumerating its probabilities."""
    return policy_report(task, np.exp(policy_logprobs(task, params)), ns)


# --------------------------------------------------------------------------- as an RLTask
@dataclasses.dataclass(frozen=True)
class ExactTaskConfig:
    """`config.task` of the exact task (the `make_task` arguments), validated."""

    _config_owner = "config.task"
    name: str = "exact"
    seed: int = 0
    vocab: int = 4
    length: int = 3
    num_prompts: int = 2
    d_model: int = 32
    init_std: float = 0.2
    eos: bool = False
    # > 0: the run loop solves rl.beta so that the exact target's KL(pi* || pi_ref) is this.
    kl_budget: float = 0.0
    # The N of the exact BoN_N / WoN_N win rates the evaluation reports (exact_bon<N>, ...).
    eval_ns: tuple = (1, 2, 4)

    def __post_init__(self):
        check.int_tuple(self, "eval_ns", "a non-empty tuple of integers >= 1")
        check.ints(self, ("seed",), low=0)
        check.ints(self, ("vocab", "length", "num_prompts", "d_model"))
        check.numbers(self, ("init_std",), strict=True)
        check.numbers(self, ("kl_budget",))
        check.bools(self, ("eos",))


def exact_task_config(section: Any) -> ExactTaskConfig:
    """A config's `task` section, validated (other keys are refused)."""
    return dataclass_from(ExactTaskConfig, as_dict(section), "task")


def task_from_section(section: Any) -> ExactTask:
    """The exact task of a config's `task` section (`ExactTaskConfig`)."""
    c = exact_task_config(section)
    return make_task(c.seed, vocab=c.vocab, length=c.length, num_prompts=c.num_prompts,
                     d_model=c.d_model, init_std=c.init_std, eos=c.eos)


# Fields of `ExactTaskConfig` that change neither pi_ref nor the rewards, hence not the table.
_NOT_IN_TABLE = ("name", "kl_budget", "eval_ns")


def table_tag(c: ExactTaskConfig) -> str:
    """The reward and base model ids' tag: every field that changes pi_ref or the reward table
    (all but `_NOT_IN_TABLE`), so a work dir's table of another task is refused, never reused.
    Floats are written without loss (`config_utils.float_text`): `:g`'s six digits gave init_std
    0.2 and 0.2000004 one tag."""
    return ",".join(f"{f.name}={float_text(getattr(c, f.name))}"
                    if isinstance(getattr(c, f.name), float)
                    else f"{f.name}={getattr(c, f.name)}"
                    for f in dataclasses.fields(c) if f.name not in _NOT_IN_TABLE)


def rl_task(section: Any) -> RLTask:
    """The exact task of `config.task` as an `RLTask` with exact evaluation (see the module doc)."""
    task = task_from_section(section)
    ids = tuple(f"p{i}" for i in range(task.prompts_XxP.shape[0]))
    c = exact_task_config(section)
    tag = table_tag(c)

    def reference_table(k: int, seed: int, partial_path: str | None = None,
                        progress: Any = None) -> ReferenceTable:
        del partial_path, progress  # exact sampling from the enumeration takes milliseconds
        sorted_XxK = sample_reference_table(task, k, seed=seed)
        return build_reference_table(ids, sorted_XxK, reward_model_id=f"exact_reward[{tag}]",
                                     base_model_id=f"exact_base[{tag}]")

    ref_logp_XxY = policy_logprobs(task, task.ref_params)

    def calibrated(transform, table: ReferenceTable) -> np.ndarray:
        sorted_XxK, _ = table.lookup(ids)
        return calibrated_table(task, sorted_XxK, transform.smoothing)

    def evaluate(params: Params, transform, beta: float, table: ReferenceTable,
                 ns: tuple[int, ...] = c.eval_ns, bon_n: int | None = None) -> dict[str, float]:
        """target_* and exact_kl_to_target are of pi* (transform, beta), or with `bon_n` of
        BoN_n(pi_ref), the target of a Best-of-N distillation run (transform and beta unused)."""
        logp = policy_logprobs(task, params)
        if bon_n is None:
            cal = calibrated(transform, table)
            target = target_logprobs(ref_logp_XxY, cal, transform, beta,
                                     raw_XxY=task.rewards_XxY)
        else:
            target = bon_logprobs(ref_logp_XxY, task.rewards_XxY, bon_n)
        out = {f"exact_{k}": v for k, v in policy_report(task, np.exp(logp), ns).items()}
        out.update({f"target_{k}": v for k, v in policy_report(task, np.exp(target), ns).items()})
        out["exact_kl_to_target"] = kl_from_logprobs(logp, target)
        if bon_n is None:
            out["range_phi_over_beta"] = target_sharpness(cal, transform, beta, task.rewards_XxY)
        return out

    def solve_beta(kl: float, transform, table: ReferenceTable) -> float:
        return beta_for_kl(ref_logp_XxY, calibrated(transform, table), task.rewards_XxY,
                           transform, kl)

    return RLTask(
        name="exact", model_cfg=task.model_cfg, ref_params=task.ref_params, prompt_ids=ids,
        prompts_XxP=task.prompts_XxP, prompt_mask_XxP=np.ones(task.prompts_XxP.shape, bool),
        reward_fn=reward_fn(task), reward_params=jnp.asarray(task.rewards_XxY),
        reward_model_id=f"exact_reward[{tag}]", base_model_id=f"exact_base[{tag}]",
        eos_id=task.eos_id, pad_id=task.pad_id, reference_table=reference_table,
        evaluate=evaluate, response_length=task.length, beta_for_kl=solve_beta,
        converged_kl=CONVERGED_KL)
