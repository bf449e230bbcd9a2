"""Offline judges against the libraries they wrap, and the jitted pure_callback reward bridge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from profanity_check import predict_prob
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from infalign_jax.rewards import judges

TEXTS = ["What a wonderful, sunny day -- I love it!",
         "This is the worst service I have ever had. Terrible.",
         "The train leaves at nine.",
         "Thanks so much, you really helped me :)",
         "I hate waiting in line, it is awful and annoying."]
POLITE = "Thank you for your patience, I hope you have a lovely evening."
OFFENSIVE = "Shut up, you pathetic idiot, nobody cares about your stupid opinion."


def test_vader_equals_library():
    expected = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in TEXTS]
    scores = judges.get_judge("vader")(["prompt"] * len(TEXTS), TEXTS)
    assert scores.dtype == np.float32 and scores.shape == (len(TEXTS),)
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert scores[0] > 0.5 and scores[1] < -0.5  # the sign is what the helpfulness task rewards


def test_offensiveness_and_harmlessness_equal_library():
    texts = TEXTS + [POLITE, OFFENSIVE]
    expected = predict_prob(texts)
    off = judges.get_judge("offensiveness")([""] * len(texts), texts)
    harm = judges.get_judge("harmlessness")([""] * len(texts), texts)
    np.testing.assert_allclose(off, expected, atol=1e-6)
    np.testing.assert_allclose(harm, 1.0 - expected, atol=1e-6)
    assert off[-1] > 0.9 > 0.1 > off[-2]
    assert harm[-1] < harm[-2]


def test_empty_responses_get_the_documented_score():
    responses = ["", "   \n", POLITE]
    got = {name: judges.get_judge(name)(["p"] * 3, responses) for name in judges.known_judges()}
    np.testing.assert_array_equal(got["vader"][:2], [-1.0, -1.0])
    np.testing.assert_array_equal(got["offensiveness"][:2], [0.0, 0.0])
    # Every judge's minimum: stopping at once is never rewarded (no EOS reward hack).
    np.testing.assert_array_equal(got["harmlessness"][:2], [0.0, 0.0])
    # the non-empty response in the same batch is still scored by the library
    assert got["vader"][2] == pytest.approx(
        SentimentIntensityAnalyzer().polarity_scores(POLITE)["compound"], abs=1e-6)
    assert judges.get_judge("vader")([], []).shape == (0,)


def test_registry_and_bad_input():
    assert judges.known_judges() == ("harmlessness", "offensiveness", "vader")
    for name in judges.known_judges():
        judge = judges.get_judge(name)
        assert judge.name == name == judge.id
    with pytest.raises(ValueError,
                       match="unknown judge 'sentiment'.*harmlessness, offensiveness, vader"):
        judges.get_judge("sentiment")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judges.get_judge("vader")(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"responses\[1\] is int, expected str"):
        judges.get_judge("vader")(["a", "b"], ["c", 3])
    with pytest.raises(ValueError, match="empty_score 2.0 is outside"):
        judges.TextJudge("x", lambda t: np.zeros(len(t)), empty_score=2.0, lo=0.0, hi=1.0)
    broken = judges.TextJudge("broken", lambda t: np.full(len(t), 7.0), empty_score=0.0,
                              lo=0.0, hi=1.0)
    with pytest.raises(ValueError, match="judge 'broken': scores outside"):
        broken(["p"], ["some text"])


# A tiny word-level vocabulary: token i is WORDS[i]; 0 is padding.
WORDS = ["<pad>", "I", "love", "hate", "this", "wonderful", "awful", "day", "idiot", "thanks"]


def _detokenize(ids: np.ndarray) -> str:
    return " ".join(WORDS[int(i)] for i in ids)


def _batch():
    rows = [[1, 2, 4, 5, 7], [1, 3, 4, 6, 7], [9, 0, 0, 0, 0], [4, 8, 0, 0, 0], [0, 0, 0, 0, 0],
            [5, 5, 2, 9, 0]]
    lengths = [5, 5, 1, 2, 0, 4]
    resp_RxL = np.array(rows, np.int32)
    mask_RxL = np.arange(5)[None, :] < np.array(lengths)[:, None]
    idx_R = np.array([0, 1, 2, 0, 1, 2], np.int32)
    texts = [" ".join(WORDS[t] for t in r[:n]) for r, n in zip(rows, lengths)]
    return idx_R, resp_RxL, mask_RxL, texts


@pytest.mark.parametrize("name", ["vader", "harmlessness"])
def test_text_reward_fn_under_jit_equals_direct_call(name):
    judge = judges.get_judge(name)
    prompts = ["first prompt", "second", "third one"]
    idx_R, resp_RxL, mask_RxL, texts = _batch()
    expected = judge([prompts[i] for i in idx_R], texts)
    reward_fn = jax.jit(judges.text_reward_fn(judge, _detokenize, prompts))
    got = reward_fn({"unused": jnp.zeros(())}, jnp.asarray(idx_R), jnp.asarray(resp_RxL),
                    jnp.asarray(mask_RxL))
    assert got.dtype == jnp.float32 and got.shape == (6,)
    np.testing.assert_array_equal(np.asarray(got), expected)


class _PromptLengthJudge:
    """Scores 1000 * len(prompt) + len(response): checks which prompt each row was paired with."""

    name = "prompt-length"

    def __call__(self, prompts, responses):
        return np.array([1000.0 * len(p) + len(r) for p, r in zip(prompts, responses)], np.float32)


def test_text_reward_fn_pairs_rows_with_prompts_and_vmaps():
    prompts = ["a", "bb", "ccc"]
    idx_R, resp_RxL, mask_RxL, texts = _batch()
    expected = np.array([1000.0 * len(prompts[i]) + len(t) for i, t in zip(idx_R, texts)])
    reward_fn = judges.text_reward_fn(_PromptLengthJudge(), _detokenize, prompts)
    got = jax.jit(reward_fn)(None, idx_R, resp_RxL, mask_RxL)
    np.testing.assert_array_equal(np.asarray(got), expected)
    # Under vmap the two copies (second one with prompts rotated) go to the host in one call.
    idx_2xR = np.stack([idx_R, (idx_R + 1) % 3])
    expected_2 = np.array([1000.0 * len(prompts[i]) + len(t) for i, t in zip(idx_2xR[1], texts)])
    got_2xR = jax.jit(jax.vmap(reward_fn, in_axes=(None, 0, None, None)))(
        None, idx_2xR, resp_RxL, mask_RxL)
    np.testing.assert_array_equal(np.asarray(got_2xR), np.stack([expected, expected_2]))


def test_text_reward_fn_bad_input():
    with pytest.raises(ValueError, match="prompts_text must be a non-empty list of str"):
        judges.text_reward_fn(_PromptLengthJudge(), _detokenize, [])
    reward_fn = judges.text_reward_fn(_PromptLengthJudge(), _detokenize, ["a", "b"])
    idx_R, resp_RxL, mask_RxL, _ = _batch()
    with pytest.raises(Exception, match=r"prompt index out of range \[0, 2\): \[2, 2\]"):
        jax.block_until_ready(jax.jit(reward_fn)(None, idx_R, resp_RxL, mask_RxL))
    with pytest.raises(ValueError, match="expected prompt_idx"):
        reward_fn(None, idx_R[:3], resp_RxL, mask_RxL)


@pytest.mark.parametrize("k", [-1.0, float("nan"), float("inf")])
def test_ensemble_judge_refuses_a_penalty_that_is_not_finite_and_non_negative(k):
    """k = -1 rewarded disagreement ([0, 1] and [0, 3] scored [0, 3]); NaN and inf gave NaN."""
    from infalign_jax.rewards.hf_reward import EnsembleJudge

    class Member:
        def __init__(self, name, scores):
            self.name, self.scores = name, scores

        def __call__(self, prompts, responses):
            return np.asarray(self.scores, np.float32)

    members = [Member("a", [0.0, 1.0]), Member("b", [0.0, 3.0])]
    with pytest.raises(ValueError, match="std penalty k must be finite and >= 0"):
        EnsembleJudge(members, k)
    np.testing.assert_allclose(EnsembleJudge(members, 1.0)(["p", "q"], ["x", "y"]), [0.0, 1.0])
