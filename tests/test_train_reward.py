"""Reward-model run loop: learns a known preference rule, resumes exactly, refuses bad data."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from infalign_jax.loops import train_reward
from infalign_jax.data import DataError
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.data.synthetic import make_judged_pairs, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE = jax.devices()[:1]


def _count_judge(prompts, responses):
    """A rule the model can learn from bytes: more '!' is better (ties are not emitted)."""
    return np.array([r.count("!") + 0.1 * len(r) for r in responses], np.float64)


def _write_rule_data(tmp_path, n_train=256, n_eval=64):
    rs = np.random.RandomState(0)

    def row():
        a, b = rs.randint(0, 4, size=2)
        while a == b:
            b = rs.randint(0, 4)
        x, y = "ok" + "!" * a, "ok" + "!" * b
        return {"prompt": "rate", "chosen": max(x, y, key=len), "rejected": min(x, y, key=len)}

    train = write_jsonl(str(tmp_path / "train.jsonl"), [row() for _ in range(n_train)])
    ev = write_jsonl(str(tmp_path / "eval.jsonl"), [row() for _ in range(n_eval)])
    return train, ev


def _config(train_path, eval_path, **train):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(synthetic="", synthetic_train_pairs=0, synthetic_eval_pairs=0,
                  train_path=train_path, eval_path=eval_path, format="jsonl", skip_bad=False,
                  max_prompt_len=8, max_response_len=8)
    c.model = dict(source="tiny", d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                   d_ff=64, max_len=16)
    c.rm = dict(learning_rate=3e-3, weight_decay=0.0, max_grad_norm=1.0, margin=0.0,
                label_smoothing=0.0, warmup_steps=0, total_steps=0)
    c.train = dict(num_steps=40, batch_size=16, log_every=20, eval_every=0, checkpoint_every=10,
                   keep_checkpoints=2, ensemble_size=1, bootstrap=False, async_checkpoint=True)
    c.train.update(train)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_learns_rule_and_writes_outputs(tmp_path):
    train, ev = _write_rule_data(tmp_path)
    _, summary = train_reward.run(_config(train, ev), str(tmp_path / "run"), log=lambda s: None,
                                  devices=ONE)
    assert summary["eval"]["eval_pairs"] == 64
    assert summary["eval"]["eval_accuracy"] > 0.9, summary["eval"]
    # This rule's pairs come from 6 response pairs: the held-out file repeats training pairs,
    # which the summary counts (the text-level count from the files themselves).
    key = lambda r: (r["prompt"], frozenset((r["chosen"], r["rejected"])))   # noqa: E731
    seen = {key(json.loads(line)) for line in open(train)}
    both = sum(key(json.loads(line)) in seen for line in open(ev))
    assert both > 0 and summary["eval_data"]["also_in_train"] == both
    info = json.load(open(tmp_path / "run" / "reward_model.json"))
    assert info["reward_model_id"] == summary["reward_model_id"]
    assert info["reward_model_id"].startswith("rm[1x32,bytes-v1]:")
    assert (tmp_path / "run" / "manifest.json").exists()
    # loaded as a judge: a finished run quietly, one whose manifest records no finish (killed
    # before its last step) with a warning naming the step it scores with
    import warnings
    from infalign_jax.rewards import reward_runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = reward_runs.load_run(str(tmp_path / "run"))
    manifest = json.load(open(tmp_path / "run" / "manifest.json"))
    manifest["finished"] = None
    json.dump(manifest, open(tmp_path / "run" / "manifest.json", "w"))
    with pytest.warns(UserWarning, match=f"has not finished .* newest checkpoint, step {run.step}"):
        reward_runs.load_run(str(tmp_path / "run"))


def test_resume_is_exact(tmp_path):
    train, ev = _write_rule_data(tmp_path, 64, 16)
    full, _ = train_reward.run(_config(train, ev, num_steps=8, checkpoint_every=2),
                               str(tmp_path / "a"), log=lambda s: None, devices=ONE)
    train_reward.run(_config(train, ev, num_steps=4, checkpoint_every=2), str(tmp_path / "b"),
                     log=lambda s: None, devices=ONE)
    lines = []
    resumed, summary = train_reward.run(_config(train, ev, num_steps=8, checkpoint_every=2),
                                        str(tmp_path / "b"), log=lines.append, devices=ONE)
    assert summary["resumed_from"] == 4 and any("resumed" in line for line in lines)
    for a, b in zip(_leaves(full), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_metrics_stop_the_run_with_the_step_named(tmp_path, monkeypatch):
    """A step whose loss is NaN (here from step 3 on) stops the run naming the step; the
    checkpoints stop at the last finite step."""
    make_step = train_reward.rt.make_rm_step

    def poisoned(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def nan_from_step_3(state, batch):
            new, metrics = step(state, batch)
            return new, dict(metrics, loss=jnp.where(state.step >= 2, jnp.nan, metrics["loss"]))
        return nan_from_step_3
    monkeypatch.setattr(train_reward.rt, "make_rm_step", poisoned)
    train, ev = _write_rule_data(tmp_path, 64, 16)
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite metrics"):
        train_reward.run(_config(train, ev, num_steps=6, checkpoint_every=1),
                         str(tmp_path / "r"), log=lambda s: None, devices=ONE)
    assert sorted(int(d) for d in os.listdir(tmp_path / "r" / "checkpoints")
                  if d.isdigit())[-1] == 2


def test_resume_after_the_data_file_changed_is_refused(tmp_path):
    """The data files are named by path: a resume after the training pairs were replaced would
    have trained its two parts on different data (found by a review)."""
    from infalign_jax.infra import provenance
    from infalign_jax.loops import skeleton
    train, ev = _write_rule_data(tmp_path, 64, 16)
    train_reward.run(_config(train, ev, num_steps=2, checkpoint_every=2), str(tmp_path / "run"),
                     log=lambda s: None, devices=ONE)
    before = provenance.file_sha256(train)
    rows = [json.loads(line) for line in open(train)]
    write_jsonl(train, [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows])
    with pytest.raises(ValueError, match=r"another config \(data.train_path.sha256: checkpoint "
                                         + f"'{before}'"):
        train_reward.run(_config(train, ev, num_steps=4, checkpoint_every=2),
                         str(tmp_path / "run"), log=lambda s: None, devices=ONE)
    # a record written before the digests resumes (compared without them); another path does not
    now = skeleton.config_record(_config(train, ev))
    old = {k: v for k, v in now.items() if not k.endswith(".sha256")}
    assert {"data.train_path.sha256", "data.eval_path.sha256"} <= set(now)
    skeleton.check_same_config("run", old, now)
    with pytest.raises(ValueError, match=r"data.eval_path: checkpoint"):
        skeleton.check_same_config("run", {**old, "data.eval_path": "other.jsonl"}, now)


def test_ensemble_evaluation_scores_the_members_mean_reward():
    """Held-out metrics of an ensemble are those of its prediction, the members' mean reward
    (batch by batch): member 0 alone wins both pairs, the mean loses both."""
    rc_ExN = np.array([[1.0, 1.0], [0.0, 0.0]])
    rr_ExN = np.array([[0.0, 0.0], [3.0, 3.0]])

    def eval_fn(params, rows):
        i = np.asarray(rows["i"])
        return rc_ExN[:, i], rr_ExN[:, i]

    out = train_reward._eval(eval_fn, None, {"i": np.arange(2)}, 1, ensemble=True)
    assert out["eval_accuracy"] == 0.0 and out["eval_pairs"] == 2
    assert out["eval_reward_gap"] == pytest.approx(-1.0)


def test_ensemble_with_bootstrap_trains_members_differently(tmp_path, monkeypatch):
    keys = []
    draw = train_reward.rt.bootstrap_indices

    def recorded(rng, counts_ExB):
        keys.append(tuple(np.asarray(jax.random.key_data(rng)).ravel()))
        return draw(rng, counts_ExB)
    monkeypatch.setattr(train_reward.rt, "bootstrap_indices", recorded)
    train, ev = _write_rule_data(tmp_path, 64, 16)
    state, summary = train_reward.run(
        _config(train, ev, num_steps=4, ensemble_size=3, bootstrap=True),
        str(tmp_path / "e"), log=lambda s: None, devices=ONE)
    emb = np.asarray(state.params["embed"])
    assert emb.shape[0] == 3 and not np.allclose(emb[0], emb[1])
    assert 0 <= summary["eval"]["eval_accuracy"] <= 1
    # each step draws its rows of the members' resamples with a key of its own
    assert len(keys) == 4 and len(set(keys)) == 4


def test_bad_data_line_is_named_or_skipped(tmp_path):
    train, ev = _write_rule_data(tmp_path, 32, 8)
    with open(train, "a") as f:
        f.write('{"prompt": "rate", "chosen": "same", "rejected": "same"}\n')
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:33: .*identical"):
        train_reward.run(_config(train, ev), str(tmp_path / "x"), log=lambda s: None, devices=ONE)
    assert not (tmp_path / "x" / "checkpoints").exists()
    cfg = _config(train, ev, num_steps=2)
    cfg.data.skip_bad = True
    lines = []
    _, summary = train_reward.run(cfg, str(tmp_path / "y"), log=lines.append, devices=ONE)
    assert summary["train_data"]["skipped"] == {"identical_responses": 1, "malformed_json": 1}
    assert summary["train_data"]["pairs"] == 32
    assert any("skipped" in line.lower() for line in lines)
    # 32 pairs in batches of 12: 8 fit no batch of an epoch, counted and said.
    cfg = _config(train, ev, num_steps=1, batch_size=12)
    cfg.data.skip_bad = True
    lines = []
    _, summary = train_reward.run(cfg, str(tmp_path / "z"), log=lines.append, devices=ONE)
    assert summary["train_data"]["dropped_per_epoch"] == 8
    assert any("8 of 32 pairs fit no batch each epoch" in line for line in lines)


@pytest.mark.parametrize("section,key,value,match", [
    ("model", "source", "gpt5", r"config.model.source must be 'tiny', a transformers directory"),
    ("model", "n_heads", 3, r"config.model: ModelConfig"),
    ("rm", "learning_rate", -1.0, r"config.rm: RMConfig.learning_rate"),
    ("train", "batch_size", 0, r"config.train.batch_size must be a positive integer"),
    ("train", "epochs", 3, r"config.train: unknown keys \['epochs'\]"),
])
def test_bad_config_is_named(tmp_path, section, key, value, match):
    cfg = _config("unused_train.jsonl", "unused_eval.jsonl")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=match):
        train_reward.run(cfg, str(tmp_path), log=lambda s: None, devices=ONE)


def test_negative_seed_is_refused_naming_config_seed(tmp_path):
    cfg = _config("unused_train.jsonl", "unused_eval.jsonl")
    cfg.seed = -1
    with pytest.raises(ValueError, match=r"config.seed must be an integer >= 0, got -1"):
        train_reward.run(cfg, str(tmp_path / "run"), log=lambda s: None, devices=ONE)
    assert not (tmp_path / "run").exists()


def test_synthetic_vader_pairs_are_labelled_by_the_judge():
    from infalign_jax.rewards.judges import get_judge
    judge = get_judge("vader")
    pairs = make_judged_pairs(judge, 50, seed=3)
    assert len(pairs) == 50
    c = judge([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    r = judge([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert np.all(c > r)
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(pairs[0]["chosen"])) == pairs[0]["chosen"]


def test_pairs_from_samples_orders_by_gold_and_flips_at_the_noise_rate():
    from infalign_jax.data.synthetic import pairs_from_samples
    rs = np.random.RandomState(0)
    prompts = [f"p{i}" for i in range(200)]
    responses = [[f"r{i}-{j}" for j in range(6)] for i in range(200)]
    scores = [rs.rand(6) for _ in range(200)]
    clean = pairs_from_samples(prompts, responses, scores, pairs_per_prompt=5, seed=1)
    assert len(clean) == 1000 and not any(r["label_flipped"] for r in clean)
    assert all(r["gold_chosen"] > r["gold_rejected"] for r in clean)
    noisy = pairs_from_samples(prompts, responses, scores, pairs_per_prompt=5, seed=1,
                               label_noise=0.2)
    flipped = np.array([r["label_flipped"] for r in noisy])
    assert abs(flipped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / len(noisy))
    assert all((r["gold_chosen"] < r["gold_rejected"]) == r["label_flipped"] for r in noisy)
    # Ties and identical texts never form a pair.
    tie = pairs_from_samples(["p"], [["a", "b", "a "]], [[0.5, 0.5, 0.9]], pairs_per_prompt=9)
    assert [(r["chosen"], r["rejected"]) for r in tie] == [("a ", "b")]
    with pytest.raises(ValueError, match="label_noise"):
        pairs_from_samples(prompts, responses, scores, 1, label_noise=0.5)


def test_judge_made_pairs_flip_at_the_noise_rate_and_noise_is_refused_where_not_applied(tmp_path):
    from infalign_jax.loops.rm_data import RMDataConfig, ensure_synthetic_data
    from infalign_jax.rewards.judges import get_judge
    judge = get_judge("vader")
    data = RMDataConfig(synthetic="vader", synthetic_train_pairs=400, synthetic_eval_pairs=20,
                        label_noise=0.3)
    made = ensure_synthetic_data(data, str(tmp_path), seed=0, log=lambda s: None)
    rows = [json.loads(line) for line in open(made.train_path)]
    gold = judge([r["prompt"] for r in rows], [r["chosen"] for r in rows]) > \
        judge([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    flipped = np.array([r["label_flipped"] for r in rows])
    assert np.array_equal(flipped, ~gold)   # a flipped row is exactly one the gold judge disagrees with
    assert abs(flipped.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(rows))
    eval_rows = [json.loads(line) for line in open(made.eval_path)]
    assert all(judge([r["prompt"]], [r["chosen"]]) > judge([r["prompt"]], [r["rejected"]])
               for r in eval_rows)   # evaluation keeps the gold labels
    # Pairs made with another noise are not reused: the clean run writes its own file.
    clean = ensure_synthetic_data(dataclasses.replace(data, label_noise=0.0), str(tmp_path),
                                  seed=0, log=lambda s: None)
    assert clean.train_path != made.train_path
    assert not any("label_flipped" in json.loads(line) for line in open(clean.train_path))
    # Nor pairs made with another count or seed (a fresh start in a killed run's work dir): the
    # same settings reuse their files, others write their own
    mtime = os.path.getmtime(clean.train_path)
    again = ensure_synthetic_data(dataclasses.replace(data, label_noise=0.0), str(tmp_path),
                                  seed=0, log=lambda s: None)
    assert again.train_path == clean.train_path and os.path.getmtime(again.train_path) == mtime
    for changes, seed in (({"synthetic_train_pairs": 30}, 0), ({}, 1)):
        other = ensure_synthetic_data(dataclasses.replace(data, label_noise=0.0, **changes),
                                      str(tmp_path), seed=seed, log=lambda s: None)
        assert other.train_path != clean.train_path
        rows = open(other.train_path).read().splitlines()
        assert len(rows) == changes.get("synthetic_train_pairs", 400)
        assert rows != open(clean.train_path).read().splitlines()
    with pytest.raises(ValueError, match=r"config.data.label_noise=0.2 flips labels of pairs"):
        RMDataConfig(train_path="a.jsonl", eval_path="b.jsonl", label_noise=0.2)
    with pytest.raises(ValueError, match=r"config.data.label_noise"):
        RMDataConfig(synthetic="vader", label_noise=0.5)


def test_ensemble_members_are_spread_over_the_mesh_and_train_as_on_one_device(tmp_path):
    """config.mesh with 4 batch devices: each device holds one of 4 members (it used to put them
    all on the default device whatever the mesh), and the members train as they do on one."""
    train, ev = _write_rule_data(tmp_path, 64, 16)
    one, _ = train_reward.run(_config(train, ev, num_steps=3, ensemble_size=4, bootstrap=True),
                              str(tmp_path / "one"), log=lambda s: None, devices=ONE)
    cfg = _config(train, ev, num_steps=3, ensemble_size=4, bootstrap=True)
    cfg.mesh = dict(data=2, fsdp=2, tensor=1)
    spread, summary = train_reward.run(cfg, str(tmp_path / "spread"), log=lambda s: None,
                                       devices=jax.devices()[:4])
    emb = spread.params["embed"]
    assert len(emb.sharding.device_set) == 4
    assert {s.data.shape[0] for s in emb.addressable_shards} == {1}   # one member per device
    for leaf in jax.tree.leaves(spread):   # the optimiser state and steps too
        assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}
    # float32 rounding of another summation order (measured 2e-6); a member trained on other
    # rows, or not trained, is off by about the Adam step, 3e-3
    for a, b in zip(_leaves(one), _leaves(spread)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    assert 0 <= summary["eval"]["eval_accuracy"] <= 1


def test_overrides_the_pairs_source_does_not_read_are_refused():
    """train.bootstrap with one model, the task-sampling options without task pairs and the
    synthetic pair counts with files: accepted and ignored (bit-identical parameters), each
    recorded in the manifest as if used."""
    from infalign_jax.infra.config_utils import load_config_module, refuse_unused_overrides
    config = load_config_module(os.path.join(ROOT, "configs", "reward_model.py")).get_config()
    for key, reader in (("train.bootstrap", "config.train.ensemble_size > 1"),
                        ("data.pairs_per_prompt", "config.data.synthetic='task:<name>'"),
                        ("data.eval_first_prompt", "config.data.synthetic='task:<name>'")):
        with pytest.raises(ValueError, match=rf"--config.{key} is not used by this run: it is "
                                             rf"read only with {re.escape(reader)}"):
            refuse_unused_overrides(config, [key], "--config.")
    refuse_unused_overrides(config, ["data.synthetic_train_pairs"], "--config.")   # vader pairs
    config.train.ensemble_size = 3
    refuse_unused_overrides(config, ["train.bootstrap"], "--config.")
    config.data.synthetic = "task:helpfulness"
    refuse_unused_overrides(config, ["data.pairs_per_prompt"], "--config.")
    config.data.synthetic, config.data.train_path = "auto", "pairs.jsonl"
    with pytest.raises(ValueError, match=r"data.synthetic_eval_pairs is not used by this run"):
        refuse_unused_overrides(config, ["data.synthetic_eval_pairs"], "--config.")
