"""Rewards and advantage estimators (infalign_jax/core/advantages.py) against plain-Python loops."""

import functools

import jax
import numpy as np
import pytest

from infalign_jax.core import advantages as A
from infalign_jax.core.losses import last_valid_index

B, T, M = 6, 9, 4
VARIANTS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def _mask(rng, holes=False):
    """Varied-length response spans (one empty row, one full row); optionally with holes."""
    mask = np.zeros((B, T), bool)
    for i in range(B):
        start = rng.integers(0, 3)
        length = 0 if i == 0 else (T - start if i == 1 else rng.integers(1, T - start + 1))
        mask[i, start:start + length] = True
    if holes:
        mask &= rng.random((B, T)) < 0.8
    return mask


def _loop_gae(rewards, values, mask, gamma, lam, last_values):
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        valid = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_v, next_a = float(last_values[b]), 0.0
        for t in reversed(valid):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = values[b, t]
            adv[b, t] = next_a
    return adv


def _loop_reward_to_go(rewards, mask, gamma):
    out = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        valid = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for k, t in enumerate(valid):
            out[b, t] = sum(gamma ** j * rewards[b, s] for j, s in enumerate(valid[k:]))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_shaped_rewards_match_loop(variant, estimator):
    rng = np.random.default_rng(0)
    mask = _mask(rng)
    logp = np.log(rng.uniform(0.1, 1, (B, T))).astype(np.float32)
    ref = np.log(rng.uniform(0.1, 1, (B, T))).astype(np.float32)
    score = rng.normal(size=B).astype(np.float32)
    beta = 0.1
    fn = variant(functools.partial(A.kl_shaped_rewards, beta=beta, estimator=estimator))
    got = np.asarray(fn(score, logp, ref, mask))
    want = np.zeros((B, T))
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        for t in valid:
            d = float(logp[b, t]) - float(ref[b, t])
            want[b, t] = -beta * (d if estimator == "k1" else np.exp(-d) - 1 + d)
        if valid:
            want[b, valid[-1]] += score[b]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if estimator == "k1":
        # Summed shaped reward = score - beta * log pi(y)/pi_ref(y) on rows with a response.
        seq = score - beta * ((logp - ref) * mask).sum(1)
        np.testing.assert_allclose(got.sum(1)[1:], seq[1:], rtol=1e-5, atol=1e-6)
    assert np.all(got[0] == 0)   # empty row: nowhere to put the score
    # beta may be a traced input (an adaptive KL controller changes it inside the jitted step).
    traced = jax.jit(functools.partial(A.kl_shaped_rewards, estimator=estimator))(
        score, logp, ref, mask, np.float32(beta))
    np.testing.assert_allclose(np.asarray(traced), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("gamma, lam, holes", [(1.0, 0.95, False), (0.9, 0.7, True),
                                               (0.99, 0.0, False), (1.0, 1.0, True)])
def test_gae_matches_loop(variant, gamma, lam, holes):
    rng = np.random.default_rng(1)
    mask = _mask(rng, holes)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    last = rng.normal(size=B).astype(np.float32)
    fn = variant(functools.partial(A.gae_advantages, gamma=gamma, lam=lam))
    for last_values in (None, last):
        adv, ret = fn(rewards, values, mask, last_value_B=last_values)
        lv = np.zeros(B) if last_values is None else last
        want = _loop_gae(rewards, values, mask, gamma, lam, lv)
        np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ret), np.where(mask, want + values, 0), rtol=1e-5,
                                   atol=1e-5)


def test_gae_is_reward_to_go_with_lambda_gamma_one_and_zero_values():
    rng = np.random.default_rng(2)
    mask = _mask(rng)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    junk = np.where(mask, rewards, 1e6).astype(np.float32)   # masked rewards must not leak
    adv, _ = A.gae_advantages(junk, np.zeros((B, T), np.float32), mask, 1.0, 1.0)
    # Contiguous spans: reward-to-go is a reversed cumulative sum of the masked rewards.
    masked = np.where(mask, rewards, 0).astype(np.float64)
    want = np.where(mask, np.cumsum(masked[:, ::-1], axis=1)[:, ::-1], 0)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_discounted_returns_match_loop(variant):
    rng = np.random.default_rng(3)
    mask = _mask(rng, holes=True)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    got = variant(functools.partial(A.discounted_returns, gamma=0.9))(rewards, mask)
    np.testing.assert_allclose(np.asarray(got), _loop_reward_to_go(rewards, mask, 0.9),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rloo_and_mean_baseline_match_loop(variant):
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(B, M)).astype(np.float32)
    want = np.array([[scores[b, i] - np.mean([scores[b, j] for j in range(M) if j != i])
                      for i in range(M)] for b in range(B)])
    np.testing.assert_allclose(np.asarray(variant(A.rloo_advantages)(scores)), want, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(variant(A.mean_baseline_advantages)(scores)),
                               scores - scores.mean(1, keepdims=True), rtol=1e-5, atol=1e-6)
    single = rng.normal(size=(B, 1)).astype(np.float32)
    got = np.asarray(variant(A.rloo_advantages)(single))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, single)       # M = 1: zero baseline
    assert np.all(np.asarray(A.mean_baseline_advantages(single)) == 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_whiten_matches_numpy(variant):
    rng = np.random.default_rng(5)
    mask = _mask(rng)
    x = rng.normal(2.0, 3.0, (B, T)).astype(np.float32)
    vals = x[mask].astype(np.float64)
    z = (x - vals.mean()) / np.sqrt(vals.var() + 1e-8)
    np.testing.assert_allclose(np.asarray(variant(A.whiten)(x, mask)), np.where(mask, z, 0),
                               rtol=1e-5, atol=1e-5)
    got = variant(functools.partial(A.whiten, shift_mean=False))(x, mask)
    np.testing.assert_allclose(np.asarray(got), np.where(mask, z + vals.mean(), 0), rtol=1e-5,
                               atol=1e-5)
    w = np.asarray(A.whiten(x, mask))[mask]
    assert abs(w.mean()) < 1e-5 and abs(w.std() - 1) < 1e-4


def test_last_valid_index():
    mask = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], bool)
    idx, has = last_valid_index(mask)
    np.testing.assert_array_equal(np.asarray(idx), [2, 0, 3])
    np.testing.assert_array_equal(np.asarray(has), [True, False, True])


def test_bad_inputs_raise_value_errors():
    x = np.zeros((B, T), np.float32)
    with pytest.raises(ValueError, match="score_B"):
        A.kl_shaped_rewards(np.zeros(B + 1), x, x, x > -1, 0.1)
    with pytest.raises(ValueError, match="beta"):
        A.kl_shaped_rewards(np.zeros(B), x, x, x > -1, -0.1)
    with pytest.raises(ValueError, match="lam"):
        A.gae_advantages(x, x, x > -1, 1.0, 1.5)
    with pytest.raises(ValueError, match="gamma"):
        A.gae_advantages(x, x, x > -1, -0.1, 0.5)
    with pytest.raises(ValueError, match="rewards_BxT vs values_BxT"):
        A.gae_advantages(x, np.zeros((B, T + 1)), x > -1)
    with pytest.raises(ValueError, match="last_value_B"):
        A.gae_advantages(x, x, x > -1, last_value_B=np.zeros(B + 2))
    with pytest.raises(ValueError, match="scores_BxM"):
        A.rloo_advantages(np.zeros(M))
