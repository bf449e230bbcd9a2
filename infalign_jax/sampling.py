"""Autoregressive sampling with a KV cache: one prefill per prompt, N continuations.

The sampler is written against three pure functions of a decoder (`DecoderFns`), so the same code
samples from the Flax transformer (`infalign_jax.models.decoder_fns`) and from tiny tabular
policies used in exact-enumeration tests:

  prefill(params, tokens_BxP, mask_BxP, max_len) -> (logits_BxV at the last prompt token, cache)
  decode(params, token_B, cache)                 -> (logits_BxV for the next token, cache)
  logits(params, tokens_BxT, mask_BxT)           -> logits_BxTxV (teacher forcing, no cache)

Every leaf of `cache` has the batch as its leading axis, which is what lets the prompt be
prefilled once and its cache repeated to the N continuations (B -> B*N rows) instead of running N
prefills.

Conventions (the classic RLHF bugs this avoids):
* Prompts are left-padded (`mask_BxP` marks real tokens); responses are right-padded.
* The EOS token itself is a valid response token (rewards are read there); every token after it
  has mask 0, log-prob 0 and is `pad_id`.
* `logp` is the log-probability of the sampled token under the *policy itself* (log-softmax of
  the raw logits in float32), whatever temperature / top-k / top-p shaped the sampling
  distribution: it is the quantity the trainer recomputes by teacher forcing, and the two must
  agree (`sequence_logprobs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any


class DecoderFns(NamedTuple):
    prefill: Callable[..., tuple[Array, Any]]
    decode: Callable[..., tuple[Array, Any]]
    logits: Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. `top_k=0` and `top_p=1` switch those filters off; `temperature=0` is greedy."""

    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"SamplingConfig.n must be an integer >= 1, got {self.n!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"SamplingConfig.top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")


class Samples(NamedTuple):
    tokens_BxNxL: Array  # int32, pad_id after EOS
    mask_BxNxL: Array    # bool, True up to and including EOS
    logp_BxNxL: Array    # float32 policy log-probs of the sampled tokens, 0 where masked


def filter_logits(logits_BxV: Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """Logits of the sampling distribution: temperature, then top-k, then nucleus (top-p).

    Removed tokens get -inf. Top-p keeps the smallest set of most likely tokens whose total
    probability reaches `top_p` (the most likely token is always kept; Holtzman et al. 2020).
    """
    chex.assert_rank(logits_BxV, 2)
    logits = logits_BxV.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def _repeat_batch(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def sample(fns: DecoderFns, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
           rng: Array, cfg: SamplingConfig) -> Samples:
    """Samples `cfg.n` responses per prompt; the prompt is prefilled once (not n times).

    Pure and jittable (close over `fns` and `cfg`, which are static).
    """
    chex.assert_rank([prompt_BxP, prompt_mask_BxP], 2)
    chex.assert_equal_shape([prompt_BxP, prompt_mask_BxP])
    batch, prompt_len = prompt_BxP.shape
    n, steps = cfg.n, cfg.max_new_tokens
    max_len = prompt_len + steps
    logits_BxV, cache = fns.prefill(params, prompt_BxP, prompt_mask_BxP, max_len)
    logits = _repeat_batch(logits_BxV, n)                  # (B*N, V), row b*N + j
    cache = _repeat_batch(cache, n)
    eos = -1 if cfg.eos_id is None else cfg.eos_id

    def step(carry, key):
        logits, cache, done = carry
        logits = logits.astype(jnp.float32)
        if cfg.temperature == 0:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(
                key, filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p), axis=-1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], 1)[:, 0]
        valid = ~done
        token = jnp.where(valid, token, cfg.pad_id).astype(jnp.int32)
        logp = jnp.where(valid, logp, 0.0)
        done = done | (token == eos)
        next_logits, cache = fns.decode(params, token, cache)
        return (next_logits, cache, done), (token, valid, logp)

    keys = jax.random.split(rng, steps)
    done = jnp.zeros((batch * n,), bool)
    _, (tokens_LxR, valid_LxR, logp_LxR) = jax.lax.scan(step, (logits, cache, done), keys)

    def out(x_LxR):
        return jnp.moveaxis(x_LxR, 0, 1).reshape(batch, n, steps)

    return Samples(out(tokens_LxR), out(valid_LxR), out(logp_LxR))


def concat_prompt_response(prompt_BxP: Array, prompt_mask_BxP: Array, response_BxL: Array,
                           response_mask_BxL: Array) -> tuple[Array, Array]:
    """[left-padded prompt | right-padded response] and its attention mask."""
    tokens = jnp.concatenate([prompt_BxP, response_BxL.astype(prompt_BxP.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP.astype(bool), response_mask_BxL.astype(bool)], axis=1)
    return tokens, mask


def sequence_logprobs(fns: DecoderFns, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
                      response_BxL: Array, response_mask_BxL: Array) -> Array:
    """Teacher-forced float32 log-probs of each response token (0 where masked): logp_BxL."""
    chex.assert_rank([prompt_BxP, response_BxL], 2)
    prompt_len = prompt_BxP.shape[1]
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    logits_BxTxV = fns.logits(params, tokens, mask).astype(jnp.float32)
    # The logits at position t predict token t+1: response token j is predicted at P-1+j.
    pred = logits_BxTxV[:, prompt_len - 1:-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(pred, axis=-1),
                               response_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(response_mask_BxL.astype(bool), logp, 0.0)


def flatten_samples(prompt_BxP: Array, prompt_mask_BxP: Array, samples: Samples
                    ) -> tuple[Array, Array, Array, Array]:
    """Repeats the prompts to match the B*N flattened samples, for scoring and training."""
    batch, n, length = samples.tokens_BxNxL.shape
    return (jnp.repeat(prompt_BxP, n, axis=0), jnp.repeat(prompt_mask_BxP, n, axis=0),
            samples.tokens_BxNxL.reshape(batch * n, length),
            samples.mask_BxNxL.reshape(batch * n, length))
