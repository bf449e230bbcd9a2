"""KL matching by interpolation towards pi_ref (workflows/kl_match.py): the interpolation itself,
the alpha update against power laws it must solve exactly, and the search on a real categorical
policy whose KL is computed in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from infalign_jax.workflows import kl_match


def test_interpolate_is_the_line_from_pi_ref_leaf_by_leaf():
    ref = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int32)}
    pol = {"w": np.array([3.0, -2.0], np.float32), "n": np.array([3], np.int32)}
    np.testing.assert_array_equal(kl_match.interpolate(ref, pol, 0.0)["w"], ref["w"])
    np.testing.assert_array_equal(kl_match.interpolate(ref, pol, 1.0)["w"], pol["w"])
    half = kl_match.interpolate(ref, pol, 0.5)
    np.testing.assert_array_equal(half["w"], [2.0, 0.0])
    assert half["w"].dtype == np.float32 and half["n"].dtype == np.int32
    np.testing.assert_array_equal(kl_match.interpolate(ref, pol, 1.5)["w"], [4.0, -4.0])
    with pytest.raises(ValueError, match="non-float parameter differs"):
        kl_match.interpolate(ref, {**pol, "n": np.array([4], np.int32)}, 0.5)


def test_next_alpha_solves_power_laws():
    # one point: the quadratic guess, exact when KL = c alpha^2
    assert kl_match.next_alpha([(1.0, 0.8)], 0.2) == pytest.approx(0.5)
    # two points of KL = 0.3 alpha^3: the fitted exponent makes the next step exact
    kl = lambda a: 0.3 * a ** 3
    a = kl_match.next_alpha([(1.0, kl(1.0)), (0.7, kl(0.7))], 0.1)
    assert kl(a) == pytest.approx(0.1, rel=1e-12)
    # the step is capped
    assert kl_match.next_alpha([(1.0, 0.01)], 10.0, max_alpha=2.0) == 2.0


@pytest.mark.parametrize("power", [3.0, 5.0, 8.0])
def test_next_alpha_stays_inside_a_bracket_and_solves_steep_power_laws(power):
    # KL = alpha^p with the target 0.5 between alpha 0.707 and 1: the fit clipped to p <= 4
    # missed it by 30% at p = 5 and left the bracket (alpha 1.19, KL 4) at p = 8.
    kl = lambda a: a ** power
    history = [(1.0, kl(1.0)), (0.5 ** 0.5, kl(0.5 ** 0.5))]
    a = kl_match.next_alpha(history, 0.5)
    assert 0.5 ** 0.5 <= a <= 1.0
    assert kl(a) == pytest.approx(0.5, rel=1e-9)
    # where KL does not grow with alpha across the bracket: the geometric mean of the alphas
    assert kl_match.next_alpha([(1.0, 0.9), (1.5, 0.2)], 0.5) == pytest.approx(1.5 ** 0.5)


def test_interpolate_takes_bfloat16_and_match_kl_stops_at_a_nan_kl():
    import ml_dtypes
    ref = {"w": np.array([1.0, 2.0], ml_dtypes.bfloat16)}
    pol = {"w": np.array([3.0, -2.0], ml_dtypes.bfloat16)}
    half = kl_match.interpolate(ref, pol, 0.5)["w"]
    assert half.dtype == ml_dtypes.bfloat16 and half.astype(np.float32).tolist() == [2.0, 0.0]
    kls = iter([2.0, float("nan")])
    calls, lines = [], []

    def evaluate(params):
        calls.append(params)
        return {"kl_B": np.array([next(kls)])}

    got = kl_match.match_kl(evaluate, {"w": np.zeros(1)}, {"w": np.ones(1)}, 0.5, band=0.05,
                            tries=3, log=lines.append)
    assert len(calls) == 2 and float(got["alpha"]) == 1.0   # the finite evaluation is kept
    assert "not finite" in lines[-1]


def _categorical_policy_kl(theta_ref, theta):
    p, q = np.exp(theta - theta.max()), np.exp(theta_ref - theta_ref.max())
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


@pytest.mark.parametrize("target", [0.05, 0.3, 0.6])
def test_match_kl_on_a_categorical_policy_reaches_the_target(target):
    rng = np.random.default_rng(0)
    ref = {"logits": rng.normal(size=50)}
    pol = {"logits": ref["logits"] + rng.normal(scale=1.0, size=50)}
    calls = []

    def evaluate(params):
        calls.append(params)
        return {"kl_B": np.full(4, _categorical_policy_kl(ref["logits"], params["logits"])),
                "win_B": np.zeros(4)}

    kl1 = _categorical_policy_kl(ref["logits"], pol["logits"])
    got = kl_match.match_kl(evaluate, ref, pol, target, band=0.05, tries=3)
    assert abs(got["kl_B"].mean() / target - 1) <= 0.05
    assert got["alpha_history_Ax2"][0].tolist() == [1.0, pytest.approx(kl1)]
    assert len(calls) == len(got["alpha_history_Ax2"]) <= 4
    # the returned evaluation is the one at the returned alpha
    want = _categorical_policy_kl(ref["logits"], kl_match.interpolate(
        ref, pol, float(got["alpha"]))["logits"])
    assert got["kl_B"].mean() == pytest.approx(want)


def test_match_kl_keeps_a_policy_already_in_band_and_one_with_no_direction():
    evaluate = lambda params: {"kl_B": np.array([params["w"][0] ** 2])}
    ref, pol = {"w": np.zeros(1)}, {"w": np.ones(1)}
    got = kl_match.match_kl(evaluate, ref, pol, 1.02, band=0.05)
    assert float(got["alpha"]) == 1.0 and len(got["alpha_history_Ax2"]) == 1
    lines = []
    got = kl_match.match_kl(evaluate, ref, ref, 0.5, band=0.05, log=lines.append)
    assert float(got["alpha"]) == 1.0 and "no direction" in lines[0]
    with pytest.raises(ValueError, match="target > 0"):
        kl_match.match_kl(evaluate, ref, pol, 0.0, band=0.05)


def test_next_alpha_clips_the_fitted_exponent_to_one_to_four():
    # KL = alpha^8 seen at alpha 1 and 0.9, target below both: the fit (p = 8) is clipped to 4
    steep = [(1.0, 1.0), (0.9, 0.9 ** 8)]
    assert kl_match.next_alpha(steep, 0.1) == pytest.approx(0.9 * (0.1 / 0.9 ** 8) ** (1 / 4))
    # KL = alpha^0.5: the fit (p = 0.5) is clipped to 1
    flat = [(1.0, 1.0), (0.5, 0.5 ** 0.5)]
    assert kl_match.next_alpha(flat, 0.1) == pytest.approx(0.5 * 0.1 / 0.5 ** 0.5)


def test_next_alpha_interpolates_inside_the_tightest_bracket():
    # KL is not a power law here: the widest bracket (0.2, 1) gives another alpha, outside the
    # tightest one (0.3, 0.45)
    kl = lambda a: a ** 2 * np.exp(3 * a)
    history = [(1.0, kl(1.0)), (0.2, kl(0.2)), (0.45, kl(0.45)), (0.3, kl(0.3))]
    a = kl_match.next_alpha(history, 0.3)
    assert 0.3 < a < 0.45
    p = np.log(kl(0.45) / kl(0.3)) / np.log(0.45 / 0.3)
    assert a == pytest.approx(0.3 * (0.3 / kl(0.3)) ** (1 / p))


def test_match_kl_stops_once_the_step_is_capped_at_max_alpha():
    calls = []

    def evaluate(params):
        calls.append(params)
        return {"kl_B": np.array([0.01 * params["w"][0] ** 2])}

    got = kl_match.match_kl(evaluate, {"w": np.zeros(1)}, {"w": np.ones(1)}, 10.0, band=0.05,
                            tries=3, max_alpha=2.0)
    # alpha 1 (KL 0.01), then alpha 2 (KL 0.04); the next step is capped at 2 again: no third
    # evaluation of the same policy
    assert len(calls) == 2 and float(got["alpha"]) == 2.0
    assert got["alpha_history_Ax2"].tolist() == [[1.0, 0.01], [2.0, 0.04]]


def test_match_kl_refuses_a_band_that_is_not_positive():
    evaluate = lambda params: {"kl_B": np.array([1.0])}
    with pytest.raises(ValueError, match=r"band > 0, got 0.5, 0.0"):
        kl_match.match_kl(evaluate, {"w": np.zeros(1)}, {"w": np.ones(1)}, 0.5, band=0.0)
