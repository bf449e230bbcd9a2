"""Bad checkpoints fail with an error naming the file and the tensor; nothing is half-loaded."""

import json
import os

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from infalign_jax.models import hf_import
from infalign_jax.models.hf_import import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _copy(src, dst, edit_state=None, edit_config=None):
    os.makedirs(dst, exist_ok=True)
    config = json.load(open(os.path.join(src, "config.json")))
    state = load_file(os.path.join(src, "model.safetensors"))
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    save_file(state, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_loads(ckpt):
    cfg, params = hf_import.load_hf_checkpoint(str(ckpt))
    assert cfg.n_kv_heads == 2 and not cfg.tie_embeddings and "lm_head" in params


def test_missing_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path, edit_state=lambda s: s.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.0.mlp.up_proj.weight'") as e:
        hf_import.load_hf_checkpoint(bad)
    assert bad in str(e.value)


def test_missing_untied_lm_head(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path, edit_state=lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        hf_import.load_hf_checkpoint(bad)


def test_shape_mismatch(ckpt, tmp_path):
    def edit(s):
        s["model.layers.0.self_attn.k_proj.weight"] = np.zeros((24, 32), np.float32)
    bad = _copy(ckpt, tmp_path, edit_state=edit)
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*shape \(24, 32\)"):
        hf_import.load_hf_checkpoint(bad)


def test_unknown_architecture(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path, edit_config=lambda c: c.update(model_type="mamba"))
    with pytest.raises(CheckpointError, match="model_type='mamba'.*supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt2"):
        hf_import.load_hf_checkpoint(bad)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(ckpt, tmp_path, damage):
    bad = _copy(ckpt, tmp_path)
    path = os.path.join(bad, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        hf_import.load_hf_checkpoint(bad)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        hf_import.load_hf_checkpoint(str(tmp_path))
