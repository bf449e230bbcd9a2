"""Evaluation maths (infalign_jax/analysis/evaluation.py) against brute force, closed forms and numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from infalign_jax.analysis import evaluation as ev
from infalign_jax.core import kl as K

# ------------------------------------------------------------------ plug-in win rates


def _brute_force(pol, ref, n, procedure, against):
    """Enumerate every n-tuple (with replacement) of policy samples and m-tuple of reference ones."""
    pick = max if procedure == "bon" else min
    m = n if against == "transformed" else 1
    xs = [pick(t) for t in itertools.product(pol, repeat=n)]
    ys = [pick(t) for t in itertools.product(ref, repeat=m)]
    return np.mean([(x > y) + 0.5 * (x == y) for x in xs for y in ys])


TIED_CASES = [
    ([1.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 2.0]),
    ([2.0, 2.0, 2.0, 5.0], [2.0, 5.0, 5.0, 1.0]),
    ([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.1, 0.9]),
    ([3.0, 1.0, 4.0, 1.0], [1.0, 5.0, 9.0, 2.0]),
]


@pytest.mark.parametrize("procedure", ["bon", "won"])
@pytest.mark.parametrize("against", ["transformed", "base"])
def test_plugin_matches_brute_force_enumeration_with_ties(procedure, against):
    pol = np.array([c[0] for c in TIED_CASES])
    ref = np.array([c[1] for c in TIED_CASES])
    got = ev.plugin_win_rates(pol, ref, [1, 2, 3], procedure, against)
    assert got.shape == (len(TIED_CASES), 3)
    for b, (p, r) in enumerate(TIED_CASES):
        for g, n in enumerate((1, 2, 3)):
            assert got[b, g] == pytest.approx(_brute_force(p, r, n, procedure, against), abs=1e-12)


@pytest.mark.parametrize("procedure", ["bon", "won"])
@pytest.mark.parametrize("against", ["transformed", "base"])
def test_plugin_with_masks_and_n_larger_than_m(procedure, against):
    # Masked samples are not part of the empirical distribution; their values must not matter.
    pol = np.array([[1.0, 7.0, 1.0, np.nan], [4.0, 0.0, 2.0, 2.0]])
    pol_valid = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], bool)
    ref = np.array([[1.0, 0.0, -3.0], [2.0, 9.0, 2.0]])
    ref_valid = np.array([[1, 1, 0], [1, 0, 1]], bool)
    ns = [1, 2, 5]  # n = 5 > M: defined, since draws are with replacement
    got = ev.plugin_win_rates(pol, ref, ns, procedure, against, pol_valid, ref_valid)
    for b in range(2):
        p, r = pol[b][pol_valid[b]].tolist(), ref[b][ref_valid[b]].tolist()
        for g, n in enumerate(ns):
            assert got[b, g] == pytest.approx(_brute_force(p, r, n, procedure, against), abs=1e-12)


@pytest.mark.parametrize("procedure", ["bon", "won"])
def test_policy_equal_to_base_gives_one_half_for_every_n(procedure):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, (20, 12)).astype(float)  # heavy ties
    valid = rng.random((20, 12)) < 0.8
    valid[:, 0] = True
    ns = [1, 2, 3, 8, 32, 100]
    got = ev.plugin_win_rates(scores, scores, ns, procedure, "transformed", valid, valid)
    np.testing.assert_allclose(got, 0.5, atol=1e-12)
    # Swapping the sides gives the complement, for any pair of distributions.
    other = rng.integers(0, 5, (20, 7)).astype(float)
    forward = ev.plugin_win_rates(scores, other, ns, procedure, "transformed", valid)
    backward = ev.plugin_win_rates(other, scores, ns, procedure, "transformed", None, valid)
    np.testing.assert_allclose(forward + backward, 1.0, atol=1e-12)


def test_plugin_matches_monte_carlo_draws_of_n_tuples():
    pol = np.array([0.0, 1.0, 1.0, 2.0, 3.0])
    ref = np.array([1.0, 1.0, 2.0, 0.5])
    rng = np.random.default_rng(1)
    draws = 200_000
    for procedure, pick in (("bon", np.max), ("won", np.min)):
        for n in (2, 4, 7):
            x = pick(rng.choice(pol, (draws, n)), axis=1)
            y = pick(rng.choice(ref, (draws, n)), axis=1)
            wins = (x > y) + 0.5 * (x == y)
            se = wins.std() / np.sqrt(draws)
            got = ev.plugin_win_rates(pol[None], ref[None], n, procedure)[0, 0]
            assert abs(got - wins.mean()) < 4 * se, (procedure, n, got, wins.mean(), se)


@pytest.mark.parametrize("k", [2, 3])
def test_closed_forms_for_a_bon_k_policy_with_continuous_scores(k):
    """pi = BoN_k(pi_ref), continuous: standard and BoN_N-vs-BoN_N win rates are k/(k+1),
    BoN_N(pi) vs plain pi_ref is kN/(kN+1); pi = WoN_k(pi_ref) under WoN_N gives 1/(k+1)."""
    rng = np.random.default_rng(10 + k)
    num_prompts, m = 100, 300
    ref = rng.random((num_prompts, m))
    best = rng.random((num_prompts, m, k)).max(-1)
    worst = rng.random((num_prompts, m, k)).min(-1)
    ns = [1, 2, 4]
    checks = [
        (ev.plugin_win_rates(best, ref, ns, "bon", "transformed"), [k / (k + 1)] * 3),
        (ev.plugin_win_rates(best, ref, ns, "bon", "base"), [k * n / (k * n + 1) for n in ns]),
        (ev.plugin_win_rates(worst, ref, ns, "won", "transformed"), [1 / (k + 1)] * 3),
    ]
    for per_prompt, want in checks:
        se = per_prompt.std(0, ddof=1) / np.sqrt(num_prompts)
        # Plug-in bias for n << m is O(n / m), well inside 4 standard errors here.
        assert np.all(np.abs(per_prompt.mean(0) - want) < 4 * se + 1e-3), (per_prompt.mean(0), want, se)


def _brute_force_subsets(pol, ref, n, procedure, against):
    """Enumerate every n-subset (without replacement) of policy samples and m-subset of
    reference ones, by position, so tied values count once per sample."""
    pick = max if procedure == "bon" else min
    m = n if against == "transformed" else 1
    xs = [pick(t) for t in itertools.combinations(pol, n)]
    ys = [pick(t) for t in itertools.combinations(ref, m)]
    return np.mean([(x > y) + 0.5 * (x == y) for x in xs for y in ys])


@pytest.mark.parametrize("procedure", ["bon", "won"])
@pytest.mark.parametrize("against", ["transformed", "base"])
def test_unbiased_matches_subset_enumeration_with_ties_and_masks(procedure, against):
    pol = np.array([c[0] for c in TIED_CASES] + [[4.0, 0.0, np.nan, 2.0]])
    ref = np.array([c[1] for c in TIED_CASES] + [[2.0, 9.0, 2.0, 1.0]])
    pol_valid = np.ones(pol.shape, bool)
    ref_valid = np.ones(ref.shape, bool)
    pol_valid[-1, 2] = False     # a masked sample's value must not matter
    ref_valid[-1, 1] = False
    got = ev.subset_win_rates(pol, ref, [1, 2, 3], procedure, against, pol_valid, ref_valid)
    assert got.shape == (len(pol), 3)
    for b in range(len(pol)):
        p, r = pol[b][pol_valid[b]].tolist(), ref[b][ref_valid[b]].tolist()
        for g, n in enumerate((1, 2, 3)):
            want = _brute_force_subsets(p, r, n, procedure, against)
            assert got[b, g] == pytest.approx(want, abs=1e-12), (b, n)
    # n = 1 draws one sample either way: the plug-in's standard win rate
    np.testing.assert_allclose(got[:, 0], ev.plugin_win_rates(pol, ref, 1, procedure, against,
                                                              pol_valid, ref_valid)[:, 0],
                               atol=1e-12)


def test_unbiased_estimator_is_unbiased_where_the_plug_in_is_not():
    """Calibrated scores, pi with CDF u^a against uniform pi_ref, M = K = n = 4 (the `small`
    comparison's evaluation): BoN_4 vs BoN_4 is a / (a + 1); WoN_4 vs WoN_4 is
    P(min of pi's 4 > min of pi_ref's 4) = int_0^1 4 (1 - u)^3 (1 - u^a)^4 du (midpoint rule)."""
    rng = np.random.default_rng(3)
    num_prompts, m, n, a = 40_000, 4, 4, 2.0
    pol = rng.random((num_prompts, m)) ** (1 / a)
    ref = rng.random((num_prompts, m))
    u = (np.arange(200_000) + 0.5) / 200_000
    truth = {"bon": a / (a + 1),
             "won": float(np.mean(n * (1 - u) ** (n - 1) * (1 - u ** a) ** n))}
    for procedure in ("bon", "won"):
        unbiased = ev.subset_win_rates(pol, ref, n, procedure)[:, 0]
        se = unbiased.std(ddof=1) / np.sqrt(num_prompts)
        assert abs(unbiased.mean() - truth[procedure]) < 4 * se, (procedure, unbiased.mean(), se)
    # the plug-in at M = n shrinks WoN_4 towards 1/2 by far more than that
    plug = ev.plugin_win_rates(pol, ref, n, "won")[:, 0]
    assert truth["won"] - plug.mean() > 0.03


def test_unbiased_is_one_half_against_itself_and_complementary_at_large_m():
    """C(2000, 1000) overflows a float: the weights are formed in log space."""
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 50, (3, 2000)).astype(float)   # ties
    other = rng.random((3, 1500)) * 50
    for procedure in ("bon", "won"):
        np.testing.assert_allclose(ev.subset_win_rates(scores, scores, [4, 1000], procedure),
                                   0.5, atol=1e-9)
        forward = ev.subset_win_rates(scores, other, [3, 700], procedure)
        backward = ev.subset_win_rates(other, scores, [3, 700], procedure)
        np.testing.assert_allclose(forward + backward, 1.0, atol=1e-9)


def test_unbiased_ranks_a_valid_inf_above_a_masked_one():
    # the masked +inf comes first; the valid +inf must keep the top rank
    pol = np.array([[np.inf, np.inf, 1.0, 2.0]])
    valid = np.array([[0, 1, 1, 1]], bool)
    ref = np.array([[0.0, 3.0, np.inf]])
    for procedure in ("bon", "won"):
        got = ev.subset_win_rates(pol, ref, 2, procedure, "transformed", valid)[0, 0]
        want = _brute_force_subsets([np.inf, 1.0, 2.0], ref[0].tolist(), 2, procedure,
                                    "transformed")
        assert got == pytest.approx(want, abs=1e-12), procedure


def test_unbiased_refuses_fewer_samples_than_n():
    pol = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
    with pytest.raises(ValueError, match=r"pol_BxM: prompt rows \[1\].*n = 3"):
        ev.subset_win_rates(pol, pol, 3, "bon", "transformed", valid, None)
    with pytest.raises(ValueError, match="ref_BxK"):
        ev.subset_win_rates(pol, pol[:, :2], 3, "won")
    assert ev.subset_win_rates(pol, pol[:, :2], 3, "won", "base").shape == (2, 1)


def test_standard_and_paired_win_rates():
    pol = np.array([[1.0, 2.0], [0.0, 0.0]])
    ref = np.array([[2.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
    # Row 0 pairs: 1 vs (2,0,1) -> 0,1,.5 ; 2 vs (2,0,1) -> .5,1,1  => 4/6
    np.testing.assert_allclose(ev.standard_win_rate(pol, ref), [4 / 6, 3 / 6], atol=1e-15)
    np.testing.assert_array_equal(ev.paired_win_rate([1.0, 2.0, 3.0], [1.0, 3.0, 0.0]), [0.5, 0, 1])
    with pytest.raises(ValueError, match="pol_B"):
        ev.paired_win_rate([np.nan], [1.0])


def test_bad_inputs_raise_naming_the_argument():
    good = np.zeros((2, 3))
    with pytest.raises(ValueError, match="ns must all be >= 1"):
        ev.plugin_win_rates(good, good, [1, 0])
    with pytest.raises(ValueError, match="ns must be an int"):
        ev.plugin_win_rates(good, good, 1.5)
    with pytest.raises(ValueError, match="procedure"):
        ev.plugin_win_rates(good, good, 1, "median")
    with pytest.raises(ValueError, match="against"):
        ev.plugin_win_rates(good, good, 1, "bon", "nobody")
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"pol_BxM has 1 NaN"):
        ev.plugin_win_rates(bad, good)
    with pytest.raises(ValueError, match=r"ref_BxK has 1 NaN"):
        ev.win_rate(good, bad)
    with pytest.raises(ValueError, match="same number of prompts"):
        ev.plugin_win_rates(good, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"ref_BxK: prompt rows \[0\] have no valid"):
        ev.plugin_win_rates(good, good, ref_valid_BxK=np.array([[0, 0, 0], [1, 1, 1]], bool))
    with pytest.raises(ValueError, match="pol_BxM must be"):
        ev.plugin_win_rates(np.zeros(3), good)
    for weights in (np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]),   # no weight on row 1
                    np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 5.0]])):  # only on a masked sample
        with pytest.raises(ValueError, match=r"pol_BxM: prompt rows \[1\] have no weight"):
            ev.plugin_win_rates(good, good, pol_weights_BxM=weights,
                                pol_valid_BxM=np.array([[1, 1, 1], [1, 1, 0]], bool))


def test_sample_weights_are_the_policy_probabilities():
    """pi puts the given weights on its samples (0 allowed: an outcome of probability 0)."""
    pol, ref = np.array([[1.0, 3.0]]), np.array([[2.0, 0.0]])
    # pi = (1, 0) on (1, 3): always 1, which beats 0 and loses to 2
    got = ev.plugin_win_rates(pol, ref, [1, 2], pol_weights_BxM=[[1.0, 0.0]])
    np.testing.assert_allclose(got, [[0.5, 0.25]], atol=1e-15)   # BoN_2(ref) = 2 w.p. 3/4
    # pi_ref = (3/4, 1/4) on (2, 0): 3 always wins, 1 wins w.p. 1/4; pi uniform
    got = ev.plugin_win_rates(pol, ref, 1, ref_weights_BxK=[[3.0, 1.0]])
    np.testing.assert_allclose(got, [[(1.0 + 0.25) / 2]], atol=1e-15)


def test_nan_skip_policy_counts_what_it_drops():
    pol = np.array([[1.0, np.nan], [np.nan, np.nan], [0.0, 2.0]])
    ref = np.array([[0.0, 1.0], [0.0, 1.0], [np.nan, 1.0]])
    est = ev.win_rate(pol, ref, ns=[1, 2], nan_policy="skip", num_resamples=50,
                      estimator="plugin")
    assert (est.skipped_samples, est.skipped_prompts, est.num_prompts) == (4, 1, 2)
    # Remaining: prompt 0 = {1} vs {0, 1}; prompt 2 = {0, 2} vs {1}.
    want = [np.mean([_brute_force([1.0], [0.0, 1.0], n, "bon", "transformed"),
                     _brute_force([0.0, 2.0], [1.0], n, "bon", "transformed")]) for n in (1, 2)]
    np.testing.assert_allclose(est.point, want, atol=1e-12)
    with pytest.raises(ValueError, match="nan_policy"):
        ev.win_rate(pol, ref, nan_policy="ignore")
    with pytest.raises(ValueError, match="no prompt has 1 valid, non-NaN score for the policy "
                                         "and 1 for pi_ref"):
        ev.win_rate(pol[1:2], ref[1:2], nan_policy="skip")
    with pytest.raises(ValueError, match="same number of prompts"):
        ev.win_rate(pol, ref[:2], nan_policy="skip")
    # The unbiased estimator needs N valid samples a side: prompts with fewer are dropped too
    pol4 = np.array([[1.0, 3.0, 0.5], [np.nan, 2.0, 1.0], [0.0, 2.0, 4.0]])
    ref4 = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 3.0], [1.0, np.nan, 2.5]])
    est = ev.win_rate(pol4, ref4, ns=2, nan_policy="skip", num_resamples=50,
                      estimator="unbiased")
    assert (est.skipped_samples, est.skipped_prompts, est.num_prompts) == (2, 0, 3)
    want = np.mean([ev.subset_win_rates(p[~np.isnan(p)][None], r[~np.isnan(r)][None], 2)[0, 0]
                    for p, r in zip(pol4, ref4)])
    assert float(est.point[0]) == pytest.approx(want, abs=1e-12)
    est = ev.win_rate(pol4, ref4, ns=3, nan_policy="skip", num_resamples=50,
                      estimator="unbiased")
    assert (est.skipped_prompts, est.num_prompts) == (2, 1)
    # The default is the unbiased estimator (docs/reliability.md said so while it was the
    # plug-in): N = 2 needs 2 valid samples a side, which no prompt here has.
    with pytest.raises(ValueError, match="no prompt has 2 valid, non-NaN scores for the policy "
                                         "and 2 for pi_ref"):
        ev.win_rate(pol, ref, ns=[1, 2], nan_policy="skip", num_resamples=50)
    # against="base": pi_ref's side is single samples; one valid one keeps the prompt (it was
    # dropped for lack of N, a prompt it could score)
    ref1 = ref4.copy()
    ref1[0, 1:] = np.nan
    est = ev.win_rate(pol4, ref1, ns=2, against="base", nan_policy="skip", num_resamples=50)
    assert est.skipped_prompts == 0 and est.num_prompts == 3
    want = np.mean([ev.subset_win_rates(p[~np.isnan(p)][None], r[~np.isnan(r)][None], 2, "bon",
                                        "base")[0, 0] for p, r in zip(pol4, ref1)])
    assert float(est.point[0]) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match=r"estimator must be one of \('plugin', 'unbiased'\)"):
        ev.win_rate(pol4, ref4, estimator="subset")


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_covers_the_truth_and_shrinks_with_more_prompts():
    """pi = BoN_k(pi_ref) with k drawn per prompt from {1, 2, 3}; continuous scores, so the
    per-prompt standard plug-in is unbiased and the truth is mean_k k/(k+1)."""
    truth = np.mean([k / (k + 1) for k in (1, 2, 3)])
    rng = np.random.default_rng(2)

    def simulate(num_prompts, seed):
        ks = rng.integers(1, 4, num_prompts)
        pol = np.stack([rng.random((8, k)).max(-1) for k in ks])
        ref = rng.random((num_prompts, 8))
        return ev.win_rate(pol, ref, num_resamples=400, seed=seed)

    repeats = 150
    results = [simulate(40, s) for s in range(repeats)]
    coverage = np.mean([float(r.lower[0] <= truth <= r.upper[0]) for r in results])
    assert 0.88 <= coverage <= 0.99, coverage
    width_40 = np.mean([r.upper[0] - r.lower[0] for r in results[:20]])
    width_160 = np.mean([(r.upper[0] - r.lower[0]) for r in (simulate(160, s) for s in range(20))])
    assert 0.35 < width_160 / width_40 < 0.65, (width_40, width_160)  # ~ 1/2 for 4x prompts


def test_one_prompt_has_no_interval():
    """Resampling one prompt gave point = lower = upper (stderr 3e-15): a zero-width interval
    read as certainty. Its bounds and stderr are NaN; the point stays; win_rate follows."""
    est = ev.bootstrap_mean(np.array([[0.25, 0.75]]), num_resamples=100, seed=0)
    np.testing.assert_array_equal(est.point, [0.25, 0.75])
    assert np.isnan(est.lower).all() and np.isnan(est.upper).all() and np.isnan(est.stderr).all()
    assert est.num_prompts == 1
    w = ev.win_rate(np.array([[1.0, 2.0, 3.0]]), np.array([[0.0, 2.0, 5.0]]), [1, 2],
                    estimator="unbiased", num_resamples=50)
    assert np.isfinite(w.point).all() and np.isnan(w.lower).all() and np.isnan(w.stderr).all()
    two = ev.bootstrap_mean(np.array([0.0, 1.0]), num_resamples=200, seed=0)
    assert np.isfinite(two.stderr) and two.lower < two.upper


def test_bootstrap_stderr_matches_the_standard_error_of_the_mean():
    values = np.random.default_rng(3).normal(size=(200, 2)) * [1.0, 3.0]
    est = ev.bootstrap_mean(values, num_resamples=4000, seed=0)
    plug_in_se = values.std(0, ddof=0) / np.sqrt(200)  # the bootstrap targets the ddof=0 SE
    np.testing.assert_allclose(est.stderr, plug_in_se, rtol=0.06)
    np.testing.assert_allclose(est.point, values.mean(0), rtol=0, atol=1e-15)
    assert np.all(est.lower < est.point) and np.all(est.point < est.upper)
    np.testing.assert_allclose(est.upper - est.lower, 2 * 1.96 * plug_in_se, rtol=0.1)
    same = ev.bootstrap_mean(values, num_resamples=4000, seed=0)
    np.testing.assert_array_equal(same.lower, est.lower)  # the seed fixes the interval
    with pytest.raises(ValueError, match="level"):
        ev.bootstrap_mean(values, level=1.5)
    with pytest.raises(ValueError, match="num_resamples must be >= 2"):   # no spread of one
        ev.bootstrap_mean(values, num_resamples=1)


def test_bootstrap_lower_bound_is_the_lower_tail_quantile_when_it_is_the_wider():
    """18 values 1 and 2 values -20: a bootstrap mean with k outliers is 1 - 21 k / 20, k ~
    Binomial(20, 1/10), which puts 4.3% on k >= 5 and 1.1% on k >= 6: its 2.5% quantile is -4.25
    (k = 5), below the t bound mean - t_19 s / sqrt(20) = -4.125 (the 5% quantile, -3.2, is not)."""
    from scipy import stats
    values = np.array([-20.0] * 2 + [1.0] * 18)
    half = stats.t.ppf(0.975, 19) * values.std(ddof=1) / np.sqrt(20)
    assert values.mean() - half == pytest.approx(-4.125, abs=1e-3)
    for seed in range(3):
        est = ev.bootstrap_mean(values, num_resamples=4000, seed=seed)
        assert float(est.lower) == -4.25
        assert float(est.upper) == pytest.approx(values.mean() + half, rel=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        ev.bootstrap_mean([1.0, np.nan])


# ------------------------------------------------------------------ KL estimators


def _np_log_softmax(x):
    x = x.astype(np.float64)
    return x - logsumexp(x, axis=-1, keepdims=True)


def test_identical_policies_give_zero_kl():
    rng = np.random.default_rng(4)
    logp = jnp.asarray(np.log(rng.random((6, 10))), jnp.float32)
    mask = jnp.asarray(rng.random((6, 10)) < 0.7)
    for estimate in (K.sequence_kl("k1", logp, logp, mask), K.sequence_kl("k3", logp, logp, mask)):
        assert float(estimate.mean) == 0.0 and float(estimate.stderr) == 0.0
        np.testing.assert_array_equal(estimate.per_sequence_B, 0.0)
    logits = jnp.asarray(rng.normal(size=(6, 10, 11)), jnp.float32)
    np.testing.assert_allclose(K.sequence_kl_from_logits(logits, logits, mask).per_sequence_B, 0.0, atol=1e-6)


def test_k1_k3_match_numpy_and_respect_the_mask():
    rng = np.random.default_rng(5)
    logp = np.log(rng.random((5, 8))).astype(np.float32)
    ref_logp = np.log(rng.random((5, 8))).astype(np.float32)
    lengths = np.array([8, 3, 0, 5, 1])
    mask = np.arange(8)[None] < lengths[:, None]  # tokens after EOS are masked out
    garbage = np.where(mask, logp, np.nan).astype(np.float32)  # padding may hold anything
    k1 = K.sequence_kl("k1", jnp.asarray(garbage), jnp.asarray(ref_logp), jnp.asarray(mask))
    want_k1 = np.array([np.sum(logp[b, :n].astype(np.float64) - ref_logp[b, :n]) for b, n in enumerate(lengths)])
    np.testing.assert_allclose(k1.per_sequence_B, want_k1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k1.mean, want_k1.mean(), rtol=1e-5)
    np.testing.assert_allclose(k1.stderr, want_k1.std(ddof=1) / np.sqrt(5), rtol=1e-4)
    k3 = K.sequence_kl("k3", jnp.asarray(garbage), jnp.asarray(ref_logp), jnp.asarray(mask))
    ratio = np.exp(ref_logp.astype(np.float64) - logp)
    want_k3 = np.array([np.sum((ratio[b, :n] - 1) - np.log(ratio[b, :n])) for b, n in enumerate(lengths)])
    np.testing.assert_allclose(k3.per_sequence_B, want_k3, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(K.kl_k3(jnp.asarray(logp), jnp.asarray(ref_logp))) >= 0)
    tiny = jnp.asarray(logp) + jnp.asarray(rng.normal(size=logp.shape) * 1e-7, jnp.float32)
    assert np.all(np.asarray(K.kl_k3(jnp.asarray(logp), tiny)) >= 0)


def test_kl_standard_error_is_over_prompts_when_prompts_have_several_samples():
    """Rows b*M .. b*M + M - 1 are prompt b's: the standard error is that of the B per-prompt
    means. Where KL varies between prompts, treating the B*M sequences as independent gave an
    interval sqrt(M) too narrow: simulated coverage of the population mean 0.51 against 0.94."""
    rng = np.random.default_rng(8)
    b, m = 6, 4
    values = rng.normal(size=b * m)
    est = K.summarise_sequences(jnp.asarray(values, jnp.float32), m)
    means = values.reshape(b, m).mean(1)
    np.testing.assert_allclose(est.stderr, means.std(ddof=1) / np.sqrt(b), rtol=1e-5)
    np.testing.assert_allclose(est.mean, values.mean(), rtol=1e-5)
    np.testing.assert_allclose(K.summarise_sequences(jnp.asarray(values), 1).stderr,
                               values.std(ddof=1) / np.sqrt(b * m), rtol=1e-5)
    assert np.isnan(float(K.summarise_sequences(jnp.asarray(values[:m]), m).stderr))
    with pytest.raises(ValueError, match="samples_per_prompt=5"):
        K.summarise_sequences(jnp.asarray(values), 5)

    # Coverage: prompt KLs spread (sd 1) around the population mean 2, samples close to their
    # prompt's (sd 0.1); 2000 evaluations of 16 prompts x 8 samples.
    reps, b, m = 2000, 16, 8
    prompt_kl = 2.0 + rng.normal(size=(reps, b, 1))
    per_seq = jnp.asarray((prompt_kl + 0.1 * rng.normal(size=(reps, b, m))).reshape(reps, -1),
                          jnp.float32)
    t = 2.131  # Student t, 15 degrees of freedom, 97.5%

    def coverage(group):
        est = jax.vmap(lambda x: K.summarise_sequences(x, group))(per_seq)
        return float(np.mean(np.abs(np.asarray(est.mean) - 2.0) <= t * np.asarray(est.stderr)))

    assert 0.93 <= coverage(m) <= 0.97
    assert coverage(1) < 0.6


def test_full_vocab_kl_matches_numpy():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 6, 13)).astype(np.float32) * 2
    ref_logits = rng.normal(size=(4, 6, 13)).astype(np.float32) * 2
    logits[0, 0, :5] = -np.inf  # zero-probability tokens under pi contribute nothing
    mask = np.arange(6)[None] < np.array([6, 2, 4, 0])[:, None]
    lp, lq = _np_log_softmax(logits), _np_log_softmax(ref_logits)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):  # 0 * -inf in the unselected branch
        per_token = np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)
    got = K.kl_from_logits(jnp.asarray(logits), jnp.asarray(ref_logits))
    np.testing.assert_allclose(got, per_token, rtol=1e-5, atol=1e-6)
    bad_ref = np.where(mask[..., None], ref_logits, np.nan).astype(np.float32)
    est = jax.jit(K.sequence_kl_from_logits)(jnp.asarray(logits), jnp.asarray(bad_ref), jnp.asarray(mask))
    np.testing.assert_allclose(est.per_sequence_B, np.where(mask, per_token, 0).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
def test_full_vocab_kl_and_entropy_gradients_ignore_masked_positions(garbage):
    """NaN, +inf or all -inf logits after EOS (masked) made the gradients of kl_from_logits and
    entropy_from_logits NaN through the branch `where` drops, although the values were right;
    the module promises masked positions change neither. The gradient at valid positions equals
    the one with clean logits there; at masked positions it is 0."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    ref = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    dirty, dirty_ref = logits.copy(), ref.copy()
    dirty[~mask], dirty_ref[~mask] = garbage, garbage

    def total(fn):
        return lambda x, r: jnp.sum(fn(x, r))

    for fn in (lambda x, r: K.kl_from_logits(x, r, jnp.asarray(mask)),
               lambda x, r: K.entropy_from_logits(x, jnp.asarray(mask))):
        g_dirty = np.asarray(jax.grad(total(fn))(jnp.asarray(dirty), jnp.asarray(dirty_ref)))
        g_clean = np.asarray(jax.grad(total(fn))(jnp.asarray(logits), jnp.asarray(ref)))
        assert np.all(np.isfinite(g_dirty))
        np.testing.assert_allclose(g_dirty[mask], g_clean[mask], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(g_dirty[~mask], 0.0)
        np.testing.assert_allclose(fn(jnp.asarray(dirty), jnp.asarray(dirty_ref)),
                                   fn(jnp.asarray(logits), jnp.asarray(ref)), rtol=1e-6)


def test_full_vocab_sequence_kl_standard_error_is_over_prompts():
    """`sequence_kl_from_logits` with samples_per_prompt: the standard error of the mean over
    prompts of each prompt's mean (as `sequence_kl`), not of B*M independent sequences."""
    rng = np.random.default_rng(8)
    b, m = 4, 8
    logits = jnp.asarray(rng.normal(size=(b * m, 3, 5)) * rng.uniform(0.2, 3, (b * m, 1, 1))
                         .repeat(1, 0), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(b * m, 3, 5)), jnp.float32)
    mask = jnp.ones((b * m, 3), bool)
    est = K.sequence_kl_from_logits(logits, ref, mask, samples_per_prompt=m)
    per_prompt = np.asarray(est.per_sequence_B, np.float64).reshape(b, m).mean(1)
    assert float(est.stderr) == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(b), rel=1e-5)
    assert float(est.mean) == pytest.approx(per_prompt.mean(), rel=1e-5)


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    """Tokens drawn i.i.d. per position from p: E[k1] = E[k3] = T * KL(p || q) (Monte Carlo)."""
    rng = np.random.default_rng(7)
    num_seq, length, vocab = 20_000, 4, 5
    p = rng.dirichlet(np.ones(vocab))
    q = rng.dirichlet(np.ones(vocab))
    exact = length * np.sum(p * np.log(p / q))
    tokens = rng.choice(vocab, size=(num_seq, length), p=p)
    logp = jnp.asarray(np.log(p)[tokens], jnp.float32)
    ref_logp = jnp.asarray(np.log(q)[tokens], jnp.float32)
    mask = jnp.ones((num_seq, length), bool)
    for estimate in (K.sequence_kl("k1", logp, ref_logp, mask), K.sequence_kl("k3", logp, ref_logp, mask)):
        assert abs(float(estimate.mean) - exact) < 4 * float(estimate.stderr), (estimate.mean, exact)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (2, length, vocab))
    ref_logits = jnp.broadcast_to(jnp.log(jnp.asarray(q, jnp.float32)), (2, length, vocab))
    full = K.sequence_kl_from_logits(logits, ref_logits, jnp.ones((2, length), bool))
    np.testing.assert_allclose(full.per_sequence_B, exact, rtol=1e-5)


# ------------------------------------------------------------------ KL bounds


def test_kl_bounds_match_the_spec_table():
    # Spec section 7 (CD best-of-K bounds, 4 decimals).
    table = {2: 0.1931, 3: 0.4319, 4: 0.6363, 6: 0.9584, 8: 1.2044, 16: 1.8351, 32: 2.4970, 50: 2.9320}
    got = K.bon_kl_bound(list(table))
    np.testing.assert_allclose(got, list(table.values()), atol=5e-5)
    assert K.bon_kl_bound(1) == 0.0
    # Blockwise: (L / M) (log K - (K-1)/K); 64 tokens in blocks of 16 at K = 6 -> 4 x 0.9584.
    got = K.blockwise_cd_kl_bound(np.array([64, 40]), 16, 6)
    np.testing.assert_allclose(got, [4 * 0.95842614, 2.5 * 0.95842614], rtol=1e-7)
    np.testing.assert_allclose(K.blockwise_cd_kl_bound(40, 16, 6, ceil_blocks=True), 3 * 0.95842614)
    assert K.blockwise_cd_kl_bound(0, 16, 6) == 0.0   # an empty response: no block, no KL
    with pytest.raises(ValueError, match="n must be"):
        K.bon_kl_bound(0)
    with pytest.raises(ValueError, match="num_candidates"):
        K.blockwise_cd_kl_bound(10, 4, 0.5)
    with pytest.raises(ValueError, match="block_size"):
        K.blockwise_cd_kl_bound(10, 0, 4)
    with pytest.raises(ValueError, match="num_tokens"):
        K.blockwise_cd_kl_bound(-1, 4, 4)


def _two_methods(rng, delta, seeds, prompts, seed_sd, noise_sd=0.3):
    """Per-prompt values of two methods: a shared prompt difficulty, a per-run (seed) offset and
    noise; the population difference is `delta`."""
    u_B = rng.normal(0.0, 1.0, prompts)
    a = u_B + delta + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise_sd, (seeds, prompts))
    b = u_B + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise_sd, (seeds, prompts))
    return a, b


def test_paired_difference_one_seed_is_the_t_interval_of_the_differences():
    from scipy import stats
    rng = np.random.default_rng(0)
    a, b = _two_methods(rng, 0.1, 1, 400, seed_sd=0.0)
    est = ev.paired_difference(a, b)
    d = a[0] - b[0]
    assert est.point == pytest.approx(d.mean(), abs=1e-12)
    # one seed a method: the paired t interval of the per-prompt differences (the shared
    # difficulty cancels)
    assert est.stderr == pytest.approx(d.std(ddof=1) / np.sqrt(400), rel=1e-12)
    assert est.upper - est.point == pytest.approx(stats.t.ppf(0.975, 399) * est.stderr, rel=1e-9)
    assert est.stderr < 0.5 * np.sqrt(a.var() / 400 + b.var() / 400)
    # a NaN names the quantity when the caller says what it is (the comparison names method
    # and metric; the message said only "non-finite values")
    bad = a.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match=r"paired_difference of exp - identity, gold_bon4: "
                                         r"non-finite values \(a: 1, b: 0\)"):
        ev.paired_difference(bad, b, what="exp - identity, gold_bon4")


def test_paired_difference_with_dominant_seed_terms_takes_the_seeds_degrees_of_freedom():
    """Two seeds a method over 3 prompts. a = seed offset + prompt effect + a residual +-0.3 whose
    rows and columns sum to 0: MS_residual = 4 (0.09) / ((2 - 1)(3 - 1)) = 0.18, so a's seed
    term is (Var_s(row means) - MS_residual / 3) / 2 = (0.5 - 0.06) / 2 = 0.22; b has no
    residual, 0.5 / 2 = 0.25. Every per-prompt difference is 1: the prompt term is 0.
    Satterthwaite counts ~2 degrees of freedom; the seed terms hold all of Var, so the interval
    takes their S - 1 = 1: point +- t_{0.975, 1} sqrt(0.47)."""
    from scipy import stats
    a = np.array([[0.3, 0.7, 2.0], [0.7, 2.3, 3.0]])
    b = np.array([[0.0, 1.0, 2.0], [-1.0, 0.0, 1.0]])
    est = ev.paired_difference(a, b)
    assert float(est.point) == pytest.approx(1.0, abs=1e-12)
    assert float(est.stderr) == pytest.approx(np.sqrt(0.47), rel=1e-12)
    assert float(est.upper - est.point) == pytest.approx(stats.t.ppf(0.975, 1) * np.sqrt(0.47),
                                                         rel=1e-9)


@pytest.mark.parametrize("seeds, seed_sd, noise_sd, se_ratio, most", [
    (5, 0.15, 0.3, (0.9, 1.1), 0.99),    # seed offsets dominate
    (3, 0.3, 0.2, (0.9, 1.1), 0.99),     # few seeds, offsets dominate (a joint resampling of
                                         # seeds and prompts covered 0.82)
    (1, 0.0, 1.0, (0.9, 1.1), 0.99),
    # Residual noise alone: a joint resampling counted it twice (1.48x the true standard error,
    # coverage 0.997); the seed variance clipped at 0 is biased up here (1.17x). Three seeds
    # cannot tell that the seeds add nothing: t at their 2 degrees of freedom over-covers.
    (3, 0.0, 1.0, (1.0, 1.25), 1.0),
])
def test_paired_difference_covers_the_true_difference_at_its_level(seeds, seed_sd, noise_sd,
                                                                   se_ratio, most):
    rng = np.random.default_rng(1)
    trials, covered, covered_prompts_only, ratio = 400, 0, 0, []
    for i in range(trials):
        a, b = _two_methods(rng, 0.2, seeds, prompts=48, seed_sd=seed_sd, noise_sd=noise_sd)
        est = ev.paired_difference(a, b)
        covered += est.lower <= 0.2 <= est.upper
        ratio.append(est.stderr)
        prompts_only = ev.bootstrap_mean(a.mean(0) - b.mean(0), num_resamples=200, seed=i)
        covered_prompts_only += prompts_only.lower <= 0.2 <= prompts_only.upper
    # The true standard error of mean(a) - mean(b) in this model.
    true_se = np.sqrt(2 * seed_sd ** 2 / seeds + 2 * noise_sd ** 2 / (seeds * 48))
    assert 0.92 <= covered / trials <= most, covered / trials
    rms = np.sqrt(np.mean(np.square(ratio)))
    assert se_ratio[0] <= rms / true_se <= se_ratio[1], rms / true_se
    if seed_sd:   # a prompt-only bootstrap ignores the seed offsets and covers far less often
        assert covered_prompts_only / trials < 0.6


def test_a_gain_over_a_constant_with_few_dominant_seeds_covers_near_its_level():
    """One method's seeds against the constant 1/2 (the comparison's gain over pi_ref): a single
    seed term on S - 1 = 2 degrees of freedom. Satterthwaite's count alone covered 0.918 here."""
    rng = np.random.default_rng(1)
    trials, covered = 2000, 0
    for _ in range(trials):
        u_B = rng.normal(0.0, 0.5, 48)
        a = 0.7 + u_B + rng.normal(0, 0.3, (3, 1)) + rng.normal(0, 0.2, (3, 48))
        est = ev.paired_difference(a, np.full((1, 48), 0.5))
        covered += est.lower <= 0.2 <= est.upper
    assert covered / trials >= 0.93, covered / trials


@pytest.mark.parametrize("one_sided", [False, True])
def test_a_small_seed_spread_with_three_seeds_still_covers_at_the_level(one_sided):
    """3 seeds whose offsets (sd 0.02-0.05) are small beside the per-prompt noise (0.2): the
    seed variance, estimated on 2 degrees of freedom and often clipped near 0, held less than
    half of Var, so Satterthwaite's count ran to about B - 1 and the interval covered 0.940
    (two methods, B = 128) and 0.905 (a gain over the constant 1/2, B = 32) here."""
    rng = np.random.default_rng(7)
    trials, covered = 4000, 0
    for _ in range(trials):
        if one_sided:
            a = 0.7 + rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.2, (3, 32))
            est = ev.paired_difference(a, np.full((1, 32), 0.5))
        else:
            a, b = _two_methods(rng, 0.2, 3, prompts=128, seed_sd=0.02, noise_sd=0.2)
            est = ev.paired_difference(a, b)
        covered += est.lower <= 0.2 <= est.upper
    assert covered / trials >= 0.95, covered / trials


def test_methods_with_different_seed_counts_take_the_smaller_seeds_degrees_of_freedom():
    """3 seeds against 5: the interval's t is at 2 degrees of freedom (the smaller S - 1),
    whatever the seed terms' estimates (Satterthwaite's count is at least 2 here)."""
    from scipy import stats
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.2, (3, 64))
        b = rng.normal(0, 0.05, (5, 1)) + rng.normal(0, 0.2, (5, 64))
        est = ev.paired_difference(a, b)
        assert float(est.upper - est.point) == pytest.approx(
            stats.t.ppf(0.975, 2) * float(est.stderr), rel=1e-12)
        est = ev.paired_difference(b, a[:1])   # one seed holds no seed spread: 5 - 1
        assert float(est.upper - est.point) == pytest.approx(
            stats.t.ppf(0.975, 4) * float(est.stderr), rel=1e-12)


def test_paired_difference_refuses_mismatched_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        ev.paired_difference(np.zeros((3, 4)), np.zeros((3, 5)))


def test_bootstrap_interval_covers_over_few_prompts():
    """The percentile bootstrap alone covered the mean of Beta(2, 2) per-prompt values 0.47 of
    the time over 2 prompts and 0.74 over 3, at a nominal 0.95; the t bound restores ~0.93.
    Over many prompts the interval is the bootstrap's (test above); a win rate's stays in [0, 1]."""
    rng = np.random.default_rng(7)
    for num, floor in ((2, 0.88), (3, 0.88)):
        hits = [ev.bootstrap_mean(x, num_resamples=200, seed=i) for i, x in
                enumerate(rng.beta(2.0, 2.0, (300, num)))]
        coverage = np.mean([e.lower <= 0.5 <= e.upper for e in hits])
        assert coverage >= floor, (num, coverage)
    w = ev.win_rate(np.array([[3.0, 4.0], [0.0, 1.0]]), np.array([[1.0, 2.0], [2.0, 3.0]]),
                    num_resamples=100)
    assert 0.0 <= float(w.lower[0]) < float(w.point[0]) < float(w.upper[0]) <= 1.0
    assert float(w.lower[0]) == 0.0 and float(w.upper[0]) == 1.0   # 2 prompts: 1.0 and 0.0


def test_paired_difference_with_fewer_prompts_than_seeds_keeps_the_smaller_count():
    """The seeds' S - 1 caps Satterthwaite's count, never raises it: 5 seeds with no seed
    spread over 3 prompts leave the prompt term alone, on B - 1 = 2 degrees of freedom. And the
    cap is the smaller S - 1 whichever method has it (the second one here: 5 seeds against 3)."""
    from scipy import stats
    a = np.tile([0.9, 0.4, 0.7], (5, 1))
    b = np.tile([0.5, 0.5, 0.2], (5, 1))
    est = ev.paired_difference(a, b)
    assert float(est.upper - est.point) == pytest.approx(
        stats.t.ppf(0.975, 2) * float(est.stderr), rel=1e-12)
    rng = np.random.default_rng(3)
    a = rng.normal(0, 0.05, (5, 1)) + rng.normal(0, 0.2, (5, 64))
    b = rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.2, (3, 64))
    est = ev.paired_difference(a, b)
    assert float(est.upper - est.point) == pytest.approx(
        stats.t.ppf(0.975, 2) * float(est.stderr), rel=1e-12)
