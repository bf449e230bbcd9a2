"""Vocabulary-chunked lm-head kernels (infalign_jax/core/vocab_chunks.py) vs float64 numpy and vs
the full-logits computation: values, gradients, bfloat16 activations, and compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.core import vocab_chunks as VC

B, L, D, V = 3, 5, 16, 300
# > V, = V, V not a multiple (300 = 4 * 64 + 44), a divisor of V, a small width (43 chunks, the
# last one overlapping its predecessor by 1 column).
CHUNKS = [512, V, 64, 100, 7]


def _head(seed, d=D, v=V, scale=3.0, dtype=jnp.float32):
    """hidden [B, L, d], kernel [d, v] (logits of standard deviation ~ `scale`), targets [B, L]."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, L, d)).astype(np.float32)
    kernel = (rng.normal(size=(d, v)) * scale / np.sqrt(d)).astype(np.float32)
    targets = rng.integers(0, v, size=(B, L)).astype(np.int32)
    return jnp.asarray(hidden, dtype), jnp.asarray(kernel), jnp.asarray(targets)


def _np_logits(hidden, kernel):
    """float64 logits of the (possibly bfloat16-rounded) inputs, as the model's einsum sees them."""
    h = np.asarray(jnp.asarray(hidden, jnp.float32), np.float64)
    k = np.asarray(jnp.asarray(kernel).astype(hidden.dtype).astype(jnp.float32), np.float64)
    return h @ k


def _np_log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _full_logits(hidden, kernel):
    """The model's lm head (models/transformer.py), all V columns at once."""
    return jnp.einsum("...d,dv->...v", hidden, kernel.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def _full_token_logprobs(hidden, kernel, targets):
    logp = jax.nn.log_softmax(_full_logits(hidden, kernel), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------- token_logprobs
@pytest.mark.parametrize("chunk", CHUNKS)
def test_token_logprobs_matches_float64_numpy(chunk):
    hidden, kernel, targets = _head(0)
    got = VC.token_logprobs(hidden, kernel, targets, chunk=chunk)
    assert got.shape == (B, L) and got.dtype == jnp.float32
    want = np.take_along_axis(_np_log_softmax(_np_logits(hidden, kernel)),
                              np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_token_logprobs_large_logits_and_jit():
    """Logits of std 30 (max - lse far from 0), under jit, 1-D leading shape."""
    hidden, kernel, targets = _head(1, scale=30.0)
    hidden, targets = hidden.reshape(B * L, D), targets.reshape(B * L)
    got = jax.jit(lambda h, k, t: VC.token_logprobs(h, k, t, chunk=64))(hidden, kernel, targets)
    want = np.take_along_axis(_np_log_softmax(_np_logits(hidden, kernel)),
                              np.asarray(targets)[:, None], -1)[:, 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [V, 64])
def test_token_logprobs_bfloat16_hidden(chunk):
    """bfloat16 hidden, float32 kernel: the kernel is cast to bfloat16 as in the model's lm head."""
    hidden, kernel, targets = _head(2, dtype=jnp.bfloat16)
    got = VC.token_logprobs(hidden, kernel, targets, chunk=chunk)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(_full_token_logprobs(hidden, kernel, targets)),
                               rtol=0, atol=1e-5)
    want = np.take_along_axis(_np_log_softmax(_np_logits(hidden, kernel)),
                              np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def _weighted(fn, weights):
    return lambda h, k, t: jnp.sum(fn(h, k, t) * weights)


@pytest.mark.parametrize("chunk", [512, 64, 7])
def test_token_logprobs_gradients_match_full(chunk):
    hidden, kernel, targets = _head(3)
    weights = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (B, L)), jnp.float32)
    chunked = _weighted(lambda h, k, t: VC.token_logprobs(h, k, t, chunk=chunk), weights)
    got_h, got_k = jax.grad(chunked, (0, 1))(hidden, kernel, targets)
    want_h, want_k = jax.grad(_weighted(_full_token_logprobs, weights), (0, 1))(hidden, kernel,
                                                                               targets)
    assert got_h.shape == hidden.shape and got_k.shape == kernel.shape
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_k), np.asarray(want_k), rtol=0, atol=1e-5)
    # And against float64 numpy: d/dz = w (onehot - softmax).
    z = _np_logits(hidden, kernel).reshape(B * L, V)
    dz = np.exp(_np_log_softmax(z))
    dz = -dz
    dz[np.arange(B * L), np.asarray(targets).reshape(-1)] += 1.0
    dz *= np.asarray(weights, np.float64).reshape(-1, 1)
    np.testing.assert_allclose(np.asarray(got_h).reshape(B * L, D), dz @ np.asarray(kernel).T,
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_k),
                               np.asarray(hidden).reshape(B * L, D).T @ dz, rtol=0, atol=1e-5)


def _shifted(hidden, kernel, shift):
    """The same head with every logit moved by `shift` (a constant feature of weight shift)."""
    hidden = jnp.concatenate([hidden, jnp.ones(hidden.shape[:-1] + (1,), hidden.dtype)], -1)
    return hidden, jnp.concatenate([kernel, jnp.full((1, kernel.shape[1]), shift)], 0)


@pytest.mark.parametrize("chunk", [64, 7])
def test_logits_far_below_zero(chunk):
    """Logits near -200 everywhere (exp underflows float32 from any reference point near 0):
    every result is shift-invariant, so the running max must come from real logits alone, also
    in the last chunk, whose columns the previous chunk covered are masked out."""
    hidden, kernel, targets = _head(14)
    hidden, kernel = _shifted(hidden, kernel, -200.0)
    ref = _np_log_softmax(_np_logits(hidden, kernel))
    got = VC.token_logprobs(hidden, kernel, targets, chunk=chunk)
    want = np.take_along_axis(ref, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)
    _, logp = VC.top_k_logprobs(hidden, kernel, 3, chunk=chunk)
    np.testing.assert_allclose(np.asarray(logp), -np.sort(-ref, axis=-1)[..., :3], atol=1e-4)
    hidden_q, kernel_q = _shifted(*_head(15)[:2], -200.0)
    kl, ent = VC.kl_and_entropy(hidden, kernel, hidden_q, kernel_q, chunk=chunk)
    want_kl, want_ent = _np_kl_entropy(_np_logits(hidden, kernel), _np_logits(hidden_q, kernel_q))
    np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-4, atol=1e-4)


def test_token_logprobs_bfloat16_gradients():
    """Gradients come back in the inputs' dtypes and agree with autodiff of the full head (which
    rounds the kernel's gradient through bfloat16; ours stays float32 until the end)."""
    hidden, kernel, targets = _head(4, dtype=jnp.bfloat16)
    weights = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (B, L)), jnp.float32)
    got_h, got_k = jax.grad(_weighted(lambda h, k, t: VC.token_logprobs(h, k, t, chunk=64),
                                      weights), (0, 1))(hidden, kernel, targets)
    want_h, want_k = jax.grad(_weighted(_full_token_logprobs, weights), (0, 1))(hidden, kernel,
                                                                               targets)
    assert got_h.dtype == jnp.bfloat16 and got_k.dtype == jnp.float32
    # a bfloat16 kernel gets a bfloat16 gradient
    g = jax.grad(_weighted(lambda h, k, t: VC.token_logprobs(h, k, t, chunk=64), weights), 1)(
        hidden, kernel.astype(jnp.bfloat16), targets)
    assert g.dtype == jnp.bfloat16
    # d hidden through the kernel as the forward saw it (rounded to bfloat16): a kernel row of
    # 1 + noise in [0, half a bfloat16 step above 1) is a row of ones there, so its hidden unit
    # shifts every logit alike and log-probs do not depend on it (derivative 0; through the
    # float32 row it was ~1e-3)
    noise = np.random.default_rng(5).uniform(0.0, 3e-3, V).astype(np.float32)
    flat = kernel.at[0].set(1.0 + noise)
    g = jax.grad(_weighted(lambda h, k, t: VC.token_logprobs(h, k, t, chunk=64), weights))(
        hidden, flat, targets)
    assert np.abs(np.asarray(g[..., 0], np.float32)).max() < 1e-4
    np.testing.assert_allclose(np.asarray(got_h, np.float32), np.asarray(want_h, np.float32),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(got_k), np.asarray(want_k, np.float32),
                               rtol=2e-2, atol=2e-2)


def test_token_logprobs_out_of_range_target_is_nan_as_from_logits():
    """An id outside [0, V) was scored -logsumexp here (a log-prob of no token) and wrapped to
    V - 1 by the full-logits gather; both now give NaN, the rest unchanged."""
    hidden, kernel, targets = _head(5)
    targets = targets.at[0, 0].set(V).at[0, 1].set(-1)
    got = np.asarray(VC.token_logprobs(hidden, kernel, targets, chunk=64))
    logits = _np_logits(hidden, kernel)
    full = np.asarray(VC.token_logprobs_from_logits(jnp.asarray(logits), targets))
    assert np.isnan(got[0, :2]).all() and np.isnan(full[0, :2]).all()
    np.testing.assert_allclose(got[0, 2:], full[0, 2:], atol=1e-5)
    np.testing.assert_allclose(got[1:], full[1:], atol=1e-5)
    valid = (targets >= 0) & (targets < V)     # masked out: finite gradients
    grads = jax.grad(lambda h: jnp.sum(jnp.where(
        valid, VC.token_logprobs(h, kernel, targets, chunk=64), 0.0)))(hidden)
    assert np.isfinite(np.asarray(grads)).all()


def test_bad_arguments_raise():
    hidden, kernel, targets = _head(6)
    with pytest.raises(ValueError, match="chunk"):
        VC.token_logprobs(hidden, kernel, targets, chunk=0)
    with pytest.raises(ValueError, match="kernel_DxV"):
        VC.token_logprobs(hidden, kernel.T, targets)
    with pytest.raises(ValueError, match="targets_N"):
        VC.token_logprobs(hidden, kernel, targets[:, :-1])
    with pytest.raises(ValueError, match="targets_N"):
        VC.token_logprobs(hidden, kernel, targets.astype(jnp.float32))
    with pytest.raises(ValueError, match="vocabulary"):
        VC.kl_and_entropy(hidden, kernel, hidden, kernel[:, :-1])
    with pytest.raises(ValueError, match="leading shape"):
        VC.kl_and_entropy(hidden, kernel, hidden[:, :-1], kernel)


# ----------------------------------------------------------------------------- kl_and_entropy
def _np_kl_entropy(za, zb):
    la, lb = _np_log_softmax(za), _np_log_softmax(zb)
    pa = np.exp(la)
    return (pa * (la - lb)).sum(-1), -(pa * la).sum(-1)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_kl_and_entropy_match_float64_numpy(chunk):
    """Two heads of different widths (D = 16 and 24) over the same vocabulary."""
    hidden_p, kernel_p, _ = _head(7)
    hidden_q, kernel_q, _ = _head(8, d=24)
    kl, ent = VC.kl_and_entropy(hidden_p, kernel_p, hidden_q, kernel_q, chunk=chunk)
    assert kl.shape == ent.shape == (B, L) and kl.dtype == ent.dtype == jnp.float32
    want_kl, want_ent = _np_kl_entropy(_np_logits(hidden_p, kernel_p),
                                       _np_logits(hidden_q, kernel_q))
    np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-6, atol=1e-5)


def test_kl_and_entropy_edge_cases():
    """KL(p || p) = 0; a zero kernel is uniform (H = log V); nearby heads (small KL, big logits)."""
    hidden, kernel, _ = _head(9, scale=20.0)
    kl, ent = VC.kl_and_entropy(hidden, kernel, hidden, kernel, chunk=64)
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-5)
    want_ent = _np_kl_entropy(*[_np_logits(hidden, kernel)] * 2)[1]
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-6, atol=1e-5)
    kl, ent = VC.kl_and_entropy(hidden, jnp.zeros_like(kernel), hidden, kernel, chunk=64)
    np.testing.assert_allclose(np.asarray(ent), np.log(V), rtol=0, atol=1e-5)
    kernel_q = kernel + 0.01 * jnp.asarray(np.random.default_rng(9).normal(size=kernel.shape),
                                           jnp.float32)
    kl, _ = VC.kl_and_entropy(hidden, kernel, hidden, kernel_q, chunk=64)
    want_kl, _ = _np_kl_entropy(_np_logits(hidden, kernel), _np_logits(hidden, kernel_q))
    np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=1e-3, atol=1e-5)


def test_kl_and_entropy_bfloat16_hidden():
    hidden_p, kernel_p, _ = _head(10, dtype=jnp.bfloat16)
    hidden_q, kernel_q, _ = _head(11, dtype=jnp.bfloat16)
    kl, ent = VC.kl_and_entropy(hidden_p, kernel_p, hidden_q, kernel_q, chunk=64)
    a, b = _full_logits(hidden_p, kernel_p), _full_logits(hidden_q, kernel_q)
    la, lb = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    np.testing.assert_allclose(np.asarray(kl), np.asarray(jnp.sum(jnp.exp(la) * (la - lb), -1)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(-jnp.sum(jnp.exp(la) * la, -1)),
                               rtol=1e-5, atol=1e-5)
    want_kl, want_ent = _np_kl_entropy(_np_logits(hidden_p, kernel_p),
                                       _np_logits(hidden_q, kernel_q))
    np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-6, atol=1e-5)


def test_kl_and_entropy_gradient_matches_full():
    """Not its main use (forward, under stop_gradient), but the checkpointed scan differentiates."""
    hidden_p, kernel_p, _ = _head(12)
    hidden_q, kernel_q, _ = _head(13)

    def chunked(hp, kp):
        kl, ent = VC.kl_and_entropy(hp, kp, hidden_q, kernel_q, chunk=64)
        return jnp.sum(kl) + 0.5 * jnp.sum(ent)

    def full(hp, kp):
        la = jax.nn.log_softmax(_full_logits(hp, kp))
        lb = jax.nn.log_softmax(_full_logits(hidden_q, kernel_q))
        return jnp.sum(jnp.exp(la) * (la - lb)) - 0.5 * jnp.sum(jnp.exp(la) * la)

    for got, want in zip(jax.jit(jax.grad(chunked, (0, 1)))(hidden_p, kernel_p),
                         jax.jit(jax.grad(full, (0, 1)))(hidden_p, kernel_p)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- memory
def test_compiled_memory_is_not_n_by_v():
    """XLA's own accounting of the compiled programs' temporaries: the full head's grad needs more
    than the N x V float32 logits; the chunked one needs a fraction of them (forward and grad)."""
    n, d, v, chunk = 512, 64, 50_000, 4096
    logits_bytes = n * v * 4
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    k = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(fn, *args):
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def loss(fn):
        return jax.grad(lambda h_, k_, t_: jnp.sum(fn(h_, k_, t_)), (0, 1))

    chunked = lambda h_, k_, t_: VC.token_logprobs(h_, k_, t_, chunk=chunk)  # noqa: E731
    full_grad = temp_bytes(loss(_full_token_logprobs), h, k, t)
    chunked_grad = temp_bytes(loss(chunked), h, k, t)
    chunked_fwd = temp_bytes(chunked, h, k, t)
    kl_fwd = temp_bytes(lambda a, b, c, e: VC.kl_and_entropy(a, b, c, e, chunk=chunk), h, k, h, k)
    assert full_grad > logits_bytes, (full_grad, logits_bytes)
    assert chunked_grad < logits_bytes / 4, (chunked_grad, logits_bytes)
    assert chunked_fwd < logits_bytes / 3, (chunked_fwd, logits_bytes)
    assert kl_fwd < logits_bytes / 2, (kl_fwd, logits_bytes)


# ----------------------------------------------------------------------------- top_k_logprobs
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("k", [1, 5, 60])
def test_top_k_logprobs_match_float64_numpy(chunk, k):
    hidden, kernel, _ = _head(11)
    # duplicated columns: exact ties, which the lower vocabulary id wins (as a stable sort)
    kernel = kernel.at[:, 250].set(kernel[:, 3]).at[:, 299].set(kernel[:, 64])
    ids, logp = VC.top_k_logprobs(hidden, kernel, k, chunk=chunk)
    ref = _np_log_softmax(_np_logits(hidden, kernel))
    ids, logp = np.asarray(ids), np.asarray(logp)
    assert ids.shape == logp.shape == (B, L, k) and ids.dtype == np.int32
    # the k largest log-probs, in order, each under its own id (float32 logits may order two
    # values closer than their rounding differently from float64, so ids are checked by value)
    np.testing.assert_allclose(logp, -np.sort(-ref, axis=-1)[..., :k], atol=2e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, ids, -1), logp, atol=2e-5)
    assert all(len(set(row)) == k for row in ids.reshape(-1, k))
    for a, b in ((3, 250), (64, 299)):  # exact ties: the lower id first
        both = (ids == a).any(-1) & (ids == b).any(-1)
        assert (np.argmax(ids == a, -1) < np.argmax(ids == b, -1))[both].all()
    if k == 60:
        assert ((ids == 3).any(-1) & (ids == 250).any(-1)).any()


def test_top_k_logprobs_memory_and_bad_k():
    n, d, v = 512, 64, 50_000
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    kern = jax.ShapeDtypeStruct((d, v), jnp.float32)
    temp = jax.jit(lambda a, b: VC.top_k_logprobs(a, b, 20, chunk=4096)).lower(
        h, kern).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * v * 4 / 3, temp
    hidden, kernel, _ = _head(0)
    ids, logp = VC.top_k_logprobs(hidden, kernel, V, chunk=64)   # k = V: every id, sorted
    ref = _np_log_softmax(_np_logits(hidden, kernel))
    np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.broadcast_to(np.arange(V),
                                                                                 (B, L, V)))
    np.testing.assert_allclose(np.asarray(logp), -np.sort(-ref, axis=-1), atol=2e-5)
    for bad in (0, V + 1, 2.0):
        with pytest.raises(ValueError, match="k must be a Python int"):
            VC.top_k_logprobs(hidden, kernel, bad)
