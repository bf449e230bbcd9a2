"""vBoN config and the BoNBoN step: config checks, the data path, and the exact-task target BoN_N."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.rl import bon_distillation as bd
from infalign_jax.rl.tasks import exact as et
from infalign_jax import models, rl
from infalign_jax.core.preference_losses import harmonic_number
from infalign_jax.loops.train import guard_nonfinite
from infalign_jax.analysis import evaluation

from guard_checks import run_both_guarded


def test_vbon_config_is_log_transform_with_beta_one_over_n_minus_one():
    for n in (2, 4, 8):
        cfg = bd.vbon_rl_config(n, samples_per_prompt=4, learning_rate=1e-3)
        assert cfg.beta == pytest.approx(1.0 / (n - 1))
        assert cfg.transform == "log" and cfg.get_transform().smoothing == "add_one"
        assert cfg.samples_per_prompt == 4 and cfg.learning_rate == 1e-3
    # log of the smoothed calibration (#{ref < r} + 1)/(K + 1): vBoN's F estimate.
    cfg = bd.vbon_rl_config(4)
    _, phi = rl.score_rollout(cfg, cfg.get_transform(), jnp.array([[2.5]]),
                              jnp.array([[1.0, 2.0, 3.0]]), jnp.array([3]))
    assert float(phi[0, 0]) == pytest.approx(np.log(3 / 4), rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        bd.vbon_rl_config(4, beta=0.1)
    with pytest.raises(ValueError, match="transform"):
        bd.vbon_rl_config(4, transform="identity")
    with pytest.raises(ValueError, match="n must be"):
        bd.vbon_rl_config(1)


@pytest.mark.parametrize("field,value", [
    ("n", 1), ("alpha", 1.5), ("variant", "kto"), ("beta", -1.0), ("data", "cached"),
    ("learning_rate", 0.0), ("monitor_samples", -1), ("max_new_tokens", 0),
    ("grad_accum_steps", 0), ("pairs_per_prompt", 0),
])
def test_bonbon_config_names_field(field, value):
    with pytest.raises(ValueError, match=f"BoNBoNConfig.{field}"):
        bd.BoNBoNConfig(**{field: value})


def test_several_pairs_per_prompt_are_the_prompt_repeated_and_need_online_data():
    """`pairs_per_prompt=G` trains on G independent (best, worst) pairs of each prompt, each from
    its own n draws: the step equals the one-pair step on the batch with every prompt repeated G
    times (same key: the same draws), and its monitor samples the batch's own prompts."""
    g = 3
    _, cfg, fns, _, state, frozen, batch = _setup(reps=1, pairs_per_prompt=g, monitor_samples=0)
    _, cfg1, _, step1, _, _, _ = _setup(reps=1, monitor_samples=0)
    reward = functools.partial(et.table_reward_fn, vocab=4)
    step = bd.make_bonbon_step(cfg, fns, reward, rl.make_optimizer(cfg))
    repeated = {k: jnp.repeat(v, g, 0) for k, v in batch.items()}
    key = jax.random.key(7)
    a, ma = jax.jit(step)(state, frozen, batch, key)
    b, mb = jax.jit(step1)(state, frozen, repeated, key)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    # the G pairs of a prompt are drawn apart, not copied
    data = bd.sample_reference_responses(cfg1, fns, frozen.ref_params, repeated["prompt_BxP"],
                                         repeated["prompt_mask_BxP"], jax.random.split(key)[0])
    codes = np.asarray(et.response_codes(data.tokens_BxNxL, 4)).reshape(2, g, -1)
    assert all(len({tuple(c) for c in codes[p]}) > 1 for p in range(2))
    # with the monitor on, it samples the 2 prompts of the batch, not their 6 copies
    _, cfgm, *_ = _setup(reps=1, pairs_per_prompt=g, monitor_samples=4)
    seen = []
    monitor = bd._monitor

    def spy(cfg_, fns_, reward_fn, params, frozen_, prompt_BxP, *rest):
        seen.append(prompt_BxP.shape[0])
        return monitor(cfg_, fns_, reward_fn, params, frozen_, prompt_BxP, *rest)

    import unittest.mock
    with unittest.mock.patch.object(bd, "_monitor", spy):
        bd.make_bonbon_step(cfgm, fns, reward, rl.make_optimizer(cfgm))(state, frozen, batch, key)
    assert seen == [2]
    with pytest.raises(ValueError, match="pairs_per_prompt=2 .* needs data='online'"):
        bd.BoNBoNConfig(pairs_per_prompt=2, data="offline")


def test_bonbon_default_beta_is_beta_star():
    assert bd.BoNBoNConfig(n=8).pref_beta == pytest.approx(0.0275482094, rel=1e-8)
    assert bd.BoNBoNConfig(n=4).pref_beta == pytest.approx(1 / (2 * 3 * (1 + 1 / 2 + 1 / 3)))
    assert bd.BoNBoNConfig(n=4, beta=0.3).pref_beta == 0.3


def _setup(reps=2, **kw):
    task = et.make_task(0)
    table = et.sample_reference_table(task, 256, seed=1)
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_XxY), jnp.asarray(table),
                       jnp.full((2,), 256, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(np.tile(task.prompts_XxP, (reps, 1))),
             "prompt_mask_BxP": jnp.ones((2 * reps, 2), bool),
             "prompt_idx_B": jnp.tile(jnp.arange(2), reps)}
    cfg = bd.BoNBoNConfig(**{**dict(n=4, max_new_tokens=3, learning_rate=3e-3), **kw})
    opt = rl.make_optimizer(cfg)
    fns = models.decoder_fns(task.model_cfg)
    step = bd.make_bonbon_step(cfg, fns, functools.partial(et.table_reward_fn, vocab=4), opt)
    return task, cfg, fns, step, rl.init_state(task.ref_params, opt), frozen, batch


def test_bonbon_prompts_whose_rewards_all_tie_have_no_preference_pair():
    """All n rewards equal: best and worst are one response, h = 0 by construction. Such a prompt
    carries no preference; it must not enter L_pref (it used to add 1/(2 beta)^2 to `pref` and
    dilute its gradient), while its best response still enters the NLL."""
    task, cfg, fns, _, state, frozen, batch = _setup(variant="ipo", alpha=0.3)
    opt = rl.make_optimizer(cfg)

    def flat(params, idx_B, resp_BxL, mask_BxL):      # every response scores the same
        return jnp.zeros(resp_BxL.shape[:1], jnp.float32)

    step = bd.make_bonbon_step(cfg, fns, flat, opt)
    key = jax.random.key(3)
    _, met = jax.jit(step)(state, frozen, batch, key)
    data = bd.sample_reference_responses(cfg, fns, task.ref_params, batch["prompt_BxP"],
                                         batch["prompt_mask_BxP"], jax.random.split(key)[0])
    codes = np.asarray(et.response_codes(data.tokens_BxNxL, 4))
    idx = np.asarray(batch["prompt_idx_B"])
    nll = -np.mean(et.policy_logprobs(task, task.ref_params)[idx, codes[:, 0]])  # first index
    assert float(met["tied"]) == 1.0 and float(met["pref"]) == 0.0
    assert float(met["loss"]) == pytest.approx(0.3 * nll, rel=1e-4)


@pytest.mark.parametrize("nan_rows", ["a whole prompt", "one draw"])
def test_a_nan_reward_among_the_draws_makes_the_guarded_bonbon_step_skip(nan_rows):
    """The selection passes over NaN rewards, so without a trace in the metrics a prompt whose
    draws are all NaN trained on an empty "tied" pair and a NaN draw left a best-of-(n-1) pick,
    with the step reported as taken. The draws' reward metrics now carry the NaN, so the guard
    keeps the old state, as for a CTRL step with a NaN reward."""
    task, cfg, fns, _, state, frozen, batch = _setup(variant="ipo", alpha=0.3, monitor_samples=0)
    opt = rl.make_optimizer(cfg)

    def reward(bad):
        def fn(params, idx_B, resp_BxL, mask_BxL):
            r = et.table_reward_fn(params, idx_B, resp_BxL, mask_BxL, vocab=4)
            return jnp.where(bad(jnp.arange(r.shape[0])), jnp.nan, r)
        return fn

    bad = (lambda i: i < cfg.n) if nan_rows == "a whole prompt" else (lambda i: i == 5)
    guarded = lambda fn: jax.jit(guard_nonfinite(bd.make_bonbon_step(cfg, fns, fn, opt)))
    key = jax.random.key(3)
    kept, met = guarded(reward(bad))(state, frozen, batch, key)
    assert int(met["skipped"]) == 1
    assert np.isnan(float(met["best_reward"])) and np.isnan(float(met["worst_reward"]))
    for a, b in zip(jax.tree.leaves(kept.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same step with finite rewards is taken.
    moved, met = guarded(reward(lambda i: i < 0))(state, frozen, batch, key)
    assert int(met["skipped"]) == 0 and np.isfinite(float(met["best_reward"]))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(moved.params), jax.tree.leaves(state.params)))


def test_bonbon_step_loss_matches_hand_computation_and_offline_data_path():
    task, cfg, fns, step, state, frozen, batch = _setup(variant="ipo", alpha=0.3)
    key = jax.random.key(3)
    new_state, met = jax.jit(step)(state, frozen, batch, key)
    assert int(new_state.step) == 1
    # Recompute from the same pi_ref draws by hand: exact log-probs from the enumeration.
    data = bd.sample_reference_responses(cfg, fns, task.ref_params, batch["prompt_BxP"],
                                         batch["prompt_mask_BxP"], jax.random.split(key)[0])
    codes = np.asarray(et.response_codes(data.tokens_BxNxL, 4))            # B x N
    idx = np.asarray(batch["prompt_idx_B"])
    r = task.rewards_XxY[idx[:, None], codes]
    best = codes[np.arange(4), r.argmax(1)]
    logp = et.policy_logprobs(task, task.ref_params)                         # pi = pi_ref here
    nll = -np.mean(logp[idx, best])
    tau = 1 / (2 * cfg.pref_beta)                                            # h = 0 at pi = pi_ref
    want = 0.3 * nll + 0.7 * tau ** 2
    assert float(met["loss"]) == pytest.approx(want, rel=1e-4)
    assert float(met["nll"]) == pytest.approx(nll, rel=1e-4)
    assert float(met["best_reward"]) == pytest.approx(r.max(1).mean(), rel=1e-6)
    assert float(met["worst_reward"]) == pytest.approx(r.min(1).mean(), rel=1e-6)
    # the preference margin h (best's log-ratio minus worst's) is 0 when pi = pi_ref
    assert float(met["h_mean"]) == pytest.approx(0.0, abs=1e-5)
    assert float(met["tied"]) == pytest.approx(np.mean(r.max(1) == r.min(1)))
    for k in ("reward", "calibrated_reward", "kl_k1", "kl_k3", "kl_full_vocab", "entropy",
              "response_length", "grad_norm", "beta", "h_mean", "accuracy", "pref"):
        assert np.isfinite(float(met[k])), k
    # The offline path on the same responses gives the same update.
    *_, off_step, _, _, _ = _setup(variant="ipo", alpha=0.3, data="offline")
    off_batch = dict(batch, response_BxNxL=data.tokens_BxNxL, response_mask_BxNxL=data.mask_BxNxL)
    off_state, off_met = jax.jit(off_step)(state, frozen, off_batch, key)
    assert float(off_met["loss"]) == pytest.approx(float(met["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(off_state.params), jax.tree.leaves(new_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bonbon_monitor_metrics_are_the_policys_samples_scored_by_hand():
    """The monitor's reward, calibrated reward and sequence KL estimates of a policy away from
    pi_ref, recomputed in numpy from its samples (the step's second key): k1 = sum_t d_t and
    k3 = sum_t (e^-d_t - 1 + d_t), d_t = log pi(y_t) - log pi_ref(y_t) exact per token from the
    enumeration's prefix marginals."""
    from infalign_jax.decoding.sampling import sample
    task, cfg, fns, step, state, frozen, batch = _setup(full_kl=False)
    params = jax.tree.map(lambda x: x * 1.3, task.ref_params)
    key = jax.random.key(3)
    _, met = jax.jit(step)(rl.init_state(params, rl.make_optimizer(cfg)), frozen, batch, key)
    m = cfg.monitor_samples
    s = sample(fns, params, batch["prompt_BxP"], batch["prompt_mask_BxP"],
               jax.random.split(key)[1], cfg.sampling(m))
    toks, idx = np.asarray(s.tokens_BxNxL), np.asarray(batch["prompt_idx_B"])

    def token_logp(p):   # B x m x 3
        probs = np.exp(et.policy_logprobs(task, p)).reshape(2, 4, 4, 4)[idx]
        p1, p2 = probs.sum((2, 3)), probs.sum(3)
        rows = np.arange(len(idx))[:, None]
        a, c, e = toks[..., 0], toks[..., 1], toks[..., 2]
        return np.log(np.stack([p1[rows, a], p2[rows, a, c] / p1[rows, a],
                                probs[rows, a, c, e] / p2[rows, a, c]], -1))

    d = token_logp(params) - token_logp(task.ref_params)
    assert float(met["kl_k1"]) == pytest.approx(d.sum(-1).mean(), rel=1e-4)
    assert float(met["kl_k3"]) == pytest.approx((np.expm1(-d) + d).sum(-1).mean(), rel=1e-4)
    assert d.sum(-1).mean() > 0.05
    r = task.rewards_XxY[idx[:, None], (toks * np.array([16, 4, 1])).sum(-1)]
    ref = np.asarray(frozen.ref_sorted_XxK)[idx]
    cal = (np.sum(ref[:, None, :] < r[..., None], -1)
           + 0.5 * np.sum(ref[:, None, :] == r[..., None], -1)) / ref.shape[1]
    assert float(met["reward"]) == pytest.approx(r.mean(), rel=1e-5)
    assert float(met["calibrated_reward"]) == pytest.approx(cal.mean(), rel=1e-5)


def test_without_monitor_samples_response_length_is_the_best_responses():
    """monitor_samples=0 keeps one response_length: of the trained-on best of the n pi_ref
    draws (EOS task: lengths differ), by hand from the draws and the task's reward table."""
    task = et.make_task(0, eos=True)
    table = et.sample_reference_table(task, 64, seed=1)
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_XxY), jnp.asarray(table),
                       jnp.full((2,), 64, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(np.tile(task.prompts_XxP, (4, 1))),
             "prompt_mask_BxP": jnp.ones((8, 2), bool), "prompt_idx_B": jnp.tile(jnp.arange(2), 4)}
    cfg = bd.BoNBoNConfig(n=4, max_new_tokens=3, eos_id=task.eos_id, monitor_samples=0)
    fns = models.decoder_fns(task.model_cfg)
    reward = et.reward_fn(task)
    step = bd.make_bonbon_step(cfg, fns, reward, rl.make_optimizer(cfg))
    key = jax.random.key(2)
    _, met = jax.jit(step)(rl.init_state(task.ref_params, rl.make_optimizer(cfg)), frozen, batch,
                           key)
    data = bd.sample_reference_responses(cfg, fns, task.ref_params, batch["prompt_BxP"],
                                         batch["prompt_mask_BxP"], jax.random.split(key)[0])
    lengths = np.asarray(data.mask_BxNxL).sum(-1)                            # B x n
    r = np.asarray(reward(frozen.reward_params, jnp.repeat(batch["prompt_idx_B"], 4),
                          data.tokens_BxNxL.reshape(32, 3),
                          data.mask_BxNxL.reshape(32, 3))).reshape(8, 4)
    best = lengths[np.arange(8), r.argmax(1)]
    assert best.mean() != lengths[np.arange(8), r.argmin(1)].mean()
    assert float(met["response_length"]) == pytest.approx(best.mean())


def test_offline_data_drawn_for_another_n_is_refused():
    """An offline set with n' != bonbon.n responses per prompt was re-cut by the step's reshape
    into b * n rows of other lengths (n' = 2, L = 3 under n = 4: rows of 1.5 responses' tokens)
    and trained on; it is refused at trace time, as is a mask of another shape."""
    task, cfg, fns, step, state, frozen, batch = _setup(data="offline")
    two = bd.BoNBoNConfig(n=2, max_new_tokens=4, learning_rate=1e-3)
    data = bd.sample_reference_responses(two, fns, task.ref_params, batch["prompt_BxP"],
                                         batch["prompt_mask_BxP"], jax.random.key(5))
    bad = dict(batch, response_BxNxL=data.tokens_BxNxL, response_mask_BxNxL=data.mask_BxNxL)
    with pytest.raises(ValueError, match=r"must hold bonbon.n=4 responses for each of the "
                                         r"batch's 4 prompts, shape \(4, 4, L\); got \(4, 2, 4\)"):
        jax.jit(step)(state, frozen, bad, jax.random.key(0))
    data = bd.sample_reference_responses(cfg, fns, task.ref_params, batch["prompt_BxP"],
                                         batch["prompt_mask_BxP"], jax.random.key(5))
    bad = dict(batch, response_BxNxL=data.tokens_BxNxL,
               response_mask_BxNxL=data.mask_BxNxL[:, :, :-1])
    with pytest.raises(ValueError, match=r"response_mask_BxNxL must have response_BxNxL's shape"):
        jax.jit(step)(state, frozen, bad, jax.random.key(0))


def test_bonbon_step_with_lora_adapters():
    """With LoRA the state holds only adapters and the loss is the merged policy's: at step 0
    (B = 0, merged = pi_ref) it equals the full-parameter step's loss on the same draws, and
    training the adapters on fixed data lowers the loss and the NLL of the best responses."""
    from infalign_jax.models import lora
    task, cfg, fns, step, state, frozen, batch = _setup(variant="ipo", alpha=0.3, data="offline",
                                                        monitor_samples=4)
    data = bd.sample_reference_responses(cfg, fns, task.ref_params, batch["prompt_BxP"],
                                         batch["prompt_mask_BxP"], jax.random.key(5))
    batch = dict(batch, response_BxNxL=data.tokens_BxNxL, response_mask_BxNxL=data.mask_BxNxL)
    lcfg = lora.LoraConfig(rank=2)
    adapters = lora.init_adapters(lcfg, task.ref_params, jax.random.key(1))
    opt = rl.make_optimizer(cfg)
    lstep = jax.jit(bd.make_bonbon_step(cfg, fns, functools.partial(et.table_reward_fn, vocab=4),
                                        opt, lcfg))
    lstate = rl.init_state(adapters, opt)
    key = jax.random.key(3)
    _, full_met = jax.jit(step)(state, frozen, batch, key)
    lstate, met = lstep(lstate, frozen, batch, key)
    assert float(met["loss"]) == pytest.approx(float(full_met["loss"]), rel=1e-5)
    assert float(met["kl_full_vocab"]) == pytest.approx(0.0, abs=1e-6)   # monitor: merged = ref
    assert (jax.tree.structure(lstate.params) == jax.tree.structure(adapters))
    first = met
    for _ in range(30):
        lstate, met = lstep(lstate, frozen, batch, key)
    assert float(met["loss"]) < 0.8 * float(first["loss"])
    assert float(met["nll"]) < float(first["nll"])
    assert float(met["kl_full_vocab"]) > 1e-3   # the monitor samples the merged policy


@pytest.mark.parametrize("kw", [dict(variant="ipo", alpha=0.3),
                                dict(variant="dpo", grad_accum_steps=2, monitor_samples=0)])
def test_the_split_bonbon_step_guarded_gives_the_whole_steps_states_and_skips_alike(kw):
    """`make_bonbon_split_step` (prepare, apply) under the guard: the states and metrics of the
    whole step under the guard over 4 steps, the step with a NaN reward skipped alike (old state
    kept, step advanced), with and without gradient accumulation."""
    _, cfg, fns, step, state, frozen, batch = _setup(**kw)
    reward = functools.partial(et.table_reward_fn, vocab=4)
    split = bd.make_bonbon_split_step(cfg, fns, reward, rl.make_optimizer(cfg))
    whole_step, split_step = jax.jit(guard_nonfinite(step)), jax.jit(guard_nonfinite(split))
    bad = frozen._replace(reward_params=jnp.full_like(frozen.reward_params, jnp.nan))
    a = run_both_guarded(whole_step, split_step, state, frozen, bad, batch)
    assert not jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)),
                                         state.params, a.params))


def test_the_guarded_split_bonbon_step_does_not_hold_the_old_and_the_new_state_together():
    """The run loop guards BoNBoN's split step, which applies the update in place of the donated
    state; the guard of the whole step holds the new state (params and Adam's two moments) beside
    the old one until its branch. A policy of 3.3M parameters (12.5 MiB; state 38 MiB), compiled
    with the state donated: the split step's temporaries are smaller by more than one parameter
    tree (measured, in parameter trees: unguarded 1.68, whole-step guard 3.32, split 2.17)."""
    task = et.make_task(0, d_model=512)
    cfg = bd.BoNBoNConfig(n=4, max_new_tokens=3, monitor_samples=0)
    opt = rl.make_optimizer(cfg)
    fns = models.decoder_fns(task.model_cfg)
    reward = functools.partial(et.table_reward_fn, vocab=4)
    state = rl.init_state(task.ref_params, opt)
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_XxY),
                       jnp.zeros((2, 8), jnp.float32), jnp.full((2,), 8, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(task.prompts_XxP), "prompt_mask_BxP": jnp.ones((2, 2), bool),
             "prompt_idx_B": jnp.arange(2)}
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(task.ref_params))
    assert params_bytes > 12 * 2 ** 20

    def temp(step):
        compiled = jax.jit(guard_nonfinite(step), donate_argnums=(0,)).lower(
            state, frozen, batch, jax.random.key(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole = temp(bd.make_bonbon_step(cfg, fns, reward, opt))
    split = temp(bd.make_bonbon_split_step(cfg, fns, reward, opt))
    assert split <= whole - params_bytes, (split, whole, params_bytes)


@pytest.mark.parametrize("full_kl", [True, False])
def test_bonbon_shared_prompt_step_equals_the_per_row_step(full_kl):
    """`shared_prompt` (each prompt run once for its best/worst pair and the monitor's samples)
    gives the per-row step's state and metrics, on the EOS task (masked responses) with a policy
    away from pi_ref (h != 0, KL > 0); the run's config passes rl.shared_prompt through."""
    task = et.make_task(3, vocab=4, length=3, d_model=32, eos=True)   # mean length ~2.5
    table = et.sample_reference_table(task, 256, seed=1)
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_XxY), jnp.asarray(table),
                       jnp.full((2,), 256, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(np.tile(task.prompts_XxP, (2, 1))),
             "prompt_mask_BxP": jnp.ones((4, task.prompts_XxP.shape[1]), bool),
             "prompt_idx_B": jnp.tile(jnp.arange(2), 2)}
    fns = models.decoder_fns(task.model_cfg)
    params = jax.tree.map(lambda x: x * 1.1, task.ref_params)
    out = {}
    for shared in (False, True):
        cfg = bd.BoNBoNConfig(n=4, max_new_tokens=3, eos_id=task.eos_id, learning_rate=1e-2,
                              monitor_samples=4, full_kl=full_kl, shared_prompt=shared)
        opt = rl.make_optimizer(cfg)
        step = jax.jit(bd.make_bonbon_step(cfg, fns, et.reward_fn(task), opt))
        out[shared] = step(rl.init_state(params, opt), frozen, batch, jax.random.key(3))
    (s0, m0), (s1, m1) = out[False], out[True]
    assert 0 < float(m0["response_length"]) < 3          # some responses stopped at EOS
    assert abs(float(m0["h_mean"])) > 1e-3 and float(m0["kl_k3"]) > 0
    assert set(m1) == set(m0) and ("kl_full_vocab" in m0) == full_kl
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The config plumbing: rl.shared_prompt reaches BoNBoN.
    from infalign_jax.loops import train
    import ml_collections
    config = ml_collections.ConfigDict({
        "bonbon": {"n": 4}, "rl": {"max_new_tokens": 3, "learning_rate": 1e-3, "decay_steps": 0,
                                   "shared_prompt": True}})
    assert train.bonbon_config(config, task).shared_prompt


@pytest.mark.parametrize("procedure", ["bon", "won"])
def test_selected_distribution_matches_brute_force_with_ties(procedure):
    """`evaluation.selected_probs` (BoN_n / WoN_n of a discrete policy, the exact task's BoNBoN
    target) against every ordered n-tuple of draws, the pick being the first draw at the best
    (worst) reward, as `selection.best_of_n` breaks ties; rewards with ties and a zero weight."""
    rs = np.random.RandomState(0)
    q = rs.dirichlet(np.ones(5), size=2)
    q[1, 2] = 0.0
    q /= q.sum(1, keepdims=True)
    r = np.array([[3.0, 1.0, 3.0, 0.0, 2.0], [1.0, 1.0, 4.0, 0.0, 1.0]])
    sign = 1.0 if procedure == "bon" else -1.0
    for n in (1, 2, 3):
        want = np.zeros_like(q)
        for p in range(2):
            for draws in itertools.product(range(5), repeat=n):
                pick = draws[int(np.argmax(sign * r[p, list(draws)]))]
                want[p, pick] += np.prod(q[p, list(draws)])
        got = evaluation.selected_probs(r, n, procedure, weights_BxM=q)
        np.testing.assert_allclose(got, want, atol=1e-12)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ipo", "dpo"])
def test_bonbon_moves_policy_to_exact_bon(variant):
    """BoNBoN from pi_ref on the exact task with N = 4: the target is the exact BoN_4 policy
    (spec 4), computed by enumeration (KL 0.634, win rate 0.799). Measured (300 steps): dpo KL
    0.599, win rate 0.771, KL(pi || BoN_4) 0.24 vs 1.51 for pi_ref; ipo 0.892, 0.814, 0.20."""
    n, steps = 4, 300
    task, cfg, fns, step, state, frozen, batch = _setup(
        reps=16, n=n, variant=variant, alpha=0.5, decay_steps=steps, monitor_samples=0)
    ref = np.exp(et.policy_logprobs(task, task.ref_params))
    bon = np.exp(et.bon_logprobs(np.log(ref), task.rewards_XxY, n))
    want = et.policy_report(task, bon, ns=(1,))
    # Discrete rewards: KL(BoN_4 || pi_ref) is below the continuous log 4 - 3/4 = 0.636.
    assert 0.3 < want["kl"] < np.log(n) - (n - 1) / n
    jstep = jax.jit(step)
    rng = jax.random.key(0)
    for _ in range(steps):
        rng, key = jax.random.split(rng)
        state, met = jstep(state, frozen, batch, key)
    probs = np.exp(et.policy_logprobs(task, state.params))
    got = et.policy_report(task, probs, ns=(1,))
    print(variant, "BoN_4", want, "trained", got, "KL(pi||BoN)", et.exact_kl(probs, bon),
          "KL(ref||BoN)", et.exact_kl(ref, bon))
    # The SFT half's minimiser is BoN_4 itself; the preference half only matches its mean
    # log-ratio gap, so the fixed point is near, not at, BoN_4. Thresholds: the win rate closes
    # >= 80% of the gap from pi_ref (1/2), the policy's KL to BoN_4 falls to < 40% of pi_ref's,
    # and KL(pi || pi_ref) lands within 60% of BoN_4's.
    assert abs(got["bon1"] - want["bon1"]) < 0.2 * (want["bon1"] - 0.5)
    assert et.exact_kl(probs, bon) < 0.4 * et.exact_kl(ref, bon)
    assert abs(got["kl"] - want["kl"]) < 0.6 * want["kl"]
    assert float(met["h_mean"]) > 0.5 * (n - 1) * harmonic_number(n - 1)
