"""Logits parity with Hugging Face's PyTorch implementations (tiny random models, no download)."""

import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

from infalign_jax import models
from infalign_jax.models import hf_import

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=96, max_position_embeddings=64)


def _hf_model(family: str, tie: bool):
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    kw = dict(COMMON, num_key_value_heads=2, tie_word_embeddings=tie)
    if family == "llama":
        cfg = transformers.LlamaConfig(**kw, rope_theta=5000.0, rms_norm_eps=1e-5)
        return transformers.LlamaForCausalLM(cfg)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    if family == "gemma":
        cfg = transformers.GemmaConfig(**kw, head_dim=24, hidden_activation="gelu_pytorch_tanh")
        return transformers.GemmaForCausalLM(cfg)
    raise ValueError(family)


def _perturb(model):
    # Random init of norms/biases is 1 / 0 in HF: perturb every tensor so each mapping matters.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family,tie", [("llama", False), ("llama", True), ("qwen2", True),
                                        ("gemma", True), ("gpt2", True)])
def test_logits_match_transformers(tmp_path, family, tie):
    torch.manual_seed(0)
    model = _hf_model(family, tie).eval()
    _perturb(model)
    model.save_pretrained(tmp_path)
    cfg, params = hf_import.load_hf_checkpoint(str(tmp_path))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, (3, 12))
    mask = np.ones((3, 12), bool)
    mask[0, :4] = False   # left padding
    mask[1, 9:] = False   # right padding
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(positions)).logits.numpy()
    got = np.asarray(models.apply(params, jnp.asarray(tokens), cfg,
                                  attention_mask_BxT=jnp.asarray(mask)).logits)
    err = np.abs(got - want)[mask].max()
    print(f"{family} tie={tie}: max |logit diff| = {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2"])
def test_export_round_trip_loads_in_transformers(tmp_path, family):
    torch.manual_seed(1)
    model = _hf_model(family, family != "llama").eval()
    _perturb(model)
    model.save_pretrained(tmp_path / "src")
    cfg, params = hf_import.load_hf_checkpoint(str(tmp_path / "src"))
    hf_import.save_hf_checkpoint(str(tmp_path / "out"), cfg, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.tensor(np.random.default_rng(2).integers(0, 97, (2, 7)))
    with torch.no_grad():
        np.testing.assert_allclose(back(tokens).logits.numpy(), model(tokens).logits.numpy(),
                                   atol=1e-5)
