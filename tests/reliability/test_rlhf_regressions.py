"""Classic RLHF bugs, checked end to end on the transformer (not a toy table).

Already covered elsewhere, exactly, and not repeated here: per-token k1/k3 of identical
log-probs = 0 (tests/test_losses.py::test_k3_nonnegative_and_zero_for_identical_policies,
tests/test_evaluation.py::test_identical_policies_give_zero_kl); sampler log-probs = teacher
forcing and masks stopping at EOS on a tabular policy
(tests/test_sampling.py::test_logp_equals_teacher_forced_and_masks_stop_at_eos).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.core import advantages, kl
from infalign_jax import models, rl
from infalign_jax.decoding import sampling
from infalign_jax.rewards.reward_models import reward_fn_from_model
from infalign_jax.decoding.sampling import SamplingConfig
from random_params import randomise

V, EOS, PAD = 12, 11, 0
POLICY = models.ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=8, d_ff=64, max_len=32, init_std=0.3)
REWARD = models.ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                            head_dim=8, d_ff=32, max_len=32, heads=("reward",), init_std=0.3)
# Left-padded prompts of different lengths.
PROMPT_BxP = jnp.array([[0, 0, 3, 5], [2, 7, 1, 4], [0, 0, 0, 9]], jnp.int32)
PMASK_BxP = PROMPT_BxP != 0


@pytest.fixture(scope="module")
def policy_params():
    return models.init_params(POLICY, jax.random.key(1))


@pytest.fixture(scope="module")
def samples(policy_params):
    cfg = SamplingConfig(n=16, max_new_tokens=8, eos_id=EOS, pad_id=PAD)
    return sampling.sample(models.decoder_fns(POLICY), policy_params, PROMPT_BxP, PMASK_BxP,
                           jax.random.key(2), cfg)


def test_masks_stop_at_eos_and_sampler_logp_equals_teacher_forcing(policy_params, samples):
    tok, mask, logp = (np.asarray(x) for x in samples)
    rows_t, rows_m = tok.reshape(-1, 8), mask.reshape(-1, 8)
    assert (rows_m.sum(1) < 8).any() and (rows_m.sum(1) == 8).any()  # both cases occur
    for row_t, row_m in zip(rows_t, rows_m):
        n = int(row_m.sum())
        assert row_m[:n].all() and not row_m[n:].any()
        assert (row_t[n:] == PAD).all()
        assert EOS not in row_t[:n - 1].tolist()
        if n < 8:
            assert row_t[n - 1] == EOS
    p, pm, r, rm = sampling.flatten_samples(PROMPT_BxP, PMASK_BxP, samples)
    tf = np.asarray(sampling.sequence_logprobs(models.decoder_fns(POLICY), policy_params,
                                               p, pm, r, rm))
    # float32 in two summation orders: 1.04e-5 at -1.63 on an AVX-512 Xeon at XLA's
    # optimisation level 0 (CI's), so relative 1e-5 as well
    np.testing.assert_allclose(tf, logp.reshape(-1, 8), atol=1e-5, rtol=1e-5)
    assert (logp[~mask] == 0).all() and (tf[~rows_m] == 0).all()


def test_reward_is_read_at_eos_never_on_padding(samples):
    params = randomise(models.init_params(REWARD, jax.random.key(3)), seed=3)
    p, pm, r, rm = sampling.flatten_samples(PROMPT_BxP, PMASK_BxP, samples)
    idx_R = jnp.repeat(jnp.arange(3), 16)
    reward_fn = jax.jit(reward_fn_from_model(REWARD, PROMPT_BxP, PMASK_BxP))
    got = np.asarray(reward_fn(params, idx_R, r, rm))
    assert np.std(got) > 1e-2   # a zero reward head would make every check below 0 == 0
    # Independent: score each row on its unpadded tokens alone (prompt real tokens + response
    # up to and including EOS), where the last token is the one the reward must be read at.
    lengths = np.asarray(rm).sum(1)
    # Every distinct response length once (eager forwards are slow): early EOS, late, none.
    rows = [int(np.flatnonzero(lengths == n)[0]) for n in np.unique(lengths)]
    assert len(rows) >= 3
    for i in rows:
        n = int(np.asarray(rm[i]).sum())
        seq = np.concatenate([np.asarray(p[i])[np.asarray(pm[i])], np.asarray(r[i])[:n]])
        want = models.apply(params, jnp.asarray(seq)[None], REWARD).reward[0]
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=1e-5)
    # Garbage after EOS (where the mask is 0) must not change the reward.
    junk = jnp.where(rm, r, 7)
    np.testing.assert_array_equal(np.asarray(reward_fn(params, idx_R, junk, rm)), got)


def test_kl_of_policy_against_itself_is_zero_in_the_rl_step(policy_params):
    cfg = rl.RLConfig(beta=0.1, samples_per_prompt=8, max_new_tokens=6, eos_id=EOS, pad_id=PAD,
                      full_kl=True)
    optimizer = rl.make_optimizer(cfg)
    reward_params = models.init_params(REWARD, jax.random.key(4))
    step = jax.jit(rl.make_rl_step(cfg, models.decoder_fns(POLICY),
                                   reward_fn_from_model(REWARD, PROMPT_BxP, PMASK_BxP), optimizer))
    frozen = rl.Frozen(policy_params, reward_params, jnp.sort(jax.random.normal(
        jax.random.key(5), (3, 16)), axis=1), jnp.full((3,), 16, jnp.int32))
    state = rl.init_state(policy_params, optimizer)
    batch = {"prompt_BxP": PROMPT_BxP, "prompt_mask_BxP": PMASK_BxP,
             "prompt_idx_B": jnp.arange(3, dtype=jnp.int32)}
    _, m = step(state, frozen, batch, jax.random.key(6))
    assert float(m["kl_full_vocab"]) == 0.0
    # k1/k3 compare the sampler's (KV-cache) log-probs with teacher-forced ones: equal up to
    # float32 rounding of two different computation orders.
    assert abs(float(m["kl_k1"])) < 1e-5
    assert 0.0 <= float(m["kl_k3"]) < 1e-10


def test_k3_is_never_negative_in_float32():
    # Differences from 0 to large, both signs, including the smallest float32 steps where
    # expm1(-d) + d cancels.
    tiny = np.float32(np.finfo(np.float32).tiny)
    d = np.concatenate([np.linspace(-30, 30, 20001), np.geomspace(1e-12, 1, 4001),
                        -np.geomspace(1e-12, 1, 4001), [tiny, -tiny, 0.0]]).astype(np.float32)
    ref = np.zeros_like(d)
    k3 = np.asarray(kl.kl_k3(jnp.asarray(d)[None], jnp.asarray(ref)[None]))
    assert (k3 >= 0).all(), d[np.argmin(k3)]
    # and it matches the float64 value r - 1 - log r, r = exp(-d)
    r = np.exp(-d.astype(np.float64))
    np.testing.assert_allclose(k3[0], r - 1 + d.astype(np.float64), rtol=1e-5, atol=1e-7)
    # (near d = 0 the float32 cancellation in expm1(-d) + d costs up to ~1.2e-8 absolute)


def test_single_sample_per_prompt_advantages():
    scores_Bx1 = jnp.array([[0.3], [-2.0], [5.0]])
    a_rloo = np.asarray(advantages.rloo_advantages(scores_Bx1))
    np.testing.assert_array_equal(a_rloo, np.asarray(scores_Bx1))   # baseline 0: plain REINFORCE
    np.testing.assert_array_equal(np.asarray(advantages.mean_baseline_advantages(scores_Bx1)),
                                  np.zeros((3, 1)))
    w = np.asarray(advantages.whiten(jnp.array([[4.0]])))
    assert np.isfinite(w).all() and w[0, 0] == 0.0
    rewards_1xT, mask_1xT = jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[True, True, True]])
    adv, ret = advantages.gae_advantages(rewards_1xT, jnp.zeros((1, 3)), mask_1xT, 1.0, 0.95)
    # lambda-returns with zero values: (gamma lambda)^(T-1-t) for a final reward of 1
    np.testing.assert_allclose(np.asarray(ret), [[0.95 ** 2, 0.95, 1.0]], rtol=1e-6)
    assert np.isfinite(np.asarray(adv)).all()
    # The RLOO algorithm needs a leave-one-out baseline: M = 1 is refused, naming the field.
    with pytest.raises(ValueError, match=r"RLConfig.samples_per_prompt must be >= 2 for RLOO"):
        rl.RLConfig(algorithm="rloo", samples_per_prompt=1)


def test_ppo_step_with_one_sample_per_prompt_is_finite(policy_params):
    cfg = rl.RLConfig(algorithm="ppo", beta=0.1, samples_per_prompt=1, max_new_tokens=4,
                      eos_id=EOS, pad_id=PAD, ppo_epochs=2)
    optimizer = rl.make_optimizer(cfg)
    step = jax.jit(rl.make_rl_step(cfg, models.decoder_fns(POLICY),
                                   reward_fn_from_model(REWARD, PROMPT_BxP, PMASK_BxP), optimizer))
    frozen = rl.Frozen(policy_params, models.init_params(REWARD, jax.random.key(4)),
                       jnp.sort(jax.random.normal(jax.random.key(5), (3, 16)), axis=1),
                       jnp.full((3,), 16, jnp.int32))
    batch = {"prompt_BxP": PROMPT_BxP, "prompt_mask_BxP": PMASK_BxP,
             "prompt_idx_B": jnp.arange(3, dtype=jnp.int32)}
    new, m = step(rl.init_state(policy_params, optimizer), frozen, batch, jax.random.key(6))
    assert all(np.isfinite(float(v)) for v in m.values()), m
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new.params))
