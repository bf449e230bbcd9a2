"""Selection procedures against plain-Python loop references (infalign_jax/core/selection.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.core import selection as inf

B, N, D, E = 7, 9, 5, 4
VARIANTS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def _loop_argmax(scores, valid):
    """Reference: first index of the maximum over valid, non-NaN entries; -1 if none."""
    out = []
    for row, ok in zip(scores, valid):
        best, best_i = None, -1
        for i, (s, v) in enumerate(zip(row, ok)):
            if not v or math.isnan(s):
                continue
            if best_i == -1 or s > best:
                best, best_i = s, i
        out.append(best_i)
    return np.array(out)


def _inputs(seed, ties=True):
    rng = np.random.default_rng(seed)
    # Small integers force ties, so the lowest-index tie-break is exercised.
    rewards = rng.integers(0, 4, (B, N)).astype(np.float32) if ties else rng.normal(size=(B, N))
    valid = rng.random((B, N)) < 0.7
    valid[0] = False  # one row with no valid candidate
    valid[1] = True
    return rewards.astype(np.float32), valid


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_and_worst_of_n_match_loop(variant, seed):
    rewards, valid = _inputs(seed)
    sel = variant(inf.best_of_n)(jnp.asarray(rewards), jnp.asarray(valid))
    np.testing.assert_array_equal(sel.index_B, _loop_argmax(rewards, valid))
    np.testing.assert_array_equal(sel.has_valid_B, valid.any(1))
    sel = variant(inf.worst_of_n)(jnp.asarray(rewards), jnp.asarray(valid))
    np.testing.assert_array_equal(sel.index_B, _loop_argmax(-rewards, valid))
    # Invalid candidates are never chosen, even when they carry the largest reward.
    rewards_hacked = np.where(valid, rewards, 1e9).astype(np.float32)
    idx = np.asarray(variant(inf.best_of_n)(jnp.asarray(rewards_hacked), jnp.asarray(valid)).index_B)
    assert idx[0] == -1
    assert all(valid[b, i] for b, i in enumerate(idx) if i >= 0)


def test_nan_and_infinite_scores():
    scores = jnp.array([[1.0, jnp.nan, 2.0],           # NaN never wins
                        [-jnp.inf, -jnp.inf, 5.0],     # valid -inf beats invalid 5
                        [jnp.nan, jnp.nan, jnp.nan],   # no usable candidate
                        [0.0, jnp.inf, jnp.inf],       # +inf wins, first of the ties
                        [7.0, -jnp.inf, -jnp.inf],     # every valid one -inf, invalid first
                        [-jnp.inf, -1e38, 3.0]])       # the lowest finite float beats -inf
    valid = jnp.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]], bool)
    sel = inf.select_by_score(scores, valid)
    np.testing.assert_array_equal(sel.index_B, [2, 0, -1, 1, 1, 1])
    np.testing.assert_array_equal(sel.has_valid_B, [True, True, False, True, True, True])
    with pytest.raises(ValueError, match=r"scores_BxN: 1 prompt row.*\[2\]"):
        inf.checked(sel)
    assert inf.checked(inf.best_of_n(jnp.ones((2, 3)))).index_B.tolist() == [0, 0]


def test_first_n_candidates_and_bad_n():
    rewards, valid = _inputs(3, ties=False)
    for n in (1, 4, N):
        sel = inf.best_of_n(jnp.asarray(rewards), jnp.asarray(valid), n=n)
        np.testing.assert_array_equal(sel.index_B, _loop_argmax(rewards[:, :n], valid[:, :n]))
    for bad, why in ((0, "n must be >= 1"), (-1, "n must be >= 1"), (N + 1, f"n={N + 1} exceeds")):
        with pytest.raises(ValueError, match=why):
            inf.best_of_n(jnp.asarray(rewards), n=bad)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        inf.rbon_kl(jnp.asarray(rewards), jnp.asarray(rewards), -0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        inf.rbon_wd(jnp.asarray(rewards), jnp.ones((B, N, D)), float("nan"))
    # numpy and jax scalars too (they passed, and a negative beta rewarded a low log pi_ref)
    for negative in (np.float32(-1.0), jnp.float32(-1.0), np.array(-0.5)):
        with pytest.raises(ValueError, match="beta must be >= 0"):
            inf.rbon_kl(jnp.asarray(rewards), jnp.asarray(rewards), negative)
    jax.jit(lambda b: inf.rbon_kl(jnp.asarray(rewards), jnp.asarray(rewards), b).index_B)(-1.0)
    with pytest.raises(ValueError, match="exceeds"):
        inf.rbon_wd(jnp.asarray(rewards), jnp.ones((B, N, D)), 0.1, n=N + 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbon_kl_matches_loop_and_beta_zero_is_bon(variant):
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=(B, N)).astype(np.float32)
    logp = (-rng.gamma(3.0, 10.0, size=(B, N))).astype(np.float32)
    valid = rng.random((B, N)) < 0.8
    for beta in (0.01, 0.1, 1.0):
        ref = _loop_argmax([[r + beta * lp for r, lp in zip(rr, ll)] for rr, ll in zip(rewards, logp)],
                           valid)
        sel = variant(inf.rbon_kl)(jnp.asarray(rewards), jnp.asarray(logp), beta, jnp.asarray(valid))
        np.testing.assert_array_equal(sel.index_B, ref)
    logp[:, 0] = -np.inf  # impossible under pi_ref: must not matter at beta = 0
    bon = inf.best_of_n(jnp.asarray(rewards), jnp.asarray(valid)).index_B
    sel = variant(inf.rbon_kl)(jnp.asarray(rewards), jnp.asarray(logp), 0.0, jnp.asarray(valid))
    np.testing.assert_array_equal(sel.index_B, bon)


def _loop_mean_cos(emb, valid):
    out = np.zeros(valid.shape)
    for b in range(emb.shape[0]):
        js = [j for j in range(emb.shape[1]) if valid[b, j]]
        for i in range(emb.shape[1]):
            sims = []
            for j in js:  # j = i included, as in Jinnai et al.'s code
                a, c = emb[b, i].astype(np.float64), emb[b, j].astype(np.float64)
                sims.append(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
            out[b, i] = np.mean(sims) if sims else 0.0
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbon_wd_matches_loop(variant):
    rng = np.random.default_rng(5)
    rewards = rng.normal(size=(B, N)).astype(np.float32)
    emb = rng.normal(size=(B, N, D)).astype(np.float32)
    valid = rng.random((B, N)) < 0.8
    valid[0] = True
    for mask in (None, valid):
        ok = np.ones((B, N), bool) if mask is None else mask
        closeness = _loop_mean_cos(emb, ok)
        got = inf.mean_cosine_similarity(jnp.asarray(emb), None if mask is None else jnp.asarray(mask))
        np.testing.assert_allclose(got, closeness, atol=1e-5)
        for beta in (0.0, 0.3, 3.0):
            ref = _loop_argmax(rewards + beta * closeness, ok)
            sel = variant(inf.rbon_wd)(jnp.asarray(rewards), jnp.asarray(emb), beta,
                                       None if mask is None else jnp.asarray(mask))
            np.testing.assert_array_equal(sel.index_B, ref)
    np.testing.assert_array_equal(inf.rbon_wd(jnp.asarray(rewards), jnp.asarray(emb), 0.0).index_B,
                                  inf.best_of_n(jnp.asarray(rewards)).index_B)


def test_rbon_wd_ignores_what_invalid_candidates_hold():
    """An invalid candidate's embedding (NaN, inf) reaches neither the valid candidates'
    closeness nor the choice: the same as with a finite one there."""
    rng = np.random.default_rng(6)
    rewards = rng.normal(size=(B, N)).astype(np.float32)
    emb = rng.normal(size=(B, N, D)).astype(np.float32)
    valid = np.ones((B, N), bool)
    valid[:, -1] = False
    closeness = _loop_mean_cos(emb, valid)
    ref = _loop_argmax(rewards + 0.5 * closeness, valid)
    for junk in (np.nan, np.inf):
        bad = emb.copy()
        bad[:, -1] = junk
        got = inf.mean_cosine_similarity(jnp.asarray(bad), jnp.asarray(valid))
        np.testing.assert_allclose(np.asarray(got)[valid], closeness[valid], atol=1e-5)
        sel = inf.rbon_wd(jnp.asarray(rewards), jnp.asarray(bad), 0.5, jnp.asarray(valid))
        np.testing.assert_array_equal(sel.index_B, ref)


def test_rbon_wd_includes_self_similarity():
    # Two orthogonal embeddings: mean over {self (1), other (0)} = 1/2 each, not 0.
    emb = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
    np.testing.assert_allclose(inf.mean_cosine_similarity(emb), [[0.5, 0.5]], atol=1e-7)
    # An all-zero embedding has cosine 0 with everything (itself included), not NaN; a row
    # without a valid candidate has no reference, and its mean is 0.
    emb = jnp.array([[[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]])
    np.testing.assert_allclose(inf.mean_cosine_similarity(emb), [[2 / 3, 0.0, 2 / 3]], atol=1e-7)
    np.testing.assert_array_equal(inf.mean_cosine_similarity(emb, jnp.zeros((1, 3), bool)),
                                  [[0.0, 0.0, 0.0]])
    # A near-duplicate pair outweighs a slightly higher-reward outlier once beta is large.
    emb = jnp.array([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]])
    rewards = jnp.array([[0.0, 0.0, 0.1]])
    assert int(inf.rbon_wd(rewards, emb, 0.0).index_B[0]) == 2
    assert int(inf.rbon_wd(rewards, emb, 1.0).index_B[0]) in (0, 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("penalty", ["std", "var"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_uncertainty_bon_matches_loop(variant, penalty, ddof):
    rng = np.random.default_rng(6)
    rewards = rng.normal(size=(E, B, N)).astype(np.float32)
    valid = rng.random((B, N)) < 0.8
    for k in (0.5, 2.0):
        scores = np.zeros((B, N))
        for b in range(B):
            for i in range(N):
                xs = [float(rewards[e, b, i]) for e in range(E)]
                mu = sum(xs) / E
                var = sum((x - mu) ** 2 for x in xs) / (E - ddof)
                scores[b, i] = mu - k * (math.sqrt(var) if penalty == "std" else var)
        fn = lambda r, v: inf.uncertainty_bon(r, k, penalty, v, ddof=ddof)  # noqa: E731
        sel = variant(fn)(jnp.asarray(rewards), jnp.asarray(valid))
        np.testing.assert_array_equal(sel.index_B, _loop_argmax(scores, valid))
    sel = inf.uncertainty_bon(jnp.asarray(rewards), 0.0, penalty, jnp.asarray(valid))
    np.testing.assert_array_equal(sel.index_B, _loop_argmax(rewards.mean(0), valid))


def test_uncertainty_bad_arguments():
    r = jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="penalty"):
        inf.uncertainty_bon(r, 1.0, "mad")
    with pytest.raises(ValueError, match="k"):
        inf.uncertainty_bon(r, -1.0)
    with pytest.raises(ValueError, match="ddof"):
        inf.uncertainty_bon(r, 1.0, ddof=1)  # one member has no unbiased variance


def test_select_gathers_with_trailing_dims_and_fill():
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 100, (B, N, 3, 2)).astype(np.int32)
    index = rng.integers(0, N, B)
    index[2] = -1
    got = np.asarray(inf.select(jnp.asarray(tokens), jnp.asarray(index), fill_value=-7))
    for b in range(B):
        want = tokens[b, index[b]] if index[b] >= 0 else np.full((3, 2), -7)
        np.testing.assert_array_equal(got[b], want)
    flat = np.asarray(inf.select(jnp.asarray(tokens[..., 0, 0]), jnp.asarray(index)))
    assert flat.shape == (B,) and flat[2] == 0
    # index 0 is a candidate like any other (only -1 means none)
    np.testing.assert_array_equal(inf.select(jnp.asarray(tokens), jnp.zeros(B, jnp.int32), -7),
                                  tokens[:, 0])
    with pytest.raises(ValueError, match="samples"):
        inf.select(jnp.zeros((B + 1, N)), jnp.asarray(index))


def test_vmap_over_an_extra_axis_matches_per_slice():
    rng = np.random.default_rng(8)
    rewards = jnp.asarray(rng.normal(size=(3, B, N)), jnp.float32)
    logp = jnp.asarray(-rng.gamma(2.0, 5.0, size=(3, B, N)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(3, B, N, D)), jnp.float32)
    batched = jax.jit(jax.vmap(lambda r, lp, e: (inf.best_of_n(r).index_B,
                                                 inf.rbon_kl(r, lp, 0.2).index_B,
                                                 inf.rbon_wd(r, e, 0.5).index_B)))(rewards, logp, emb)
    for s in range(3):
        np.testing.assert_array_equal(batched[0][s], inf.best_of_n(rewards[s]).index_B)
        np.testing.assert_array_equal(batched[1][s], inf.rbon_kl(rewards[s], logp[s], 0.2).index_B)
        np.testing.assert_array_equal(batched[2][s], inf.rbon_wd(rewards[s], emb[s], 0.5).index_B)
    # beta as a traced argument (one compile for a beta sweep).
    sweep = jax.jit(jax.vmap(lambda beta: inf.rbon_kl(rewards[0], logp[0], beta).index_B))
    got = sweep(jnp.array([0.0, 0.2]))
    np.testing.assert_array_equal(got[0], inf.best_of_n(rewards[0]).index_B)
    np.testing.assert_array_equal(got[1], inf.rbon_kl(rewards[0], logp[0], 0.2).index_B)


def test_rank_and_shape_asserts():
    with pytest.raises(AssertionError):
        inf.best_of_n(jnp.zeros((3,)))
    with pytest.raises(AssertionError):
        inf.rbon_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0.1)
    with pytest.raises(AssertionError):
        inf.best_of_n(jnp.zeros((2, 3)), jnp.ones((2, 4), bool))


def test_mean_pool_matches_numpy_and_ignores_padding():
    from infalign_jax.core.selection import mean_pool
    h = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
    m = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    want = np.stack([h[b][m[b]].mean(0) for b in range(3)])
    np.testing.assert_allclose(np.asarray(mean_pool(jnp.asarray(h), jnp.asarray(m))), want, rtol=1e-5)
    for pad in (1e6, np.nan, np.inf):   # e.g. a fully masked attention row's NaN
        h2 = h.copy(); h2[~m] = pad
        np.testing.assert_allclose(np.asarray(mean_pool(jnp.asarray(h2), jnp.asarray(m))), want,
                                   rtol=1e-5)
    # A response without a token (EOS at once) pools to 0, a finite embedding, not 0 / 0.
    m[1] = False
    np.testing.assert_array_equal(np.asarray(mean_pool(jnp.asarray(h), jnp.asarray(m)))[1],
                                  np.zeros(4))


def test_rbon_wd_leaves_out_only_the_candidate_whose_embedding_is_not_finite():
    """One NaN (or inf) embedding made every candidate's mean cosine NaN: the whole prompt had
    no valid candidate (index -1), even at beta = 0, which is plain BoN."""
    rewards = jnp.array([[0.0, 5.0, 1.0]])
    emb = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], np.float32)
    for bad in ([np.nan, 0.0], [np.inf, 0.0]):
        broken = emb.copy()
        broken[0, 0] = bad
        assert int(inf.rbon_wd(rewards, jnp.asarray(broken), 0.0).index_B[0]) == 1
        # beta = 0 is plain BoN even for the best candidate's own non-finite embedding
        best_first = jnp.array([[5.0, 0.0, 1.0]])
        assert int(inf.rbon_wd(best_first, jnp.asarray(broken), 0.0).index_B[0]) == 0
        # beta > 0: candidate 0 is out; 1 and 2 are scored against each other alone
        beta = 10.0
        e = broken[0, 1:] / np.linalg.norm(broken[0, 1:], axis=-1, keepdims=True)
        scores = np.asarray(rewards)[0, 1:] + beta * (e @ e.T).mean(-1)
        sel = inf.rbon_wd(rewards, jnp.asarray(broken), beta)
        assert int(sel.index_B[0]) == 1 + int(np.argmax(scores)) and bool(sel.has_valid_B[0])
    assert int(inf.rbon_wd(rewards, jnp.asarray(emb), 30.0).index_B[0]) == 2   # uses closeness


def test_best_and_worst_of_n_keep_integer_rewards_exact():
    """int32 rewards were merged with a float -inf (2^24 and 2^24 + 1 tied) and negated for
    Worst-of-N (the int32 minimum overflowed to itself)."""
    big = jnp.array([[16777216, 16777217]], jnp.int32)
    assert int(inf.best_of_n(big).index_B[0]) == 1
    low = jnp.array([[np.iinfo(np.int32).min, 0]], jnp.int32)
    assert int(inf.worst_of_n(low).index_B[0]) == 0
    assert int(inf.best_of_n(low).index_B[0]) == 1
    r = np.random.default_rng(0).integers(-5, 5, (B, N)).astype(np.int32)
    valid = np.random.default_rng(1).random((B, N)) > 0.3
    np.testing.assert_array_equal(inf.best_of_n(jnp.asarray(r), jnp.asarray(valid)).index_B,
                                  _loop_argmax(r.astype(float), valid))
    np.testing.assert_array_equal(inf.worst_of_n(jnp.asarray(r), jnp.asarray(valid)).index_B,
                                  _loop_argmax(-r.astype(float), valid))
    assert int(inf.best_of_n(jnp.array([[False, True, True]])).index_B[0]) == 1


@pytest.mark.parametrize("bad,wanted_tail", [(10, ""), (12, " ...")])
def test_checked_names_the_first_ten_failed_rows_by_their_names(bad, wanted_tail):
    """`selection.checked(row_names=)`: the first ten rows without a valid candidate, by their
    names (each row its own name, not its neighbour's), then " ..." only when more failed."""
    scores = jnp.where(jnp.arange(15)[:, None] < bad, jnp.nan, 1.0) * jnp.ones((15, 3))
    names = [f"p{i} candidates 0-2" for i in range(15)]
    wanted = [f"p{i} candidates 0-2" for i in range(10)]
    with pytest.raises(ValueError) as info:
        inf.checked(inf.best_of_n(scores), "bon at N=3", names)
    assert str(info.value) == (f"bon at N=3: {bad} prompt row(s) have no valid, non-NaN "
                               f"candidate (rows {wanted}{wanted_tail})")
