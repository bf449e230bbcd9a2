"""Pure functional interface to the decoder: params are plain dicts, every function is pure.

  init_params(cfg, rng)                        -> params
  variables(params)                            -> Flax variables (LoRA adapters as their collection)
  param_logical_axes(cfg)                      -> PartitionSpec tree of logical axis names
  apply(params, tokens_BxT, cfg, ...)          -> ModelOutput(logits, hidden, reward, values)
  pool_sequence(x_BxTx..., mask_BxT, pool)     where the reward head reads a sequence
  first_layers(cfg, params, n)                 the model cut to its first n decoder layers
  token_logprobs(logits_BxTxV, targets_BxT)    -> float32 log-probs (NaN for ids outside [0, V))
  hidden_states / lm_head_kernel               the trunk alone, and the head's (D, V) kernel
  prefill / expand_cache / decode_step         KV-cache decoding (prompt KV shared by N samples)
  decoder_fns(cfg)                             the functions the sampler and trainer need
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from infalign_jax.models.config import ModelConfig
from infalign_jax.models.transformer import LORA, Transformer, default_positions
from infalign_jax.core.types import DecoderFns
from infalign_jax.core.losses import last_valid_index
from infalign_jax.core.vocab_chunks import token_logprobs_from_logits as token_logprobs

Array = jax.Array
Params = Any

__all__ = ["ModelConfig", "ModelOutput", "init_params", "variables", "param_logical_axes", "apply",
           "pool_sequence", "first_layers",
           "token_logprobs", "hidden_states", "lm_head_kernel", "prefill", "expand_cache",
           "decode_step",
           "decoder_fns", "default_positions"]


class ModelOutput(NamedTuple):
    logits: Array | None   # (B, T, V) float32
    hidden: Array          # (B, T, D)
    reward: Array | None   # (B,) float32, read where cfg.reward_pool says (`pool_sequence`)
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


def variables(params: Params) -> dict[str, Any]:
    """The Flax variables of a parameter tree: {"params": params}, and with LoRA adapters attached
    (`models.lora.attach`: a top-level "lora" entry) those as the "lora" collection."""
    if LORA not in params:
        return {"params": params}
    return {"params": {k: v for k, v in params.items() if k != LORA}, LORA: params[LORA]}


def _mask_or_ones(mask_BxT: Array | None, tokens_BxT: Array) -> Array:
    """The attention mask as bool; every token real when None."""
    return jnp.ones(tokens_BxT.shape, bool) if mask_BxT is None else mask_BxT.astype(bool)


def _real_tokens(tokens_BxT: Array, mask_BxT: Array) -> Array:
    """Token ids with padding replaced by 0: a pad id outside the vocabulary (a tokenizer's added
    pad token) would gather NaN from the embedding, and NaN values stay NaN under a zero attention
    weight. Padding never reaches a real position's output either way."""
    return jnp.where(mask_BxT, tokens_BxT, jnp.zeros((), tokens_BxT.dtype))


def _causal_mask(mask_BxT: Array) -> Array:
    t = mask_BxT.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & mask_BxT.astype(bool)[:, None, :]


def apply(params: Params, tokens_BxT: Array, cfg: ModelConfig, *,
          attention_mask_BxT: Array | None = None, positions_BxT: Array | None = None
          ) -> ModelOutput:
    """Teacher-forced forward pass over whole sequences (no cache)."""
    if positions_BxT is None:
        _check_learned_positions(cfg, tokens_BxT.shape[1], "apply")
    mask = _mask_or_ones(attention_mask_BxT, tokens_BxT)
    positions = default_positions(mask) if positions_BxT is None else positions_BxT
    out = Transformer(cfg).apply(variables(params), _real_tokens(tokens_BxT, mask), positions,
                                 _causal_mask(mask))
    reward = None
    if "reward" in out:   # the head is linear: its mean over tokens is the head of the mean
        reward = pool_sequence(out["reward"], mask, cfg.reward_pool)
    return ModelOutput(out.get("logits"), out["hidden"], reward, out.get("value"))


def pool_sequence(x_BxT: Array, mask_BxT: Array, pool: str) -> Array:
    """One value per row of `x_BxT` (B, T, ...): at the last real token (`pool="last"`) or the
    float32 mean over the real tokens (`"mean"`); `ModelConfig.reward_pool`."""
    if pool == "last":
        idx, _ = last_valid_index(mask_BxT)
        idx = idx.reshape(idx.shape + (1,) * (x_BxT.ndim - 1))
        return jnp.take_along_axis(x_BxT, idx, axis=1)[:, 0]
    if pool == "mean":
        w = mask_BxT.astype(jnp.float32)
        w = w.reshape(w.shape + (1,) * (x_BxT.ndim - 2))
        return (x_BxT.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")


def first_layers(cfg: ModelConfig, params: Params, n: int) -> tuple[ModelConfig, Params]:
    """(cfg, params) of the model cut to its first `n` decoder layers, the final norm and the
    heads kept: what transformers loads with `num_hidden_layers=n` from the same checkpoint.
    A cheaper trunk for a reward model (`config.model.trunk_layers`)."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= cfg.n_layers:
        raise ValueError(f"first_layers: n must be an int in [1, {cfg.n_layers}] (the model's "
                         f"layers), got {n!r}")
    if "lora" in params:
        raise ValueError("first_layers: the parameters carry LoRA adapters ('lora'); cut the base "
                         "model before attaching them (models.lora.attach)")
    if n == cfg.n_layers:
        return cfg, params
    cut = dataclasses.replace(cfg, n_layers=n, layer_types=tuple(cfg.layer_types[:n]))
    return cut, {**params, "layers": jax.tree.map(lambda x: x[:n], params["layers"])}


def hidden_states(params: Params, tokens_BxT: Array, cfg: ModelConfig, *,
                  attention_mask_BxT: Array | None = None) -> Array:
    """The final-norm hidden states (B, T, D), no head computed: with `lm_head_kernel` the lm
    logits of any positions are hidden @ kernel, so callers can compute them only where needed
    (and over vocabulary chunks)."""
    _check_learned_positions(cfg, tokens_BxT.shape[1], "hidden_states")
    mask = _mask_or_ones(attention_mask_BxT, tokens_BxT)
    out = Transformer(cfg).apply(variables(params), _real_tokens(tokens_BxT, mask),
                                 default_positions(mask), _causal_mask(mask), heads=())
    return out["hidden"]


def lm_head_kernel(params: Params, cfg: ModelConfig) -> Array:
    """The lm head's (D, V) kernel (the embedding transposed when tied)."""
    if "lm" not in cfg.heads:
        raise ValueError("lm_head_kernel: the model has no 'lm' head (ModelConfig.heads="
                         f"{cfg.heads})")
    if cfg.final_softcap:
        raise ValueError("lm_head_kernel: the logits are soft-capped (ModelConfig.final_softcap="
                         f"{cfg.final_softcap}), not hidden @ kernel; use apply(...).logits")
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


# ------------------------------------------------------------------------------- KV cache
#
# The decoding cache has two parts, so that N samples of one prompt share its KV:
#   pk, pv   (layers, B, H_kv, P, Dh)  the prompt's keys and values, once per prompt
#   pmask    (B, P)                    which prompt slots hold real tokens (left padding)
#   rk, rv   (layers, R, H_kv, L, Dh)  each sampled row's response keys and values, R = B * N,
#                                      row b * N + j continuing prompt b; a decode step may
#                                      read only the first slots (`decode_step(slots=)`)
#   index    ()                        the next response slot to write (the same for every row)
#   next_pos (R,)                      the position of each row's next token


def _check_learned_positions(cfg: ModelConfig, length: int, where: str) -> None:
    """GPT-2's learned position table has `max_len` rows: a longer sequence read past it (NaN
    rows, which zero attention weights spread over every position of the row). Refused on the
    static length, as transformers refuses it."""
    if cfg.learned_positions and length > cfg.max_len:
        raise ValueError(f"{where}: {length} positions exceed ModelConfig.max_len {cfg.max_len}, "
                         f"the rows of GPT-2's learned position table; shorten the sequence "
                         f"(or its padding)")


def _check_cached_len(cfg: ModelConfig, prompt_len: int, new_tokens: int, where: str) -> None:
    """Dynamic NTK rope past `max_len` has no cached forward equal to the full one (the base
    depends on the longest position of each call; `rotary` module docstring): refused, so that
    sampled / shared-prompt log-probs always equal the teacher-forced `apply`. Learned positions
    (GPT-2) end at `max_len`."""
    _check_learned_positions(cfg, prompt_len + new_tokens, where)
    if cfg.rope_type == "dynamic" and prompt_len + new_tokens > cfg.max_len:
        raise ValueError(
            f"{where}: prompt length {prompt_len} + {new_tokens} new tokens = "
            f"{prompt_len + new_tokens} exceeds max_len {cfg.max_len} with rope_type='dynamic': "
            "past max_len the rotary base grows with the sequence, so cached decoding would not "
            "equal the full forward (apply / sequence_logprobs); stay within max_len")


def prefill(params: Params, tokens_BxP: Array, cfg: ModelConfig,
            attention_mask_BxP: Array | None = None, *, max_new_tokens: int, n: int = 1,
            last_logits_only: bool = False) -> tuple[Array, dict[str, Any]]:
    """Runs the (left-padded) prompt once and returns (logits_BxPxV, cache) with room for
    `max_new_tokens` tokens in each of `n` continuations per prompt (rows b * n + j).

    With `last_logits_only` the logits are those of the last position only: (B, 1, V).
    With dynamic rope, prompt + `max_new_tokens` must fit in `cfg.max_len`."""
    _check_cached_len(cfg, tokens_BxP.shape[1], max_new_tokens, "prefill")
    mask = _mask_or_ones(attention_mask_BxP, tokens_BxP)
    out = Transformer(cfg).apply(variables(params), _real_tokens(tokens_BxP, mask),
                                 default_positions(mask), _causal_mask(mask), return_kv=True,
                                 last_logits_only=last_logits_only)
    pk, pv = out["kv"]
    batch = tokens_BxP.shape[0]
    resp = jnp.zeros((cfg.n_layers, batch, cfg.n_kv_heads, max_new_tokens, cfg.head_dim), pk.dtype)
    cache = {"pk": pk, "pv": pv, "pmask": mask, "rk": resp, "rv": resp,
             "index": jnp.zeros((), jnp.int32),
             "next_pos": mask.astype(jnp.int32).sum(1)}
    return out["logits"], expand_cache(cache, n)


def expand_cache(cache: dict[str, Any], n: int) -> dict[str, Any]:
    """The cache of a prefill continued by `n` rows per prompt (empty response part; the prompt
    part is not copied). Only before the first decode step."""
    if n == 1:
        return cache
    layers, rows, heads, slots, dh = cache["rk"].shape
    resp = jnp.zeros((layers, rows * n, heads, slots, dh), cache["rk"].dtype)
    return {**cache, "rk": resp, "rv": resp, "next_pos": jnp.repeat(cache["next_pos"], n)}


def decode_step(params: Params, tokens_R: Array, cfg: ModelConfig, cache: dict[str, Any],
                slots: int | None = None) -> tuple[Array, dict[str, Any]]:
    """One token per row through the cache: (logits_RxV, cache). With `slots` the token attends
    over the first `slots` response slots only (static; the caller keeps `index` below it): a
    step's attention then costs what the slots written so far need, not the whole allocation."""
    _check_cached_len(cfg, cache["pk"].shape[3], cache["rk"].shape[3], "decode_step")
    decode = {k: cache[k] for k in ("pk", "pv", "pmask", "rk", "rv", "index")}
    if slots is not None:
        have = cache["rk"].shape[3]
        if not 0 < slots <= have:
            raise ValueError(f"decode_step: slots must be in [1, {have}] (the cache's response "
                             f"slots), got {slots}")
        decode["slots"] = slots
    out = Transformer(cfg).apply(variables(params), tokens_R[:, None],
                                 cache["next_pos"][:, None], None, decode, return_kv=True)
    k_new, v_new = out["kv"]                 # (layers, R, H_kv, 1, Dh): one slot, in place
    start = (0, 0, 0, cache["index"], 0)
    new_cache = {**cache, "rk": jax.lax.dynamic_update_slice(cache["rk"], k_new.astype(
                     cache["rk"].dtype), start),
                 "rv": jax.lax.dynamic_update_slice(cache["rv"], v_new.astype(
                     cache["rv"].dtype), start),
                 "index": cache["index"] + 1, "next_pos": cache["next_pos"] + 1}
    return out["logits"][:, 0], new_cache


def shared_prompt_hidden(params: Params, tokens_BxP: Array, mask_BxP: Array,
                         response_RxL: Array, cfg: ModelConfig) -> Array:
    """Final-norm hidden states at the positions predicting each response token (R x L x D),
    teacher-forced, for R = B * N responses (rows b * N + j continue prompt b): the prompt runs
    once per prompt, and the responses attend to its keys and values through the decoding path
    (`Attention`'s two-part cache, with the L tokens as one causal chunk). Equals
    `hidden_states` over [prompt | response] at those positions, without the prompt's N-fold
    cost; differentiable, and the gradient through the shared prompt is the sum over its N rows.
    With dynamic rope, prompt + response must fit in `cfg.max_len`."""
    _check_cached_len(cfg, tokens_BxP.shape[1], response_RxL.shape[1], "shared_prompt_hidden")
    mask = _mask_or_ones(mask_BxP, tokens_BxP)
    prompt = Transformer(cfg).apply(variables(params), _real_tokens(tokens_BxP, mask),
                                    default_positions(mask), _causal_mask(mask), return_kv=True,
                                    heads=())
    pk, pv = prompt["kv"]
    batch, (rows, length) = tokens_BxP.shape[0], response_RxL.shape
    n = rows // batch
    if n * batch != rows:
        raise ValueError(f"shared_prompt_hidden: {rows} response rows is not a multiple of the "
                         f"{batch} prompts")
    # no earlier response slots: one slot, masked off by index 0
    empty = jnp.zeros((cfg.n_layers, rows, cfg.n_kv_heads, 1, cfg.head_dim), pk.dtype)
    decode = {"pk": pk, "pv": pv, "pmask": mask, "rk": empty, "rv": empty,
              "index": jnp.zeros((), jnp.int32)}
    positions = jnp.repeat(mask.astype(jnp.int32).sum(1), n)[:, None] + jnp.arange(length)
    resp = Transformer(cfg).apply(variables(params), response_RxL.astype(jnp.int32), positions,
                                  None, decode, heads=())
    # token 0 is predicted at the prompt's last position (left padding: always a real token)
    first = jnp.repeat(prompt["hidden"][:, -1:], n, axis=0)
    return jnp.concatenate([first, resp["hidden"][:, :-1]], axis=1)


def decoder_fns(cfg: ModelConfig) -> DecoderFns:
    """The prefill / decode / teacher-forced-logits functions used by `infalign_jax.decoding.sampling`."""

    def _prefill(params, tokens_BxP, mask_BxP, max_len):
        logits, cache = prefill(params, tokens_BxP, cfg, mask_BxP,
                                max_new_tokens=max_len - tokens_BxP.shape[1],
                                last_logits_only=True)
        return logits[:, -1], cache

    def _decode(params, token_B, cache):
        return decode_step(params, token_B, cfg, cache)

    def _decode_window(params, token_B, cache, slots):
        return decode_step(params, token_B, cfg, cache, slots)

    def _logits(params, tokens_BxT, mask_BxT):
        return apply(params, tokens_BxT, cfg, attention_mask_BxT=mask_BxT).logits

    def _hidden(params, tokens_BxT, mask_BxT):
        return hidden_states(params, tokens_BxT, cfg, attention_mask_BxT=mask_BxT)

    def _shared_hidden(params, tokens_BxP, mask_BxP, response_RxL):
        return shared_prompt_hidden(params, tokens_BxP, mask_BxP, response_RxL, cfg)

    # Dynamic rope too: past max_len its cached paths cannot equal the teacher-forced one.
    max_len = cfg.max_len
    # Soft-capped logits are not hidden @ kernel: log-probs then come from the full logits.
    linear_head = not cfg.final_softcap
    return DecoderFns(_prefill, _decode, _logits, max_len, expand=expand_cache,
                      decode_window=_decode_window,
                      hidden=_hidden if linear_head else None,
                      shared_hidden=_shared_hidden if linear_head else None,
                      lm_kernel=(lambda params: lm_head_kernel(params, cfg)) if linear_head
                      else None)
