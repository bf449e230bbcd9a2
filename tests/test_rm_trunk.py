"""Reward models trained from a pretrained trunk (a transformers directory or a GGUF file) and read
back as the CTRL reward (`task.reward.kind = "trained"`).

The trunks are tiny Llama models built here (`workflow_files.save_policy`, a word-level
tokenizer; the GGUF file written by `test_gguf_families.write_gguf` with a byte-level BPE
vocabulary that encodes).
Independent references: transformers' hidden states, the tokenizers called directly, and a direct
forward of the checkpoint's parameters on each text, one unpadded row at a time.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from infalign_jax import models
from infalign_jax.data.synthetic import write_jsonl
from infalign_jax.loops import rm_data, rm_model, train_reward
from infalign_jax.rl.tasks import sources
from workflow_files import WORDS, save_policy, save_reward_model

ONE = jax.devices()[:1]
GGUF_TOKENS = ["<pad>", "<eos>", "<unk>", "\u0120", "w", "\u0120w"] + [str(i) for i in range(10)]


def _gguf_vocabulary(w, config):
    """Byte-level BPE (the "gpt2" tokenizer model) over the characters of the words: it encodes."""
    tokens = GGUF_TOKENS + [f"x{i}" for i in range(config["vocab_size"] - len(GGUF_TOKENS))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["\u0120 w"])
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(2)


def _rows(rng, n):
    """Random pairs of distinct word sequences (a few steps need no learnable rule)."""
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS, rng.integers(2, 7)))
        a, b = (" ".join(rng.choice(WORDS, rng.integers(1, 5))) for _ in range(2))
        while a == b:
            b = " ".join(rng.choice(WORDS, rng.integers(1, 5)))
        out.append({"prompt": prompt, "chosen": a, "rejected": b})
    return out


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    import test_gguf_families as tg
    root = tmp_path_factory.mktemp("trunk")
    hf = save_policy(root / "lm")
    gguf = tg.write_gguf(hf, root / "lm.gguf", arch="llama", vocabulary=_gguf_vocabulary)
    rng = np.random.default_rng(0)
    train = write_jsonl(str(root / "train.jsonl"), _rows(rng, 24))
    ev = write_jsonl(str(root / "eval.jsonl"), _rows(rng, 8))
    return dict(hf=hf, gguf=gguf, train=train, eval=ev, root=root)


def _config(source, train, ev, *, max_prompt_len=4, max_response_len=6, **train_kw):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(train_path=train, eval_path=ev, format="jsonl", max_prompt_len=max_prompt_len,
                  max_response_len=max_response_len)
    c.model = dict(source=source)
    c.rm = dict(learning_rate=1e-2, warmup_steps=0, total_steps=0)
    c.train = dict(num_steps=3, batch_size=4, log_every=10, eval_every=0, checkpoint_every=1,
                   keep_checkpoints=2, async_checkpoint=False, tensorboard=False)
    c.train.update(train_kw)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def _run(config, workdir):
    return train_reward.run(config, str(workdir), log=lambda s: None, devices=ONE)


def _flat(params):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]}


# ---------------------------------------------------------------------------- the trunk as loaded
def _transformers_hidden(directory, tokens, mask, **from_pretrained):
    """transformers' final hidden states, positions counting the real tokens (as ours do)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, **from_pretrained).eval()
    with torch.no_grad():
        return model.model(input_ids=torch.tensor(tokens),
                           attention_mask=torch.tensor(mask.astype(np.int64)),
                           position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
                           ).last_hidden_state.numpy()


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_trunk_equals_its_source_with_a_fresh_reward_head(trunk, kind):
    model = rm_model.build_model({"source": trunk[kind]})
    assert model.cfg.heads == ("reward",) and "lm_head" not in model.params
    assert not np.any(np.asarray(model.params["reward_head_kernel"]))
    tokens = np.random.default_rng(1).integers(3, 40, (2, 9))
    mask = np.ones(tokens.shape, bool)
    mask[1, 6:] = False                          # right padding in one row
    ours = np.asarray(models.hidden_states(model.params, jnp.asarray(tokens), model.cfg,
                                           attention_mask_BxT=jnp.asarray(mask)))
    theirs = _transformers_hidden(trunk["hf"], tokens, mask)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=2e-5, rtol=1e-4)
    # The trunk's own tokenizer and its end token (no <|im_end|> here: EOS).
    text = "w5 w7 w19"
    direct = (transformers.AutoTokenizer.from_pretrained(trunk["hf"]) if kind == "hf" else
              model.tokenizer)(text, add_special_tokens=False)["input_ids"]
    assert model.tokenizer.decode(direct) == text and len(direct) >= 3
    assert (model.eos_id, model.pad_id) == (1, 0)


def test_sequence_classifier_trunk_keeps_its_score_head(tmp_path):
    directory = save_reward_model(tmp_path / "rm", seed=4)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"config.model.source: the tokenizer of .* has no EOS"):
        rm_model.build_model({"source": directory})
    tok.eos_token = "extra"
    tok.save_pretrained(directory)
    model = rm_model.build_model({"source": directory})
    assert model.cfg.heads == ("reward",)
    assert (model.eos_id, model.pad_id) == (tok.convert_tokens_to_ids("extra"), 0)
    tokens = np.random.default_rng(2).integers(3, 40, (3, 7))
    ours = np.asarray(models.apply(model.params, jnp.asarray(tokens), model.cfg).reward)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ training
def _expected_truncation(tokenizer, path, max_prompt_len, max_response_len):
    """Parts longer than the limits, counted with the tokenizer called directly (EOS appended)."""
    counts = {"prompt": 0, "chosen": 0, "rejected": 0}
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        for part, limit, extra in (("prompt", max_prompt_len, 0), ("chosen", max_response_len, 1),
                                   ("rejected", max_response_len, 1)):
            n = len(tokenizer(row[part], add_special_tokens=False)["input_ids"]) + extra
            counts[part] += n > limit
    return {k: v for k, v in counts.items() if v}


def test_hf_trunk_trains_resumes_exactly_and_counts_truncation(trunk, tmp_path):
    c = _config(trunk["hf"], trunk["train"], trunk["eval"])
    full, summary = _run(c, tmp_path / "full")
    tok = transformers.AutoTokenizer.from_pretrained(trunk["hf"])
    assert summary["train_data"]["truncated"] == _expected_truncation(tok, trunk["train"], 4, 6)
    assert summary["eval_data"]["truncated"] == _expected_truncation(tok, trunk["eval"], 4, 6)
    assert summary["train_data"]["pairs"] == 24 and summary["eval"]["eval_pairs"] == 8
    assert summary["reward_model_id"].startswith("rm[2x32,lm]:")
    start = rm_model.build_model({"source": trunk["hf"]}).params
    trained = _flat(full.params)
    assert np.any(trained["['reward_head_kernel']"] != 0)
    assert not np.allclose(trained["['layers']['mlp']['up_kernel']"],
                           _flat(start)["['layers']['mlp']['up_kernel']"])
    _run(_config(trunk["hf"], trunk["train"], trunk["eval"], num_steps=2), tmp_path / "part")
    resumed, s2 = _run(c, tmp_path / "part")
    assert s2["resumed_from"] == 2
    for key, value in _flat(resumed.params).items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)


@pytest.mark.parametrize("trainable", ["head", "last:1"])
def test_gguf_trunk_trains_only_what_is_trainable(trunk, tmp_path, trainable):
    start = _flat(rm_model.build_model({"source": trunk["gguf"]}).params)
    state, summary = _run(_config(trunk["gguf"], trunk["train"], trunk["eval"], num_steps=2,
                                  trainable=trainable), tmp_path / "g")
    after = _flat(state.params)
    assert summary["train_data"]["pairs"] == 24
    moved = {k for k in after if not np.array_equal(after[k], start[k])}
    assert "['reward_head_kernel']" in moved and "['embed']" not in moved
    layered = [k for k in after if k.startswith("['layers']")]
    if trainable == "head":
        assert moved == {"['reward_head_kernel']"}   # the bias's gradient is 0 by design
    else:   # layer 1 of 2 and the final norm train; layer 0 does not move at all
        assert "['final_norm']['scale']" in moved
        for k in layered:
            np.testing.assert_array_equal(after[k][0], start[k][0], err_msg=k)
        assert all(not np.array_equal(after[k][1], start[k][1]) for k in layered)


# ---------------------------------------------------------------------------- refusals
def test_pretrained_trunk_refuses_model_keys_by_name(trunk, tmp_path):
    c = _config(trunk["hf"], trunk["train"], trunk["eval"])
    c.model.d_model = 64
    c.model.remat = "full"        # allowed: how the trunk is computed, not what
    with pytest.raises(ValueError, match=r"config.model.d_model is fixed by the pretrained trunk"):
        _run(c, tmp_path / "r")
    c = _config(trunk["hf"], trunk["train"], trunk["eval"], max_prompt_len=100,
                max_response_len=100)
    with pytest.raises(ValueError, match=r"config.data.max_prompt_len \+ config.data."
                                         r"max_response_len = 200 exceed the model's max_len"):
        _run(c, tmp_path / "r")
    c = _config(trunk["hf"], trunk["train"], trunk["eval"], trainable="last:3")
    with pytest.raises(ValueError, match=r"config.train.trainable='last:3': the model has only 2"):
        _run(c, tmp_path / "r")
    c = _config(trunk["hf"], trunk["train"], trunk["eval"], trainable="top")
    with pytest.raises(ValueError, match=r"config.train.trainable must be 'all', 'head' or"):
        _run(c, tmp_path / "r")
    for layers, message in ((3, r"config.model.trunk_layers=3: the trunk .* has only 2 layers"),
                            (-1, r"config.model.trunk_layers must be an int >= 0"),
                            (1.5, r"config.model.trunk_layers must be an int >= 0")):
        c = _config(trunk["hf"], trunk["train"], trunk["eval"])
        c.model.trunk_layers = layers
        with pytest.raises(ValueError, match=message):
            _run(c, tmp_path / "r")
    for layers in (2, False):   # False == 0, but it is not a layer count
        with pytest.raises(ValueError,
                           match=rf"config.model.trunk_layers={layers} cuts a pretrained"):
            rm_model.build_model({"source": "tiny", "trunk_layers": layers})
    c = _config(trunk["hf"], trunk["train"], trunk["eval"])
    c.model.reward_pool = "max"
    with pytest.raises(ValueError, match=r"config.model.reward_pool must be one of \('last', "
                                         r"'mean'\), got 'max'"):
        _run(c, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_reward_model_config_pools_an_lm_trunk_and_reads_a_classifier_at_its_last_token(
        trunk, tmp_path):
    from infalign_jax.infra.config_utils import load_config_module
    rm_config = load_config_module("configs/reward_model.py").get_config
    assert rm_config(f"trunk={trunk['gguf']}").model.reward_pool == "mean"
    assert rm_config(f"trunk={trunk['hf']},pool=last,trunk_layers=1").model.to_dict() == {
        "source": trunk["hf"], "remat": "none", "dtype": "float32", "reward_pool": "last",
        "trunk_layers": 1}
    classifier = save_reward_model(tmp_path / "cls", seed=4)
    assert rm_config(f"trunk={classifier}").model.reward_pool == "last"
    assert rm_config("").model.reward_pool == "last"       # the tiny byte model
    with pytest.raises(ValueError, match=r"config arg trunk_layers cuts a pretrained trunk"):
        rm_config("trunk_layers=2")
    model = rm_model.build_model({"source": trunk["hf"]})
    with pytest.raises(ValueError, match=r"first_layers: the parameters carry LoRA adapters"):
        models.first_layers(model.cfg, {**model.params, "lora": {}}, 1)


def test_a_mean_pool_reward_model_is_not_exported_as_a_last_token_classifier(trunk, tmp_path):
    from infalign_jax.models import hf_import
    model = rm_model.build_model({"source": trunk["hf"], "reward_pool": "mean"})
    with pytest.raises(hf_import.CheckpointError, match=r"these fields would change: "
                                                        r"\['reward_pool'\]"):
        hf_import.save_hf_checkpoint(str(tmp_path / "x"), model.cfg, model.params,
                                     tokenizer=model.tokenizer)


def test_an_ensemble_over_one_trunk_gives_each_member_its_own_head():
    """`trunk_ensemble`: every member is the trunk, its reward head the trunk's plus its own
    N(0, init_std^2) noise (without it the members of a trunk ensemble trained alike)."""
    cfg = models.ModelConfig(vocab_size=16, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2,
                             head_dim=8, d_ff=32, max_len=16, heads=("reward",), init_std=0.05)
    params = models.init_params(cfg, jax.random.key(0))
    stacked = rm_model.trunk_ensemble(cfg, params, jax.random.key(1), 3)
    rest = [k for k in params if k != "reward_head_kernel"]
    for a, b in zip(jax.tree.leaves({k: params[k] for k in rest}),
                    jax.tree.leaves({k: stacked[k] for k in rest}), strict=True):
        for e in range(3):
            np.testing.assert_array_equal(np.asarray(b[e]), np.asarray(a))
    noise = np.asarray(stacked["reward_head_kernel"]) - np.asarray(params["reward_head_kernel"])
    assert noise.shape == (3, 64, 1)
    for e in range(3):
        assert 0.6 * 0.05 < noise[e].std() < 1.4 * 0.05
    assert not np.allclose(noise[0], noise[1])


def test_fewer_task_pairs_than_asked_for_are_counted(tmp_path, monkeypatch):
    """`task:<name>` pairs leave out ties and equal texts, then keep the first n: fewer pairs than
    synthetic_train_pairs were written without a word."""
    from infalign_jax.rl.tasks import real
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    monkeypatch.setattr(real, "sample_judged_pairs", lambda *a, **k: [pair] * 3)
    lines = []
    made = rm_data.ensure_synthetic_data(
        rm_data.RMDataConfig(synthetic="task:helpfulness", synthetic_train_pairs=8,
                             synthetic_eval_pairs=2, pairs_per_prompt=4, eval_first_prompt=2),
        str(tmp_path), 0, lines.append)
    assert len(open(made.train_path).readlines()) == 3
    assert any(line.startswith("warning: config.data: 3 train pairs of the 8 asked for")
               for line in lines), lines
    assert not any("eval pairs of the" in line for line in lines)
    # 9 pairs at 4 a prompt need 3 prompts: the third is eval_first_prompt=2's, refused before
    # anything is sampled (the eval accuracy would count prompts trained on)
    with pytest.raises(ValueError, match=r"9 training pairs at 4 per prompt need 3 prompts, "
                                         r"which overlap the eval prompts from eval_first_prompt=2"):
        rm_data.ensure_synthetic_data(
            rm_data.RMDataConfig(synthetic="task:helpfulness", synthetic_train_pairs=9,
                                 synthetic_eval_pairs=2, pairs_per_prompt=4, eval_first_prompt=2),
            str(tmp_path / "overlap"), 0, lines.append)


def test_data_paths_switch_synthetic_pairs_off(tmp_path):
    data = rm_data.RMDataConfig
    assert data().synthetic == "vader"
    made = rm_data.ensure_synthetic_data(
        data(synthetic_train_pairs=3, synthetic_eval_pairs=2), str(tmp_path), 0, lambda s: None)
    assert made.synthetic == "" and made.train_path.startswith(str(tmp_path))
    assert [len(open(p).readlines()) for p in (made.train_path, made.eval_path)] == [3, 2]
    assert data(train_path="a.jsonl", eval_path="b.jsonl").synthetic == ""
    with pytest.raises(ValueError, match=r"config.data.eval_path must name a preference file"):
        data(train_path="a.jsonl")
    with pytest.raises(ValueError, match=r"config.data.train_path must name a preference file"):
        data(eval_path="b.jsonl")
    with pytest.raises(ValueError, match=r"config.data.train_path is set but config.data."
                                         r"synthetic='vader' makes the pairs"):
        data(synthetic="vader", train_path="a.jsonl", eval_path="b.jsonl")
    # The training file as the held-out one: training accuracy reported as held-out.
    with pytest.raises(ValueError, match=r"config.data.eval_path names the training file"):
        data(train_path="a.jsonl", eval_path="./a.jsonl")


def test_pairs_in_both_counts_held_out_pairs_seen_in_training():
    def arrays(rows):     # rows of (prompt, chosen, rejected) token lists, right-padded to 3
        out = {}
        for i, k in enumerate(("prompt_BxP", "chosen_BxL", "rejected_BxL")):
            toks = np.zeros((len(rows), 3), np.int32)
            for j, row in enumerate(rows):
                toks[j, :len(row[i])] = row[i]
            out[k] = toks
            out[f"{k[:-4]}_mask{k[-4:]}"] = toks > 0
        return out
    train = arrays([([1], [2, 3], [4]), ([1], [5], [6])])
    held = arrays([([1], [4], [2, 3]),      # the same pair, labels swapped
                   ([1], [2, 3], [4]),      # the same pair
                   ([7], [2, 3], [4]),      # another prompt
                   ([1], [5], [6, 6])])     # another response
    assert rm_data.pairs_in_both(train, held) == 2
    assert rm_data.pairs_in_both(train, arrays([([1], [9], [8])])) == 0


# ---------------------------------------------------------------------- kind = "trained"
def _direct_rewards(cfg, params, tokenizer, prompts, responses, eos, max_p, max_r):
    """Each text encoded by the tokenizer itself, laid out as training packs it, scored alone."""
    out = []
    for p, r in zip(prompts, responses):
        ids = (tokenizer(p, add_special_tokens=False)["input_ids"][-max_p:]
               + (tokenizer(r, add_special_tokens=False)["input_ids"] + [eos])[:max_r])
        out.append(float(models.apply(params, jnp.asarray([ids]), cfg).reward[0]))
    return np.array(out)


def _texts():
    rng = np.random.default_rng(3)
    prompts = [" ".join(rng.choice(WORDS, n)) for n in (1, 3, 6, 2, 5)]
    responses = [" ".join(rng.choice(WORDS, n)) for n in (2, 7, 1, 4, 3)]
    return prompts, responses


def test_trained_kind_scores_the_newest_checkpoint_on_reencoded_text(trunk, tmp_path):
    run_dir = tmp_path / "rm"
    state, _ = _run(_config(trunk["hf"], trunk["train"], trunk["eval"], num_steps=2), run_dir)
    judge = sources.make_judge(sources.RewardConfig(kind="trained", checkpoint=str(run_dir),
                                                    batch_size=2), "vader")
    prompts, responses = _texts()
    got = judge(prompts, responses)
    tok = transformers.AutoTokenizer.from_pretrained(trunk["hf"])
    cfg = rm_model.build_model({"source": trunk["hf"]}).cfg
    want = _direct_rewards(cfg, state.params, tok, prompts, responses, 1, 4, 6)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(want) > 0                      # a trained head: the texts score differently
    # Prompts of 6 and 5 words exceed 4 tokens; a response of 7 words + EOS exceeds 6.
    assert judge.truncated == 3
    assert judge.id.startswith(f"rm:{run_dir}@2")
    # a std penalty on one model: accepted and ignored (scores and id unchanged) before
    with pytest.raises(ValueError, match=r"config.task.reward.std_penalty=5.0 is set, but the "
                                         r"run at .* trained one model"):
        sources.make_judge(sources.RewardConfig(kind="trained", checkpoint=str(run_dir),
                                                std_penalty=5.0), "vader")
    # a run whose manifest records no finish (killed, or still running) is scored with a warning
    manifest = run_dir / "manifest.json"
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**record, "finished": None}))
    with pytest.warns(UserWarning, match=r"has not finished .* newest checkpoint, step 2"):
        sources.make_judge(sources.RewardConfig(kind="trained", checkpoint=str(run_dir)), "vader")


def test_trained_kind_of_an_ensemble_run_is_mean_minus_k_std(trunk, tmp_path):
    run_dir = tmp_path / "ens"
    state, _ = _run(_config(trunk["gguf"], trunk["train"], trunk["eval"], num_steps=2,
                            ensemble_size=2, bootstrap=True, trainable="head"), run_dir)
    judge = sources.make_judge(sources.RewardConfig(kind="trained", checkpoint=str(run_dir),
                                                    std_penalty=0.5), "vader")
    prompts, responses = _texts()
    model = rm_model.build_model({"source": trunk["gguf"]})
    members = np.stack([_direct_rewards(model.cfg, jax.tree.map(lambda x, e=e: x[e],
                                                                state.params),
                                        model.tokenizer, prompts, responses, 1, 4, 6)
                        for e in range(2)])
    assert np.all(np.abs(members[0] - members[1]) > 0)  # members differ (heads, bootstrap)
    np.testing.assert_allclose(judge(prompts, responses),
                               members.mean(0) - 0.5 * members.std(0), atol=1e-5)
    # the texts past the limits (prompt 4, response + EOS 6 tokens) are counted once, not once
    # per member
    enc = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    cut = sum(len(enc(p)) > 4 or len(enc(r)) + 1 > 6 for p, r in zip(prompts, responses))
    assert cut > 0 and judge.truncated == cut
    # std_penalty left at its default: mean - 1 * std
    default = sources.make_judge(sources.RewardConfig(kind="trained", checkpoint=str(run_dir)),
                                 "vader")
    np.testing.assert_allclose(default(prompts, responses), members.mean(0) - members.std(0),
                               atol=1e-5)


def test_trained_kind_refuses_what_is_not_a_reward_model_run(trunk, tmp_path):
    with pytest.raises(ValueError, match=r"config.task.reward.checkpoint must name a "
                                         r"train_reward.py run directory"):
        sources.RewardConfig(kind="trained")
    with pytest.raises(ValueError, match=r"config.task.reward.checkpoint: .* is not a run "
                                         r"directory"):
        sources.make_judge(sources.RewardConfig(kind="trained", checkpoint=trunk["hf"]), "vader")
    fake = tmp_path / "policy_run"
    (fake / "checkpoints").mkdir(parents=True)
    (fake / "manifest.json").write_text(json.dumps({"config": {"task": {}}}))
    with pytest.raises(ValueError, match=r"config.task.reward.checkpoint: .* is not a "
                                         r"reward-model run"):
        sources.make_judge(sources.RewardConfig(kind="trained", checkpoint=str(fake)), "vader")
    with pytest.raises(ValueError, match=r"config.task.reward.template='chat' is set but "
                                         r"kind='trained'"):
        sources.RewardConfig(kind="trained", checkpoint=str(fake), template="chat")


# ------------------------------------------------------------ trainable="head" on cached features
@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_trunk_layers_keep_the_first_layers_as_transformers_does(trunk, kind):
    """`trunk_layers=1` is the checkpoint loaded by transformers with num_hidden_layers=1 (its
    first layer, then the final norm); the full trunk's output differs from it."""
    full = rm_model.build_model({"source": trunk[kind]})
    cut = rm_model.build_model({"source": trunk[kind], "trunk_layers": 1})
    assert (full.cfg.n_layers, cut.cfg.n_layers) == (2, 1)
    assert all(x.shape[0] == 1 for x in jax.tree.leaves(cut.params["layers"]))
    tokens = np.random.default_rng(2).integers(3, 40, (2, 7))
    mask = np.ones(tokens.shape, bool)
    mask[0, 5:] = False
    theirs = _transformers_hidden(trunk["hf"], tokens, mask, num_hidden_layers=1)

    def hidden(model):
        return np.asarray(models.hidden_states(model.params, jnp.asarray(tokens), model.cfg,
                                               attention_mask_BxT=jnp.asarray(mask)))
    np.testing.assert_allclose(hidden(cut)[mask], theirs[mask], atol=2e-5, rtol=1e-4)
    assert np.abs(hidden(full)[mask] - theirs[mask]).max() > 1e-2
    assert rm_model.build_model({"source": trunk[kind], "trunk_layers": 2}).cfg == full.cfg


def test_mean_pool_reads_the_head_at_the_mean_hidden_state(trunk):
    """reward_pool="mean": the reward is the head at the mean of transformers' final hidden
    states over the real tokens, and the cached feature is that mean (head-only training)."""
    from infalign_jax.rewards import reward_models
    model = rm_model.build_model({"source": trunk["hf"], "reward_pool": "mean"})
    assert model.cfg.reward_pool == "mean"
    rng = np.random.default_rng(4)
    params = {**model.params,
              "reward_head_kernel": jnp.asarray(rng.normal(size=(model.cfg.d_model, 1)),
                                                jnp.float32),
              "reward_head_bias": jnp.asarray([0.3], jnp.float32)}
    prompt = rng.integers(3, 40, (3, 4))
    prompt_mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], bool)   # left-padded
    response = rng.integers(3, 40, (3, 5))
    response_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    tokens = np.concatenate([prompt, response], 1)
    mask = np.concatenate([prompt_mask, response_mask], 1)
    hidden = _transformers_hidden(trunk["hf"], tokens, mask)
    mean = np.stack([hidden[b][mask[b]].mean(0) for b in range(3)])
    want = mean @ np.asarray(params["reward_head_kernel"])[:, 0] + 0.3
    args = [jnp.asarray(x) for x in (prompt, prompt_mask, response, response_mask)]
    got = reward_models.sequence_rewards(model.cfg, params, *args)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    features = reward_models.sequence_features(model.cfg, params, *args)
    np.testing.assert_allclose(features, mean, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(reward_models.head_rewards(params, features), got, atol=1e-5)
    last = rm_model.build_model({"source": trunk["hf"]}).cfg      # the default reads the last token
    assert np.abs(np.asarray(reward_models.sequence_rewards(last, params, *args)) - want).max() > 1e-3


def _metric_rows(workdir, name="metrics"):
    return [json.loads(line) for line in open(workdir / f"{name}.jsonl", encoding="utf-8")]


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_cached_head_features_match_the_full_forward_path(trunk, tmp_path, pool):
    """N steps on cached features = N steps through the trunk: the same head, the same per-step
    loss / accuracy / grad norm, the same held-out accuracy and ECE; the trunk is untouched.
    For either place the head reads (`reward_pool`), the trained run scores as it trained."""
    c = _config(trunk["hf"], trunk["train"], trunk["eval"], num_steps=6, trainable="head",
                eval_every=3)
    c.model.reward_pool = pool
    c.rm.update(weight_decay=0.01, max_grad_norm=0.05)   # clipping and decay both act
    slow, s_slow = train_reward.run(c, str(tmp_path / "slow"), log=lambda s: None, devices=ONE,
                                    cache_head_features=False)
    logs = []
    fast, s_fast = train_reward.run(c, str(tmp_path / "fast"), log=logs.append, devices=ONE)
    assert "head_features" not in s_slow and set(s_fast["head_features"]) == {"train", "eval"}
    assert (",mean]" in s_fast["reward_model_id"]) == (pool == "mean")   # the id names the pool
    assert any("features train: 24/24 pairs (48 sequences)" in line for line in logs)
    a, b = _flat(slow.params), _flat(fast.params)
    start = _flat(rm_model.build_model({"source": trunk["hf"]}).params)
    assert a.keys() == b.keys() == start.keys()
    for key in a:
        if "reward_head" in key:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(b[key], start[key], err_msg=key)
            np.testing.assert_array_equal(a[key], start[key], err_msg=key)
    assert np.abs(a["['reward_head_kernel']"]).max() > 1e-3       # the head did train
    for name in ("metrics", "eval"):
        rows_a, rows_b = _metric_rows(tmp_path / "slow", name), _metric_rows(tmp_path / "fast", name)
        assert len(rows_a) == len(rows_b) == (6 if name == "metrics" else 2)
        for ra, rb in zip(rows_a, rows_b):
            for k in ra:
                if k not in ("step_time_s", "time", "wall_time"):
                    np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in ("eval_accuracy", "eval_ece", "eval_reward_gap", "eval_pairs"):
        np.testing.assert_allclose(s_fast["eval"][k], s_slow["eval"][k], rtol=1e-5, atol=1e-6)
    # The checkpoint is the whole model: `kind="trained"` scores with the trained head.
    judge = sources.make_judge(sources.RewardConfig(kind="trained",
                                                    checkpoint=str(tmp_path / "fast")), "vader")
    prompts, responses = _texts()
    tok = transformers.AutoTokenizer.from_pretrained(trunk["hf"])
    cfg = rm_model.build_model({"source": trunk["hf"], "reward_pool": pool}).cfg
    np.testing.assert_allclose(judge(prompts, responses),
                               _direct_rewards(cfg, fast.params, tok, prompts, responses, 1, 4, 6),
                               atol=1e-5)


def test_cached_features_are_transformers_hidden_states_at_the_last_real_token(trunk, tmp_path):
    """The cache holds, per pair, transformers' final hidden state of [prompt | response] at its
    last real token (left-padded prompt, right-padded response, positions counting real tokens)."""
    c = _config(trunk["hf"], trunk["train"], trunk["eval"], num_steps=1, trainable="head")
    _, summary = _run(c, tmp_path / "f")
    model = rm_model.build_model({"source": trunk["hf"]})
    data = rm_data.RMDataConfig(train_path=trunk["train"], eval_path=trunk["eval"],
                                     format="jsonl", max_prompt_len=4, max_response_len=6)
    arrays, _ = rm_data.load_pairs(data, "eval", model, lambda s: None)
    cached = np.load(summary["head_features"]["eval"])
    for part in ("chosen", "rejected"):
        tokens = np.concatenate([arrays["prompt_BxP"], arrays[f"{part}_BxL"]], 1)
        mask = np.concatenate([arrays["prompt_mask_BxP"], arrays[f"{part}_mask_BxL"]], 1)
        hidden = _transformers_hidden(trunk["hf"], tokens, mask)
        last = np.array([np.flatnonzero(row)[-1] for row in mask])
        np.testing.assert_allclose(cached[f"{part}_BxD"], hidden[np.arange(len(last)), last],
                                   atol=2e-5, rtol=1e-4)


def test_feature_cache_is_reused_on_resume_and_rerun_and_keyed_by_the_data(trunk, tmp_path):
    c = _config(trunk["hf"], trunk["train"], trunk["eval"], num_steps=4, trainable="head")
    full, _ = _run(c, tmp_path / "full")
    logs = []
    part = _config(trunk["hf"], trunk["train"], trunk["eval"], num_steps=2, trainable="head")
    train_reward.run(part, str(tmp_path / "part"), log=logs.append, devices=ONE)
    assert sum("pairs read from" in line for line in logs) == 0
    logs.clear()
    resumed, s2 = train_reward.run(c, str(tmp_path / "part"), log=logs.append, devices=ONE)
    assert s2["resumed_from"] == 2
    assert sum("pairs read from" in line for line in logs) == 2     # train and eval, no forward
    assert not any("sequences)" in line for line in logs)
    for key, value in _flat(resumed.params).items():
        np.testing.assert_array_equal(value, _flat(full.params)[key], err_msg=key)
    # Other packing (a shorter response limit) is another key: computed, not read.
    other = _config(trunk["hf"], trunk["train"], trunk["eval"], num_steps=1, trainable="head",
                    max_response_len=5)
    logs.clear()
    (tmp_path / "other").mkdir()
    import shutil
    shutil.copytree(tmp_path / "full" / "features", tmp_path / "other" / "features")
    train_reward.run(other, str(tmp_path / "other"), log=logs.append, devices=ONE)
    assert not any("pairs read from" in line for line in logs)
    assert len(list((tmp_path / "other" / "features").iterdir())) == 4


def test_a_pretrained_trunks_section_takes_the_dtype_its_docstring_offers():
    """configs/reward_model.py's docstring offers `dtype` for a pretrained trunk, but the section
    had no such key: `--config.model.dtype=bfloat16` failed as an unknown key."""
    import os
    from infalign_jax.infra.config_utils import load_config_module
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config_module(os.path.join(root, "configs", "reward_model.py")).get_config(
        "trunk=smollm2")
    config.update_from_flattened_dict({"model.dtype": "bfloat16"})
    assert config.model.dtype == "bfloat16"
    assert set(config.model) <= set(rm_model.TRUNK_KEYS) | {"source", rm_model.TRUNK_LAYERS}
