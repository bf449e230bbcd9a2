"""Model families and their options against transformers' PyTorch implementations.

For each family option: a tiny random transformers model (perturbed so every tensor matters) is
saved with `save_pretrained`, loaded with `hf_import.load_hf_checkpoint`, and compared on a
left-padded float32 batch (logits at real positions), by greedy decoding through our KV-cache
sampler against `generate`, and after export with `save_hf_checkpoint` and `from_pretrained`.
Sliding windows are shorter than the sequences, and soft-caps small enough to bite.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from infalign_jax import models
from infalign_jax.decoding import sampling
from infalign_jax.models import hf_config, hf_import
from infalign_jax.models.hf_config import CheckpointError
from hf_tiny import CONFIG_CLASSES, left_padded_batch, hf_logits as _hf_logits, our_logits as _our_logits, save_tiny

VOCAB = 97
LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
GPT2_BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                 eos_token_id=None)
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}

CASES = {
    "llama3_rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=5000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear",
                                                             rope_theta=10000.0, factor=4.0))),
    # max_position_embeddings below the sequence length, so the base grows with it
    "llama_dynamic_rope": ("llama", dict(max_position_embeddings=8, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral_window": ("mistral", dict(sliding_window=4, head_dim=16)),
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "qwen3_bias_window": ("qwen3", dict(head_dim=16, attention_bias=True, use_sliding_window=True,
                                        sliding_window=5, max_window_layers=0)),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("gemma3_text", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=4, rope_parameters=GEMMA3_ROPE,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": ("phi3", dict(pad_token_id=0)),
    "phi3_window": ("phi3", dict(sliding_window=4, num_key_value_heads=4)),
    "gpt2_untied": ("gpt2", dict(tie_word_embeddings=False)),
    "gpt2_inverse_layer_scale": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt2_unscaled": ("gpt2", dict(scale_attn_weights=False)),
    "gpt2_gelu_fast": ("gpt2", dict(activation_function="gelu_fast")),
    "gpt2_quick_gelu": ("gpt2", dict(activation_function="quick_gelu")),
    "gpt2_relu": ("gpt2", dict(activation_function="relu")),
    "gpt2_silu": ("gpt2", dict(activation_function="silu")),
}


def _hf_config(model_type: str, **kw):
    base = GPT2_BASE if model_type == "gpt2" else LLAMA_BASE
    return getattr(transformers, CONFIG_CLASSES[model_type])(**{**base, **kw})


def _save(tmp_path, model_type, kw, seed=0):
    return save_tiny(tmp_path, _hf_config(model_type, **kw), seed)


def _reload(path):
    """A fresh transformers model (dynamic rope keeps state between calls)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _batch():
    return left_padded_batch(VOCAB)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    model_type, kw = CASES[name]
    path = _save(tmp_path_factory.mktemp(name), model_type, kw)
    cfg, params = hf_import.load_hf_checkpoint(str(path))
    return name, path, cfg, params


def test_logits_match_transformers(case):
    name, path, cfg, params = case
    tokens, mask, positions = _batch()
    want = _hf_logits(_reload(path), tokens, mask, positions)
    err = np.abs(_our_logits(cfg, params, tokens, mask) - want)[mask].max()
    print(f"{name}: max |logit diff| = {err:.2e}")
    assert err < 1e-4


def test_first_layers_equal_transformers_loaded_with_fewer_layers(case):
    """`models.first_layers(cfg, params, 2)` is the checkpoint transformers loads with 2 of its
    3 layers (per-layer window types, gpt2's inverse-layer scale and rotary bases included)."""
    name, path, cfg, params = case
    config = transformers.AutoConfig.from_pretrained(path)
    setattr(config, "n_layer" if cfg.family == "gpt2" else "num_hidden_layers", 2)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:2]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, config=config).eval()
    tokens, mask, positions = _batch()
    cut_cfg, cut = models.first_layers(cfg, params, 2)
    assert cut_cfg.n_layers == 2 and len(cut_cfg.layer_types) in (0, 2)
    ours = _our_logits(cut_cfg, cut, tokens, mask)
    err = np.abs(ours - _hf_logits(theirs, tokens, mask, positions))[mask].max()
    assert err < 1e-4, (name, err)
    assert np.abs(ours - _our_logits(cfg, params, tokens, mask))[mask].max() > 1e-3


def test_greedy_decoding_equals_generate(case):
    name, path, cfg, params = case
    rng = np.random.default_rng(2)
    prompt = rng.integers(1, VOCAB, (2, 8))
    pmask = np.ones((2, 8), bool)
    pmask[0, :3] = False
    prompt[0, :3] = 0
    new = 12      # prompt + response well past every sliding window
    scfg = sampling.SamplingConfig(n=1, max_new_tokens=new, temperature=0.0)
    if cfg.rope_type == "dynamic":   # 8 + 12 > max_position_embeddings 8: no cached decoding
        with pytest.raises(ValueError, match="max_len 8"):    # equals the full forward there
            sampling.sample(models.decoder_fns(cfg), params, jnp.asarray(prompt),
                            jnp.asarray(pmask), jax.random.key(0), scfg)
        return       # within max_len: test_dynamic_rope_greedy_decoding_within_max_len
    out = jax.jit(lambda p: sampling.sample(models.decoder_fns(cfg), p, jnp.asarray(prompt),
                                            jnp.asarray(pmask), jax.random.key(0), scfg))(params)
    ours = np.asarray(out.tokens_BxNxL[:, 0])
    with torch.no_grad():
        ref = _reload(path).generate(
            input_ids=torch.tensor(prompt), attention_mask=torch.tensor(pmask.astype(np.int64)),
            max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            eos_token_id=None)[:, 8:].numpy()
    np.testing.assert_array_equal(ours, ref, err_msg=name)


def test_export_loads_in_transformers_with_the_same_logits(case, tmp_path):
    name, path, cfg, params = case
    hf_import.save_hf_checkpoint(str(tmp_path), cfg, params)
    tokens, mask, positions = _batch()
    want = _hf_logits(_reload(path), tokens, mask, positions)
    got = _hf_logits(_reload(tmp_path), tokens, mask, positions)
    assert np.abs(got - want)[mask].max() < 1e-5, name
    assert hf_config.config_from_hf(json.load(open(tmp_path / "config.json"))) == cfg


def test_gemma_legacy_gelu_is_the_tanh_form(tmp_path):
    """transformers reads Gemma 1's `hidden_act: "gelu"` as the tanh approximation."""
    path = _save(tmp_path, "gemma", dict(head_dim=16))
    config = json.loads((path / "config.json").read_text())
    config.pop("hidden_activation", None)
    config["hidden_act"] = "gelu"
    (path / "config.json").write_text(json.dumps(config))
    cfg, params = hf_import.load_hf_checkpoint(str(path))
    assert cfg.activation == "gelu_tanh"
    tokens, mask, positions = _batch()
    want = _hf_logits(_reload(path), tokens, mask, positions)
    assert np.abs(_our_logits(cfg, params, tokens, mask) - want)[mask].max() < 1e-4


# ------------------------------------------------------------------ every config key accounted


@pytest.mark.parametrize("model_type", hf_config.SUPPORTED)
def test_every_field_of_the_transformers_config_class_is_handled_or_inert(model_type):
    fields = set(_hf_config(model_type).to_dict())
    known = hf_config.HANDLED[model_type] | hf_config.INERT[model_type]
    assert not sorted(fields - known), f"{model_type}: fields neither handled nor inert"
    # and the default config of the class loads (nothing refused, nothing left over)
    hf_config.config_from_hf(_hf_config(model_type).to_dict())


@pytest.mark.parametrize("model_type,key,value,match", [
    ("llama", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     "rope_type 'yarn'"),
    ("llama", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4,
                                  "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", "rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0},
     "without 'low_freq_factor'"),
    ("gemma2", "use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("gpt2", "add_cross_attention", True, "add_cross_attention"),
    ("mistral", "attention_bias", True, "attention_bias=True"),      # not a Mistral field
    ("llama", "quantization_config", {"quant_method": "gptq"}, "quantization_config"),
    ("qwen2", "layer_types", ["full_attention", "chunked_attention", "full_attention"],
     "layer_types"),
    ("gpt2", "activation_function", "gelu_10", "activation_function='gelu_10'"),
    # transformers' Phi3Config takes longrope alone: linear / dynamic loaded here as a model
    # transformers refuses
    ("phi3", "rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
     "rope_type 'linear' for phi3"),
    ("phi3", "rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
     "rope_type 'dynamic' for phi3"),
    # transformers' Gemma 3 keeps the field but never caps: capping would be another model
    ("gemma3_text", "attn_logit_softcapping", 2.0,
     "attn_logit_softcapping=2.0 is not supported: transformers' Gemma 3 does not apply it"),
])
def test_forward_changing_keys_are_refused_by_name(model_type, key, value, match):
    config = _hf_config(model_type).to_dict()
    config[key] = value
    with pytest.raises(CheckpointError, match=match):
        hf_config.config_from_hf(config)


def test_a_legacy_rope_scaling_refusal_names_that_key():
    config = {**_hf_config("llama").to_dict(), "rope_parameters": None,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(CheckpointError, match=r"rope_scaling=\{'rope_type': 'yarn', 'factor': "
                                              r"4.0\} is not supported: rope_type 'yarn'"):
        hf_config.config_from_hf(config)


def test_an_unknown_key_can_be_accepted_explicitly():
    config = {**_hf_config("llama").to_dict(), "my_note": 3}
    with pytest.raises(CheckpointError, match=r"my_note=3.*ignore_keys=\('my_note',\)"):
        hf_config.config_from_hf(config)
    assert hf_config.config_from_hf(config, ignore_keys=("my_note",)).vocab_size == VOCAB


def test_export_refuses_a_mix_no_transformers_family_has():
    cfg = models.ModelConfig(qkv_bias=True, o_bias=True, sliding_window=4)
    with pytest.raises(CheckpointError, match="no transformers model_type"):
        hf_config.config_to_hf(cfg)
    gemma3 = models.ModelConfig(post_norms=True, qk_norm=True, embed_scale=True,
                                rmsnorm_unit_offset=True, attn_softcap=2.0)
    with pytest.raises(CheckpointError, match="transformers' Gemma 3 does not apply it"):
        hf_config.config_to_hf(gemma3)


def test_rope_per_layer_type_outside_gemma3_is_refused_both_ways():
    """transformers reads a rope per layer type (full_attention / sliding_attention) for Gemma 3
    only: a llama / mistral config.json holding one imported with the sliding layers' base and
    linear x4 while transformers ran default rope (max logit gap 6.41 / 3.81), and a mistral /
    qwen export with rope_local_theta loaded with base 10000 everywhere (gap 0.51) or not at
    all. Both directions are refused; Gemma 3 keeps its local base."""
    nested = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    for model_type, extra in (("llama", {}), ("mistral", {"sliding_window": 4})):
        config = {**_hf_config(model_type, **extra).to_dict(), "rope_parameters": nested}
        with pytest.raises(CheckpointError, match=r"rope_parameters=.* rope per layer type "
                                                  r".*gemma3_text only; '" + model_type):
            hf_config.config_from_hf(config)
    for kw in (dict(sliding_window=4), dict(qkv_bias=True, sliding_window=4,
                                            layer_types=("full", "sliding"))):
        cfg = models.ModelConfig(**kw, rope_local_theta=100.0)
        with pytest.raises(CheckpointError, match=r"these fields would change: "
                                                  r"\['rope_local_theta'\]"):
            hf_config.config_to_hf(cfg)
    # Read only by sliding layers: without any, the export drops it and loses nothing.
    plain = models.ModelConfig(rope_local_theta=100.0)
    assert "sliding_attention" not in json.dumps(hf_config.config_to_hf(plain))
    gemma3 = models.ModelConfig(post_norms=True, qk_norm=True, embed_scale=True,
                                rmsnorm_unit_offset=True, sliding_window=4,
                                layer_types=("sliding", "full"), rope_local_theta=100.0)
    hf = hf_config.config_to_hf(gemma3)
    assert hf["rope_parameters"]["sliding_attention"]["rope_theta"] == 100.0
    assert hf_config.config_from_hf(hf).rope_local_theta == 100.0


def test_gpt2_exports_are_checked_like_the_others():
    """GPT-2's export returned its model_type before the round-trip check: a window, softcaps, a
    query scalar, a mean-pooled reward or a head width other than d_model / n_heads exported
    without a word, and transformers loaded another model (logit gaps 2.7-10)."""
    base = dict(family="gpt2", vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                head_dim=8, d_ff=32, max_len=16, activation="gelu_tanh")
    assert hf_config.hf_model_type(models.ModelConfig(**base)) == "gpt2"
    for change, field in ((dict(sliding_window=3), "sliding_window"),
                          (dict(final_softcap=2.0), "final_softcap"),
                          (dict(attn_softcap=1.0), "attn_softcap"),
                          (dict(query_pre_attn_scalar=2.0), "query_pre_attn_scalar"),
                          (dict(heads=("reward",), reward_pool="mean"), "reward_pool"),
                          (dict(head_dim=4), "head_dim")):
        with pytest.raises(CheckpointError, match=rf"as 'gpt2' these fields would change: "
                                                  rf"\[.*'{field}'"):
            hf_config.config_to_hf(models.ModelConfig(**{**base, **change}))


def test_gemma3_rope_is_written_and_read_per_layer_type_only():
    """transformers' Gemma 3 reads the full_attention / sliding_attention dicts only: a Gemma 3
    without sliding layers exported a flat rope_parameters (transformers ran base 1e6: logit gap
    1.31), and a flat one was imported as written (0.48)."""
    gemma3 = models.ModelConfig(post_norms=True, qk_norm=True, embed_scale=True,
                                rmsnorm_unit_offset=True)
    rope = hf_config.config_to_hf(gemma3)["rope_parameters"]
    assert set(rope) == {"full_attention", "sliding_attention"}
    assert rope["full_attention"]["rope_theta"] == gemma3.rope_theta
    flat = {**_hf_config("gemma3_text").to_dict(),
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
    with pytest.raises(CheckpointError, match=r"gemma3_text reads rope_parameters per layer type"):
        hf_config.config_from_hf(flat)


def test_rope_scaling_and_rope_parameters_that_disagree_are_refused():
    """transformers reads rope_scaling alone when both are set; we merged them with
    rope_parameters winning (a default rope where transformers ran linear x4: gap 0.12)."""
    plain = _hf_config("llama").to_dict()
    for params, scaling, clash in (
            ({"rope_type": "default", "rope_theta": 10000.0},
             {"rope_type": "linear", "factor": 4.0}, "['factor', 'rope_type']"),
            ({"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0},
             {"rope_type": "linear", "factor": 2.0}, "['factor', 'rope_theta']")):
        config = {**plain, "rope_theta": 10000.0, "rope_parameters": params,
                  "rope_scaling": scaling}
        with pytest.raises(CheckpointError, match=r"rope_scaling and rope_parameters disagree on "
                                                  + re.escape(clash)):
            hf_config.config_from_hf(config)
    same = {**plain, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0},
            "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
    cfg = hf_config.config_from_hf(same)
    assert (cfg.rope_type, cfg.rope_factor) == ("linear", 4.0)


def test_a_window_on_every_layer_exports_as_it_is_written_out(tmp_path):
    """layer_types=() with a window means every layer slides; the export compared the raw tuple
    and refused it ('these fields would change: [layer_types]') while the same model written
    ('sliding', 'sliding') exported. Both export now, with transformers' logits."""
    kw = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
              d_ff=48, max_len=64, qkv_bias=True, sliding_window=4, init_std=0.3)
    implicit = models.ModelConfig(**kw)
    explicit = models.ModelConfig(**kw, layer_types=("sliding", "sliding"))
    assert hf_config.hf_model_type(implicit) == hf_config.hf_model_type(explicit) == "qwen2"
    params = models.init_params(implicit, jax.random.key(0))
    hf_import.save_hf_checkpoint(str(tmp_path), implicit, params)
    tokens, mask, positions = _batch()
    got = _hf_logits(_reload(tmp_path), tokens, mask, positions)
    ours = np.asarray(_our_logits(implicit, params, tokens, mask))
    assert np.abs(got - ours)[mask].max() < 1e-4


# ------------------------------------------------------------------ reward models, tokenizer


def _save_scorer(path, model_type, kw, seed=3, num_labels=1):
    config = _hf_config(model_type, **kw, num_labels=num_labels, pad_token_id=0)
    return save_tiny(path, config, seed, auto=transformers.AutoModelForSequenceClassification)


def _padded_batch():
    """Left- and right-padded rows with pad id 0 only at padding (transformers scores the
    rightmost non-pad token)."""
    tokens, mask, _ = _batch()
    mask[1, 10:] = False
    return np.where(mask, tokens, 0), mask


def _hf_scores(path, tokens, mask):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)   # real positions (GPT-2's are absolute)
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions),
                     attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()[:, 0]


@pytest.mark.parametrize("model_type,kw", [("llama", {}), ("qwen3", dict(head_dim=16)),
                                           ("gemma2", dict(head_dim=16, sliding_window=4)),
                                           ("gpt2", {})])
def test_sequence_classifier_is_a_reward_model_with_the_same_scores(tmp_path, model_type, kw):
    path = _save_scorer(tmp_path / "rm", model_type, kw)
    cfg, params = hf_import.load_hf_checkpoint(str(path))
    assert cfg.heads == ("reward",)
    tokens, mask = _padded_batch()
    want = _hf_scores(path, tokens, mask)
    got = np.asarray(models.apply(params, jnp.asarray(tokens), cfg,
                                  attention_mask_BxT=jnp.asarray(mask)).reward)
    print(f"{model_type} scorer: max |score diff| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4)
    # exported back as a sequence classifier, transformers gives the same scores
    hf_import.save_hf_checkpoint(str(tmp_path / "out"), cfg, params, pad_token_id=0)
    np.testing.assert_allclose(_hf_scores(tmp_path / "out", tokens, mask), want, atol=1e-5)


def test_a_classifier_with_two_labels_is_refused(tmp_path):
    path = _save_scorer(tmp_path, "llama", {}, num_labels=2)
    with pytest.raises(CheckpointError, match="2 labels; a reward model has one"):
        hf_import.load_hf_checkpoint(str(path))


def test_export_refuses_what_transformers_cannot_hold(tmp_path):
    cfg = models.ModelConfig(vocab_size=VOCAB, heads=("reward",))
    params = models.init_params(cfg, jax.random.key(0))
    with pytest.raises(CheckpointError, match="needs pad_token_id"):
        hf_import.save_hf_checkpoint(str(tmp_path), cfg, params)
    params = {**params, "reward_head_bias": jnp.ones((1,))}
    with pytest.raises(CheckpointError, match="reward head has a bias"):
        hf_import.save_hf_checkpoint(str(tmp_path), cfg, params, pad_token_id=0)
    cfg = models.ModelConfig(vocab_size=VOCAB, heads=("lm", "value"))
    with pytest.raises(CheckpointError, match=r"heads \('lm', 'value'\) have no transformers"):
        hf_import.save_hf_checkpoint(str(tmp_path), cfg, models.init_params(cfg, jax.random.key(0)))


def _word_tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>")


@pytest.mark.parametrize("name", ["llama3_rope", "gpt2_untied", "gemma2"])
def test_export_writes_the_tokenizer_and_its_special_ids(name, tmp_path):
    cfg, params = hf_import.load_hf_checkpoint(str(_save(tmp_path / "src", *CASES[name])))
    tmp_path = tmp_path / "out"
    tokenizer = _word_tokenizer()
    hf_import.save_hf_checkpoint(str(tmp_path), cfg, params, tokenizer=tokenizer)
    back = hf_import.load_tokenizer(str(tmp_path))
    text = "w5 w17 w96 w2"
    assert back(text)["input_ids"] == tokenizer(text)["input_ids"] == [5, 17, 96, 2]
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"]) == (0, 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.eos_token_id == 1


def test_an_export_killed_while_writing_the_tokenizer_leaves_the_old_files_whole(tmp_path):
    cfg, params = hf_import.load_hf_checkpoint(str(_save(tmp_path / "src", *CASES["llama3_rope"])))
    out = tmp_path / "out"
    hf_import.save_hf_checkpoint(str(out), cfg, params, tokenizer=_word_tokenizer())
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class KilledWhileSaving:   # the export of a second run dies inside save_pretrained
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def save_pretrained(self, directory):
            with open(os.path.join(directory, "tokenizer.json"), "w") as f:
                f.write('{"torn')
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        hf_import.save_hf_checkpoint(str(out), cfg, params,
                                     tokenizer=KilledWhileSaving(_word_tokenizer()))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    text = "w5 w17 w96 w2"
    assert hf_import.load_tokenizer(str(out))(text)["input_ids"] == [5, 17, 96, 2]


# ------------------------------------------------- keys config.json leaves out: transformers' defaults


def _wide_config(model_type: str) -> dict:
    """A full config dict whose values differ from the class defaults (32 heads so that every
    class's default key-value head count divides them)."""
    if model_type == "gpt2":
        kw = dict(n_embd=256, n_head=32, n_inner=80, n_positions=48, layer_norm_epsilon=1e-4)
    else:
        kw = dict(hidden_size=256, num_attention_heads=32, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=48, rms_norm_eps=1e-4)
        if model_type in ("mistral", "phi3"):
            kw.update(sliding_window=5)
        if model_type in ("qwen2", "qwen3"):
            kw.update(use_sliding_window=True, sliding_window=5, max_window_layers=1)
        if model_type in ("gemma2", "gemma3_text"):   # Gemma 3 applies no attention cap
            kw.update(sliding_window=5, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                      attn_logit_softcapping=2.0 if model_type == "gemma2" else None)
    return _hf_config(model_type, **kw).to_dict()


@pytest.mark.parametrize("model_type", hf_config.SUPPORTED)
def test_a_key_missing_from_config_json_loads_as_transformers_fills_it(model_type):
    """Each handled key left out of config.json: our config equals the one we read from what
    transformers' config class fills in for it (its defaults), or the load is refused by name."""
    cls = getattr(transformers, CONFIG_CLASSES[model_type])
    full = _wide_config(model_type)
    for key in sorted(hf_config.HANDLED[model_type] & set(full)):
        missing = {k: v for k, v in full.items() if k != key}
        try:
            ours = hf_config.config_from_hf(missing)
        except CheckpointError:   # refused, with the key named (e.g. a required size)
            continue
        filled = cls(**{k: v for k, v in missing.items() if k != "model_type"}).to_dict()
        assert ours == hf_config.config_from_hf(filled), (model_type, key)


def test_gemma2_soft_caps_missing_from_config_json_are_transformers_defaults():
    """A Gemma 2 config.json without the soft-cap keys is capped as transformers' Gemma2Config
    caps it; an explicit null is off; Gemma 3 keeps its own defaults (read from transformers)."""
    for model_type, cls in (("gemma2", transformers.Gemma2Config),
                            ("gemma3_text", transformers.Gemma3TextConfig)):
        defaults = cls()
        full = _wide_config(model_type)
        missing = {k: v for k, v in full.items()
                   if k not in ("attn_logit_softcapping", "final_logit_softcapping")}
        cfg = hf_config.config_from_hf(missing)
        assert cfg.attn_softcap == (defaults.attn_logit_softcapping or 0.0), model_type
        assert cfg.final_softcap == (defaults.final_logit_softcapping or 0.0), model_type
        off = hf_config.config_from_hf({**missing, "attn_logit_softcapping": None,
                                        "final_logit_softcapping": None})
        assert off.attn_softcap == off.final_softcap == 0.0
    assert transformers.Gemma2Config().final_logit_softcapping   # the gemma2 case bites


def test_dynamic_rope_greedy_decoding_within_max_len_equals_generate(tmp_path):
    """Dynamic rope sampled right up to max_position_embeddings equals `generate` (past it the
    sampler refuses: transformers' cached decoding there differs from its own full forward)."""
    path = _save(tmp_path, "llama", dict(max_position_embeddings=20, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)))
    cfg, params = hf_import.load_hf_checkpoint(str(path))
    assert cfg.rope_type == "dynamic" and cfg.max_len == 20
    rng = np.random.default_rng(2)
    prompt = rng.integers(1, VOCAB, (2, 8))
    pmask = np.ones((2, 8), bool)
    pmask[0, :3] = False
    prompt[0, :3] = 0
    scfg = sampling.SamplingConfig(n=1, max_new_tokens=12, temperature=0.0)   # 8 + 12 = 20
    out = sampling.sample(models.decoder_fns(cfg), params, jnp.asarray(prompt),
                          jnp.asarray(pmask), jax.random.key(0), scfg)
    with torch.no_grad():
        ref = _reload(path).generate(
            input_ids=torch.tensor(prompt), attention_mask=torch.tensor(pmask.astype(np.int64)),
            max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
            eos_token_id=None)[:, 8:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens_BxNxL[:, 0]), ref)


def test_a_rope_key_set_to_null_reads_as_left_out():
    """`rope_parameters` with `"rope_theta": null` (or a null factor) loads as if the key were
    absent, as a null top-level key does; it was a bare TypeError from float(None)."""
    config = _hf_config("llama").to_dict()
    theta = float(hf_config.config_from_hf(config).rope_theta)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": None}
    assert float(hf_config.config_from_hf(config).rope_theta) == theta
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1e4, "factor": None}
    assert float(hf_config.config_from_hf(config).rope_factor) == 1.0


def test_tensors_the_config_never_reads_are_refused_by_name(tmp_path):
    """A checkpoint whose tensors hold biases its config.json switches off loaded without a word
    and computed another model (logits 2.64 off the writer's); an unrelated tensor was dropped
    too. Both are refused naming the tensors; buffers transformers recomputes are not."""
    from safetensors.numpy import load_file, save_file
    path = _save(tmp_path / "biased", "llama", dict(attention_bias=True, mlp_bias=True))
    config = json.load(open(path / "config.json"))
    json.dump({**config, "attention_bias": False, "mlp_bias": False},
              open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"21 tensors this config never reads .*"
                                              r"'model.layers.0.mlp.down_proj.bias'"):
        hf_import.load_hf_checkpoint(str(path))
    json.dump(config, open(path / "config.json", "w"))
    cfg, _ = hf_import.load_hf_checkpoint(str(path))          # as written: loads
    state = load_file(str(path / "model.safetensors"))
    inv = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    save_file({**state, **inv}, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf_import.load_hf_checkpoint(str(path))                   # a recomputed buffer: fine
    extra = {"model.layers.1.self_attn.extra_scale": np.ones(4, np.float32)}
    save_file({**state, **extra}, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensors .*extra_scale"):
        hf_import.load_hf_checkpoint(str(path))
