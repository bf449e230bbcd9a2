"""Empirical calibration (infalign_jax/core/calibration.py, InfAlign Eq. 12) against independent
references: a plain-Python per-prompt loop, hand-computed values, monotone invariance, the
Unif[0,1] law of calibrated base draws, and sharded execution on 8 CPU devices."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from infalign_jax.core import calibration as cal

METHODS = ["search", "compare", "auto"]


# ------------------------------------------------------------------------ independent reference
# the numerator's offset and the denominator's K + 1 of each smoothing, written out
SMOOTHING_OFFSET = {"none": None, "add_one": 1.0, "centred": 0.5}


def loop_calibrate(rewards_BxM, rows, smoothing="none"):
    """Plain-Python Eq. 12: for each prompt and reward, count by hand over that prompt's list."""
    out = np.zeros(np.shape(rewards_BxM), np.float64)
    for b, row in enumerate(rows):
        row = [float(v) for v in row]
        for m, r in enumerate(np.asarray(rewards_BxM)[b]):
            less = sum(1 for v in row if v < r)
            equal = sum(1 for v in row if v == r)
            a = SMOOTHING_OFFSET[smoothing]
            out[b, m] = ((less + 0.5 * equal) / len(row) if a is None
                         else (less + 0.5 * equal + a) / (len(row) + 1))
    return out


def padded_table(rng, b, k_max, low=0, high=6):
    """Integer-valued rows of different lengths, sorted, padded with assorted garbage."""
    counts = rng.integers(1, k_max + 1, b)
    counts[0] = k_max
    rows = [rng.integers(low, high, c).astype(np.float32) for c in counts]
    pads = [np.inf, np.nan, -1e9, 0.0]
    table = np.zeros((b, k_max), np.float32)
    for i, row in enumerate(rows):
        table[i, :counts[i]] = np.sort(row)
        table[i, counts[i]:] = pads[i % len(pads)]
    return rows, table, counts.astype(np.int32)


# ---------------------------------------------------------------------- kernel against the loop
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("smoothing", sorted(SMOOTHING_OFFSET))
@pytest.mark.parametrize("k_max", [6, 40])  # below and above COMPARE_MAX_K
def test_kernel_matches_loop_reference_with_ties_and_padding(method, smoothing, k_max):
    rng = np.random.default_rng(k_max)
    rows, table, counts = padded_table(rng, 9, k_max)
    rewards = rng.integers(-1, 8, (9, 11)).astype(np.float32)  # ties and out-of-range values
    want = loop_calibrate(rewards, rows, smoothing)
    got = cal.calibrate(rewards, table, counts, smoothing=smoothing, method=method)
    assert got.shape == (9, 11) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-7)


def test_search_and_compare_agree_exactly_on_continuous_and_tied_data():
    rng = np.random.default_rng(1)
    rows, table, counts = padded_table(rng, 16, 30, low=-3, high=3)
    rewards = np.concatenate([rng.integers(-4, 4, (16, 8)), rng.normal(0, 2, (16, 8))], 1)
    for smoothing in cal.SMOOTHINGS:
        a = cal.calibrate(rewards, table, counts, smoothing=smoothing, method="search")
        b = cal.calibrate(rewards, table, counts, smoothing=smoothing, method="compare")
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_rows_without_counts():
    rng = np.random.default_rng(2)
    ref = np.sort(rng.integers(0, 4, (3, 5)), 1).astype(np.float32)
    rewards = rng.integers(0, 5, (3, 4)).astype(np.float32)
    for method in METHODS:
        got = cal.calibrate(rewards, ref, method=method)
        np.testing.assert_allclose(np.asarray(got), loop_calibrate(rewards, ref), atol=1e-7)


# --------------------------------------------------------------------------- hand-made values
@pytest.mark.parametrize("method", METHODS)
def test_hand_computed_values(method):
    inf = np.inf
    table = np.array([[1, 2, 2, 3], [5, inf, inf, inf]], np.float32)
    counts = np.array([4, 1], np.int32)
    rewards = np.array([[0, 1, 2, 2.5, 3, 4, -inf], [5, 4, 6, inf, -inf, 5, 5]], np.float32)
    # Row 0: ref [1,2,2,3]. r=2 -> (1 + 1/2*2)/4 = 0.5; r=1 -> (0 + 1/2)/4; r=3 -> (3 + 1/2)/4.
    # Row 1: one valid reference 5; the +inf padding must not tie with r = +inf.
    want = np.array([[0, 0.125, 0.5, 0.75, 0.875, 1, 0], [0.5, 0, 1, 1, 0, 0.5, 0.5]])
    got = cal.calibrate(rewards, table, counts, method=method)
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    # Smoothed: (#{ref < r} + 1/2 #{ref = r} + 1) / (K + 1); r=2 -> (1 + 1 + 1)/5.
    want_s = np.array([[1 / 5, 1.5 / 5, 3 / 5, 4 / 5, 4.5 / 5, 1, 1 / 5],
                       [0.75, 1 / 2, 1, 1, 1 / 2, 0.75, 0.75]])
    got_s = cal.calibrate(rewards, table, counts, smoothing="add_one", method=method)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-7)
    # Centred: (#{ref < r} + 1/2 #{ref = r} + 1/2) / (K + 1); r=2 -> (1 + 1 + 1/2)/5.
    want_c = np.array([[0.5 / 5, 1 / 5, 2.5 / 5, 3.5 / 5, 4 / 5, 4.5 / 5, 0.5 / 5],
                       [0.5, 0.25, 0.75, 0.75, 0.25, 0.5, 0.5]])
    got_c = cal.calibrate(rewards, table, counts, smoothing="centred", method=method)
    np.testing.assert_allclose(np.asarray(got_c), want_c, rtol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_inside_kernel_gives_nan(method):
    table = np.array([[1, 2, 3, np.nan], [1, np.nan, 3, 4], [1, 2, 3, 4]], np.float32)
    counts = np.array([3, 4, 0], np.int32)
    rewards = np.array([[np.nan, 2.0], [2.0, 2.0], [2.0, 2.0]], np.float32)
    for smoothing, want in (("none", 0.5), ("add_one", 0.625), ("centred", 0.5)):
        got = np.asarray(cal.calibrate(rewards, table, counts, smoothing=smoothing,
                                       method=method))
        # (1 + 1/2)/3, (1 + 1/2 + 1)/4 and (1 + 1/2 + 1/2)/4
        assert np.isnan(got[0, 0]) and got[0, 1] == want
        assert np.all(np.isnan(got[1]))  # NaN in the valid part poisons the whole row
        assert np.all(np.isnan(got[2]))  # K_b = 0 is never silently 1/2


def test_kernel_argument_errors():
    ok = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="method"):
        cal.calibrate(ok, ok, method="fast")
    with pytest.raises(ValueError, match="rewards_BxM"):
        cal.calibrate(np.zeros(3), ok)
    with pytest.raises(ValueError, match="prompts"):
        cal.calibrate(np.zeros((4, 3)), ok)
    with pytest.raises(ValueError, match="ref_count_B"):
        cal.calibrate(ok, ok, np.array([1, 4]))
    with pytest.raises(ValueError, match="ref_count_B"):
        cal.calibrate(ok, ok, np.array([1, 2, 3]))
    # a concrete jax array too (it was clipped to [0, K] without a word); traced ones are
    with pytest.raises(ValueError, match=r"ref_count_B must lie in \[0, K=3\]"):
        cal.calibrate(ok, ok, jnp.array([1, 4]))
    jax.jit(lambda c: cal.calibrate(ok, ok, c))(jnp.array([1, 4]))
    # ... clipped: K + 2 counts as K (1.5 is above 2 of the 3 references), -1 as 0 (NaN)
    got = jax.jit(lambda c: cal.calibrate(np.full((2, 1), 1.5, np.float32),
                                          np.array([[0.0, 1.0, 2.0]] * 2, np.float32), c))(
        jnp.array([5, -1]))
    assert float(got[0, 0]) == pytest.approx(2 / 3, rel=1e-6) and np.isnan(float(got[1, 0]))
    # counts that are not integers were truncated: 3.9 read as K = 3 (C = 1.0 for 0.75 at K = 4)
    table = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
    for counts in (np.array([3.9]), [2.5], np.array([True]), jnp.array([3.9])):
        with pytest.raises(ValueError, match="integer counts"):
            cal.calibrate(np.array([[2.5]], np.float32), table, counts)
    with pytest.raises(ValueError, match="integer counts"):
        jax.jit(lambda c: cal.calibrate(ok, ok, c))(jnp.array([1.0, 2.0]))
    assert float(cal.calibrate(np.array([[2.5]], np.float32), table, np.array([4]))[0, 0]) == 0.75


# --------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("method", ["search", "compare"])
@pytest.mark.parametrize("fmap", [np.exp, lambda x: x ** 3 + x, lambda x: 2 * x - 7],
                         ids=["exp", "cubic", "affine"])
def test_invariant_to_strictly_increasing_maps(method, fmap):
    rng = np.random.default_rng(4)
    rows, table, counts = padded_table(rng, 6, 10, low=-3, high=4)
    rewards = rng.integers(-4, 5, (6, 9)).astype(np.float64) / 2  # half-integers: some ties
    base = cal.calibrate(rewards, table, counts, method=method)
    mapped_table = np.where(np.arange(10) < counts[:, None], fmap(table.astype(np.float64)), np.inf)
    mapped = cal.calibrate(fmap(rewards), mapped_table, counts, method=method)
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(base))
    np.testing.assert_allclose(np.asarray(base), loop_calibrate(rewards, rows), atol=1e-7)
    mapped_s = cal.calibrate(fmap(rewards), mapped_table, counts, smoothing="add_one",
                             method=method)
    np.testing.assert_allclose(np.asarray(mapped_s), loop_calibrate(rewards, rows, "add_one"),
                               atol=1e-7)


def test_calibrated_base_draws_are_uniform_and_a_better_policy_is_not():
    """C(x, Y) ~ Unif[0,1] for Y ~ pi_ref with continuous rewards (spec section 0); a policy
    shifted by delta standard deviations has mean calibrated reward Phi(delta / sqrt 2)."""
    rng = np.random.default_rng(5)
    b, k, m, delta = 4, 20000, 300, 0.3
    mu, sigma = rng.normal(0, 3, (b, 1)), rng.uniform(0.5, 2, (b, 1))
    table = np.sort(mu + sigma * rng.normal(size=(b, k)), 1)
    fresh = mu + sigma * rng.normal(size=(b, m))
    better = mu + sigma * (rng.normal(size=(b, m)) + delta)
    c_fresh = np.asarray(cal.calibrate(fresh, table)).ravel()
    c_better = np.asarray(cal.calibrate(better, table)).ravel()
    assert stats.kstest(c_fresh, "uniform").pvalue > 0.01
    assert stats.kstest(c_better, "uniform").pvalue < 1e-4
    assert abs(c_better.mean() - stats.norm.cdf(delta / np.sqrt(2))) < 0.03
    assert abs(c_fresh.mean() - 0.5) < 0.03


# ----------------------------------------------------------------------- jit, vmap, sharding
@pytest.mark.parametrize("method", ["search", "compare"])
def test_jit_vmap_and_sharded_over_8_devices_equal_unsharded(method):
    rng = np.random.default_rng(6)
    rows, table, counts = padded_table(rng, 16, 12)
    rewards = rng.integers(-1, 7, (16, 5)).astype(np.float32)
    f = functools.partial(cal.calibrate, method=method)
    eager = np.asarray(f(rewards, table, counts))
    np.testing.assert_allclose(eager, loop_calibrate(rewards, rows), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(rewards, table, counts)), eager)

    # vmap over a leading axis of 2 batches of 8 prompts each.
    stacked = jax.vmap(f)(rewards.reshape(2, 8, 5), table.reshape(2, 8, 12), counts.reshape(2, 8))
    np.testing.assert_array_equal(np.asarray(stacked).reshape(16, 5), eager)

    devices = jax.devices()
    assert len(devices) == 8, "conftest should provide 8 CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    rows_sharding = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, rows_sharding) for x in (rewards, table, counts)]
    sharded_f = jax.jit(f, in_shardings=(rows_sharding,) * 3, out_shardings=rows_sharding)
    out = sharded_f(*args)
    assert out.sharding.is_equivalent_to(rows_sharding, 2)
    assert len(out.addressable_shards) == 8 and out.addressable_shards[0].data.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(out), eager)


# --------------------------------------------------------------------------- reference tables
def _sampler_output():
    ids = ["p0", "p1", "p2", "p3"]
    rewards = np.array([[3, 1, np.nan, 2, 2],
                        [0.5, 9, 9, 9, 9],
                        [4, 4, 4, 4, 4],
                        [7, 6, 5, np.inf, 8]])
    valid = np.array([[1, 1, 0, 1, 1],
                      [1, 0, 0, 0, 0],
                      [1, 1, 1, 1, 1],
                      [1, 1, 1, 0, 0]], bool)
    return ids, rewards, valid


def _table(**kw):
    ids, rewards, valid = _sampler_output()
    kw = {"base_model_id": "base-A", "reward_model_id": "rm-A", **kw}
    return cal.build_reference_table(ids, rewards, valid, **kw)


def test_build_sorts_pads_and_ignores_invalid_samples():
    table = _table()
    np.testing.assert_array_equal(table.counts_B, [4, 1, 5, 3])
    inf = np.inf
    np.testing.assert_array_equal(table.sorted_rewards_BxK, np.array(
        [[1, 2, 2, 3, inf], [0.5, inf, inf, inf, inf], [4, 4, 4, 4, 4], [5, 6, 7, inf, inf]],
        np.float32))
    assert table.prompt_ids.tolist() == ["p0", "p1", "p2", "p3"]
    assert table.version == cal.TABLE_VERSION and table.created["max_valid"] == 5
    assert table.base_model_id == "base-A" and table.reward_model_id == "rm-A"
    # Columns beyond the largest valid count are trimmed.
    ids, rewards, valid = _sampler_output()
    valid[2, 3:] = False
    small = cal.build_reference_table(ids, rewards, valid, base_model_id="b", reward_model_id="r")
    assert small.sorted_rewards_BxK.shape == (4, 4)


def test_calibrate_with_table_matches_loop_reference():
    table = _table()
    ids, rewards, valid = _sampler_output()
    query_ids = ["p3", "p0", "p2", "p0"]
    queries = np.array([[5, 6.5, 9], [2, 0, 3], [4, 3, 5], [2.5, 1, 1]])
    rows = [rewards[ids.index(q)][valid[ids.index(q)]] for q in query_ids]
    for smoothing in cal.SMOOTHINGS:
        got = cal.calibrate_with_table(table, query_ids, queries, smoothing=smoothing)
        np.testing.assert_allclose(np.asarray(got), loop_calibrate(queries, rows, smoothing),
                                   atol=1e-7)
    one = cal.calibrate_with_table(table, ["p0"], [[2.0]])
    np.testing.assert_allclose(np.asarray(one), [[0.5]])  # ref [1, 2, 2, 3]


def test_prompts_with_too_few_samples_are_reported_or_dropped():
    ids, rewards, valid = _sampler_output()
    valid[1] = False
    with pytest.raises(cal.ReferenceTableError, match="'p1'"):
        cal.build_reference_table(ids, rewards, valid, base_model_id="b", reward_model_id="r")
    with pytest.raises(cal.ReferenceTableError, match=r"min_count=4.*'p1', 'p3'"):
        _table(min_count=4)
    table = _table(min_count=4, on_empty="drop")
    assert table.prompt_ids.tolist() == ["p0", "p2"] and table.dropped_prompt_ids == ("p1", "p3")
    with pytest.raises(cal.ReferenceTableError, match="dropped"):
        table.lookup(["p0", "p3"])
    with pytest.raises(cal.ReferenceTableError, match="every prompt"):
        _table(min_count=6, on_empty="drop")
    with pytest.raises(ValueError, match="on_empty"):
        _table(on_empty="ignore")


def test_build_input_errors():
    ids, rewards, valid = _sampler_output()
    rewards[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*'p2'"):
        cal.build_reference_table(ids, rewards, valid, base_model_id="b", reward_model_id="r")
    with pytest.raises(ValueError, match="duplicate.*'p0'"):
        _table_from(["p0", "p1", "p0", "p3"])
    with pytest.raises(ValueError, match="valid_BxK"):
        cal.build_reference_table(ids, rewards, valid[:, :3], base_model_id="b",
                                  reward_model_id="r")
    with pytest.raises(ValueError, match="reward_model_id"):
        cal.build_reference_table(ids, rewards, valid, base_model_id="b", reward_model_id="")


def test_table_invariants_checked_on_construction_and_load(tmp_path):
    with pytest.raises(ValueError, match="mixes strings"):
        _table_from(["p0", 1, "p2", "p3"])
    ids = np.array(["a", "b"])
    with pytest.raises(cal.ReferenceTableError, match=r"ascending.*'b'"):
        cal.ReferenceTable(ids, np.array([[1, 2, np.inf], [3, 1, 5]]), np.array([2, 3]),
                           base_model_id="b", reward_model_id="r")
    with pytest.raises(cal.ReferenceTableError, match=r"finite.*'a'"):
        cal.ReferenceTable(ids, np.array([[1, np.nan, 0], [3, 4, 5]]), np.array([2, 3]),
                           base_model_id="b", reward_model_id="r")
    with pytest.raises(cal.ReferenceTableError, match="counts_B"):
        cal.ReferenceTable(ids, np.zeros((2, 3)), np.array([0, 3]), base_model_id="b",
                           reward_model_id="r")
    # Unsorted padding is fine; a file whose arrays break the invariants names the file.
    ok = cal.ReferenceTable(ids, np.array([[1, 2, -7], [3, 4, 5]]), np.array([2, 3]),
                            base_model_id="b", reward_model_id="r")
    path = str(tmp_path / "tampered.npz")
    ok.save(path)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["counts_B"] = np.array([3, 3])
    np.savez(path, **arrays)
    with pytest.raises(cal.ReferenceTableError, match="tampered.npz"):
        cal.load_reference_table(path)


def _table_from(ids):
    _, rewards, valid = _sampler_output()
    return cal.build_reference_table(ids, rewards, valid, base_model_id="b", reward_model_id="r")


def test_lookup_gathers_rows_and_lists_missing_ids():
    table = _table()
    ref, counts = table.lookup(["p2", "p0"])
    np.testing.assert_array_equal(counts, [5, 4])
    np.testing.assert_array_equal(ref[1, :4], [1, 2, 2, 3])
    with pytest.raises(cal.ReferenceTableError, match=r"2 prompt id.*'zz', 'p9'"):
        table.lookup(["p0", "zz", "p9"])
    int_table = _table_from([10, 11, 12, 13])
    np.testing.assert_array_equal(int_table.lookup(np.array([13, 10]))[1], [3, 4])
    with pytest.raises(cal.ReferenceTableError, match="'10'"):
        int_table.lookup(["10"])  # a string id never matches an int id


def test_calibrate_with_table_rejects_non_finite_rewards():
    table = _table()
    with pytest.raises(ValueError, match=r"rewards_BxM.*'p2'"):
        cal.calibrate_with_table(table, ["p0", "p2"], [[1.0, 2.0], [np.nan, 1.0]])
    with pytest.raises(ValueError, match=r"rewards_BxM.*'p0'"):
        cal.calibrate_with_table(table, ["p0", "p2"], [[np.inf, 2.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="prompt_ids"):
        cal.calibrate_with_table(table, ["p0"], [[1.0], [2.0]])


@pytest.mark.parametrize("ids", [["p0", "p1", "p2", "p3"], [7, 3, 5, 1]], ids=["str", "int"])
def test_save_load_round_trip(tmp_path, ids):
    table = _table_from(ids)
    path = str(tmp_path / "ref.npz")
    table.save(path)
    table.save(path)  # overwriting is atomic too
    assert os.listdir(tmp_path) == ["ref.npz"]  # no temp files left behind
    loaded = cal.load_reference_table(path, expected_reward_model_id="r",
                                      expected_base_model_id="b")
    assert loaded.prompt_ids.tolist() == ids and type(loaded.prompt_ids.tolist()[0]) is type(ids[0])
    np.testing.assert_array_equal(loaded.sorted_rewards_BxK, table.sorted_rewards_BxK)
    np.testing.assert_array_equal(loaded.counts_B, table.counts_B)
    assert loaded.metadata() == table.metadata()
    np.testing.assert_array_equal(loaded.lookup(ids[::-1])[0], table.lookup(ids[::-1])[0])


def test_dropped_ids_survive_round_trip(tmp_path):
    table = _table(min_count=4, on_empty="drop")
    loaded = cal.load_reference_table(table.save(str(tmp_path / "t.npz")))
    assert loaded.dropped_prompt_ids == ("p1", "p3")


def test_load_rejects_other_models_versions_and_corrupt_files(tmp_path):
    path = str(tmp_path / "ref.npz")
    _table().save(path)
    with pytest.raises(cal.ReferenceTableError, match=r"reward model 'rm-A'.*'rm-B'"):
        cal.load_reference_table(path, expected_reward_model_id="rm-B")
    with pytest.raises(cal.ReferenceTableError, match=r"base model 'base-A'.*'base-Z'"):
        cal.load_reference_table(path, expected_base_model_id="base-Z")

    old = dataclasses.replace(_table(), version=cal.TABLE_VERSION + 98)
    old_path = str(tmp_path / "old.npz")
    old.save(old_path)
    with pytest.raises(cal.ReferenceTableError,
                       match=f"old.npz has version {cal.TABLE_VERSION + 98}"):
        cal.load_reference_table(old_path)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a table at all" * 10)
    with pytest.raises(cal.ReferenceTableError, match="garbage.npz"):
        cal.load_reference_table(str(garbage))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(cal.ReferenceTableError, match="truncated.npz"):
        cal.load_reference_table(str(truncated))
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, prompt_ids=np.array(["a"]), sorted_rewards_BxK=np.zeros((1, 1)),
             counts_B=np.ones(1))
    with pytest.raises(cal.ReferenceTableError, match="no_meta.npz"):
        cal.load_reference_table(str(no_meta))
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        cal.load_reference_table(str(tmp_path / "absent.npz"))


def test_smoothed_calibration_tells_a_tie_with_every_reference_from_a_loss():
    """A binary reward: all K = 8 references score 1, responses [0, 0, 1, 1]. The smoothed
    (#{ref < r} + 1) / (K + 1) gave all four 1/9, so log's RLOO advantages were 0 and a success
    was scored as a failure; with Eq. 12's half count the successes get (4 + 1) / 9."""
    from infalign_jax.core.advantages import rloo_advantages
    got = np.asarray(cal.calibrate(jnp.array([[0.0, 0.0, 1.0, 1.0]]), jnp.ones((1, 8)),
                                   smoothing="add_one"))
    np.testing.assert_allclose(got, [[1 / 9, 1 / 9, 5 / 9, 5 / 9]], rtol=1e-7)
    adv = np.asarray(rloo_advantages(jnp.log(jnp.asarray(got))))
    assert adv[0, 2] > 0 > adv[0, 0]
    # without ties it is vBoN's estimator (#{ref < r} + 1) / (K + 1)
    ref = jnp.arange(8.0)[None]
    np.testing.assert_allclose(np.asarray(cal.calibrate(jnp.array([[-1.0, 3.5, 9.0]]), ref,
                                                        smoothing="add_one")),
                               [[1 / 9, 5 / 9, 1.0]], rtol=1e-7)


def test_centred_calibration_is_symmetric_and_evenly_spaced():
    """Reversing the reward's order maps the centred calibration to 1 minus itself, as it does
    C_hat, and its values step by 1 / (2 (K + 1)) a half rank with the ends half a rank inside
    (0, 1): (K C_hat + 1/2) / (K + 1) in {1/2, 1, ..., K + 1/2} / (K + 1). The add-one
    smoothing is not symmetric (it reaches 1 but never 0)."""
    ref = jnp.arange(16.0)[None]                        # K = 16
    r = jnp.arange(-0.5, 16.0, 0.5)[None]              # below all, every tie and gap, above all
    c = np.asarray(cal.calibrate(r, ref, smoothing="centred"), np.float64)
    c_rev = np.asarray(cal.calibrate(-r, -ref[:, ::-1], smoothing="centred"), np.float64)
    np.testing.assert_allclose(c + c_rev, 1.0, atol=1e-7)
    np.testing.assert_allclose(np.diff(c[0]), 0.5 / 17, atol=1e-7)
    assert c[0, 0] == pytest.approx(0.5 / 17) and c[0, -1] == pytest.approx(16.5 / 17)
    a = np.asarray(cal.calibrate(r, ref, smoothing="add_one"), np.float64)
    a_rev = np.asarray(cal.calibrate(-r, -ref[:, ::-1], smoothing="add_one"), np.float64)
    assert a[0, -1] == 1.0 and np.abs(a + a_rev - 1.0).max() > 0.05


def test_rewards_and_table_are_compared_in_their_common_dtype_under_x64():
    """With x64 on, float64 rewards and references are compared in float64 (a gap of 1e-12 is
    an order, not a tie), while `calibrate_with_table` first rounds the rewards to its stored
    table's float32, so a reward equal to a stored one before rounding stays a tie."""
    with jax.enable_x64(True):
        got = cal.calibrate(np.array([[1.0 + 1e-12, 1.0]]), np.array([[1.0]]))
        np.testing.assert_array_equal(np.asarray(got), [[1.0, 0.5]])
        table = cal.build_reference_table(["p"], np.array([[0.1, 0.3]]), base_model_id="base",
                                          reward_model_id="rm")
        got = cal.calibrate_with_table(table, ["p"], np.array([[0.1, 0.3]]))
        np.testing.assert_array_equal(np.asarray(got), [[0.25, 0.75]])


def test_unknown_smoothing_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="smoothing must be one of.*'centred'.*got 'both'"):
        cal.calibrate(jnp.zeros((1, 2)), jnp.zeros((1, 3)), smoothing="both")
