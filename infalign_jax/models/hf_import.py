"""Hugging Face checkpoints (local directories only) to and from our Flax parameters.

Supported `model_type`s: llama (also SmolLM), qwen2, gemma (v1), gpt2. Nothing here touches the
hub: directories hold config.json plus model.safetensors (or a sharded index).

Names map one-to-one; the only reshapes are (out, in) linear weights to our (in, heads, head_dim)
kernels, and GPT-2's fused Conv1D `c_attn` split into q, k, v. The whole tree is built and checked
before anything is returned, so a bad checkpoint never yields half-loaded parameters.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.models.config import ModelConfig
from infalign_jax.models.transformer import stack_layers, unstack_layers
from infalign_jax.infra.files import atomic_path

SUPPORTED = ("llama", "qwen2", "gemma", "gpt2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def _rope_theta(hf: Mapping[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise CheckpointError(f"rope type {kind!r} is not supported (only the default rotary embedding)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


class _Fields(dict):
    """config.json as a dict whose missing keys raise CheckpointError naming the key."""

    def __missing__(self, key: str) -> Any:
        raise CheckpointError(f"config.json ({self.get('model_type')}): required key {key!r} is "
                              f"missing")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict."""
    hf = _Fields(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"unknown architecture model_type={model_type!r}; supported: "
                              f"{', '.join(SUPPORTED)}")
    if model_type == "gpt2":
        d = hf["n_embd"]
        act = hf.get("activation_function", "gelu_new")
        fields = dict(family="gpt2", vocab_size=hf["vocab_size"], d_model=d,
                      n_layers=hf["n_layer"], n_heads=hf["n_head"], n_kv_heads=hf["n_head"],
                      head_dim=d // hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                      max_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      tie_embeddings=True,
                      activation="gelu_tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "gelu")
    else:
        if hf.get("attention_bias") and model_type != "qwen2":
            raise CheckpointError(f"{model_type}: attention_bias=True is not supported")
        if hf.get("mlp_bias"):
            raise CheckpointError(f"{model_type}: mlp_bias=True is not supported")
        heads = hf["num_attention_heads"]
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}.get(act)
        if act is None:
            raise CheckpointError(f"{model_type}: activation {hf.get('hidden_act')!r} not supported")
        fields = dict(family="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                      n_layers=hf["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=hf.get("num_key_value_heads") or heads,
                      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                      d_ff=hf["intermediate_size"],
                      max_len=hf.get("max_position_embeddings", 2048),
                      norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
                      activation=act, qkv_bias=model_type == "qwen2",
                      embed_scale=model_type == "gemma", rmsnorm_unit_offset=model_type == "gemma")
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json ({model_type}): {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json dict that `transformers` loads for these parameters."""
    if cfg.family == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_len,
                "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
                "tie_word_embeddings": True}
    model_type = "gemma" if cfg.embed_scale else "qwen2" if cfg.qkv_bias else "llama"
    arch = {"gemma": "GemmaForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[cfg.activation]
    out = {"model_type": model_type, "architectures": [arch[model_type]],
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": act}
    if model_type == "gemma":
        out["hidden_activation"] = act
    return out


def _tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    """Our param path -> (HF tensor name, conversion kind)."""
    m: dict[tuple[str, ...], tuple[str, str]] = {}
    if cfg.family == "gpt2":
        m[("embed",)] = ("wte.weight", "copy")
        m[("pos_embed",)] = ("wpe.weight", "copy")
        for i in range(cfg.n_layers):
            h, l = f"h.{i}.", f"layer_{i}"
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                m[(l, ours, "scale")] = (h + theirs + ".weight", "copy")
                m[(l, ours, "bias")] = (h + theirs + ".bias", "copy")
            for j, name in enumerate("qkv"):
                m[(l, "attn", f"{name}_kernel")] = (h + "attn.c_attn.weight", f"split_w{j}")
                m[(l, "attn", f"{name}_bias")] = (h + "attn.c_attn.bias", f"split_b{j}")
            m[(l, "attn", "o_kernel")] = (h + "attn.c_proj.weight", "in_heads")
            m[(l, "attn", "o_bias")] = (h + "attn.c_proj.bias", "copy")
            m[(l, "mlp", "fc_kernel")] = (h + "mlp.c_fc.weight", "copy")
            m[(l, "mlp", "fc_bias")] = (h + "mlp.c_fc.bias", "copy")
            m[(l, "mlp", "down_kernel")] = (h + "mlp.c_proj.weight", "copy")
            m[(l, "mlp", "down_bias")] = (h + "mlp.c_proj.bias", "copy")
        m[("final_norm", "scale")] = ("ln_f.weight", "copy")
        m[("final_norm", "bias")] = ("ln_f.bias", "copy")
        return m
    m[("embed",)] = ("model.embed_tokens.weight", "copy")
    for i in range(cfg.n_layers):
        h, l = f"model.layers.{i}.", f"layer_{i}"
        m[(l, "attn_norm", "scale")] = (h + "input_layernorm.weight", "copy")
        m[(l, "mlp_norm", "scale")] = (h + "post_attention_layernorm.weight", "copy")
        for name in "qkv":
            m[(l, "attn", f"{name}_kernel")] = (h + f"self_attn.{name}_proj.weight", "out_heads")
            if cfg.qkv_bias:
                m[(l, "attn", f"{name}_bias")] = (h + f"self_attn.{name}_proj.bias", "heads_bias")
        m[(l, "attn", "o_kernel")] = (h + "self_attn.o_proj.weight", "o_proj")
        for name in ("gate", "up", "down"):
            m[(l, "mlp", f"{name}_kernel")] = (h + f"mlp.{name}_proj.weight", "transpose")
    m[("final_norm", "scale")] = ("model.norm.weight", "copy")
    if "lm" in cfg.heads and not cfg.tie_embeddings:
        m[("lm_head",)] = ("lm_head.weight", "transpose")
    return m


def _to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return w
    if kind == "transpose":
        return w.T
    if kind == "out_heads":      # (heads*dh, d) -> (d, heads, dh)
        return w.T.reshape(shape)
    if kind == "heads_bias":
        return w.reshape(shape)
    if kind == "o_proj":         # (d, heads*dh) -> (heads, dh, d)
        return w.T.reshape(shape)
    if kind == "in_heads":       # gpt2 c_proj (heads*dh, d) -> (heads, dh, d)
        return w.reshape(shape)
    if kind.startswith("split_w"):   # gpt2 c_attn (d, 3d) -> one of q, k, v as (d, heads, dh)
        j, d = int(kind[-1]), w.shape[1] // 3
        return w[:, j * d:(j + 1) * d].reshape(shape)
    if kind.startswith("split_b"):
        j, d = int(kind[-1]), w.shape[0] // 3
        return w[j * d:(j + 1) * d].reshape(shape)
    raise AssertionError(kind)


def _strip_prefix(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    if cfg.family != "gpt2":
        return dict(state_dict)
    return {k[len("transformer."):] if k.startswith("transformer.") else k: v
            for k, v in state_dict.items()}


def params_from_hf_state_dict(cfg: ModelConfig, state_dict: Mapping[str, np.ndarray], source: str,
                              dtype: str | None = None) -> dict[str, Any]:
    """Our parameter tree from HF-named tensors. Heads absent from the checkpoint start at zero."""
    from infalign_jax import models# the init gives the target shapes

    state = _strip_prefix(state_dict, cfg)
    shapes = unstack_layers(jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0))))
    target = jnp.bfloat16 if (dtype or cfg.param_dtype) == "bfloat16" else jnp.float32
    out: dict[str, Any] = {}
    tensor_map = _tensor_map(cfg)
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(p.key for p in path)
        if keys not in tensor_map:
            if keys[0].startswith(("reward_head", "value_head")):
                hf_name = "score.weight" if keys[0] == "reward_head_kernel" else None
                if hf_name in state:
                    value = np.asarray(state[hf_name], np.float32).T
                else:
                    value = np.zeros(leaf.shape, np.float32)
            else:
                raise CheckpointError(f"{source}: no mapping for parameter {'/'.join(keys)}")
        else:
            name, kind = tensor_map[keys]
            if name not in state:
                raise CheckpointError(f"{source}: missing tensor {name!r} (for {'/'.join(keys)})")
            raw = np.asarray(state[name], np.float32)
            try:
                value = _to_ours(kind, raw, leaf.shape)
            except ValueError as e:
                raise CheckpointError(f"{source}: tensor {name!r} has shape {raw.shape}, which does "
                                      f"not fit {'/'.join(keys)} of shape {leaf.shape}") from e
            if value.shape != leaf.shape:
                raise CheckpointError(f"{source}: tensor {name!r} has shape {raw.shape}; expected "
                                      f"{leaf.shape} for {'/'.join(keys)}")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return jax.tree.map(lambda x: jnp.asarray(x, target), stack_layers(out, cfg.n_layers))


def hf_state_dict_from_params(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf_state_dict` (float32 numpy, HF names)."""
    flat = {tuple(p.key for p in path): np.asarray(v, np.float32)
            for path, v in jax.tree_util.tree_flatten_with_path(unstack_layers(params))[0]}
    out: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}
    for keys, (name, kind) in _tensor_map(cfg).items():
        w = flat[keys]
        if kind == "copy":
            out[name] = w
        elif kind == "transpose":
            out[name] = w.T
        elif kind in ("out_heads", "o_proj"):
            out[name] = w.reshape(w.shape[0], -1).T if kind == "out_heads" else \
                w.reshape(-1, w.shape[-1]).T
        elif kind == "heads_bias":
            out[name] = w.reshape(-1)
        elif kind == "in_heads":
            out[name] = w.reshape(-1, w.shape[-1])
        elif kind.startswith("split_"):
            part = w.reshape(w.shape[0], -1) if kind.startswith("split_w") else w.reshape(-1)
            fused.setdefault(name, [None, None, None])[int(kind[-1])] = part
    for name, parts in fused.items():
        out[name] = np.concatenate(parts, axis=-1)
    if cfg.family == "gpt2":
        out = {"transformer." + k: v for k, v in out.items()}
    if "reward_head_kernel" in flat:
        out["score.weight"] = flat["reward_head_kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    try:
        out = {}
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                out[name] = np.asarray(f.get_tensor(name), np.float32)
        return out
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def load_hf_checkpoint(directory: str, dtype: str = "float32", **overrides: Any
                       ) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, params) from a local HF directory (config.json + safetensors)."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the model config ({e})") from e
    cfg = config_from_hf(hf, param_dtype=dtype, **overrides)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: cannot read the shard index (expected JSON with a "
                                  f"'weight_map' of tensor name -> file): {e!r}") from e
    else:
        files = ["model.safetensors"]
    state: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: weights file not found")
        state.update(_read_safetensors(path))
    if cfg.family == "llama" and not cfg.tie_embeddings and "lm_head.weight" not in state:
        raise CheckpointError(f"{directory}: missing tensor 'lm_head.weight' (untied embeddings)")
    return cfg, params_from_hf_state_dict(cfg, state, source=directory, dtype=dtype)


def save_hf_checkpoint(directory: str, cfg: ModelConfig, params: Mapping[str, Any]) -> None:
    """Writes config.json + model.safetensors that `transformers` can load."""
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
        save_file(hf_state_dict_from_params(cfg, params), tmp, metadata={"format": "pt"})


def load_tokenizer(directory: str):
    """The tokenizer saved beside a checkpoint (local files only)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
