"""Tests of `reward_training`: BT metrics against numpy, padding, training on a task with a known
reward, vmapped ensembles against member-by-member training, the RL reward adapters, configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from infalign_jax import models
from infalign_jax.rewards import reward_models as rt
from infalign_jax.infra import sharding as sh

V, TOKEN = 8, 3


def _model_cfg(init_std=0.02, n_layers=1):
    return models.ModelConfig(vocab_size=V, d_model=16, n_layers=n_layers, n_heads=2,
                              n_kv_heads=2, head_dim=8, d_ff=32, max_len=32, heads=("reward",),
                              init_std=init_std)


def _random_params(cfg, seed):
    """Init, then a random reward head: its zero init would make every reward 0."""
    params = models.init_params(cfg, jax.random.key(seed))
    params["reward_head_kernel"] = jax.random.normal(jax.random.key(seed + 100),
                                                     params["reward_head_kernel"].shape)
    return params


def _padded_batch(seed, b=6, p=4, rc=5, rr=3):
    """Random LEFT-padded prompts, RIGHT-padded responses of varying lengths (>= 1 real token)."""
    rng = np.random.default_rng(seed)

    def lengths(n, low):
        return rng.integers(low, n + 1, b)
    plen, clen, rlen = lengths(p, 1), lengths(rc, 1), lengths(rr, 1)
    pmask = np.arange(p)[None] >= (p - plen)[:, None]
    cmask = np.arange(rc)[None] < clen[:, None]
    rmask = np.arange(rr)[None] < rlen[:, None]
    tok = lambda n: rng.integers(1, V, (b, n))  # noqa: E731
    return {"prompt_BxP": np.where(pmask, tok(p), 0), "prompt_mask_BxP": pmask,
            "chosen_BxL": np.where(cmask, tok(rc), 0), "chosen_mask_BxL": cmask,
            "rejected_BxL": np.where(rmask, tok(rr), 0), "rejected_mask_BxL": rmask}


def _unpadded_reward(cfg, params, prompt, pmask, resp, rmask):
    """One row alone with its padding stripped: the independent reference."""
    tokens = np.concatenate([prompt[pmask], resp[rmask]])[None]
    return float(_jit_reward(params, jnp.asarray(tokens), cfg)[0])


@functools.partial(jax.jit, static_argnums=2)
def _jit_reward(params, tokens_BxT, cfg):
    return models.apply(params, tokens_BxT, cfg).reward


def _np_bt_loss(rc, rr, margin, eps):
    z = rc - rr - margin
    return np.mean((1 - eps) * np.logaddexp(0, -z) + eps * np.logaddexp(0, z))


def _np_ece(rc, rr, num_bins):
    d = np.asarray(rc, np.float64) - np.asarray(rr, np.float64)
    p = np.concatenate([1 / (1 + np.exp(-d)), 1 / (1 + np.exp(d))])
    y = np.concatenate([np.ones_like(d), np.zeros_like(d)])
    bins = np.minimum((p * num_bins).astype(int), num_bins - 1)
    return sum((bins == k).mean() * abs(y[bins == k].mean() - p[bins == k].mean())
               for k in range(num_bins) if (bins == k).any())


# ------------------------------------------------------------------------------ metrics

@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_and_ece_match_numpy(seed):
    rng = np.random.default_rng(seed)
    rc = rng.normal(size=200).astype(np.float32) * 2
    rr = rng.normal(size=200).astype(np.float32) * 2
    rr[:20] = rc[:20]  # ties
    d = rc - rr
    want_acc = np.mean((d > 0) + 0.5 * (d == 0))
    assert float(rt.pairwise_accuracy(rc, rr)) == pytest.approx(want_acc, abs=1e-7)
    for bins in (1, 7, 10):
        got = float(jax.jit(rt.expected_calibration_error, static_argnums=2)(rc, rr, bins))
        assert got == pytest.approx(_np_ece(rc, rr, bins), abs=1e-5)


def test_ece_hand_cases():
    l3 = np.log(3.0)
    # Ties: p = 1/2 with outcomes 1 and 0 in the same bin: perfectly calibrated.
    assert float(rt.expected_calibration_error(np.zeros(2), np.zeros(2))) == pytest.approx(0)
    # One pair at p = 3/4: events (3/4, 1) and (1/4, 0), each off by 1/4.
    assert float(rt.expected_calibration_error(np.array([l3]), np.zeros(1))) == pytest.approx(
        0.25, abs=1e-6)
    # Three of four pairs won at p = 3/4: bin 7 holds outcomes 1,1,1,0 at confidence 3/4.
    rc = np.array([l3, l3, l3, -l3])
    assert float(rt.expected_calibration_error(rc, np.zeros(4))) == pytest.approx(0, abs=1e-6)
    # Half won: bins 7 and 2 each hold mean outcome 1/2 at confidences 3/4 and 1/4.
    rc = np.array([l3, -l3])
    assert float(rt.expected_calibration_error(rc, np.zeros(2))) == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="num_bins"):
        rt.expected_calibration_error(rc, rc, num_bins=0)


def test_one_pass_equals_rows_alone_with_padding():
    cfg = _model_cfg(init_std=0.5, n_layers=2)
    params = _random_params(cfg, 0)
    batch = _padded_batch(0)
    rc, rr = jax.jit(functools.partial(rt.pair_rewards, cfg))(params, batch)
    for i in range(6):
        want_c = _unpadded_reward(cfg, params, batch["prompt_BxP"][i], batch["prompt_mask_BxP"][i],
                                  batch["chosen_BxL"][i], batch["chosen_mask_BxL"][i])
        want_r = _unpadded_reward(cfg, params, batch["prompt_BxP"][i], batch["prompt_mask_BxP"][i],
                                  batch["rejected_BxL"][i], batch["rejected_mask_BxL"][i])
        assert float(rc[i]) == pytest.approx(want_c, abs=1e-5)
        assert float(rr[i]) == pytest.approx(want_r, abs=1e-5)
    # Two separate padded passes give the same numbers as the stacked one.
    sep_c = jax.jit(functools.partial(rt.sequence_rewards, cfg))(
        params, batch["prompt_BxP"], batch["prompt_mask_BxP"], batch["chosen_BxL"],
        batch["chosen_mask_BxL"])
    np.testing.assert_allclose(np.asarray(rc), np.asarray(sep_c), atol=1e-5)
    assert np.std(np.asarray(rc)) > 0.1  # the rewards really differ between rows


def test_rm_eval_is_the_plain_bt_loss_and_metrics_of_the_pair_rewards():
    """`make_rm_eval` (no margin or smoothing, whatever the training used) against numpy on the
    rewards of each row."""
    cfg = _model_cfg(init_std=0.5, n_layers=2)
    params = _random_params(cfg, 2)
    batch = _padded_batch(3, b=8)
    out = jax.jit(rt.make_rm_eval(cfg, num_bins=4))(params, batch)
    rc, rr = (np.asarray(x, np.float64) for x in rt.pair_rewards(cfg, params, batch))
    d = rc - rr
    assert np.std(d) > 0.1
    assert float(out["loss"]) == pytest.approx(_np_bt_loss(rc, rr, 0.0, 0.0), rel=1e-5)
    assert float(out["accuracy"]) == pytest.approx(np.mean((d > 0) + 0.5 * (d == 0)))
    assert float(out["reward_gap"]) == pytest.approx(d.mean(), rel=1e-5, abs=1e-6)
    assert float(out["ece"]) == pytest.approx(_np_ece(rc, rr, 4), abs=1e-5)


def test_rm_step_loss_grads_and_update_match_independent_computation():
    cfg = _model_cfg(init_std=0.5)
    params = _random_params(cfg, 1)
    batch = _padded_batch(1, rc=4, rr=4)
    margin_B = np.linspace(0.0, 1.0, 6).astype(np.float32)
    rcfg = rt.RMConfig(learning_rate=1e-2, label_smoothing=0.1, max_grad_norm=0.5,
                       weight_decay=0.1)
    opt = rt.make_optimizer(rcfg)
    state = rt.init_rm_state(params, opt)
    step = rt.make_rm_step(cfg, rcfg, opt)
    new_state, metrics = jax.jit(step)(state, dict(batch, margin_B=margin_B))

    # Independent loss: two separate passes, the BT formula written out.
    def loss_fn(p):
        args = (batch["prompt_BxP"], batch["prompt_mask_BxP"])
        rc = rt.sequence_rewards(cfg, p, *args, batch["chosen_BxL"], batch["chosen_mask_BxL"])
        rr = rt.sequence_rewards(cfg, p, *args, batch["rejected_BxL"], batch["rejected_mask_BxL"])
        z = rc - rr - margin_B
        return jnp.mean(0.9 * jnp.logaddexp(0, -z) + 0.1 * jnp.logaddexp(0, z)), (rc, rr)

    (loss, (rc, rr)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    rc, rr = np.asarray(rc, np.float64), np.asarray(rr, np.float64)
    assert float(metrics["loss"]) == pytest.approx(_np_bt_loss(rc, rr, margin_B, 0.1), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean((rc > rr) + 0.5 * (rc == rr)))
    assert float(metrics["reward_gap"]) == pytest.approx(np.mean(rc - rr), abs=1e-5)
    gnorm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    assert float(metrics["grad_norm"]) == pytest.approx(gnorm, rel=1e-4)
    assert gnorm > 0.5  # so clipping is exercised
    # Update by hand: clip to norm 0.5, Adam's first step, decoupled decay on matrices only.
    flat0 = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p0), g, p1 in zip(flat0, jax.tree.leaves(grads), jax.tree.leaves(new_state.params)):
        g = np.asarray(g, np.float64) * 0.5 / gnorm
        if "reward_head_bias" in jax.tree_util.keystr(path):
            g = 0.0 * g  # BT is shift-invariant: the step zeroes this rounding-noise gradient
        adam = g / (np.abs(g) + 1e-8)  # m_hat / (sqrt(v_hat) + eps) at step 1
        decay = 0.1 * np.asarray(p0) if np.ndim(p0) >= 2 else 0.0
        want = np.asarray(p0) - 1e-2 * (adam + decay)
        np.testing.assert_allclose(np.asarray(p1), want, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    assert int(new_state.step) == 1


def test_learning_rate_schedule():
    cfg = rt.RMConfig(learning_rate=1.0, warmup_steps=10, total_steps=110)
    lr = rt.learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(0.1)
    lr = rt.learning_rate_schedule(rt.RMConfig(learning_rate=2.0, warmup_steps=4))
    assert [float(lr(s)) for s in (0, 2, 4, 1000)] == pytest.approx([0, 1, 2, 2])


# ------------------------------------------------------------------------------ training

def _count_task(rng, n, r=4, p=3):
    """Pairs labelled by the true reward = number of `TOKEN`s in the response (distinct values).

    Counts are drawn uniformly in 0..r so every reward level is common; prompts (1..p tokens from
    4..7, left-padded) carry no TOKEN."""
    plen = rng.integers(1, p + 1, n)
    pmask = np.arange(p)[None] >= (p - plen)[:, None]
    prompts = np.where(pmask, rng.integers(4, V, (n, p)), 0)

    def responses(counts):
        out = rng.choice([t for t in range(V) if t != TOKEN], (n, r))
        for i, c in enumerate(counts):
            out[i, rng.choice(r, c, replace=False)] = TOKEN
        return out
    c1 = rng.integers(0, r + 1, n)
    c2 = (c1 + rng.integers(1, r + 1, n)) % (r + 1)  # != c1
    a, b = responses(c1), responses(c2)
    win = (c1 > c2)[:, None]
    ones = np.ones((n, r), bool)
    return {"prompt_BxP": prompts, "prompt_mask_BxP": pmask, "chosen_BxL": np.where(win, a, b),
            "chosen_mask_BxL": ones, "rejected_BxL": np.where(win, b, a),
            "rejected_mask_BxL": ones}


def test_training_recovers_known_reward():
    cfg = _model_cfg()  # one layer suffices: attention counts the TOKENs in the sequence
    rng = np.random.default_rng(0)
    train, held_out = _count_task(rng, 384), _count_task(rng, 256)
    rcfg = rt.RMConfig(learning_rate=3e-3, warmup_steps=10, total_steps=200)
    opt = rt.make_optimizer(rcfg)
    state = rt.init_rm_state(rt.init_rm_params(cfg, jax.random.key(0)), opt)
    step = rt.jit_rm_step(rt.make_rm_step(cfg, rcfg, opt))
    eval_fn = jax.jit(rt.make_rm_eval(cfg))
    before = eval_fn(state.params, held_out)
    assert float(before["accuracy"]) == 0.5  # zero-initialised head: all ties
    for _ in range(200):
        idx = rng.choice(384, 32, replace=False)
        state, metrics = step(state, {k: v[idx] for k, v in train.items()})
    after = eval_fn(state.params, held_out)
    assert float(after["accuracy"]) > 0.9
    assert float(after["loss"]) < 0.2 < float(before["loss"])

    rc, rr = rt.pair_rewards(cfg, state.params, held_out)
    learned = np.concatenate([rc, rr])
    true = np.concatenate([(held_out[k] == TOKEN).sum(1) for k in ("chosen_BxL", "rejected_BxL")])
    # The true reward takes 5 tied values, so even a perfect ranking has Spearman < 1: about
    # sqrt(1 - 1/25) = 0.98 for equal groups (within-group rank variance is 1/25 of the total);
    # the exact ceiling for this sample is computed below. A reward unrelated to the count has
    # Spearman ~ N(0, 1/sqrt(512)), so 0.9 (> 90% of the ceiling) can only pass if it is learned.
    ceiling = stats.spearmanr(true + 1e-3 * learned / np.abs(learned).max(), true).statistic
    rho = stats.spearmanr(learned, true).statistic
    assert ceiling > 0.95 and rho > 0.9, (rho, ceiling)


# ------------------------------------------------------------------------------ ensembles

@pytest.mark.parametrize("bootstrap", [False, True])
def test_vmapped_ensemble_equals_members_trained_alone(bootstrap):
    cfg = _model_cfg()
    e, steps = 3, 3
    rcfg = rt.RMConfig(learning_rate=1e-2)
    opt = rt.make_optimizer(rcfg)
    params_E = rt.init_ensemble(cfg, jax.random.key(0), e)
    # A random (not zero) head: with it the first gradients are not exactly 0 then tiny, where
    # Adam's g / (|g| + eps) would magnify float32 summation-order differences to ~1e-5.
    params_E["reward_head_kernel"] = jax.random.normal(jax.random.key(1), (e, 16, 1))
    ens_step = jax.jit(rt.make_ensemble_rm_step(cfg, rcfg, opt))
    one_step = jax.jit(rt.make_rm_step(cfg, rcfg, opt))
    state_E = rt.init_ensemble_state(params_E, opt)
    alone = [rt.init_rm_state(jax.tree.map(lambda x: x[m], params_E), opt) for m in range(e)]
    # Members really start apart: different inits.
    assert not np.allclose(params_E["embed"][0], params_E["embed"][1])
    for s in range(steps):
        batch = {k: jnp.asarray(v) for k, v in _padded_batch(10 + s, b=8, rc=4, rr=4).items()}
        idx_ExB = rt.bootstrap_indices(jax.random.key(s),
                                       rt.bootstrap_counts(jax.random.key(7), e, 8))
        state_E, metrics_E = ens_step(state_E, dict(batch, member_idx_ExB=idx_ExB)
                                      if bootstrap else batch)
        assert metrics_E["loss"].shape == (e,)
        for m in range(e):
            rows = {k: v[np.asarray(idx_ExB[m])] for k, v in batch.items()} if bootstrap else batch
            alone[m], metrics = one_step(alone[m], rows)
            assert float(metrics_E["loss"][m]) == pytest.approx(float(metrics["loss"]), abs=1e-5)
    for m in range(e):
        for a, b in zip(jax.tree.leaves(alone[m].params), jax.tree.leaves(state_E.params)):
            # float32 summation order of the vmapped and the single member's products, through
            # 3 Adam steps at lr 1e-2: up to 1.01e-5 seen on an AMD EPYC host (a member read from
            # another's data or init differs by ~1e-2)
            np.testing.assert_allclose(np.asarray(b[m]), np.asarray(a), atol=5e-5)
    assert np.asarray(state_E.step).tolist() == [steps] * e

    # Ensemble statistics equal numpy over the members' own rewards.
    tokens = jnp.asarray(batch["chosen_BxL"])
    mask = jnp.asarray(batch["chosen_mask_BxL"])
    ens = jax.jit(functools.partial(rt.ensemble_rewards, cfg), static_argnames="ddof")
    mean_B, std_B, all_ExB = ens(state_E.params, tokens, mask)
    one = jax.jit(lambda p: models.apply(p, tokens, cfg, attention_mask_BxT=mask).reward)
    each = np.stack([one(st.params) for st in alone])
    np.testing.assert_allclose(np.asarray(all_ExB), each, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mean_B), each.mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(std_B), each.std(0), atol=1e-5)
    _, std1_B, _ = ens(state_E.params, tokens, mask, ddof=1)
    np.testing.assert_allclose(np.asarray(std1_B), each.std(0, ddof=1), atol=1e-5)
    assert each.std(0).min() > 1e-4  # members disagree, so the std test is not 0 == 0


def test_reward_fn_adapters_match_pair_rewards():
    cfg = _model_cfg(init_std=0.5)
    batch = _padded_batch(3, b=5)
    prompts, pmask = batch["prompt_BxP"], batch["prompt_mask_BxP"]
    idx_R = np.array([4, 0, 2, 2, 1])
    rows = dict(batch, prompt_BxP=prompts[idx_R], prompt_mask_BxP=pmask[idx_R])
    params = _random_params(cfg, 2)
    want_c, _ = rt.pair_rewards(cfg, params, rows)
    reward_fn = rt.reward_fn_from_model(cfg, prompts, pmask)
    got = jax.jit(reward_fn)(params, idx_R, batch["chosen_BxL"], batch["chosen_mask_BxL"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want_c), atol=1e-5)

    params_E = jax.tree.map(lambda *xs: jnp.stack(xs), *[_random_params(cfg, s) for s in (2, 5, 6)])
    each = np.stack([rt.pair_rewards(cfg, jax.tree.map(lambda x: x[m], params_E), rows)[0]
                     for m in range(3)])
    for penalty, spread in (("std", each.std(0)), ("var", each.var(0))):
        ens_fn = rt.ensemble_reward_fn_from_model(cfg, prompts, pmask, k=0.7, penalty=penalty)
        got = jax.jit(ens_fn)(params_E, idx_R, batch["chosen_BxL"], batch["chosen_mask_BxL"])
        np.testing.assert_allclose(np.asarray(got), each.mean(0) - 0.7 * spread, atol=1e-5)
    with pytest.raises(ValueError, match="penalty"):
        rt.ensemble_reward_fn_from_model(cfg, prompts, pmask, k=1.0, penalty="iqr")


def test_sharded_step_matches_single_device():
    cfg = models.ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                             head_dim=8, d_ff=32, max_len=32, heads=("reward",), init_std=0.5)
    rcfg = rt.RMConfig(learning_rate=1e-2, weight_decay=0.01)
    opt = rt.make_optimizer(rcfg)
    step = rt.make_rm_step(cfg, rcfg, opt)
    batch = _padded_batch(4, b=8, rc=4, rr=4)
    state = rt.init_rm_state(rt.init_rm_params(cfg, jax.random.key(1)), opt)
    want_state, want = jax.jit(step)(state, batch)

    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    sstate = rt.init_rm_state(rt.init_rm_params(cfg, jax.random.key(1), mesh), opt, mesh)
    assert any("fsdp" in str(a.sharding.spec) for a in jax.tree.leaves(sstate.params))
    with sh.axis_rules(mesh):
        sstep = rt.jit_rm_step(step, sstate, mesh)
        got_state, got = sstep(sstate, sh.shard_batch(batch, mesh))
    for k in want:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-4, abs=1e-6), k
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("field,value", [
    ("learning_rate", 0.0), ("learning_rate", float("nan")), ("weight_decay", -0.1),
    ("max_grad_norm", -1.0), ("margin", -0.5), ("label_smoothing", 0.6),
    ("label_smoothing", 0.5),
    ("warmup_steps", -1), ("total_steps", 2.5), ("warmup_steps", 50)])
def test_bad_config_names_field(field, value):
    kwargs = {"learning_rate": 1e-3, "total_steps": 10, field: value}
    with pytest.raises(ValueError, match=f"RMConfig.{field}"):
        rt.RMConfig(**kwargs)


def test_bad_inputs_fail_clearly():
    lm_cfg = models.ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                head_dim=8, d_ff=32)
    with pytest.raises(ValueError, match="heads must include 'reward'"):
        rt.make_rm_step(lm_cfg, rt.RMConfig(learning_rate=1e-3), optax.sgd(1.0))
    cfg = _model_cfg()
    params = models.init_params(cfg, jax.random.key(0))
    batch = _padded_batch(0)
    with pytest.raises(ValueError, match="rejected_mask_BxL"):
        rt.pair_rewards(cfg, params, {k: v for k, v in batch.items() if k != "rejected_mask_BxL"})
    with pytest.raises(ValueError, match="chosen_mask_BxL"):
        rt.pair_rewards(cfg, params, dict(batch, chosen_mask_BxL=batch["chosen_mask_BxL"][:, :2]))
    with pytest.raises(ValueError, match="size"):
        rt.init_ensemble(cfg, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="r_chosen_B"):
        rt.pairwise_accuracy(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="r_chosen_B vs r_rejected_B"):
        rt.expected_calibration_error(np.zeros(3), np.zeros(4))


def test_each_member_trains_on_its_own_fixed_bootstrap_resample():
    """Over many batches a member draws each example in proportion to its count in the member's
    resample, never one its resample left out (about 37% of them), and the members' resamples
    differ. Redrawing every batch's rows independently let every member see every example as
    epochs went by."""
    e, n, b = 3, 64, 16
    counts_ExN = np.asarray(rt.bootstrap_counts(jax.random.key(0), e, n))
    assert (counts_ExN.sum(1) == n).all()
    left_out = (counts_ExN == 0).mean()
    assert 0.25 < left_out < 0.5                      # 1 - (1 - 1/n)^n ~ 0.37
    assert not (counts_ExN[0] == counts_ExN[1]).all()
    drawn_ExN = np.zeros((e, n))
    rng = np.random.default_rng(0)
    for step in range(2000):
        rows = rng.permutation(n)[:b]
        idx_ExB = np.asarray(rt.bootstrap_indices(jax.random.key(step), counts_ExN[:, rows]))
        assert idx_ExB.shape == (e, b) and idx_ExB.min() >= 0 and idx_ExB.max() < b
        for m in range(e):
            np.add.at(drawn_ExN[m], rows[idx_ExB[m]], 1)
    assert (drawn_ExN[counts_ExN == 0] == 0).all()    # left-out examples never reach the member
    for m in range(e):
        seen = counts_ExN[m] > 0
        share = drawn_ExN[m, seen] / drawn_ExN[m].sum()
        # the expected share of example i: its count over the counts of the batch it came with;
        # uniform batches make it close to count_i / n (within sampling noise and batch effects)
        assert np.corrcoef(share, counts_ExN[m, seen])[0, 1] > 0.9
    # a member holding none of a batch's examples draws its rows uniformly
    idx = np.asarray(rt.bootstrap_indices(jax.random.key(1), np.zeros((1, b), np.int32)))
    assert idx.shape == (1, b) and idx.max() < b
    # uniformly: every row about 1/b of the draws (not all on row 0, which an all -inf
    # categorical returns), while the other member keeps to its rows
    counts_2xB = np.stack([np.zeros(b, np.int32), np.arange(b) % 2])
    hits = np.zeros((2, b))
    for step in range(200):
        idx_2xB = np.asarray(rt.bootstrap_indices(jax.random.key(step), counts_2xB))
        for m in range(2):
            np.add.at(hits[m], idx_2xB[m], 1)
    assert (hits[0] > 0.5 * 200).all() and (hits[0] < 1.5 * 200).all()   # expected 200 each
    assert (hits[1][counts_2xB[1] == 0] == 0).all() and (hits[1][1::2] > 0.5 * 400).all()


def test_pairwise_accuracy_is_nan_when_a_reward_is_nan():
    """A NaN reward counted as a lost pair: [1, NaN] vs [0, 0] read 0.5."""
    assert np.isnan(float(rt.pairwise_accuracy(jnp.array([1.0, jnp.nan]), jnp.array([0.0, 0.0]))))
    assert float(rt.pairwise_accuracy(jnp.array([1.0, 0.0, -1.0]), jnp.zeros(3))) == 0.5
