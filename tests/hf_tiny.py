"""Tiny random transformers models and the left-padded batch the family parity tests share."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from infalign_jax import models

CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
                  "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config", "gpt2": "GPT2Config"}


def perturb(model, seed: int):
    """transformers initialises norms to 1 and biases to 0: add noise so every mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_tiny(directory, config, seed: int = 0, auto=transformers.AutoModelForCausalLM):
    """A perturbed random model of `config` saved with `save_pretrained` into `directory`."""
    torch.manual_seed(seed)
    perturb(auto.from_config(config), seed).save_pretrained(directory)
    return directory


def left_padded_batch(vocab: int, low: int = 1):
    """(tokens, mask, real positions) of 3 rows of 14: left padding of 4 and 7 in two rows."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(low, vocab, (3, 14))
    mask = np.ones((3, 14), bool)
    mask[0, :4] = False
    mask[2, :7] = False
    return tokens, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


def hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(positions)).logits.numpy()


def our_logits(cfg, params, tokens, mask):
    return np.asarray(models.apply(params, jnp.asarray(tokens), cfg,
                                   attention_mask_BxT=jnp.asarray(mask)).logits)
