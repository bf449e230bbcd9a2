"""experiments/evaluate.py: a policy checkpoint against pi_ref under inference-time procedures.

Tiny Llama policy / reference / two sequence-classifier directories with their own tokenizers
(built as in test_workflow.py) and a prompt JSONL are made here. Every win rate the run reports is
recomputed from the saved per-sample scores by brute-force enumeration of the N-subsets (numpy),
every selection from the saved candidate scores, and a sample of the scores in transformers.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from hf_tiny import save_tiny
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.infra.metrics_io import read_jsonl
from infalign_jax.analysis import eval_harness
from infalign_jax.workflows import evaluate
from workflow_files import TINY, WORDS, policy_tokenizer, rm_tokenizer, transformers_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M, NS, B, TRAIN = 4, (1, 2, 4), 3, 3


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    out = {}
    for name, seed in (("policy", 0), ("reference", 5)):
        tok = policy_tokenizer()
        out[name] = save_tiny(str(root / name), transformers.LlamaConfig(
            vocab_size=len(tok), pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
            **TINY), seed=seed)
        tok.save_pretrained(out[name])
    for name, seed in (("rm1", 1), ("rm2", 2)):
        rtok = rm_tokenizer()
        out[name] = save_tiny(str(root / name), transformers.LlamaConfig(
            vocab_size=len(rtok), pad_token_id=0, num_labels=1, **TINY), seed=seed,
            auto=transformers.AutoModelForSequenceClassification)
        rtok.save_pretrained(out[name])
    rng = np.random.default_rng(0)
    rows = [{"id": f"p{i}", "prompt": " ".join(rng.choice(WORDS, 2 + i % 3))} for i in range(24)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out["prompts"] = str(prompts)
    return out


def tiny_config(dirs, procedures, **changes):
    c = load_config_module(os.path.join(ROOT, "configs", "evaluate.py")).get_config(
        f"prompts={B},samples={M},max_new_tokens=4")
    c.unlock()
    c.policy.checkpoint, c.reference.checkpoint = dirs["policy"], dirs["reference"]
    c.data.prompts = dirs["prompts"]
    c.reward.kind, c.reward.checkpoints, c.reward.std_penalty = "ensemble", (dirs["rm1"],
                                                                             dirs["rm2"]), 0.5
    c.eval.procedures, c.eval.ns, c.eval.num_resamples = procedures, NS, 200
    c.cd.update(scorer_prompts=TRAIN, scorer_samples=4, scorer_steps=3, top_k=4,
                num_candidates=2, block_size=2)
    for key, value in changes.items():
        section, field = key.split("__")
        c[section][field] = value
    c.lock()
    return c


# ---------------------------------------------------------------- independent recomputation
def tuple_extremes(x, n, worst=False):
    """max (min) of x over every n-subset drawn without replacement (the unbiased estimator the
    evaluation uses; the plug-in would draw ordered n-tuples with replacement)."""
    f = np.min if worst else np.max
    return np.array([f([x[i] for i in t]) for t in itertools.combinations(range(len(x)), n)])


def subset_extremes(x, n):
    """max of x over every n-subset drawn without replacement."""
    return np.array([max(x[i] for i in t) for t in itertools.combinations(range(len(x)), n)])


def beats(a, b):
    """mean over all pairs of 1{a > b} + 1/2 1{a = b}."""
    a, b = np.asarray(a)[:, None], np.asarray(b)[None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def scores_by_prompt(rows, method, ids):
    out = {pid: [] for pid in ids}
    for r in rows:
        if r["method"] == method:
            out[r["prompt_id"]].append((r["sample"], r["score"]))
    return [np.array([s for _, s in sorted(out[pid])]) for pid in ids]


def find(result_rows, procedure, n, against):
    (row,) = [r for r in result_rows if (r["procedure"], r["n"], r["against"]) ==
              (procedure, n, against)]
    return row


def test_evaluate_end_to_end_matches_recomputation(dirs, tmp_path, monkeypatch):
    procs = ("bon", "won", "rbon_kl", "rbon_wd", "uncertainty_bon", "cd_tokenwise",
             "cd_blockwise")
    config = tiny_config(dirs, procs)
    lines = []
    drawn = []   # pi_ref's evaluation samples: drawn and judged once for the policy and decoders
    real_reference = eval_harness.reference_samples
    monkeypatch.setattr(eval_harness, "reference_samples",
                        lambda *a, **k: drawn.append(k["temperature"]) or real_reference(*a, **k))
    res = evaluate.run(config, str(tmp_path), progress=lines.append)
    assert drawn == [1.0]
    assert any("prefix scorer" in s for s in lines) and any("selections at N=4" in s for s in lines)
    for name in ("manifest.json", "results.json", "win_rates.csv", "samples.jsonl", "policy.json",
                 "cd_tokenwise.csv", "win_rate_vs_n.png", "win_rate_vs_kl.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "win_rate_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["policy"]["checkpoint"] == dirs["policy"]
    assert manifest["config"]["eval"]["procedures"] == list(procs)
    assert manifest["inputs"]["prompts"]["path"] == dirs["prompts"]

    ids = res["prompts"]["eval_ids"]
    train_ids = res["prompts"]["scorer_train_ids"]
    assert len(ids) == B and len(train_ids) == TRAIN and not set(ids) & set(train_ids)
    rows = read_jsonl(str(tmp_path / "samples.jsonl"))
    count = {}
    for r in rows:
        count[r["method"]] = count.get(r["method"], 0) + 1
    sel_names = ("bon_selection", "rbon_kl", "rbon_wd", "uncertainty_bon")
    want = {"policy": B * M, "pi_ref": B * M, "pi_ref_candidates": B * M,
            "scorer_training/pi_ref": TRAIN * 4,
            **{f"{d}{side}": B * M for d in ("cd_tokenwise", "cd_blockwise")
               for side in ("", "/pi_ref")},
            **{f"{s}@N={n}": B * (M // n) for s in sel_names for n in NS}}
    assert count == want
    # a method's rows of a prompt are its samples 0, 1, ... in order
    for method in count:
        for pid in ids + train_ids:
            got = [r["sample"] for r in rows if r["method"] == method and r["prompt_id"] == pid]
            assert got == list(range(len(got))), (method, pid)
    prompt_of = {json.loads(x)["id"]: json.loads(x)["prompt"]
                 for x in open(dirs["prompts"], encoding="utf-8")}
    assert all(r["prompt"] == prompt_of[r["prompt_id"]] for r in rows)
    assert {r["prompt_id"] for r in rows if r["method"] == "scorer_training/pi_ref"} == \
        set(train_ids)

    # Scores: the ensemble judge (mean - 0.5 std of two reward models) in transformers.
    check = [r for r in rows if r["method"] in ("policy", "cd_blockwise")][::5]
    texts = [f"{r['prompt']}\n{r['response']}" for r in check]
    s1, s2 = transformers_scores(dirs["rm1"], texts), transformers_scores(dirs["rm2"], texts)
    np.testing.assert_allclose([r["score"] for r in check],
                               (s1 + s2) / 2 - 0.5 * np.abs(s1 - s2) / 2, atol=3e-5)

    out = res["rows"]
    for r in out:
        w = r["win_rate"]
        assert 0.0 <= w["lower"] <= w["point"] <= w["upper"] <= 1.0, r
        assert r["win_rate"]["stderr"] > 0 or r["win_rate"]["lower"] == r["win_rate"]["upper"], r
    # each decoder's standard row carries the KL its record holds: the policy's full-vocabulary
    # KL, tokenwise CD's exact KL, blockwise CD's bound
    for name, kind in (("policy", "full_vocab"), ("cd_tokenwise", "exact"),
                       ("cd_blockwise", "bound")):
        kl = res["records"][name]["kl"][kind]
        assert find(out, name, 1, "pi_ref")["kl"] == {"kind": kind, "mean": kl["mean"],
                                                       "stderr": kl["stderr"]}
    # the prefix scorer's summary: its training prompts, samples and their scores
    scored = [r["score"] for r in rows if r["method"] == "scorer_training/pi_ref"]
    scorer = res["scorer"]
    assert (scorer["train_prompts"], scorer["samples_per_prompt"], scorer["steps"]) == (TRAIN, 4, 3)
    assert scorer["reward_mean"] == pytest.approx(np.mean(scored), rel=1e-6)
    assert scorer["reward_std"] == pytest.approx(np.std(scored), rel=1e-5)
    assert manifest["seeds"] == {"eval": 0, "candidates": 1, "scorer_samples": 2,
                                 "scorer_init": 3, "split": 0}
    # The policy against pi_ref: standard, BoN_N, WoN_N by enumeration of N-subsets.
    for pol_m, ref_m, name in (("policy", "pi_ref", "policy"),
                               ("cd_tokenwise", "cd_tokenwise/pi_ref", "cd_tokenwise"),
                               ("cd_blockwise", "cd_blockwise/pi_ref", "cd_blockwise")):
        pol, ref = scores_by_prompt(rows, pol_m, ids), scores_by_prompt(rows, ref_m, ids)
        assert find(out, name, 1, "pi_ref")["win_rate"]["point"] == pytest.approx(
            np.mean([beats(p, r) for p, r in zip(pol, ref)]), abs=1e-9)
        for n in NS:
            for proc, worst, tag in (("bon", False, "BoN"), ("won", True, "WoN")):
                got = find(out, f"{name}:{proc}", n, f"{tag}_N(pi_ref)")["win_rate"]
                brute = np.mean([beats(tuple_extremes(p, n, worst), tuple_extremes(r, n, worst))
                                 for p, r in zip(pol, ref)])
                assert got["point"] == pytest.approx(brute, abs=1e-9)
                assert got["lower"] <= got["point"] <= got["upper"]
    assert res["records"]["policy"]["kl"]["full_vocab"]["mean"] > 0  # two different models

    # Selections: recomputed from the candidate pool's scores (and pi_ref log-probs, and the
    # ensemble members' scores in transformers), then their win rates by enumeration.
    cands = {pid: sorted((r for r in rows if r["method"] == "pi_ref_candidates"
                          and r["prompt_id"] == pid), key=lambda r: r["sample"]) for pid in ids}
    texts = [f"{c['prompt']}\n{c['response']}" for pid in ids for c in cands[pid]]
    members = np.stack([transformers_scores(dirs[k], texts) for k in ("rm1", "rm2")])
    members = members.reshape(2, B, M)
    np.testing.assert_allclose([c["score"] for pid in ids for c in cands[pid]],
                               (members.mean(0) - 0.5 * members.std(0)).reshape(-1), atol=3e-5)
    ref = scores_by_prompt(rows, "pi_ref", ids)
    beta_kl, k_unc = config.select.rbon_kl_beta, config.select.uncertainty_k
    for n in NS:
        for name in sel_names:
            chosen = {pid: sorted((r for r in rows if r["method"] == f"{name}@N={n}"
                                   and r["prompt_id"] == pid), key=lambda r: r["sample"])
                      for pid in ids}
            for b, pid in enumerate(ids):
                score = np.array([c["score"] for c in cands[pid]])
                logp = np.array([c["ref_logprob"] for c in cands[pid]], np.float32)
                key = {"bon_selection": score,
                       "rbon_kl": score.astype(np.float32) + np.float32(beta_kl) * logp,
                       "uncertainty_bon": members[:, b].mean(0) - k_unc * members[:, b].std(0)
                       }.get(name)
                for g, row in enumerate(chosen[pid]):
                    assert row["n"] == n and n * g <= row["candidate"] < n * (g + 1)
                    assert row["score"] == score[row["candidate"]]
                    assert row["response"] == cands[pid][row["candidate"]]["response"]
                    if key is not None and name != "uncertainty_bon":
                        assert row["candidate"] == n * g + int(np.argmax(key[n * g:n * (g + 1)]))
                    elif key is not None:  # members recomputed in float64: allow a near tie
                        group = key[n * g:n * (g + 1)]
                        assert group[row["candidate"] - n * g] >= group.max() - 1e-4
            sel = [np.array([r["score"] for r in chosen[pid]]) for pid in ids]
            assert find(out, name, n, "pi_ref")["win_rate"]["point"] == pytest.approx(
                np.mean([beats(s, r) for s, r in zip(sel, ref)]), abs=1e-9)
            # its spread over the B prompts: the bootstrap's stderr ~ std / sqrt(B), an interval
            # at least the Student-t one, clipped to [0, 1]
            per_prompt = np.array([beats(s, r) for s, r in zip(sel, ref)])
            w = find(out, name, n, "pi_ref")["win_rate"]
            if per_prompt.std() > 0:
                assert w["stderr"] == pytest.approx(per_prompt.std() / np.sqrt(B), rel=0.3)
                half = 4.302653 * per_prompt.std(ddof=1) / np.sqrt(B)   # t_{0.975, 2}
                assert w["lower"] <= max(0.0, w["point"] - half) + 1e-9
                assert w["upper"] >= min(1.0, w["point"] + half) - 1e-9
            assert find(out, name, n, "BoN_N(pi_ref)")["win_rate"]["point"] == pytest.approx(
                np.mean([beats(s, subset_extremes(r, n)) for s, r in zip(sel, ref)]), abs=1e-9)
            assert find(out, name, n, "pi_ref")["kl"]["mean"] == pytest.approx(
                np.log(n) - ((n - 1) / n if name == "bon_selection" else 0.0))
    import csv
    with open(tmp_path / "win_rates.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(out)
    for c, r in zip(table, out):
        assert (c["procedure"], int(c["n"]), c["against"]) == (r["procedure"], r["n"], r["against"])
        assert [float(c[k]) for k in ("point", "lower", "upper", "stderr")] == \
            [r["win_rate"][k] for k in ("point", "lower", "upper", "stderr")]
        kl = r["kl"] or {}
        assert (c["kl_kind"], c["kl"]) == (kl.get("kind", ""), str(kl.get("mean", ""))), (c, r)

    # The same work dir again with fewer procedures: the decoders' records of the first run are
    # removed (they would sit beside this run's manifest as its own), the policy's rewritten,
    # with the procedures asked for only.
    lines = []
    again = evaluate.run(tiny_config(dirs, ("bon",)), str(tmp_path), progress=lines.append)
    procedures = {r["procedure"] for r in again["rows"]}
    assert "policy:bon" in procedures and not [p for p in procedures if p.endswith("won")]
    assert not any((tmp_path / f"{d}.{ext}").exists() for d in ("cd_tokenwise", "cd_blockwise")
                   for ext in ("json", "csv"))
    assert (tmp_path / "policy.json").is_file() and (tmp_path / "policy.csv").is_file()
    assert any("removed the records an earlier evaluation here wrote and this one does not: "
               "['cd_blockwise', 'cd_tokenwise']" in line for line in lines)


def test_against_plain_pi_ref_is_the_alternative_reading(dirs, tmp_path):
    """`eval.against="base"`: the policy's BoN_N / WoN_N rows are against one pi_ref sample
    (labelled "pi_ref"), recomputed by enumerating every N-subset of the saved scores."""
    res = evaluate.run(tiny_config(dirs, ("bon", "won"), eval__against="base"), str(tmp_path),
                       progress=lambda _: None)
    assert res["records"]["policy"]["win_rate_against"] == "base"
    rows, ids, out = read_jsonl(str(tmp_path / "samples.jsonl")), res["prompts"]["eval_ids"], \
        res["rows"]
    pol, ref = scores_by_prompt(rows, "policy", ids), scores_by_prompt(rows, "pi_ref", ids)
    for n in NS:
        for proc, worst in (("bon", False), ("won", True)):
            got = find(out, f"policy:{proc}", n, "pi_ref")["win_rate"]["point"]
            brute = np.mean([beats(tuple_extremes(p, n, worst), r) for p, r in zip(pol, ref)])
            assert got == pytest.approx(brute, abs=1e-9), (proc, n)
    assert not [r for r in out if r["against"].endswith("_N(pi_ref)")]
    assert res["prompts"]["scorer_train_ids"] == []   # no decoder: no prompts held for a scorer
    with pytest.raises(ValueError, match="config.eval.against"):
        evaluate.run(tiny_config(dirs, ("bon",), eval__against="plain"), str(tmp_path / "x"))


def test_policy_against_itself_is_one_half_through_the_command(dirs, tmp_path):
    workdir = tmp_path / "self"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"),
           "--config=" + os.path.join(ROOT, "configs", "evaluate.py") + ":prompts=16,samples=8",
           f"--workdir={workdir}", f"--config.policy.checkpoint={dirs['policy']}",
           f"--config.reference.checkpoint={dirs['policy']}",
           f"--config.data.prompts={dirs['prompts']}", "--config.reward.kind=hf",
           f"--config.reward.checkpoint={dirs['rm1']}", "--config.eval.procedures=('bon','won')",
           "--config.eval.max_new_tokens=4", "--config.reward.max_len=6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "INFALIGN_JAX_CACHE": "off"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((workdir / "results.json").read_text())
    # texts the reward model cut at max_len 6 are counted (they were counted nowhere)
    assert 0 < res["reward_texts_cut"] <= 2 * 16 * 8
    assert f"the reward model cut {res['reward_texts_cut']} scored texts" in proc.stdout
    assert res["records"]["policy"]["kl"]["full_vocab"]["mean"] == pytest.approx(0.0, abs=1e-5)
    for r in res["rows"]:
        w = r["win_rate"]
        assert w["lower"] <= 0.5 <= w["upper"], r
        assert abs(w["point"] - 0.5) < 0.2, r
    assert "policy:bon" in proc.stdout and len(read_jsonl(str(workdir / "samples.jsonl"))) == 2 * 16 * 8


def test_bad_procedure_names_are_refused(dirs, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"),
           f"--workdir={tmp_path / 'w'}", "--config.eval.procedures=('bon','rbon_kk')"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "config.eval.procedures: unknown procedure(s) ['rbon_kk']" in proc.stderr
    assert not (tmp_path / "w").exists()
    # uncertainty-penalised BoN needs an ensemble, named before any sampling
    config = tiny_config(dirs, ("uncertainty_bon",), reward__kind="hf",
                         reward__checkpoint=dirs["rm1"], reward__checkpoints=(),
                         reward__std_penalty=1.0)   # the default: one model reads none
    with pytest.raises(ValueError, match=r"'uncertainty_bon' needs a reward with ensemble "
                                         r"members .*kind='hf'"):
        evaluate.run(config, str(tmp_path / "u"))
    assert not (tmp_path / "u").exists()
    with pytest.raises(ValueError, match=r"config.policy.checkpoint: no such file"):
        evaluate.run(tiny_config(dirs, ("bon",), policy__checkpoint=str(tmp_path / "nope")),
                     str(tmp_path / "v"))
    with pytest.raises(ValueError, match=r"config.eval.ns must be a non-empty list of integers "
                                         r"in \[1, eval.samples=4\]"):
        evaluate.parse_config(tiny_config(dirs, ("bon",), eval__ns=(1, 8)))
    # a repeated N wrote its rows twice into win_rates.csv
    with pytest.raises(ValueError, match=r"config.eval.ns must be a list without repeats"):
        evaluate.parse_config(tiny_config(dirs, ("bon",), eval__ns=(2, 2)))
    # selections and controlled decoding read pi_ref's samples at temperature 1 (their KL bounds)
    with pytest.raises(ValueError, match=r"config.eval.temperature=0.7: the procedures "
                                         r"\['rbon_kl', 'cd_blockwise'\]"):
        evaluate.parse_config(tiny_config(dirs, ("bon", "rbon_kl", "cd_blockwise"),
                                          eval__temperature=0.7))
    assert evaluate.parse_config(tiny_config(dirs, ("bon",), eval__temperature=0.7))


def test_repeated_procedures_and_missing_or_unknown_sections_are_refused():
    from infalign_jax.workflows.evaluate_config import EvalConfig
    with pytest.raises(ValueError, match=r"config.eval.procedures must be a list without repeats"):
        EvalConfig(procedures=("bon", "won", "bon"))
    config = load_config_module(os.path.join(ROOT, "configs", "evaluate.py")).get_config()
    config.unlock()
    del config["cd"]
    with pytest.raises(ValueError, match=r"unknown \[\], missing \['cd'\]"):
        evaluate.parse_config(config)
    config.cd, config.extra = {}, {}
    with pytest.raises(ValueError, match=r"unknown \['extra'\], missing \[\]"):
        evaluate.parse_config(config)


def test_a_plain_bon_selection_against_bon_of_pi_ref_is_one_half():
    """BoN_N over N fresh pi_ref samples against BoN_N(pi_ref) from the M evaluation samples is
    exactly 1/2 in expectation; the plug-in (N of M drawn with replacement) scored 0.61 at
    N = M = 8."""
    from infalign_jax.workflows.evaluate_config import EvalConfig
    rng = np.random.default_rng(0)
    prompts, m = 3000, 8
    ref_BxM = rng.normal(size=(prompts, m))
    rows = {}
    for n in (2, 8):
        chosen_BxR = rng.normal(size=(prompts, m // n, n)).max(-1)   # disjoint groups of N
        rows[n] = evaluate._selection_rows("bon_selection", n, chosen_BxR, ref_BxM,
                                           EvalConfig(num_resamples=200))[1]
    for n, row in rows.items():
        assert row["against"] == "BoN_N(pi_ref)"
        est = row["win_rate"]
        assert abs(est["point"] - 0.5) <= 4 * est["stderr"], (n, est)


def test_overrides_of_options_no_chosen_procedure_reads_are_refused():
    """--config.select.rbon_kl_beta=5, --config.cd.lam=30, --config.cd.scorer_steps=999 with
    eval.procedures=('bon',) gave results.json identical to the run without them, and the
    manifest recorded them as used; refused, naming the procedure that would read each."""
    import dataclasses
    from infalign_jax.infra.config_utils import load_config_module, refuse_unused_overrides
    from infalign_jax.workflows import evaluate_config as ec
    fields = {f"select.{f.name}" for f in dataclasses.fields(ec.SelectConfig)} | \
        {f"cd.{f.name}" for f in dataclasses.fields(ec.CDConfig)}
    assert set(ec.OPTION_READERS) == fields            # every option has its readers
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config_module(os.path.join(root, "configs", "evaluate.py")).get_config()
    config.unlock()
    config.eval.procedures = ("bon",)
    for key, reader in (("select.rbon_kl_beta", "'rbon_kl'"), ("cd.lam", "'cd_tokenwise'"),
                        ("cd.scorer_steps", "'cd_tokenwise' or 'cd_blockwise'"),
                        ("select.uncertainty_k", "'uncertainty_bon'")):
        with pytest.raises(ValueError, match=rf"--config.{key} is not used by this run: it is "
                                             rf"read only with config.eval.procedures holding "
                                             rf"{reader}"):
            refuse_unused_overrides(config, [key], "--config.")
    config.eval.procedures = ("bon", "rbon_kl", "cd_blockwise")
    refuse_unused_overrides(config, ["select.rbon_kl_beta", "cd.scorer_steps",
                                     "cd.block_size"], "--config.")
    with pytest.raises(ValueError, match=r"--config.cd.lam is not used"):
        refuse_unused_overrides(config, ["cd.lam"], "--config.")
    # cd.top_k: the blockwise decoder reads it only through a CD-Q scorer's training
    config.cd.scorer_method = "fudge"
    with pytest.raises(ValueError, match=r"--config.cd.top_k is not used by this run: it is read "
                                         r"only with config.eval.procedures holding "
                                         r"'cd_tokenwise', or a CD procedure with "
                                         r"cd.scorer_method='cdq'"):
        refuse_unused_overrides(config, ["cd.top_k"], "--config.")
    config.cd.scorer_method = "cdq"
    refuse_unused_overrides(config, ["cd.top_k"], "--config.")
    config.cd.scorer_method = "fudge"
    config.eval.procedures = ("cd_tokenwise",)
    refuse_unused_overrides(config, ["cd.top_k"], "--config.")


def test_selections_refuse_nan_candidate_scores():
    """A NaN judge score among pi_ref's selection candidates: select_by_score passes over it, so
    a group of N was a best-of-(N - 1) reported as N; refused, naming the prompts."""
    from types import SimpleNamespace

    import jax
    from infalign_jax import models
    from infalign_jax.decoding.sampling import SamplingConfig
    from infalign_jax.workflows.evaluate_config import EvalConfig, SelectConfig
    cfg = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_len=24, init_std=0.5)
    prompt = np.tile(np.array([[3, 4, 5]], np.int32), (3, 1)) + np.arange(3)[:, None]

    def judge(prompts, texts):   # NaN on every third text
        out = np.array([float(len(t)) for t in texts])
        out[::3] = np.nan
        return out

    detok = lambda ids: " ".join(map(str, np.asarray(ids).tolist()))  # noqa: E731
    ctx = SimpleNamespace(
        ref_fns=models.decoder_fns(cfg),
        reference=SimpleNamespace(params=models.init_params(cfg, jax.random.key(0))),
        eval_BxP=prompt, eval_mask=np.ones_like(prompt, bool), judge=judge, detokenize=detok,
        eval_ids=["p0", "p1", "p2"], eval_texts=["a", "b", "c"], members=None,
        scfg=lambda n, temperature=None: SamplingConfig(n=n, max_new_tokens=4, eos_id=1))
    s = {"eval": EvalConfig(procedures=("rbon_kl",), samples=4, ns=(2, 4), num_resamples=50),
         "select": SelectConfig()}
    log = evaluate.SampleLog(detok, ctx.eval_ids, ctx.eval_texts)
    log.scores["pi_ref"] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"the judge gave NaN for 4 of pi_ref's 12 selection "
                                         r"candidates \(prompts \['p0', 'p1', 'p2'\]\)"):
        evaluate.run_selections(s, ctx, log, print)


def test_rbon_wd_embeds_the_response_tokens_themselves(dirs):
    """The embedding pooled the states predicting each response token: the prompt's last state
    (alike for every candidate) and not the response's last token, so [10, 11, 12] and
    [10, 11, 13] had cosine 1. It pools the states at the response tokens, which a transformers
    forward pass gives independently."""
    import torch
    from infalign_jax.rl.tasks import sources
    from infalign_jax import models
    ref = sources.load_policy(sources.PolicyConfig(dirs["reference"]))
    fns = models.decoder_fns(ref.model_cfg)
    prompt = np.array([[3, 4, 5]], np.int32)
    pmask = np.ones_like(prompt, bool)
    resp = np.array([[10, 11, 12, 0], [10, 11, 13, 0]], np.int32)
    rmask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)
    _, emb = evaluate._candidate_features(fns, ref.params, prompt, pmask, resp, rmask, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs["reference"]).eval()
    want = []
    for row in resp:
        ids = torch.tensor(np.concatenate([prompt[0], row[:3]])[None], dtype=torch.long)
        with torch.no_grad():
            h = hf(ids, output_hidden_states=True).hidden_states[-1][0, 3:].numpy()
        want.append(h.mean(0))
    np.testing.assert_allclose(emb[0], np.stack(want), atol=2e-5)
    cos = emb[0, 0] @ emb[0, 1] / np.linalg.norm(emb[0, 0]) / np.linalg.norm(emb[0, 1])
    assert cos < 0.9999


@pytest.mark.parametrize("decoder", ["cd_blockwise", "cd_tokenwise"])
def test_a_decoder_whose_scorer_cannot_rank_its_candidates_is_refused(dirs, tmp_path,
                                                                       monkeypatch, decoder):
    """A prefix scorer whose values are NaN leaves blockwise CD keeping unguided pi_ref blocks
    and tokenwise CD with no distribution to sample from; the run refuses to report that decoder
    (`run_decoders` checks each decoder's unscored counts) and writes no results."""
    import jax
    trained = evaluate.train_scorer
    monkeypatch.setattr(evaluate, "train_scorer", lambda *a: (
        lambda cfg, params, summary: (cfg, jax.tree.map(lambda x: x * np.nan, params),
                                      summary))(*trained(*a)))
    with pytest.raises(ValueError, match=rf"evaluate: {decoder}: the prefix scorer's values "
                                         r"\(NaN or infinite\) could not rank the candidates"):
        evaluate.run(tiny_config(dirs, ("bon", decoder)), str(tmp_path), progress=lambda s: None)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_texts_cut_are_counted_once_when_the_members_score_the_candidates_again(dirs, tmp_path):
    """uncertainty_bon scores the candidate pool with each ensemble member again: their cuts
    were counted a second time (27 texts cut read 36)."""
    got = {}
    for procs in (("rbon_kl",), ("rbon_kl", "uncertainty_bon")):
        config = tiny_config(dirs, procs, reward__max_len=6)
        res = evaluate.run(config, str(tmp_path / "_".join(procs)), progress=lambda s: None)
        got[procs] = res["reward_texts_cut"]
    assert got[("rbon_kl",)] > 0 and len(set(got.values())) == 1, got


def test_each_selection_is_its_procedures_argmax_within_a_group():
    """`_select` on hand-made groups: each procedure picks the argmax of its own score with its
    own option (RBoN-KL r + beta_kl log pi_ref, RBoN-WD r + beta_wd x mean cosine over the group,
    self included, uncertainty BoN mean - k std over the members), recomputed in numpy."""
    import jax.numpy as jnp
    from infalign_jax.workflows.evaluate_config import SelectConfig
    rng = np.random.default_rng(3)
    g, n, d, e = 64, 4, 5, 3
    sc, logp = rng.normal(size=(g, n)), rng.normal(-8, 4, size=(g, n))
    emb, members = rng.normal(size=(g, n, d)), rng.normal(size=(e, g, n))
    sel = SelectConfig(rbon_kl_beta=0.3, rbon_wd_beta=2.0, uncertainty_k=1.5)
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    cos = np.einsum("gid,gjd->gij", unit, unit).mean(-1)
    want = {"bon_selection": sc, "rbon_kl": sc + 0.3 * logp, "rbon_wd": sc + 2.0 * cos,
            "uncertainty_bon": members.mean(0) - 1.5 * members.std(0)}
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    for name, key in want.items():
        choice = evaluate._select(name, f32(sc), f32(logp), f32(emb), f32(members), sel)
        np.testing.assert_array_equal(np.asarray(choice.index_B), key.argmax(1), err_msg=name)


def test_candidate_log_probs_are_pi_refs_of_each_prompts_own_responses(dirs):
    """log pi_ref(y | x) of each candidate (RBoN-KL's regulariser, samples.jsonl's ref_logprob):
    the sum over the response tokens of transformers' log-softmax, each response after its own
    prompt (two prompts of different lengths, two candidates each)."""
    import torch
    from infalign_jax.rl.tasks import sources
    from infalign_jax import models
    ref = sources.load_policy(sources.PolicyConfig(dirs["reference"]))
    fns = models.decoder_fns(ref.model_cfg)
    prompt = np.array([[0, 3, 4], [5, 6, 7]], np.int32)     # left-padded: prompt 0 is [3, 4]
    pmask = prompt != 0
    resp = np.array([[10, 11, 12, 0], [10, 13, 0, 0], [20, 21, 22, 23], [9, 1, 0, 0]], np.int32)
    rmask = resp != 0
    logp, _ = evaluate._candidate_features(fns, ref.params, prompt, pmask, resp, rmask, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs["reference"]).eval()
    want = np.zeros((2, 2))
    for b in range(2):
        for j in range(2):
            x, y = prompt[b][pmask[b]], resp[2 * b + j][rmask[2 * b + j]]
            ids = torch.tensor(np.concatenate([x, y])[None], dtype=torch.long)
            with torch.no_grad():
                lp = torch.log_softmax(hf(ids).logits[0].double(), -1).numpy()
            want[b, j] = sum(lp[len(x) - 1 + t, y[t]] for t in range(len(y)))
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- steps on hand-made contexts
def _selection_ctx(judge, members=None):
    """The parts of `_Context` that `run_selections` reads: three prompts [3, 4, 5] + b of a
    random one-layer model (vocabulary 32), token ids joined by spaces as their text."""
    from types import SimpleNamespace

    import jax
    from infalign_jax import models
    from infalign_jax.decoding.sampling import SamplingConfig
    cfg = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_len=24, init_std=0.5)
    prompt = np.tile(np.array([[3, 4, 5]], np.int32), (3, 1)) + np.arange(3)[:, None]
    detok = lambda ids: " ".join(map(str, np.asarray(ids).tolist()))  # noqa: E731
    return SimpleNamespace(
        ref_fns=models.decoder_fns(cfg),
        reference=SimpleNamespace(params=models.init_params(cfg, jax.random.key(0))),
        eval_BxP=prompt, eval_mask=np.ones_like(prompt, bool), judge=judge, detokenize=detok,
        eval_ids=["p0", "p1", "p2"], eval_texts=["first one", "second one", "third one"],
        members=members, cut=lambda: 0, rescored_cuts=0,
        scfg=lambda n, temperature=None: SamplingConfig(n=n, max_new_tokens=4, eos_id=1))


def _hashed_judge(salt):
    """judge(prompts, texts): a hash of (salt, prompt, text) in [0, 1), so a text scored after
    another prompt gets another score."""
    import zlib
    return lambda prompts, texts: np.array([zlib.crc32(f"{salt}|{p}|{t}".encode()) / 2 ** 32
                                            for p, t in zip(prompts, texts)])


def _text_length(prompts, texts):
    return np.array([float(len(t)) for t in texts])


def test_uncertainty_bon_members_score_each_candidate_after_its_own_prompt():
    """uncertainty BoN's members score the candidate pool again: candidate j of prompt b with
    prompt b's text. Members given prompt r % B for candidate r (not r // M) ranked the
    candidates by their scores after other prompts. The choice of every group is recomputed
    here from samples' prompt and response with members that hash (prompt, text)."""
    from infalign_jax.workflows.evaluate_config import EvalConfig, SelectConfig
    members = [_hashed_judge(0), _hashed_judge(1)]
    ctx = _selection_ctx(_text_length, members)
    m, ns, k = 8, (2, 4), 1.0
    s = {"eval": EvalConfig(procedures=("uncertainty_bon",), samples=m, ns=ns,
                            num_resamples=20), "select": SelectConfig(uncertainty_k=k)}
    log = evaluate.SampleLog(ctx.detokenize, ctx.eval_ids, ctx.eval_texts)
    log.scores["pi_ref"] = np.zeros((3, m))
    evaluate.run_selections(s, ctx, log, lambda _: None)
    cands = [r for r in log.rows if r["method"] == "pi_ref_candidates"]
    assert [(r["prompt_id"], r["sample"]) for r in cands] == \
        [(pid, j) for pid in ctx.eval_ids for j in range(m)]
    scores = np.array([[j([r["prompt"]], [r["response"]])[0] for r in cands] for j in members])
    key = (scores.mean(0) - k * scores.std(0)).reshape(3, m)
    for n in ns:
        chosen = [r for r in log.rows if r["method"] == f"uncertainty_bon@N={n}"]
        assert len(chosen) == 3 * (m // n)
        for r in chosen:
            b, g = ctx.eval_ids.index(r["prompt_id"]), r["sample"]
            group = key[b, n * g:n * (g + 1)]
            assert n * g <= r["candidate"] < n * (g + 1)
            assert group[r["candidate"] - n * g] >= group.max() - 1e-5, (n, r, group)


def test_a_selection_that_leaves_a_group_no_valid_candidate_is_refused(monkeypatch):
    """RBoN-WD disqualifies a candidate whose embedding is not finite. A group with none left
    selects index -1, which was reported as candidate N g - 1 of the group (another group's; for
    a prompt's first group, the score of its last candidate with the previous prompt's last
    response in samples.jsonl); refused instead, naming the procedure."""
    from infalign_jax.workflows.evaluate_config import EvalConfig, SelectConfig
    features = evaluate._candidate_features

    def infinite_embeddings_for_prompt_1(*args):
        logp, emb = features(*args)
        emb = np.array(emb)
        emb[1] = np.inf
        return logp, emb

    monkeypatch.setattr(evaluate, "_candidate_features", infinite_embeddings_for_prompt_1)
    ctx = _selection_ctx(_text_length)
    s = {"eval": EvalConfig(procedures=("rbon_wd",), samples=4, ns=(2,), num_resamples=20),
         "select": SelectConfig(rbon_wd_beta=1.0)}
    log = evaluate.SampleLog(ctx.detokenize, ctx.eval_ids, ctx.eval_texts)
    log.scores["pi_ref"] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"^rbon_wd at N=2: 2 prompt row\(s\) have no valid, "
                                         r"non-NaN candidate \(rows \['p1 candidates 0-1', "
                                         r"'p1 candidates 2-3'\]\)"):
        evaluate.run_selections(s, ctx, log, lambda _: None)


def test_the_prefix_scorer_trains_on_each_response_with_its_own_prompt_score_and_next_tokens(
        dirs, monkeypatch):
    """The scorer's training batch, row i = sample i % N of training prompt i // N: its prompt
    and its own judge score (scores laid out sample-major gave each response another's), and for
    CD-Q pi_ref's top-k next tokens after each response prefix (no test ran CD-Q's branch).
    Checked against the judge and transformers; the summary counts the 3 training prompts (not
    the 2 evaluation prompts)."""
    from types import SimpleNamespace

    import jax
    import torch
    from infalign_jax import models
    from infalign_jax.data.tokenize import detokenizer, encode_prompts, special_ids
    from infalign_jax.decoding.sampling import SamplingConfig
    from infalign_jax.rewards import prefix_scorers
    from infalign_jax.rl.tasks import sources
    from infalign_jax.workflows.evaluate_config import CDConfig, EvalConfig
    ref = sources.load_policy(sources.PolicyConfig(dirs["reference"]))
    texts = ["w3 w4", "w5 w6 w7", "w8"]
    prompt, pmask = encode_prompts(ref.tokenizer, texts, False)
    eos, pad = special_ids(ref.tokenizer)
    judge, detok = _hashed_judge(0), detokenizer(ref.tokenizer)
    ctx = SimpleNamespace(
        ref_fns=models.decoder_fns(ref.model_cfg), reference=ref, judge=judge, detokenize=detok,
        train_BxP=prompt, train_mask=pmask, train_ids=["t0", "t1", "t2"], train_texts=texts,
        eval_ids=["e0", "e1"], eval_texts=texts[:2], eval_BxP=prompt[:2],
        scfg=lambda n, temperature=None: SamplingConfig(n=n, max_new_tokens=4,
                                                        temperature=temperature, eos_id=eos,
                                                        pad_id=pad))
    seen = []
    make_step = prefix_scorers.make_scorer_step

    def recording_step(*args):
        step = make_step(*args)

        def record_then_step(state, batch):
            jax.debug.callback(lambda b: seen.append(jax.tree.map(np.asarray, b)), batch)
            return step(state, batch)
        return record_then_step

    monkeypatch.setattr(prefix_scorers, "make_scorer_step", recording_step)
    n, top_k = 2, 3
    s = {"eval": EvalConfig(procedures=("cd_blockwise",), max_new_tokens=4, samples=4,
                            ns=(1,)),
         "cd": CDConfig(scorer_method="cdq", scorer_samples=n, scorer_steps=1, top_k=top_k,
                        scorer_d_model=8, scorer_layers=1)}
    log = evaluate.SampleLog(detok, ctx.eval_ids, ctx.eval_texts)
    _, _, summary = evaluate.train_scorer(s, ctx, log, lambda _: None)
    jax.effects_barrier()
    (batch,) = seen
    assert (summary["method"], summary["train_prompts"], summary["samples_per_prompt"]) == \
        ("cdq", 3, n)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs["reference"]).eval()
    resp, rmask = batch["response_BxL"], batch["response_mask_BxL"].astype(bool)
    assert resp.shape[0] == 3 * n and rmask.sum(1).min() > 0
    for i in range(3 * n):
        np.testing.assert_array_equal(batch["prompt_BxP"][i], prompt[i // n])
        np.testing.assert_array_equal(batch["prompt_mask_BxP"][i], pmask[i // n])
        x, y = prompt[i // n][pmask[i // n]], resp[i][rmask[i]]
        assert batch["final_reward_B"][i] == np.float32(judge([detok(x)], [detok(y)])[0]), i
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor(np.concatenate([x, y])[None],
                                                   dtype=torch.long)).logits[0].double(), -1)
        for t in range(len(y)):     # after response token t: sequence position len(x) + t
            want_lp, want_ids = torch.topk(lp[len(x) + t], top_k)
            np.testing.assert_array_equal(batch["next_ids_BxLxJ"][i, t], want_ids.numpy())
            np.testing.assert_allclose(batch["ref_next_logprobs_BxLxJ"][i, t], want_lp.numpy(),
                                       atol=1e-4)
    assert summary["reward_mean"] == pytest.approx(batch["final_reward_B"].mean(), rel=1e-6)


def _reference_dir(path, vocab, **changes):
    """A tiny causal LM like the `dirs` ones with a word-level tokenizer over `vocab` and
    `changes` to its Llama config."""
    from workflow_files import _tokenizer
    tok = _tokenizer(vocab, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    save_tiny(str(path), transformers.LlamaConfig(
        vocab_size=len(tok), pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        **{**TINY, **changes}), seed=9)
    tok.save_pretrained(str(path))
    return str(path)


def _policy_vocab():
    return {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


def test_a_reference_with_another_tokenizer_or_vocabulary_is_refused(dirs, tmp_path):
    """pi_ref must encode the prompts as the policy does. A reference whose tokenizer maps the
    same words to other ids, in a vocabulary of the same size, was evaluated: the win rates on
    other prompts, the KL between unrelated token ids. Refused before any sampling, as is one
    with a larger vocabulary (same ids for the words)."""
    perm = np.random.default_rng(1).permutation(len(WORDS))
    permuted = {"<pad>": 0, "<eos>": 1, "<unk>": 2,
                **{WORDS[j]: 3 + i for i, j in enumerate(perm)}}
    larger = {**_policy_vocab(), "w_extra": 3 + len(WORDS)}
    for name, vocab in (("permuted", permuted), ("larger", larger)):
        ref = _reference_dir(tmp_path / name, vocab)
        with pytest.raises(ValueError, match=r"config.reference.checkpoint: its tokenizer or "
                                             r"vocabulary differs"):
            evaluate.run(tiny_config(dirs, ("bon",), reference__checkpoint=ref),
                         str(tmp_path / f"run_{name}"), progress=lambda _: None)
        assert not (tmp_path / f"run_{name}").exists()


def test_pi_ref_of_another_architecture_is_run_with_its_own_config(dirs, tmp_path):
    """pi_ref's model functions come from its own config: a reference with 2 attention heads of
    16 (the policy: 4 of 8, the same 32 x 32 query projection) run with the policy's functions
    fails on the per-head weight shapes, and where the shapes agree computes another model. The
    run's pi_ref logits on the evaluation prompts are the reference's in transformers."""
    import torch
    ref = _reference_dir(tmp_path / "ref", _policy_vocab(), num_attention_heads=2,
                         num_key_value_heads=1)
    s = evaluate.parse_config(tiny_config(dirs, ("bon",), reference__checkpoint=ref))
    ctx = evaluate._Context(s, evaluate._split(s, 0)[1])
    logits = np.asarray(ctx.ref_fns.logits(ctx.reference.params, ctx.eval_BxP, ctx.eval_mask))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref).eval()
    for row, mask, got in zip(ctx.eval_BxP, ctx.eval_mask, logits):
        with torch.no_grad():
            want = hf(torch.tensor(row[mask][None], dtype=torch.long)).logits[0].numpy()
        np.testing.assert_allclose(got[mask], want, atol=2e-4)


def test_prompts_a_run_trained_on_are_counted_in_the_scorer_prompts_too(dirs, tmp_path):
    """A real-task CTRL run's training prompts are passed over for the evaluation prompts and
    the prefix scorer's training prompts alike; `prompts.held_out.left_out` counted only those
    that would have been evaluation prompts. Here the run trained on 2 prompts: one the plain
    split would evaluate on, one it would train the scorer on."""
    from infalign_jax.rl.tasks import sources
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    task = {"name": "helpfulness", "num_prompts": 2, "eval_prompts": 2,
            "data": {"prompts": dirs["prompts"]}}
    (run / "manifest.json").write_text(json.dumps({"config": {"task": task}}))
    trained = set(sources.split_prompts(dirs["prompts"], 2, 2, seed=0).train_texts)
    plain = sources.split_prompts(dirs["prompts"], TRAIN, B, seed=0)
    assert len(trained & set(plain.eval_texts)) == 1 and len(trained & set(plain.train_texts)) == 1
    said = []
    s = evaluate.parse_config(tiny_config(dirs, ("bon", "cd_tokenwise"),
                                          policy__checkpoint=str(run)))
    _, split, check = evaluate._held_out_split(s, TRAIN, said.append)
    assert (len(split.eval_texts), len(split.train_texts)) == (B, TRAIN)
    assert not trained & set(split.eval_texts + split.train_texts)
    assert check == {"policy_training_prompts": 2, "left_out": 2, "merged": 0}
    assert said == [f"evaluate: passed over 2 prompts of {dirs['prompts']} that the policy's run "
                    f"trained on (2 training prompts)"]
