"""Sampler tests on a tabular policy whose sequence distribution can be enumerated exactly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from infalign_jax import models
from infalign_jax.decoding import sampling, sampling_head as head
from infalign_jax.decoding.sampling import SamplingConfig
from infalign_jax.core.types import DecoderFns

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


def exact_distribution(table, prompt, length, top_k=0):
    """P(response) for every response of at most `length` tokens, stopping at EOS (numpy); with
    `top_k`, each step's distribution is restricted to its k largest logits and renormalised."""
    table = np.asarray(table, np.float64)
    probs = {}
    def rec(prefix, count, last, p):
        if len(prefix) == length or (prefix and prefix[-1] == EOS):
            probs[tuple(prefix)] = probs.get(tuple(prefix), 0.0) + p
            return
        logit = table[min(count, C - 1), last]
        if top_k:
            logit = np.where(logit >= np.sort(logit)[-top_k], logit, -np.inf)
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


def test_top_k_alone_at_temperature_one_samples_the_renormalised_top_k():
    """temperature 1 with top_k and nothing else (the one setting where only top_k asks for
    filtering): every step draws from its k most likely tokens, renormalised (enumeration)."""
    table = _table(3)
    prompt = jnp.array([[1, 2]]); mask = jnp.ones_like(prompt, bool)
    cfg = SamplingConfig(n=20000, max_new_tokens=2, eos_id=EOS, pad_id=PAD, top_k=2)
    out = jax.jit(lambda r: sampling.sample(toy_fns(), table, prompt, mask, r, cfg))(
        jax.random.key(4))
    exact = {k: p for k, p in exact_distribution(table, [1, 2], 2, top_k=2).items() if p > 0}
    seen = {}
    for row, m in zip(np.asarray(out.tokens_BxNxL[0]), np.asarray(out.mask_BxNxL[0])):
        key = tuple(row[m].tolist())
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) <= set(exact)   # never a token outside a step's top 2
    keys = sorted(exact)
    observed = np.array([seen.get(k, 0) for k in keys], float)
    assert stats.chisquare(observed, np.array([exact[k] for k in keys]) * cfg.n).pvalue > 1e-3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 4, 1.0), (1.0, 0, 0.8), (1.3, 3, 0.7),
                                                     (1.0, 0, 1.0)])
def test_logp_equals_teacher_forced_and_masks_stop_at_eos(temperature, top_k, top_p):
    table = _table(1)
    prompt = jnp.array([[0, 0, 3, 1], [2, 1, 3, 3]]); mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
    cfg = SamplingConfig(n=64, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=temperature,
                         top_k=top_k, top_p=top_p)
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
    """Sort-based reference (float64): top-k keeps the k largest, top-p the shortest prefix of the
    sorted probabilities whose mass reaches top_p. Equals `filter_logits` when there are no ties."""
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


def _assert_same_filter(got, want):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def _no_tie_logits(seed, shape, scale):
    x = np.array(jax.random.normal(jax.random.key(seed), shape) * scale, np.float32)
    x += np.arange(shape[1], dtype=np.float32) * np.float32(1e-6)  # float32 normals do tie
    for row in x:
        assert np.unique(row).size == row.size  # the reference assumes no ties
    return x


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.6), (2.0, 5, 0.9), (1.0, 1, 1.0), (1.0, 11, 1.0),
    (1.0, 50, 1.0), (1.0, 10, 0.9999), (0.7, 0, 1e-6), (1.0, 1, 0.5), (1.0, 4, 1e-6),
    (0.3, 0, 0.95), (1e-3, 0, 1.0), (2e-4, 2, 1.0)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
    # k >= V (11, 50) is off, p = 1 is off, k = 1 and a tiny p keep the arg-max only; small
    # temperatures from 1e-4 up are x / T itself (below, (x - max) / T).
    logits = _no_tie_logits(4, (6, 11), 2.0)
    logits[1, [2, 5, 7]] = -np.inf      # masked vocabulary
    logits[2, 1:] = -np.inf             # a single finite token
    got = head.filter_logits(logits, temperature, top_k, top_p)
    _assert_same_filter(got, _np_filter(logits, temperature, top_k, top_p))
    if top_k == 1 or top_p == 1e-6:
        assert (np.isfinite(np.asarray(got)).sum(1) == 1).all()


@pytest.mark.parametrize("top_k,top_p", [(20, 1.0), (0, 0.9), (0, 0.5), (20, 0.9), (7, 0.99),
                                         (200, 0.8), (0, 1e-6)])
def test_filter_logits_pruned_paths_match_numpy(top_k, top_p):
    """The candidate-buffer searches (small groups so that they engage at V = 2000), on rows the
    top-p buffer serves (peaked) and rows it does not (flat: the full-vocabulary fallback)."""
    x = _no_tie_logits(5, (7, 2000), 1.0)           # flat rows: top-p 0.9 keeps ~1200 tokens
    x[:2] *= 4.0                                    # peaked rows: a few dominant tokens
    x[:2, [3, 500, 1999]] += np.float32(30.0)
    x[2] = _no_tie_logits(6, (1, 2000), 5.0)[0]     # top-p 0.9 keeps 22 tokens
    x[5, ::3] = -np.inf                             # masked vocabulary
    kw = dict(group=4, top_p_groups=32, fallback_rows=2)   # a buffer of 128 tokens
    got = head.filter_logits(jnp.asarray(x), 1.0, top_k, top_p, **kw)
    _assert_same_filter(got, _np_filter(x, 1.0, top_k, top_p))
    if top_k == 0 and top_p == 0.9:                 # both top-p paths really ran
        top = x.max(1, keepdims=True)
        served = np.asarray(head._buffer_suffices(jnp.asarray(np.exp(x - top)), top_p, 32, 4)[3])
        np.testing.assert_array_equal(served, [True] * 3 + [False] * 4)
        assert np.isfinite(np.asarray(got)[2]).sum() == 22
    # The same with the pruning sized off (every search over the whole vocabulary).
    _assert_same_filter(head.filter_logits(jnp.asarray(x), 1.0, top_k, top_p, group=1000),
                        _np_filter(x, 1.0, top_k, top_p))


@pytest.mark.parametrize("top_p", [1e-30, 1e-39, 1e-45])
def test_a_top_p_below_float32_range_keeps_the_most_likely_token(top_p):
    """A top_p that float32 flushes to 0 still keeps the arg-max (and only it) on the full
    vocabulary, pruned, and after top-k paths; it kept nothing, and `draw` returned token 0."""
    rng = np.random.default_rng(7)   # distinct values (random normals can tie in float32)
    x = np.stack([rng.permutation(2000) for _ in range(3)]).astype(np.float32) * 0.004 - 4.0
    want = np.zeros(x.shape, bool)
    want[np.arange(3), x.argmax(1)] = True
    for kw in ({}, dict(group=4, top_p_groups=32, fallback_rows=2)):
        for top_k in (0, 20):
            got = np.isfinite(np.asarray(head.filter_logits(jnp.asarray(x), 1.0, top_k, top_p,
                                                            **kw)))
            np.testing.assert_array_equal(got, want, err_msg=f"{kw} top_k={top_k}")


def test_pruned_filter_keeps_ties_outside_the_candidate_buffer():
    """1990 tokens tie at the k-th largest value, almost all of them outside the buffers."""
    x = np.zeros((2, 2000), np.float32)
    x[:, np.arange(10) * 197] = 10.0 - 0.5 * np.arange(10)   # 10 distinct leaders, then ties
    x[1] = np.roll(x[1], 3)
    kw = dict(group=4, top_p_groups=32, fallback_rows=2)
    kept = lambda k, p: np.isfinite(np.asarray(  # noqa: E731
        head.filter_logits(jnp.asarray(x), 1.0, k, p, **kw))).sum(1)
    np.testing.assert_array_equal(kept(20, 1.0), [2000, 2000])   # the k-th largest is a tie
    np.testing.assert_array_equal(kept(5, 1.0), [5, 5])
    np.testing.assert_array_equal(kept(20, 0.99), [2000, 2000])  # the leaders hold 96.6%
    np.testing.assert_array_equal(kept(0, 0.99), [2000, 2000])
    want = np.isfinite(_np_filter(x, 1.0, 20, 0.9)).sum(1)
    assert 1 < want[0] < 10
    np.testing.assert_array_equal(kept(20, 0.9), want)
    np.testing.assert_array_equal(kept(0, 0.9), want)


def test_filter_logits_keeps_boundary_ties_and_poisons_nan_rows():
    x = jnp.array([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0],        # k-th largest (k=2) tied three times
                   [0.0, 0.0, 0.0, 0.0, -1.0, -jnp.inf],  # top-p: the 4 tied tokens are kept
                   [1.0, jnp.nan, 0.0, 2.0, 3.0, 4.0],    # NaN: the whole row is NaN
                   [-jnp.inf] * 6,                        # all -inf: unchanged
                   [1.0, jnp.inf, 0.0, jnp.inf, 2.0, 3.0]])  # +inf holds all the mass
    k2 = np.asarray(head.filter_logits(x, 1.0, 2, 1.0))
    np.testing.assert_array_equal(np.isfinite(k2[0]), [1, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(np.isfinite(k2[1]), [1, 1, 1, 1, 0, 0])
    p = np.asarray(head.filter_logits(x, 1.0, 0, 0.3))
    np.testing.assert_array_equal(np.isfinite(p[1]), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(p[4], [-np.inf, np.inf, -np.inf, np.inf, -np.inf, -np.inf])
    # also at temperatures that take (x - max) / T (1e-6) or the greedy limit (1e-40)
    tempered = [np.asarray(head.filter_logits(x, t)) for t in (0.5, 1e-6, 1e-40)]
    for out in (k2, p, *tempered):
        assert np.isnan(out[2]).all() and not np.isnan(out[[0, 1, 3, 4]]).any()
        assert np.isneginf(out[3]).all()
        assert np.isposinf(out[4, [1, 3]]).all()


def test_top_p_leaves_out_a_token_one_ulp_less_likely_than_the_boundary():
    """p = exp(x - max) of tokens 1 and 2 are adjacent float32 numbers (0.5 and the next one
    down): top_p = 0.6 needs tokens 0 and 1 only (mass 1.5 of 2.15), so token 2 is out on every
    path (full vocabulary, pruned, after a pruned top-k) and for `in_nucleus`."""
    x1 = np.float32(np.log(0.5))
    p = lambda *xs: np.asarray(head._probs_below_max(  # noqa: E731
        jnp.asarray([[0.0, *xs]], jnp.float32)))[0, 1:].view(np.int32)
    x2 = x1
    while p(x2)[0] == p(x1)[0]:
        x2 = np.nextafter(x2, np.float32(-np.inf))
    assert p(x2)[0] == p(x1)[0] - 1          # adjacent floats
    x = np.full((3, 64), -6.0, np.float32)
    x[:, :3] = [0.0, x1, x2]
    x[1], x[2] = np.roll(x[1], 17), np.roll(x[2], 40)
    want = np.isfinite(_np_filter(x, 1.0, 0, 0.6))
    assert (want.sum(1) == 2).all()
    for top_k, kw in ((0, {}), (0, dict(group=2, top_p_groups=4)), (3, dict(group=2))):
        got = np.isfinite(np.asarray(head.filter_logits(jnp.asarray(x), 1.0, top_k, 0.6, **kw)))
        np.testing.assert_array_equal(got, want, err_msg=f"top_k={top_k} {kw}")
    pb, target = _nucleus_inputs(x, 1.0, 0.6)
    for j in range(64):
        got = head.in_nucleus(pb, target, jnp.full((3,), j, jnp.int32))
        np.testing.assert_array_equal(np.asarray(got), want[:, j], err_msg=f"token {j}")


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


# ------------------------------------------------------------------------ bad input, fast path

def _ok_inputs():
    return jnp.array([[1, 2, 3], [0, 2, 1]]), jnp.array([[1, 1, 1], [0, 1, 1]], bool)


_BAD_INPUT = [
    ("too_long", r"prompt length 3 .* \+ max_new_tokens 4 = 7 exceeds the decoder's max_len 6"),
    ("all_padding_row", r"rows \[1\] have no real token"),
    ("mask_shape", r"prompt_mask_BxP must have the prompt's shape \(2, 3\), got \(2, 2\)"),
    ("prompt_rank", r"prompt_BxP must have rank 2 .* got shape \(3,\)"),
    ("float_prompt", r"prompt_BxP must hold integer token ids, got dtype float32"),
    ("float_mask", r"prompt_mask_BxP must be bool .* got dtype float32"),
    ("eos_outside_vocab", r"SamplingConfig.eos_id must be a token id in \[0, 5\) .* got 5"),
]


# An all-padding row is data-dependent, so only eager calls can raise for it; under jit it gets
# an empty response (test_all_padding_row_under_jit_gets_empty_response).
@pytest.mark.parametrize("case,match,jit", [(c, m, j) for c, m in _BAD_INPUT for j in (False, True)
                                            if not (j and c == "all_padding_row")])
def test_sample_bad_input_raises_at_trace_time(case, match, jit):
    prompt, mask = _ok_inputs()
    fns, cfg = toy_fns(), SamplingConfig(n=2, max_new_tokens=4, eos_id=EOS, pad_id=PAD)
    if case == "too_long":
        fns = fns._replace(max_len=6)
    elif case == "all_padding_row":
        mask = mask.at[1].set(False)
    elif case == "mask_shape":
        mask = mask[:, 1:]
    elif case == "prompt_rank":
        prompt, mask = prompt[0], mask[0]
    elif case == "float_prompt":
        prompt = prompt.astype(jnp.float32)
    elif case == "float_mask":
        mask = mask.astype(jnp.float32)
    elif case == "eos_outside_vocab":
        cfg = SamplingConfig(max_new_tokens=4, eos_id=V)
    run = lambda p, m: sampling.sample(fns, _table(), p, m, jax.random.key(0), cfg)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        (jax.jit(run) if jit else run)(prompt, mask)


def test_pad_id_past_the_vocabulary_is_only_written_at_masked_positions():
    """A tokenizer's added pad token (id V) as SamplingConfig.pad_id: it was refused, while the
    same id as prompt padding was accepted. The real tokens and log-probs equal a run with pad 0,
    teacher forcing (full and shared-prompt paths) gives the sampler's log-probs, and the path
    terms are finite (a masked id V put NaN into the shared path's valid positions)."""
    cfg = models.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_len=24, init_std=0.5)
    params, fns = models.init_params(cfg, jax.random.key(0)), models.decoder_fns(cfg)
    prompt = jnp.array([[32, 32, 5, 6], [4, 5, 6, 7]], jnp.int32)
    mask = jnp.array([[False, False, True, True], [True, True, True, True]])
    draw = lambda pad: sampling.sample(fns, params, prompt, mask, jax.random.key(1),  # noqa: E731
                                       SamplingConfig(n=3, max_new_tokens=8, eos_id=3, pad_id=pad))
    ok, past = draw(0), draw(32)
    real = np.asarray(past.mask_BxNxL)
    assert (~real).any() and (np.asarray(past.tokens_BxNxL)[~real] == 32).all()
    np.testing.assert_array_equal(real, np.asarray(ok.mask_BxNxL))
    np.testing.assert_array_equal(np.asarray(past.tokens_BxNxL)[real],
                                  np.asarray(ok.tokens_BxNxL)[real])
    np.testing.assert_array_equal(np.asarray(past.logp_BxNxL), np.asarray(ok.logp_BxNxL))
    p_rep, m_rep, resp, rmask = sampling.flatten_samples(prompt, mask, past)
    full = sampling.sequence_logprobs(fns, params, p_rep, m_rep, resp, rmask)
    shared = sampling.shared_sequence_logprobs(fns, params, prompt, mask, resp, rmask)
    for got in (full, shared):
        np.testing.assert_allclose(np.asarray(got), np.asarray(past.logp_BxNxL).reshape(6, -1),
                                   atol=1e-5)
    ref_params = models.init_params(cfg, jax.random.key(2))
    terms = sampling.shared_prompt_path_terms(fns, params, fns, ref_params, prompt, mask, past)
    ref = sampling.shared_prompt_path_terms(fns, params, fns, ref_params, prompt, mask, ok)
    for a, b in zip(terms, ref):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_max_len_boundary_is_allowed():
    prompt, mask = _ok_inputs()
    out = sampling.sample(toy_fns()._replace(max_len=7), _table(), prompt, mask, jax.random.key(0),
                          SamplingConfig(max_new_tokens=4))
    assert out.tokens_BxNxL.shape == (2, 1, 4)


def test_all_padding_row_under_jit_gets_empty_response():
    prompt, mask = _ok_inputs()
    cfg = SamplingConfig(n=3, max_new_tokens=4, eos_id=EOS, pad_id=PAD)
    run = jax.jit(lambda m: sampling.sample(toy_fns(), _table(), prompt, m, jax.random.key(7), cfg))
    bad, good = run(mask.at[1].set(False)), run(mask)
    assert not np.asarray(bad.mask_BxNxL[1]).any()
    assert (np.asarray(bad.tokens_BxNxL[1]) == PAD).all()
    assert (np.asarray(bad.logp_BxNxL[1]) == 0).all()
    # The noise of row 0 does not depend on row 1, so its samples are unchanged.
    for a, b in zip(bad, good):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", True), ("n", 2.0), ("max_new_tokens", 0), ("max_new_tokens", -3),
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.0001), ("top_p", float("nan")), ("top_k", -1), ("top_k", 2.5),
    ("eos_id", -1), ("eos_id", 1.0), ("pad_id", -1), ("pad_id", None)])
def test_config_errors_name_field_and_values(field, value):
    match = rf"SamplingConfig\.{field} must be .*, got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**{field: value})


def test_fast_argmax_matches_jnp_argmax():
    x = jax.random.normal(jax.random.key(0), (64, 37)) * 3
    x = x.at[1, 5].set(jnp.inf).at[2].set(-jnp.inf).at[3, 4].set(jnp.nan).at[3, 9].set(jnp.nan)
    x = x.at[4].set(0.0).at[5, :10].set(-jnp.inf)                    # ties: first index wins
    want = np.asarray(jnp.argmax(x, -1))
    assert want[2] == 0 and want[3] == 4 and want[4] == 0             # the cases exercised
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling._first_argmax)(x)), want)


def _draws(logits_V, n, seed, block_size, filt=None, rejection=False):
    """n draws from one row of logits (the row repeated n times, one key), optionally filtered:
    by `draw(filter_logits(...))`, or with `rejection` by `draw_filtered`."""
    x = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    if rejection:
        fn = lambda r, x: head.draw_filtered(r, x, *filt, block_size=block_size)  # noqa: E731
    else:
        fn = lambda r, x: head.draw(r, x if filt is None else head.filter_logits(x, *filt),  # noqa: E731
                                    block_size)
    return np.asarray(jax.jit(fn)(jax.random.key(seed), x))


def _chi2_pvalue(tokens, probs):
    """Goodness of fit of the drawn tokens to `probs` (float64); none may fall where probs is 0."""
    counts = np.bincount(tokens, minlength=probs.size)
    assert counts.size == probs.size and not counts[probs == 0].any()
    expected = probs[probs > 0] * tokens.size
    assert expected.min() >= 5  # the chi-square approximation holds
    return stats.chisquare(counts[probs > 0], expected).pvalue


def _uneven_logits(seed=0, vocab=37):
    rng = np.random.default_rng(seed)
    return (np.linspace(-3, 2.5, vocab) + rng.normal(0, 0.3, vocab))[rng.permutation(vocab)]


@pytest.mark.parametrize("block_size", [8, 5, 1024])  # several blocks + padding; V=37 in one block
def test_draw_matches_softmax_chi_square(block_size):
    logits = _uneven_logits()
    probs = np.exp(logits - logits.max()); probs /= probs.sum()
    assert probs.max() / probs.min() > 100                  # uneven
    tokens = _draws(logits, 20000, 0, block_size)
    assert _chi2_pvalue(tokens, probs) > 1e-3


@pytest.mark.parametrize("rejection", [False, True], ids=["filter_then_draw", "draw_filtered"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 10, 1.0), (0.8, 0, 0.7),
                                                     (1.5, 12, 0.8), (1.0, 0, 0.995),
                                                     (1.2, 0, 0.9), (1.0, 0, 0.4)])
def test_filtered_draw_matches_renormalised_filter_chi_square(temperature, top_k, top_p,
                                                              rejection):
    logits = _uneven_logits(1)
    kept = _np_filter(logits[None], temperature, top_k, top_p)[0]   # numpy, by sorting
    probs = np.where(np.isfinite(kept), np.exp(kept - kept.max()), 0.0); probs /= probs.sum()
    assert 2 < (probs > 0).sum() < logits.size or top_p == 0.995
    tokens = _draws(logits, 20000, 2, 8, (temperature, top_k, top_p), rejection)
    assert _chi2_pvalue(tokens, probs) > 1e-3


def test_rejection_rounds():
    """Rounds such that a row is still rejected with probability <= 1e-4 (each round keeps it
    with probability >= top_p); 0 (the exact path) past 8 rounds or when top-p is off."""
    assert [head.rejection_rounds(p) for p in (0.995, 0.9, 0.8, 0.7, 0.68, 0.5, 1.0)] == \
        [2, 4, 6, 8, 0, 0, 0]
    for p in (0.995, 0.9, 0.8, 0.7):
        r = head.rejection_rounds(p)
        assert (1 - p) ** r <= 1e-4 < (1 - p) ** (r - 1)


def test_rejected_rows_take_the_exact_path_and_the_mixture_is_the_filtered_softmax(monkeypatch):
    """One round only (a row keeps its first draw with probability ~0.7, else the exact path
    draws it): the mixture of both is still the renormalised filter."""
    monkeypatch.setattr(head, "REJECTED_AFTER_ROUNDS", 0.5)
    assert head.rejection_rounds(0.7) == 1
    logits = _uneven_logits(1)
    kept = _np_filter(logits[None], 0.8, 0, 0.7)[0]
    probs = np.where(np.isfinite(kept), np.exp(kept - kept.max()), 0.0); probs /= probs.sum()
    tokens = _draws(logits, 20000, 3, 8, (0.8, 0, 0.7), rejection=True)
    assert _chi2_pvalue(tokens, probs) > 1e-3


def _nucleus_inputs(x, temperature, top_p):
    """p as both top-p paths compute it, and the target mass as `filter_logits` sums it."""
    p = head._probs_below_max(head._tempered(jnp.asarray(x, jnp.float32), temperature))
    return p, top_p * jnp.sum(p, axis=-1, keepdims=True)


@pytest.mark.parametrize("top_p", [0.9, 0.5, 1e-30, 1e-45])
def test_in_nucleus_is_the_kept_set_of_filter_logits(top_p):
    """Every token of every row tested: `in_nucleus` accepts exactly the tokens `filter_logits`
    keeps (flat and peaked rows, a row with ties at the boundary, one with zero-mass tokens)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 300)) * np.array([[0.3], [1.0], [3.0], [8.0], [1.0], [1.0]])
    x[4] = np.round(x[4] * 2) / 2                            # many ties (9 distinct values)
    x[5, :250] = -200.0                                      # exp underflows: zero mass
    x = x.astype(np.float32)
    kept = np.isfinite(np.asarray(head.filter_logits(jnp.asarray(x), 1.0, 0, top_p)))
    p, target = _nucleus_inputs(x, 1.0, top_p)
    every = jnp.repeat(jnp.arange(300, dtype=jnp.int32)[None], 6, axis=0)
    got = np.stack([np.asarray(head.in_nucleus(p, target, every[:, j])) for j in range(300)], 1)
    np.testing.assert_array_equal(got, kept)
    assert 1 <= kept.sum(1).min() and kept.sum(1).max() < 300 and kept[4].sum() > 1


def test_draw_filtered_keeps_each_rows_first_accepted_draw():
    """The loop's wiring, against the rounds written out: round r draws with fold_in(key, r),
    a row keeps its first draw inside the nucleus; none left after the rounds here."""
    x = jax.random.normal(jax.random.key(4), (64, 500)) * 1.5
    key = jax.random.key(9)
    got = np.asarray(jax.jit(lambda k, x: head.draw_filtered(k, x, 1.0, 0, 0.8, 64))(key, x))
    p, _ = _nucleus_inputs(x, 1.0, 0.8)
    blocks = head._blocks(p, 64)
    target = 0.8 * jnp.sum(blocks[1], axis=-1, keepdims=True)   # summed by blocks, as it is
    want = np.full(64, -1)
    for r in range(head.rejection_rounds(0.8)):
        bits = jax.random.bits(jax.random.fold_in(key, r), (2, 64), jnp.uint32)
        cand = np.asarray(head._draw_blocks(*blocks, bits))
        ok = np.asarray(head.in_nucleus(p, target, jnp.asarray(cand)))
        want = np.where((want < 0) & ok, cand, want)
    assert (want >= 0).all()
    np.testing.assert_array_equal(got, want)


def test_draw_filtered_degenerate_rows_are_those_of_the_exact_path():
    x = jax.random.normal(jax.random.key(6), (5, 37))
    bad = (x.at[0, 3].set(jnp.nan).at[0, 9].set(jnp.nan).at[1, 7].set(jnp.inf)
           .at[1, 20].set(jnp.inf).at[2].set(-jnp.inf))
    tok = np.asarray(head.draw_filtered(jax.random.key(8), bad, 1.0, 0, 0.9, 8))
    exact = np.asarray(head.draw(jax.random.key(0), head.filter_logits(bad, 1.0, 0, 0.9), 8))
    # The filter poisons the NaN row whole (its first NaN is token 0); first +inf; 0 (argmax).
    np.testing.assert_array_equal(exact[:3], [0, 7, 0])
    np.testing.assert_array_equal(tok[:3], exact[:3])
    kept = np.isfinite(np.asarray(head.filter_logits(x, 1.0, 0, 0.9)))
    assert kept[np.arange(3, 5), tok[3:]].all()


def test_draw_at_real_vocabulary_size_matches_softmax_by_bins():
    """Default block size (1024) over V = 2500 (3 blocks, the last padded): the mass of 10 bins of
    tokens chosen across blocks."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, 2500)
    probs = np.exp(logits - logits.max()); probs /= probs.sum()
    bins = rng.permutation(2500) % 10
    tokens = _draws(logits, 4000, 4, head.DRAW_BLOCK)
    counts = np.bincount(bins[tokens], minlength=10)
    expected = np.bincount(bins, weights=probs, minlength=10) * tokens.size
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_draw_never_returns_a_zero_probability_token():
    rng = np.random.default_rng(5)
    x = np.full((512, 37), -np.inf, np.float32)
    for row in x:  # 1..4 allowed tokens anywhere, first and last positions included
        row[rng.choice(37, rng.integers(1, 5), replace=False)] = rng.normal(0, 3, 1)
    x[0, :] = -np.inf; x[0, 36] = 0.0                       # only the last token
    x[1, :] = -np.inf; x[1, 0] = 0.0                        # only the first token
    x[2, :] = -200.0; x[2, 17] = 0.0                        # exp underflow: zero mass
    x[3, :] = -np.inf; x[3, [7, 8]] = [0.0, -120.0]         # 8: finite but zero mass in float32
    allowed = np.exp(x.astype(np.float64) - x.max(1, keepdims=True)) > 1e-30
    xs = jnp.asarray(x)
    for block_size in (8, 1024):
        fn = jax.jit(lambda r: head.draw(r, xs, block_size))
        for seed in range(40):
            tok = np.asarray(fn(jax.random.key(seed)))
            assert allowed[np.arange(512), tok].all()


def test_pick_lands_on_positive_mass_at_the_boundaries():
    mass = jnp.array([[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]] * 5)
    u = jnp.array([0.0, 0.5, 0.4999, 1.0 - 2.0 ** -24, 1.0])   # 1.0 itself never comes from draw
    np.testing.assert_array_equal(np.asarray(head._pick(mass, u)), [2, 4, 2, 4, 4])
    uniform = head._uniform24(jnp.array([0, 255, 256, 2 ** 32 - 1], jnp.uint32))
    np.testing.assert_array_equal(np.asarray(uniform), [0.0, 0.0, 2.0 ** -24, 1.0 - 2.0 ** -24])


def test_draw_degenerate_rows_and_row_independence():
    x = jax.random.normal(jax.random.key(6), (5, 37))
    bad = (x.at[0, 3].set(jnp.nan).at[0, 9].set(jnp.nan).at[1, 7].set(jnp.inf)
           .at[1, 20].set(jnp.inf).at[2].set(-jnp.inf))
    key = jax.random.key(8)
    tok = np.asarray(head.draw(key, bad, 8))
    np.testing.assert_array_equal(tok[:3], [3, 7, 0])   # first NaN, first +inf, 0 (as argmax)
    np.testing.assert_array_equal(tok[3:], np.asarray(head.draw(key, x, 8))[3:])
    logp = np.asarray(sampling._token_logprob(bad, jnp.asarray(tok)))
    assert np.isnan(logp[:3]).all() and np.isfinite(logp[3:]).all()


def test_token_logprob_matches_log_softmax():
    x = jax.random.normal(jax.random.key(1), (8, 50)) * 4
    tok = jax.random.randint(jax.random.key(2), (8,), 0, 50)
    x64 = np.asarray(x, np.float64)
    lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    want = x64[np.arange(8), np.asarray(tok)] - lse
    np.testing.assert_allclose(np.asarray(sampling._token_logprob(x, tok)), want, atol=1e-6)


def _tiny_model():
    from infalign_jax import models
    cfg = models.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_len=24, init_std=0.5)
    return models, cfg, models.init_params(cfg, jax.random.key(0))


def test_model_prefill_last_logits_equal_teacher_forced():
    models, cfg, params = _tiny_model()
    prompt = jax.random.randint(jax.random.key(1), (3, 7), 0, cfg.vocab_size)
    mask = jnp.ones_like(prompt, bool).at[1, :3].set(False)
    fns = models.decoder_fns(cfg)
    assert fns.max_len == cfg.max_len
    logits_BxV, _ = jax.jit(lambda p: fns.prefill(p, prompt, mask, 12))(params)
    teacher_forced = jax.jit(lambda p: models.apply(p, prompt, cfg, attention_mask_BxT=mask).logits)
    full = teacher_forced(params)[:, -1]
    np.testing.assert_allclose(np.asarray(logits_BxV), np.asarray(full), atol=1e-5)
    with pytest.raises(ValueError, match="max_len 24"):
        sampling.sample(fns, params, prompt, mask, jax.random.key(0),
                        SamplingConfig(max_new_tokens=18))


def test_decode_windows_double_up_to_the_slots_decoding_writes():
    assert sampling.decode_windows(64) == [16, 32, 63]     # 64 tokens: 63 fed back
    assert sampling.decode_windows(17) == [16]
    assert sampling.decode_windows(40, first=4) == [4, 8, 16, 32, 39]
    assert sampling.decode_windows(1) == sampling.decode_windows(2) == [1]


@pytest.mark.parametrize("first", [2, 5])
def test_windowed_decoding_samples_as_attending_the_whole_cache(first, monkeypatch):
    """Decoding in phases whose attention reads a doubling window of the response cache
    (`DecoderFns.decode_window`, from `first` slots) gives the tokens and log-probs of attending
    over the whole cache every step (no `decode_window`), and those log-probs are the
    teacher-forced ones; rows stop at EOS in several phases."""
    models, cfg, params = _tiny_model()
    prompt = jax.random.randint(jax.random.key(2), (3, 5), 1, cfg.vocab_size)
    mask = jnp.ones_like(prompt, bool).at[1, :2].set(False)
    scfg = SamplingConfig(n=4, max_new_tokens=19, eos_id=3, pad_id=0, temperature=1.3, top_p=0.95)
    fns = models.decoder_fns(cfg)
    monkeypatch.setattr(sampling, "FIRST_WINDOW", first)
    phases = sampling.decode_windows(19, first)
    assert len(phases) >= 3
    run = lambda f: jax.jit(lambda p, r: sampling.sample(f, p, prompt, mask, r, scfg))  # noqa: E731
    stopped_in = set()
    for seed in range(3):
        got = run(fns)(params, jax.random.key(seed))
        want = run(fns._replace(decode_window=None))(params, jax.random.key(seed))
        np.testing.assert_array_equal(np.asarray(got.tokens_BxNxL), np.asarray(want.tokens_BxNxL))
        np.testing.assert_array_equal(np.asarray(got.mask_BxNxL), np.asarray(want.mask_BxNxL))
        # float32 rounding only (the softmax sums run over the window or the whole cache, and
        # XLA's CPU reductions split differently by thread; 3.6e-6 seen): a window missing a
        # written slot moves these log-probs by orders of magnitude more
        np.testing.assert_allclose(np.asarray(got.logp_BxNxL), np.asarray(want.logp_BxNxL),
                                   rtol=1e-5, atol=1e-5)
        lengths = np.asarray(got.mask_BxNxL).sum(-1)
        stopped_in |= {int(np.searchsorted(phases, n - 1)) for n in lengths.ravel() if n < 19}
        p, pm, r, rm = sampling.flatten_samples(prompt, mask, got)
        tf = sampling.sequence_logprobs(fns, params, p, pm, r, rm)
        # float32 rounding of the cached and teacher-forced attention paths, logits of ~10 here
        np.testing.assert_allclose(np.asarray(tf), np.asarray(got.logp_BxNxL).reshape(-1, 19),
                                   rtol=2e-5, atol=1e-5)
    assert len(stopped_in) >= 2   # rows stopped at EOS in more than one phase


def test_decode_step_window_is_checked():
    models, cfg, params = _tiny_model()
    prompt = jnp.ones((2, 3), jnp.int32)
    _, cache = models.prefill(params, prompt, cfg, max_new_tokens=6)
    token = jnp.ones((2,), jnp.int32)
    full, _ = models.decode_step(params, token, cfg, cache)
    window, _ = models.decode_step(params, token, cfg, cache, slots=1)   # index 0: none written
    np.testing.assert_allclose(np.asarray(window), np.asarray(full), atol=1e-6)
    for slots in (0, 7):
        with pytest.raises(ValueError, match=r"slots must be in \[1, 6\]"):
            models.decode_step(params, token, cfg, cache, slots=slots)


# -------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("mesh_cfg", [{"data": 8}, {"data": 4, "tensor": 2}])
def test_sharded_sample_matches_single_device(mesh_cfg):
    from jax.sharding import PartitionSpec
    from infalign_jax.infra import sharding
    from infalign_jax.models.transformer import Transformer
    models, cfg, _ = _tiny_model()
    mesh = sharding.make_mesh(mesh_cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    def init(r):
        return Transformer(cfg).init(r, tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]
    params = sharding.sharded_init(init, jax.random.key(3), mesh)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    if "tensor" in mesh_cfg:   # the rules really split something over "tensor"
        assert any("tensor" in str(s.spec) for s in jax.tree.leaves(param_shardings))
    prompt = np.asarray(jax.random.randint(jax.random.key(4), (8, 6), 1, cfg.vocab_size))
    mask = np.ones_like(prompt, bool)
    mask[1, :2] = mask[5, :5] = False
    scfg = SamplingConfig(n=3, max_new_tokens=5, eos_id=2, pad_id=0, temperature=0.9, top_p=0.9)
    fns = models.decoder_fns(cfg)
    rng = jax.random.key(11)
    host_params = jax.device_get(params)
    want = jax.jit(lambda p, t, m, r: sampling.sample(fns, p, t, m, r, scfg))(
        host_params, prompt, mask, rng)

    prompt_s, mask_s = sharding.shard_batch((prompt, mask), mesh)
    b2, b3 = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 3)
    with sharding.axis_rules(mesh):
        fn = jax.jit(lambda p, t, m, r: sampling.sample(fns, p, t, m, r, scfg),
                     in_shardings=(param_shardings, b2, b2, sharding.replicated(mesh)),
                     out_shardings=sampling.Samples(b3, b3, b3))
        got = fn(params, prompt_s, mask_s, rng)
    # Batch rows split over ("data", "fsdp") (fsdp has size 1 here): B / data rows per shard.
    for x in got:
        assert x.sharding.spec == PartitionSpec(("data", "fsdp"), None, None)
        assert {s.data.shape for s in x.addressable_shards} == {(8 // mesh.shape["data"], 3, 5)}
    np.testing.assert_array_equal(np.asarray(got.tokens_BxNxL), np.asarray(want.tokens_BxNxL))
    np.testing.assert_array_equal(np.asarray(got.mask_BxNxL), np.asarray(want.mask_BxNxL))
    np.testing.assert_allclose(np.asarray(got.logp_BxNxL), np.asarray(want.logp_BxNxL), atol=1e-5)
    assert np.asarray(want.mask_BxNxL).sum() > 8  # the comparison covers real tokens


def test_decoding_stops_once_every_row_has_emitted_eos():
    """Early exit: with EOS certain at response token k (for every row), the decoder runs k - 1
    times, not max_new_tokens - 1; the outputs are as without the exit (EOS kept, padding after)."""
    decodes = []

    def counted(fns):
        def decode(table, token_B, cache):
            jax.debug.callback(lambda: decodes.append(1))
            return fns.decode(table, token_B, cache)
        return fns._replace(decode=decode)

    prompt = jnp.array([[1, 2], [3, 3]])
    mask = jnp.ones_like(prompt, bool)
    for k in (1, 3):
        # count = prompt tokens + generated: EOS is certain when count reaches 2 + k - 1.
        table = _table(1).at[2 + k - 1].set(jnp.where(jnp.arange(V) == EOS, 50.0, -50.0))
        decodes.clear()
        cfg = SamplingConfig(n=3, max_new_tokens=8, eos_id=EOS, pad_id=PAD)
        s = jax.jit(lambda t, r: sampling.sample(counted(toy_fns()), t, prompt, mask, r, cfg))(
            table, jax.random.key(k))
        jax.effects_barrier()
        lengths = np.asarray(s.mask_BxNxL).sum(-1)
        ended = np.asarray(s.tokens_BxNxL)[..., :8][np.arange(2)[:, None], np.arange(3),
                                                   lengths - 1]
        assert (lengths <= k).all() and (ended == EOS).all()
        assert len(decodes) == int(lengths.max()) - 1 <= k - 1
        assert (np.asarray(s.tokens_BxNxL)[~np.asarray(s.mask_BxNxL)] == PAD).all()


@pytest.mark.parametrize("model", ["toy", "transformer"])
def test_shared_prompt_path_terms_equal_the_full_forward(model):
    """KL, entropy and pi_ref's log-probs teacher-forced through the shared prompt KV (each prompt
    prefilled once per model) equal `response_kl_entropy` / `sequence_logprobs` of the flattened
    rows (a forward pass per row), with left-padded prompts and rows that stopped at EOS; the
    toy decoder has no `expand`."""
    if model == "toy":
        fns, params, ref_params = toy_fns(), _table(1), _table(2)
        prompt = jnp.array([[0, 0, 3, 1], [2, 1, 3, 3]])
        mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
        cfg = SamplingConfig(n=16, max_new_tokens=5, eos_id=EOS, pad_id=PAD)
    else:
        models, mcfg, params = _tiny_model()
        fns, ref_params = models.decoder_fns(mcfg), models.init_params(mcfg, jax.random.key(5))
        prompt = jax.random.randint(jax.random.key(1), (3, 7), 0, mcfg.vocab_size)
        mask = jnp.ones_like(prompt, bool).at[1, :3].set(False)
        free = sampling.sample(fns, params, prompt, mask, jax.random.key(3),
                               SamplingConfig(n=4, max_new_tokens=6))
        eos = int(free.tokens_BxNxL[0, 0, 2])   # a token drawn early, as EOS: row 0 stops there
        cfg = SamplingConfig(n=4, max_new_tokens=6, eos_id=eos, pad_id=0)
    out = sampling.sample(fns, params, prompt, mask, jax.random.key(3), cfg)
    assert (~np.asarray(out.mask_BxNxL)).any() and np.asarray(out.mask_BxNxL).any()
    got = jax.jit(lambda p, q: sampling.shared_prompt_path_terms(fns, p, fns, q, prompt, mask,
                                                                 out))(params, ref_params)
    flat = sampling.flatten_samples(prompt, mask, out)
    want = (*sampling.response_kl_entropy(fns, params, fns, ref_params, *flat),
            sampling.sequence_logprobs(fns, ref_params, *flat))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    assert float(jnp.sum(got.kl_RxL)) > 0.1   # the two models differ


@pytest.mark.parametrize("temperature", [1e-37, 1e-38, 1e-40, 1e-46])
def test_tiny_temperature_draws_the_argmax_not_an_overflowed_token(temperature):
    """x / T overflows float32 at these temperatures (several tokens +inf, or 0 / 0 = NaN);
    the tempered distribution is the point mass on the arg-max (numpy), whatever the draw."""
    x = np.array([[1.0, 2.0, -3.0, 1.5],
                  [0.0, 0.5, 0.2, -1.0],        # a logit of exactly 0
                  [50.0, 300.0, 299.0, 1.0],    # large logits: x / T overflows even at 1e-37
                  [-2.0, -1.0, -jnp.inf, -5.0]], np.float32)
    f = np.asarray(head.filter_logits(jnp.asarray(x), temperature))
    assert not np.isnan(f).any()
    top = f.max(1, keepdims=True)
    p = np.exp(f.astype(np.float64) - top)
    np.testing.assert_array_equal(p / p.sum(1, keepdims=True), np.eye(4)[x.argmax(1)])
    draws = np.stack([np.asarray(head.draw(jax.random.key(i), jnp.asarray(f)))
                      for i in range(8)])
    np.testing.assert_array_equal(draws, np.broadcast_to(x.argmax(1), draws.shape))


def test_tiny_temperature_sampling_is_greedy_with_the_policy_logprob():
    """Through `sample`: the tokens are the greedy ones and their log-probs are the untempered
    policy's (teacher forcing), as at temperature 0."""
    table, prompt = _table(3), jnp.array([[1, 2], [3, 0]])
    mask = jnp.ones_like(prompt, bool)
    greedy = sampling.sample(toy_fns(), table, prompt, mask, jax.random.key(0),
                             SamplingConfig(n=2, max_new_tokens=4, temperature=0.0))
    tiny = sampling.sample(toy_fns(), table, prompt, mask, jax.random.key(0),
                           SamplingConfig(n=2, max_new_tokens=4, temperature=1e-39))
    np.testing.assert_array_equal(np.asarray(tiny.tokens_BxNxL), np.asarray(greedy.tokens_BxNxL))
    flat = sampling.flatten_samples(prompt, mask, tiny)
    want = sampling.sequence_logprobs(toy_fns(), table, *flat)
    np.testing.assert_allclose(np.asarray(tiny.logp_BxNxL).reshape(want.shape),
                               np.asarray(want), atol=1e-6)
    assert float(np.asarray(tiny.logp_BxNxL).min()) < -0.05   # not the tempered log-prob (0)


def test_dynamic_rope_paths_agree_within_max_len_and_refuse_past_it():
    """Dynamic NTK rope: within max_len the sampler's log-probs, the teacher-forced ones and the
    shared-prompt ones agree (one base, rope_theta). Past max_len the base depends on the
    longest position of each call, so prefill, every decode step and the shared-prompt chunk
    would each use another base than the full forward: refused with the lengths and rope named."""
    from infalign_jax import models
    cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_len=16, init_std=0.3, rope_type="dynamic",
                             rope_factor=2.0)
    params, fns = models.init_params(cfg, jax.random.key(1)), models.decoder_fns(cfg)
    prompt = jax.random.randint(jax.random.key(2), (2, 6), 1, 64)
    mask = jnp.ones_like(prompt, bool).at[1, :3].set(False)
    s = sampling.sample(fns, params, prompt, mask, jax.random.key(3),
                        SamplingConfig(n=2, max_new_tokens=10))           # 6 + 10 = max_len
    flat = sampling.flatten_samples(prompt, mask, s)
    tf = sampling.sequence_logprobs(fns, params, *flat)
    np.testing.assert_allclose(np.asarray(s.logp_BxNxL).reshape(tf.shape), np.asarray(tf),
                               atol=1e-5)
    shared = sampling.shared_sequence_logprobs(fns, params, prompt, mask, *flat[2:])
    np.testing.assert_allclose(np.asarray(shared), np.asarray(tf), atol=1e-5)
    # Past max_len: every cached path refuses (the full forward alone is defined there).
    with pytest.raises(ValueError, match=r"max_len 16"):
        sampling.sample(fns, params, prompt, mask, jax.random.key(3),
                        SamplingConfig(n=2, max_new_tokens=20))
    too_long = r"6 \+ 20 new tokens = 26 exceeds max_len 16 with rope_type='dynamic'"
    with pytest.raises(ValueError, match=too_long):
        models.prefill(params, prompt, cfg, mask, max_new_tokens=20)
    with pytest.raises(ValueError, match=too_long):
        models.shared_prompt_hidden(params, prompt, mask, jnp.ones((4, 20), jnp.int32), cfg)
    _, cache = models.prefill(params, prompt, cfg, mask, max_new_tokens=10)
    long_cache = {**cache, "rk": jnp.zeros(cache["rk"].shape[:3] + (20, cfg.head_dim)),
                  "rv": jnp.zeros(cache["rv"].shape[:3] + (20, cfg.head_dim))}
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        models.decode_step(params, jnp.ones((2,), jnp.int32), cfg, long_cache)


def test_padding_on_the_wrong_side_is_refused_naming_the_rows():
    """A right-padded prompt conditioned its first token on a pad (greedy [2, 14, 0, 2] against
    [10, 16, 12, 3] left-padded), and a response mask with a hole gave sequence_logprobs and
    shared_sequence_logprobs different values; both are refused, as is a response mask of
    another shape (the shared path broadcast a (L,) mask over every row)."""
    models, cfg, params = _tiny_model()
    fns = models.decoder_fns(cfg)
    prompt = jnp.array([[5, 6, 7, 0], [0, 5, 6, 7]], jnp.int32)
    right = jnp.array([[True, True, True, False], [False, True, True, True]])
    scfg = SamplingConfig(n=2, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"sample: prompt_mask_BxP rows \[0\] are not "
                                         r"left-padded"):
        sampling.sample(fns, params, prompt, right, jax.random.key(0), scfg)
    left = jnp.array([[False, True, True, True], [False, True, True, True]])
    resp = jnp.array([[3, 4, 5], [3, 4, 5], [6, 7, 8], [6, 7, 8]], jnp.int32)
    holes = jnp.array([[True, True, True], [False, True, True], [True, False, True],
                       [True, True, False]])
    for fn in (sampling.sequence_logprobs, sampling.shared_sequence_logprobs):
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"{name}: response mask rows \[1, 2\] are not"):
            fn(fns, params, prompt, left, resp, holes)
        with pytest.raises(ValueError, match=rf"{name}: prompt_mask_BxP rows \[0\]"):
            fn(fns, params, prompt, right, resp, jnp.ones((4, 3), bool))
        with pytest.raises(ValueError, match=rf"{name}: the response mask must have"):
            fn(fns, params, prompt, left, resp, jnp.ones((3,), bool))
    # the accepted layout: both paths agree
    ok = jnp.array([[True, True, True], [True, True, False], [True, False, False],
                    [False, False, False]])
    reps = jnp.repeat(prompt, 2, 0), jnp.repeat(left, 2, 0)
    np.testing.assert_allclose(
        sampling.shared_sequence_logprobs(fns, params, prompt, left, resp, ok),
        sampling.sequence_logprobs(fns, params, *reps, resp, ok), atol=1e-5)


def test_a_pad_id_outside_the_vocabulary_changes_nothing():
    """A tokenizer's added pad token can lie past the model's vocabulary: its embedding gather
    gave NaN, which stayed NaN under zero attention weight, so whole rows sampled token 0 with
    log-prob NaN. Padding ids are now replaced before the embedding: results equal pad id 0's."""
    models, cfg, params = _tiny_model()
    fns = models.decoder_fns(cfg)
    mask = jnp.array([[False, False, True, True], [True, True, True, True]])
    prompt = jnp.array([[0, 0, 5, 6], [4, 5, 6, 7]], jnp.int32)
    foreign = prompt.at[0, :2].set(cfg.vocab_size + 3)
    scfg = SamplingConfig(n=2, max_new_tokens=4, eos_id=None)
    a = sampling.sample(fns, params, prompt, mask, jax.random.key(1), scfg)
    b = sampling.sample(fns, params, foreign, mask, jax.random.key(1), scfg)
    np.testing.assert_array_equal(a.tokens_BxNxL, b.tokens_BxNxL)
    np.testing.assert_allclose(a.logp_BxNxL, b.logp_BxNxL, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(b.logp_BxNxL)))
    resp, rmask = a.tokens_BxNxL.reshape(4, -1), a.mask_BxNxL.reshape(4, -1)
    for fn, p, m in ((sampling.shared_sequence_logprobs, foreign, mask),
                     (sampling.sequence_logprobs, jnp.repeat(foreign, 2, 0),
                      jnp.repeat(mask, 2, 0))):
        np.testing.assert_allclose(fn(fns, params, p, m, resp, rmask),
                                   a.logp_BxNxL.reshape(4, -1), atol=1e-5)


def test_a_response_id_outside_the_vocabulary_is_nan_on_every_path():
    """A response id -1 (or V) at an unmasked position: the linear-head path scored it
    -logsumexp (a finite log-prob of no token) while the full-logits path wrapped -1 to token
    V - 1. Every path now gives NaN there (so a guarded step skips it), and a masked position
    holding such an id still gives 0 with finite gradients."""
    models, cfg, params = _tiny_model()
    fns = models.decoder_fns(cfg)
    full = fns._replace(hidden=None, lm_kernel=None)
    v = cfg.vocab_size
    prompt = jnp.array([[0, 5, 6, 7], [4, 5, 6, 7]], jnp.int32)
    pmask = jnp.array([[False, True, True, True], [True, True, True, True]])
    resp = jnp.array([[3, -1, 5], [v, 4, 2]], jnp.int32)
    rmask = jnp.ones((2, 3), bool)
    outs = [np.asarray(sampling.sequence_logprobs(f, params, prompt, pmask, resp, rmask))
            for f in (fns, full)]
    outs.append(np.asarray(sampling.shared_sequence_logprobs(fns, params, prompt, pmask, resp,
                                                             rmask)))
    for got in outs:
        assert np.isnan(got[0, 1]) and np.isnan(got[1, 0]) and np.isfinite(got[0, 0])
        assert np.isnan(got.sum(-1)).all()           # neither sequence passes as scored
        np.testing.assert_allclose(got, outs[0], atol=1e-5)   # NaN where the first has NaN
    # The single-token log-prob of the sampler and the teacher-forced KL pass follow it too.
    logits = jax.random.normal(jax.random.key(0), (3, v))
    lp = np.asarray(sampling._token_logprob(logits, jnp.array([-1, v, 2])))
    assert np.isnan(lp[:2]).all()
    np.testing.assert_allclose(lp[2], jax.nn.log_softmax(logits[2])[2], atol=1e-6)
    # Masked: 0, and the gradient stays finite on both paths.
    masked = rmask.at[0, 1:].set(False).at[1, :].set(False)
    for f in (fns, full):
        loss = lambda p: jnp.sum(sampling.sequence_logprobs(f, p, prompt, pmask, resp, masked))
        value, grad = jax.value_and_grad(loss)(params)
        assert np.isfinite(float(value))
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
