"""Unit tests of `rl.rl_step`: purity, what changes and what does not, the reward path, config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax import exact_task as et
from infalign_jax import models, rl
from infalign_jax.transforms import get_transform


def _setup(algorithm="rloo", kl_mode="reward", transform="exp", params=None, m=8):
    task = et.make_task(0, vocab=4, length=3, d_model=32)
    cfg = rl.RLConfig(algorithm=algorithm, beta=0.2, transform=transform,
                      transform_params=params if params is not None else {"t": 2.0},
                      samples_per_prompt=m, max_new_tokens=3, learning_rate=1e-2,
                      kl_mode=kl_mode, ppo_epochs=2)
    opt = rl.make_optimizer(cfg)
    step = rl.make_rl_step(cfg, models.decoder_fns(task.model_cfg),
                           functools.partial(et.table_reward_fn, vocab=task.vocab), opt)
    table = et.sample_reference_table(task, 64, seed=1)
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_PxY), jnp.asarray(table),
                       jnp.full((2,), 64, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(task.prompts_PxS),
             "prompt_mask_BxP": jnp.ones(task.prompts_PxS.shape, bool),
             "prompt_idx_B": jnp.arange(2)}
    # Start away from pi_ref so the KL terms are non-trivial.
    params = jax.tree.map(lambda x: x * 1.1, task.ref_params)
    return step, rl.init_state(params, opt), frozen, batch


@pytest.mark.parametrize("algorithm,kl_mode", [("rloo", "reward"), ("ppo", "reward"),
                                               ("rloo", "loss")])
def test_step_pure_updates_params_not_frozen(algorithm, kl_mode):
    step, state, frozen, batch = _setup(algorithm, kl_mode)
    frozen_before = jax.tree.map(np.array, frozen)
    params_before = jax.tree.map(np.array, state.params)
    jstep = jax.jit(step)
    key = jax.random.key(3)
    s1, m1 = jstep(state, frozen, batch, key)
    s2, m2 = jstep(state, frozen, batch, key)
    for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s1.step) == 1
    changed = [not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(params_before), jax.tree.leaves(s1.params))]
    assert any(changed)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert set(m1) == {"reward", "calibrated_reward", "transformed_reward", "kl_k1", "kl_k3",
                       "loss", "grad_norm", "clip_fraction", "kl_full_vocab", "entropy",
                       "response_length"}
    assert all(np.isfinite(float(v)) for v in m1.values())
    assert float(m1["kl_k3"]) >= 0 and float(m1["grad_norm"]) > 0
    # Without jit the step gives the same numbers (it is a plain pure function).
    s3, m3 = step(state, frozen, batch, key)
    for k in m1:
        np.testing.assert_allclose(float(m3[k]), float(m1[k]), rtol=1e-4, atol=1e-6)


def test_step_metrics_match_independent_rollout_scoring():
    """Re-scores the same rollout by hand (numpy calibration, closed-form transform)."""
    from infalign_jax.sampling import sample
    step, state, frozen, batch = _setup("rloo", "reward", "exp", {"t": 2.0}, m=8)
    key = jax.random.key(7)
    _, metrics = step(state, frozen, batch, key)
    fns = models.decoder_fns(et.make_task(0).model_cfg)
    samples = sample(fns, state.params, batch["prompt_BxP"], batch["prompt_mask_BxP"], key,
                     rl.RLConfig(samples_per_prompt=8, max_new_tokens=3).sampling())
    toks = np.asarray(samples.tokens_BxNxL)
    codes = (toks * np.array([16, 4, 1])).sum(-1)
    rewards = np.asarray(frozen.reward_params)[np.arange(2)[:, None], codes]
    ref = np.asarray(frozen.ref_sorted_PxK)
    cal = np.array([[(np.sum(ref[b] < r) + 0.5 * np.sum(ref[b] == r)) / ref.shape[1]
                     for r in rewards[b]] for b in range(2)])
    phi = np.expm1(2.0 * cal) / 2.0
    assert float(metrics["reward"]) == pytest.approx(rewards.mean(), rel=1e-5)
    assert float(metrics["calibrated_reward"]) == pytest.approx(cal.mean(), rel=1e-5)
    assert float(metrics["transformed_reward"]) == pytest.approx(phi.mean(), rel=1e-5)


def test_score_rollout_hand_made():
    ref_1x4 = jnp.array([[1.0, 2.0, 2.0, 5.0]])
    rewards_1x3 = jnp.array([[2.0, 0.0, 9.0]])
    counts = jnp.array([4])
    cfg = rl.RLConfig()
    cal, phi = rl.score_rollout(cfg, get_transform("identity"), rewards_1x3, ref_1x4, counts)
    np.testing.assert_allclose(np.asarray(cal), [[(1 + 0.5 * 2) / 4, 0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(phi), np.asarray(cal))
    # log asks for the smoothed calibration (#{ref < r} + 1) / (K + 1).
    cal, phi = rl.score_rollout(cfg, get_transform("log"), rewards_1x3, ref_1x4, counts)
    np.testing.assert_allclose(np.asarray(cal), [[2 / 5, 1 / 5, 5 / 5]])
    np.testing.assert_allclose(np.asarray(phi), np.log([[2 / 5, 1 / 5, 1.0]]), rtol=1e-6)
    # Only the first K_b entries of a row count.
    cal, _ = rl.score_rollout(cfg, get_transform("identity"), rewards_1x3, ref_1x4,
                              jnp.array([2]))
    np.testing.assert_allclose(np.asarray(cal), [[(1 + 0.5) / 2, 0.0, 1.0]])


@pytest.mark.parametrize("field,value", [
    ("algorithm", "dpo"), ("beta", 0.0), ("beta", -1.0), ("samples_per_prompt", 0),
    ("samples_per_prompt", 1), ("learning_rate", 0.0), ("ppo_epochs", 0), ("ppo_clip", 0.0),
    ("kl_mode", "k2"), ("transform", "nope"), ("max_new_tokens", 0), ("decay_steps", -1),
])
def test_invalid_config_names_field(field, value):
    with pytest.raises(ValueError, match=f"RLConfig.{field}"):
        rl.RLConfig(**{field: value})


def test_bad_transform_params_name_field():
    with pytest.raises(ValueError, match="RLConfig.transform"):
        rl.RLConfig(transform="exp", transform_params={"t": float("nan")})
