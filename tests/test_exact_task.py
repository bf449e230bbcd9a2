"""Exact-task checks: exact quantities against brute force, then the CTRL acceptance test.

The acceptance test trains the policy with `rl.rl_step` on the enumerable task and compares its
exact (enumerated) KL and win rates with those of the exact target pi* ∝ pi_ref exp(Phi(C_hat)/beta),
where C_hat is the calibration against the same K = 4096-sample reference table the trainer uses.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax import exact_task as et
from infalign_jax import models, rl
from infalign_jax.transforms import get_transform


def _brute_win_rate(p, q, r, n, how):
    """Enumerates every n-tuple from pi and from pi_ref; ties (same response) count 1/2."""
    ys = range(len(p))
    pick = max if how == "bon" else min
    total = 0.0
    for a in itertools.product(ys, repeat=n):
        pa = np.prod([p[i] for i in a])
        ya = pick(a, key=lambda i: r[i])
        for b in itertools.product(ys, repeat=n):
            pb = np.prod([q[i] for i in b])
            yb = pick(b, key=lambda i: r[i])
            total += pa * pb * (1.0 if r[ya] > r[yb] else 0.5 if r[ya] == r[yb] else 0.0)
    return total


@pytest.mark.parametrize("n,how", [(1, "bon"), (2, "bon"), (3, "bon"), (2, "won"), (3, "won")])
def test_win_rates_match_brute_force(n, how):
    rs = np.random.RandomState(n)
    p = rs.dirichlet(np.ones(4), size=2)
    q = rs.dirichlet(np.ones(4), size=2)
    r = np.stack([rs.permutation(4), rs.permutation(4)]).astype(float)
    want = np.mean([_brute_win_rate(p[i], q[i], r[i], n, how) for i in range(2)])
    assert et.exact_win_rate(p, q, r, n, how) == pytest.approx(want, abs=1e-12)


def test_win_rate_properties_and_kl():
    rs = np.random.RandomState(0)
    q = rs.dirichlet(np.ones(5), size=3)
    r = np.stack([rs.permutation(5) for _ in range(3)]).astype(float)
    for n in (1, 2, 4):
        assert et.exact_win_rate(q, q, r, n) == pytest.approx(0.5, abs=1e-12)
    assert et.exact_kl(q, q) == pytest.approx(0.0, abs=1e-12)
    p = rs.dirichlet(np.ones(5), size=3)
    want = np.mean([sum(p[i, j] * np.log(p[i, j] / q[i, j]) for j in range(5)) for i in range(3)])
    assert et.exact_kl(p, q) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="distinct"):
        et.exact_win_rate(p, q, np.zeros((3, 5)))


def test_enumeration_and_exact_reference_probabilities():
    task = et.make_task(0, vocab=3, length=2, num_prompts=2)
    assert task.responses_YxL.shape == (9, 2)
    codes = np.asarray(et.response_codes(jnp.asarray(task.responses_YxL), 3))
    np.testing.assert_array_equal(codes, np.arange(9))
    logp = et.policy_logprobs(task, task.ref_params)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-5)
    # Independent check of one entry: chain rule with full forward passes, token by token.
    x, y = task.prompts_PxS[1], task.responses_YxL[5]
    seq = np.concatenate([x, y])[None]
    logits = models.apply(task.ref_params, jnp.asarray(seq), task.model_cfg).logits[0]
    lp = jax.nn.log_softmax(logits, -1)
    want = sum(float(lp[len(x) - 1 + j, y[j]]) for j in range(len(y)))
    assert logp[1, 5] == pytest.approx(want, abs=1e-4)
    assert all(len(np.unique(row)) == row.size for row in task.rewards_PxY)


def test_target_policy_closed_form_log_transform():
    """With the population calibration of a continuous-like reward, log / beta = 1/(N-1) is BoN_N."""
    q = np.full((1, 400), 1 / 400)
    r = np.arange(400.0)[None]
    cal = (np.arange(400) + 1.0)[None] / 401  # smoothed calibration of the uniform reference
    tgt = et.target_policy(np.log(q), cal, get_transform("log"), beta=1 / 3)
    # g = (a+1) u^a with a = 3: standard win rate (a+1)/(a+2), KL = log(a+1) - a/(a+1) (spec 0).
    assert et.exact_win_rate(tgt, q, r) == pytest.approx(4 / 5, abs=3e-3)
    assert et.exact_kl(tgt, q) == pytest.approx(np.log(4) - 3 / 4, abs=1e-2)
    assert et.exact_win_rate(tgt, q, r, 4) == pytest.approx(4 / 5, abs=3e-3)


K_REF = 4096


def _train(name, params, beta, algorithm, lr, steps, m=256, **kw):
    task = et.make_task(0)
    ref = np.exp(et.policy_logprobs(task, task.ref_params))
    table = et.sample_reference_table(task, K_REF, seed=1)
    cfg = rl.RLConfig(algorithm=algorithm, beta=beta, transform=name, transform_params=params,
                      samples_per_prompt=m, max_new_tokens=task.length, learning_rate=lr,
                      decay_steps=steps, **kw)
    transform = cfg.get_transform()
    target = et.target_policy(np.log(ref), et.calibrated_table(task, table, transform.smoothed),
                              transform, beta)
    opt = rl.make_optimizer(cfg)
    step = jax.jit(rl.make_rl_step(cfg, models.decoder_fns(task.model_cfg),
                                   functools.partial(et.table_reward_fn, vocab=task.vocab), opt))
    n_p = task.prompts_PxS.shape[0]
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_PxY), jnp.asarray(table),
                       jnp.full((n_p,), K_REF, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(task.prompts_PxS),
             "prompt_mask_BxP": jnp.ones(task.prompts_PxS.shape, bool),
             "prompt_idx_B": jnp.arange(n_p)}
    state = rl.init_state(task.ref_params, opt)
    rng = jax.random.key(0)
    for _ in range(steps):
        rng, key = jax.random.split(rng)
        state, _ = step(state, frozen, batch, key)
    return et.policy_report(task, target), et.trained_report(task, state.params)


@pytest.mark.slow
@pytest.mark.parametrize("name,params,beta,algorithm,lr,steps", [
    ("identity", {}, 0.15, "rloo", 3e-3, 400),
    ("log", {}, 1 / 3, "rloo", 3e-3, 400),
    ("exp", {"t": 3.0}, 1.5, "rloo", 3e-3, 400),
    ("identity", {}, 0.15, "ppo", 3e-3, 200),
    ("log", {}, 1 / 3, "ppo", 3e-3, 300),
    ("exp", {"t": 3.0}, 1.5, "ppo", 3e-3, 200),
])
def test_ctrl_reaches_exact_target(name, params, beta, algorithm, lr, steps):
    want, got = _train(name, params, beta, algorithm, lr, steps)
    print(name, algorithm, "target", want, "trained", got)
    assert 0.3 <= want["kl"] <= 1.2, want  # a moderate KL budget, as intended
    assert got["bon1"] == pytest.approx(want["bon1"], abs=0.01)
    assert got["kl"] == pytest.approx(want["kl"], rel=0.10)
    if name == "exp":
        for n in (2, 4):
            assert got[f"bon{n}"] == pytest.approx(want[f"bon{n}"], abs=0.01)
