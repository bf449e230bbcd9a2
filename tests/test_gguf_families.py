"""GGUF files of every supported family, loaded with `gguf_import` against transformers.

For each family and option a tiny random transformers model (perturbed so every tensor matters)
is saved with `save_pretrained`, and `write_gguf` turns that directory into a GGUF file as
llama.cpp's `convert_hf_to_gguf.py` does -- the test's own rendering of its conventions: names
from gguf's `TensorNameMap`, Q/K rows (and biases) permuted for llama, Gemma's RMSNorm gains
stored as 1 + w, GPT-2's Conv1D weights transposed and its head copied from the embedding,
Llama 3 scaling written only as the `rope_freqs` divisors, and the metadata keys each converter
class writes. `gguf_import.load_gguf_checkpoint` must then read the same `ModelConfig` as the HF
path and give the transformers logits on a left-padded float32 batch at every real position.
Sliding windows are shorter than the batch and soft-caps small enough to bite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from infalign_jax.models import gguf_import, hf_config
from infalign_jax.models.gguf_import import CheckpointError, read_gguf
from hf_tiny import CONFIG_CLASSES, hf_logits as _hf_logits, left_padded_batch, \
    our_logits as _our_logits
from hf_tiny import save_tiny as _save_tiny

VOCAB = 96
LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
GPT2_BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
# llama.cpp's architecture for each model_type (convert_hf_to_gguf registers Mistral as llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2"}
# Gemma 3's local layers must use base 10000: llama.cpp hard-codes it.
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
# head_dim 32, base 1e4: wavelengths 6.3, 11, 20, 35, 63, 112, ... against bands at 64/4 and
# 64/1, so 2 pairs are unscaled, 3 interpolated and 11 divided by the factor.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

# name -> (model_type, config overrides, quantised GGUF type or None, extra GGUF metadata)
CASES = {
    "llama_biases_untied": ("llama", dict(attention_bias=True, mlp_bias=True,
                                          tie_word_embeddings=False), None, {}),
    "llama_linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear",
                                                             rope_theta=10000.0, factor=4.0)),
                          None, {}),
    "llama3_rope": ("llama", dict(head_dim=32, max_position_embeddings=128,
                                  rope_parameters=LLAMA3_ROPE), None, {}),
    # llama.cpp's converter does not record Mistral's window; a file that does (under
    # llama.attention.sliding_window) is read as Mistral.
    "mistral_window": ("mistral", dict(sliding_window=4, head_dim=16), None,
                       {"llama.attention.sliding_window": 4}),
    "qwen2": ("qwen2", {}, None, {}),
    "qwen2_q8_0": ("qwen2", {}, gguf.GGMLQuantizationType.Q8_0, {}),
    "qwen3": ("qwen3", dict(head_dim=24), None, {}),
    "gemma": ("gemma", dict(head_dim=16), None, {}),
    # query_pre_attn_scalar = head_dim: llama.cpp's scale for every Gemma 2/3 but the 27Bs
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0), None, {}),
    # 6 layers: llama.cpp makes every 6th layer global, so this has both kinds
    "gemma3": ("gemma3_text", dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=4, final_logit_softcapping=3.0,
                                   rope_parameters=GEMMA3_ROPE), None, {}),
    "gpt2": ("gpt2", {}, None, {}),
}


# ---------------------------------------------------------------- llama.cpp's converter, here


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """LlamaModel.permute: HF row h*D + j*D/2 + i goes to h*D + 2i + j."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _llama3_rope_freqs(config: dict) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: per frequency pair, the divisor llama.cpp applies."""
    rope = config["rope_parameters"]
    dim = config["head_dim"]
    freqs = 1.0 / (torch.tensor(rope["rope_theta"], dtype=torch.float32)
                   ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return np.asarray(out, np.float32)


def _metadata(w: gguf.GGUFWriter, config: dict) -> None:
    """The keys convert_hf_to_gguf's model classes write for this config."""
    t = config["model_type"]
    if t == "gpt2":   # GPT2Model.set_gguf_parameters
        w.add_block_count(config["n_layer"])
        w.add_context_length(config["n_positions"])
        w.add_embedding_length(config["n_embd"])
        w.add_feed_forward_length(4 * config["n_embd"])
        w.add_head_count(config["n_head"])
        w.add_layer_norm_eps(config["layer_norm_epsilon"])
        return
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if t in ("gemma", "gemma2"):   # GemmaModel / Gemma2Model write no RoPE keys
        if t == "gemma2":
            w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
            w.add_final_logit_softcapping(config["final_logit_softcapping"])
            w.add_sliding_window(config["sliding_window"])
        return
    rope = config["rope_parameters"]   # TextModel.set_gguf_parameters
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    w.add_rope_freq_base(full["rope_theta"])
    if "sliding_attention" in rope:
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if t in ("llama", "mistral"):   # LlamaModel
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    if t == "gemma3_text":   # Gemma3Model
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(config["final_logit_softcapping"])
        w.add_sliding_window(config["sliding_window"])


def _tensors(config: dict, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> the array the converter writes."""
    t, arch = config["model_type"], GGUF_ARCH[config["model_type"]]
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(enum, n_layers)
    out = {}
    for hf_name, w in state.items():
        if t.startswith("gemma") and hf_name == "lm_head.weight":
            continue   # Gemma*Model: llama.cpp ties the head
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if t in ("llama", "mistral") and ".q_proj." in hf_name:
            w = _permute(w, config["num_attention_heads"])
        elif t in ("llama", "mistral") and ".k_proj." in hf_name:
            w = _permute(w, config["num_key_value_heads"])
        if t.startswith("gemma") and hf_name.endswith("norm.weight"):
            w = w + 1   # Gemma RMSNorm multiplies by 1 + w; llama.cpp by the stored gain
        if t == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            w = w.T   # Conv1D (in, out) -> (out, in)
        out[name] = np.ascontiguousarray(w, np.float32)
        if t == "gpt2" and name == "token_embd.weight":
            out["output.weight"] = out[name]   # GPT2Model writes the tied head out
    if config.get("rope_parameters", {}).get("rope_type") == "llama3":
        out["rope_freqs.weight"] = _llama3_rope_freqs(config)
    return out


def _placeholder_vocabulary(w, config):
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(config["vocab_size"])])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf(directory, path, *, arch: str | None = None, quantise=None, kv=None,
               extra_tensors=None, drop=(), vocabulary=_placeholder_vocabulary) -> str:
    """GGUF file of the saved HF model in `directory`, as convert_hf_to_gguf writes it (F32, or
    every weight matrix in `quantise` as llama-quantize leaves it: norms and biases stay F32).
    `vocabulary(writer, config)` writes the tokenizer keys."""
    directory = pathlib.Path(directory)
    config = json.loads((directory / "config.json").read_text())
    state = load_file(str(directory / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch or GGUF_ARCH[config["model_type"]])
    w.add_name("tiny")
    _metadata(w, config)
    vocabulary(w, config)
    for key, value in (kv or {}).items():   # replaces what the converter wrote under `key`
        for shard in w.kv_data:
            shard.pop(key, None)
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    tensors = {**_tensors(config, state), **(extra_tensors or {})}
    for name, values in tensors.items():
        if name in drop:
            continue
        if quantise is not None and values.ndim == 2 and name.endswith(".weight"):
            w.add_tensor(name, gguf.quants.quantize(values, quantise), raw_dtype=quantise)
        else:
            w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ---------------------------------------------------------------------- the models and batch


def save_tiny(directory, model_type: str, overrides: dict, seed: int = 0):
    base = GPT2_BASE if model_type == "gpt2" else LLAMA_BASE
    config = getattr(transformers, CONFIG_CLASSES[model_type])(**{**base, **overrides})
    return _save_tiny(directory, config, seed)


def _batch():
    return left_padded_batch(VOCAB, low=3)


def _dequantised_reference(directory, qtype):
    """The transformers model with each weight matrix replaced by what the quantised file holds
    (the numbers llama.cpp multiplies with)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                w = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype),
                                                                qtype).reshape(w.shape)))
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
    model_type, overrides, qtype, kv = CASES[name]
    directory = save_tiny(tmp_path / "hf", model_type, overrides)
    path = write_gguf(directory, tmp_path / "m.gguf", quantise=qtype, kv=kv)
    start = time.perf_counter()
    cfg, params = gguf_import.load_gguf_checkpoint(path)
    # the GGUF path reads the model the HF path reads (eps went through float32)
    ref_cfg = hf_config.config_from_hf(json.loads((directory / "config.json").read_text()))
    assert cfg.norm_eps == pytest.approx(ref_cfg.norm_eps, rel=1e-6)
    assert dataclasses.replace(cfg, norm_eps=ref_cfg.norm_eps) == ref_cfg
    tokens, mask, positions = _batch()
    got = _our_logits(cfg, params, tokens, mask)
    load_s = time.perf_counter() - start
    original = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    want = _hf_logits(original, tokens, mask, positions)
    if qtype is None:
        err = np.abs(got - want)[mask].max()
        print(f"{name}: max |logit diff| = {err:.2e} (load + forward {load_s:.1f} s)")
        assert err <= 1e-4
        return
    # Quantised: exact against the numbers the file holds ...
    exact = _hf_logits(_dequantised_reference(directory, qtype), tokens, mask, positions)
    err = np.abs(got - exact)[mask].max()
    # ... and within the quantisation's reach of the float model. Q8_0 rounds each weight to a
    # step of max|w| / 127 over its 32-block: a uniform error of RMS step / sqrt(12), about 0.5%
    # of the weights' RMS here. About 9 weight matrices lie between a token and its logits
    # (embedding, 7 per layer on the residual path, the tied head); independent rounding errors
    # add in quadrature, so the logits move by about sqrt(9) * 0.5% = 1.5% of their RMS
    # (measured 1.4-1.5% over three seeds). Bound: twice that, and 6 times it for the largest
    # of the ~4,000 entries (a Gaussian's maximum over that many draws is ~3.8 sigma).
    drift = (got - want)[mask]
    rms = np.sqrt(np.mean(want[mask] ** 2))
    rms_drift = np.sqrt(np.mean(drift ** 2))
    print(f"{name}: max |logit diff| = {err:.2e} vs the dequantised weights; vs the float "
          f"model max {np.abs(drift).max():.2e}, RMS {rms_drift / rms:.2%} of the logits' RMS")
    assert err <= 1e-4
    assert rms_drift <= 0.03 * rms
    assert np.abs(drift).max() <= 6 * 0.03 * rms


def test_llama3_band_parameters_are_recovered(tmp_path):
    directory = save_tiny(tmp_path / "hf", "llama", dict(head_dim=32, max_position_embeddings=128,
                                                       rope_parameters=LLAMA3_ROPE))
    config, state = read_gguf(write_gguf(directory, tmp_path / "m.gguf"))
    assert config["rope_parameters"] == LLAMA3_ROPE
    assert "rope_freqs.weight" not in state


LLAMA31 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("rope,head_dim", [(LLAMA31, 128),                       # Llama 3.1
                                           ({**LLAMA31, "factor": 32.0}, 64),    # Llama 3.2 1B
                                           ({**LLAMA31, "factor": 32.0}, 128)])  # Llama 3.2 3B
def test_llama3_parameters_of_released_models_are_recovered(rope, head_dim):
    divisors = _llama3_rope_freqs({"head_dim": head_dim, "rope_parameters": rope})
    assert gguf_import.llama3_rope_from_freqs(divisors, rope["rope_theta"], head_dim) == rope
    # A recorded original context fixes the common scale of (orig, low, high), which cancels.
    half = gguf_import.llama3_rope_from_freqs(divisors, rope["rope_theta"], head_dim, 4096)
    assert half == {**rope, "original_max_position_embeddings": 4096, "low_freq_factor": 0.5,
                    "high_freq_factor": 2.0}


@pytest.mark.parametrize("model_type,layers", [("gemma2", 46), ("gemma3_text", 62)])
def test_gemma_27b_depth_takes_llama_cpps_query_scale(model_type, layers, tmp_path):
    """llama.cpp stores no query scale for Gemma 2/3: its 27B models (46 and 62 layers) scale
    by d_model / n_heads (Gemma 2 27B's query_pre_attn_scalar is 144 = 4608 / 32, its head_dim
    128), every other depth by head_dim. Here d_model / n_heads = 64 / 4 = 16, head_dim 8."""
    directory = save_tiny(tmp_path / "hf", model_type, dict(num_hidden_layers=layers, head_dim=8,
                                                          intermediate_size=8))
    config, _ = read_gguf(write_gguf(directory, tmp_path / "m.gguf"))
    assert (config["num_hidden_layers"], config["head_dim"]) == (layers, 8)
    assert config["query_pre_attn_scalar"] == 16


# -------------------------------------------------------------------------- refused by name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved tiny HF models, one per model_type a refusal test writes from."""
    root = tmp_path_factory.mktemp("saved")
    return {t: save_tiny(root / t, t, {"head_dim": 16} if t.startswith("gemma") else {})
            for t in ("llama", "qwen2", "gemma2", "gemma3_text")}


def test_unknown_architecture_is_refused_by_name(saved, tmp_path):
    path = write_gguf(saved["llama"], tmp_path / "m.gguf", arch="phi3")
    with pytest.raises(CheckpointError, match=r"m\.gguf: GGUF architecture 'phi3' is not "
                                              r"supported \(supported: llama, qwen2, qwen3, gemma, "
                                              r"gemma2, gemma3, gpt2\)"):
        read_gguf(path)


@pytest.mark.parametrize("model_type,key,value,match", [
    ("llama", "llama.rope.scaling.type", "yarn", "llama.rope.scaling.type='yarn'"),
    ("llama", "llama.attention.scale", 0.5, "llama.attention.scale=0.5"),
    ("llama", "llama.logit_scale", 0.5, "llama.logit_scale=0.5"),
    ("llama", "llama.expert_count", 8, "llama.expert_count=8"),
    ("llama", "llama.rope.scaling.attn_factor", 1.5, "llama.rope.scaling.attn_factor=1.5"),
    ("llama", "llama.rope.dimension_count", 8, "llama.rope.dimension_count=8.*partial RoPE"),
    ("llama", "llama.attention.causal", False, "llama.attention.causal=False"),
    ("llama", "adapter.type", "lora", "adapter.type='lora'"),
    ("llama", "split.count", 2, "split.count=2"),
    ("qwen2", "qwen2.attention.sliding_window", 4, "qwen2.attention.sliding_window=4"),
    ("gemma2", "gemma2.rope.freq_base_swa", 1000.0, "gemma2.rope.freq_base_swa=1000.0"),
    ("gemma3_text", "gemma3.rope.freq_base_swa", 1000.0, "gemma3.rope.freq_base_swa=1000.0"),
    ("gemma3_text", "gemma3.attention.sliding_window_pattern", 2,
     "gemma3.attention.sliding_window_pattern=2"),
    ("gemma3_text", "gemma3.attn_logit_softcapping", 2.0, "gemma3.attn_logit_softcapping=2.0"),
])
def test_unhandled_metadata_is_refused_by_name(saved, tmp_path, model_type, key, value, match):
    path = write_gguf(saved[model_type], tmp_path / "m.gguf", kv={key: value})
    with pytest.raises(CheckpointError, match=match):
        gguf_import.load_gguf_checkpoint(path)


def test_an_unknown_key_can_be_accepted_explicitly(saved, tmp_path):
    path = write_gguf(saved["llama"], tmp_path / "m.gguf", kv={"llama.my_note": "hello"})
    with pytest.raises(CheckpointError, match=r"llama\.my_note='hello'.*ignore_keys=\("
                                              r"'llama\.my_note',\)"):
        read_gguf(path)
    assert read_gguf(path, ignore_keys=("llama.my_note",))[0]["model_type"] == "llama"


@pytest.mark.parametrize("model_type,drop,extra,match", [
    # a bias the family has no switch for: Qwen2's MLP has none
    ("qwen2", (), {"blk.0.ffn_up.bias": np.zeros(96, np.float32)}, r"blk\.0\.ffn_up\.bias"),
    ("qwen2", ("blk.2.attn_v.bias",), {}, r"blk\.2\.attn_v\.bias.*v_proj\.bias.*missing"),
    # Gemma ties its head; llama.cpp's gemma2 has no output tensor
    ("gemma2", (), {"output.weight": np.zeros((VOCAB, 64), np.float32)}, r"output\.weight"),
    # only one pair between the bands: Llama 3's band parameters are not determined
    ("llama", (), {"rope_freqs.weight": np.array([1, 1, 1, 1, 2.5, 8, 8, 8], np.float32)},
     r"rope_freqs\.weight.*only 1 frequency pair"),
    ("llama", (), {"rope_freqs.weight": np.array([1, 8, 1, 2, 3, 8, 8, 8], np.float32)},
     r"rope_freqs\.weight.*not Llama 3 frequency bands"),
])
def test_unexpected_or_missing_tensors_are_refused_by_name(saved, tmp_path, model_type, drop,
                                                          extra, match):
    path = write_gguf(saved[model_type], tmp_path / "m.gguf", extra_tensors=extra, drop=drop)
    with pytest.raises(CheckpointError, match=match):
        read_gguf(path)


def test_linear_rope_on_top_of_llama3_is_refused(tmp_path):
    directory = save_tiny(tmp_path / "hf", "llama", dict(head_dim=32, max_position_embeddings=128,
                                                       rope_parameters=LLAMA3_ROPE))
    path = write_gguf(directory, tmp_path / "m.gguf", kv={"llama.rope.scaling.factor": 2.0})
    with pytest.raises(CheckpointError, match=r"llama\.rope\.scaling\.factor=2\.0.*on top of"):
        read_gguf(path)
