"""Sampler tests on a tabular policy whose sequence distribution can be enumerated exactly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from infalign_jax.decoding import sampling
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
    ("pad_outside_vocab", r"SamplingConfig.pad_id must be a token id in \[0, 5\) .* got 7"),
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
    elif case == "pad_outside_vocab":
        cfg = SamplingConfig(max_new_tokens=4, pad_id=7)
    run = lambda p, m: sampling.sample(fns, _table(), p, m, jax.random.key(0), cfg)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        (jax.jit(run) if jit else run)(prompt, mask)


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


def test_fast_argmax_and_categorical_match_jax_bit_for_bit():
    x = jax.random.normal(jax.random.key(0), (64, 37)) * 3
    x = x.at[1, 5].set(jnp.inf).at[2].set(-jnp.inf).at[3, 4].set(jnp.nan).at[3, 9].set(jnp.nan)
    x = x.at[4].set(0.0).at[5, :10].set(-jnp.inf)                    # ties: first index wins
    want = np.asarray(jnp.argmax(x, -1))
    assert want[2] == 0 and want[3] == 4 and want[4] == 0             # the cases exercised
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling._first_argmax)(x)), want)
    for i in range(5):
        key = jax.random.key(i)
        logits = jnp.where(jnp.isnan(x), 0.0, x).at[1, 5].set(0.0)
        logits = jnp.where(jnp.isinf(logits) & (logits < 0), -jnp.inf, logits)
        np.testing.assert_array_equal(
            np.asarray(jax.jit(sampling._categorical)(key, logits)),
            np.asarray(jax.jit(jax.random.categorical)(key, logits)))


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
    scfg = SamplingConfig(n=3, max_new_tokens=5, eos_id=2, pad_id=0, temperature=0.9)
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
