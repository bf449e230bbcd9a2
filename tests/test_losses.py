"""KL estimators (infalign_jax/core/kl.py) and policy-gradient losses (core/losses.py) vs numpy and hand values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.core import kl as K
from infalign_jax.core import losses as L

B, T, V = 5, 7, 6
VARIANTS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def _mask(rng, b=B, t=T):
    """Response masks of varied lengths (one empty row, one full row) with a random start."""
    mask = np.zeros((b, t), bool)
    for i in range(b):
        start = rng.integers(0, 3)
        length = 0 if i == 0 else (t - start if i == 1 else rng.integers(1, t - start + 1))
        mask[i, start:start + length] = True
    return mask


def _logps(seed):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, (B, T))).astype(np.float32)
    ref = np.log(rng.uniform(0.05, 1.0, (B, T))).astype(np.float32)
    return rng, logp, ref, _mask(rng)


def _np_masked_mean(x, m):
    return float((x * m).sum() / max(m.sum(), 1))


# ----------------------------------------------------------------------------- KL estimators
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_estimators_match_numpy(variant, seed):
    _, logp, ref, mask = _logps(seed)
    d = logp.astype(np.float64) - ref
    expected = {"k1": d, "k2": 0.5 * d ** 2, "k3": np.exp(-d) - 1 + d}
    for name, want in expected.items():
        got = variant(functools.partial(K.kl_per_token, name))(logp, ref, mask)
        np.testing.assert_allclose(np.asarray(got), np.where(mask, want, 0), rtol=1e-5, atol=1e-6)
        got_nomask = variant(K.KL_ESTIMATORS[name])(logp, ref)
        np.testing.assert_allclose(np.asarray(got_nomask), want, rtol=1e-5, atol=1e-6)
        assert got.dtype == jnp.float32


def test_k3_nonnegative_and_zero_for_identical_policies():
    rng = np.random.default_rng(3)
    logp = rng.normal(0, 8, (64, 32)).astype(np.float32)
    ref = rng.normal(0, 8, (64, 32)).astype(np.float32)
    k3 = np.asarray(K.kl_k3(logp, ref))
    assert np.all(k3 >= 0) and np.all(np.isfinite(k3))
    tiny = (logp[:, :1] + np.float32(1e-6) * rng.normal(size=(64, 1))).astype(np.float32)
    assert np.all(np.asarray(K.kl_k3(tiny, logp[:, :1])) >= 0)
    for f in (K.kl_k1, K.kl_k2, K.kl_k3):
        assert np.all(np.asarray(f(logp, logp)) == 0.0)


def test_k1_and_k3_are_unbiased_for_exact_kl():
    """Monte Carlo on a 5-way categorical: E_{y~p}[k] = KL(p || q) within 4 standard errors."""
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.3, 0.1])
    exact = float(np.sum(p * np.log(p / q)))
    y = rng.choice(5, size=(200, 1000), p=p)
    logp, logq = np.log(p)[y].astype(np.float32), np.log(q)[y].astype(np.float32)
    for f in (K.kl_k1, K.kl_k3):
        samples = np.asarray(f(logp, logq), np.float64)
        se = samples.std() / np.sqrt(samples.size)
        assert abs(samples.mean() - exact) < 4 * se, (f.__name__, samples.mean(), exact, se)
    # k2 is biased here (it is only second-order accurate): make sure the test could tell.
    k2 = np.asarray(K.kl_k2(logp, logq), np.float64)
    assert abs(k2.mean() - exact) > 4 * k2.std() / np.sqrt(k2.size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_kl_and_entropy_from_logits_match_numpy(variant):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    ref_logits = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    mask = _mask(rng)

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
            -1, keepdims=True)

    lp, lq = log_softmax(logits), log_softmax(ref_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    ent = -(np.exp(lp) * lp).sum(-1)
    got = variant(K.kl_from_logits)(logits, ref_logits, mask)
    np.testing.assert_allclose(np.asarray(got), np.where(mask, kl, 0), rtol=1e-5, atol=1e-6)
    got = variant(K.entropy_from_logits)(logits, mask)
    np.testing.assert_allclose(np.asarray(got), np.where(mask, ent, 0), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(K.kl_from_logits(logits, logits)) == 0)
    np.testing.assert_allclose(np.asarray(K.entropy_from_logits(np.zeros((1, 2, V)))), np.log(V),
                               rtol=1e-6)


def test_exact_kl_and_entropy_gradients_with_masked_tokens():
    """A -inf logit (a token ruled out in both) gets gradient 0, and the others' gradients are
    those of the vocabulary without it: finite, not NaN."""
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    ref = rng.normal(size=(2, 3, 5)).astype(np.float32)
    masked, ref_masked = logits.copy(), ref.copy()
    masked[..., 2] = ref_masked[..., 2] = -np.inf
    kept = [0, 1, 3, 4]
    for fn in (lambda x, q: K.kl_from_logits(x, q).sum(),
               lambda x, q: K.entropy_from_logits(x).sum()):
        got = np.asarray(jax.grad(fn)(masked, ref_masked))
        want = np.asarray(jax.grad(fn)(logits[..., kept], ref[..., kept]))
        np.testing.assert_array_equal(got[..., 2], 0.0)
        np.testing.assert_allclose(got[..., kept], want, rtol=1e-5, atol=1e-7)


def test_exact_kl_with_zero_probabilities():
    neg = -np.inf
    logits = np.array([[[0.0, 0.0, neg]]], np.float32)      # p = (1/2, 1/2, 0)
    ref = np.array([[[0.0, neg, neg]]], np.float32)         # q = (1, 0, 0)
    assert float(K.kl_from_logits(ref, logits)[0, 0]) == pytest.approx(np.log(2), 1e-6)
    assert np.isposinf(float(K.kl_from_logits(logits, ref)[0, 0]))
    assert float(K.entropy_from_logits(logits)[0, 0]) == pytest.approx(np.log(2), 1e-6)


def test_masked_reductions():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = _mask(rng)
    x_bad = np.where(mask, x, np.nan).astype(np.float32)   # garbage where masked
    assert float(L.masked_sum(x_bad, mask)) == pytest.approx(float((x * mask).sum()), 1e-5)
    assert float(L.reduce_tokens(x_bad, mask, "token")) == pytest.approx(_np_masked_mean(x, mask),
                                                                         1e-5)
    rows = [x[i][mask[i]].mean() for i in range(B) if mask[i].any()]
    assert float(L.reduce_tokens(x_bad, mask, "sequence")) == pytest.approx(np.mean(rows), 1e-5)
    sums = [x[i][mask[i]].sum() for i in range(B)]
    assert float(L.reduce_tokens(x_bad, mask, "sequence_sum")) == pytest.approx(np.mean(sums),
                                                                                1e-5)
    empty = np.zeros((B, T), bool)
    for red in L.REDUCTIONS:
        assert float(L.reduce_tokens(x_bad, empty, red)) == 0.0


# ----------------------------------------------------------------------------- PPO
def _np_ppo(logp, old, adv, mask, eps, reduction):
    ratio = np.exp(logp.astype(np.float64) - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    if reduction == "token":
        return _np_masked_mean(per, mask)
    if reduction == "sequence_sum":
        return np.sum([per[i][mask[i]].sum() for i in range(len(mask))]) / len(mask)
    return np.mean([per[i][mask[i]].mean() for i in range(len(mask)) if mask[i].any()])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", L.REDUCTIONS)
def test_ppo_loss_value_and_metrics_match_numpy(variant, reduction):
    rng, old, _, mask = _logps(6)
    logp = (old + rng.normal(0, 0.3, old.shape)).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    fn = variant(functools.partial(L.ppo_policy_loss, clip_eps=0.2, reduction=reduction))
    loss, metrics = fn(logp, old, adv, mask)
    assert float(loss) == pytest.approx(_np_ppo(logp, old, adv, mask, 0.2, reduction), rel=1e-5)
    d = logp.astype(np.float64) - old
    assert float(metrics["clip_fraction"]) == pytest.approx(
        _np_masked_mean(np.abs(np.exp(d) - 1) > 0.2, mask), abs=1e-6)
    assert float(metrics["approx_kl"]) == pytest.approx(
        _np_masked_mean(np.exp(d) - 1 - d, mask), rel=1e-4)
    # Per-sequence advantages broadcast over tokens.
    adv_B = adv[:, 0]
    loss_b, _ = fn(logp, old, adv_B, mask)
    loss_bt, _ = fn(logp, old, np.repeat(adv_B[:, None], T, 1), mask)
    assert float(loss_b) == pytest.approx(float(loss_bt), rel=1e-6)


@pytest.mark.parametrize("reduction", L.REDUCTIONS)
def test_ppo_gradient_at_ratio_one_is_policy_gradient(reduction):
    rng, old, _, mask = _logps(7)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    grad = jax.grad(lambda lp: L.ppo_policy_loss(lp, old, adv, mask, 0.2, reduction)[0])(old)
    # Hand-derived: d/dlogp of reduce(-A logp) is -A m / (token count), per the reduction.
    if reduction == "token":
        weight = mask / mask.sum()
    elif reduction == "sequence_sum":
        weight = mask / B   # every token of every sequence counts once: sum_t A_t grad log pi
    else:
        n_rows = mask.any(1).sum()
        weight = mask / np.maximum(mask.sum(1, keepdims=True), 1) / n_rows
    np.testing.assert_allclose(np.asarray(grad), -adv * weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adv, ratio, expect_zero", [
    (1.0, 1.5, True),     # A > 0, ratio already above 1 + eps: no push further up
    (1.0, 0.5, False),    # A > 0, ratio below 1 - eps: still pushed up
    (-1.0, 0.5, True),    # A < 0, ratio already below 1 - eps: no push further down
    (-1.0, 1.5, False),   # A < 0, ratio above 1 + eps: still pushed down
    (1.0, 1.1, False),    # inside the trust region
])
def test_ppo_clipping_zeroes_gradient_in_the_right_direction(adv, ratio, expect_zero):
    old = np.zeros((1, 1), np.float32)
    logp = np.full((1, 1), np.log(ratio), np.float32)
    grad = jax.grad(lambda lp: L.ppo_policy_loss(lp, old, np.array([[adv]], np.float32),
                                                 np.ones((1, 1), bool), 0.2)[0])(logp)
    # d/dlogp (-A exp(logp - old)) = -A ratio where unclipped.
    expected = 0.0 if expect_zero else -adv * ratio
    assert float(grad[0, 0]) == pytest.approx(expected, abs=1e-6)


def test_ppo_ignores_tokens_after_eos():
    rng, old, _, mask = _logps(8)
    logp = (old + rng.normal(0, 0.5, old.shape)).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)

    def loss(lp, o, a):
        return L.ppo_policy_loss(lp, o, a, mask, 0.2)[0]

    base, base_grad = jax.value_and_grad(loss)(logp, old, adv)
    junk = np.where(mask, 0, np.float32(1e4) * rng.normal(size=mask.shape)).astype(np.float32)
    for perturbed in [(logp + junk, old, adv), (logp, old - junk, adv), (logp, old, adv + junk),
                      (np.where(mask, logp, np.inf), np.where(mask, old, np.nan), adv)]:
        val, g = jax.value_and_grad(loss)(*[np.asarray(p, np.float32) for p in perturbed])
        assert float(val) == float(base)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(base_grad))
    assert np.all(np.asarray(base_grad)[~mask] == 0)


def test_ppo_reduces_over_tokens_by_default_and_advantages_get_no_gradient():
    rng, old, _, mask = _logps(11)
    logp = (old + rng.normal(0, 0.3, old.shape)).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    loss, _ = L.ppo_policy_loss(logp, old, adv, mask)
    assert float(loss) == pytest.approx(_np_ppo(logp, old, adv, mask, 0.2, "token"), rel=1e-5)
    # Advantages are targets (a critic's or a reward's output): no gradient flows into them.
    for a in (adv, adv[:, 0]):
        g = jax.grad(lambda a_: L.ppo_policy_loss(logp, old, a_, mask)[0])(a)
        assert np.all(np.asarray(g) == 0)


# ----------------------------------------------------------------------------- value, REINFORCE, KL
@pytest.mark.parametrize("variant", VARIANTS)
def test_value_loss_matches_numpy(variant):
    rng = np.random.default_rng(9)
    mask = _mask(rng)
    old = rng.normal(size=(B, T)).astype(np.float32)
    values = (old + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    returns = rng.normal(size=(B, T)).astype(np.float32)
    loss, metrics = variant(L.value_loss)(values, old, returns, mask, 0.2)
    clipped_v = old + np.clip(values - old, -0.2, 0.2)
    plain, clipped = 0.5 * (values - returns) ** 2, 0.5 * (clipped_v - returns) ** 2
    assert float(loss) == pytest.approx(_np_masked_mean(np.maximum(plain, clipped), mask), 1e-5)
    assert float(metrics["clip_fraction"]) == pytest.approx(_np_masked_mean(clipped > plain, mask))
    loss, _ = variant(functools.partial(L.value_loss, clip_eps=None))(values, old, returns, mask)
    assert float(loss) == pytest.approx(_np_masked_mean(plain, mask), 1e-5)
    # Masked positions' values (a critic's output after EOS, even NaN / inf) change neither the
    # loss nor its gradient.
    grad = jax.value_and_grad(lambda v, o, r: L.value_loss(v, o, r, mask, 0.2)[0])
    base, base_grad = grad(values, old, returns)
    for junk in (np.nan, np.inf):
        bad = [np.where(mask, x, np.float32(junk)) for x in (values, old, returns)]
        val, g = grad(*bad)
        assert float(val) == float(base)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(base_grad))


@pytest.mark.parametrize("variant", VARIANTS)
def test_reinforce_loss_value_and_gradient(variant):
    rng, logp, _, mask = _logps(10)
    adv = rng.normal(size=(B,)).astype(np.float32)
    loss = variant(L.reinforce_loss)(logp, mask, adv)
    assert float(loss) == pytest.approx(float(np.mean(-adv * (logp * mask).sum(1))), rel=1e-5)
    grad = jax.grad(L.reinforce_loss)(logp, mask, adv)
    np.testing.assert_allclose(np.asarray(grad), -adv[:, None] * mask / B, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kl_penalty_loss_value_and_gradient(variant):
    _, logp, ref, mask = _logps(11)
    beta = 0.3
    d = logp.astype(np.float64) - ref
    fn = variant(functools.partial(K.kl_penalty_loss, beta=beta))
    assert float(fn(logp, ref, mask)) == pytest.approx(
        beta * _np_masked_mean(np.exp(-d) - 1 + d, mask), rel=1e-5)
    grad = jax.grad(lambda lp: K.kl_penalty_loss(lp, ref, mask, beta))(logp)
    np.testing.assert_allclose(np.asarray(grad), beta * (1 - np.exp(-d)) * mask / mask.sum(),
                               rtol=1e-5, atol=1e-8)
    # pi_ref gets no gradient: with ref = lp + 0.4 the ratio is constant, so a gradient through
    # ref would cancel the policy's to 0; stopped, it is beta (1 - e^{0.4}) per counted token.
    grad = jax.grad(lambda lp: K.kl_penalty_loss(lp, lp + 0.4, mask, beta))(logp)
    np.testing.assert_allclose(np.asarray(grad), beta * (1 - np.exp(0.4)) * mask / mask.sum(),
                               rtol=1e-5, atol=1e-8)
    k1 = K.kl_penalty_loss(logp, ref, mask, beta, estimator="k1", reduction="sequence")
    rows = [d[i][mask[i]].mean() for i in range(B) if mask[i].any()]
    assert float(k1) == pytest.approx(beta * np.mean(rows), rel=1e-5)


def test_bad_inputs_raise_value_errors():
    x = np.zeros((B, T), np.float32)
    with pytest.raises(ValueError, match="logp_BxT"):
        K.kl_k1(np.zeros(T), np.zeros(T))
    with pytest.raises(ValueError, match="logp_BxT vs ref_logp_BxT"):
        K.kl_k3(x, np.zeros((B, T + 1)))
    with pytest.raises(ValueError, match="mask_BxT"):
        K.kl_k3(x, x, np.ones((B, T + 1)))
    with pytest.raises(ValueError, match="known"):
        K.kl_per_token("k4", x, x)
    with pytest.raises(ValueError, match="reduction"):
        L.ppo_policy_loss(x, x, x, x > -1, reduction="batch")
    with pytest.raises(ValueError, match="clip_eps"):
        L.ppo_policy_loss(x, x, x, x > -1, clip_eps=0.0)
    with pytest.raises(ValueError, match="advantages"):
        L.ppo_policy_loss(x, x, np.zeros((B, T, 1)), x > -1)
    with pytest.raises(ValueError, match="beta"):
        K.kl_penalty_loss(x, x, x > -1, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        K.kl_penalty_loss(x, x, x > -1, beta=np.float32(-1.0))
    with pytest.raises(ValueError, match="beta must be a scalar"):
        K.kl_penalty_loss(x, x, x > -1, beta=np.ones(2))
    with pytest.raises(ValueError, match="advantages_B"):
        L.reinforce_loss(x, x > -1, np.zeros(B + 1))


# --------------------------------------------------------------------------- KL in the loss
def _tabular_policy(theta, ref_logits, vocab, length, eos):
    """Every response of a tabular autoregressive policy (next-token logits indexed by prefix),
    with EOS ending a response early: (tokens_YxL, mask_YxL, logp_YxL, ref_logp_YxL)."""
    import itertools
    rows = []
    for k in range(1, length + 1):
        for head in itertools.product([v for v in range(vocab) if v != eos], repeat=k - 1):
            rows.append(list(head) + [eos] + [0] * (length - k))
    rows += [list(r) for r in itertools.product([v for v in range(vocab) if v != eos],
                                                 repeat=length)]
    tokens = np.array(rows, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, r in enumerate(rows):
        n = r.index(eos) + 1 if eos in r else length
        mask[i, :n] = True
    # prefix id: position t and the tokens before it (base vocab), one row of logits each
    prefix = np.zeros(tokens.shape, np.int32)
    for i, r in enumerate(rows):
        for t in range(length):
            prefix[i, t] = sum(r[j] * vocab ** j for j in range(t)) + t * vocab ** length

    def logps(logits):
        lp = jax.nn.log_softmax(logits[prefix], axis=-1)
        return jnp.where(mask, jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0], 0.0)

    return tokens, mask, logps(theta), logps(ref_logits), logps


def test_kl_score_function_loss_has_the_sequence_kl_gradient():
    """E_{y~pi}[grad surrogate] = grad KL(pi || pi_ref) exactly (enumeration, variable lengths,
    with and without a baseline); the per-token k3 and k2 penalties have other gradients."""
    vocab, length, eos = 3, 3, 2
    rng = np.random.default_rng(0)
    n_prefix = length * vocab ** length + vocab ** length
    theta = jnp.asarray(rng.normal(0, 1.0, (n_prefix, vocab)), jnp.float32)
    ref_logits = jnp.asarray(rng.normal(0, 1.0, (n_prefix, vocab)), jnp.float32)
    _, mask, _, ref_lp, logps = _tabular_policy(theta, ref_logits, vocab, length, eos)

    def seq_kl(th):
        lp = logps(th)
        p = jnp.exp(jnp.sum(lp, -1))
        return jnp.sum(p * jnp.sum(lp - ref_lp, -1))

    want = np.asarray(jax.grad(seq_kl)(theta), np.float64)
    probs = np.exp(np.sum(np.asarray(logps(theta), np.float64), -1))
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    old = jax.lax.stop_gradient(logps(theta))

    def expected_grad(loss_per_sample):
        # sum_y pi(y) grad loss(y), each sample's loss a scalar function of theta
        return np.asarray(jax.grad(lambda th: jnp.sum(jnp.asarray(probs, jnp.float32)
                                                      * loss_per_sample(th)))(theta), np.float64)

    def surrogate(baseline):
        def per_sample(th):
            lp = logps(th)
            return jnp.stack([K.kl_score_function_loss(lp[i:i + 1], old[i:i + 1],
                                                       ref_lp[i:i + 1], mask[i:i + 1],
                                                       None if baseline is None
                                                       else jnp.full((1,), baseline))
                              for i in range(lp.shape[0])])
        return per_sample

    for baseline in (None, 0.7):
        got = expected_grad(surrogate(baseline))
        np.testing.assert_allclose(got, want, atol=2e-5)
    # Any constant baseline leaves the expectation alone; the sign convention shows in the value:
    # at old = current (rho = 1) it is mean_b sum_t m_bt (G_bt - b_b), G the KL-to-go.
    lp, msk = np.asarray(old), np.asarray(mask)
    d = np.where(msk, lp - np.asarray(ref_lp), 0.0)
    to_go = np.cumsum(d[:, ::-1], 1)[:, ::-1]
    b = np.linspace(-1.0, 1.0, lp.shape[0]).astype(np.float32)
    got = K.kl_score_function_loss(lp, lp, ref_lp, msk, b)
    assert float(got) == pytest.approx(np.sum(msk * (to_go - b[:, None])) / lp.shape[0], rel=1e-5)
    # Per-token penalties are not the sequence-KL gradient (the bug this replaces).
    for est in ("k3", "k2"):
        per_tok = expected_grad(lambda th: jnp.sum(
            K.kl_per_token(est, logps(th), ref_lp, mask), -1))
        assert np.max(np.abs(per_tok - want)) > 1e-2, est


def test_kl_score_function_loss_ignores_masked_positions():
    """Garbage after EOS (NaN, inf) changes neither the surrogate nor its gradient."""
    rng, logp, ref, mask = _logps(12)
    old = (logp + rng.normal(0, 0.2, logp.shape)).astype(np.float32)
    loss = jax.value_and_grad(lambda lp, o, r: K.kl_score_function_loss(lp, o, r, mask))
    base, base_grad = loss(logp, old, ref)
    assert np.isfinite(float(base)) and np.all(np.asarray(base_grad)[~mask] == 0)
    for junk in (np.nan, np.inf, -np.inf):
        val, g = loss(*[np.where(mask, x, np.float32(junk)) for x in (logp, old, ref)])
        assert float(val) == float(base)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(base_grad))


def test_ppo_approx_kl_is_kl_of_the_old_policy_from_the_new_under_the_old_samples():
    # Samples whose empirical distribution is pi_old exactly: outcomes 0, 0, 1, 2 of
    # pi_old = (1/2, 1/4, 1/4). The masked mean over them is then E_old[.] itself, so an unbiased
    # estimator of KL(pi_old || pi_theta) must equal it.
    old_p = np.array([0.5, 0.25, 0.25])
    new_p = np.array([0.2, 0.3, 0.5])
    outcomes = np.array([0, 0, 1, 2])
    logp = np.log(new_p[outcomes])[None].astype(np.float32)
    old = np.log(old_p[outcomes])[None].astype(np.float32)
    _, metrics = L.ppo_policy_loss(logp, old, np.zeros((1, 4), np.float32),
                                   np.ones((1, 4), bool), clip_eps=0.2)
    kl_old_new = float(np.sum(old_p * np.log(old_p / new_p)))
    assert float(metrics["approx_kl"]) == pytest.approx(kl_old_new, rel=1e-5)
