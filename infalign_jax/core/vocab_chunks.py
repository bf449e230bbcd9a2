"""LM-head quantities per token, computed over vocabulary chunks: never the [N, V] logits.

| function       | what (per position n, logits z = hidden_n @ kernel, V entries)    | memory     |
|----------------|-------------------------------------------------------------------|------------|
| token_logprobs | log softmax(z)[y_n] = z_y - logsumexp(z); custom VJP, fwd and bwd | O(N chunk) |
| kl_and_entropy | KL(p || q) = sum_v p (log p - log q) and H(p) = -sum_v p log p    | O(N chunk) |

The full logits of a policy head are N x V float32: at N = 256 x 64 and V = 49,152 that is 3.2 GB
for the forward alone, and autodiff of `log_softmax` keeps several such buffers. Here the kernel is
read `chunk` columns at a time inside a `jax.lax.scan`, and only online statistics of each row are
carried from chunk to chunk (the streaming log-sum-exp of Milakov and Gimelshein 2018, "Online
normalizer calculation for softmax"): a running max m and a sum s = sum_v exp(z_v - m) that is
rescaled by exp(m_old - m_new) whenever the max grows, so logsumexp(z) = m + log s at the end.

Each chunk's logits are `einsum("nd,dv->nv", hidden, kernel.astype(hidden.dtype),
preferred_element_type=float32)`, exactly how `models.transformer` computes the lm head, so the
values agree with the full computation (bfloat16 activations included) up to float32 rounding of
the sums. V need not be a multiple of `chunk`: the last chunk is the last `chunk` columns of the
kernel, and its columns already seen by the previous chunk are masked out (no padded copy of the
kernel). `chunk >= V` is one chunk, i.e. the full computation.

Shapes: `hidden_NxD` may have any leading shape `[..., D]` (e.g. B x L x D), with `targets_N` of
shape `[...]`; results have the leading shape. Maths in float32. Layer 0: pure functions over
arrays, no `jax.jit` inside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from infalign_jax.core.types import Array

DEFAULT_CHUNK = 8192


# --------------------------------------------------------------------------- helpers
def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive Python int, got {chunk!r}")
    return chunk


def _check_head(hidden, kernel, hidden_name: str, kernel_name: str) -> tuple[Array, Array]:
    hidden, kernel = jnp.asarray(hidden), jnp.asarray(kernel)
    if hidden.ndim < 1:
        raise ValueError(f"{hidden_name} must have shape [..., D], got {hidden.shape}")
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1] or kernel.shape[1] < 1:
        raise ValueError(f"{kernel_name} must have shape [D, V] with D = {hidden.shape[-1]} (the "
                         f"last axis of {hidden_name}) and V >= 1, got {kernel.shape}")
    if not (jnp.issubdtype(hidden.dtype, jnp.floating)
            and jnp.issubdtype(kernel.dtype, jnp.floating)):
        raise ValueError(f"{hidden_name} and {kernel_name} must be floating point, got "
                         f"{hidden.dtype} and {kernel.dtype}")
    return hidden, kernel


def _num_chunks(vocab: int, chunk: int) -> tuple[int, int]:
    """(C, K): chunk width C = min(chunk, V) and the number of chunks K = ceil(V / C)."""
    width = min(chunk, vocab)
    return width, -(-vocab // width)


def _chunk_logits(hidden_NxD: Array, kernel_DxV: Array, i: Array, width: int):
    """Logits of chunk i: columns [start, start + C) with start = min(i C, V - C).

    Returns (logits_NxC float32, the chunk's kernel columns k_DxC, their vocabulary ids cols_C,
    valid_C or None, start). valid_C marks columns not already covered by chunk i - 1 (only the
    last chunk has invalid ones, and only when C does not divide V; None when it does).
    """
    vocab = kernel_DxV.shape[1]
    start = jnp.minimum(i * width, vocab - width)
    k_DxC = jax.lax.dynamic_slice_in_dim(kernel_DxV, start, width, axis=1)
    logits_NxC = jnp.einsum("nd,dv->nv", hidden_NxD, k_DxC.astype(hidden_NxD.dtype),
                            preferred_element_type=jnp.float32)
    cols_C = start + jnp.arange(width)
    valid_C = None if vocab % width == 0 else cols_C >= i * width
    return logits_NxC, k_DxC, cols_C, valid_C, start


def _rescale(m_N: Array, s_N: Array, chunk_max_N: Array) -> tuple[Array, Array, Array]:
    """New running max, exp(m_old - m_new), and m_old - m_new (0 before the first chunk, s = 0,
    where m_old = -inf: keeps -inf * 0 out of the sums)."""
    m_new_N = jnp.maximum(m_N, chunk_max_N)
    delta_N = jnp.where(s_N > 0, m_N - m_new_N, 0.0)
    return m_new_N, jnp.where(s_N > 0, jnp.exp(delta_N), 0.0), delta_N


def _masked_max(logits_NxC: Array, valid_C: Array | None) -> Array:
    if valid_C is None:
        return jnp.max(logits_NxC, axis=-1)
    return jnp.max(jnp.where(valid_C, logits_NxC, -jnp.inf), axis=-1)


def _masked_exp(logits_NxC: Array, m_N: Array, valid_C: Array | None) -> Array:
    e_NxC = jnp.exp(logits_NxC - m_N[:, None])
    return e_NxC if valid_C is None else jnp.where(valid_C, e_NxC, 0.0)


# --------------------------------------------------------------------------- token log-probs
def _lse_and_target(hidden_NxD: Array, kernel_DxV: Array, targets_N: Array,
                    chunk: int) -> tuple[Array, Array]:
    """(logsumexp_v z_nv, z_{n, y_n}) by one online pass over the vocabulary chunks.

    The target logit is picked inside the chunk it falls in, so it is bit-for-bit the logit the
    full einsum would give; a target outside [0, V) picks nothing (target logit 0).
    """
    width, num = _num_chunks(kernel_DxV.shape[1], chunk)
    n = hidden_NxD.shape[0]

    def body(carry, i):
        m_N, s_N, target_logit_N = carry
        logits_NxC, _, cols_C, valid_C, _ = _chunk_logits(hidden_NxD, kernel_DxV, i, width)
        m_new_N, scale_N, _ = _rescale(m_N, s_N, _masked_max(logits_NxC, valid_C))
        s_N = s_N * scale_N + jnp.sum(_masked_exp(logits_NxC, m_new_N, valid_C), axis=-1)
        hit_NxC = cols_C[None, :] == targets_N[:, None]
        if valid_C is not None:
            hit_NxC = hit_NxC & valid_C
        target_logit_N = target_logit_N + jnp.sum(jnp.where(hit_NxC, logits_NxC, 0.0), axis=-1)
        return (m_new_N, s_N, target_logit_N), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32))
    (m_N, s_N, target_logit_N), _ = jax.lax.scan(body, init, jnp.arange(num))
    return m_N + jnp.log(s_N), target_logit_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))  # chunk: a static Python int
def _token_logprobs_flat(hidden_NxD: Array, kernel_DxV: Array, targets_N: Array,
                         chunk: int) -> Array:
    lse_N, target_logit_N = _lse_and_target(hidden_NxD, kernel_DxV, targets_N, chunk)
    return target_logit_N - lse_N


def _token_logprobs_fwd(hidden_NxD, kernel_DxV, targets_N, chunk):
    lse_N, target_logit_N = _lse_and_target(hidden_NxD, kernel_DxV, targets_N, chunk)
    return target_logit_N - lse_N, (hidden_NxD, kernel_DxV, targets_N, lse_N)


def _token_logprobs_bwd(chunk, res, g_N):
    """d logp_n / d z_nv = onehot(y_n)_v - softmax(z_n)_v, recomputed chunk by chunk from the saved
    logsumexp; then d hidden = dz @ kernel^T and d kernel = hidden^T @ dz per chunk, in float32.

    The kernel enters the logits through `astype(hidden.dtype)`, whose derivative is the identity:
    d kernel is hidden^T dz (in float32, then cast to kernel.dtype), d hidden uses the kernel as the
    forward saw it (cast to hidden.dtype).
    """
    hidden_NxD, kernel_DxV, targets_N, lse_N = res
    width, num = _num_chunks(kernel_DxV.shape[1], chunk)
    g_N = g_N.astype(jnp.float32)
    hidden32_NxD = hidden_NxD.astype(jnp.float32)

    def body(carry, i):
        dh_NxD, dk_DxV = carry
        logits_NxC, k_DxC, cols_C, valid_C, start = _chunk_logits(hidden_NxD, kernel_DxV, i, width)
        p_NxC = jnp.exp(logits_NxC - lse_N[:, None])
        hit_NxC = cols_C[None, :] == targets_N[:, None]
        if valid_C is not None:
            p_NxC = jnp.where(valid_C, p_NxC, 0.0)
            hit_NxC = hit_NxC & valid_C
        dz_NxC = g_N[:, None] * (hit_NxC.astype(jnp.float32) - p_NxC)
        k32_DxC = k_DxC.astype(hidden_NxD.dtype).astype(jnp.float32)
        dh_NxD = dh_NxD + jnp.einsum("nc,dc->nd", dz_NxC, k32_DxC)
        dk_DxC = jnp.einsum("nd,nc->dc", hidden32_NxD, dz_NxC)
        # Add, not overwrite: the last chunk may overlap the previous one (its overlap has dz = 0).
        old_DxC = jax.lax.dynamic_slice_in_dim(dk_DxV, start, width, axis=1)
        dk_DxV = jax.lax.dynamic_update_slice_in_dim(dk_DxV, old_DxC + dk_DxC, start, axis=1)
        return (dh_NxD, dk_DxV), None

    init = (jnp.zeros(hidden_NxD.shape, jnp.float32), jnp.zeros(kernel_DxV.shape, jnp.float32))
    (dh_NxD, dk_DxV), _ = jax.lax.scan(body, init, jnp.arange(num))
    return dh_NxD.astype(hidden_NxD.dtype), dk_DxV.astype(kernel_DxV.dtype), None


_token_logprobs_flat.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def token_logprobs(hidden_NxD: Array, kernel_DxV: Array, targets_N: Array, *,
                   chunk: int = DEFAULT_CHUNK) -> Array:
    """log softmax(hidden @ kernel)[target] per position, float32, without the [N, V] logits.

        logp_n = z_{n, y_n} - logsumexp_v z_nv,   z_nv = hidden_n . kernel[:, v]

    with z computed per vocabulary chunk exactly as the model's lm head does (bfloat16 hidden:
    kernel cast to bfloat16, products accumulated in float32). logsumexp is the online one (running
    max, rescaled sum) over `jax.lax.scan`; z_{n, y_n} is read inside its chunk.

    Differentiable in `hidden` and `kernel` (reverse mode; a `jax.custom_vjp`): the backward pass
    recomputes each chunk's logits and uses d logp / d z = onehot(y) - softmax(z), so its memory is
    O(N chunk + N D + D V) too: the gradients themselves, never [N, V]. Forward mode (jvp) is not
    defined. Gradients come back in the inputs' dtypes (accumulated in float32).

    Args:
      hidden_NxD: [..., D] final hidden states (any float dtype).
      kernel_DxV: [D, V] lm-head kernel (for tied embeddings, `embedding.T`).
      targets_N: [...] integer token ids in [0, V); one outside that range gets logp NaN (as
        `token_logprobs_from_logits`), so an invalid id at a scored position cannot pass for a
        finite log-prob; mask such positions with `jnp.where` (their gradients stay 0).
      chunk: vocabulary columns per step (a Python int); >= V is the full computation in one step.

    Returns: logp of shape [...] (the leading shape of `hidden_NxD`), float32.
    """
    chunk = _check_chunk(chunk)
    hidden_NxD, kernel_DxV = _check_head(hidden_NxD, kernel_DxV, "hidden_NxD", "kernel_DxV")
    targets_N = jnp.asarray(targets_N)
    lead = hidden_NxD.shape[:-1]
    if targets_N.shape != lead:
        raise ValueError(f"targets_N must have the leading shape {lead} of hidden_NxD "
                         f"{hidden_NxD.shape}, got {targets_N.shape}")
    if not jnp.issubdtype(targets_N.dtype, jnp.integer):
        raise ValueError(f"targets_N must be integer token ids, got {targets_N.dtype}")
    flat_NxD = hidden_NxD.reshape(-1, hidden_NxD.shape[-1])
    logp_N = _token_logprobs_flat(flat_NxD, kernel_DxV, targets_N.reshape(-1).astype(jnp.int32),
                                  chunk)
    return nan_outside_vocab(logp_N.reshape(lead), targets_N, kernel_DxV.shape[1])


def token_logprobs_from_logits(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """log softmax(logits)[target] per position, float32 whatever the logits' dtype; the full-
    logits counterpart of `token_logprobs`, with the same contract: an id outside [0, V) gets NaN
    (a plain gather would wrap -1 to V - 1)."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    targets = jnp.asarray(targets_BxT).astype(jnp.int32)
    picked = jnp.take_along_axis(logp, jnp.clip(targets, 0, logp.shape[-1] - 1)[..., None],
                                 axis=-1)[..., 0]
    return nan_outside_vocab(picked, targets, logp.shape[-1])


def nan_outside_vocab(logp: Array, targets: Array, vocab: int) -> Array:
    """logp where the target id is in [0, vocab), NaN elsewhere (the token log-probs' contract)."""
    return jnp.where((targets >= 0) & (targets < vocab), logp, jnp.nan)


# --------------------------------------------------------------------------- KL and entropy
def _kl_entropy_flat(hidden_p_NxD: Array, kernel_p_DxV: Array, hidden_q_NxD: Array,
                     kernel_q_DxV: Array, chunk: int) -> tuple[Array, Array]:
    width, num = _num_chunks(kernel_p_DxV.shape[1], chunk)
    n = hidden_p_NxD.shape[0]

    @jax.checkpoint  # under autodiff, keep only the carries per chunk, not each chunk's logits
    def body(carry, i):
        m_p, s_p, t_p, u_p, m_q, s_q = carry
        a_NxC, _, _, valid_C, _ = _chunk_logits(hidden_p_NxD, kernel_p_DxV, i, width)
        b_NxC, _, _, _, _ = _chunk_logits(hidden_q_NxD, kernel_q_DxV, i, width)
        # p: running max, sum of e = exp(a - m), of e (a - b) and of e (a - m).
        m_p_new, scale_p, delta_p = _rescale(m_p, s_p, _masked_max(a_NxC, valid_C))
        e_NxC = _masked_exp(a_NxC, m_p_new, valid_C)
        # sum_v exp(a - m_new)(a - m_new) over the old chunks = scale (u + (m_old - m_new) s).
        u_p = scale_p * (u_p + delta_p * s_p) + jnp.sum(e_NxC * (a_NxC - m_p_new[:, None]), -1)
        t_p = scale_p * t_p + jnp.sum(e_NxC * (a_NxC - b_NxC), -1)
        s_p = scale_p * s_p + jnp.sum(e_NxC, -1)
        # q: running max and sum only.
        m_q_new, scale_q, _ = _rescale(m_q, s_q, _masked_max(b_NxC, valid_C))
        s_q = scale_q * s_q + jnp.sum(_masked_exp(b_NxC, m_q_new, valid_C), -1)
        return (m_p_new, s_p, t_p, u_p, m_q_new, s_q), None

    zeros = jnp.zeros((n,), jnp.float32)
    minus_inf = jnp.full((n,), -jnp.inf, jnp.float32)
    init = (minus_inf, zeros, zeros, zeros, minus_inf, zeros)
    (m_p, s_p, t_p, u_p, m_q, s_q), _ = jax.lax.scan(body, init, jnp.arange(num))
    log_s_p = jnp.log(s_p)
    kl_N = t_p / s_p - (m_p + log_s_p) + (m_q + jnp.log(s_q))
    entropy_N = log_s_p - u_p / s_p
    return kl_N, entropy_N


def kl_and_entropy(hidden_p_NxD: Array, kernel_p_DxV: Array, hidden_q_NxD: Array,
                   kernel_q_DxV: Array, *, chunk: int = DEFAULT_CHUNK) -> tuple[Array, Array]:
    """Exact per-position KL(p || q) and entropy H(p), p = softmax(a), q = softmax(b), by one online
    pass over vocabulary chunks, without the [N, V] logits of either head.

    a = hidden_p @ kernel_p and b = hidden_q @ kernel_q (each computed like the model's lm head; the
    two heads may differ in width D, not in V). Per row, carried from chunk to chunk:
        m_p = max a,  s_p = sum e,  t = sum e (a - b),  u = sum e (a - m_p)   with e = exp(a - m_p),
        m_q = max b,  s_q = sum exp(b - m_q),
    all rescaled by exp(m_old - m_new) when a running max grows (u also gains (m_old - m_new) s).
    Then, with lse(a) = m_p + log s_p,
        KL = sum_v p (a - b) - lse(a) + lse(b) = t / s_p - lse(a) + lse(b),
        H  = lse(a) - sum_v p a               = log s_p - u / s_p.
    Accumulating a - m_p rather than a (a variant of the usual u = sum e a) keeps H free of the
    cancellation lse(a) - E_p[a] when the logits are large.

    Meant for forward use (callers put it under `stop_gradient`); it is nonetheless differentiable
    at O(N chunk) memory (the chunk body is under `jax.checkpoint`). Logits must be finite.

    Returns: (kl, entropy), each float32 with the leading shape of `hidden_p_NxD`.
    """
    chunk = _check_chunk(chunk)
    hidden_p_NxD, kernel_p_DxV = _check_head(hidden_p_NxD, kernel_p_DxV, "hidden_p_NxD",
                                             "kernel_p_DxV")
    hidden_q_NxD, kernel_q_DxV = _check_head(hidden_q_NxD, kernel_q_DxV, "hidden_q_NxD",
                                             "kernel_q_DxV")
    lead = hidden_p_NxD.shape[:-1]
    if hidden_q_NxD.shape[:-1] != lead:
        raise ValueError(f"hidden_q_NxD {hidden_q_NxD.shape} and hidden_p_NxD "
                         f"{hidden_p_NxD.shape} must share their leading shape")
    if kernel_q_DxV.shape[1] != kernel_p_DxV.shape[1]:
        raise ValueError(f"kernel_p_DxV {kernel_p_DxV.shape} and kernel_q_DxV "
                         f"{kernel_q_DxV.shape} must have the same vocabulary size V")
    kl_N, entropy_N = _kl_entropy_flat(hidden_p_NxD.reshape(-1, hidden_p_NxD.shape[-1]),
                                       kernel_p_DxV,
                                       hidden_q_NxD.reshape(-1, hidden_q_NxD.shape[-1]),
                                       kernel_q_DxV, chunk)
    return kl_N.reshape(lead), entropy_N.reshape(lead)


# --------------------------------------------------------------------------- top-k log-probs
def _top_k_flat(hidden_NxD: Array, kernel_DxV: Array, k: int, chunk: int) -> tuple[Array, Array]:
    width, num = _num_chunks(kernel_DxV.shape[1], chunk)
    n = hidden_NxD.shape[0]

    def body(carry, i):
        m_N, s_N, top_NxK, ids_NxK = carry
        z_NxC, _, cols_C, valid_C, _ = _chunk_logits(hidden_NxD, kernel_DxV, i, width)
        m_new_N, scale_N, _ = _rescale(m_N, s_N, _masked_max(z_NxC, valid_C))
        s_N = scale_N * s_N + jnp.sum(_masked_exp(z_NxC, m_new_N, valid_C), -1)
        if valid_C is not None:  # columns the previous chunk covered cannot enter the top k twice
            z_NxC = jnp.where(valid_C, z_NxC, -jnp.inf)
        # the running top k merged with this chunk's logits; ties keep the lower vocabulary id
        # (earlier chunks first, `lax.top_k` keeps the earlier of equal entries)
        both = jnp.concatenate([top_NxK, z_NxC], axis=1)
        both_ids = jnp.concatenate([ids_NxK, jnp.broadcast_to(cols_C, z_NxC.shape)], axis=1)
        top_NxK, where = jax.lax.top_k(both, k)
        return (m_new_N, s_N, top_NxK, jnp.take_along_axis(both_ids, where, 1)), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.full((n, k), -jnp.inf, jnp.float32), jnp.zeros((n, k), jnp.int32))
    (m_N, s_N, top_NxK, ids_NxK), _ = jax.lax.scan(body, init, jnp.arange(num))
    return ids_NxK.astype(jnp.int32), top_NxK - (m_N + jnp.log(s_N))[:, None]


def top_k_logprobs(hidden_NxD: Array, kernel_DxV: Array, k: int, *,
                   chunk: int = DEFAULT_CHUNK) -> tuple[Array, Array]:
    """The k most likely tokens of softmax(hidden @ kernel) per position and their log-probs
    (normalised over the whole vocabulary), by one pass over vocabulary chunks carrying the online
    logsumexp and a running top k (the k best of [top k so far | this chunk]).

    Returns (ids [..., k] int32 in descending log-prob order, logp [..., k] float32); k <= V.
    Forward only (the ids are discrete; use it under `stop_gradient`).
    """
    chunk = _check_chunk(chunk)
    hidden_NxD, kernel_DxV = _check_head(hidden_NxD, kernel_DxV, "hidden_NxD", "kernel_DxV")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= kernel_DxV.shape[1]:
        raise ValueError(f"k must be a Python int in [1, V={kernel_DxV.shape[1]}], got {k!r}")
    lead = hidden_NxD.shape[:-1]
    ids, logp = _top_k_flat(hidden_NxD.reshape(-1, hidden_NxD.shape[-1]), kernel_DxV, k, chunk)
    return ids.reshape(lead + (k,)), logp.reshape(lead + (k,))
