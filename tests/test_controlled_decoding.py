"""Controlled decoding against exact enumeration on a tabular policy and a tiny transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.decoding import controlled_decoding as cd
from infalign_jax.core import kl
from infalign_jax import models
from infalign_jax.decoding import sampling
from infalign_jax.decoding.sampling import SamplingConfig
from infalign_jax.core.types import DecoderFns

V, C, EOS, PAD, TARGET = 5, 8, 4, 0, 2


def _table(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 1.0, (C, V, V)), jnp.float32)


def tab_fns():
    """Tabular policy: next-token logits = table[#real tokens seen, last token]."""
    def prefill(table, tokens_BxP, mask_BxP, max_len):
        count = mask_BxP.sum(1).astype(jnp.int32)
        last = tokens_BxP[:, -1]
        return table[jnp.minimum(count, C - 1), last], {"count": count}

    def decode(table, token_B, cache):
        count = cache["count"] + 1
        return table[jnp.minimum(count, C - 1), token_B], {"count": count}

    def logits(table, tokens_BxT, mask_BxT):
        count = jnp.cumsum(mask_BxT, axis=1).astype(jnp.int32)
        return table[jnp.minimum(count, C - 1), tokens_BxT]

    return DecoderFns(prefill, decode, logits)


def count_target(tokens_BxT, mask_BxT):
    """Prefix scorer: number of TARGET tokens among the real tokens (one value per row)."""
    return jnp.sum((tokens_BxT == TARGET) & mask_BxT.astype(bool), axis=1).astype(jnp.float32)


def _prompt(batch):
    prompt = jnp.tile(jnp.array([[1, 3]], jnp.int32), (batch, 1))
    return prompt, jnp.ones_like(prompt, bool)


def _first_step_exact(table, lam, top_k):
    """numpy: pi_lambda over the vocabulary at the first response token after prompt [1, 3]."""
    logits = np.asarray(table, np.float64)[2, 3]
    logp = logits - np.log(np.exp(logits).sum())
    top = np.argsort(-logits)[:top_k]
    w = np.zeros(V)
    w[top] = np.exp(logp[top] + lam * (top == TARGET))
    q = w / w.sum()
    p = np.exp(logp)
    kl = np.sum(q[top] * np.log(q[top] / p[top]))
    return q, kl


@pytest.mark.parametrize("lam,top_k", [(0.0, 3), (1.5, 3), (0.7, V)])
def test_tokenwise_first_step_matches_enumeration(lam, top_k):
    table = _table()
    q, kl = _first_step_exact(table, lam, top_k)
    n = 20000
    prompt, mask = _prompt(n)
    out = jax.jit(lambda r: cd.tokenwise_decode(
        tab_fns(), table, count_target, prompt, mask, r, lam=lam, top_k=top_k,
        max_new_tokens=1))(jax.random.key(1))
    freq = np.bincount(np.asarray(out.tokens_BxL[:, 0]), minlength=V) / n
    # Tokens outside the top-k have probability exactly 0; the rest within 5 binomial s.e.
    np.testing.assert_array_equal(freq[q == 0], 0.0)
    assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-12)
    np.testing.assert_allclose(np.asarray(out.kl_B), kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(out.logp_BxL[:, 0])),
                               q[np.asarray(out.tokens_BxL[:, 0])], rtol=1e-5)


def test_tokenwise_lambda_zero_full_vocab_is_pi_ref():
    """lambda=0, k=|V|: the whole sequence distribution is pi_ref's (enumerated, 3 tokens)."""
    table = _table(3)
    n = 20000
    prompt, mask = _prompt(n)
    out = jax.jit(lambda r: cd.tokenwise_decode(
        tab_fns(), table, count_target, prompt, mask, r, lam=0.0, top_k=V,
        max_new_tokens=3, eos_id=EOS, pad_id=PAD))(jax.random.key(2))
    np.testing.assert_allclose(out.logp_BxL, out.ref_logp_BxL, atol=1e-5)
    np.testing.assert_allclose(out.kl_B, 0.0, atol=1e-5)
    # Teacher-forced pi_ref log-probs agree with the decoder's.
    ref = sampling.sequence_logprobs(tab_fns(), table, prompt, mask, out.tokens_BxL, out.mask_BxL)
    np.testing.assert_allclose(ref, out.ref_logp_BxL, atol=1e-5)
    # Empirical probability of each observed sequence vs exp(sum ref logp).
    seqs, counts = np.unique(np.asarray(out.tokens_BxL), axis=0, return_counts=True)
    probs = {tuple(s): float(p) for s, p in zip(np.asarray(out.tokens_BxL),
                                                np.exp(np.asarray(ref).sum(1)))}
    p = np.array([probs[tuple(s)] for s in seqs])
    assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 2e-4)
    assert abs(p.sum() - 1.0) < 0.02  # nearly all sequences of mass seen


def test_tokenwise_large_lambda_picks_argmax_value():
    table = _table(5)
    prompt, mask = _prompt(64)
    out = jax.jit(lambda r: cd.tokenwise_decode(
        tab_fns(), table, count_target, prompt, mask, r, lam=1e3, top_k=V,
        max_new_tokens=4))(jax.random.key(0))
    assert np.all(np.asarray(out.tokens_BxL) == TARGET)
    assert np.all(np.asarray(out.mask_BxL))


def test_tokenwise_logits_closed_form():
    ref = jnp.array([[0.1, -1.0, 2.0, 0.3]])
    idx = jnp.array([[2, 3]])
    vals = jnp.array([[0.5, -2.0]])
    got = cd.tokenwise_logits(ref, vals, idx, 2.0)
    logp = np.asarray(ref[0]) - np.log(np.exp(np.asarray(ref[0])).sum())
    np.testing.assert_allclose(got[0], [logp[2] + 1.0, logp[3] - 4.0], rtol=1e-6)


def test_blockwise_increases_target_count_and_bound():
    table = _table(7)
    n = 512
    prompt, mask = _prompt(n)
    m, k, length = 2, 16, 6
    f = jax.jit(lambda r, kk: cd.blockwise_decode(
        tab_fns(), table, count_target, prompt, mask, r, num_candidates=kk, block_size=m,
        max_new_tokens=length, eos_id=EOS, pad_id=PAD), static_argnums=1)
    best = f(jax.random.key(0), k)
    base = sampling.sample(tab_fns(), table, prompt, mask, jax.random.key(1),
                           SamplingConfig(n=1, max_new_tokens=length, eos_id=EOS, pad_id=PAD))
    base_count = np.asarray(count_target(base.tokens_BxNxL[:, 0], base.mask_BxNxL[:, 0])).mean()
    best_count = np.asarray(count_target(best.tokens_BxL, best.mask_BxL)).mean()
    assert best_count > 2.0 * base_count + 0.5, (best_count, base_count)
    np.testing.assert_allclose(best.score_B, count_target(best.tokens_BxL, best.mask_BxL))
    # Kept tokens carry their pi_ref log-probs; EOS ends a row.
    ref = sampling.sequence_logprobs(tab_fns(), table, prompt, mask, best.tokens_BxL, best.mask_BxL)
    np.testing.assert_allclose(ref, best.ref_logp_BxL, atol=1e-5)
    toks, msk = np.asarray(best.tokens_BxL), np.asarray(best.mask_BxL)
    for row_t, row_m in zip(toks, msk):
        eos_at = np.flatnonzero(row_t == EOS)
        if eos_at.size:
            assert row_m[:eos_at[0] + 1].all() and not row_m[eos_at[0] + 1:].any()
        else:
            assert row_m.all()
    # One best-of-K bound per accepted block: ceil(tokens / M) (a block cut by EOS is one).
    expected = kl.blockwise_cd_kl_bound(msk.sum(1), m, k, ceil_blocks=True)
    np.testing.assert_allclose(best.kl_bound_B, expected, rtol=1e-5)


def test_a_scorer_without_finite_values_is_counted_and_blockwise_keeps_an_unguided_block():
    """Row 1's prefixes are all scored NaN: blockwise keeps each block's first candidate (what a
    constant scorer, every candidate tied, keeps; it took the last one through index -1) and both
    decoders count the steps; row 0, scored as usual, counts none. `evaluate` refuses such runs."""
    from infalign_jax.workflows.evaluate import refuse_unscored
    table = _table(3)
    prompt = jnp.array([[1, 3], [2, 3]], jnp.int32)
    mask = jnp.ones_like(prompt, bool)

    def nan_on_row_1(tokens_BxT, mask_BxT):
        return jnp.where(tokens_BxT[:, 0] == 2, jnp.nan, count_target(tokens_BxT, mask_BxT))

    def constant(tokens_BxT, mask_BxT):
        return jnp.zeros(tokens_BxT.shape[0], jnp.float32)

    def block(scorer):
        return cd.blockwise_decode(tab_fns(), table, scorer, prompt, mask, jax.random.key(4),
                                   num_candidates=4, block_size=2, max_new_tokens=6, pad_id=PAD)

    got, unguided = block(nan_on_row_1), block(constant)
    np.testing.assert_array_equal(got.unscored_B, [0, 3])
    np.testing.assert_array_equal(got.tokens_BxL[1], unguided.tokens_BxL[1])
    assert np.all(np.asarray(got.kl_bound_B) > 0)
    tok = cd.tokenwise_decode(tab_fns(), table, nan_on_row_1, prompt, mask, jax.random.key(4),
                              lam=1.0, top_k=3, max_new_tokens=6, pad_id=PAD)
    np.testing.assert_array_equal(tok.unscored_B, [0, 6])
    refuse_unscored("cd_blockwise", np.zeros(4, np.int32), {"last_loss": 0.1})
    with pytest.raises(ValueError, match=r"cd_blockwise: .* at 3 decoding steps of 1 of 2 "
                                         r"sequences .*loss nan"):
        refuse_unscored("cd_blockwise", got.unscored_B, {"last_loss": float("nan")})


def test_tokenwise_counts_a_step_as_unscored_only_where_its_candidates_have_no_distribution():
    """A scorer value of -inf with lambda > 0 gives that candidate probability 0, a usable
    distribution (it was counted as unscored, and `evaluate` refused the run); with lambda < 0
    the same value is a +inf logit and the softmax is NaN, counted at every step."""
    table = _table(6)
    prompt, mask = _prompt(4)

    def never_target(tokens_BxT, mask_BxT):
        return jnp.where(last_token_id(tokens_BxT, mask_BxT) == TARGET, -jnp.inf, 0.0)

    def decode(lam):
        return cd.tokenwise_decode(tab_fns(), table, never_target, prompt, mask,
                                   jax.random.key(5), lam=lam, top_k=V, max_new_tokens=6,
                                   pad_id=PAD)

    usable = decode(1.0)
    np.testing.assert_array_equal(usable.unscored_B, [0, 0, 0, 0])
    real = np.asarray(usable.mask_BxL)
    assert not np.any(np.asarray(usable.tokens_BxL)[real] == TARGET)
    assert np.all(np.isfinite(np.asarray(usable.logp_BxL))) and np.all(np.isfinite(usable.kl_B))
    broken = decode(-1.0)
    np.testing.assert_array_equal(broken.unscored_B, np.asarray(broken.mask_BxL).sum(1))
    assert np.all(np.asarray(broken.unscored_B) > 0)


def _undefined_past_eos(score):
    """`score`, but NaN for a prefix with a real token after a real EOS (a scorer defined on
    responses up to their end only)."""
    def scorer(tokens_BxT, mask_BxT):
        real = mask_BxT.astype(bool)
        eos = real & (tokens_BxT == EOS)
        past = jnp.cumsum(eos, axis=1) - eos
        return jnp.where(jnp.any(real & (past > 0), 1), jnp.nan, score(tokens_BxT, real))
    return scorer


def test_blockwise_stops_at_an_eos_inside_a_block_and_counts_no_step_after_it():
    """Blocks of 3 scored by shortness, so that blocks ending at an EOS before their last token
    are accepted: the row ends there (mask, padding, bound of the blocks accepted), and the
    blocks after it, whose prefixes the scorer does not define, are not counted as unscored."""
    table, m, k, length = _table(2), 3, 8, 9
    prompt, mask = _prompt(32)
    shortest = _undefined_past_eos(lambda t, real: -jnp.sum(real, 1).astype(jnp.float32))
    run = lambda r: cd.blockwise_decode(  # noqa: E731
        tab_fns(), table, shortest, prompt, mask, r, num_candidates=k, block_size=m,
        max_new_tokens=length, eos_id=EOS, pad_id=PAD)
    out = jax.jit(run)(jax.random.key(1))
    tokens, real = np.asarray(out.tokens_BxL), np.asarray(out.mask_BxL)
    ends = real.sum(1)
    assert np.any((ends < length) & (ends % m != 0))   # an EOS before a block's last token
    for row_t, n_real in zip(tokens, ends):
        eos_at = np.flatnonzero(row_t == EOS)
        assert eos_at.size == 0 and n_real == length or eos_at[0] == n_real - 1
        assert (row_t[n_real:] == PAD).all()
    np.testing.assert_array_equal(real, np.arange(length)[None] < ends[:, None])
    np.testing.assert_array_equal(out.unscored_B, 0)
    np.testing.assert_allclose(out.kl_bound_B, np.ceil(ends / m) * float(kl.bon_kl_bound(k)),
                               rtol=1e-6)
    eager = run(jax.random.key(1))   # the sampler's padding checks see every prefix
    np.testing.assert_array_equal(np.asarray(eager.tokens_BxL), tokens)


def test_tokenwise_kl_and_unscored_steps_stop_at_eos():
    """A scorer defined on prefixes that end at EOS at the latest (NaN for a real token after
    EOS, which only the steps after a row's EOS build): no step is unscored and the KL is the
    sum over the steps up to EOS of KL(pi_lambda || pi_ref), enumerated with numpy."""
    table, lam, top_k, length = _table(4), 1.5, 3, 6
    prompt, mask = _prompt(64)

    out = cd.tokenwise_decode(tab_fns(), table, _undefined_past_eos(count_target), prompt, mask,
                              jax.random.key(6), lam=lam, top_k=top_k, max_new_tokens=length,
                              eos_id=EOS, pad_id=PAD)
    tokens, real = np.asarray(out.tokens_BxL), np.asarray(out.mask_BxL)
    assert (real.sum(1) < length).sum() >= 10          # rows that stopped at EOS early
    np.testing.assert_array_equal(out.unscored_B, 0)
    t64 = np.asarray(table, np.float64)
    want = np.zeros(len(tokens))
    for b, (row, m) in enumerate(zip(tokens, real)):
        last = 3
        for t in range(int(m.sum())):
            logits = t64[min(2 + t, C - 1), last]
            logp = logits - np.log(np.exp(logits).sum())
            top = np.argsort(-logits)[:top_k]
            w = np.exp(logp[top] + lam * (top == TARGET))   # V = count + [z == TARGET]
            q = w / w.sum()
            want[b] += np.sum(q * np.log(q / np.exp(logp[top])))
            last = row[t]
    np.testing.assert_allclose(np.asarray(out.kl_B), want, rtol=1e-4, atol=1e-6)


def last_token_id(tokens_BxT, mask_BxT):
    """Prefix scorer: the id of the last real token (distinct values, so no ties)."""
    last = jnp.max(jnp.where(mask_BxT.astype(bool), jnp.arange(tokens_BxT.shape[1]), -1), axis=1)
    return jnp.take_along_axis(tokens_BxT, last[:, None], 1)[:, 0].astype(jnp.float32)


@pytest.mark.parametrize("block_size", [1, 4])
def test_blockwise_bound_is_at_least_the_exact_kl_when_a_block_is_longer_than_the_response(
        block_size):
    """One token decoded, blocks of M >= 1: the decoder's distribution is best-of-K over pi_ref's
    first token by id, q_i = F_i^K - F_{i-1}^K, whose KL the bound must cover. CD's L / M counted
    a quarter of a block at M = 4 (0.32 below this exact KL of 0.69 at K = 8)."""
    table = _table(5)
    k = 8
    prompt, mask = _prompt(4)
    out = cd.blockwise_decode(tab_fns(), table, last_token_id, prompt, mask, jax.random.key(0),
                              num_candidates=k, block_size=block_size, max_new_tokens=1)
    p, _ = _first_step_exact(table, 0.0, V)
    cdf = np.cumsum(p)
    q = cdf ** k - np.concatenate([[0.0], cdf[:-1]]) ** k
    exact = float(np.sum(q * np.log(q / p)))
    assert exact > 0.5 * float(kl.bon_kl_bound(k))   # the old count would fall below it
    np.testing.assert_allclose(out.kl_bound_B, float(kl.bon_kl_bound(k)), rtol=1e-6)
    assert float(out.kl_bound_B[0]) >= exact
    with pytest.raises(ValueError, match="temperature=0.5"):
        cd.blockwise_decode(tab_fns(), table, last_token_id, prompt, mask, jax.random.key(0),
                            num_candidates=k, block_size=block_size, max_new_tokens=1,
                            temperature=0.5)


def test_blockwise_k1_is_pi_ref_first_token():
    """K=1 keeps the only candidate: the first token follows pi_ref exactly."""
    table = _table(9)
    n = 20000
    prompt, mask = _prompt(n)
    out = jax.jit(lambda r: cd.blockwise_decode(
        tab_fns(), table, count_target, prompt, mask, r, num_candidates=1, block_size=2,
        max_new_tokens=2))(jax.random.key(3))
    q, _ = _first_step_exact(table, 0.0, V)
    freq = np.bincount(np.asarray(out.tokens_BxL[:, 0]), minlength=V) / n
    assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-12)
    np.testing.assert_allclose(out.kl_bound_B, 0.0, atol=1e-7)


@pytest.mark.parametrize("k", [2, 5])
def test_blockwise_one_token_is_best_of_k(k):
    """M = L = 1: P(TARGET) = 1 - (1 - p)^K; other tokens share the rest in pi_ref's proportions."""
    table = _table(11)
    n = 20000
    prompt, mask = _prompt(n)
    out = jax.jit(lambda r: cd.blockwise_decode(
        tab_fns(), table, count_target, prompt, mask, r, num_candidates=k, block_size=1,
        max_new_tokens=1))(jax.random.key(4))
    p, _ = _first_step_exact(table, 0.0, V)
    q = p * (1 - p[TARGET]) ** (k - 1)
    q[TARGET] = 1 - (1 - p[TARGET]) ** k
    freq = np.bincount(np.asarray(out.tokens_BxL[:, 0]), minlength=V) / n
    assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-12), (freq, q)


def test_value_head_scorer_with_tiny_model():
    cfg = models.ModelConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                             head_dim=8, d_ff=32, max_len=16, heads=("lm", "value"))
    params = models.init_params(cfg, jax.random.key(0))
    # The value head starts at zero; perturb every weight so that V separates the candidates.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.5 * jax.random.normal(k, x.shape)
                                          for x, k in zip(leaves, keys)])
    scorer = cd.value_head_scorer(cfg, params)
    prompt = jnp.array([[0, 1, 2], [3, 4, 5]], jnp.int32)
    mask = jnp.array([[False, True, True], [True, True, True]])
    out = jax.jit(lambda r: cd.tokenwise_decode(
        models.decoder_fns(cfg), params, scorer, prompt, mask, r, lam=1e4, top_k=6,
        max_new_tokens=1))(jax.random.key(0))
    # With lambda huge the chosen token is the argmax of V over all candidates (enumerated).
    for b in range(2):
        cands = jnp.concatenate([jnp.tile(prompt[b], (6, 1)), jnp.arange(6)[:, None]], 1)
        cmask = jnp.concatenate([jnp.tile(mask[b], (6, 1)), jnp.ones((6, 1), bool)], 1)
        values = models.apply(params, cands, cfg, attention_mask_BxT=cmask).values[:, -1]
        assert int(out.tokens_BxL[b, 0]) == int(jnp.argmax(values))
    with pytest.raises(ValueError, match="value"):
        cd.value_head_scorer(models.ModelConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2,
                                                n_kv_heads=2, head_dim=8, d_ff=32), params)


def test_bad_arguments():
    table = _table()
    prompt, mask = _prompt(2)
    with pytest.raises(ValueError, match="top_k"):
        cd.tokenwise_decode(tab_fns(), table, count_target, prompt, mask, jax.random.key(0),
                            lam=1.0, top_k=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="block_size"):
        cd.blockwise_decode(tab_fns(), table, count_target, prompt, mask, jax.random.key(0),
                            num_candidates=2, block_size=0, max_new_tokens=2)


def test_blockwise_runs_eagerly_after_a_row_stops():
    """Un-jitted, a row that accepted EOS before the last block gave the sampler a prefix with
    padding after real tokens, which it refused; eager and jitted now agree."""
    table = _table(7)
    prompt = jnp.tile(jnp.array([[1, 3]], jnp.int32), (16, 1))
    mask = jnp.ones_like(prompt, bool)
    kw = dict(num_candidates=4, block_size=2, max_new_tokens=6, eos_id=EOS, pad_id=PAD)
    run = lambda r: cd.blockwise_decode(tab_fns(), table, count_target, prompt, mask, r, **kw)  # noqa: E731
    jitted, eager = jax.jit(run)(jax.random.key(0)), run(jax.random.key(0))
    early = np.any(np.asarray(jitted.tokens_BxL)[:, :4] == EOS, 1)
    assert early.any()
    for a, b in zip(jitted, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenwise_lambda_zero_with_an_infinite_value_is_pi_ref():
    """lambda = 0 is pi_ref over the candidates whatever the scorer says: 0 * -inf was NaN, every
    step unscored with KL 0."""
    table = _table(3)
    prompt, mask = _prompt(4)

    def forbid_target(tokens_BxT, mask_BxT):
        return jnp.where(jnp.any((tokens_BxT == TARGET) & mask_BxT, 1), -jnp.inf, 0.0)

    top = jnp.arange(V)[None]
    np.testing.assert_allclose(
        cd.tokenwise_logits(table[2, 3][None], jnp.where(top == TARGET, -jnp.inf, 0.0), top, 0.0),
        jax.nn.log_softmax(table[2, 3])[None], rtol=1e-6)
    out = cd.tokenwise_decode(tab_fns(), table, forbid_target, prompt, mask, jax.random.key(0),
                              lam=0.0, top_k=V, max_new_tokens=3)
    np.testing.assert_array_equal(out.unscored_B, 0)
    np.testing.assert_allclose(out.kl_B, 0.0, atol=1e-6)
    np.testing.assert_allclose(out.logp_BxL, out.ref_logp_BxL, atol=1e-6)


def test_tokenwise_refuses_what_the_sampler_refuses_and_an_unscored_step_has_no_kl():
    """tokenwise_decode took right-padded prompts, ids outside the vocabulary, an eos_id past it
    and a length past max_len, all refused by `sample`; a step with no distribution over the
    candidates added KL 0."""
    cfg = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_len=24, init_std=0.5)
    params, fns = models.init_params(cfg, jax.random.key(0)), models.decoder_fns(cfg)
    zero = lambda t, m: jnp.zeros(t.shape[0], jnp.float32)  # noqa: E731
    left = jnp.array([[False, True, True, True]])

    def decode(prompt, mask, scorer=zero, **kw):
        return cd.tokenwise_decode(fns, params, scorer, jnp.asarray(prompt, jnp.int32), mask,
                                   jax.random.key(0), **{"lam": 1.0, "top_k": 4,
                                                         "max_new_tokens": 4, **kw})

    for prompt, mask, kw, match in (
            ([[5, 6, 7, 0]], left[:, ::-1], {}, r"tokenwise_decode: prompt_mask_BxP rows \[0\] "
                                                 r"are not left-padded"),
            ([[0, 5, 6, 70]], left, {}, r"tokenwise_decode: prompt_BxP holds token ids outside "
                                        r"the decoder's vocabulary \[0, 32\): \[70\]"),
            ([[0, 5, 6, 7]], left, {"eos_id": 99}, r"SamplingConfig.eos_id must be a token id"),
            ([[0, 5, 6, 7]], left, {"max_new_tokens": 30}, r"exceeds the decoder's max_len 24"),
            ([[0, 5, 6, 7]], jnp.zeros((1, 4), bool), {}, r"rows \[0\] have no real token")):
        with pytest.raises(ValueError, match=match):
            decode(prompt, mask, **kw)
    nan_values = lambda t, m: jnp.full(t.shape[0], jnp.nan)  # noqa: E731
    out = decode([[0, 5, 6, 7]], left, nan_values)
    assert int(out.unscored_B[0]) == 4 and np.isnan(out.kl_B[0])
