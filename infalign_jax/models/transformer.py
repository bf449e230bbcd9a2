"""Decoder-only transformer in Flax Linen: Llama-family and GPT-2-family blocks, three heads.

Why Linen: its parameters are a plain nested dict whose leaves map one-to-one onto checkpoint
tensors (Hugging Face, GGUF), and `module.apply(params, ...)` is already a pure function, which is
what the jitted RL step, the sampler and `jax.grad` want. Logical axis names are attached with
`nn.with_logical_partitioning` and read back as data by `infalign_jax.infra.sharding`; activations carry
`nn.with_logical_constraint` at block boundaries (a no-op outside a rules context).

Decoder layers are one `nn.scan` over parameters stacked on a leading "layers" axis: one compiled
layer body whatever the depth, with a configurable rematerialisation policy (`ModelConfig.remat`).

The KV cache is explicit state passed in and returned (no mutable Linen collections), in layout
(layers, B, H_kv, T, Dh) -- on CPU twice as fast as (B, T, H, Dh) because XLA would otherwise
transpose the whole cache every step. Decoding keeps it in two parts (see `models.prefill`): the
prompt's KV once per prompt, and each sampled row's own response KV.

Numerics: activations in `cfg.dtype`; norms, attention softmax, logits and everything downstream
in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import numpy as np
import jax
import jax.numpy as jnp

from infalign_jax.models import rotary
from infalign_jax.models.config import ModelConfig

Array = jax.Array
NEG_INF = -1e30


def as_dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Any, cfg: ModelConfig) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        as_dtype(cfg.param_dtype))


LORA = "lora"   # the variable collection of LoRA adapters (`models.lora.attach`)


def _with_lora(module: nn.Module, name: str, x: Array, y: Array) -> Array:
    """`y` = x @ W of kernel `name`, plus the LoRA update (x @ A) @ B when the "lora" collection
    holds `name`'s factors: A (d_in, r) and B (r, d_out), the scale already in B. The input and
    output axes of W are read flattened (q: D -> H * Dh, o: H * Dh -> D), as in `models.lora`;
    the full-size W + A @ B is never formed, nor its gradient."""
    if not module.has_variable(LORA, f"{name}_a"):
        return y
    a = module.get_variable(LORA, f"{name}_a").astype(x.dtype)
    b = module.get_variable(LORA, f"{name}_b").astype(x.dtype)
    x_in = x.reshape(*x.shape[:2], a.shape[0])
    return y + ((x_in @ a) @ b).reshape(y.shape)


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


def default_positions(mask_BxT: Array) -> Array:
    """Position of each token among the real tokens (left padding does not shift positions)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def softcap(x: Array, cap: float) -> Array:
    """cap * tanh(x / cap) (Gemma 2's attention-score and logit capping); identity when cap = 0."""
    return x if not cap else cap * jnp.tanh(x / cap)


def window_mask(q_pos: Array, k_pos: Array, window: Array) -> Array:
    """Whether a key at position `k_pos` lies in the sliding window of a query at `q_pos`: the
    `window` most recent positions, the query's own included (no window when `window` is 0).
    Left padding does not shift positions, so this equals transformers' index rule."""
    return (window == 0) | (q_pos - k_pos < window)


def _attend(q_BxSxHxD: Array, k_BxHxTxD: Array, v_BxHxTxD: Array, mask_BxSxT: Array,
            n_kv_heads: int, scale: Array, cap: float) -> Array:
    """Grouped-query softmax attention of S queries over T keys: (B, S, H, D)."""
    b, s, heads, dh = q_BxSxHxD.shape
    groups = heads // n_kv_heads
    q = q_BxSxHxD.reshape(b, s, n_kv_heads, groups, dh).transpose(0, 2, 3, 1, 4)
    scores = softcap(jnp.einsum("bhgsd,bhtd->bhgst", q, k_BxHxTxD.astype(q.dtype),
                                preferred_element_type=jnp.float32) * scale, cap)
    scores = jnp.where(mask_BxSxT[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bhgst,bhtd->bshgd", probs, v_BxHxTxD.astype(probs.dtype))
    return out.reshape(b, s, heads, dh)


def _attend_cached(q_RxSxHxD: Array, pk_BxHxPxD: Array, pv_BxHxPxD: Array, pmask_BxP: Array,
                   rk_RxHxLxD: Array, rv_RxHxLxD: Array, index: Array, k_RxHxSxD: Array,
                   v_RxHxSxD: Array, n_kv_heads: int, scale: Array, cap: float,
                   positions_RxS: Array, window: Array | None, ppos_BxP: Array | None) -> Array:
    """Attention of S new tokens in each of R = B*N rows, one softmax over three parts: their
    prompt's shared KV (stored once per prompt; rows b*N..b*N+N-1 read prompt b), their own earlier
    response slots (< `index`) and the S new tokens themselves (causal). The cache is read, never
    written here. `window` (None: no sliding window in the model) limits each part to the window's
    keys; `ppos_BxP` holds the prompt tokens' positions then. (R, S, H * G, D).

    S = 1 is a decode step, S > 1 a teacher-forced chunk (`models.shared_prompt_hidden`). In the
    form XLA runs well on CPU: the parts' scores are never concatenated (one max over all of them,
    then each part's exp and its own value product), and the prompt part takes a prompt's
    N x G x S queries per KV head as the rows of one product."""
    r, s, heads, dh = q_RxSxHxD.shape
    b, p = pmask_BxP.shape
    n, groups, slots = r // b, heads // n_kv_heads, rk_RxHxLxD.shape[2]
    m = groups * s                      # query rows per (row, KV head), row g * S + j
    q = jnp.transpose(q_RxSxHxD.reshape(r, s, n_kv_heads, groups, dh),
                      (0, 2, 3, 1, 4)).reshape(r, n_kv_heads, m, dh)       # R, H, M, D

    def by_prompt(x_RxHxMx):   # (R, H, M, ...) <-> (B, H, N*M, ...): cheap, x is small
        x = x_RxHxMx.reshape(b, n, n_kv_heads, m, *x_RxHxMx.shape[3:])
        return jnp.moveaxis(x, 1, 2).reshape(b, n_kv_heads, n * m, *x.shape[4:])

    def by_row(x_BxHxNMx):
        x = x_BxHxNMx.reshape(b, n_kv_heads, n, m, *x_BxHxNMx.shape[3:])
        return jnp.moveaxis(x, 2, 1).reshape(r, n_kv_heads, m, *x.shape[4:])

    f32, dt = jnp.float32, q.dtype
    sp = softcap(jnp.einsum("bhmd,bhpd->bhmp", by_prompt(q), pk_BxHxPxD.astype(dt),
                            preferred_element_type=f32) * scale, cap)        # B, H, N*M, P
    sr = softcap(jnp.einsum("rhmd,rhld->rhml", q, rk_RxHxLxD.astype(dt),
                            preferred_element_type=f32) * scale, cap)        # R, H, M, L
    ss = softcap(jnp.einsum("rhmd,rhtd->rhmt", q, k_RxHxSxD.astype(dt),
                            preferred_element_type=f32) * scale, cap)        # R, H, M, S
    keep_p = pmask_BxP[:, None, None, :]                                    # B, 1, 1, P
    keep_r = jnp.arange(slots) < index                                      # L
    keep_s = jnp.tile(jnp.tril(jnp.ones((s, s), bool)), (groups, 1))        # M, S
    if window is not None:
        # The prompt's real tokens count from 0; response slot l was written `index - l` steps
        # before the first new token.
        q_pos = jnp.broadcast_to(positions_RxS[:, None], (r, groups, s)).reshape(r, 1, m, 1)
        keep_p = keep_p & window_mask(q_pos.reshape(b, 1, n * m, 1), ppos_BxP[:, None, None, :],
                                      window)                               # B, 1, N*M, P
        slot_pos = positions_RxS[:, :1] - index + jnp.arange(slots)         # R, L
        keep_r = keep_r & window_mask(q_pos, slot_pos[:, None, None, :], window)   # R, 1, M, L
        keep_s = keep_s & window_mask(q_pos, positions_RxS[:, None, None, :], window)
    sp = jnp.where(keep_p, sp, NEG_INF)
    sr = jnp.where(keep_r, sr, NEG_INF)
    ss = jnp.where(keep_s, ss, NEG_INF)
    # The softmax is shift-invariant: the shift needs no gradient. Each row keeps its own token.
    top = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(
        by_row(jnp.max(sp, -1, keepdims=True)), jnp.max(sr, -1, keepdims=True)),
        jnp.max(ss, -1, keepdims=True)))                                    # R, H, M, 1
    ep = jnp.exp(sp - by_prompt(top))
    er = jnp.exp(sr - top)
    es = jnp.exp(ss - top)
    total = (by_row(jnp.sum(ep, -1, keepdims=True)) + jnp.sum(er, -1, keepdims=True)
             + jnp.sum(es, -1, keepdims=True))
    out = (by_row(jnp.einsum("bhmp,bhpd->bhmd", ep.astype(dt), pv_BxHxPxD.astype(dt),
                             preferred_element_type=f32))
           + jnp.einsum("rhml,rhld->rhmd", er.astype(dt), rv_RxHxLxD.astype(dt),
                        preferred_element_type=f32)
           + jnp.einsum("rhmt,rhtd->rhmd", es.astype(dt), v_RxHxSxD.astype(dt),
                        preferred_element_type=f32))
    out = (out / total).astype(dt).reshape(r, n_kv_heads, groups, s, dh)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(r, s, heads, dh)


class Attention(nn.Module):
    """Self-attention. Two modes, by `decode`:

    * None: over the sequence itself with `mask_BxSxT` (teacher forcing, prefill);
    * a dict (decoding, see `models.decode_step`): this layer's prompt KV `pk`/`pv` (B rows), the
      prompt mask `pmask` (and its positions `ppos` when the model has sliding windows), this
      layer's response KV `rk`/`rv` (R rows, L slots) and the number of slots already written,
      `index`: `_attend_cached`, for one new token per row (a decode step) or a chunk of S
      tokens (`models.shared_prompt_hidden`).
    Either way the second output is the S new tokens' own (k, v) in cache layout (B, H_kv, S, Dh):
    the caller writes them into the cache once for all layers (an in-place update of one slot),
    so the layer loop never carries or copies the cache.
    """

    cfg: ModelConfig

    def _proj(self, name, x, heads, axes_heads):
        cfg = self.cfg
        kernel = _param(self, f"{name}_kernel", (cfg.d_model, heads, cfg.head_dim),
                        ("embed", axes_heads, "head_dim"), _normal(cfg), cfg)
        y = _with_lora(self, f"{name}_kernel", x,
                       jnp.einsum("bsd,dhk->bshk", x, kernel.astype(x.dtype)))
        if cfg.qkv_bias or cfg.family == "gpt2":
            bias = _param(self, f"{name}_bias", (heads, cfg.head_dim), (axes_heads, "head_dim"),
                          nn.initializers.zeros, cfg)
            y = y + bias.astype(x.dtype)
        if cfg.qk_norm and name in ("q", "k"):
            y = Norm(cfg, name=f"{name}_norm")(y)
        return y

    @nn.compact
    def __call__(self, x_BxSxD: Array, positions_BxS: Array, mask_BxSxT: Array | None,
                 decode: dict[str, Array] | None, consts: dict[str, Array]
                 ) -> tuple[Array, tuple[Array, Array]]:
        """`consts`: this layer's rotary inverse frequencies `freq`, score `scale` and sliding
        `window` (0: none), see `layer_constants`."""
        cfg = self.cfg
        q = self._proj("q", x_BxSxD, cfg.n_heads, "q_heads")
        k = self._proj("k", x_BxSxD, cfg.n_kv_heads, "kv_heads")
        v = self._proj("v", x_BxSxD, cfg.n_kv_heads, "kv_heads")
        if cfg.family == "llama":
            q = rotary.apply(q, positions_BxS, consts["freq"], cfg)
            k = rotary.apply(k, positions_BxS, consts["freq"], cfg)
        k_BxHxSxD = jnp.swapaxes(k, 1, 2)
        v_BxHxSxD = jnp.swapaxes(v, 1, 2)
        window = consts["window"] if cfg.sliding_window else None
        if decode is None:
            if window is not None:
                mask_BxSxT = mask_BxSxT & window_mask(positions_BxS[:, :, None],
                                                      positions_BxS[:, None, :], window)
            out = _attend(q, k_BxHxSxD, v_BxHxSxD, mask_BxSxT, cfg.n_kv_heads, consts["scale"],
                          cfg.attn_softcap)
        else:
            out = _attend_cached(q, decode["pk"], decode["pv"], decode["pmask"], decode["rk"],
                                 decode["rv"], decode["index"], k_BxHxSxD, v_BxHxSxD,
                                 cfg.n_kv_heads, consts["scale"], cfg.attn_softcap,
                                 positions_BxS, window, decode["ppos"])
        kv_out = (k_BxHxSxD, v_BxHxSxD)
        out = _constrain(out, ("batch", "length", "act_heads", None))
        o_kernel = _param(self, "o_kernel", (cfg.n_heads, cfg.head_dim, cfg.d_model),
                          ("q_heads", "head_dim", "embed"), _normal(cfg), cfg)
        y = _with_lora(self, "o_kernel", out,
                       jnp.einsum("bshk,hkd->bsd", out, o_kernel.astype(out.dtype)))
        if cfg.family == "gpt2" or cfg.o_bias:
            y = y + _param(self, "o_bias", (cfg.d_model,), ("norm",), nn.initializers.zeros,
                           cfg).astype(y.dtype)
        return y, kv_out


def _activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
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
            g = _with_lora(self, "gate_kernel", x, x @ gate.astype(dt))
            u = _with_lora(self, "up_kernel", x, x @ up.astype(dt))
            if cfg.mlp_bias:
                g = g + self._bias("gate_bias", cfg.d_ff, "mlp", dt)
                u = u + self._bias("up_bias", cfg.d_ff, "mlp", dt)
            h = _activation(cfg.activation, g) * u
        else:
            fc = _param(self, "fc_kernel", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), _normal(cfg), cfg)
            fc_b = _param(self, "fc_bias", (cfg.d_ff,), ("mlp",), nn.initializers.zeros, cfg)
            h = _activation(cfg.activation,
                            _with_lora(self, "fc_kernel", x, x @ fc.astype(dt)) + fc_b.astype(dt))
        h = _constrain(h, ("batch", "length", "act_mlp"))
        down = _param(self, "down_kernel", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), _normal(cfg), cfg)
        y = _with_lora(self, "down_kernel", h, h @ down.astype(dt))
        if cfg.family == "gpt2" or cfg.mlp_bias:
            y = y + self._bias("down_bias", cfg.d_model, "norm", dt)
        return y

    def _bias(self, name: str, size: int, axis: str, dt) -> Array:
        return _param(self, name, (size,), (axis,), nn.initializers.zeros, self.cfg).astype(dt)


class Block(nn.Module):
    """One decoder layer, in the form `nn.scan` wants: (x, per-layer input) -> (x, per-layer out).

    Per-layer input: this layer's cache (pk, pv, rk, rv), all None unless decoding, and its
    constants (`layer_constants`); output: the new tokens' own (k, v) when `return_kv` (prefill,
    decoding), else None. `shared` (None unless decoding) holds what every layer reads alike:
    the prompt's mask `pmask`, its positions `ppos` (None without sliding windows) and, with
    `response_slots`, the whole response cache `response` = (rk, rv). With `post_norms` (Gemma
    2/3) the attention and MLP outputs are normed again before the residual add. With
    `response_slots` (decoding through `models.decode_step(slots=)`) the layer reads its own
    first `response_slots` slots of `response` with one dynamic slice: slicing them before the
    scan instead costs a second copy every step.
    """

    cfg: ModelConfig
    return_kv: bool = False
    response_slots: int | None = None

    @nn.compact
    def __call__(self, x, layer_in, positions, mask, shared, index):
        (pk, pv, rk, rv), consts = layer_in
        cfg = self.cfg
        if self.response_slots is not None:
            # this layer's first response slots, read from the whole cache (broadcast)
            rk_all, rv_all = shared["response"]
            start = (consts["layer"], 0, 0, 0, 0)
            size = (1, *rk_all.shape[1:3], self.response_slots, rk_all.shape[4])
            rk = jax.lax.dynamic_slice(rk_all, start, size)[0]
            rv = jax.lax.dynamic_slice(rv_all, start, size)[0]
        decode = None if rk is None else dict(pk=pk, pv=pv, rk=rk, rv=rv, pmask=shared["pmask"],
                                              ppos=shared["ppos"], index=index)
        h, kv = Attention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x), positions, mask,
                                            decode, consts)
        if cfg.post_norms:
            h = Norm(cfg, name="attn_post_norm")(h)
        x = x + h
        h = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        if cfg.post_norms:
            h = Norm(cfg, name="mlp_post_norm")(h)
        x = x + h
        x = _constrain(x, ("batch", "length", "act_embed"))
        return x, (kv if self.return_kv else None)


REMAT_POLICIES = {
    "full": None,  # save nothing: the layer's forward runs again in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _scanned_blocks(cfg: ModelConfig, return_kv: bool, response_slots: int | None = None
                    ) -> nn.Module:
    """The decoder layers as one `nn.scan` over parameters stacked on a leading "layers" axis (one
    compiled layer body instead of n_layers copies), rematerialised as `cfg.remat` says."""
    block = Block
    if cfg.remat != "none":
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    scanned = nn.scan(block, variable_axes={"params": 0, LORA: 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, return_kv, response_slots, name="layers")


class Transformer(nn.Module):
    """Trunk plus heads. Returns hidden states, logits, per-position reward and value scalars.

    Parameters of the decoder layers are stacked: `params["layers"][...]` has a leading axis of
    n_layers (checkpoint import and export convert per-layer tensors to and from it).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxS: Array, positions_BxS: Array, mask_BxSxT: Array | None,
                 decode: dict[str, Array] | None = None, return_kv: bool = False,
                 last_logits_only: bool = False, heads: tuple[str, ...] | None = None
                 ) -> dict[str, Any]:
        """`decode`: the cache of `models.decode_step` ({pk, pv, pmask, rk, rv, index}, and
        optionally `slots`, the response slots attended: a static int), or None.
        `return_kv`: also return every layer's (k, v) of this sequence (stacked), for a prefill.
        `last_logits_only`: lm logits for the last position only (B, 1, V) -- a prefill needs no
        others, and at a large vocabulary they are a third of its FLOPs. `heads`: which heads to
        compute (default all of `cfg.heads`); "hidden" alone skips the lm head."""
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
        if decode is None:
            layer_kv, shared, index, slots = (None, None, None, None), None, None, None
        else:
            slots = decode.get("slots")
            # The prompt's mask, and its positions once for every layer when windows need them.
            pmask = decode["pmask"]
            shared = {"pmask": pmask,
                      "ppos": default_positions(pmask) if cfg.sliding_window else None}
            if slots is None:
                layer_kv = (decode["pk"], decode["pv"], decode["rk"], decode["rv"])
            else:   # each layer reads its first `slots` of the response cache itself
                layer_kv = (decode["pk"], decode["pv"], None, None)
                shared["response"] = (decode["rk"], decode["rv"])
            index = decode["index"]
        consts = {k: jnp.asarray(v) for k, v in layer_constants(cfg).items()}
        if slots is not None:   # the layer's index, to slice its response slots out of the cache
            consts["layer"] = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        x, kv = _scanned_blocks(cfg, return_kv, slots)(
            x, (layer_kv, consts), positions_BxS, mask_BxSxT, shared, index)
        hidden = Norm(cfg, name="final_norm")(x)
        out: dict[str, Any] = {"hidden": hidden}
        if return_kv:
            out["kv"] = kv                      # (k, v), each (layers, B, H_kv, S, Dh)
        wanted = cfg.heads if heads is None else heads
        if "lm" in cfg.heads:
            kernel_DxV = lm_kernel(self, cfg, embedding)
            if "lm" in wanted:
                lm_in = hidden[:, -1:] if last_logits_only else hidden
                logits = softcap(jnp.einsum("bsd,dv->bsv", lm_in, kernel_DxV.astype(hidden.dtype),
                                            preferred_element_type=jnp.float32), cfg.final_softcap)
                out["logits"] = _constrain(logits, ("batch", "length", "act_vocab"))
        for head in ("reward", "value"):
            if head in cfg.heads:
                kernel = _param(self, f"{head}_head_kernel", (cfg.d_model, 1), ("embed", "scalar"),
                                nn.initializers.zeros, cfg)
                bias = _param(self, f"{head}_head_bias", (1,), ("scalar",), nn.initializers.zeros, cfg)
                if head in wanted:
                    out[head] = (jnp.einsum("bsd,do->bso", hidden.astype(jnp.float32),
                                            kernel.astype(jnp.float32))
                                 + bias.astype(jnp.float32))[..., 0]
        return out


def layer_constants(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Per-layer static data, stacked over layers for the scanned body: rotary inverse
    frequencies `freq` (n_layers, head_dim / 2), the attention score `scale` (n_layers,) and the
    sliding `window` (n_layers,; 0 = the whole causal prefix)."""
    n = cfg.n_layers
    if cfg.query_pre_attn_scalar:
        base = cfg.query_pre_attn_scalar ** -0.5
    else:
        base = cfg.head_dim ** -0.5 if cfg.attn_scale_weights else 1.0
    scale = np.array([base / (i + 1) if cfg.attn_scale_inverse_layer else base for i in range(n)],
                     np.float32)
    window = np.array([cfg.sliding_window if cfg.layer_is_sliding(i) else 0 for i in range(n)],
                      np.int32)
    if cfg.family == "llama":
        freq = rotary.layer_inv_freqs(cfg)
    else:
        freq = np.zeros((n, 1), np.float32)   # learned positions: unused
    return {"freq": freq, "scale": scale, "window": window}


def lm_kernel(module: nn.Module, cfg: ModelConfig, embedding: Array) -> Array:
    """The lm head's (D, V) kernel: the embedding transposed when tied."""
    if cfg.tie_embeddings:
        return embedding.T
    return _param(module, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                  _normal(cfg), cfg)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The parameter tree with the stacked "layers" subtree split into `layer_0`, `layer_1`, ...
    (one subtree per decoder layer, as checkpoints name them). Works on shape trees too."""
    if "layers" not in params:
        raise ValueError("unstack_layers: no 'layers' subtree (not a stacked parameter tree); "
                         f"top-level keys: {sorted(params)}")
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]

    def pick(i):
        return lambda x: (jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
                          if isinstance(x, jax.ShapeDtypeStruct) else x[i])

    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layer_{i}": jax.tree.map(pick(i), stacked) for i in range(n)})
    return out


def stack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Inverse of `unstack_layers`: `layer_0` ... `layer_{n-1}` stacked into "layers"."""
    names = [f"layer_{i}" for i in range(n_layers)]
    missing = [n for n in names if n not in params]
    extra = sorted(k for k in params if k.startswith("layer_") and k not in names)
    if missing or extra:
        raise ValueError(f"stack_layers: expected subtrees layer_0..layer_{n_layers - 1}; missing "
                         f"{missing}, unexpected {extra}")
    out = {k: v for k, v in params.items() if k not in names}
    out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *(params[n] for n in names))
    return out
