"""Preference losses (infalign_jax/core/preference_losses.py) against hand values and closed forms."""

import functools
import math

import jax
import numpy as np
import pytest

from infalign_jax.core import preference_losses as P

VARIANTS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def _log1pexp(x):
    return math.log1p(math.exp(x))


# Spec section 7: n -> (beta*_n as printed, (n-1) H_{n-1} as printed, printed decimals).
TABLE = {2: (0.5, 1.0), 3: (0.166667, 3.0), 4: (0.0909091, 5.5), 6: (0.0437956, 11.4167),
         8: (0.0275482, 18.15), 16: (0.0100455, 49.7734), 32: (0.00400498, 124.8446)}


def test_bonbon_beta_closed_forms():
    assert P.bonbon_beta(8) == pytest.approx(0.0275482094, abs=1e-10)   # BoNBoN README value
    for n, (beta, scale) in TABLE.items():
        assert P.bonbon_beta(n) == pytest.approx(beta, rel=2e-6), n
        assert (n - 1) * P.harmonic_number(n - 1) == pytest.approx(scale, abs=6e-5), n
        assert 1 / (2 * P.bonbon_beta(n)) == pytest.approx((n - 1) * P.harmonic_number(n - 1),
                                                            rel=1e-12)
    assert P.harmonic_number(0) == 0 and P.harmonic_number(4) == pytest.approx(25 / 12, 1e-15)


def test_vbon_beta():
    for n, want in [(2, 1.0), (3, 0.5), (4, 1 / 3), (6, 0.2), (8, 1 / 7), (16, 1 / 15),
                    (32, 1 / 31)]:
        assert P.vbon_beta(n) == pytest.approx(want, rel=1e-12)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="n must be"):
            P.vbon_beta(bad)
        with pytest.raises(ValueError, match="n must be"):
            P.bonbon_beta(bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bradley_terry_hand_values(variant):
    rc, rr = np.array([1.0, 0.0, 2.0], np.float32), np.array([0.0, 0.0, 3.0], np.float32)
    loss, m = variant(P.bradley_terry_loss)(rc, rr)
    assert float(loss) == pytest.approx((_log1pexp(-1) + math.log(2) + _log1pexp(1)) / 3, 1e-6)
    assert float(m["accuracy"]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert float(m["reward_gap"]) == pytest.approx(0.0, abs=1e-7)
    # margin 0.5: -log sigmoid(d - 0.5); label smoothing 0.1 mixes in -log sigmoid(-(d - 0.5)).
    loss, _ = variant(functools.partial(P.bradley_terry_loss, margin=0.5, label_smoothing=0.1))(
        rc, rr)
    want = np.mean([0.9 * _log1pexp(-(d - 0.5)) + 0.1 * _log1pexp(d - 0.5) for d in (1, 0, -1)])
    assert float(loss) == pytest.approx(want, 1e-6)
    loss, _ = variant(P.bradley_terry_loss)(rc, rr, np.array([0.0, 1.0, 2.0], np.float32))
    want = np.mean([_log1pexp(-d) for d in (1, -1, -3)])
    assert float(loss) == pytest.approx(want, 1e-6)


def _pairs():
    pw = np.array([-10.0, -4.0, -7.5], np.float32)
    pl = np.array([-12.0, -3.0, -7.0], np.float32)
    rw = np.array([-11.0, -4.0, -8.0], np.float32)
    rl = np.array([-11.5, -4.0, -6.0], np.float32)
    h = (pw - rw) - (pl - rl)   # (1 - (-0.5), 0 - 1, 0.5 - (-1)) = (1.5, -1, 1.5)
    return pw, pl, rw, rl, [1.5, -1.0, 1.5], h


@pytest.mark.parametrize("variant", VARIANTS)
def test_dpo_and_ipo_hand_values(variant):
    pw, pl, rw, rl, h_hand, h = _pairs()
    np.testing.assert_allclose(h, h_hand)
    np.testing.assert_allclose(np.asarray(P.preference_log_ratio(pw, pl, rw, rl)), h_hand)
    beta = 0.5
    loss, m = variant(functools.partial(P.dpo_loss, beta=beta))(pw, pl, rw, rl)
    assert float(loss) == pytest.approx(np.mean([_log1pexp(-beta * x) for x in h_hand]), 1e-6)
    assert float(m["accuracy"]) == pytest.approx(2 / 3)
    assert float(m["h_mean"]) == pytest.approx(2 / 3, 1e-6)
    assert float(m["implicit_reward_margin"]) == pytest.approx(beta * 2 / 3, 1e-6)
    loss, _ = variant(functools.partial(P.dpo_loss, beta=beta, label_smoothing=0.2))(pw, pl, rw, rl)
    want = np.mean([0.8 * _log1pexp(-beta * x) + 0.2 * _log1pexp(beta * x) for x in h_hand])
    assert float(loss) == pytest.approx(want, 1e-6)
    loss, _ = variant(functools.partial(P.ipo_loss, beta=beta))(pw, pl, rw, rl)
    assert float(loss) == pytest.approx(np.mean([(x - 1.0) ** 2 for x in h_hand]), 1e-6)


def test_dpo_gradient_and_reference_is_constant():
    pw, pl, rw, rl, h_hand, _ = _pairs()
    beta = 0.5
    grads = jax.grad(lambda *a: P.dpo_loss(*a, beta=beta)[0], argnums=(0, 1, 2, 3))(pw, pl, rw, rl)
    # d/dh of -log sigmoid(beta h) = -beta sigmoid(-beta h); h rises with log pi(y_w).
    want = np.array([-beta / (1 + math.exp(beta * x)) for x in h_hand]) / 3
    np.testing.assert_allclose(np.asarray(grads[0]), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[1]), -want, rtol=1e-5)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum_at_half_inverse_beta(beta):
    target = 1 / (2 * beta)
    zeros = np.zeros(1, np.float32)

    def loss_of_h(h):
        return P.ipo_loss(np.reshape(h, (1,)), zeros, zeros, zeros, beta)[0]

    assert float(jax.grad(loss_of_h)(np.float32(target))) == pytest.approx(0.0, abs=1e-5)
    assert float(loss_of_h(np.float32(target))) == pytest.approx(0.0, abs=1e-9)
    assert float(jax.grad(loss_of_h)(np.float32(target + 0.3))) > 0
    assert float(jax.grad(loss_of_h)(np.float32(target - 0.3))) < 0


@pytest.mark.parametrize("n", [2, 4, 8])
def test_bonbon_identity_by_monte_carlo(n):
    """E[h(best, worst)] = (n-1) H_{n-1} = 1/(2 beta*_n) for pi_n = BoN_n(pi_0) (spec 4).

    Calibrated space: the n draws from pi_0 have u ~ Unif(0, 1) and, for the exact BoN policy,
    log pi_n / pi_0 = log n + (n-1) log u. The base log-probs are arbitrary (they cancel).
    """
    rng = np.random.default_rng(n)
    trials = 100_000
    u = rng.uniform(size=(trials, n))
    best, worst = u.max(1), u.min(1)
    log_pi0_b = rng.normal(-30, 5, trials)
    log_pi0_w = rng.normal(-30, 5, trials)
    log_pin_b = log_pi0_b + math.log(n) + (n - 1) * np.log(best)
    log_pin_w = log_pi0_w + math.log(n) + (n - 1) * np.log(worst)
    h = np.asarray(P.preference_log_ratio(*[np.asarray(a, np.float32) for a in
                                            (log_pin_b, log_pin_w, log_pi0_b, log_pi0_w)]),
                   np.float64)
    h_direct = (n - 1) * (np.log(best) - np.log(worst))   # float64 reference for the MC error
    se = h_direct.std() / math.sqrt(trials)
    target = (n - 1) * P.harmonic_number(n - 1)
    assert abs(h_direct.mean() - target) < 4 * se, (h_direct.mean(), target, se)
    assert abs(h.mean() - h_direct.mean()) < 1e-3 * target    # float32 cancellation only
    assert 1 / (2 * P.bonbon_beta(n)) == pytest.approx(target, rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bonbon_loss_hand_values(variant):
    pw, pl, rw, rl, h_hand, _ = _pairs()
    n, alpha = 8, 0.25
    beta = P.bonbon_beta(n)
    fn = variant(functools.partial(P.bonbon_loss, n=n, alpha=alpha))
    loss, m = fn(pw, pl, rw, rl)
    nll = -float(np.mean(pw))
    ipo = np.mean([(x - 1 / (2 * beta)) ** 2 for x in h_hand])
    assert float(loss) == pytest.approx(alpha * nll + (1 - alpha) * ipo, 1e-6)
    assert float(m["nll"]) == pytest.approx(nll, 1e-6)
    assert float(m["pref"]) == pytest.approx(ipo, 1e-6)
    assert float(m["beta"]) == pytest.approx(beta, 1e-7)
    # The logistic form their released code computes.
    loss, _ = variant(functools.partial(P.bonbon_loss, n=n, alpha=alpha, variant="dpo"))(
        pw, pl, rw, rl)
    dpo = np.mean([_log1pexp(-beta * x) for x in h_hand])
    assert float(loss) == pytest.approx(alpha * nll + (1 - alpha) * dpo, 1e-6)
    # An explicit beta overrides beta*_n; alpha = 1 is pure SFT on the best sample.
    loss, _ = variant(functools.partial(P.bonbon_loss, n=n, alpha=0.0, beta=0.5))(pw, pl, rw, rl)
    assert float(loss) == pytest.approx(np.mean([(x - 1) ** 2 for x in h_hand]), 1e-6)
    loss, _ = variant(functools.partial(P.bonbon_loss, n=n, alpha=1.0))(pw, pl, rw, rl)
    assert float(loss) == pytest.approx(nll, 1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_pair_mask_averages_over_the_pairs_it_keeps(variant):
    """Masked rows leave the loss, its gradient and its metrics: equal to the loss on the kept
    rows alone (an independent call), and 0 when none is kept."""
    pw, pl, rw, rl, h_hand, _ = _pairs()
    keep = np.array([1, 0, 1], bool)
    for fn in (functools.partial(P.dpo_loss, beta=0.5), functools.partial(P.ipo_loss, beta=0.5)):
        loss, m = variant(lambda *a, fn=fn: fn(*a, pair_mask_B=keep))(pw, pl, rw, rl)
        sub_loss, sub_m = fn(pw[keep], pl[keep], rw[keep], rl[keep])
        assert float(loss) == pytest.approx(float(sub_loss), 1e-6)
        for k in ("accuracy", "h_mean"):
            assert float(m[k]) == pytest.approx(float(sub_m[k]), 1e-6), k
        g = jax.grad(lambda x, fn=fn: fn(x, pl, rw, rl, pair_mask_B=keep)[0])(pw)
        assert float(g[1]) == 0.0
    # BoNBoN: L_pref over the kept pairs, the NLL over every best response
    loss, m = variant(lambda *a: P.bonbon_loss(*a, n=4, alpha=0.25, pair_mask_B=keep))(
        pw, pl, rw, rl)
    sub_pref = P.ipo_loss(pw[keep], pl[keep], rw[keep], rl[keep], beta=P.bonbon_beta(4))[0]
    want = 0.25 * -np.mean(pw) + 0.75 * float(sub_pref)
    assert float(loss) == pytest.approx(want, 1e-6)
    assert float(m["pref"]) == pytest.approx(float(sub_pref), 1e-6)
    assert float(m["tied"]) == pytest.approx(1 / 3)
    loss, m = P.ipo_loss(pw, pl, rw, rl, beta=0.5, pair_mask_B=np.zeros(3, bool))
    assert float(loss) == 0.0 and float(m["accuracy"]) == 0.0
    with pytest.raises(ValueError, match="pair_mask_B"):
        P.dpo_loss(pw, pl, rw, rl, beta=0.5, pair_mask_B=keep[:2])


def test_bad_inputs_raise_value_errors():
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="r_rejected_B"):
        P.bradley_terry_loss(x, np.zeros(4))
    with pytest.raises(ValueError, match="r_chosen_B"):
        P.bradley_terry_loss(np.zeros((3, 1)), x)
    with pytest.raises(ValueError, match="margin"):
        P.bradley_terry_loss(x, x, np.zeros(4))
    with pytest.raises(ValueError, match="label_smoothing"):
        P.dpo_loss(x, x, x, x, 0.1, label_smoothing=0.7)
    # At 0.5 a label says nothing: the loss is the same for either label order (1.0546 and
    # 0.7241 in the review's case) and pulls every gap to 0, so it is refused like label_noise.
    for loss in (lambda: P.dpo_loss(x, x, x, x, 0.1, label_smoothing=0.5),
                 lambda: P.bradley_terry_loss(x, x, label_smoothing=0.5)):
        with pytest.raises(ValueError, match=r"label_smoothing must be < 0.5, got 0.5"):
            loss()
    for loss_fn in (P.ipo_loss, P.dpo_loss):   # beta = 0: no KL anchor (DPO's loss is flat)
        with pytest.raises(ValueError, match="beta must be > 0"):
            loss_fn(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="ref_rejected_logp_B"):
        P.dpo_loss(x, x, x, np.zeros(2), 0.1)
    with pytest.raises(ValueError, match="variant"):
        P.bonbon_loss(x, x, x, x, 8, 0.1, variant="kto")
    with pytest.raises(ValueError, match="alpha"):
        P.bonbon_loss(x, x, x, x, 8, 1.5)
    with pytest.raises(ValueError, match="n must be"):
        P.bonbon_loss(x, x, x, x, 1, 0.1)
