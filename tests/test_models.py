"""Model properties: causality, KV cache = full forward, padding, reward position, precision."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax import models
from infalign_jax.decoding import sampling
from infalign_jax.models import ModelConfig
from infalign_jax.core.losses import last_valid_index
from random_params import randomise

LLAMA = ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=48, max_len=40, heads=("lm", "reward", "value"), init_std=0.3)
GPT2 = dataclasses.replace(LLAMA, family="gpt2", n_kv_heads=4, activation="gelu_tanh")


# Jitted once per config: eager Linen runs op by op and is many times slower.
apply = jax.jit(models.apply, static_argnums=2)
prefill = jax.jit(models.prefill, static_argnums=2, static_argnames=("max_new_tokens", "n"))
decode_step = jax.jit(models.decode_step, static_argnums=2)


@pytest.fixture(params=[LLAMA, GPT2], ids=["llama", "gpt2"])
def model(request):
    cfg = request.param
    return cfg, randomise(models.init_params(cfg, jax.random.key(0)))


def test_causal_by_gradient(model):
    # Untied embeddings, so the gradient w.r.t. the embedding table is the input path only.
    cfg = dataclasses.replace(model[0], tie_embeddings=False)
    params = randomise(models.init_params(cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.vocab_size)
    emb = params["embed"]

    def logit_at(e, t):
        p = dict(params, embed=e)
        return apply(p, tokens, cfg).logits[0, t].sum()

    grad = jax.jit(jax.grad(logit_at), static_argnums=1)
    for t in (0, 4, 9):
        g = grad(emb, t)
        # embedding rows of tokens strictly after t (that do not also occur at or before t) get no gradient
        before = set(np.asarray(tokens[0, : t + 1]).tolist())
        after = set(np.asarray(tokens[0, t + 1:]).tolist()) - before
        for tok in after:
            assert float(jnp.abs(g[tok]).max()) == 0.0
        for tok in before:
            assert float(jnp.abs(g[tok]).max()) > 0.0


DECODE_ATOL = 3e-5


@pytest.mark.parametrize("cfg", [LLAMA, dataclasses.replace(LLAMA, sliding_window=3, attn_softcap=2.0),
                                 GPT2], ids=["llama", "llama-window-softcap", "gpt2"])
def test_kv_cache_decode_equals_full_forward(cfg):
    """Prefill once, then two continuations per prompt (rows b*2 + j) through the two-part cache
    (shared prompt KV, own response KV): each row's logits equal the full forward of its own
    sequence, also with a sliding window (which masks prompt keys and earlier response slots) and
    capped attention scores."""
    params = randomise(models.init_params(cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(2), (3, 11), 0, cfg.vocab_size)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0] + [1] * 10, [1] * 11], bool)
    prompt_len = 6
    other = tokens.at[:, prompt_len:].set(
        jax.random.randint(jax.random.key(3), (3, 11 - prompt_len), 0, cfg.vocab_size))
    full = apply(params, tokens, cfg, attention_mask_BxT=mask).logits
    full_other = apply(params, other, cfg, attention_mask_BxT=mask).logits
    logits, cache = prefill(params, tokens[:, :prompt_len], cfg, mask[:, :prompt_len],
                            max_new_tokens=11 - prompt_len, n=2)
    np.testing.assert_allclose(np.where(mask[:, :prompt_len, None], logits, 0),
                               np.where(mask[:, :prompt_len, None], full[:, :prompt_len], 0), atol=1e-5)
    assert cache["pk"].shape[1] == 3 and cache["rk"].shape[1] == 6  # prompt KV not repeated
    # The cached decode sums its attention over two KV blocks, the full forward over one causal
    # row: f32 rounding of the reordered sums reached 1.1e-5 (XLA's CPU optimisation level 0).
    # A wrong slot, mask or position moves these logits by far more than ATOL (the last assert).
    for t in range(prompt_len, 11):
        rows = jnp.stack([tokens[:, t], other[:, t]], axis=1).reshape(6)
        step, cache = decode_step(params, rows, cfg, cache)
        np.testing.assert_allclose(step[0::2], full[:, t], atol=DECODE_ATOL)
        np.testing.assert_allclose(step[1::2], full_other[:, t], atol=DECODE_ATOL)
    assert float(jnp.abs(full).max()) > 1.0  # the comparison is not between near-zero numbers
    assert float(jnp.abs(full[:, -1] - full_other[:, -1]).max()) > 1e-2  # the rows differ


def _numpy_cached_attention(q, pk, pv, pmask, rk, rv, index, k, v, n_kv, scale, cap,
                            positions, window, ppos):
    """Row by row, token by token and head by head: the softmax over the row's prompt keys, its
    first `index` response slots and its own new tokens up to this one, each kept when inside
    the sliding window. q (R, S, H, D); k, v (R, S, H_kv, D); positions (R, S)."""
    rows, s_new, heads, dh = q.shape
    n, groups = rows // pk.shape[0], heads // n_kv
    out = np.zeros((rows, s_new, heads, dh))
    for r in range(rows):
        b = r // n
        keys, vals, pos_k = [], [], []
        for j in np.flatnonzero(pmask[b]):
            keys.append(pk[b, :, j]), vals.append(pv[b, :, j]), pos_k.append(ppos[b, j])
        for slot in range(index):
            keys.append(rk[r, :, slot]), vals.append(rv[r, :, slot])
            pos_k.append(positions[r, 0] - index + slot)
        for t in range(s_new):
            keys.append(k[r, t]), vals.append(v[r, t]), pos_k.append(positions[r, t])
            pos = positions[r, t]
            keep = np.array([window == 0 or pos - pk_ < window for pk_ in pos_k])
            kk, vv = np.stack(keys)[keep], np.stack(vals)[keep]        # T, H_kv, D
            for h in range(heads):
                sc = kk[:, h // groups] @ q[r, t, h] * scale
                sc = cap * np.tanh(sc / cap) if cap else sc
                w = np.exp(sc - sc.max())
                out[r, t, h] = (w / w.sum()) @ vv[:, h // groups]
    return out


@pytest.mark.parametrize("s_new", [1, 3], ids=["decode-step", "chunk"])
@pytest.mark.parametrize("window,cap", [(0, 0.0), (2, 2.0), (7, 0.0)])
def test_cached_attention_equals_a_numpy_softmax(window, cap, s_new):
    """The cached attention (`transformer._attend_cached`) of one token per row (a decode step)
    and of a causal chunk of 3: 3 prompts x 2 rows each, left padding, 5 of 7 response slots
    written, grouped query heads; with capped scores, and with sliding windows: one of 2 (which
    masks the chunk's own first token for its last, and all but the last written slot) and one
    of 7 (which keeps a prompt's last key for the first new token and masks it for the next)."""
    from infalign_jax.models import transformer as T
    rng = np.random.default_rng(0)
    b, n, p, slots, n_kv, groups, dh, index = 3, 2, 6, 7, 2, 3, 8, 5
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = f(b * n, s_new, n_kv * groups, dh), f(b * n, s_new, n_kv, dh), f(b * n, s_new, n_kv, dh)
    pk, pv, rk, rv = f(b, n_kv, p, dh), f(b, n_kv, p, dh), f(b * n, n_kv, slots, dh), f(b * n, n_kv, slots, dh)
    pmask = np.ones((b, p), bool)
    pmask[0, :3] = pmask[1, :1] = False
    ppos = np.maximum(np.cumsum(pmask, 1) - 1, 0)
    positions = np.repeat(pmask.sum(1), n)[:, None] + index + np.arange(s_new)
    args = (q, pk, pv, pmask, rk, rv, index, k, v, n_kv, 0.3, cap, positions)
    got = T._attend_cached(*(jnp.asarray(a) for a in args[:7]), jnp.asarray(k).swapaxes(1, 2),
                           jnp.asarray(v).swapaxes(1, 2), n_kv, jnp.float32(0.3), cap,
                           jnp.asarray(positions), jnp.int32(window) if window else None,
                           jnp.asarray(ppos))
    want = _numpy_cached_attention(*args, window, ppos)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    if window:   # the window changes the answer (it is not a no-op here)
        assert np.abs(_numpy_cached_attention(*args, 0, ppos) - want).max() > 1e-2


@pytest.mark.parametrize("cfg,window", [(LLAMA, 0), (LLAMA, 3), (GPT2, 0)],
                         ids=["llama", "llama-window", "gpt2"])
def test_shared_prompt_hidden_equals_the_full_forward_with_its_gradient(cfg, window):
    """Two responses per prompt, the prompt run once (`models.shared_prompt_hidden`): the hidden
    states predicting each response token, and the parameter gradient of a function of them,
    equal those of the full forward over [prompt | response] per row (left-padded prompts; with
    and without a sliding window, which also masks prompt keys)."""
    cfg = dataclasses.replace(cfg, sliding_window=window)
    params = randomise(models.init_params(cfg, jax.random.key(0)))
    prompt = jax.random.randint(jax.random.key(4), (3, 6), 0, cfg.vocab_size)
    pmask = jnp.array([[0, 0, 1, 1, 1, 1], [0] + [1] * 5, [1] * 6], bool)
    resp = jax.random.randint(jax.random.key(5), (6, 5), 0, cfg.vocab_size)
    weight = jax.random.normal(jax.random.key(6), (6, 5, cfg.d_model))

    def full(p):
        tokens, mask = sampling.concat_prompt_response(
            jnp.repeat(prompt, 2, 0), jnp.repeat(pmask, 2, 0), resp, jnp.ones(resp.shape, bool))
        return sampling.response_positions(models.hidden_states(p, tokens, cfg,
                                                                attention_mask_BxT=mask), 6)

    def shared(p):
        return models.shared_prompt_hidden(p, prompt, pmask, resp, cfg)

    for f in (full, shared):
        f.value = jax.jit(f)(params)
        f.grad = jax.jit(jax.grad(lambda p: jnp.sum(f(p) * weight)))(params)
    np.testing.assert_allclose(shared.value, full.value, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(shared.grad), jax.tree.leaves(full.grad)):
        # float32 sums in another order: tolerance relative to the leaf's largest entry
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, float(jnp.abs(w).max())))
    assert float(jnp.abs(full.value[0] - full.value[1]).max()) > 1e-2   # the rows differ


def test_padding_invariance_and_reward_position(model):
    cfg, params = model
    seq = jax.random.randint(jax.random.key(3), (1, 7), 0, cfg.vocab_size)
    plain = apply(params, seq, cfg)
    pad = jnp.zeros((1, 4), seq.dtype)
    left = apply(params, jnp.concatenate([pad, seq], 1), cfg,
                        attention_mask_BxT=jnp.array([[0] * 4 + [1] * 7], bool))
    right = apply(params, jnp.concatenate([seq, pad], 1), cfg,
                         attention_mask_BxT=jnp.array([[1] * 7 + [0] * 4], bool))
    np.testing.assert_allclose(left.logits[:, 4:], plain.logits, atol=1e-5)
    np.testing.assert_allclose(right.logits[:, :7], plain.logits, atol=1e-5)
    np.testing.assert_allclose(left.values[:, 4:], plain.values, atol=1e-5)
    # The reward is read at the last real token, with any padding.
    np.testing.assert_allclose(left.reward, plain.reward, atol=1e-5)
    np.testing.assert_allclose(right.reward, plain.reward, atol=1e-5)
    # and it is not the value at any other position of the unpadded sequence
    shorter = apply(params, seq[:, :6], cfg)
    assert abs(float(shorter.reward[0] - plain.reward[0])) > 1e-4


def test_last_token_index():
    mask = jnp.array([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(last_valid_index(mask)[0], [3, 1, 3, 1])


def test_bfloat16_params_give_float32_logprobs():
    cfg = dataclasses.replace(LLAMA, dtype="bfloat16", param_dtype="bfloat16")
    params = models.init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    out = apply(params, tokens, cfg)
    assert out.logits.dtype == jnp.float32 and out.reward.dtype == jnp.float32
    logp = models.token_logprobs(out.logits, tokens)
    assert logp.dtype == jnp.float32
    # compare with a float32 run of the same (bf16-representable) weights
    cfg32 = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
    out32 = apply(jax.tree.map(lambda x: x.astype(jnp.float32), params), tokens, cfg32)
    # bf16 keeps ~3 significant digits: a few percent of the logit scale after two layers.
    scale = float(jnp.abs(out32.logits).max())
    assert float(jnp.abs(out.logits - out32.logits).max()) < 0.05 * scale


def test_token_logprobs_matches_numpy():
    logits = jax.random.normal(jax.random.key(5), (2, 3, 7)) * 3
    targets = jnp.array([[0, 6, 3], [1, 1, 2]])
    x = np.asarray(logits, np.float64)
    want = np.take_along_axis(x - np.log(np.exp(x).sum(-1, keepdims=True)),
                              np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(models.token_logprobs(logits, targets), want, atol=1e-5)


def test_sampler_logprobs_equal_teacher_forced(model):
    cfg, params = model
    fns = models.decoder_fns(cfg)
    prompt = jnp.array([[0, 0, 5, 7, 9], [3, 4, 5, 6, 7]])
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    scfg = sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=2, temperature=0.8)
    out = jax.jit(lambda p, r: sampling.sample(fns, p, prompt, mask, r, scfg))(params, jax.random.key(7))
    p, pm, r, rm = sampling.flatten_samples(prompt, mask, out)
    tf = sampling.sequence_logprobs(fns, params, p, pm, r, rm)
    # Two summation orders of float32 (cached decode steps vs one forward): relative 1e-5 too,
    # for the randomised weights' large log-probs (1.1e-5 at -1.9 on an AVX-512 Xeon).
    np.testing.assert_allclose(tf, out.logp_BxNxL.reshape(6, 6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("family", "mamba"), ("n_kv_heads", 3), ("head_dim", 7),
                                         ("heads", ("lm", "critic")), ("dtype", "float16"),
                                         ("vocab_size", 0), ("norm_eps", 0.0),
                                         # read as True before: any non-empty string is truthy
                                         ("tie_embeddings", "false"), ("qkv_bias", "false"),
                                         ("embed_scale", "false"),
                                         ("rmsnorm_unit_offset", "false"),
                                         # accepted before, and changed no logit
                                         ("rope_factor", 8.0), ("rope_low_freq_factor", 2.0),
                                         ("rope_original_max_len", 64),
                                         # NaN / negative initialisation scales were accepted
                                         ("init_std", float("nan")), ("init_std", -0.1)])
def test_config_errors_name_field(field, value):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        dataclasses.replace(LLAMA, **{field: value})


def test_remat_policies_give_the_same_gradients_and_save_memory():
    """`ModelConfig.remat` changes what the backward pass keeps, not what it computes: the same
    loss gradients under "none", "full" and "save_dots"; "full" keeps fewer activations (compiled
    temp bytes) than "none" at a shape where activations dominate."""
    base = dataclasses.replace(LLAMA, n_layers=3, d_model=32, d_ff=128, max_len=64)
    params = randomise(models.init_params(base, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (8, 64), 0, base.vocab_size)

    def grad_fn(cfg):
        def loss(p):
            out = models.apply(p, tokens, cfg)
            return jnp.mean(models.token_logprobs(out.logits[:, :-1], tokens[:, 1:]))
        return jax.jit(jax.grad(loss))

    grads, temp = {}, {}
    for policy in ("none", "full", "save_dots"):
        fn = grad_fn(dataclasses.replace(base, remat=policy))
        grads[policy] = fn(params)
        temp[policy] = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
    for policy in ("full", "save_dots"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[policy])):
            # float32 sums in another order: equal to 1e-4 of the leaf's scale
            np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(a).max()) + 1e-9)
    assert temp["full"] < 0.8 * temp["none"], temp
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="some")


def test_gpt2_past_its_position_table_is_refused_on_every_path():
    """A GPT-2 sequence longer than max_len read past the learned position table: NaN at every
    position of the row (also those below max_len), no error. Refused on the static length by
    apply, hidden_states, prefill and the shared-prompt path; within max_len nothing changes."""
    cfg = dataclasses.replace(GPT2, max_len=8)
    params = models.init_params(cfg, jax.random.key(0))
    long = jnp.ones((1, 12), jnp.int32)
    for call, where in ((lambda: models.apply(params, long, cfg), "apply"),
                        (lambda: models.hidden_states(params, long, cfg), "hidden_states"),
                        (lambda: models.prefill(params, long[:, :6], cfg, max_new_tokens=3),
                         "prefill"),
                        (lambda: models.shared_prompt_hidden(params, long[:, :6], long[:, :6] > 0,
                                                             long[:, :4], cfg),
                         "shared_prompt_hidden")):
        with pytest.raises(ValueError, match=rf"{where}: \d+ positions exceed ModelConfig.max_len"
                                             rf" 8"):
            call()
    out = models.apply(params, long[:, :8], cfg)
    assert np.isfinite(np.asarray(out.logits)).all()
    llama = dataclasses.replace(LLAMA, max_len=8)   # rotary positions have no table: allowed
    assert np.isfinite(np.asarray(models.apply(models.init_params(llama, jax.random.key(0)),
                                               long, llama).logits)).all()
