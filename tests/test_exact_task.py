"""Exact-task checks: exact quantities against brute force, then the CTRL acceptance test.

The acceptance test trains the policy with `rl.rl_step` on the enumerable task and compares its
exact (enumerated) KL and win rates with those of the exact target pi* ∝ pi_ref exp(Phi(C_hat)/beta),
where C_hat is the calibration against the same K = 4096-sample reference table the trainer uses.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.rl.tasks import exact as et
from infalign_jax import models, rl
from infalign_jax.core.transforms import get_transform


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
    # Tied rewards (two responses judged equal) count 1/2, as in the brute force.
    tied = np.stack([rs.randint(0, 2, 5) for _ in range(3)]).astype(float)
    for n, how in ((1, "bon"), (2, "bon"), (2, "won")):
        want = np.mean([_brute_win_rate(p[i], q[i], tied[i], n, how) for i in range(3)])
        assert et.exact_win_rate(p, q, tied, n, how) == pytest.approx(want, abs=1e-12)
    assert et.exact_win_rate(p, q, np.zeros((3, 5))) == pytest.approx(0.5, abs=1e-12)


def test_enumeration_and_exact_reference_probabilities():
    task = et.make_task(0, vocab=3, length=2, num_prompts=2)
    assert task.responses_YxL.shape == (9, 2)
    codes = np.asarray(et.response_codes(jnp.asarray(task.responses_YxL), 3))
    np.testing.assert_array_equal(codes, np.arange(9))
    logp = et.policy_logprobs(task, task.ref_params)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-5)
    # Independent check of one entry: chain rule with full forward passes, token by token.
    x, y = task.prompts_XxP[1], task.responses_YxL[5]
    seq = np.concatenate([x, y])[None]
    logits = models.apply(task.ref_params, jnp.asarray(seq), task.model_cfg).logits[0]
    lp = jax.nn.log_softmax(logits, -1)
    want = sum(float(lp[len(x) - 1 + j, y[j]]) for j in range(len(y)))
    assert logp[1, 5] == pytest.approx(want, abs=1e-4)
    assert all(len(np.unique(row)) == row.size for row in task.rewards_XxY)


def test_eos_task_enumerates_every_sampler_response():
    task = et.make_task(0, vocab=4, length=3, eos=True)
    # 1 + 3 + 9 responses that end with EOS at position 1, 2, 3, and 27 that never emit it.
    assert task.responses_YxL.shape == (40, 3) and task.eos_id == 3
    lengths = task.mask_YxL.sum(1)
    assert sorted(set(lengths.tolist())) == [1, 2, 3]
    assert len({tuple(r[m]) for r, m in zip(task.responses_YxL, task.mask_YxL)}) == 40
    probs = np.exp(et.policy_logprobs(task, task.ref_params))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # What the sampler draws is looked up to the same rows, with the enumerated frequencies.
    from infalign_jax.decoding.sampling import SamplingConfig, sample
    out = sample(models.decoder_fns(task.model_cfg), task.ref_params,
                 jnp.asarray(task.prompts_XxP), jnp.ones(task.prompts_XxP.shape, bool),
                 jax.random.key(0), SamplingConfig(n=4000, max_new_tokens=3, eos_id=3))
    keys = et.response_keys(out.tokens_BxNxL.reshape(-1, 3), out.mask_BxNxL.reshape(-1, 3), 4)
    rows = task.key_to_index[np.asarray(keys)].reshape(2, -1)
    assert (rows >= 0).all()
    for p in range(2):
        freq = np.bincount(rows[p], minlength=40) / rows.shape[1]
        assert np.abs(freq - probs[p]).max() < 0.03
    rewards = et.reward_fn(task)(jnp.asarray(task.rewards_XxY), jnp.repeat(jnp.arange(2), 4000),
                                 out.tokens_BxNxL.reshape(-1, 3), out.mask_BxNxL.reshape(-1, 3))
    np.testing.assert_array_equal(np.asarray(rewards).reshape(2, -1),
                                  np.take_along_axis(task.rewards_XxY, rows, 1))


def test_prompts_are_distinct():
    for seed in range(20):
        prompts = et.make_task(seed, eos=True).prompts_XxP
        assert len({tuple(p) for p in prompts}) == len(prompts)
    with pytest.raises(ValueError, match="distinct prompts"):
        et.make_task(0, vocab=2, num_prompts=5, prompt_len=2)


def test_kl_to_target_is_finite_where_the_target_underflows():
    logq = np.array([[0.0, -2000.0]])          # q = (1, e^-2000): exp underflows
    logq = logq - np.logaddexp.reduce(logq, axis=1, keepdims=True)
    logp = np.log(np.array([[0.9, 0.1]]))
    want = 0.9 * np.log(0.9) + 0.1 * (np.log(0.1) + 2000.0)
    assert et.kl_from_logprobs(logp, logq) == pytest.approx(want, rel=1e-12)


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
SEEDS = (0, 1, 2)
# The acceptance runs: KL budget 0.5, the defaults' schedule (beta warm-up from 10 x beta over
# 2/3 of the run, Adam 3e-3 with cosine decay) at 1500 steps and 64 samples per prompt.
KL_BUDGET = 0.5
SCHEDULE = dict(samples_per_prompt=64, learning_rate=3e-3, decay_steps=1500,
                beta_anneal_steps=1000, beta_anneal_factor=10.0)
STEPS = 1500
VALUE_MODEL = dict(vocab_size=4, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                   d_ff=64, max_len=32)


def train_seeds(transform, params, *, eos=False, seeds=SEEDS, steps=STEPS, **rl_kw):
    """Trains one policy per seed with `rl.rl_step` (the seeds vmapped into one program) on the
    exact task at the beta whose exact target has KL `KL_BUDGET`; returns (target report,
    per-seed reports with the exact KL(pi || pi*) as "kl_to_target")."""
    task = et.make_task(0, eos=eos)
    ref_logp = et.policy_logprobs(task, task.ref_params)
    table = et.sample_reference_table(task, K_REF, seed=1)
    tr = get_transform(transform, **params)
    cal = et.calibrated_table(task, table, tr.smoothing)
    beta = et.beta_for_kl(ref_logp, cal, task.rewards_XxY, tr, KL_BUDGET)
    cfg = rl.RLConfig(beta=beta, transform=transform, transform_params=params,
                      max_new_tokens=task.length, eos_id=task.eos_id, full_kl=False,
                      **{**SCHEDULE, **rl_kw})
    target = et.target_logprobs(ref_logp, cal, tr, beta, task.rewards_XxY)
    opt = rl.make_optimizer(cfg)
    step = rl.make_rl_step(cfg, models.decoder_fns(task.model_cfg), et.reward_fn(task), opt)
    n_p = task.prompts_XxP.shape[0]
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_XxY), jnp.asarray(table),
                       jnp.full((n_p,), K_REF, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(task.prompts_XxP),
             "prompt_mask_BxP": jnp.ones(task.prompts_XxP.shape, bool),
             "prompt_idx_B": jnp.arange(n_p)}
    states = [rl.init_state(task.ref_params, opt, cfg, jax.random.key(100 + s)) for s in seeds]
    state = jax.tree.map(lambda *x: jnp.stack(x), *states)
    vstep = jax.jit(jax.vmap(step, in_axes=(0, None, None, 0)), donate_argnums=0)
    roots = [jax.random.key(s) for s in seeds]
    for i in range(steps):
        state, _ = vstep(state, frozen, batch,
                         jnp.stack([jax.random.fold_in(r, i) for r in roots]))
    reports = []
    for j in range(len(seeds)):
        logp = et.policy_logprobs(task, jax.tree.map(lambda x: x[j], state.params))
        rep = et.policy_report(task, np.exp(logp))
        rep["kl_to_target"] = et.kl_from_logprobs(logp, target)
        reports.append(rep)
    return et.policy_report(task, np.exp(target)), reports


@pytest.mark.slow
@pytest.mark.long_run
@pytest.mark.parametrize("name,params,eos,rl_kw", [
    pytest.param("exp", {"t": -5.0}, False, {}, id="rloo-exp-t-5"),
    pytest.param("exp", {"t": 5.0}, False, {}, id="rloo-exp-t5"),
    pytest.param("log", {}, False, {}, id="rloo-log"),
    pytest.param("identity", {}, True, {"kl_mode": "loss"}, id="rloo-eos-kl-in-loss"),
    pytest.param("identity", {}, True, {"algorithm": "ppo", "ppo_epochs": 2}, id="ppo-eos"),
    # The critic path learns more slowly (the critic must converge too): 2000 steps, 1 epoch.
    pytest.param("identity", {}, True,
                 {"algorithm": "ppo", "ppo_epochs": 1, "advantage": "gae", "steps": 2000,
                  "decay_steps": 2000, "value_model": VALUE_MODEL, "kl_mode": "loss"},
                 id="ppo-gae-eos-kl-in-loss"),
])
def test_ctrl_converges_to_the_exact_target_for_every_seed(name, params, eos, rl_kw):
    """KL(pi || pi*) <= et.CONVERGED_KL for each of 3 seeds, and the exact KL / win rates match."""
    want, runs = train_seeds(name, params, eos=eos, **rl_kw)
    print(name, params, rl_kw, "target", want, "trained", runs)
    assert want["kl"] == pytest.approx(KL_BUDGET, rel=1e-6)
    for got in runs:
        assert got["kl_to_target"] <= et.CONVERGED_KL, got
        assert got["kl"] == pytest.approx(want["kl"], rel=0.05)
        for key in ("bon1", "bon4", "won4"):
            assert got[key] == pytest.approx(want[key], abs=0.01), key
