"""Decoder-only transformer in Flax Linen: Llama-family and GPT-2-family blocks, three heads.

Why Linen: its parameters are a plain nested dict whose leaves map one-to-one onto checkpoint
tensors (Hugging Face, GGUF), and `module.apply(params, ...)` is already a pure function, which is
what the jitted RL step, the sampler and `jax.grad` want. Logical axis names are attached with
`nn.with_logical_partitioning` and read back as data by `infalign_jax.infra.sharding`; activations carry
`nn.with_logical_constraint` at block boundaries (a no-op outside a rules context).

The KV cache is explicit state passed in and returned (no mutable Linen collections): per layer
`k`, `v` in layout (B, H_kv, T, Dh) -- on CPU twice as fast as (B, T, H, Dh) because XLA would
otherwise transpose the whole cache every step.

Numerics: activations in `cfg.dtype`; norms, attention softmax, logits and everything downstream
in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infalign_jax.models.config import ModelConfig

Array = jax.Array
NEG_INF = -1e30


def as_dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Any, cfg: ModelConfig) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        as_dtype(cfg.param_dtype))


def _normal(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.init_std)


def _constrain(x: Array, axes: tuple[str, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class Norm(nn.Module):
    """RMSNorm (llama family; Gemma's scale is 1 + w) or LayerNorm with bias (gpt2)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        d = x.shape[-1]
        h = x.astype(jnp.float32)
        if cfg.family == "gpt2":
            scale = _param(self, "scale", (d,), ("norm",), nn.initializers.ones, cfg)
            bias = _param(self, "bias", (d,), ("norm",), nn.initializers.zeros, cfg)
            mean = h.mean(-1, keepdims=True)
            var = jnp.square(h - mean).mean(-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
            return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
        init = nn.initializers.zeros if cfg.rmsnorm_unit_offset else nn.initializers.ones
        scale = _param(self, "scale", (d,), ("norm",), init, cfg).astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + cfg.norm_eps)
        if cfg.rmsnorm_unit_offset:
            return (h * (1.0 + scale)).astype(x.dtype)
        # Hugging Face Llama casts back to the activation dtype before scaling.
        return (scale.astype(x.dtype) * h.astype(x.dtype))


def rope(x_BxSxHxD: Array, positions_BxS: Array, theta: float) -> Array:
    """Rotary embedding, rotate-half convention (Su et al. 2021; Hugging Face's layout)."""
    dim = x_BxSxHxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions_BxS.astype(jnp.float32)[..., None] * inv_freq  # (B, S, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_BxSxHxD.dtype), jnp.sin(emb).astype(x_BxSxHxD.dtype)
    x1, x2 = jnp.split(x_BxSxHxD, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxSxHxD * cos + rotated * sin


class Attention(nn.Module):
    cfg: ModelConfig

    def _proj(self, name, x, heads, axes_heads):
        cfg = self.cfg
        kernel = _param(self, f"{name}_kernel", (cfg.d_model, heads, cfg.head_dim),
                        ("embed", axes_heads, "head_dim"), _normal(cfg), cfg)
        y = jnp.einsum("bsd,dhk->bshk", x, kernel.astype(x.dtype))
        if cfg.qkv_bias or cfg.family == "gpt2":
            bias = _param(self, f"{name}_bias", (heads, cfg.head_dim), (axes_heads, "head_dim"),
                          nn.initializers.zeros, cfg)
            y = y + bias.astype(x.dtype)
        return y

    @nn.compact
    def __call__(self, x_BxSxD: Array, positions_BxS: Array, mask_BxSxT: Array,
                 kv: dict[str, Array] | None, index: Array | None
                 ) -> tuple[Array, dict[str, Array] | None]:
        cfg = self.cfg
        q = self._proj("q", x_BxSxD, cfg.n_heads, "q_heads")
        k = self._proj("k", x_BxSxD, cfg.n_kv_heads, "kv_heads")
        v = self._proj("v", x_BxSxD, cfg.n_kv_heads, "kv_heads")
        if cfg.family == "llama":
            q = rope(q, positions_BxS, cfg.rope_theta)
            k = rope(k, positions_BxS, cfg.rope_theta)
        k_BxHxSxD = jnp.swapaxes(k, 1, 2)
        v_BxHxSxD = jnp.swapaxes(v, 1, 2)
        new_kv = None
        if kv is not None:
            start = (0, 0, index, 0)
            k_BxHxSxD = jax.lax.dynamic_update_slice(kv["k"], k_BxHxSxD.astype(kv["k"].dtype), start)
            v_BxHxSxD = jax.lax.dynamic_update_slice(kv["v"], v_BxHxSxD.astype(kv["v"].dtype), start)
            new_kv = {"k": k_BxHxSxD, "v": v_BxHxSxD}
        b, s = q.shape[:2]
        groups = cfg.n_heads // cfg.n_kv_heads
        q_BxHxGxSxD = q.reshape(b, s, cfg.n_kv_heads, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum("bhgsd,bhtd->bhgst", q_BxHxGxSxD, k_BxHxSxD.astype(q.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(cfg.head_dim)
        scores = jnp.where(mask_BxSxT[:, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(x_BxSxD.dtype)
        out = jnp.einsum("bhgst,bhtd->bshgd", probs, v_BxHxSxD.astype(probs.dtype))
        out = out.reshape(b, s, cfg.n_heads, cfg.head_dim)
        out = _constrain(out, ("batch", "length", "act_heads", None))
        o_kernel = _param(self, "o_kernel", (cfg.n_heads, cfg.head_dim, cfg.d_model),
                          ("q_heads", "head_dim", "embed"), _normal(cfg), cfg)
        y = jnp.einsum("bshk,hkd->bsd", out, o_kernel.astype(out.dtype))
        if cfg.family == "gpt2":
            y = y + _param(self, "o_bias", (cfg.d_model,), ("norm",), nn.initializers.zeros,
                           cfg).astype(y.dtype)
        return y, new_kv


def _activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dt = x.dtype
        if cfg.family == "llama":
            gate = _param(self, "gate_kernel", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), _normal(cfg), cfg)
            up = _param(self, "up_kernel", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), _normal(cfg), cfg)
            h = _activation(cfg.activation, x @ gate.astype(dt)) * (x @ up.astype(dt))
        else:
            fc = _param(self, "fc_kernel", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), _normal(cfg), cfg)
            fc_b = _param(self, "fc_bias", (cfg.d_ff,), ("mlp",), nn.initializers.zeros, cfg)
            h = _activation(cfg.activation, x @ fc.astype(dt) + fc_b.astype(dt))
        h = _constrain(h, ("batch", "length", "act_mlp"))
        down = _param(self, "down_kernel", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), _normal(cfg), cfg)
        y = h @ down.astype(dt)
        if cfg.family == "gpt2":
            y = y + _param(self, "down_bias", (cfg.d_model,), ("norm",), nn.initializers.zeros,
                           cfg).astype(dt)
        return y


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv, index):
        h, new_kv = Attention(self.cfg, name="attn")(Norm(self.cfg, name="attn_norm")(x),
                                                      positions, mask, kv, index)
        x = x + h
        x = x + Mlp(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x))
        return _constrain(x, ("batch", "length", "act_embed")), new_kv


class Transformer(nn.Module):
    """Trunk plus heads. Returns hidden states, logits, per-position reward and value scalars."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxS: Array, positions_BxS: Array, mask_BxSxT: Array,
                 cache_layers: tuple[dict[str, Array], ...] | None = None,
                 index: Array | None = None, last_logits_only: bool = False) -> dict[str, Any]:
        """`last_logits_only`: lm logits for the last position only (B, 1, V) -- a prefill
        needs no others, and at a large vocabulary they are a third of its FLOPs."""
        cfg = self.cfg
        dt = as_dtype(cfg.dtype)
        embedding = _param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           _normal(cfg), cfg)
        x = jnp.take(embedding, tokens_BxS, axis=0).astype(dt)
        if cfg.embed_scale:
            # Gemma multiplies by sqrt(d_model) rounded to the activation dtype.
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
        if cfg.family == "gpt2":
            pos_table = _param(self, "pos_embed", (cfg.max_len, cfg.d_model), ("pos", "embed"),
                               nn.initializers.normal(0.01), cfg)
            x = x + jnp.take(pos_table, positions_BxS, axis=0).astype(dt)
        x = _constrain(x, ("batch", "length", "act_embed"))
        new_cache = []
        for i in range(cfg.n_layers):
            kv = None if cache_layers is None else cache_layers[i]
            x, new_kv = Block(cfg, name=f"layer_{i}")(x, positions_BxS, mask_BxSxT, kv, index)
            new_cache.append(new_kv)
        hidden = Norm(cfg, name="final_norm")(x)
        out: dict[str, Any] = {"hidden": hidden, "cache_layers": tuple(new_cache)}
        if "lm" in cfg.heads:
            if cfg.tie_embeddings:
                kernel_DxV = embedding.T
            else:
                kernel_DxV = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size),
                                    ("embed", "vocab"), _normal(cfg), cfg)
            lm_in = hidden[:, -1:] if last_logits_only else hidden
            logits = jnp.einsum("bsd,dv->bsv", lm_in, kernel_DxV.astype(hidden.dtype),
                                preferred_element_type=jnp.float32)
            out["logits"] = _constrain(logits, ("batch", "length", "act_vocab"))
        for head in ("reward", "value"):
            if head in cfg.heads:
                kernel = _param(self, f"{head}_head_kernel", (cfg.d_model, 1), ("embed", "scalar"),
                                nn.initializers.zeros, cfg)
                bias = _param(self, f"{head}_head_bias", (1,), ("scalar",), nn.initializers.zeros, cfg)
                out[head] = (jnp.einsum("bsd,do->bso", hidden.astype(jnp.float32),
                                        kernel.astype(jnp.float32)) + bias.astype(jnp.float32))[..., 0]
        return out
