"""Hugging Face checkpoints (local directories only) to and from our Flax parameters.

Supported `model_type`s: see `hf_config.SUPPORTED` (config.json translation, with every key
handled, inert or refused, lives there). Nothing here touches the hub: directories hold
config.json plus model.safetensors (or a sharded index).

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
from infalign_jax.models.hf_config import (SUPPORTED, CheckpointError, config_from_hf,
                                           config_to_hf)
from infalign_jax.models.transformer import stack_layers, unstack_layers

__all__ = ["SUPPORTED", "CheckpointError", "config_from_hf", "config_to_hf",
           "params_from_hf_state_dict", "hf_state_dict_from_params", "load_hf_checkpoint",
           "save_hf_checkpoint", "load_tokenizer"]
from infalign_jax.infra.files import atomic_files_into, atomic_path, write_json

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
        if "lm" in cfg.heads and not cfg.tie_embeddings:
            m[("lm_head",)] = ("lm_head.weight", "transpose")
        return m
    m[("embed",)] = ("model.embed_tokens.weight", "copy")
    for i in range(cfg.n_layers):
        h, l = f"model.layers.{i}.", f"layer_{i}"
        m[(l, "attn_norm", "scale")] = (h + "input_layernorm.weight", "copy")
        if cfg.post_norms:   # Gemma 2/3: post_attention_layernorm is the norm *after* attention
            m[(l, "attn_post_norm", "scale")] = (h + "post_attention_layernorm.weight", "copy")
            m[(l, "mlp_norm", "scale")] = (h + "pre_feedforward_layernorm.weight", "copy")
            m[(l, "mlp_post_norm", "scale")] = (h + "post_feedforward_layernorm.weight", "copy")
        else:
            m[(l, "mlp_norm", "scale")] = (h + "post_attention_layernorm.weight", "copy")
        for name in "qkv":
            m[(l, "attn", f"{name}_kernel")] = (h + f"self_attn.{name}_proj.weight", "out_heads")
            if cfg.qkv_bias:
                m[(l, "attn", f"{name}_bias")] = (h + f"self_attn.{name}_proj.bias", "heads_bias")
        if cfg.qk_norm:
            for name in "qk":
                m[(l, "attn", f"{name}_norm", "scale")] = (h + f"self_attn.{name}_norm.weight",
                                                           "copy")
        m[(l, "attn", "o_kernel")] = (h + "self_attn.o_proj.weight", "o_proj")
        if cfg.o_bias:
            m[(l, "attn", "o_bias")] = (h + "self_attn.o_proj.bias", "copy")
        for name in ("gate", "up", "down"):
            m[(l, "mlp", f"{name}_kernel")] = (h + f"mlp.{name}_proj.weight", "transpose")
            if cfg.mlp_bias:
                m[(l, "mlp", f"{name}_bias")] = (h + f"mlp.{name}_proj.bias", "copy")
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
    _refuse_unread(cfg, state, {name for name, _ in tensor_map.values()}, source)
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


def _refuse_unread(cfg: ModelConfig, state: Mapping[str, Any], read: set[str], source: str
                   ) -> None:
    """A tensor the mapping never reads is part of another model (attention biases the
    config.json says are off: logits 2.64 off the writer's); refused by name, as the GGUF reader
    does, but for buffers transformers itself recomputes and heads this config does not build."""
    def unused(name: str) -> bool:
        if name in read or name.endswith(("rotary_emb.inv_freq", "attn.masked_bias")):
            return False
        if cfg.family == "gpt2" and name.endswith(".attn.bias"):   # the causal-mask buffer
            return False
        # lm head: tied (transformers ties it too) or not built; score: the reward head's, read
        # when this config builds one
        return name not in ("lm_head.weight", "score.weight")

    left = sorted(n for n in state if unused(n))
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensors this config never reads (they would "
                              f"be dropped, and the model with them is another model): "
                              f"{left[:6]}{' ...' if len(left) > 6 else ''}; check config.json's "
                              f"switches (e.g. attention_bias, mlp_bias)")


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
        out = {k if k == "lm_head.weight" else "transformer." + k: v for k, v in out.items()}
    if ("reward_head_kernel",) in flat:
        out["score.weight"] = flat[("reward_head_kernel",)].T
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


def load_hf_checkpoint(directory: str, dtype: str = "float32", ignore_keys: tuple[str, ...] = (),
                       **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, params) from a local HF directory (config.json + safetensors).

    `ignore_keys`: config.json keys the loader does not know, checked by the caller not to change
    the forward pass (otherwise they are refused by name)."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the model config ({e})") from e
    scorer = _is_sequence_classifier(hf, config_path)
    if scorer:
        overrides.setdefault("heads", ("reward",))
    cfg = config_from_hf(hf, source=config_path, ignore_keys=ignore_keys, param_dtype=dtype,
                         **overrides)
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
    if hf.get("model_type") == "phi3":
        state = _split_phi3(state, cfg, directory)
    if "lm" in cfg.heads and not cfg.tie_embeddings and "lm_head.weight" not in state:
        raise CheckpointError(f"{directory}: missing tensor 'lm_head.weight' (untied embeddings)")
    if scorer and "reward" in cfg.heads and "score.weight" not in state:
        raise CheckpointError(f"{directory}: a sequence-classification checkpoint without its "
                              "score head (tensor 'score.weight')")
    return cfg, params_from_hf_state_dict(cfg, state, source=directory, dtype=dtype)


def _split_phi3(state: dict[str, np.ndarray], cfg: ModelConfig, source: str
                ) -> dict[str, np.ndarray]:
    """Phi-3's fused `qkv_proj` (rows q | k | v) and `gate_up_proj` (rows gate | up) as the
    separate Llama tensors they equal."""
    out = dict(state)
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}."
        for fused, parts in (("self_attn.qkv_proj.weight",
                              (("self_attn.q_proj.weight", q_rows),
                               ("self_attn.k_proj.weight", kv_rows),
                               ("self_attn.v_proj.weight", kv_rows))),
                             ("mlp.gate_up_proj.weight", (("mlp.gate_proj.weight", cfg.d_ff),
                                                          ("mlp.up_proj.weight", cfg.d_ff)))):
            if h + fused not in out:
                raise CheckpointError(f"{source}: missing tensor {h + fused!r}")
            w = out.pop(h + fused)
            if w.shape[0] != sum(n for _, n in parts):
                raise CheckpointError(f"{source}: tensor {h + fused!r} has {w.shape[0]} rows; "
                                      f"expected {sum(n for _, n in parts)}")
            start = 0
            for name, rows in parts:
                out[h + name] = w[start:start + rows]
                start += rows
    return out


def _is_sequence_classifier(hf: Mapping[str, Any], source: str) -> bool:
    """Whether config.json describes a `...ForSequenceClassification` model; it must have one
    label (a scalar reward; the score is read at the last real token, which is where
    transformers reads it -- the rightmost non-pad token -- when pads are only padding)."""
    if not any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        return False
    labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    if labels != 1:
        raise CheckpointError(f"{source}: a sequence-classification checkpoint with {labels} "
                              "labels; a reward model has one score (num_labels=1)")
    return True


def is_sequence_classifier(directory: str) -> bool:
    """Whether the transformers directory holds a one-label `...ForSequenceClassification`."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            return _is_sequence_classifier(json.load(f), config_path)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the model config ({e})") from e


_SCORER_ARCH = {"gemma3_text": "Gemma3TextForSequenceClassification"}


def _export_config(cfg: ModelConfig, params: Mapping[str, Any], tokenizer: Any,
                   pad_token_id: int | None) -> dict[str, Any]:
    """config.json for an export: a causal LM (heads "lm") or a reward model (heads "reward",
    as `...ForSequenceClassification` with one label). Heads transformers has no place for are
    refused rather than dropped."""
    out = config_to_hf(cfg)
    heads = set(cfg.heads)
    if heads not in ({"lm"}, {"reward"}):
        raise CheckpointError(f"save_hf_checkpoint: heads {cfg.heads} have no transformers "
                              "counterpart; export heads ('lm',) (a causal LM) or ('reward',) (a "
                              "sequence classifier): drop the other heads' parameters and set "
                              "ModelConfig.heads")
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                out[key] = int(getattr(tokenizer, key))
    if pad_token_id is not None:
        out["pad_token_id"] = int(pad_token_id)
    if heads == {"reward"}:
        bias = float(np.asarray(params["reward_head_bias"]).reshape(-1)[0])
        if bias != 0.0:
            raise CheckpointError(f"save_hf_checkpoint: the reward head has a bias ({bias:.6g}); "
                                  "transformers' score layer has none. Subtract it from the "
                                  "rewards (set params['reward_head_bias'] to 0) to export.")
        if out.get("pad_token_id") is None:
            raise CheckpointError("save_hf_checkpoint: a reward model needs pad_token_id (from "
                                  "the tokenizer or the pad_token_id argument): transformers "
                                  "finds the scored token as the last one that is not padding")
        arch = out["architectures"][0].replace("ForCausalLM", "").replace("LMHeadModel", "")
        out["architectures"] = [_SCORER_ARCH.get(out["model_type"],
                                                 arch + "ForSequenceClassification")]
        out["id2label"], out["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    return out


def save_hf_checkpoint(directory: str, cfg: ModelConfig, params: Mapping[str, Any],
                       tokenizer: Any = None, pad_token_id: int | None = None) -> None:
    """Writes config.json + model.safetensors (+ the tokenizer's files when given) that
    `transformers` loads with `from_pretrained`: a causal LM, or for a reward model (heads
    ("reward",)) a sequence classifier with one label."""
    from safetensors.numpy import save_file
    config = _export_config(cfg, params, tokenizer, pad_token_id)
    os.makedirs(directory, exist_ok=True)
    if tokenizer is not None:   # each of its files whole, as config.json and the weights are
        with atomic_files_into(directory) as tmp:
            tokenizer.save_pretrained(tmp)
    write_json(os.path.join(directory, "config.json"), config)
    with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
        save_file(hf_state_dict_from_params(cfg, params), tmp, metadata={"format": "pt"})


def load_tokenizer(directory: str):
    """The tokenizer saved beside a checkpoint (local files only)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
