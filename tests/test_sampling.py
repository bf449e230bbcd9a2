"""Sampler tests on a tabular policy whose sequence distribution can be enumerated exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from infalign_jax import sampling
from infalign_jax.sampling import DecoderFns, SamplingConfig

V, C, EOS, PAD = 5, 6, 4, 0


def _table(seed=0):
    # logits[c, last]: depends on how many real tokens were seen (c) and the last token.
    return jnp.asarray(np.random.default_rng(seed).normal(0, 1.2, (C, V, V)), jnp.float32)


def toy_fns(calls=None):
    def prefill(table, tokens_BxP, mask_BxP, max_len):
        if calls is not None:
            calls.append(tokens_BxP.shape)
        count = mask_BxP.sum(1).astype(jnp.int32)
        last = tokens_BxP[:, -1]
        return table[jnp.minimum(count, C - 1), last], {"count": count, "last": last}

    def decode(table, token_B, cache):
        count = cache["count"] + 1
        return table[jnp.minimum(count, C - 1), token_B], {"count": count, "last": token_B}

    def logits(table, tokens_BxT, mask_BxT):
        count = jnp.cumsum(mask_BxT, axis=1).astype(jnp.int32)
        return table[jnp.minimum(count, C - 1), tokens_BxT]

    return DecoderFns(prefill, decode, logits)


def exact_distribution(table, prompt, length):
    """P(response) for every response of at most `length` tokens, stopping at EOS (numpy)."""
    table = np.asarray(table, np.float64)
    probs = {}
    def rec(prefix, count, last, p):
        if len(prefix) == length or (prefix and prefix[-1] == EOS):
            probs[tuple(prefix)] = probs.get(tuple(prefix), 0.0) + p
            return
        logit = table[min(count, C - 1), last]
        q = np.exp(logit - logit.max()); q /= q.sum()
        for tok in range(V):
            rec(prefix + [tok], count + 1, tok, p * q[tok])
    rec([], len(prompt), prompt[-1], 1.0)
    return probs


def test_sample_distribution_matches_enumeration():
    table = _table()
    prompt = jnp.array([[1, 2]]); mask = jnp.ones_like(prompt, bool)
    cfg = SamplingConfig(n=20000, max_new_tokens=3, eos_id=EOS, pad_id=PAD)
    out = jax.jit(lambda r: sampling.sample(toy_fns(), table, prompt, mask, r, cfg))(jax.random.key(0))
    exact = exact_distribution(table, [1, 2], 3)
    tokens = np.asarray(out.tokens_BxNxL[0]); valid = np.asarray(out.mask_BxNxL[0])
    seen = {}
    for row, m in zip(tokens, valid):
        key = tuple(row[m].tolist())
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) <= set(exact)
    keys = sorted(exact)
    observed = np.array([seen.get(k, 0) for k in keys], float)
    expected = np.array([exact[k] for k in keys]) * cfg.n
    assert abs(expected.sum() - cfg.n) < 1e-6
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_logp_equals_teacher_forced_and_masks_stop_at_eos():
    table = _table(1)
    prompt = jnp.array([[0, 0, 3, 1], [2, 1, 3, 3]]); mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
    cfg = SamplingConfig(n=64, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.7, top_k=4)
    out = sampling.sample(toy_fns(), table, prompt, mask, jax.random.key(1), cfg)
    tok, m, logp = (np.asarray(x) for x in out)
    assert logp.dtype == np.float32
    for row_t, row_m in zip(tok.reshape(-1, 6), m.reshape(-1, 6)):
        n_valid = row_m.sum()
        assert row_m[:n_valid].all() and not row_m[n_valid:].any()  # valid prefix only
        assert (row_t[n_valid:] == PAD).all()
        if n_valid < 6:
            assert row_t[n_valid - 1] == EOS  # stopped because of EOS
        assert EOS not in row_t[:n_valid - 1].tolist()
    assert (logp[~m] == 0).all()
    p, pm, r, rm = sampling.flatten_samples(prompt, mask, out)
    tf = sampling.sequence_logprobs(toy_fns(), table, p, pm, r, rm)
    np.testing.assert_allclose(np.asarray(tf), logp.reshape(-1, 6), atol=1e-5)


def test_prompt_prefilled_once():
    calls = []
    prompt = jnp.array([[1, 2, 3]] * 3); mask = jnp.ones_like(prompt, bool)
    out = sampling.sample(toy_fns(calls), _table(), prompt, mask, jax.random.key(2),
                          SamplingConfig(n=7, max_new_tokens=2, eos_id=EOS))
    assert calls == [(3, 3)]
    assert out.tokens_BxNxL.shape == (3, 7, 2)


def test_left_padding_does_not_change_samples():
    table = _table(2)
    cfg = SamplingConfig(n=16, max_new_tokens=5, eos_id=EOS)
    a = sampling.sample(toy_fns(), table, jnp.array([[2, 3]]), jnp.ones((1, 2), bool), jax.random.key(3), cfg)
    b = sampling.sample(toy_fns(), table, jnp.array([[0, 0, 0, 2, 3]]),
                        jnp.array([[0, 0, 0, 1, 1]], bool), jax.random.key(3), cfg)
    np.testing.assert_array_equal(np.asarray(a.tokens_BxNxL), np.asarray(b.tokens_BxNxL))


def _np_filter(logits, temperature, top_k, top_p):
    out = []
    for row in np.asarray(logits, np.float64) / temperature:
        keep = np.ones(row.shape, bool)
        if 0 < top_k < row.size:
            keep &= row >= np.sort(row)[-top_k]
        masked = np.where(keep, row, -np.inf)
        if top_p < 1:
            order = np.argsort(-masked, kind="stable")
            p = np.exp(masked[order] - masked[order][0]); p /= p.sum()
            before = np.cumsum(p) - p
            keep2 = np.zeros_like(keep); keep2[order[before < top_p]] = True
            masked = np.where(keep2, masked, -np.inf)
        out.append(masked)
    return np.array(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.6),
                                                     (2.0, 5, 0.9), (1.0, 1, 1.0)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
    logits = jax.random.normal(jax.random.key(4), (6, 11)) * 2
    got = np.asarray(sampling.filter_logits(logits, temperature, top_k, top_p))
    want = _np_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


@pytest.mark.parametrize("field,value", [("n", 0), ("max_new_tokens", 0), ("temperature", -1.0),
                                         ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5)])
def test_config_errors_name_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_greedy_follows_argmax():
    table = _table(3)
    prompt = jnp.array([[1, 2]]); mask = jnp.ones_like(prompt, bool)
    out = sampling.sample(toy_fns(), table, prompt, mask, jax.random.key(0),
                          SamplingConfig(n=3, max_new_tokens=4, temperature=0.0))
    t = np.asarray(table)
    count, last, want = 2, 2, []
    for _ in range(4):
        last = int(np.argmax(t[min(count, C - 1), last])); count += 1; want.append(last)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxNxL), np.array([[want] * 3]))
