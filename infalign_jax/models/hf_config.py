"""Hugging Face `config.json` to and from `ModelConfig`, with no silent wrong load.

Every key of a config.json is one of three things:

* handled: it changes the forward pass and is translated (`HANDLED`, per model_type), or its
  value is checked and refused when this decoder cannot reproduce it (e.g. rope_type "yarn",
  `use_bidirectional_attention`, `partial_rotary_factor` != 1);
* inert: reviewed as not changing the logits of a forward pass (`INERT`: token ids, dropout
  rates -- the decoder has no dropout --, initialisation ranges, generation settings, ...);
* anything else: refused, naming the key and its value, unless the caller lists it in
  `ignore_keys` after checking that it does not change the model.

`tests/test_hf_families.py` walks the transformers config class of every supported model_type and
checks that each of its fields is handled or inert.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from infalign_jax.models.config import ModelConfig

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
             "gpt2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor or key."""


_LLAMA_LIKE = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
               "rms_norm_eps", "tie_word_embeddings", "hidden_act", "rope_parameters",
               "rope_scaling", "rope_theta"}
_WINDOWED = {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}
_GEMMA2 = {"hidden_activation", "attention_bias", "query_pre_attn_scalar", "sliding_window",
           "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
           "use_bidirectional_attention"}
HANDLED: dict[str, set[str]] = {
    "llama": _LLAMA_LIKE | {"attention_bias", "mlp_bias"},
    "mistral": _LLAMA_LIKE | {"sliding_window"},
    "qwen2": _LLAMA_LIKE | _WINDOWED,
    "qwen3": _LLAMA_LIKE | _WINDOWED | {"attention_bias"},
    "gemma": _LLAMA_LIKE | {"attention_bias", "hidden_activation", "use_bidirectional_attention"},
    "gemma2": _LLAMA_LIKE | _GEMMA2,
    "gemma3_text": _LLAMA_LIKE | _GEMMA2 | {"rope_local_base_freq", "sliding_window_pattern"},
    # Phi-3: Llama with fused qkv / gate-up projections (split on load, see hf_import)
    "phi3": _LLAMA_LIKE | {"sliding_window", "original_max_position_embeddings",
                           "partial_rotary_factor"},
    "gpt2": {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx",
             "layer_norm_epsilon", "activation_function", "tie_word_embeddings",
             "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention"},
}

# Keys that do not change the logits of a forward pass.
_GENERIC_INERT = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype",
    "torch_dtype", "use_cache", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "num_labels", "problem_type", "tokenizer_class", "prefix",
    "task_specific_params",
    "attention_dropout", "cache_implementation", "attn_implementation",
    # generation settings some older config.json files carry
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "use_bfloat16",
}
INERT: dict[str, set[str]] = {
    "llama": {"pretraining_tp"},          # not read by transformers' Llama modelling code
    "mistral": set(), "qwen2": set(), "qwen3": set(), "gemma": set(),
    "gemma2": {"hidden_act"},             # Gemma 2/3 read hidden_activation only
    "gemma3_text": {"hidden_act", "_sliding_window_pattern"},   # the latter not read on load
    "phi3": {"resid_pdrop", "embd_pdrop"},
    # dropout rates, the double-heads model's summary head, the float32 upcast of the scores
    # (already float32 here)
    "gpt2": {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
             "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
             "reorder_and_upcast_attn"},
}
for _t in INERT:
    INERT[_t] |= _GENERIC_INERT

# What transformers' config class of each model_type (its `__init__` defaults) puts in a key
# that config.json leaves out, where that is not what the readers below would otherwise assume
# (the head count, hidden_size / heads, no window, no soft-cap, ...). Only an absent key takes
# these: an explicit null keeps its meaning (a null soft-cap is off, as in transformers).
# tests/test_hf_families.py checks every handled key against the classes themselves.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32,
              "max_window_layers": 28, "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128,
              "max_window_layers": 28, "sliding_window": 4096},
    "gemma": {"max_position_embeddings": 8192, "num_key_value_heads": 16, "head_dim": 256},
    "gemma2": {"max_position_embeddings": 8192, "num_key_value_heads": 4, "head_dim": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {"max_position_embeddings": 131072, "num_key_value_heads": 4,
                    "head_dim": 256},
    "phi3": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "gpt2": {},
}

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "partial_rotary_factor"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "quick_gelu": "quick_gelu", "relu": "relu"}


class _Reader:
    """config.json keys read through this record what was consumed; reading a key the family's
    `HANDLED` set does not list is a bug in this module, not in the checkpoint."""

    def __init__(self, hf: Mapping[str, Any], model_type: str, source: str):
        self.hf = {**CLASS_DEFAULTS[model_type], **hf}   # absent keys: transformers' defaults
        self.model_type, self.source = model_type, source
        self.used: set[str] = set()

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source} ({self.model_type}): {message}")

    def get(self, key: str, default: Any = None) -> Any:
        assert key in HANDLED[self.model_type], (self.model_type, key)
        self.used.add(key)
        value = self.hf.get(key)
        return default if value is None else value

    def req(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise self.fail(f"required key {key!r} is missing")
        return value

    def refuse(self, key: str, why: str) -> CheckpointError:
        return self.fail(f"{key}={self.hf.get(key)!r} is not supported: {why}")

    def check_leftovers(self, ignore_keys: Iterable[str]) -> None:
        known = self.used | HANDLED[self.model_type] | INERT[self.model_type] | set(ignore_keys)
        left = sorted(k for k in self.hf if k not in known)
        if left:
            shown = ", ".join(f"{k}={self.hf[k]!r}" for k in left)
            raise self.fail(f"config keys this loader does not handle, which may change the "
                            f"forward pass: {shown}. If they do not, pass "
                            f"ignore_keys={tuple(left)!r}")


def _activation(r: _Reader, key: str, default: str) -> str:
    name = r.get(key, default)
    if r.model_type == "gemma" and name == "gelu":
        name = "gelu_pytorch_tanh"   # transformers reads Gemma 1's legacy "gelu" as the tanh form
    if name not in _ACTIVATIONS:
        raise r.refuse(key, f"activations supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _set_keys(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _rope_fields(r: _Reader, default_theta: float) -> dict[str, Any]:
    # A key set to null reads as left out, as the reader's `get` treats top-level keys.
    params = _set_keys(r.get("rope_parameters") or {})
    legacy = _set_keys(r.get("rope_scaling") or {})
    top_theta = r.get("rope_theta")
    out: dict[str, Any] = {}
    if "full_attention" in params or "sliding_attention" in params:   # per layer type (Gemma 3)
        if r.model_type != "gemma3_text":   # the others' rotary embedding reads one rope
            raise r.refuse("rope_parameters", f"rope per layer type (full_attention / "
                           f"sliding_attention) is read by transformers for gemma3_text only; "
                           f"{r.model_type!r} applies one rope to every layer")
        local = _set_keys(params.get("sliding_attention") or {})
        params = _set_keys(params.get("full_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise r.refuse("rope_parameters", "sliding layers' rope must be the default one")
        out["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
    elif r.model_type == "gemma3_text":
        if params:   # transformers' Gemma 3 reads the per-layer-type dicts only
            raise r.refuse("rope_parameters", "gemma3_text reads rope_parameters per layer type "
                           "(full_attention / sliding_attention); transformers ignores a flat "
                           "dict's keys")
        out["rope_local_theta"] = float(r.get("rope_local_base_freq", 10000.0))
    if legacy and params and r.model_type == "gemma3_text":
        # transformers' Gemma 3 updates full_attention with rope_scaling: rope_scaling wins
        params, legacy = {**params, **legacy}, {}
    if legacy and params:
        # transformers reads rope_scaling alone then; we merged them, rope_parameters winning
        said = {("rope_type" if k == "type" else k): v for k, v in legacy.items()}
        defaults = {"rope_type": "default"}
        clash = sorted(k for k, v in said.items() if params.get(k, defaults.get(k)) != v)
        clash += sorted(k for k in set(params) - set(said) - {"rope_theta"})
        # rope_scaling's theta is the top-level one (or the family's default)
        theta = top_theta if top_theta is not None else default_theta
        if "rope_theta" not in said and float(params.get("rope_theta", theta)) != float(theta):
            clash.append("rope_theta")
        if clash:
            raise r.refuse("rope_scaling", f"rope_scaling and rope_parameters disagree on "
                           f"{clash}: transformers reads rope_scaling alone; keep one")
    rope = {**legacy, **params}
    src = "rope_parameters" if params or not legacy else "rope_scaling"   # named in refusals
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:
        raise r.refuse(src, f"unknown rope keys {unknown}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "dynamic", "llama3"):
        raise r.refuse(src, f"rope_type {kind!r}; supported: default, linear, "
                       "dynamic, llama3")
    if r.model_type == "phi3" and kind != "default":
        # transformers' Phi3Config accepts longrope alone (not read here): a linear or dynamic
        # phi3 would load here as a model transformers refuses, and export as a Llama
        raise r.refuse(src, f"rope_type {kind!r} for phi3; transformers' phi3 takes only "
                       "longrope scaling, which is not supported here")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise r.refuse(src, "partial_rotary_factor != 1")
    theta = rope.get("rope_theta", top_theta if top_theta is not None else default_theta)
    out.update(rope_type=kind, rope_theta=float(theta))
    if kind != "default":
        out["rope_factor"] = float(rope.get("factor", 1.0))
    if kind == "llama3":
        for ours, theirs in (("rope_low_freq_factor", "low_freq_factor"),
                             ("rope_high_freq_factor", "high_freq_factor"),
                             ("rope_original_max_len", "original_max_position_embeddings")):
            if theirs not in rope:
                raise r.refuse(src, f"llama3 scaling without {theirs!r}")
            out[ours] = rope[theirs] if ours == "rope_original_max_len" else float(rope[theirs])
    if kind == "dynamic":
        original = rope.get("original_max_position_embeddings")
        if original is not None and original != r.get("max_position_embeddings"):
            raise r.refuse(src, "dynamic scaling whose original_max_position_"
                           "embeddings differs from max_position_embeddings (transformers' result "
                           "then depends on the calls made before)")
    return out


def _layer_types(r: _Reader, n_layers: int, default: list[str]) -> tuple[str, ...]:
    types = r.get("layer_types") or default
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    if len(types) != n_layers or any(t not in names for t in types):
        raise r.refuse("layer_types", f"expected {n_layers} of {sorted(names)}")
    return tuple(names[t] for t in types)


def _window_fields(r: _Reader, n_layers: int) -> dict[str, Any]:
    t = r.model_type
    if t in ("mistral", "phi3"):
        window = r.get("sliding_window")
        return {"sliding_window": int(window)} if window else {}
    if t in ("qwen2", "qwen3"):
        window = r.get("sliding_window") if r.get("use_sliding_window", False) else None
        first = r.get("max_window_layers", n_layers)
        default = ["sliding_attention" if window is not None and i >= first else "full_attention"
                   for i in range(n_layers)]
    else:   # gemma2 / gemma3_text
        window = r.get("sliding_window", 4096)
        every = r.get("sliding_window_pattern", 6) if t == "gemma3_text" else 2
        default = ["sliding_attention" if (i + 1) % every else "full_attention"
                   for i in range(n_layers)]
    types = _layer_types(r, n_layers, default)
    if "sliding" not in types:
        return {}
    if not window:
        raise r.refuse("sliding_window", "layer_types has sliding layers but no window size")
    return {"sliding_window": int(window), "layer_types": types}


def _gpt2(r: _Reader) -> dict[str, Any]:
    if r.get("add_cross_attention", False):
        raise r.refuse("add_cross_attention", "this is a decoder-only model")
    d, heads = r.req("n_embd"), r.req("n_head")
    return dict(family="gpt2", vocab_size=r.req("vocab_size"), d_model=d, n_layers=r.req("n_layer"),
                n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
                d_ff=r.get("n_inner") or 4 * d,
                max_len=r.get("n_positions") or r.req("n_ctx"),
                norm_eps=float(r.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(r.get("tie_word_embeddings", True)),
                activation=_activation(r, "activation_function", "gelu_new"),
                attn_scale_weights=bool(r.get("scale_attn_weights", True)),
                attn_scale_inverse_layer=bool(r.get("scale_attn_by_inverse_layer_idx", False)))


def _llama_like(r: _Reader) -> dict[str, Any]:
    t = r.model_type
    gemma = t.startswith("gemma")
    heads, d = r.req("num_attention_heads"), r.req("hidden_size")
    n_layers = r.req("num_hidden_layers")
    if t in ("gemma2", "gemma3_text"):
        act = _activation(r, "hidden_activation", "gelu_pytorch_tanh")
    else:
        act = _activation(r, "hidden_act", "gelu_pytorch_tanh" if gemma else "silu")
        if t == "gemma":
            r.get("hidden_activation")   # transformers reads hidden_act only for Gemma 1
    if r.get("use_bidirectional_attention", False) if gemma else False:
        raise r.refuse("use_bidirectional_attention", "the decoder is causal")
    bias = bool(r.get("attention_bias", False)) if t not in ("qwen2", "mistral", "phi3") \
        else False
    fields = dict(family="llama", vocab_size=r.req("vocab_size"), d_model=d, n_layers=n_layers,
                  n_heads=heads, n_kv_heads=r.get("num_key_value_heads") or heads,
                  head_dim=r.get("head_dim") or d // heads, d_ff=r.req("intermediate_size"),
                  max_len=r.get("max_position_embeddings", 2048),
                  norm_eps=float(r.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(r.get("tie_word_embeddings", gemma)), activation=act,
                  qkv_bias=bias or t == "qwen2", o_bias=bias,
                  mlp_bias=bool(r.get("mlp_bias", False)) if t == "llama" else False,
                  qk_norm=t in ("qwen3", "gemma3_text"), embed_scale=gemma,
                  rmsnorm_unit_offset=gemma, post_norms=t in ("gemma2", "gemma3_text"))
    fields.update(_rope_fields(r, 1_000_000.0 if t == "gemma3_text" else 10000.0))
    if t in ("mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3_text"):
        fields.update(_window_fields(r, n_layers))
    if t == "phi3":
        if float(r.get("partial_rotary_factor", 1.0)) != 1.0:
            raise r.refuse("partial_rotary_factor", "rotation of part of each head")
        r.get("original_max_position_embeddings")   # read by longrope only, which is refused
    if t == "gemma3_text" and r.get("attn_logit_softcapping"):
        # The config class keeps the field, but transformers' Gemma 3 attention never applies it
        # (Gemma 2's does): capping here would make another model than the checkpoint's.
        raise r.refuse("attn_logit_softcapping", "transformers' Gemma 3 does not apply it (set "
                       "it to null; released Gemma 3 configs do)")
    if t in ("gemma2", "gemma3_text"):
        fields.update(query_pre_attn_scalar=float(r.get("query_pre_attn_scalar", 256)),
                      # absent: the class default (Gemma 2: 50 / 30, Gemma 3: off); null: off
                      attn_softcap=float(r.get("attn_logit_softcapping", 0.0)),
                      final_softcap=float(r.get("final_logit_softcapping", 0.0)))
    return fields


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json",
                   ignore_keys: Iterable[str] = (), **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; anything it cannot reproduce is refused
    with the key named (see the module docstring)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{source}: unknown architecture model_type={model_type!r}; "
                              f"supported: {', '.join(SUPPORTED)}")
    r = _Reader(hf, model_type, source)
    fields = _gpt2(r) if model_type == "gpt2" else _llama_like(r)
    r.check_leftovers(ignore_keys)
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} ({model_type}): {e}") from e


# ------------------------------------------------------------------------------- export


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type whose forward pass these switches are; refuses a mix no
    transformers family has. (A Phi-3 checkpoint exports as the Llama / Mistral it equals.)"""
    if cfg.family == "gpt2":   # checked as the others: GPT-2 has no window, softcap, ...
        t = "gpt2"
    elif cfg.post_norms:
        t = "gemma3_text" if cfg.qk_norm else "gemma2"
    elif cfg.embed_scale:
        t = "gemma"
    elif cfg.qk_norm:
        t = "qwen3"
    elif cfg.qkv_bias and not cfg.o_bias:
        t = "qwen2"
    elif cfg.sliding_window:
        t = "mistral"
    else:
        t = "llama"
    back = config_from_hf(config_to_hf(cfg, t))

    def scale(c):   # 0 means head_dim
        return c.query_pre_attn_scalar or c.head_dim

    def sliding(c):   # layer_types=() with a window means every layer slides
        return [c.layer_is_sliding(i) for i in range(c.n_layers)]

    differs = [f for f in cfg.__dataclass_fields__
               if f not in ("param_dtype", "dtype", "heads", "init_std", "remat",
                            "query_pre_attn_scalar", "layer_types", "rope_local_theta")
               and getattr(back, f) != getattr(cfg, f)]
    if scale(back) != scale(cfg):
        differs.append("query_pre_attn_scalar")
    if sliding(back) != sliding(cfg):
        differs.append("layer_types")
    if any(sliding(cfg)) and back.rope_local_theta != cfg.rope_local_theta:   # read if sliding
        differs.append("rope_local_theta")
    if differs:
        raise CheckpointError(f"no transformers model_type reproduces this ModelConfig (as {t!r} "
                              f"these fields would change: {differs})")
    return t


def _int_if_whole(x: float) -> float | int:
    """transformers' strict config fields want an int where the value is whole."""
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """A config.json dict that `transformers` loads for these parameters."""
    t = model_type or hf_model_type(cfg)
    if t == "gpt2":
        act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation)
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": act,
                "tie_word_embeddings": cfg.tie_embeddings,
                "scale_attn_weights": cfg.attn_scale_weights,
                "scale_attn_by_inverse_layer_idx": cfg.attn_scale_inverse_layer}
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[t]
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu",
           "quick_gelu": "quick_gelu", "relu": "relu"}[cfg.activation]
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    out = {"model_type": t, "architectures": [arch],
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len,
           "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
           "rope_parameters": rope}
    out["hidden_activation" if t in ("gemma2", "gemma3_text") else "hidden_act"] = act
    if t == "gemma3_text":   # the one family with a rope per layer type, read nested only
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_theta or 10000.0}}
    if t in ("llama", "qwen3", "gemma", "gemma2", "gemma3_text"):
        out["attention_bias"] = cfg.o_bias
    if t == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    types = ["sliding_attention" if cfg.layer_is_sliding(i) else "full_attention"
             for i in range(cfg.n_layers)]
    if t == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    elif t in ("qwen2", "qwen3"):
        out.update(use_sliding_window=bool(cfg.sliding_window),
                   sliding_window=cfg.sliding_window or None, layer_types=types,
                   max_window_layers=cfg.n_layers)
    elif t in ("gemma2", "gemma3_text"):
        out.update(sliding_window=cfg.sliding_window or 4096, layer_types=types,
                   query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
                   attn_logit_softcapping=cfg.attn_softcap or None,
                   final_logit_softcapping=cfg.final_softcap or None)
    return out
