"""Reward transform registry (infalign_jax/core/transforms.py, spec section 1.4): closed forms computed
with numpy/scipy, strict monotonicity, the tabulated optimal transform, and error messages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from infalign_jax.core import transforms as T

U = np.linspace(0.001, 0.999, 999).astype(np.float32)
U64 = U.astype(np.float64)


def _apply(name, x=U, /, **params):
    return np.asarray(T.get_transform(name, **params)(x), np.float64)


# ------------------------------------------------------------------------------ closed forms
def test_exp_hand_values():
    # t = 2 at u = 1/2: (e^{2 * 1/2} - 1) / 2 = (e - 1) / 2.
    assert _apply("exp", np.float32(0.5), t=2.0) == pytest.approx((math.e - 1) / 2, rel=1e-6)
    # t = -3: (e^{-3u} - 1) / (-3) = (1 - e^{-3u}) / 3, the paper's -e^{-3u} up to an affine map.
    np.testing.assert_allclose(_apply("exp", t=-3.0), (1 - np.exp(-3 * U64)) / 3, rtol=1e-5)
    np.testing.assert_allclose(_apply("exp", t=0.7), np.expm1(0.7 * U64) / 0.7, rtol=1e-5)
    # t = 0 is the identity, and small t approaches it.
    np.testing.assert_array_equal(_apply("exp", t=0.0), U64)
    np.testing.assert_allclose(_apply("exp", t=1e-4), U64, rtol=1e-4)
    # A t too small for float32 (0 there, so (e^{0} - 1) / 0 = NaN) is the limit itself.
    for t in (1e-40, -1e-40, 1e-300):
        np.testing.assert_allclose(_apply("exp", t=t), U64, rtol=1e-6)


def test_identity_log_logistic_logit_probit():
    np.testing.assert_array_equal(_apply("identity"), U64)
    np.testing.assert_allclose(_apply("log"), np.log(U64), rtol=1e-6)
    assert _apply("log", np.float32(0.0)) == pytest.approx(math.log(T.EPS), rel=1e-6)  # floored
    np.testing.assert_allclose(_apply("logistic", s=7.0, c=0.3),
                               1 / (1 + np.exp(-7 * (U64 - 0.3))), rtol=1e-5)
    np.testing.assert_allclose(_apply("logit"), np.log(U64 / (1 - U64)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_apply("probit"), stats.norm.ppf(U64), rtol=1e-4, atol=1e-5)
    edges = np.array([0.0, 1.0], np.float32)
    np.testing.assert_allclose(_apply("probit", edges), stats.norm.ppf([T.EPS, 1 - T.EPS]),
                               rtol=1e-3)
    assert np.all(np.isfinite(_apply("logit", edges)))


def test_power_closed_form_and_log_limit():
    np.testing.assert_allclose(_apply("power", p=0.5), (np.sqrt(U64) - 1) / 0.5, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(_apply("power", p=-2.0), (U64 ** -2 - 1) / -2, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(_apply("power", p=0.0), np.log(U64), rtol=1e-6)
    for p in (1e-46, -1e-300):   # below float32's range: the log limit, not 0 / 0
        np.testing.assert_allclose(_apply("power", p=p), np.log(U64), rtol=1e-6)
    # (u^p - 1)/p - log u = p log(u)^2 / 2 + O(p^2): the error shrinks linearly as p -> 0.
    u = U[U >= 0.05]
    errors = [np.max(np.abs(_apply("power", u, p=p) - np.log(u.astype(np.float64))))
              for p in (1e-1, 1e-2, 1e-3)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01
    assert errors[0] == pytest.approx(0.1 * np.log(0.05) ** 2 / 2, rel=0.15)


@pytest.mark.parametrize("p", [1e-3, 1e-5, 1e-6, 1e-7, -1e-6, 3e-8])
def test_power_keeps_its_digits_and_its_order_for_small_p(p):
    """(u^p - 1)/p in float32 lost every digit for small p (p = 1e-6: Phi(0.99) = 0, and ranks
    tied); against float64's expm1(p log u)/p the error is float32 rounding."""
    got = _apply("power", p=p)
    np.testing.assert_allclose(got, np.expm1(p * np.log(U64)) / p, rtol=1e-6, atol=0)
    assert np.all(np.diff(got) > 0)   # strictly increasing, as the calibrated ranks are
    assert T.get_transform("power", p=p).sup_abs == pytest.approx(
        abs(np.expm1(p * np.log(T.EPS)) / p), rel=1e-12)


def test_smoothing_marks_transforms_that_diverge_at_an_end():
    assert T.get_transform("log").smoothing == T.get_transform("power", p=0.0).smoothing == "add_one"
    assert T.get_transform("power", p=-0.5).smoothing == "add_one"
    # every power reads it, as its limit log does (continuity in p at 0: below)
    assert T.get_transform("power", p=0.5).smoothing == "add_one"
    # diverging at both ends: never 0 or 1
    assert T.get_transform("logit").smoothing == T.get_transform("probit").smoothing == "centred"
    for name, params in (("identity", {}), ("exp", {"t": 3.0}), ("logistic", {})):
        assert T.get_transform(name, **params).smoothing == "none"


# ------------------------------------------------------------------------------- monotonicity
MONOTONE_CASES = (
    [("identity", {}), ("log", {}), ("logit", {}), ("probit", {})]
    + [("exp", {"t": t}) for t in (-8.0, -2.0, -0.5, 0.0, 0.5, 2.0, 8.0)]
    + [("power", {"p": p}) for p in (-2.0, -0.5, 0.0, 0.5, 1.0, 2.0)]
    + [("logistic", {"s": s, "c": c}) for s in (1.0, 10.0) for c in (0.2, 0.5, 0.8)]
    + [("optimal", {"u": np.linspace(0, 1, 11), "phi": np.linspace(0, 1, 11) ** 3 - 2})]
)


@pytest.mark.parametrize("name,params", MONOTONE_CASES,
                         ids=[n + "".join(f"-{k}{v}" for k, v in p.items() if k in "tpsc")
                              for n, p in MONOTONE_CASES])
def test_strictly_increasing_on_a_grid(name, params):
    values = _apply(name, **params)
    assert np.all(np.isfinite(values))
    assert np.all(np.diff(values) > 0), f"{name} {params} is not strictly increasing"


# ---------------------------------------------------------------------------- optimal table
def test_optimal_interpolates_like_numpy_and_loads_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    grid = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0, 1, 30)]))
    phi = np.cumsum(rng.uniform(0.1, 1.0, grid.size))
    queries = rng.uniform(-0.1, 1.1, 200).astype(np.float32)  # includes both ends' clamping
    want = np.interp(queries.astype(np.float64), grid, phi)
    np.testing.assert_allclose(_apply("optimal", queries, u=grid, phi=phi), want, rtol=1e-5,
                               atol=1e-5)
    path = str(tmp_path / "phi_star.npz")
    np.savez(path, u=grid, phi=phi)
    loaded = T.get_transform("optimal", path=path)
    np.testing.assert_allclose(np.asarray(loaded(queries)), want, rtol=1e-5, atol=1e-5)
    assert loaded.params["path"] == path and loaded.params["size"] == grid.size


def test_optimal_rejects_bad_tables():
    with pytest.raises(ValueError, match="needs a table"):
        T.get_transform("optimal")
    with pytest.raises(ValueError, match="strictly increasing"):
        T.get_transform("optimal", u=[0.0, 0.5, 0.5, 1.0], phi=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        T.get_transform("optimal", u=[0.0, 1.0], phi=[0.0, np.nan])
    with pytest.raises(ValueError, match="equal length"):
        T.get_transform("optimal", u=[0.0, 0.5, 1.0], phi=[0.0, 1.0])
    with pytest.raises(ValueError, match="length >= 2"):   # one point: a constant, no transform
        T.get_transform("optimal", u=[0.5], phi=[1.0])


# ------------------------------------------------------------------------------ raw and errors
def test_raw_needs_the_raw_reward():
    raw = T.get_transform("raw")
    assert raw.uses_raw
    with pytest.raises(ValueError, match="raw"):
        raw(U)
    r = np.array([-3.5, 0.0, 12.25])
    out = raw(np.array([0.1, 0.5, 0.9]), raw=r)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), r.astype(np.float32))


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown transform 'expo'") as info:
        T.get_transform("expo", t=1.0)
    for name in ("identity", "log", "exp", "power", "logistic", "logit", "probit", "raw",
                 "optimal"):
        assert name in str(info.value)
    assert set(T.known_transforms()) == {"identity", "log", "exp", "power", "logistic", "logit",
                                         "probit", "raw", "optimal"}


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "two"])
def test_non_finite_or_non_numeric_t_names_t(bad):
    with pytest.raises(ValueError, match="'t'"):
        T.get_transform("exp", t=bad)


def test_other_parameter_errors():
    with pytest.raises(ValueError, match="'p'"):
        T.get_transform("power", p=math.nan)
    with pytest.raises(ValueError, match="s must be > 0"):
        T.get_transform("logistic", s=0.0)
    with pytest.raises(ValueError, match="floor"):
        T.get_transform("log", floor=1.5)
    # power's floor as log's: 2.0 made Phi constant (0.828 at p = 0.5 for every u), so every
    # advantage was 0 and nothing trained, without an error
    for floor in (2.0, 0.0, -1e-3):
        with pytest.raises(ValueError, match=r"transform 'power': floor must be in \(0, 1\)"):
            T.get_transform("power", p=0.5, floor=floor)
    with pytest.raises(ValueError, match="bad parameters"):
        T.get_transform("exp", q=1.0)


# --------------------------------------------------------------------------------------- jit
JIT_CASES = [("identity", {}), ("log", {}), ("exp", {"t": 3.0}), ("exp", {"t": -3.0}),
             ("power", {"p": 0.5}), ("logistic", {}), ("logit", {}), ("probit", {}),
             ("optimal", {"u": [0.0, 0.5, 1.0], "phi": [0.0, 2.0, 3.0]})]


@pytest.mark.parametrize("name,params", JIT_CASES)
def test_jit_matches_eager(name, params):
    transform = T.get_transform(name, **params)
    u = jnp.asarray(U.reshape(27, 37))
    eager = transform(u)
    jitted = jax.jit(lambda x: transform(x))(u)
    assert jitted.dtype == jnp.float32 and jitted.shape == (27, 37)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-7)


def test_raw_under_jit():
    raw = T.get_transform("raw")
    out = jax.jit(lambda u, r: raw(u, raw=r))(jnp.zeros(3), jnp.array([1.0, -2.0, 3.0]))
    np.testing.assert_array_equal(np.asarray(out), [1.0, -2.0, 3.0])


def test_a_transform_beyond_float32_rl_arithmetic_is_refused():
    # exp's range on [0, 1] is (e^t - 1) / t: 2.8e14 at t = 38, 5.9e15 at 40, inf at 100.
    assert float(T.get_transform("exp", t=38.0)(jnp.float32(1.0))) == pytest.approx(
        math.expm1(38.0) / 38.0, rel=1e-5)
    for t in (40.0, 100.0):
        with pytest.raises(ValueError, match=r"transform 'exp' with \{'t': %s\}.*'optimal'" % t):
            T.get_transform("exp", t=t)
    assert np.isfinite(np.asarray(T.get_transform("exp", t=-1000.0)(U))).all()  # bounded by 1/|t|
    # power with p < 0 is (floor^p - 1) / p at u = 0: (1e-6)^-3 / 3 = 3.3e17; a floor of 1e-4: 3.3e11.
    with pytest.raises(ValueError, match="raise the floor"):
        T.get_transform("power", p=-3.0)
    assert float(T.get_transform("power", p=-3.0, floor=1e-4)(jnp.float32(0.0))) == pytest.approx(
        (1e-4 ** -3 - 1) / -3, rel=1e-5)
    with pytest.raises(ValueError, match=r"config.transform: transform 'exp'"):
        T.transform_from_config({"name": "exp", "t": 100.0})
    # The analytic tool computes in float64, where t = 100 is fine: (e^100 - 1) / 100.
    with jax.enable_x64(True):
        phi = T.get_transform("exp", t=100.0, float32_range=False).fn(jnp.float64(1.0))
    assert float(phi) == pytest.approx(math.expm1(100.0) / 100.0, rel=1e-12)
    built = jax.jit(lambda u: T.get_transform("exp", t=4.0)(u))(U)   # built inside a trace
    np.testing.assert_allclose(np.asarray(built), np.expm1(4.0 * U) / 4.0, rtol=1e-5)


def test_building_transforms_and_configs_starts_no_jax_backend():
    """`experiments/compile_check.py` sets XLA's dump flags after its config is loaded, and XLA
    reads them when a backend starts: building transforms (as config validation does) must not
    start one. The float32 range check once evaluated Phi with JAX and lost the TPU compiler's
    buffer report."""
    import subprocess
    import sys
    code = (
        "from jax._src import xla_bridge as xb\n"
        "from infalign_jax.core import transforms as T\n"
        "from infalign_jax.infra.config_utils import load_config_module\n"
        "for name, kw in [('identity', {}), ('log', {}), ('exp', {'t': 4.0}), ('power', {'p': -1.0}),"
        " ('logistic', {}), ('logit', {}), ('probit', {}), ('raw', {}),"
        " ('optimal', {'u': [0.0, 1.0], 'phi': [0.0, 2.0]})]:\n"
        "    T.get_transform(name, **kw)\n"
        "load_config_module('configs/pod.py').get_config('model=tiny,topology=v5e:2x2')\n"
        "load_config_module('configs/ctrl_exact.py').get_config()\n"
        "assert not xb.backends_are_initialized(), 'a backend was started'\n")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_transforms_range_is_its_values_on_the_unit_interval():
    u = np.concatenate([[0.0], np.linspace(1e-6, 1 - 1e-6, 20001), [1.0]])
    for name, kw in [("identity", {}), ("log", {}), ("exp", {"t": 4.0}), ("exp", {"t": -7.0}),
                     ("exp", {"t": 30.0}), ("power", {"p": -1.5}), ("power", {"p": 0.5}),
                     ("logistic", {"s": 3.0}), ("logit", {}), ("probit", {}),
                     ("optimal", {"u": [0.0, 1.0], "phi": [-3.0, 2.0]})]:
        tr = T.get_transform(name, **kw)
        with jax.enable_x64(True):
            values = np.asarray(tr.fn(jnp.asarray(u, jnp.float64)), np.float64)
        assert tr.sup_abs == pytest.approx(np.abs(values).max(), rel=1e-6), (name, kw)
    # past float32 RL's range (the analytic tool's float64 use): still the exact maximum,
    # (floor^p - 1) / p at u = 0, not an overflow guard's inf
    tr = T.get_transform("power", p=-6.0, float32_range=False)
    assert tr.sup_abs == pytest.approx((1e-6 ** -6.0 - 1.0) / 6.0, rel=1e-12)


def test_power_is_continuous_in_p_at_zero_on_the_calibration_it_reads():
    """K = 4 references, one response at each rank: Phi of the calibration each transform reads.
    p = +1e-7 read the unsmoothed C, whose 0 the floor mapped to log(1e-6) = -13.8, while
    p = -1e-7 and p = 0 (log) read the smoothed one (-1.6): a sweep over p jumped at 0."""
    ref = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    rewards = jnp.array([[0.0, 1.5, 2.5, 3.5, 5.0]])
    from infalign_jax.core.calibration import calibrate

    def phi(p):
        tr = T.get_transform("power", p=p)
        return np.asarray(tr(calibrate(rewards, ref, smoothing=tr.smoothing)), np.float64)[0]

    at_zero = phi(0.0)
    np.testing.assert_allclose(at_zero, np.log(np.arange(1, 6) / 5), rtol=1e-6)
    for p in (1e-7, -1e-7, 1e-3, -1e-3):
        np.testing.assert_allclose(phi(p), at_zero, atol=2e-3 if abs(p) > 1e-5 else 1e-5)
