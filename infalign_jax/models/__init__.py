"""Pure functional interface to the decoder: params are plain dicts, every function is pure.

  init_params(cfg, rng)                        -> params
  param_logical_axes(cfg)                      -> PartitionSpec tree of logical axis names
  apply(params, tokens_BxT, cfg, ...)          -> ModelOutput(logits, hidden, reward, values)
  token_logprobs(logits_BxTxV, targets_BxT)    -> float32 log-probs
  init_cache / prefill / decode_step           KV-cache decoding
  decoder_fns(cfg)                             the three functions the sampler needs
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from infalign_jax.models.config import ModelConfig
from infalign_jax.models.transformer import Transformer, as_dtype
from infalign_jax.core.types import DecoderFns
from infalign_jax.core.losses import last_valid_index

Array = jax.Array
Params = Any

__all__ = ["ModelConfig", "ModelOutput", "init_params", "param_logical_axes", "apply",
           "token_logprobs", "init_cache", "prefill", "decode_step",
           "decoder_fns", "default_positions"]


class ModelOutput(NamedTuple):
    logits: Array | None   # (B, T, V) float32
    hidden: Array          # (B, T, D)
    reward: Array | None   # (B,) float32, read at the last real token
    values: Array | None   # (B, T) float32, one scalar per position


def _dummy_inputs(cfg: ModelConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, jnp.ones((1, 1, 1), bool)


def init_params(cfg: ModelConfig, rng: Array) -> Params:
    boxed = Transformer(cfg).init(rng, *_dummy_inputs(cfg))["params"]
    return nn.meta.unbox(boxed)


def param_logical_axes(cfg: ModelConfig) -> Params:
    boxed = jax.eval_shape(lambda r: Transformer(cfg).init(r, *_dummy_inputs(cfg))["params"],
                           jax.random.key(0))
    return nn.get_partition_spec(boxed)


def default_positions(mask_BxT: Array) -> Array:
    """Position of each token among the real tokens (left padding does not shift positions)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def _causal_mask(mask_BxT: Array) -> Array:
    t = mask_BxT.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & mask_BxT.astype(bool)[:, None, :]


def apply(params: Params, tokens_BxT: Array, cfg: ModelConfig, *,
          attention_mask_BxT: Array | None = None, positions_BxT: Array | None = None
          ) -> ModelOutput:
    """Teacher-forced forward pass over whole sequences (no cache)."""
    mask = (jnp.ones(tokens_BxT.shape, bool) if attention_mask_BxT is None
            else attention_mask_BxT.astype(bool))
    positions = default_positions(mask) if positions_BxT is None else positions_BxT
    out = Transformer(cfg).apply({"params": params}, tokens_BxT, positions, _causal_mask(mask))
    reward = None
    if "reward" in out:
        idx, _ = last_valid_index(mask)
        reward = jnp.take_along_axis(out["reward"], idx[:, None], axis=1)[:, 0]
    return ModelOutput(out.get("logits"), out["hidden"], reward, out.get("value"))


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """log p(target) from logits, in float32 whatever the activation dtype."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ------------------------------------------------------------------------------- KV cache

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None
               ) -> dict[str, Any]:
    """Empty cache. Every leaf has the batch as its leading axis (the sampler repeats rows)."""
    dt = as_dtype(dtype or cfg.dtype)
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    layers = tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
                   for _ in range(cfg.n_layers))
    return {"layers": layers,
            "index": jnp.zeros((batch,), jnp.int32),         # next slot to write (same in all rows)
            "key_mask": jnp.zeros((batch, max_len), bool),   # which slots hold real tokens
            "next_pos": jnp.zeros((batch,), jnp.int32)}      # position of the next real token


def _cached_forward(params, tokens_BxS, mask_BxS, positions_BxS, cfg, cache,
                    last_logits_only=False):
    index = cache["index"][0]
    s = tokens_BxS.shape[1]
    max_len = cache["key_mask"].shape[1]
    key_mask = jax.lax.dynamic_update_slice(cache["key_mask"], mask_BxS.astype(bool), (0, index))
    slots = jnp.arange(max_len)
    query_slots = index + jnp.arange(s)
    attn = (slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]
    out = Transformer(cfg).apply({"params": params}, tokens_BxS, positions_BxS, attn,
                                 cache["layers"], index, last_logits_only)
    new_cache = {"layers": out["cache_layers"], "index": cache["index"] + s,
                 "key_mask": key_mask,
                 "next_pos": cache["next_pos"] + mask_BxS.astype(jnp.int32).sum(1)}
    return out, new_cache


def prefill(params: Params, tokens_BxT: Array, cfg: ModelConfig, cache: dict[str, Any],
            attention_mask_BxT: Array | None = None, *, last_logits_only: bool = False
            ) -> tuple[Array, dict[str, Any]]:
    """Runs the (left-padded) prompt through the model, filling the cache: (logits_BxTxV, cache).

    With `last_logits_only` the logits are those of the last position only: (B, 1, V).
    """
    mask = (jnp.ones(tokens_BxT.shape, bool) if attention_mask_BxT is None
            else attention_mask_BxT.astype(bool))
    positions = cache["next_pos"][:, None] + default_positions(mask)
    out, cache = _cached_forward(params, tokens_BxT, mask, positions, cfg, cache,
                                 last_logits_only)
    return out["logits"], cache


def decode_step(params: Params, tokens_B: Array, cfg: ModelConfig, cache: dict[str, Any]
                ) -> tuple[Array, dict[str, Any]]:
    """One token per row through the cache: (logits_BxV, cache)."""
    mask = jnp.ones((tokens_B.shape[0], 1), bool)
    positions = cache["next_pos"][:, None]
    out, cache = _cached_forward(params, tokens_B[:, None], mask, positions, cfg, cache)
    return out["logits"][:, 0], cache


def decoder_fns(cfg: ModelConfig) -> DecoderFns:
    """The prefill / decode / teacher-forced-logits triple used by `infalign_jax.decoding.sampling`."""

    def _prefill(params, tokens_BxP, mask_BxP, max_len):
        cache = init_cache(cfg, tokens_BxP.shape[0], max_len)
        logits, cache = prefill(params, tokens_BxP, cfg, cache, mask_BxP, last_logits_only=True)
        return logits[:, -1], cache

    def _decode(params, token_B, cache):
        return decode_step(params, token_B, cfg, cache)

    def _logits(params, tokens_BxT, mask_BxT):
        return apply(params, tokens_BxT, cfg, attention_mask_BxT=mask_BxT).logits

    return DecoderFns(_prefill, _decode, _logits, cfg.max_len)
