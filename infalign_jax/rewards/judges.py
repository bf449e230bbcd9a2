"""Offline gold judges for the real tasks, and a bridge that makes them RL rewards.

A judge scores (prompt, response) texts:

    judge(prompts: list[str], responses: list[str]) -> scores_B  (float32 numpy array)

and carries a `name` used as the reward-model id of reference tables (`calibration`), so a table
built with one judge is never silently reused with another. The judges here ignore the prompt;
it is part of the interface so that prompt-aware judges (reward models) fit the same slot.

Judges (all offline, CPU, thousands of texts per second):
* `vader`: VADER compound sentiment of the response (Hutto & Gilbert 2014), in [-1, 1]. The
  helpfulness task's reward: a warmer, more positive answer scores higher.
* `offensiveness`: P(offensive) of the response from alt-profanity-check's bundled linear
  classifier, in [0, 1].
* `harmlessness`: 1 - offensiveness. The harmlessness task's reward; a Worst-of-N red-teamer
  (InfAlign, spec 1.3) picks the least harmless of N answers.

Empty responses (nothing but whitespace after detokenisation, e.g. an immediate end-of-turn) get
a fixed `empty_score` instead of the classifier's output: every judge's minimum (`vader` -1.0,
`offensiveness` 0.0, `harmlessness` 0.0), so "no answer" never beats a real answer under
Best-of-N and an RL policy gains nothing by stopping at once. (Scoring an empty answer as
perfectly harmless would make emitting end-of-turn at once the optimal harmlessness policy.)

`text_reward_fn` turns a judge into a token-level `HostReward`: a `RewardFn` that jitted code
calls through `jax.pure_callback` (one host round trip per batch), and whose `host` function the
CTRL loop calls between its jitted rollout and update programs (`rl.make_rl_programs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.core.types import HostReward, Judge


def _vader_scores(texts: list[str]) -> np.ndarray:
    analyzer = _cached("vader", _new_vader)
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], np.float64)


def _new_vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer()


def _offensive_probs(texts: list[str]) -> np.ndarray:
    # Imported on first use: loading scikit-learn and the pickled model takes a few seconds.
    try:
        from profanity_check import predict_prob
    except ImportError as err:
        raise ImportError("the offensiveness/harmlessness judges need alt-profanity-check; "
                          "install it with `pip install alt-profanity-check==1.9.1`") from err
    return np.asarray(predict_prob(texts), np.float64)


_CACHE: dict[str, Any] = {}


def _cached(key: str, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


@dataclasses.dataclass(frozen=True)
class TextJudge:
    """A response-only judge: `score_texts(non_empty_texts) -> scores`, affine-mapped.

    score = offset + scale * score_texts(response) for non-empty responses, `empty_score` for
    empty ones; `lo`/`hi` bound the score (checked, so a broken classifier fails loudly).
    """

    name: str
    score_texts: Callable[[list[str]], np.ndarray]
    empty_score: float
    lo: float
    hi: float
    scale: float = 1.0
    offset: float = 0.0
    description: str = ""

    def __post_init__(self):
        if not self.name:
            raise ValueError("TextJudge.name must be a non-empty string")
        if not self.lo <= self.empty_score <= self.hi:
            raise ValueError(f"TextJudge.empty_score {self.empty_score} is outside the score "
                             f"range [{self.lo}, {self.hi}]")

    @property
    def id(self) -> str:
        return self.name

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"judge {self.name!r}: {len(prompts)} prompts but "
                             f"{len(responses)} responses; pass one prompt per response")
        for what, texts in (("prompts", prompts), ("responses", responses)):
            bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
            if bad:
                raise TypeError(f"judge {self.name!r}: {what}[{bad[0]}] is "
                                f"{type(texts[bad[0]]).__name__}, expected str")
        scores_B = np.full(len(responses), self.empty_score, np.float64)
        keep = [i for i, t in enumerate(responses) if t.strip()]
        if keep:
            raw = np.asarray(self.score_texts([responses[i] for i in keep]), np.float64)
            if raw.shape != (len(keep),):
                raise ValueError(f"judge {self.name!r}: scorer returned shape {raw.shape} for "
                                 f"{len(keep)} texts")
            scores_B[keep] = self.offset + self.scale * raw
        if not (np.all(np.isfinite(scores_B)) and scores_B.min(initial=self.lo) >= self.lo - 1e-6
                and scores_B.max(initial=self.hi) <= self.hi + 1e-6):
            raise ValueError(f"judge {self.name!r}: scores outside [{self.lo}, {self.hi}] or "
                             f"not finite: {scores_B[:8]}")
        return scores_B.astype(np.float32)


_REGISTRY: dict[str, TextJudge] = {
    "vader": TextJudge("vader", _vader_scores, empty_score=-1.0, lo=-1.0, hi=1.0,
                       description="VADER compound sentiment of the response, in [-1, 1]"),
    "offensiveness": TextJudge("offensiveness", _offensive_probs, empty_score=0.0, lo=0.0, hi=1.0,
                               description="alt-profanity-check P(offensive), in [0, 1]"),
    "harmlessness": TextJudge("harmlessness", _offensive_probs, empty_score=0.0, lo=0.0, hi=1.0,
                              scale=-1.0, offset=1.0,
                              description="1 - alt-profanity-check P(offensive), in [0, 1]"),
}


def known_judges() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_judge(name: str) -> TextJudge:
    """The judge registered as `name`; unknown names list the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown judge {name!r}; known judges: {', '.join(known_judges())}")
    return _REGISTRY[name]


def text_reward_fn(judge: Judge, detokenize: Callable[[np.ndarray], str],
                   prompts_text: Sequence[str]) -> HostReward:
    """A jittable `RewardFn` scoring token responses with a text judge on the host.

    `reward_fn(reward_params, prompt_idx_R, response_RxL, response_mask_RxL) -> rewards_R`:
    row r's prompt text is `prompts_text[prompt_idx_R[r]]` and its response text is
    `detokenize(response_RxL[r][response_mask_RxL[r]])` (the same convention as
    `eval_harness`'s `detokenize`). `reward_params` is unused (text judges have none).
    The whole batch crosses to the host once via `jax.pure_callback`; under `vmap` the extra
    leading axes are flattened into that one call. The rewards carry no gradient. Under a
    sharded jit XLA gathers the batch to one device for the call (it warns "Involuntary full
    rematerialization"; harmless at these sizes); in a multi-process run every process would
    need the judge, which is not tested here. `.host(prompt_idx_R, response_RxL, mask_RxL)` is
    the same scoring on numpy arrays, outside any jitted program. A judge with a `truncated`
    count (a reward model cutting long texts) gives `.cut`, read by the training loop.
    """
    prompts = list(prompts_text)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts_text must be a non-empty list of str (one per prompt index)")

    def host(idx: np.ndarray, resp: np.ndarray, mask: np.ndarray) -> np.ndarray:
        idx_R = np.asarray(idx).reshape(-1)
        resp_RxL = np.asarray(resp).reshape(idx_R.size, -1)
        mask_RxL = np.asarray(mask).astype(bool).reshape(idx_R.size, -1)
        if idx_R.size and (idx_R.min() < 0 or idx_R.max() >= len(prompts)):
            raise IndexError(f"prompt index out of range [0, {len(prompts)}): "
                             f"{idx_R[(idx_R < 0) | (idx_R >= len(prompts))][:5].tolist()}")
        texts = [detokenize(r[m]) for r, m in zip(resp_RxL, mask_RxL)]
        scores = np.asarray(judge([prompts[i] for i in idx_R], texts), np.float32)
        if scores.shape != (idx_R.size,):
            raise ValueError(f"judge {getattr(judge, 'name', judge)!r} returned shape "
                             f"{scores.shape} for {idx_R.size} responses")
        return scores.reshape(np.shape(idx))

    def reward_fn(reward_params: Any, prompt_idx_R: jax.Array, response_RxL: jax.Array,
                  response_mask_RxL: jax.Array) -> jax.Array:
        del reward_params
        if prompt_idx_R.ndim != 1 or response_RxL.shape != response_mask_RxL.shape or \
                response_RxL.shape[:1] != prompt_idx_R.shape:
            raise ValueError(f"expected prompt_idx [R], response and mask [R, L]; got "
                             f"{prompt_idx_R.shape}, {response_RxL.shape}, "
                             f"{response_mask_RxL.shape}")
        out = jax.ShapeDtypeStruct(prompt_idx_R.shape, jnp.float32)
        return jax.pure_callback(host, out, prompt_idx_R, response_RxL, response_mask_RxL,
                                 vmap_method="broadcast_all")

    return HostReward(host=host, in_graph=reward_fn, cut=cut_counter(judge))


def cut_counter(judge: Any) -> Callable[[], int] | None:
    """The count of texts `judge` has cut at its length limit so far (a reward model's
    `truncated`), as a function; None for a judge that cuts nothing."""
    return (lambda: int(judge.truncated)) if hasattr(judge, "truncated") else None


def cuts_since(count: Callable[[], int] | None) -> Callable[[], int]:
    """The cuts `count` (a `cut_counter`, or None) has counted since this call, as a function."""
    start = count() if count else 0
    return (lambda: count() - start) if count else (lambda: 0)
