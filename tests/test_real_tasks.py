"""Real offline tasks: shipped prompt files, task registry, prompt encoding, SmolLM2 smoke run."""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.rewards import judges
from infalign_jax import models
from infalign_jax.rl.tasks import real
from infalign_jax.decoding import sampling
from infalign_jax.data import tokenize


@pytest.mark.parametrize("name,prefix", [("helpfulness", "help-"), ("harmlessness", "harm-")])
def test_prompt_files_parse_with_unique_ids(name, prefix):
    task = real.get_real_task(name)
    with open(task.prompts_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert 40 <= len(rows) <= 60
    ids, texts = real.load_prompts(task.prompts_path)
    assert ids == [r["id"] for r in rows] and texts == [r["prompt"] for r in rows]
    assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts)
    assert all(i.startswith(prefix) for i in ids)
    assert real.task_prompts(name, 3) == (ids[:3], texts[:3])


def test_task_registry_and_validation():
    help_task = real.get_real_task("helpfulness")
    harm_task = real.get_real_task("harmlessness")
    assert (help_task.judge, help_task.procedure) == ("vader", "bon")
    assert (harm_task.judge, harm_task.procedure) == ("harmlessness", "won")
    assert harm_task.reward_model_id == judges.get_judge("harmlessness").name
    with pytest.raises(ValueError,
                       match="unknown real task 'summaries'.*harmlessness, helpfulness"):
        real.get_real_task("summaries")
    with pytest.raises(ValueError, match="RealTask.procedure must be one of"):
        real.RealTask("t", "p.jsonl", judge="vader", procedure="best")
    with pytest.raises(ValueError, match="RealTask.judge 'bleu' is not a known judge"):
        real.RealTask("t", "p.jsonl", judge="bleu", procedure="bon")
    with pytest.raises(ValueError, match="RealTask.max_new_tokens"):
        real.RealTask("t", "p.jsonl", judge="vader", procedure="bon", max_new_tokens=0)
    with pytest.raises(ValueError, match="RealTask.prompts_file must be a .jsonl"):
        real.RealTask("t", "p.txt", judge="vader", procedure="bon")
    with pytest.raises(ValueError, match=r"num_prompts must be an integer in \[1, 48\]"):
        real.task_prompts("helpfulness", 49)
    # a task config's count is named as the config key (calibrate and training reach it here)
    with pytest.raises(ValueError, match=r"^config.task.num_prompts must be an integer in "
                                         r"\[1, 48\] for task 'helpfulness', got 100"):
        real.task_split("helpfulness", 100, 4, real.sources.PromptsConfig(), say=None)


@pytest.mark.parametrize("content,message", [
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n',
     r":2: duplicate id 'a' \(first on line 1\)"),
    ('{"id": "a", "prompt": "x"}\n\n{"id": "b" "prompt": "y"}\n', r":3: not valid JSON"),
    ('{"id": "a", "text": "x"}\n', r":1: expected an object with exactly the keys"),
    ('{"id": 3, "prompt": "x"}\n', r":1: 'id' must be a non-empty string"),
    ('{"id": "a", "prompt": "  "}\n', r":1: 'prompt' must be a non-empty string"),
    ('\n\n', r": no prompts"),
])
def test_load_prompts_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        real.load_prompts(str(path))


class _FakeTokenizer:
    """Chat template = [7, 8] + one token per character + [9]; pad 0, end-of-turn 5."""

    pad_token_id = 0
    unk_token_id = 1
    eos_token_id = 2

    def convert_tokens_to_ids(self, token):
        return 5 if token == "<|im_end|>" else self.unk_token_id

    def apply_chat_template(self, messages, add_generation_prompt):
        assert add_generation_prompt and messages[0]["role"] == "user"
        return {"input_ids": [7, 8] + [ord(c) for c in messages[0]["content"]] + [9]}

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


@pytest.mark.parametrize("known, eos, pad, expected", [
    ({"<end_of_turn>": 6}, 2, 0, (6, 0)),                   # Gemma's end of turn
    ({"<|eot_id|>": 4, "<|end|>": 3}, 2, None, (4, 4)),     # Llama 3's first; pad falls back
    ({}, 2, 0, (2, 0)),                                     # no chat format known: EOS
])
def test_special_ids_find_each_chat_formats_end_of_turn(known, eos, pad, expected):
    tok = _FakeTokenizer()
    tok.convert_tokens_to_ids = lambda token: known.get(token, tok.unk_token_id)
    tok.eos_token_id, tok.pad_token_id = eos, pad
    assert tokenize.special_ids(tok) == expected
    tok.eos_token_id = None
    if known:
        assert tokenize.special_ids(tok)[0] == expected[0]
    else:
        with pytest.raises(ValueError, match="no end-of-turn token .* and no EOS token"):
            tokenize.special_ids(tok)


def test_encode_prompts_left_pads():
    tok = _FakeTokenizer()
    prompt_BxP, mask_BxP = tokenize.encode_prompts(tok, ["hi", "hello"])
    np.testing.assert_array_equal(prompt_BxP, [[0, 0, 0, 7, 8, 104, 105, 9],
                                               [7, 8, 104, 101, 108, 108, 111, 9]])
    np.testing.assert_array_equal(mask_BxP, [[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    raw_BxP, raw_mask = tokenize.encode_prompts(tok, ["ab", "c"], use_chat_template=False)
    np.testing.assert_array_equal(raw_BxP, [[97, 98], [0, 99]])
    np.testing.assert_array_equal(raw_mask, [[1, 1], [0, 1]])
    assert tokenize.special_ids(tok) == (5, 0)
    scfg = real.sampling_config(real.get_real_task("helpfulness"), tok, n=3)
    assert (scfg.n, scfg.max_new_tokens, scfg.eos_id, scfg.pad_id) == (3, 48, 5, 0)


@pytest.mark.slow
def test_helpfulness_smoke_with_smollm2():
    start = time.perf_counter()
    cfg, params, tokenizer, ids, prompt_BxP, mask_BxP, judge = real.load_real_task(
        "helpfulness", num_prompts=2)
    load_s = time.perf_counter() - start
    _, texts = real.task_prompts("helpfulness", 2)
    assert ids == ["help-000", "help-001"] and prompt_BxP.shape[0] == 2
    for row, mask, text in zip(prompt_BxP, mask_BxP, texts):
        decoded = tokenizer.decode(row[mask].tolist())
        assert text in decoded and decoded.endswith("<|im_start|>assistant\n")
        assert mask[-1] and not mask[:np.argmax(mask)].any()  # left padding only

    task = real.get_real_task("helpfulness")
    scfg = real.sampling_config(task, tokenizer, n=2, max_new_tokens=8)
    fns = models.decoder_fns(cfg)
    out = jax.jit(lambda p, r: sampling.sample(fns, p, jnp.asarray(prompt_BxP),
                                               jnp.asarray(mask_BxP), r, scfg))(
        params, jax.random.key(0))
    tokens_RxL = np.asarray(out.tokens_BxNxL).reshape(4, -1)
    mask_RxL = np.asarray(out.mask_BxNxL).reshape(4, -1)
    assert tokens_RxL.shape == (4, 8) and mask_RxL.sum() > 0

    detokenize = tokenize.detokenizer(tokenizer)
    responses = [detokenize(t[m]) for t, m in zip(tokens_RxL, mask_RxL)]
    prompts = [texts[i] for i in (0, 0, 1, 1)]
    scores = judge(prompts, responses)
    assert scores.shape == (4,) and np.all(np.isfinite(scores)) and np.all(np.abs(scores) <= 1)
    # the same numbers through the jitted bridge the RL step uses
    reward_fn = jax.jit(judges.text_reward_fn(judge, detokenize, texts))
    bridged = reward_fn(None, jnp.array([0, 0, 1, 1]), jnp.asarray(tokens_RxL),
                        jnp.asarray(mask_RxL))
    np.testing.assert_array_equal(np.asarray(bridged), scores)
    print(f"\nload_real_task(helpfulness, 2): {load_s:.1f} s; responses: {responses}; "
          f"scores: {scores}")
