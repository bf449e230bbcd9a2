"""The researcher's workflow (issue 18): their policy, reward model and prompts from one config.

Everything is built by the tests (`workflow_files`): tiny Llama policy / sequence-classifier
directories, each with its own tokenizer, and a prompt JSONL. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import os
import shutil

import jax
import numpy as np
import pytest
import transformers
import torch

from infalign_jax.core.calibration import load_reference_table
from infalign_jax.core.types import HostReward
from infalign_jax.data import readers
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.infra.metrics_io import read_jsonl
from infalign_jax.rewards import hf_reward, judges
from infalign_jax.rl.tasks import real, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from workflow_files import WORDS, real_task_config, transformers_scores

# ------------------------------------------------------------------------------------ policy
def test_policy_from_a_transformers_directory(dirs):
    p = sources.load_policy(sources.PolicyConfig(dirs["policy"]))
    assert p.model_cfg.heads == ("lm",) and p.source == dirs["policy"]
    assert p.tokenizer("w3 w5")["input_ids"] == [3, 5] and p.tokenizer.eos_token_id == 1
    with pytest.raises(ValueError, match=r"config.task.policy.checkpoint: .*not a causal LM"):
        sources.load_policy(sources.PolicyConfig(dirs["rm"]))


def _policy_gguf(directory: str, path) -> str:
    """The policy directory as a llama GGUF file (tensors as convert_hf_to_gguf writes them), its
    vocabulary as a sentencepiece-style token list (enough to decode; encoding is SmolLM2's job
    in the slow tests)."""
    import test_gguf_families as tg

    def vocabulary(w, config):
        words = ["\u2581" + word for word in WORDS]
        w.add_tokenizer_model("llama")
        w.add_token_list(["<pad>", "<eos>", "<unk>"] + words)
        w.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(words))])
        w.add_token_types([3, 3, 2] + [1] * len(words))
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_unk_token_id(2)
    return tg.write_gguf(directory, path, arch="llama", vocabulary=vocabulary)


def test_policy_from_a_gguf_file_with_its_tokenizer(dirs, tmp_path):
    hf = sources.load_policy(sources.PolicyConfig(dirs["policy"]))
    path = _policy_gguf(dirs["policy"], tmp_path / "policy.gguf")
    p = sources.load_policy(sources.PolicyConfig(path))
    assert p.source == path and p.model_cfg.n_layers == hf.model_cfg.n_layers == 2
    for a, b in zip(jax.tree.leaves(p.params), jax.tree.leaves(hf.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert (p.tokenizer.eos_token_id, p.tokenizer.pad_token_id) == (1, 0)
    assert p.tokenizer.decode([5, 7, 1], skip_special_tokens=True).strip() == "w5 w7"


def test_policy_and_gguf_path_keys(dirs, tmp_path):
    with pytest.raises(ValueError, match=r"config.task.policy.checkpoint: no such file"):
        real.parse_section({"policy": {"checkpoint": str(tmp_path / "missing")}})
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"config.task.policy.checkpoint: .* not a .gguf file"):
        real.parse_section({"policy": {"checkpoint": str(tmp_path / "notes.txt")}})
    with pytest.raises(ValueError, match=r"config.task.policy.checkpoint: directory .* no "
                                         r"config.json .* not a run directory"):
        real.parse_section({"policy": {"checkpoint": str(tmp_path)}})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    # a FutureWarning: a DeprecationWarning is not shown to a command's user
    with pytest.warns(FutureWarning, match="config.task.policy.checkpoint"):
        s = real.parse_section({"gguf_path": str(gguf)})
    assert s.policy.checkpoint == str(gguf)
    with pytest.raises(ValueError, match="config.task.gguf_path is deprecated and conflicts"):
        real.parse_section({"gguf_path": str(gguf), "policy": {"checkpoint": dirs["policy"]}})


# ------------------------------------------------------------------------------------ reward
@pytest.mark.parametrize("padding,batch_size", [("right", 3), ("left", 2)])
def test_hf_reward_equals_transformers_on_the_reencoded_text(dirs, padding, batch_size):
    judge = hf_reward.SequenceClassifierJudge(dirs["rm"], padding=padding, batch_size=batch_size)
    prompts = [r["prompt"] for r in dirs["rows"][:5]]
    responses = ["w4 w9", "", "w30 w31 w32 w33 w34 w35", "w3", "w7 w7 w7"]
    texts = [f"{p}\n{r}" for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(judge(prompts, responses),
                               transformers_scores(dirs["rm"], texts), atol=2e-5)
    assert re.fullmatch(r"hf:rm1#[0-9a-f]{16}\|max_len=512\|last_not_pad=0", judge.id)
    assert judge.truncated == 0


def test_hf_reward_padding_with_eos_is_read_where_transformers_reads(tmp_path):
    """A reward model whose config pads with its EOS, and a template that ends the text with it:
    transformers reads the score at the last token that is not the pad id (before the EOS), so
    must the judge (it read the EOS itself: -0.42 for -0.41 in the review's case)."""
    from hf_tiny import save_tiny
    from workflow_files import TINY, _tokenizer
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = _tokenizer(vocab, pad_token="<eos>", eos_token="<eos>", unk_token="<unk>")
    path = save_tiny(str(tmp_path / "rm_eos"), transformers.LlamaConfig(
        vocab_size=len(vocab), pad_token_id=1, eos_token_id=1, num_labels=1, **TINY), seed=3,
        auto=transformers.AutoModelForSequenceClassification)
    tok.save_pretrained(path)
    template = "{prompt} {response} <eos>"
    prompts, responses = ["w5 w6 w7", "w9", "w4"], ["w10 w11", "w12 w13 w14 w15", "w8 <eos>"]
    texts = [template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
    for padding in ("right", "left"):
        judge = hf_reward.SequenceClassifierJudge(path, template=template, padding=padding,
                                                  batch_size=2)
        np.testing.assert_allclose(judge(prompts, responses), transformers_scores(path, texts),
                                   atol=2e-5)


def test_hf_reward_truncates_on_the_left_and_counts(dirs):
    judge = hf_reward.SequenceClassifierJudge(dirs["rm"], max_len=5, template="Q {prompt} A "
                                              "{response}")
    long_text = "Q w3 w4 w5 w6 A w7 w8"
    ids = judge.encode(["w3 w4 w5 w6"], ["w7 w8"])[0]
    assert len(ids) == 5 and judge.truncated == 1
    tok = transformers.AutoTokenizer.from_pretrained(dirs["rm"])
    assert ids == tok(long_text)["input_ids"][-5:]   # the end (the response) is kept
    # a text of exactly max_len ids is whole: neither cut nor counted
    exact = tok("Q w3 A w7")["input_ids"]
    assert len(exact) == 5
    assert judge.encode(["w3"], ["w7"])[0] == exact and judge.truncated == 1
    with pytest.raises(ValueError, match=r"config.task.reward.template must be"):
        hf_reward.SequenceClassifierJudge(dirs["rm"], template="{prompt}",
                                          where="config.task.reward")


def test_a_chat_template_is_scored_as_transformers_applies_it(dirs, tmp_path):
    """A chat template that writes the BOS itself (Llama 3, Gemma): the rendered text was encoded
    with tokenizer(text), which added the BOS a second time (scores -0.0513 / 0.3331 for
    transformers' -0.1070 / 0.3526). The template also enters the reward's id, so a reference
    table scored under another template is not reused."""
    path = str(tmp_path / "rm_chat")
    shutil.copytree(dirs["rm"], path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.bos_token = "[CLS]"
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(path)
    judge = hf_reward.SequenceClassifierJudge(path)   # template "auto": the chat template
    assert judge.template == "chat"
    prompts, responses = ["w3 w4 w5", "w6"], ["w7 w8", "w9 w10 w11"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    want = []
    for p, r in zip(prompts, responses):
        ids = tok.apply_chat_template([{"role": "user", "content": p},
                                       {"role": "assistant", "content": r}], tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert judge.encode([p], [r])[0] == [int(i) for i in ids]
        with torch.no_grad():
            want.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    np.testing.assert_allclose(judge(prompts, responses), want, atol=2e-5)
    plain = hf_reward.SequenceClassifierJudge(path, template=hf_reward.DEFAULT_TEMPLATE)
    other = hf_reward.SequenceClassifierJudge(path, template="Q {prompt} A {response}")
    assert len({judge.id, plain.id, other.id}) == 3 and "template=" not in plain.id


def test_reward_templates_and_lengths_the_model_cannot_take_are_refused(tmp_path):
    """A template field other than prompt / response raised a bare KeyError at the first reward
    call; a max_len past a learned-position model's context failed on the first long text."""
    from hf_tiny import save_tiny
    from workflow_files import rm_tokenizer
    tok = rm_tokenizer()
    path = save_tiny(str(tmp_path / "rm_gpt2"), transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=16, pad_token_id=0,
        num_labels=1), seed=4, auto=transformers.AutoModelForSequenceClassification)
    tok.save_pretrained(path)
    with pytest.raises(ValueError, match=r"config.task.reward.max_len=512 exceeds the 16 "
                                         r"positions of hf:rm_gpt2"):
        hf_reward.SequenceClassifierJudge(path, where="config.task.reward")
    judge = hf_reward.SequenceClassifierJudge(path, max_len=16)
    assert np.isfinite(judge(["w3"], [" ".join(["w4"] * 30)])).all() and judge.truncated == 1
    for template in ("{prompt} -> {response} {score}", "{prompt} {response} {", "{prompt}"):
        with pytest.raises(ValueError, match=r"reward.template must be .* the fields \{prompt\} "
                                             r"and \{response\} \(and no others\)"):
            hf_reward.SequenceClassifierJudge(path, max_len=16, template=template)


def test_ensemble_is_mean_minus_k_std(dirs):
    a, b = (hf_reward.SequenceClassifierJudge(dirs[k]) for k in ("rm", "rm2"))
    ens = sources.make_judge(sources.RewardConfig(kind="ensemble", std_penalty=2.0,
                                                  checkpoints=(dirs["rm"], dirs["rm2"])), "vader")
    prompts, responses = ["w3 w4", "w5"], ["w6", "w7 w8"]
    sa, sb = a(prompts, responses), b(prompts, responses)
    want = (sa + sb) / 2 - 2.0 * np.abs(sa - sb) / 2
    np.testing.assert_allclose(ens(prompts, responses), want, atol=1e-6)
    assert ens.id == f"ensemble({a.id},{b.id})-2std"
    # one directory twice: std 0, a plain mean that read as an ensemble
    with pytest.raises(ValueError, match=r"config.task.reward.checkpoints lists a directory "
                                         r"twice"):
        sources.RewardConfig(kind="ensemble", checkpoints=(dirs["rm"], dirs["rm"] + "/"))


def test_model_ids_tell_apart_checkpoints_in_folders_of_one_name(dirs, tmp_path):
    """Reference tables are keyed by the base and reward model ids: two checkpoints in folders of
    the same name (e.g. two runs' export/hf) must not share a table, and a copy of one must."""
    for sub, src in (("a", "rm"), ("b", "rm2"), ("c", "rm")):
        shutil.copytree(dirs[src], tmp_path / sub / "rm")
    ida, idb, idc = (hf_reward.SequenceClassifierJudge(str(tmp_path / sub / "rm")).id
                     for sub in "abc")
    assert ida.split("#")[0] == idb.split("#")[0] == "hf:rm" and ida != idb and ida == idc
    s = real.parse_section({})
    policy = sources.load_policy(sources.PolicyConfig(dirs["policy"]))
    leaves, treedef = jax.tree.flatten(policy.params)
    first = np.array(leaves[0])
    first.flat[3] += 1e-3                                # one weight differs
    other = jax.tree.unflatten(treedef, [first, *leaves[1:]])
    moved = policy._replace(source="/elsewhere/" + os.path.basename(policy.source))
    assert real.base_model_id(moved, s) == real.base_model_id(policy, s)
    assert real.base_model_id(policy._replace(params=other), s) != real.base_model_id(policy, s)
    assert real.base_model_id(policy, s).startswith(os.path.basename(dirs["policy"]) + "#")


@pytest.mark.parametrize("change,message", [
    ({"kind": "rm"}, r"config.task.reward.kind must be one of \('judge', 'hf', 'trained', "
                       r"'ensemble'\)"),
    ({"kind": "hf"}, r"config.task.reward.checkpoint must name a sequence-classification"),
    ({"kind": "hf", "checkpoint": "/nonexistent"}, r"config.task.reward.checkpoint: "
                                                   r"'/nonexistent' is not a transformers"),
    ({"kind": "ensemble", "checkpoints": ("/a",)}, r"config.task.reward.checkpoints must list"),
    ({"judge": "bleu"}, r"config.task.reward.judge must be '' or one of"),
    ({"max_len": 0}, r"config.task.reward.max_len must be a positive integer"),
    ({"padding": "middle"}, r"config.task.reward.padding must be one of"),
    ({"kidn": "hf"}, r"config.task.reward: unknown keys \['kidn'\]"),
    ({"checkpoint": "/rm"}, r"config.task.reward.checkpoint is set but config.task.reward.kind="
                            r"'judge' does not use it"),
    # settings a kind does not read (accepted before: the judge's scores were unchanged)
    ({"std_penalty": 5.0}, r"config.task.reward.std_penalty=5.0 is set but kind='judge' does "
                           r"not read it"),
    ({"template": "chat"}, r"config.task.reward.template='chat' is set but kind='judge'"),
    ({"batch_size": 1}, r"config.task.reward.batch_size=1 is set but kind='judge'"),
    ({"kind": "hf", "checkpoint": "/rm", "std_penalty": 2.0},
     r"config.task.reward.std_penalty=2.0 is set but kind='hf' does not read it"),
])
def test_bad_reward_section_names_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        real.parse_section({"reward": change})


def test_judge_kind_keeps_the_builtin_judges():
    assert sources.make_judge(sources.RewardConfig(), "vader").id == "vader"
    assert sources.make_judge(sources.RewardConfig(judge="harmlessness"), "vader").id == \
        judges.get_judge("harmlessness").id


# ----------------------------------------------------------------------------------- prompts
def test_prompt_split_is_seeded_disjoint_and_groups_duplicates(dirs):
    a = sources.split_prompts(dirs["prompts"], 5, 3, seed=0)
    assert a == sources.split_prompts(dirs["prompts"], 5, 3, seed=0)
    assert a != sources.split_prompts(dirs["prompts"], 5, 3, seed=1)
    assert len(a.train_texts) == 5 and len(a.eval_texts) == 3
    assert not set(a.train_texts) & set(a.eval_texts)
    assert not set(a.train_ids) & set(a.eval_ids) and "dup" not in a.train_ids + a.eval_ids
    full = sources.split_prompts(dirs["prompts"], 10, 2, seed=3)   # all 12 distinct texts
    assert sorted(full.train_texts + full.eval_texts) == sorted({r["prompt"] for r in dirs["rows"]})
    with pytest.raises(ValueError, match=r"has 12 distinct prompts; config.task.num_prompts=11 "
                                         r"\+ config.task.eval_prompts=2 need 13"):
        sources.split_prompts(dirs["prompts"], 11, 2, seed=0)
    with pytest.raises(ValueError, match=r"config.task.data.prompts: no such file"):
        real.parse_section({"data": {"prompts": "/nonexistent.jsonl"}})


def test_prompts_spelled_differently_are_one_prompt_on_one_side_of_the_split(tmp_path):
    """A training prompt returned as an evaluation prompt in another spelling (a trailing
    space, a doubled space, another case, NFD against NFC): split by exact text, 2-3 of 12
    evaluation prompts were training prompts for every seed 0-4, and nothing was counted."""
    import unicodedata
    base = [f"Question number {i} about topic {chr(65 + i)}?" for i in range(10)]
    variants = [base[0] + " ", base[1].replace(" ", "  ", 1), base[2].lower(),
                "\n" + base[3], base[4].upper()]
    nfc = "Is the café open?"
    rows = ([{"id": f"p{i}", "prompt": t} for i, t in enumerate(base)]
            + [{"id": f"v{i}", "prompt": t} for i, t in enumerate(variants)]
            + [{"id": "nfc", "prompt": nfc},
               {"id": "nfd", "prompt": unicodedata.normalize("NFD", nfc)}])
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for seed in range(5):
        split = sources.split_prompts(str(path), 7, 4, seed=seed)
        keys = [{readers.prompt_key(t) for t in side}
                for side in (split.train_texts, split.eval_texts)]
        assert not keys[0] & keys[1] and len(keys[0]) == 7 and len(keys[1]) == 4
        assert split.merged == 6
        # each prompt keeps the text and id of its first record
        assert set(split.train_ids + split.eval_ids) <= {f"p{i}" for i in range(10)} | {"nfc"}
        assert set(split.train_texts + split.eval_texts) <= set(base) | {nfc}
    with pytest.raises(ValueError, match=r"has 11 distinct prompts"):
        sources.split_prompts(str(path), 8, 4, seed=0)
    # a policy's training prompts are passed over in any spelling
    split = sources.split_prompts(str(path), 5, 4, seed=0, exclude=[base[5].upper() + " "])
    assert base[5] not in split.train_texts + split.eval_texts


def test_prompt_split_passes_over_excluded_prompts_in_its_order(dirs):
    """`exclude` (a policy's training prompts) never enters either side; a split the excluded
    texts do not reach is the split without them."""
    plain = sources.split_prompts(dirs["prompts"], 3, 2, seed=0)
    texts = sorted({r["prompt"] for r in dirs["rows"]})
    unreached = [t for t in texts if t not in plain.train_texts + plain.eval_texts]
    assert sources.split_prompts(dirs["prompts"], 3, 2, seed=0, exclude=unreached) == plain
    hit = plain.eval_texts[:1] + plain.train_texts[-1:]
    split = sources.split_prompts(dirs["prompts"], 3, 2, seed=0, exclude=hit)
    assert len(split.eval_texts) == 2 and len(split.train_texts) == 3
    assert not set(hit) & set(split.eval_texts + split.train_texts)
    assert split.eval_texts[0] == plain.eval_texts[1]        # the next in the same order
    with pytest.raises(ValueError, match=r"has 12 distinct prompts \(leaving out the 3 the "
                                         r"policy trained on\); .* need 10"):
        sources.split_prompts(dirs["prompts"], 8, 2, seed=0, exclude=texts[:3] + ["not there"])


def test_evaluate_passes_over_a_runs_training_prompts_or_says_it_cannot_tell(dirs, tmp_path):
    from infalign_jax.workflows import evaluate
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    task = {"name": "helpfulness", "num_prompts": 4, "eval_prompts": 2,
            "data": {"prompts": dirs["prompts"]}}
    (run / "manifest.json").write_text(json.dumps({"config": {"task": task}}))
    e = load_config_module(os.path.join(ROOT, "configs", "evaluate.py")).get_config("prompts=3")
    e.unlock()
    e.policy.checkpoint, e.data.prompts = str(run), dirs["prompts"]
    said = []
    _, split, check = evaluate._held_out_split(evaluate.parse_config(e), 0, said.append)
    trained = sources.split_prompts(dirs["prompts"], 4, 2, seed=0).train_texts
    assert not set(split.eval_texts) & set(trained) and len(split.eval_texts) == 3
    assert check == {"policy_training_prompts": 4, "left_out": 1, "merged": 1}   # "dup"
    assert said == [f"evaluate: 1 records of {dirs['prompts']} repeat an earlier prompt (up to "
                    f"spacing and case) and were merged into it",
                    f"evaluate: passed over 1 prompts of {dirs['prompts']} that the policy's run "
                    f"trained on (4 training prompts)"]
    # a run whose prompt file is gone: evaluated all the same, with a warning and the reason
    task["data"]["prompts"] = str(tmp_path / "gone.jsonl")
    (run / "manifest.json").write_text(json.dumps({"config": {"task": task}}))
    said.clear()
    _, split, check = evaluate._held_out_split(evaluate.parse_config(e), 0, said.append)
    assert len(split.eval_texts) == 3
    assert check["policy_training_prompts"].startswith("unknown (config.task.data.prompts: no "
                                                       "such file")
    assert len(said) == 2 and said[0].startswith(f"evaluate: warning: cannot tell which prompts "
                                                 f"{run} trained on")
    assert said[1].startswith("evaluate: 1 records of")


def test_prompts_from_preference_files(tmp_path):
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps({
        "chosen": f"\n\nHuman: question {i // 2}\n\nAssistant: good {i}",
        "rejected": f"\n\nHuman: question {i // 2}\n\nAssistant: bad {i}"}) + "\n"
        for i in range(8)), encoding="utf-8")   # 4 prompts, two pairs each
    rows = sources.read_prompt_file(str(hh))
    assert len(rows) == 8 and rows[0][0] == "hh:1"
    split = sources.split_prompts(str(hh), 3, 1, seed=0)
    assert sorted(split.train_texts + split.eval_texts) == \
        [f"\n\nHuman: question {i}\n\nAssistant:" for i in range(4)]
    tldr = tmp_path / "tldr.jsonl"
    tldr.write_text("".join(json.dumps({
        "info": {"subreddit": "r", "title": f"t{i}", "post": "p"}, "choice": 0,
        "summaries": [{"text": " a"}, {"text": " b"}]}) + "\n" for i in range(3)))
    assert sources.split_prompts(str(tldr), 2, 1, seed=0, format="tldr").eval_ids[0] in \
        ("tldr:1", "tldr:2", "tldr:3")
    with pytest.raises(ValueError, match=r"hh.jsonl:1"):   # not a prompt file
        sources.read_prompt_file(str(hh), "prompts")
    with pytest.raises(ValueError, match=r"config.task.data.format must be one of"):
        real.parse_section({"data": {"format": "csv"}})


def test_auto_format_names_a_prompt_files_own_error(tmp_path):
    # A prompt file's bad record is its error, not a cue to read it as preferences ("cannot
    # detect the format from keys ['id', 'prompt']" named neither the line nor the problem).
    bad = {"dup.jsonl": ('{"id": "a", "prompt": "hello"}\n{"id": "a", "prompt": "again"}\n',
                         r"dup.jsonl:2: prompt id 'a' already used on line 1"),
           "blank.jsonl": ('{"prompt": "hello"}\n{"prompt": "  "}\n',
                           r"blank.jsonl:2: prompt is empty")}
    for name, (text, match) in bad.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=match):
            sources.read_prompt_file(str(tmp_path / name))
        with pytest.raises(ValueError, match=match):
            sources.split_prompts(str(tmp_path / name), 1, 0, seed=0)
    good = tmp_path / "p.jsonl"
    good.write_text('\n{"id": "a", "prompt": "hello"}\n{"prompt": "again"}\n')
    assert sources.read_prompt_file(str(good)) == [("a", "hello"), ("p:3", "again")]


# ------------------------------------------------------------------------------- end to end
def _recording(records: list):
    make = judges.text_reward_fn

    def text_reward_fn(judge, detokenize, prompts_text):
        inner = make(judge, detokenize, prompts_text)

        def host(idx, resp, mask):
            scores = inner.host(idx, resp, mask)
            records.append((np.asarray(idx), np.asarray(resp), np.asarray(mask), scores))
            return scores

        return HostReward(host=host, in_graph=inner.in_graph, cut=inner.cut)

    return text_reward_fn


@pytest.mark.slow
def test_ctrl_on_the_researchers_policy_reward_model_and_prompts(dirs, tmp_path, monkeypatch):
    records: list = []
    monkeypatch.setattr(judges, "text_reward_fn", _recording(records))
    seen_prompts: list[str] = []
    call = hf_reward.SequenceClassifierJudge.__call__
    monkeypatch.setattr(hf_reward.SequenceClassifierJudge, "__call__",
                        lambda self, p, r: (seen_prompts.extend(p), call(self, p, r))[1])
    from infalign_jax.loops import train
    c = load_config_module(os.path.join(ROOT, "configs", "ctrl_real.py")).get_config(
        "task=helpfulness,size=tiny")
    c.unlock()
    c.task.policy.checkpoint = dirs["policy"]
    c.task.reward.kind, c.task.reward.checkpoint = "hf", dirs["rm"]
    c.task.data.prompts, c.task.data.split_seed = dirs["prompts"], 5
    c.task.num_prompts, c.task.eval_prompts, c.task.eval_samples = 4, 2, 2
    c.task.max_new_tokens = c.rl.max_new_tokens = 5
    c.reference.k, c.rl.samples_per_prompt = 4, 2
    c.train.num_steps, c.train.batch_size, c.train.tensorboard = 2, 2, False
    c.lock()
    state, summary = train.run(c, str(tmp_path), log=lambda _: None, devices=jax.devices()[:1])

    split = sources.split_prompts(dirs["prompts"], 4, 2, seed=5)
    table = load_reference_table(str(tmp_path / "reference_table.npz"))
    assert list(table.prompt_ids) == split.train_ids
    assert re.fullmatch(r"hf:rm1#[0-9a-f]{16}\|max_len=512\|last_not_pad=0", table.reward_model_id)
    assert re.fullmatch(r"policy#[0-9a-f]{16}\|max_new_tokens=5,.*", table.base_model_id)
    assert not set(split.train_texts) & set(split.eval_texts)
    # evaluation scored its own prompts, as raw text (not the detokenised prompt tokens)
    assert set(split.eval_texts) <= set(seen_prompts)
    assert set(seen_prompts) <= set(split.train_texts) | set(split.eval_texts)

    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and summary["skipped_steps"] == 0
    assert summary["reward_texts_cut"] == 0 and [r["reward_texts_cut"] for r in rows] == [0, 0]
    assert summary["train_data"]["prompts"] == 4 and "est_standard" in summary["eval"]
    # The last two reward calls are the two RL steps (calibration came first): the trainer's
    # mean reward is theirs, and each score is the reward model's, recomputed independently in
    # transformers from the policy's tokens decoded with its own tokenizer.
    assert len(records) >= 3
    ptok = transformers.AutoTokenizer.from_pretrained(dirs["policy"])
    for (idx, resp, mask, scores), row in zip(records[-2:], rows):
        assert scores.shape == (4,) and abs(float(np.mean(scores)) - row["reward"]) < 1e-5
        texts = [split.train_texts[i] + "\n" +
                 ptok.decode(r[m].tolist(), skip_special_tokens=True).strip()
                 for i, r, m in zip(idx, resp, mask.astype(bool))]
        np.testing.assert_allclose(scores, transformers_scores(dirs["rm"], texts), atol=2e-5)
    used = np.concatenate([s for *_, s in records[-2:]])
    assert np.ptp(used) > 0 and any(m.any() for _, _, m, _ in records[-2:])  # not degenerate
    with open(tmp_path / "manifest.json") as f:
        manifest = json.load(f)
    task = manifest["config"]["task"]
    # the prompt file by content among the inputs, where a sweep checks a finished point's files
    from infalign_jax.infra import provenance
    assert manifest["inputs"]["task.data.prompts"]["sha256"] == \
        provenance.file_sha256(dirs["prompts"])
    assert task["data"] == {"prompts": dirs["prompts"], "format": "auto", "split_seed": 5,
                            "chat_template": "auto"}
    assert (task["num_prompts"], task["eval_prompts"]) == (4, 2)

    # The run itself as the next run's policy: its last checkpoint on the base policy's config
    # and tokenizer.
    trained = sources.load_policy(sources.PolicyConfig(str(tmp_path)))
    assert trained.source == f"{tmp_path}@2" and trained.tokenizer("w3")["input_ids"] == [3]
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_texts_the_reward_model_cuts_are_counted_per_step_and_in_the_summary(dirs, tmp_path,
                                                                            monkeypatch):
    """A reward model cuts texts past its max_len and scores the kept part; nothing said so
    (the judge's own count was read by nobody). At max_len 2 every training text (a prompt of 3+
    words, a newline and the response) is cut: 2 prompts x 2 samples = 4 a step. pi_ref's
    evaluation samples are drawn and judged once, at the first evaluation, and their cut texts
    count in every evaluation's figure."""
    from infalign_jax.analysis import eval_harness
    from infalign_jax.loops import train
    drawn = []
    real_reference = eval_harness.reference_samples
    monkeypatch.setattr(eval_harness, "reference_samples",
                        lambda *a, **k: drawn.append(1) or real_reference(*a, **k))
    c = real_task_config(dirs, extra={"task.reward.max_len": 2, "task.eval_samples": 2,
                                      "train.eval_every": 1})
    lines: list[str] = []
    _, summary = train.run(c, str(tmp_path), log=lines.append, devices=jax.devices()[:1])
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["reward_texts_cut"] for r in rows] == [4, 4]
    assert summary["reward_texts_cut"] == 8
    # the evaluation's: 2 held-out prompts x 2 samples, of the policy and of pi_ref, at step 1
    # and at the end; pi_ref's drawn once
    assert summary["eval"]["est_reward_texts_cut"] == 8 and len(drawn) == 1
    assert [r["est_reward_texts_cut"] for r in read_jsonl(str(tmp_path / "eval.jsonl"))] == [8, 8]
    assert sum("the reward model cut 4 scored texts at its length limit" in line
               for line in lines) == 1
    # the reference table's K = 4 samples of each of the 4 training prompts, every one cut
    assert any("reference table: the reward model cut 16 scored texts" in line for line in lines)
    # progress=None (allowed by RLTask) raised TypeError on that message, after the whole pass
    from infalign_jax.rl import tasks as rl_tasks
    table = rl_tasks.build_task(c.task).reference_table(4, 0, progress=None)
    assert table.sorted_rewards_BxK.shape == (4, 4)


@pytest.mark.slow
def test_a_lora_run_refuses_a_base_replaced_in_place(dirs, tmp_path):
    """A LoRA run's checkpoints hold adapters; loading the run (evaluate, export, a next run's
    policy) merges them into the base its manifest names. A base re-saved in place with other
    parameters of the same shape was merged without a word (parameters 0.31 off the trained
    policy); the manifest's digest of the base is now compared."""
    from infalign_jax.loops import train
    from hf_tiny import save_tiny
    from workflow_files import policy_tokenizer, TINY
    base = str(tmp_path / "base")
    shutil.copytree(dirs["policy"], base)
    c = real_task_config({**dirs, "policy": base}, lora_rank=2)
    train.run(c, str(tmp_path / "run"), log=lambda _: None, devices=jax.devices()[:1])
    assert sources.load_policy(sources.PolicyConfig(str(tmp_path / "run"))).source.endswith("@2")
    tok = policy_tokenizer()
    shutil.rmtree(base)
    save_tiny(base, transformers.LlamaConfig(vocab_size=len(tok), pad_token_id=0, eos_token_id=1,
                                             tie_word_embeddings=False, **TINY), seed=3)
    tok.save_pretrained(base)
    with pytest.raises(ValueError, match=r"config.task.policy.checkpoint: the LoRA run's base "
                                         r".* now holds other parameters"):
        sources.load_policy(sources.PolicyConfig(str(tmp_path / "run")))
