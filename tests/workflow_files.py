"""The tiny files the workflow tests build: Llama policy / sequence-classifier directories saved
with `save_pretrained`, each with its own word-level tokenizer (the reward model's maps the same
words to other ids and adds a [CLS] token, so a reward computed on the policy's token ids would be
wrong), and a prompt JSONL (the `dirs` fixture); `transformers_scores` is the reward model's own
score of a text in transformers. Nothing is downloaded."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from hf_tiny import save_tiny
from infalign_jax.infra.config_utils import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = [f"w{i}" for i in range(3, 40)]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None)


def _tokenizer(vocab: dict[str, int], **special):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token=special["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if "cls_token" in special:  # the reward model's tokenizer starts every text with [CLS]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def policy_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    return _tokenizer(vocab, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def rm_tokenizer():
    perm = np.random.default_rng(7).permutation(len(WORDS))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{WORDS[j]: 3 + i for i, j in enumerate(perm)},
             "extra": 3 + len(WORDS)}
    return _tokenizer(vocab, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]")


def save_policy(directory) -> str:
    """A tiny Llama causal LM with the policy tokenizer, saved to `directory`."""
    tok = policy_tokenizer()
    path = save_tiny(str(directory), transformers.LlamaConfig(
        vocab_size=len(tok), pad_token_id=0, eos_token_id=1, tie_word_embeddings=False, **TINY))
    tok.save_pretrained(path)
    return path


def save_reward_model(directory, seed: int) -> str:
    """A tiny one-label Llama sequence classifier with the reward-model tokenizer."""
    tok = rm_tokenizer()
    path = save_tiny(str(directory), transformers.LlamaConfig(
        vocab_size=len(tok), pad_token_id=0, num_labels=1, **TINY), seed=seed,
        auto=transformers.AutoModelForSequenceClassification)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    policy = save_policy(root / "policy")
    rms = [save_reward_model(root / f"rm{seed}", seed) for seed in (1, 2)]
    rng = np.random.default_rng(0)
    rows = [{"id": f"p{i}", "prompt": " ".join(rng.choice(WORDS, 3 + i % 4))} for i in range(12)]
    rows.append({"id": "dup", "prompt": rows[3]["prompt"]})  # the same prompt under another id
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return dict(policy=policy, rm=rms[0], rm2=rms[1], prompts=str(prompts), rows=rows)


def transformers_scores(rm_dir: str, texts: list[str]) -> np.ndarray:
    """The reward model's score of each text, one unpadded text at a time, in transformers."""
    tok = transformers.AutoTokenizer.from_pretrained(rm_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        return np.array([float(model(**tok(t, return_tensors="pt")).logits[0, 0])
                         for t in texts])


REAL_TASK_SPEC = "task=helpfulness,size=tiny"   # configs/ctrl_real.py's argument


def real_task_overrides(dirs, *, lora_rank: int = 0, export_hf: bool = False) -> dict:
    """`real_task_config`'s changes to configs/ctrl_real.py, by dotted key (`--config.<key>`
    flags for a command on the same config)."""
    return {"task.policy.checkpoint": dirs["policy"], "task.reward.kind": "hf",
            "task.reward.checkpoint": dirs["rm"], "task.data.prompts": dirs["prompts"],
            "task.num_prompts": 4, "task.eval_prompts": 2, "task.eval_samples": 0,
            "task.max_new_tokens": 5, "rl.max_new_tokens": 5, "reference.k": 4,
            "rl.samples_per_prompt": 2, "rl.learning_rate": 1e-2, "rl.lora.rank": lora_rank,
            **({"rl.lora.alpha": 8.0} if lora_rank else {}),   # read with adapters only
            "train.num_steps": 2, "train.batch_size": 2,
            "train.tensorboard": False, "export.hf": export_hf}


def real_task_config(dirs, *, lora_rank: int = 0, export_hf: bool = False,
                     extra: dict | None = None):
    """configs/ctrl_real.py on the tiny files: the policy dir, the first reward model, the prompt
    file (4 training / 2 evaluation prompts, no in-run evaluation), 2 steps of 2 prompts x 2
    samples of 5 tokens, K = 4, a learning rate large enough that 2 steps move the logits;
    `extra`: further changes by dotted key (e.g. {"mesh.data": 2})."""
    c = load_config_module(os.path.join(ROOT, "configs", "ctrl_real.py")).get_config(
        REAL_TASK_SPEC)
    c.unlock()
    for key, value in {**real_task_overrides(dirs, lora_rank=lora_rank, export_hf=export_hf),
                       **(extra or {})}.items():
        *path, name = key.split(".")
        section = c
        for part in path:
            section = section[part]
        section[name] = value
    c.lock()
    return c


def as_flags(overrides: dict) -> list:
    """`--config.<key>=<value>` flags for dotted-key config changes."""
    return [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in overrides.items()]
