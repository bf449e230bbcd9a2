"""CD-FUDGE / CD-Q prefix scorers: hand cases, numpy, and the exact enumerable task.

V*(x, y^t) = E_{pi_ref}[r | prefix] is enumerated from `exact_task` (vocab 4, length 3): the
FUDGE minimiser and the CD-Q fixed point are compared with it, and a value model trained with
`make_scorer_step` is checked against it and used for controlled decoding, whose expected reward
is again enumerated exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infalign_jax.decoding import controlled_decoding as cd
from infalign_jax.rl.tasks import exact as et
from infalign_jax import models
from infalign_jax.core.types import init_train_state
from infalign_jax.rewards import prefix_scorers as ps


# ------------------------------------------------------------------------------ hand cases
def test_fudge_targets_and_loss_hand_case():
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    targets = ps.fudge_targets(jnp.array([2.0, -1.0]), mask)
    np.testing.assert_array_equal(np.asarray(targets), [[2, 2, 0], [-1, 0, 0]])
    values = jnp.array([[1.0, 2.0, np.nan], [0.0, 9.0, 9.0]])   # NaN where masked: ignored
    # 1/2 mean over the 3 valid tokens of (1-2)^2, (2-2)^2, (0+1)^2.
    assert float(ps.fudge_loss(values, jnp.array([2.0, -1.0]), mask)) == pytest.approx(1 / 3)
    # "sequence": row means 1/4 and 1/2, then their mean.
    assert float(ps.fudge_loss(values, jnp.array([2.0, -1.0]), mask, "sequence")) == \
        pytest.approx(0.5 * (0.5 * 0.5 + 0.5))


def test_cdq_targets_hand_case():
    # t=0: E over pi_ref = (0.25, 0.75) of next values (1, 3) = 2.5; t=1 last valid: reward 7.
    nv = jnp.array([[[1.0, 3.0], [100.0, 100.0], [np.nan, np.nan]]])
    logp = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]]]))
    mask = jnp.array([[True, True, False]])
    t = ps.cdq_targets(nv, logp, mask, jnp.array([7.0]))
    np.testing.assert_allclose(np.asarray(t), [[2.5, 7.0, 0.0]], rtol=1e-6)
    # Unnormalised log-probs (top-k candidates) are renormalised: same answer after a shift.
    np.testing.assert_allclose(np.asarray(ps.cdq_targets(nv, logp - 3.0, mask, jnp.array([7.]))),
                               np.asarray(t), rtol=1e-6)
    assert float(ps.cdq_loss(jnp.array([[2.5, 5.0, 0.0]]), nv, logp, mask, jnp.array([7.0]))) \
        == pytest.approx(0.5 * 4.0 / 2)
    # A candidate of log-prob -inf (weight 0) counts 0 whatever its value: no 0 * inf = NaN.
    for bad in (np.inf, np.nan):
        nv_bad = nv.at[0, 0, 0].set(bad)
        logp_bad = logp.at[0, 0, 0].set(-jnp.inf)
        np.testing.assert_allclose(np.asarray(ps.cdq_targets(nv_bad, logp_bad, mask,
                                                              jnp.array([7.0]))),
                                   [[3.0, 7.0, 0.0]], rtol=1e-6)
    # The target is a constant (CD Eq. 5's stop-gradient): no gradient flows into next values.
    g = jax.grad(lambda n: ps.cdq_loss(jnp.zeros((1, 3)), n, logp, mask, jnp.array([7.0])))(
        jnp.nan_to_num(nv))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def _np_cdq_targets(nv, logp, mask, reward):
    b, t, _ = nv.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            if j == t - 1 or not mask[i, j + 1]:
                out[i, j] = reward[i]
            else:
                w = np.exp(logp[i, j] - logp[i, j].max())
                out[i, j] = np.sum(w / w.sum() * nv[i, j])
    return out


def test_targets_match_numpy():
    rs = np.random.RandomState(0)
    b, t, k = 6, 5, 3
    lengths = np.array([5, 3, 1, 0, 4, 2])
    mask = np.arange(t)[None] < lengths[:, None]
    nv, logp, reward = rs.randn(b, t, k), rs.randn(b, t, k) * 2, rs.randn(b)
    got = ps.cdq_targets(jnp.asarray(nv), jnp.asarray(logp), mask, jnp.asarray(reward))
    np.testing.assert_allclose(np.asarray(got), _np_cdq_targets(nv, logp, mask, reward),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ps.fudge_targets(jnp.asarray(reward), mask)),
                               np.where(mask, reward[:, None], 0.0), rtol=1e-6)
    values = rs.randn(b, t)
    want = 0.5 * np.sum(mask * (values - reward[:, None]) ** 2) / mask.sum()
    assert float(ps.fudge_loss(jnp.asarray(values), jnp.asarray(reward), mask)) == \
        pytest.approx(want, rel=1e-5)
    np.testing.assert_array_equal(
        np.asarray(ps.terminal_mask(mask)),
        (np.arange(t)[None] == lengths[:, None] - 1))


# ------------------------------------------------------------------------------ exact task
@functools.lru_cache(maxsize=None)
def _exact():
    """The task, pi_ref's exact probabilities and V* for each (prompt, response, position)."""
    task = et.make_task(0, init_std=0.5)  # a peaked pi_ref: V* varies a lot under it
    v, length = task.vocab, task.length
    n_p = task.prompts_XxP.shape[0]
    probs = np.exp(et.policy_logprobs(task, task.ref_params))
    probs = probs / probs.sum(1, keepdims=True)
    r = task.rewards_XxY.astype(np.float64)
    codes = np.arange(v ** length)
    cols = []
    for t in range(length):
        # Responses sharing the prefix y^t are a contiguous block of v**(length - 1 - t) codes.
        pr, rr = probs.reshape(n_p, v ** (t + 1), -1), r.reshape(n_p, v ** (t + 1), -1)
        vstar = (pr * rr).sum(-1) / pr.sum(-1)
        cols.append(vstar[:, codes // v ** (length - 1 - t)])
    return task, probs, np.stack(cols, -1)       # vstar_PxYxL


def _prefix_ids(codes_B, prompt_B, v, length):
    """Index of each prefix (prompt, y^t) in a flat free table, for t = 0..length-1: BxL.

    Level t holds the v**(t+1) prefixes of t+1 tokens, at `offsets[t]` within a prompt's block.
    """
    sizes = [v ** (t + 1) for t in range(length)]
    offsets = np.cumsum([0] + sizes[:-1])
    per_prompt = sum(sizes)
    ids = np.stack([prompt_B * per_prompt + offsets[t] + codes_B // v ** (length - 1 - t)
                    for t in range(length)], 1)
    return ids, per_prompt, offsets


def test_fudge_minimiser_is_v_star():
    """(a) The free-table minimiser of the FUDGE loss on exact pi_ref samples -> V*."""
    task, probs, vstar = _exact()
    v, length, n_p = task.vocab, task.length, probs.shape[0]
    rs = np.random.RandomState(1)
    n = 40000
    prompt_B = np.repeat(np.arange(n_p), n)
    codes_B = np.concatenate([rs.choice(v ** length, size=n, p=probs[p]) for p in range(n_p)])
    ids_BxL, per_prompt, _ = _prefix_ids(codes_B, prompt_B, v, length)
    reward_B = jnp.asarray(task.rewards_XxY[prompt_B, codes_B])
    mask = jnp.ones(ids_BxL.shape, bool)

    def loss(table):
        return ps.fudge_loss(table[ids_BxL], reward_B, mask)

    grad = jax.jit(jax.grad(loss))
    size = n_p * per_prompt
    # The loss is a separable quadratic in the table: one Newton step with the diagonal Hessian
    # (grad(1) - grad(0)) lands on its minimiser; check that the gradient vanishes there.
    g0, g1 = np.asarray(grad(jnp.zeros(size))), np.asarray(grad(jnp.ones(size)))
    hess = g1 - g0
    seen = hess > 0
    table = np.where(seen, -g0 / np.where(seen, hess, 1.0), 0.0)
    # (float32 sums over 240k terms: "vanishes" relative to the gradient at 0.)
    g_star = np.asarray(grad(jnp.asarray(table, jnp.float32)))
    assert np.max(np.abs(g_star)) < 1e-3 * np.max(np.abs(g0))
    counts = np.bincount(ids_BxL.ravel(), minlength=size)
    want, sd = np.zeros(size), np.zeros(size)
    r = task.rewards_XxY.astype(np.float64)
    for p in range(n_p):
        for t in range(length):
            level = p * per_prompt + _prefix_ids(np.arange(v ** (t + 1)) * v ** (length - 1 - t),
                                                 np.zeros(v ** (t + 1), int), v, length)[0][:, t]
            vt = vstar[p, ::v ** (length - 1 - t), t]               # one V* per prefix
            block = probs[p].reshape(v ** (t + 1), -1)
            want[level] = vt
            # Conditional s.d. of r given the prefix: the Monte-Carlo error scale of the mean.
            sd[level] = np.sqrt((block * (r[p].reshape(v ** (t + 1), -1) - vt[:, None]) ** 2
                                 ).sum(-1) / block.sum(-1))
    check = counts >= 30
    assert check.sum() > 60          # most prefixes are visited often enough to test
    # (+1e-4: float32 round-off, the whole error for full responses, where sd = 0.)
    z = np.abs(table[check] - want[check]) / (sd[check] / np.sqrt(counts[check]) + 1e-4)
    assert z.max() < 5.0, z.max()
    # Probability-weighted error: FUDGE's minimiser is V* up to Monte-Carlo noise.
    assert np.sqrt(np.mean((table[ids_BxL] - want[ids_BxL]) ** 2)) < 0.01


def test_cdq_fixed_point_is_v_star_exactly():
    """(b) Iterating CD-Q's Bellman target with exact expectations reaches V* (1e-5)."""
    task, probs, vstar = _exact()
    v, length, n_p = task.vocab, task.length, probs.shape[0]
    n_y = v ** length
    prompt_B, codes_B = np.repeat(np.arange(n_p), n_y), np.tile(np.arange(n_y), n_p)
    resp = jnp.asarray(task.responses_YxL[codes_B])
    prompts = jnp.asarray(task.prompts_XxP[prompt_B])
    ones_r, ones_p = jnp.ones(resp.shape, bool), jnp.ones(prompts.shape, bool)
    ids, logp = ps.ref_next_token_logprobs(models.decoder_fns(task.model_cfg), task.ref_params,
                                           prompts, ones_p, resp, ones_r)
    assert ids.shape == (n_p * n_y, length, v)
    np.testing.assert_array_equal(np.asarray(ids[0, 0]), np.arange(v))
    ids_BxL, per_prompt, offsets = _prefix_ids(codes_B, prompt_B, v, length)
    # Prefix id of [y^t, z]: level t+1, index (y^t's index) * v + z. The last position is
    # terminal (its target is the reward), so its children are never read: point them at 0.
    child_BxLxV = np.zeros((len(codes_B), length, v), int)
    for t in range(length - 1):
        child_BxLxV[:, t] = (prompt_B * per_prompt + offsets[t + 1]
                             + codes_B // v ** (length - 1 - t) * v)[:, None] + np.arange(v)
    reward_B = jnp.asarray(task.rewards_XxY[prompt_B, codes_B])
    table = jnp.asarray(np.random.RandomState(0).randn(n_p * per_prompt), jnp.float32)
    for _ in range(length + 1):
        targets = ps.cdq_targets(table[child_BxLxV], logp, ones_r, reward_B)
        table = table.at[ids_BxL].set(targets)
    np.testing.assert_allclose(np.asarray(table[ids_BxL]).reshape(n_p, n_y, length), vstar,
                               atol=1e-5)
    # V* is a fixed point: the CD-Q loss and its gradient vanish there.
    loss = lambda tab: ps.cdq_loss(tab[ids_BxL], tab[child_BxLxV], logp, ones_r, reward_B)
    assert float(loss(table)) < 1e-11
    assert float(jnp.max(jnp.abs(jax.grad(loss)(table)))) < 1e-6


# ------------------------------------------------------------------------------ model paths
VALUE_CFG = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                 max_len=32, heads=("value",))


def _perturbed_value_model(vocab, seed=0):
    cfg = models.ModelConfig(vocab_size=vocab, **VALUE_CFG)
    params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    rs = np.random.RandomState(seed + 1)
    # The value head starts at zero; perturb every weight so the values differ by prefix.
    return cfg, jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + 0.3 * rs.randn(*x.shape), jnp.float32), params)


def _padded_batch():
    prompt = jnp.array([[0, 1, 2], [0, 0, 3]], jnp.int32)
    pmask = jnp.array([[1, 1, 1], [0, 0, 1]], bool)          # left-padded
    resp = jnp.array([[1, 2, 3, 4], [2, 2, 0, 0]], jnp.int32)
    rmask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)    # right-padded
    return prompt, pmask, resp, rmask


def _brute_next_values(cfg, params, prompt, pmask, resp, rmask, ids):
    """V([x, y^t, z]) from the model run on every sequence [x, y^t, z] as its own (right-padded)
    row of one batch; NaN where y_t is masked."""
    b, length, k = ids.shape
    plen = prompt.shape[1]
    rows, masks, where = [], [], []
    for i in range(b):
        for t in range(length):
            if not rmask[i, t]:
                continue
            for j in range(k):
                pad = length - 1 - t
                rows.append(np.concatenate([prompt[i], resp[i, :t + 1], [ids[i, t, j]],
                                            np.zeros(pad, int)]))
                masks.append(np.concatenate([pmask[i], rmask[i, :t + 1], [True],
                                             np.zeros(pad, bool)]))
                where.append((i, t, j))
    apply = jax.jit(lambda p, x, m: models.apply(p, x, cfg, attention_mask_BxT=m).values)
    values = apply(params, jnp.asarray(np.stack(rows)), jnp.asarray(np.stack(masks)))
    out = np.full((b, length, k), np.nan)
    for row, (i, t, j) in enumerate(where):
        out[i, t, j] = float(values[row, plen + t + 1])
    return out


def test_next_token_values_and_cdq_step_match_brute_force():
    cfg, params = _perturbed_value_model(5)
    prompt, pmask, resp, rmask = _padded_batch()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 5, (2, 4, 3)), jnp.int32)
    got = np.asarray(jax.jit(functools.partial(ps.next_token_values, cfg))(
        params, prompt, pmask, resp, rmask, ids))
    want = _brute_next_values(cfg, params, *map(np.asarray, (prompt, pmask, resp, rmask, ids)))
    valid = np.asarray(rmask)
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5)
    # One SGD step of lr 1 moves params by -grad of the brute-force CD-Q loss (stop-gradient on
    # the next values, V read at the response positions).
    logp = jnp.asarray(np.random.RandomState(1).randn(2, 4, 3), jnp.float32)
    reward = jnp.array([0.7, -0.2])
    nv = jnp.asarray(np.nan_to_num(want), jnp.float32)

    def brute_loss(p):
        tokens = jnp.concatenate([prompt, resp], 1)
        mask = jnp.concatenate([pmask, rmask], 1)
        values = models.apply(p, tokens, cfg, attention_mask_BxT=mask).values[:, 3:]
        return ps.cdq_loss(values, nv, logp, rmask, reward)

    step = ps.make_scorer_step(cfg, "cdq", optax.sgd(1.0))
    batch = dict(prompt_BxP=prompt, prompt_mask_BxP=pmask, response_BxL=resp,
                 response_mask_BxL=rmask, final_reward_B=reward, next_ids_BxLxJ=ids,
                 ref_next_logprobs_BxLxJ=logp)
    state, metrics = jax.jit(step)(init_train_state(params, optax.sgd(1.0)), batch)
    loss, grads = jax.jit(jax.value_and_grad(brute_loss))(params)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-4)
    moved = jax.tree.map(lambda a, b: a - b, params, state.params)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-3)
    assert int(state.step) == 1


def test_a_pad_id_past_the_vocabulary_changes_no_value_and_no_step():
    """The sampler may write a pad id past the vocabulary (a tokenizer's added pad token) into
    the responses a CD-Q batch is built from; the tree forward embedded it raw: NaN values in
    the padded row, a NaN loss, and NaN parameters after one step."""
    cfg, params = _perturbed_value_model(5)
    prompt, pmask, resp, rmask = _padded_batch()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 5, (2, 4, 3)), jnp.int32)
    batch = dict(prompt_BxP=prompt, prompt_mask_BxP=pmask, response_BxL=resp,
                 response_mask_BxL=rmask, final_reward_B=jnp.array([0.7, -0.2]),
                 next_ids_BxLxJ=ids,
                 ref_next_logprobs_BxLxJ=jnp.asarray(np.random.RandomState(1).randn(2, 4, 3),
                                                     jnp.float32))
    out = {}
    for pad in (0, cfg.vocab_size):
        b = dict(batch, prompt_BxP=jnp.where(pmask, prompt, pad),
                 response_BxL=jnp.where(rmask, resp, pad))
        values = ps.next_token_values(cfg, params, b["prompt_BxP"], pmask, b["response_BxL"],
                                      rmask, ids)
        step = ps.make_scorer_step(cfg, "cdq", optax.sgd(0.1))
        state, metrics = jax.jit(step)(init_train_state(params, optax.sgd(0.1)), b)
        out[pad] = (np.asarray(values)[np.asarray(rmask)], float(metrics["loss"]), state.params)
    (v0, l0, p0), (v1, l1, p1) = out.values()
    assert np.isfinite(v1).all() and np.isfinite(l1)
    np.testing.assert_allclose(v1, v0, atol=1e-6)
    assert l1 == pytest.approx(l0, rel=1e-6)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_ref_next_token_logprobs_top_k():
    task = et.make_task(0)
    prompt, pmask = jnp.asarray(task.prompts_XxP), jnp.ones(task.prompts_XxP.shape, bool)
    resp = jnp.asarray(task.responses_YxL[[5, 17]])
    fns = models.decoder_fns(task.model_cfg)
    full_ids, full = ps.ref_next_token_logprobs(fns, task.ref_params, prompt, pmask, resp,
                                                jnp.ones(resp.shape, bool))
    ids, top = ps.ref_next_token_logprobs(fns, task.ref_params, prompt, pmask, resp,
                                          jnp.ones(resp.shape, bool), top_k=2)
    want_ids = np.argsort(-np.asarray(full), -1)[..., :2]
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    # the top-k comes from a chunked online logsumexp, the full row from one log_softmax
    np.testing.assert_allclose(np.asarray(top), np.take_along_axis(np.asarray(full), want_ids, -1),
                               atol=1e-6)
    # Entry t is log pi_ref(. | [x, y^t]): teacher-forced sequence log-probs agree one step later.
    logits = models.apply(task.ref_params, jnp.concatenate([prompt, resp], 1),
                          task.model_cfg).logits
    np.testing.assert_allclose(np.asarray(full), np.asarray(jax.nn.log_softmax(logits[:, 2:])),
                               atol=1e-6)
    # A decoder without a linear lm head (logits only) gives the same, whole and top-k.
    plain = fns._replace(lm_kernel=None)
    want = np.asarray(jax.nn.log_softmax(logits[:, 2:]))
    _, whole = ps.ref_next_token_logprobs(plain, task.ref_params, prompt, pmask, resp,
                                          jnp.ones(resp.shape, bool))
    np.testing.assert_allclose(np.asarray(whole), want, atol=1e-6)
    ids, top = ps.ref_next_token_logprobs(plain, task.ref_params, prompt, pmask, resp,
                                          jnp.ones(resp.shape, bool), top_k=2)
    want_ids = np.argsort(-want, -1)[..., :2]
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(top), np.take_along_axis(want, want_ids, -1), atol=1e-6)


# ------------------------------------------------------------------------------ (c) training
def _exact_cd_rewards(task, probs, values_PxYxL, lam, k):
    """Exact E[r] of tokenwise CD (full vocabulary, CD Eq. 6) and of blockwise best-of-k with
    1-token blocks (CD Eq. 7), both with the scorer's values on every prefix, by enumeration."""
    v, length = task.vocab, task.length
    out = {"tokenwise": [], "blockwise": []}
    for p in range(probs.shape[0]):
        for how in out:
            seq = np.ones(1)
            for t in range(length):
                prefix = probs[p].reshape(v ** (t + 1), -1).sum(-1).reshape(v ** t, v)
                ref = prefix / prefix.sum(-1, keepdims=True)                  # pi_ref(z | y^t)
                val = values_PxYxL[p, ::v ** (length - 1 - t), t].reshape(v ** t, v)
                if how == "tokenwise":
                    w = ref * np.exp(lam * (val - val.max(-1, keepdims=True)))
                    q = w / w.sum(-1, keepdims=True)
                else:
                    # Best of k i.i.d. pi_ref draws by value: F(<=z)^k - F(<z)^k in value order.
                    order = np.argsort(val, -1, kind="stable")
                    f = np.take_along_axis(ref, order, -1)
                    le = np.cumsum(f, -1)
                    sel = le ** k - (le - f) ** k
                    q = np.zeros_like(sel)
                    np.put_along_axis(q, order, sel, -1)
                seq = (seq[:, None] * q).reshape(-1)
            out[how].append(np.sum(seq * task.rewards_XxY[p]))
    return {how: float(np.mean(vals)) for how, vals in out.items()}


@pytest.mark.slow
def test_fudge_trained_scorer_tracks_v_star_and_cd_raises_reward():
    """(c) A value model trained by FUDGE on base samples approximates V*; CD with it helps."""
    task, probs, vstar = _exact()
    v, length, n_p = task.vocab, task.length, probs.shape[0]
    cfg = models.ModelConfig(vocab_size=v, **VALUE_CFG)
    steps, batch_size = 400, 256
    opt = optax.adam(optax.cosine_decay_schedule(5e-3, steps, 0.05))
    step = jax.jit(ps.make_scorer_step(cfg, "fudge", opt))
    state = init_train_state(models.init_params(cfg, jax.random.key(1)), opt)
    rs = np.random.RandomState(0)
    cdf = np.cumsum(probs, 1)
    # One left-padding column: the step must read the value model through padded prompts.
    prompt_pad = np.concatenate([np.zeros((n_p, 1), np.int32), task.prompts_XxP], 1)
    pmask = np.concatenate([np.zeros((batch_size, 1), bool),
                            np.ones((batch_size, task.prompts_XxP.shape[1]), bool)], 1)
    first = None
    for _ in range(steps):
        p_idx = rs.randint(0, n_p, batch_size)
        codes = np.minimum((rs.rand(batch_size, 1) > cdf[p_idx]).sum(1), v ** length - 1)
        resp = task.responses_YxL[codes]
        state, metrics = step(state, dict(
            prompt_BxP=prompt_pad[p_idx], prompt_mask_BxP=pmask, response_BxL=resp,
            response_mask_BxL=np.ones(resp.shape, bool),
            final_reward_B=task.rewards_XxY[p_idx, codes]))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first

    scorer = ps.scorer_from_params(cfg, state.params)
    n_y = v ** length
    tokens = jnp.asarray(np.concatenate([np.repeat(task.prompts_XxP, n_y, 0),
                                         np.tile(task.responses_YxL, (n_p, 1))], 1))
    prompt_len = task.prompts_XxP.shape[1]
    values = np.asarray(scorer(tokens, jnp.ones(tokens.shape, bool)))[:, prompt_len:]
    values = values.reshape(n_p, n_y, length)
    # pi_ref-weighted over (prompt, response, position) = CD's learning target L* (spec 2).
    w = np.broadcast_to((probs / n_p)[..., None], vstar.shape)
    mean = np.sum(w * vstar) / w.sum()
    rel_err = np.sqrt(np.sum(w * (values - vstar) ** 2) / np.sum(w * (vstar - mean) ** 2))
    vm = np.sum(w * values) / w.sum()
    corr = np.sum(w * (values - vm) * (vstar - mean)) / np.sqrt(
        np.sum(w * (values - vm) ** 2) * np.sum(w * (vstar - mean) ** 2))
    # A constant scorer has rel_err >= 1 and no correlation; rel_err < 0.6 means the scorer
    # explains > 64% of V*'s variance under pi_ref. Measured: 0.30 / corr 0.96 for this run; over
    # model seeds 1-3 and batch 256 or 512, rel_err 0.26-0.50 and corr 0.87-0.97 (the rare full
    # responses, seen a few times each, carry most of the error).
    assert rel_err < 0.6, rel_err
    assert corr > 0.8, corr

    base = float(np.mean(np.sum(probs * task.rewards_XxY, 1)))
    lam, k = 5.0, 4
    trained = _exact_cd_rewards(task, probs, values, lam, k)
    oracle = _exact_cd_rewards(task, probs, vstar, lam, k)
    for how in ("tokenwise", "blockwise"):
        # The oracle (V*) gain is the reference; the trained scorer must realise a clear share
        # of it (measured over the seeds above: 0.69-0.86 tokenwise, 0.86-0.95 blockwise).
        assert oracle[how] > base + 0.05
        assert trained[how] - base > 0.5 * (oracle[how] - base), (how, trained, oracle, base)

    # The decoders themselves, with the trained scorer, reach the enumerated expected reward.
    n = 3000
    prompt = jnp.asarray(np.repeat(task.prompts_XxP, n, 0))
    pm = jnp.ones(prompt.shape, bool)
    fns = models.decoder_fns(task.model_cfg)
    runs = {
        "tokenwise": jax.jit(lambda r: cd.tokenwise_decode(
            fns, task.ref_params, scorer, prompt, pm, r, lam=lam, top_k=v,
            max_new_tokens=length).tokens_BxL),
        "blockwise": jax.jit(lambda r: cd.blockwise_decode(
            fns, task.ref_params, scorer, prompt, pm, r, num_candidates=k, block_size=1,
            max_new_tokens=length).tokens_BxL)}
    for how, run in runs.items():
        toks = run(jax.random.key(3))
        rewards = np.asarray(et.table_reward_fn(jnp.asarray(task.rewards_XxY),
                                                jnp.repeat(jnp.arange(n_p), n), toks,
                                                None, vocab=v))
        se = rewards.std() / np.sqrt(len(rewards))
        assert abs(rewards.mean() - trained[how]) < 4.5 * se, (how, rewards.mean(), trained)


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_fail_clearly():
    mask = jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match="values_BxT"):
        ps.fudge_loss(jnp.zeros((2, 3, 1)), jnp.zeros(2), mask)
    with pytest.raises(ValueError, match="final_reward_B"):
        ps.fudge_targets(jnp.zeros(3), mask)
    with pytest.raises(ValueError, match="final_reward_B"):
        ps.fudge_targets(jnp.zeros((2, 1)), mask)
    with pytest.raises(ValueError, match="values_BxT vs mask_BxT"):
        ps.fudge_loss(jnp.zeros((2, 4)), jnp.zeros(2), mask)
    with pytest.raises(ValueError, match="next_values_BxTxJ vs ref_next_logprobs_BxTxJ"):
        ps.cdq_targets(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5)), mask, jnp.zeros(2))
    with pytest.raises(ValueError, match="next_values_BxTxJ vs mask_BxT"):
        ps.cdq_targets(jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 4)), mask, jnp.zeros(2))
    with pytest.raises(ValueError, match="ref_next_logprobs_BxTxJ"):
        ps.cdq_targets(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), mask, jnp.zeros(2))
    with pytest.raises(ValueError, match="mask_BxT"):
        ps.terminal_mask(jnp.ones(3, bool))
    cfg = models.ModelConfig(vocab_size=4, **VALUE_CFG)
    with pytest.raises(ValueError, match="unknown prefix-scorer method 'ppo'"):
        ps.make_scorer_step(cfg, "ppo", optax.sgd(0.1))
    with pytest.raises(ValueError, match="reduction"):
        ps.make_scorer_step(cfg, "fudge", optax.sgd(0.1), reduction="mean")
    lm_cfg = models.ModelConfig(vocab_size=4, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="'value' head"):
        ps.make_scorer_step(lm_cfg, "fudge", optax.sgd(0.1))
    with pytest.raises(ValueError, match="'value' head"):
        ps.scorer_from_params(lm_cfg, {})
    step = ps.make_scorer_step(cfg, "cdq", optax.sgd(0.1))
    params = models.init_params(cfg, jax.random.key(0))
    prompt, pmask, resp, rmask = _padded_batch()
    batch = dict(prompt_BxP=prompt, prompt_mask_BxP=pmask, response_BxL=resp,
                 response_mask_BxL=rmask, final_reward_B=jnp.zeros(2))
    with pytest.raises(ValueError, match="missing.*next_ids_BxLxJ"):
        step(init_train_state(params, optax.sgd(0.1)), batch)
    with pytest.raises(ValueError, match="next_ids_BxLxJ vs response_BxL"):
        ps.next_token_values(cfg, params, prompt, pmask, resp, rmask, jnp.zeros((2, 3, 2), int))
    with pytest.raises(ValueError, match="top_k"):
        ps.ref_next_token_logprobs(models.decoder_fns(cfg), params, prompt, pmask, resp, rmask,
                                   top_k=0)
