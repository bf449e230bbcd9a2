"""The real-task comparison (workflows/real_comparison.py) at smoke size on tiny models it builds:
every method x 2 seeds trains, is evaluated on the held-out prompts against shared pi_ref samples
under the gold judge and the proxy reward model, and the saved numbers are recomputed here."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from infalign_jax.core.calibration import ReferenceTable
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.workflows import comparison_report as report, kl_match, real_comparison as rc
from workflow_files import save_policy, save_reward_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# trained end to end here (raw and BoNBoN differ only in their run config, checked below)
TRAINED_HERE = "vbon,identity,exp,bon_ref"


def _brute_force(pol_M, ref_M, n, procedure):
    """P(T(pi) > T(pi_ref)) + 1/2 P(=) over every n-tuple (with replacement) of each side."""
    pick = max if procedure == "bon" else min
    total = 0.0
    tuples = list(itertools.product(range(len(pol_M)), repeat=n))
    for a in tuples:
        for b in tuples:
            x, y = pick(pol_M[i] for i in a), pick(ref_M[j] for j in b)
            total += (x > y) + 0.5 * (x == y)
    return total / len(tuples) ** 2


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    policy = save_policy(root / "policy")
    rm = save_reward_model(root / "rm", seed=3)
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=harmlessness")
    config.base.task.policy.checkpoint = policy
    config.base.task.reward.kind = "hf"
    config.base.task.reward.checkpoint = rm
    config.comparison.methods = TRAINED_HERE
    # the plug-in (not the default), so a rerun can re-estimate with the unbiased estimator
    config.comparison.win_rates = "plugin"
    lines = []
    workdir = str(root / "out")
    path = rc.run(rc.task_configs(config), config.comparison, workdir, log=lines.append,
                  devices=jax.devices()[:1])
    return dict(config=config, workdir=workdir, path=path, lines=lines)


def test_every_method_and_seed_is_evaluated_and_reported(comparison):
    cc = rc.parse_comparison(comparison["config"].comparison)
    out = os.path.join(comparison["workdir"], "harmlessness")
    for method in TRAINED_HERE.split(","):
        for seed in cc.seeds:
            assert os.path.exists(os.path.join(out, "evaluation", f"{method}_seed{seed}.npz"))
            if method != "bon_ref":
                assert os.path.exists(os.path.join(out, method, f"seed={seed}", "manifest.json"))
    text = open(comparison["path"]).read()
    for method in TRAINED_HERE.split(","):
        assert f"| {method} |" in text
    assert "(b) | CTRL exp t<0 beats calibrated identity on WoN_2" in text
    assert os.path.exists(os.path.join(out, "win_rate_vs_kl.png"))
    assert os.path.exists(os.path.join(comparison["workdir"], "manifest.json"))
    rows = [json.loads(x) for x in open(os.path.join(out, "evaluation", "exp_seed1_texts.jsonl"))]
    assert len(rows) == 4 * 2 and {"prompt_id", "prompt", "response", "gold", "proxy"} <= set(rows[0])


def test_saved_win_rates_match_brute_force_enumeration(comparison):
    ev = os.path.join(comparison["workdir"], "harmlessness", "evaluation")
    ref = np.load(os.path.join(ev, "pi_ref.npz"))
    for method in ("identity", "exp", "bon_ref"):
        got = np.load(os.path.join(ev, f"{method}_seed0.npz"))
        for judge in ("gold", "proxy"):
            pol_BxM, ref_BxM = got[f"{judge}_BxM"], ref[f"{judge}_BxM"]
            for b in range(pol_BxM.shape[0]):
                for proc in ("bon", "won"):
                    want = _brute_force(pol_BxM[b], ref_BxM[b], 2, proc)
                    assert got[f"{judge}_{proc}2_B"][b] == pytest.approx(want, abs=1e-12)
                assert got[f"{judge}_standard_B"][b] == pytest.approx(
                    _brute_force(pol_BxM[b], ref_BxM[b], 1, "bon"), abs=1e-12)
    bon = np.load(os.path.join(ev, "bon_ref_seed0.npz"))
    np.testing.assert_allclose(bon["kl_B"], np.log(2) - 0.5)


def test_a_rerun_with_the_unbiased_estimator_re_reports_the_saved_scores(comparison, tmp_path):
    """`comparison.win_rates="unbiased"` into a copy of the finished work dir: nothing is trained
    or evaluated again, and every row's BoN_2 / WoN_2 is now max (min) of a policy's 2 samples
    against max (min) of pi_ref's 2, over the saved scores (M = N = 2: one subset a side)."""
    workdir = str(tmp_path / "out")
    shutil.copytree(comparison["workdir"], workdir)
    config = comparison["config"]
    config.comparison.win_rates = "unbiased"
    lines = []
    try:
        path = rc.run(rc.task_configs(config), config.comparison, workdir, log=lines.append,
                      devices=jax.devices()[:1])
    finally:
        config.comparison.win_rates = "plugin"
    assert not any(": training (" in line for line in lines), lines
    # compared with the saved pi_ref samples the saved evaluations were scored against
    assert any("pi_ref's saved evaluation samples loaded" in line for line in lines), lines
    assert not any("pi_ref sampled" in line for line in lines), lines
    assert "unbiased: N of the M samples drawn without replacement" in open(path).read()
    ev = os.path.join(workdir, "harmlessness", "evaluation")
    ref = np.load(os.path.join(ev, "pi_ref.npz"))["gold_BxM"]
    summary = json.load(open(os.path.join(workdir, "comparison.json")))[0]
    rows = {r["method"]: r for r in summary["rows"]}
    for method in ("identity", "exp"):
        pol = [np.load(os.path.join(ev, f"{method}_seed{s}.npz"))["gold_BxM"] for s in (0, 1)]
        for proc, pick in (("bon", np.max), ("won", np.min)):
            want = np.mean([np.mean((pick(p, 1) > pick(ref, 1)) + 0.5 * (pick(p, 1) == pick(ref, 1)))
                            for p in pol])
            assert rows[method][f"gold_{proc}2"] == pytest.approx(want, abs=1e-12)
    # the evaluation files were re-estimated too, and say by what
    saved = np.load(os.path.join(ev, "identity_seed0.npz"))
    assert str(saved["win_rate_estimator"]) == "unbiased"
    np.testing.assert_array_equal(saved["gold_bon2_B"],
                                  (saved["gold_BxM"].max(1) > ref.max(1))
                                  + 0.5 * (saved["gold_BxM"].max(1) == ref.max(1)))
    assert json.load(open(os.path.join(workdir, "comparison.json")))[0]["win_rates"] == "unbiased"


def test_a_rerun_with_more_seeds_keeps_the_kl_target_the_saved_runs_matched(comparison,
                                                                            tmp_path, monkeypatch):
    """A third seed of vBoN moves its mean KL; the new identity seed is still controlled towards
    the first run's target, which the saved identity seeds were matched to."""
    workdir = str(tmp_path / "out")
    shutil.copytree(comparison["workdir"], workdir)
    task_dir = os.path.join(workdir, "harmlessness")
    first = json.load(open(os.path.join(task_dir, "kl_target.json")))["kl_target"]
    config = comparison["config"]
    config.comparison.seeds, config.comparison.methods = (0, 1, 2), "vbon,identity"
    lines = []
    matched = []
    match_kl = kl_match.match_kl

    def recording(evaluate, ref_params, params, target, band, *args, **kwargs):
        matched.append((target, band))
        return match_kl(evaluate, ref_params, params, target, band, *args, **kwargs)

    monkeypatch.setattr(kl_match, "match_kl", recording)
    try:
        rc.run(rc.task_configs(config), config.comparison, workdir, log=lines.append,
               devices=jax.devices()[:1])
    finally:
        config.comparison.seeds, config.comparison.methods = (0, 1), TRAINED_HERE
    ev = os.path.join(task_dir, "evaluation")
    three = np.mean([np.load(os.path.join(ev, f"vbon_seed{s}.npz"))["kl_B"].mean()
                     for s in (0, 1, 2)])
    assert three != pytest.approx(first, abs=1e-9)
    assert any("kept from the first run" in line for line in lines), lines
    manifest = json.load(open(os.path.join(task_dir, "identity", "seed=2", "manifest.json")))
    assert manifest["config"]["rl"]["kl_target"] == pytest.approx(first, abs=1e-12)
    # the new vBoN seed still trains at its own beta 1 / (N - 1), not under the controller
    rl = json.load(open(os.path.join(task_dir, "vbon", "seed=2", "manifest.json")))["config"]["rl"]
    assert rl["beta_schedule"] != "adaptive" and rl["beta"] == pytest.approx(1.0)
    # ... and is evaluated as trained; only the new identity seed is moved to the target KL,
    # within half the tolerance that flags a row
    assert "alpha" not in np.load(os.path.join(ev, "vbon_seed2.npz"))
    cc = rc.parse_comparison(config.comparison)
    assert matched == [(pytest.approx(first, abs=1e-12), cc.kl_tolerance / 2)]
    summary = json.load(open(os.path.join(workdir, "comparison.json")))[0]
    assert summary["kl_target"] == pytest.approx(first, abs=1e-12)
    # without vBoN among the methods the saved target still applies (BoNBoN's new runs would be
    # moved to it; bon_ref here, which reports against it)
    config.comparison.methods = "bon_ref"
    try:
        rc.run(rc.task_configs(config), config.comparison, workdir, log=lines.append,
               devices=jax.devices()[:1])
    finally:
        config.comparison.methods = TRAINED_HERE
    summary = json.load(open(os.path.join(workdir, "comparison.json")))[0]
    assert summary["kl_target"] == pytest.approx(first, abs=1e-12)
    # a work dir from before kl_target.json: the target comes back from a controlled run's config
    os.remove(os.path.join(task_dir, "kl_target.json"))
    assert rc._saved_kl_target(task_dir, lines.append) == pytest.approx(first, abs=1e-12)
    assert json.load(open(os.path.join(task_dir, "kl_target.json")))["kl_target"] == \
        pytest.approx(first, abs=1e-12)
    # saved pi_ref samples of another shape are refused, not compared with
    ref_path = os.path.join(task_dir, "evaluation", "pi_ref.npz")
    ref = dict(np.load(ref_path))
    np.savez(ref_path, **{k: v[:, :1] if v.ndim == 2 else v for k, v in ref.items()})
    with pytest.raises(ValueError, match=r"saved pi_ref evaluation's gold_BxM has shape \(4, 1\)"):
        rc.run(rc.task_configs(config), config.comparison, workdir, log=lines.append,
               devices=jax.devices()[:1])


def test_kl_target_is_vbons_held_out_kl_and_the_summary_is_its_data(comparison):
    out = os.path.join(comparison["workdir"], "harmlessness")
    ev = os.path.join(out, "evaluation")
    vbon_kl = np.mean([np.load(os.path.join(ev, f"vbon_seed{s}.npz"))["kl_B"].mean()
                       for s in (0, 1)])
    for method in ("identity", "exp"):
        manifest = json.load(open(os.path.join(out, method, "seed=1", "manifest.json")))
        rl = manifest["config"]["rl"]
        assert rl["beta_schedule"] == "adaptive" and rl["kl_target"] == pytest.approx(vbon_kl)
    manifest = json.load(open(os.path.join(out, "vbon", "seed=0", "manifest.json")))
    assert manifest["config"]["rl"]["beta"] == pytest.approx(1.0)  # 1 / (N - 1), N = 2
    # the target-setting vBoN is evaluated as trained; the others moved towards the target KL
    assert "alpha" not in np.load(os.path.join(ev, "vbon_seed0.npz"))
    cc = rc.parse_comparison(comparison["config"].comparison)
    for method, seed in itertools.product(("identity", "exp"), (0, 1)):
        got = np.load(os.path.join(ev, f"{method}_seed{seed}.npz"))
        hist = got["alpha_history_Ax2"]
        assert hist[0, 0] == 1.0 and len(hist) <= 1 + cc.kl_match_tries
        # the saved evaluation is the recorded one nearest the target, at the saved alpha
        nearest = hist[np.argmin(np.abs(hist[:, 1] / vbon_kl - 1))]
        assert (float(got["alpha"]), got["kl_B"].mean()) == pytest.approx(tuple(nearest))
        if len(hist) < 1 + cc.kl_match_tries and 0 < hist[-1, 0] < kl_match.MAX_ALPHA \
                and hist[-1, 1] > 0:   # stopped early, not at a limit: in band
            assert abs(hist[-1, 1] / vbon_kl - 1) <= cc.kl_tolerance / 2
    summary = json.load(open(os.path.join(comparison["workdir"], "comparison.json")))[0]
    assert summary["kl_target"] == pytest.approx(vbon_kl)
    assert json.load(open(os.path.join(out, "kl_target.json")))["kl_target"] == \
        pytest.approx(vbon_kl)
    d = summary["differences_vs_identity"]["exp"]["gold_won2"]
    per = {m: np.mean([np.load(os.path.join(ev, f"{m}_seed{s}.npz"))["gold_won2_B"].mean()
                       for s in (0, 1)]) for m in ("exp", "identity")}
    assert d["point"] == pytest.approx(per["exp"] - per["identity"], abs=1e-12)
    assert d["lower"] <= d["point"] <= d["upper"]


def test_gain_over_pi_ref_is_the_win_rate_above_one_half_with_its_interval(comparison):
    """Each method's gain over pi_ref: mean over seeds and prompts of its win rate - 1/2, under
    the gold judge and the proxy, with a bootstrap interval around it; rendered with both judges
    (the fixture's proxy is not the gold judge)."""
    ev = os.path.join(comparison["workdir"], "harmlessness", "evaluation")
    summary = json.load(open(os.path.join(comparison["workdir"], "comparison.json")))[0]
    assert not summary["same_judge"] and set(summary["gain_over_ref"]) == set(
        TRAINED_HERE.split(","))
    for method, key in itertools.product(("identity", "bon_ref"),
                                         ("gold_standard", "gold_won2", "proxy_standard")):
        per_SxB = np.stack([np.load(os.path.join(ev, f"{method}_seed{s}.npz"))[key + "_B"]
                            for s in (0, 1)])
        got = summary["gain_over_ref"][method][key]
        assert got["point"] == pytest.approx(per_SxB.mean() - 0.5, abs=1e-12)
        assert got["lower"] <= got["point"] <= got["upper"]
        # an interval of width 0 only where every prompt's win rate is the same (e.g. all ties)
        assert (got["lower"] < got["upper"]) == (per_SxB.std() > 0), (method, key)
    text = open(comparison["path"]).read()
    assert "Gain over pi_ref" in text and "| method | gold_standard | gold_won2 | proxy_standard " \
        "| proxy_won2 |" in text


def test_a_second_run_reuses_every_evaluation(comparison):
    lines = []
    rc.run(rc.task_configs(comparison["config"]), comparison["config"].comparison,
           comparison["workdir"], log=lines.append, devices=jax.devices()[:1])
    assert not [x for x in lines if "steps) ..." in x]


def test_an_evaluation_killed_while_saving_is_evaluated_again(tmp_path, monkeypatch):
    """A run killed while saving an evaluation leaves no file a rerun would take as done: the
    npz (the rerun's marker) appears whole or not at all, and after its texts."""
    ev = {"gold_BxM": np.arange(6.0).reshape(2, 3), "proxy_BxM": -np.arange(6.0).reshape(2, 3),
          "kl_B": np.array([0.1, 0.2]), "texts": [f"response {i}" for i in range(6)]}
    path = str(tmp_path / "evaluation" / "exp_seed0.npz")
    ids, prompts = ["p0", "p1"], ["first prompt", "second prompt"]

    def killed_midway(file, **arrays):   # part of a zip written, then the kill
        if isinstance(file, (str, os.PathLike)):
            file = open(file, "wb")
        file.write(b"PK\x03\x04 a torn archive")
        file.flush()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(np, "savez", killed_midway)
        with pytest.raises(KeyboardInterrupt):
            rc._save_eval(path, ev, ids, prompts, 3)
    assert rc._load_eval(path) is None               # the rerun evaluates again
    assert sorted(os.listdir(tmp_path / "evaluation")) == ["exp_seed0_texts.jsonl"]

    calls = []

    def killed_in_texts(obj):
        calls.append(obj)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return json.JSONEncoder().encode(obj)

    with monkeypatch.context() as m:
        m.setattr(rc.json, "dumps", killed_in_texts)
        with pytest.raises(KeyboardInterrupt):
            rc._save_eval(path.replace("seed0", "seed1"), ev, ids, prompts, 3)
    assert not os.path.exists(path.replace("seed0", "seed1"))
    assert not os.path.exists(path.replace("seed0.npz", "seed1_texts.jsonl"))

    rc._save_eval(path, ev, ids, prompts, 3)
    saved = rc._load_eval(path)
    assert sorted(saved) == ["gold_BxM", "kl_B", "proxy_BxM"]
    np.testing.assert_array_equal(saved["proxy_BxM"], ev["proxy_BxM"])
    with open(path.replace(".npz", "_texts.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["prompt_id"], r["sample"], r["response"], r["gold"]) for r in rows] == [
        (ids[i // 3], i % 3, f"response {i}", float(i)) for i in range(6)]
    assert sorted(os.listdir(tmp_path / "evaluation")) == ["exp_seed0.npz", "exp_seed0_texts.jsonl"]


def test_bad_comparison_keys_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"config.comparison.methods must be"):
        rc.parse_comparison({"methods": "identity,ppo"})
    # no target given, no vBoN to set one: refused unless an earlier run saved one
    cc = rc.parse_comparison({"methods": "identity,exp"})
    with pytest.raises(ValueError, match=r"config.comparison.kl_target must be > 0 when 'vbon' "
                                         r"is not among .* holds no kl_target.json"):
        rc.check_kl_target(cc, str(tmp_path), print)
    base = ml_collections.ConfigDict({"task": {"name": "helpfulness"}})
    with pytest.raises(ValueError, match=r"config.comparison.kl_target must be > 0 when 'vbon'"):
        rc.run([base], cc, str(tmp_path))     # refused before the task loads anything
    assert not os.listdir(tmp_path)
    (tmp_path / "helpfulness").mkdir()
    (tmp_path / "helpfulness" / "kl_target.json").write_text(json.dumps({"kl_target": 0.3}))
    rc.check_kl_target(cc, str(tmp_path / "helpfulness"), print)   # the saved target serves
    # with a target given, the controlled methods need no vBoN to set it
    assert rc.parse_comparison({"methods": "raw,identity", "kl_target": 0.5}).method_list == [
        "raw", "identity"]
    with pytest.raises(ValueError, match=r"config.comparison.eval_samples must be >= n"):
        rc.parse_comparison({"n": 4, "eval_samples": 2})
    with pytest.raises(ValueError, match=r"config.comparison: unknown keys \['seed'\]"):
        rc.parse_comparison({"seed": 1})
    # the KL each run is matched at is estimated on the evaluation samples: pi's own
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=helpfulness")
    config.unlock()
    config.base.task.temperature = 0.7
    with pytest.raises(ValueError, match=r"config.base.task.temperature=0.7: the comparison"):
        rc.task_configs(config)


def test_comparison_options_no_method_reads_and_repeats_are_refused():
    """--config.comparison.t=8 under methods without exp made the same runs as t=4;
    kl_match_tries under kl_match='none' matched nothing; a method or task listed twice ran
    twice into one work dir."""
    from infalign_jax.infra.config_utils import refuse_unused_overrides
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke")
    config.unlock()
    config.comparison.methods = "vbon,identity"
    config.comparison.kl_match = "none"
    with pytest.raises(ValueError, match=r"^--config.comparison.t is not used by this run: it is "
                                         r"read only with comparison.methods including one that "
                                         r"reads t \('exp'\)"):
        refuse_unused_overrides(config, ["comparison.t"], "--config.")
    with pytest.raises(ValueError, match=r"comparison.kl_match_tries is not used .* "
                                         r"comparison.kl_match='interpolate'"):
        refuse_unused_overrides(config, ["comparison.kl_match_tries"], "--config.")
    config.comparison.methods = "vbon,exp"
    config.comparison.kl_match = "interpolate"
    refuse_unused_overrides(config, ["comparison.t", "comparison.kl_match_tries",
                                     "comparison.n"], "--config.")
    with pytest.raises(ValueError, match=r"comparison.methods must be a list without repeats "
                                         r"\(given twice: \['vbon'\]\)"):
        rc.parse_comparison({"methods": "vbon,identity,vbon"})
    config.tasks = "helpfulness,helpfulness"
    with pytest.raises(ValueError, match=r"config.tasks must be .* without repeats"):
        rc.task_configs(config)


def test_base_overrides_no_trained_method_reads_are_refused():
    """`--config.base.<key>` is checked against each trained method's run config; one method
    reading it is enough (kl_horizon: the KL-controlled methods), none is refused."""
    def config(**comparison):
        c = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
            "size=smoke,tasks=helpfulness")
        c.unlock()
        c.comparison.update(comparison)
        return c

    every = config()
    with pytest.raises(ValueError, match=r"^--config.base.rl.ppo_clip is not used by this run: it "
                                         r"is read only with rl.algorithm='ppo' .*\(under every "
                                         r"trained method of the comparison: raw, identity, exp, "
                                         r"vbon, bonbon\)$"):
        rc.refuse_unread_base_overrides(every, ["base.rl.ppo_clip"])
    rc.refuse_unread_base_overrides(every, ["base.rl.kl_horizon", "base.rl.learning_rate",
                                            "comparison.n", "base.bonbon.alpha"])
    # BoNBoN alone (bon_ref trains nothing): the controller's horizon is read by no run
    bonbon = config(methods="bonbon,bon_ref", kl_target=0.5)
    with pytest.raises(ValueError, match=r"base.rl.kl_horizon is not used .* and method='ctrl' "
                                         r".*\(under every trained method of the comparison: "
                                         r"bonbon\)"):
        rc.refuse_unread_base_overrides(bonbon, ["base.rl.kl_horizon"])
    rc.refuse_unread_base_overrides(bonbon, ["base.rl.learning_rate", "base.rl.lora.rank"])
    # vBoN setting the target itself trains at its fixed beta: no controller either
    with pytest.raises(ValueError, match=r"read only with rl.beta_schedule='adaptive' \(this "
                                         r"config has 'constant'\)"):
        rc.refuse_unread_base_overrides(config(methods="vbon", kl_target=0.0),
                                        ["base.rl.kl_horizon"], "real_config")
    # ... while identity, controlled towards vBoN's KL, reads it (after vBoN, which does not)
    rc.refuse_unread_base_overrides(config(methods="vbon,identity", kl_target=0.0),
                                    ["base.rl.kl_horizon"], "real_config")
    assert rc.refuse_unread_base_overrides(config(methods="vbon", kl_target=0.5),
                                           ["base.rl.kl_horizon"]) is None
    # no trained method (bon_ref alone): only the task section is read (any override passed)
    ref_only = config(methods="bon_ref")
    with pytest.raises(ValueError, match=r"^--config.base.rl.learning_rate is not used by this "
                                         r"run: config.comparison.methods='bon_ref' trains no "
                                         r"method"):
        rc.refuse_unread_base_overrides(ref_only, ["base.rl.learning_rate"])
    rc.refuse_unread_base_overrides(ref_only, ["base.task.max_new_tokens", "base.reference.k"])


def test_run_configs_of_every_method():
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=harmlessness+helpfulness")
    harm, help_ = rc.task_configs(config)
    # one prompt whose K = 4 samples are (0, 0, 0, 1): the raw tilt's KL is closed-form
    table = ReferenceTable(np.array(["p"]), np.array([[0.0, 0.0, 0.0, 1.0]]), np.array([4]),
                           "base", "judge")
    raw = rc.run_config(help_, "raw", 2, n=4, t=3.0, kl_target=0.5, table=table)
    assert raw.transform.name == "raw" and raw.seed == 2
    assert (raw.rl.beta_schedule, raw.rl.kl_target) == ("adaptive", 0.5)
    e = math.exp(1 / raw.rl.beta)
    top, rest = e / (e + 3), 1 / (e + 3)
    assert top * math.log(4 * top) + 3 * rest * math.log(4 * rest) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="needs the reference table"):
        rc.run_config(help_, "raw", 2, n=4, t=3.0, kl_target=0.5)
    with pytest.raises(ValueError, match="outside the range"):   # KL <= log 4 on 4 samples
        rc.run_config(help_, "raw", 2, n=4, t=3.0, kl_target=1.5, table=table)
    # calibrated transforms start where the tilt exp(Phi(u) / beta) of the uniform has the target
    # KL: closed form for identity, quadrature for exp (Phi = (exp(t u) - 1) / t)
    ident = rc.run_config(help_, "identity", 0, n=4, t=3.0, kl_target=0.5)
    lam = 1 / ident.rl.beta
    mean_u = 1 / (1 - math.exp(-lam)) - 1 / lam
    assert lam * mean_u + math.log(lam / math.expm1(lam)) == pytest.approx(0.5, rel=1e-3)
    exp_help = rc.run_config(help_, "exp", 0, n=4, t=3.0, kl_target=0.5)
    exp_harm = rc.run_config(harm, "exp", 0, n=4, t=3.0, kl_target=0.5)
    assert (exp_help.transform.t, exp_harm.transform.t) == (3.0, -3.0)  # BoN task t > 0, WoN t < 0
    u = (np.arange(200_000) + 0.5) / 200_000
    for cfg in (exp_help, exp_harm):
        t = cfg.transform.t
        logg = np.expm1(t * u) / t / cfg.rl.beta
        logg -= np.logaddexp.reduce(logg) - math.log(u.size)   # log density, mean of g is 1
        assert np.mean(np.exp(logg) * logg) == pytest.approx(0.5, rel=1e-3)
    vbon = rc.run_config(help_, "vbon", 0, n=4, t=3.0, kl_target=0.0)
    assert vbon.transform.name == "log" and vbon.rl.beta == pytest.approx(1 / 3)
    assert vbon.rl.beta_schedule == "constant"
    assert rc.run_config(help_, "vbon", 0, n=4, t=3.0, kl_target=0.5).rl.beta_schedule == "adaptive"
    bonbon = rc.run_config(help_, "bonbon", 1, n=4, t=3.0, kl_target=0.5)
    assert bonbon.method == "bonbon" and bonbon.bonbon.n == 4
    assert bonbon.rl.beta_schedule == "constant"   # BoNBoN has no beta to control
    # the report's "controlled" column and its optimum's transform are read off the same rules
    # that made these run configs
    for method, cfg, procedure, kl_target in (
            ("raw", raw, "bon", 0.5), ("identity", ident, "bon", 0.5), ("exp", exp_harm, "won", 0.5),
            ("vbon", vbon, "bon", 0.0), ("bonbon", bonbon, "bon", 0.5)):
        assert report.kl_controlled(method, kl_target) == (cfg.rl.beta_schedule == "adaptive")
        spec = report.calibrated_transform(method, procedure, 3.0)
        if method in ("raw", "bonbon"):
            assert spec is None
        else:
            assert spec[0] == cfg.transform.name
            assert all(cfg.transform[k] == v for k, v in spec[1].items())
    assert report.kl_controlled("vbon", 0.5)


def test_a_rerun_of_another_config_is_refused(tmp_path):
    """The work dir's evaluations are reused on a rerun only under the same config: a change to
    the trained runs or to the evaluation samples is refused by name, more seeds are not."""
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=helpfulness")
    (base,) = rc.task_configs(config)
    cc = rc.parse_comparison(config.comparison)
    task_dir = str(tmp_path / "helpfulness")
    # A first run that stopped before any output (a bad value) does not bind the directory.
    rc.check_resume(task_dir, base, rc.parse_comparison({**cc.__dict__, "eval_samples": 4}))
    rc.check_resume(task_dir, base, cc)                       # the record is rewritten
    assert json.loads(open(os.path.join(task_dir, "comparison_config.json")).read())[
        "comparison.eval_samples"] == cc.eval_samples
    with open(os.path.join(task_dir, "reference_table.npz"), "wb"):   # an output: now bound
        pass
    rc.check_resume(task_dir, base, cc)
    rc.check_resume(task_dir, base, rc.parse_comparison({**cc.__dict__, "seeds": (0, 1, 2)}))
    with pytest.raises(ValueError, match=r"comparison.eval_samples: saved 2, now 4"):
        rc.check_resume(task_dir, base, rc.parse_comparison({**cc.__dict__, "eval_samples": 4}))
    longer = rc.task_configs(config)[0]
    longer.unlock()
    longer.train.num_steps = 5
    with pytest.raises(ValueError, match=r"train.num_steps: saved 1, now 5"):
        rc.check_resume(task_dir, longer, cc)
    # the KL tolerance is also the band new runs are matched within: saved runs matched in
    # another band would share rows with them
    with pytest.raises(ValueError, match=r"comparison.kl_tolerance: saved 0.1, now 4"):
        rc.check_resume(task_dir, base, rc.parse_comparison({**cc.__dict__, "kl_tolerance": 4.0}))


def test_the_shipped_prompts_without_a_held_out_split_are_refused():
    """data.prompts='' evaluated on the first training prompts, reported as held out."""
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=helpfulness")
    config.base.task.data.prompts = ""
    with pytest.raises(ValueError, match=r"config.base.task.data.prompts is empty .* no split"):
        rc.task_configs(config)


def test_a_rerun_with_its_prompt_file_edited_in_place_is_refused(tmp_path):
    """Prompts rewritten behind the same path: the rerun was accepted, and its new seeds'
    evaluations (of the new texts) were reported beside the saved ones (of the old texts)."""
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=helpfulness")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"w{i} w{i + 1}"}) + "\n"
                               for i in range(12)))
    config.base.task.data.prompts = str(prompts)
    (base,) = rc.task_configs(config)
    cc = rc.parse_comparison(config.comparison)
    task_dir = str(tmp_path / "helpfulness")
    rc.check_resume(task_dir, base, cc)
    open(os.path.join(task_dir, "reference_table.npz"), "wb").close()
    rc.check_resume(task_dir, base, cc)
    record = os.path.join(task_dir, "comparison_config.json")
    # a record written before the digest and the tolerance's check reruns as it did
    saved = json.loads(open(record).read())
    old = {k: v for k, v in saved.items()
           if k not in ("task.data.prompts.sha256", "comparison.kl_tolerance")}
    with open(record, "w") as f:
        json.dump(old, f)
    rc.check_resume(task_dir, base, cc)
    with open(record, "w") as f:
        json.dump(saved, f)
    prompts.write_text(prompts.read_text().replace("w3 w4", "w9 w9"))
    with pytest.raises(ValueError, match=r"task.data.prompts.sha256: saved '[0-9a-f]{64}', now"):
        rc.check_resume(task_dir, base, cc)


def test_a_rerun_whose_prompt_texts_changed_is_refused(tmp_path):
    """The generated prompt sets are code: a revision that rewords a held-out topic reran into
    a work dir beside the saved pi_ref evaluation of the old texts (the training prompts are
    checked by the reference table, the evaluation prompts were not). The split is recorded."""
    from infalign_jax.rl.tasks import sources
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=helpfulness")
    (base,) = rc.task_configs(config)
    cc = rc.parse_comparison(config.comparison)
    split = sources.Split(["t0", "t1"], ["a", "b"], ["e0", "e1"], ["c", "d"])
    task_dir = str(tmp_path / "helpfulness")
    rc.check_resume(task_dir, base, cc, split)
    open(os.path.join(task_dir, "reference_table.npz"), "wb").close()
    rc.check_resume(task_dir, base, cc, split)
    with pytest.raises(ValueError, match=r"prompts.split.sha256: saved '[0-9a-f]{64}', now"):
        rc.check_resume(task_dir, base, cc, split._replace(eval_texts=["c", "d reworded"]))
    # a record written before the split was recorded reruns as it did
    record = os.path.join(task_dir, "comparison_config.json")
    saved = json.loads(open(record).read())
    with open(record, "w") as f:
        json.dump({k: v for k, v in saved.items() if k != rc.SPLIT_DIGEST_KEY}, f)
    rc.check_resume(task_dir, base, cc, split._replace(eval_texts=["c", "d reworded"]))


def _identity_tilt_at_kl(kl):
    """The tilt exp(u / beta) of U(0, 1) with KL = kl, in closed form: lam = 1/beta,
    Z = (e^lam - 1)/lam, E[u] = 1/(1 - e^-lam) - 1/lam, KL = lam E[u] - log Z; lam by bisection."""
    def kl_of(lam):
        eu = 1 / (1 - np.exp(-lam)) - 1 / lam
        return lam * eu - np.log(np.expm1(lam) / lam), eu
    lo, hi = 1e-6, 200.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl_of(mid)[0] < kl else (lo, mid)
    lam = 0.5 * (lo + hi)
    return lam, kl_of(lam)[1]


def test_the_convergence_measure_is_the_calibrated_optimum_in_closed_form():
    from infalign_jax.workflows import comparison_report as report
    for kl in (0.1, 0.574, 1.5):
        lam, eu = _identity_tilt_at_kl(kl)
        got = report.optimum("identity", "bon", 4, 4.0, kl)
        assert got["standard"] == pytest.approx(eu, abs=1e-4)
        # BoN_4 of the tilt against BoN_4 of U(0, 1): E over the max of 4 draws of its CDF v^4
        v = (np.arange(200000) + 0.5) / 200000
        cdf = np.expm1(lam * v) / np.expm1(lam)
        dens = lam * np.exp(lam * v) / np.expm1(lam)
        want = np.mean(4 * cdf ** 3 * dens * v ** 4)
        assert got["bon4"] == pytest.approx(want, abs=1e-4)
    assert report.optimum("raw", "bon", 4, 4.0, 0.5) is None
    assert report.optimum("exp", "won", 4, 4.0, 0.0) is None
    # the sign of t follows the procedure: exp(-4 C) is the WoN optimum, better than identity there
    assert report.optimum("exp", "won", 4, 4.0, 0.5)["won4"] > \
        report.optimum("identity", "won", 4, 4.0, 0.5)["won4"]


def test_claims_are_oriented_to_their_claimed_side():
    from infalign_jax.workflows import comparison_report as report

    def iv(lo, hi):
        return {"point": (lo + hi) / 2, "lower": lo, "upper": hi}

    # method - identity, as the report's difference table holds them
    diffs = {"exp": {"gold_bon4": iv(0.01, 0.03), "gold_standard": iv(-0.1, 0.1)},
             "raw": {"gold_bon4": iv(-0.10, -0.05), "gold_standard": iv(0.02, 0.06)}}
    result = {"procedure": "bon", "same_judge": False}
    got = {(c["claim"], c["difference"]): c
           for c in report._claims(result, diffs, {}, 4)}
    exp_a = got[("a", "exp - identity")]
    assert exp_a["verdict"] == "holds" and exp_a["interval"] == iv(0.01, 0.03)
    id_a = got[("a", "identity - raw")]   # raw 0.05-0.10 below identity: identity beats raw
    assert id_a["verdict"] == "holds"
    assert id_a["interval"] == pytest.approx({"point": 0.075, "lower": 0.05, "upper": 0.10})
    assert got[("d", "identity - raw")]["verdict"] == "does not hold"   # raw above identity
    assert got[("c", "identity - raw")]["verdict"] == "holds"
    # on a BoN task (c) is (a)'s identity - raw difference again, and says so
    assert "(a)'s identity - raw" in got[("c", "identity - raw")]["note"]
    flagged = report._claims(result, diffs, {"raw": True}, 4)
    assert {c["verdict"] for c in flagged if "raw" in c["difference"]} == {
        "unresolved (KL not matched)"}
    assert not any(c["claim"] == "c" for c in report._claims({**result, "same_judge": True},
                                                              diffs, {}, 4))
    # A single seed of a method (or of identity) leaves its claims unresolved: the interval
    # holds the prompts' variance only (one_seed_claims in the review: coverage 0.68).
    for seeds in ({"exp": 1, "identity": 3, "raw": 3}, {"exp": 3, "identity": 1, "raw": 3}):
        got = {c["difference"]: c["verdict"] for c in report._claims(result, diffs, {}, 4,
                                                                      seeds)}
        assert got["exp - identity"] == "unresolved (one seed: no seed spread)"
        assert (got["identity - raw"] == "holds") == (seeds["identity"] > 1)


def _synthetic_eval(rng, kl, lift):
    """One seed's saved evaluation of a method (6 prompts): KL `kl` everywhere, every win rate
    near 1/2 + lift."""
    ev = {"kl_B": np.full(6, kl)}
    for key in ("gold_standard_B", "gold_bon4_B", "gold_won4_B", "proxy_standard_B",
                "proxy_bon4_B", "proxy_won4_B"):
        ev[key] = np.clip(0.5 + lift + 0.01 * rng.standard_normal(6), 0, 1)
    return ev


def test_kl_matching_is_checked_per_seed_and_on_the_mean():
    from infalign_jax.workflows import comparison_report as report
    seeds = (0, 1, 2)
    assert report.kl_match_status(np.array([0.98, 1.0, 1.03]), 1.0, 0.1, seeds) == "yes"
    # the mean is on target, but seeds 0 and 2 are 30% off it on either side
    assert report.kl_match_status(np.array([0.7, 1.0, 1.3]), 1.0, 0.1, seeds) == \
        "no (seed 0: 0.700, seed 2: 1.300)"
    assert report.kl_match_status(np.array([0.7, 1.0, 1.3]), 1.0, 0.1, seeds,
                                  per_seed=False) == "yes"      # vBoN setting the target
    assert report.kl_match_status(np.array([1.2, 1.25, 1.3]), 1.0, 0.1, seeds) == \
        "no (mean; seed 0: 1.200, seed 1: 1.250, seed 2: 1.300)"
    assert report.kl_match_status(np.array([1.2, 1.25]), 1.0, 0.1, seeds, False) == "no (mean)"
    assert report.kl_match_status(np.array([5.0]), 0.0, 0.1, seeds) == "yes"   # no target

    # in the summary, a per-seed mismatch flags the row and leaves its claims unresolved
    rng = np.random.default_rng(0)

    evals = {"identity": [_synthetic_eval(rng, 1.0, 0.05) for _ in seeds],
             "exp": [_synthetic_eval(rng, kl, 0.2) for kl in (0.7, 1.0, 1.3)]}
    cc = rc.parse_comparison({"methods": "identity,exp", "kl_target": 1.0, "n": 4})
    summary = report.summarise({"task": "helpfulness", "procedure": "bon", "kl_target": 1.0,
                                "evals": evals, "same_judge": True, "gold": "g", "proxy": "p"},
                               cc)
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["identity"]["kl_matched"] == "yes"
    assert rows["exp"]["kl_matched"].startswith("no (seed 0")
    (claim,) = [c for c in summary["claims"] if c["difference"] == "exp - identity"]
    assert claim["verdict"] == "unresolved (KL not matched)"


def test_interval_tables_say_when_a_method_has_one_seed():
    """With one seed paired_difference has no seed term: the gain and difference tables printed
    its interval under "over prompts and seeds" (coverage 0.82 at a seed sd of 0.04, simulated).
    Such a row now says its interval is over prompts only."""
    from infalign_jax.workflows import comparison_report as report
    rng = np.random.default_rng(0)
    evals = {method: [_synthetic_eval(rng, 1.0, 0.1) for _ in range(seeds)]
             for method, seeds in (("identity", 3), ("exp", 1), ("raw", 3))}
    cc = rc.parse_comparison({"methods": "identity,exp,raw", "kl_target": 1.0, "n": 4})
    summary = report.summarise({"task": "helpfulness", "procedure": "bon", "kl_target": 1.0,
                                "evals": evals, "same_judge": True, "gold": "g", "proxy": "p"},
                               cc)
    text = report.markdown(summary, cc)
    one = " (1 seed: interval over prompts only)"
    assert text.count(f"| exp{one} |") == 2        # its gain row and its difference row
    assert f"| raw{one}" not in text and f"| identity{one}" not in text
    assert "| raw |" in text and "| identity |" in text


def test_texts_a_judge_cuts_are_counted_in_each_saved_evaluation(tmp_path):
    """compare_real's evaluations scored texts the proxy reward model cut at its max_len and said
    nothing (the training loop and `evaluate` count theirs). At max_len 2 every text is cut:
    pi_ref's 4 prompts x 2 samples, and bon_ref's N M = 4 samples of each of the 4 prompts."""
    root = tmp_path
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=harmlessness")
    config.base.task.policy.checkpoint = save_policy(root / "policy")
    config.base.task.reward.kind = "hf"
    config.base.task.reward.checkpoint = save_reward_model(root / "rm", seed=3)
    config.base.task.reward.max_len = 2
    config.comparison.methods = "bon_ref"
    config.comparison.kl_target = 0.5
    lines = []
    rc.run(rc.task_configs(config), config.comparison, str(root / "out"), log=lines.append,
           devices=jax.devices()[:1])
    ev = root / "out" / "harmlessness" / "evaluation"
    ref = rc._load_eval(str(ev / "pi_ref.npz"))
    assert (int(ref["proxy_texts_cut"]), int(ref["gold_texts_cut"])) == (4 * 2, 0)
    for seed in (0, 1):
        got = rc._load_eval(str(ev / f"bon_ref_seed{seed}.npz"))
        assert (int(got["proxy_texts_cut"]), int(got["gold_texts_cut"])) == (4 * 2 * 2, 0)
    said = [x for x in lines if "texts cut at a judge's length limit" in x]
    assert len(said) == 3 and all(x.endswith("proxy 8)") or x.endswith("proxy 16)")
                                  for x in said), said
    summary = json.load(open(root / "out" / "comparison.json"))
    assert [s["texts_cut"] for s in summary] == [{"gold": 0, "proxy": 8 + 2 * 16}]
    assert "over pi_ref's and every method's evaluations: proxy 40." in open(
        root / "out" / "comparison.md").read()


def test_a_claim_holds_only_when_its_interval_excludes_zero():
    def iv(lo, hi):
        return {"point": (lo + hi) / 2, "lower": lo, "upper": hi}

    # intervals that touch 0: neither side is established
    diffs = {"exp": {"gold_bon4": iv(0.0, 0.04)}, "raw": {"gold_bon4": iv(-0.06, 0.0),
                                                          "gold_standard": iv(0.0, 0.06)}}
    got = {(c["claim"], c["difference"]): c["verdict"]
           for c in report._claims({"procedure": "bon", "same_judge": True}, diffs, {}, 4)}
    assert got == {("a", "exp - identity"): "unresolved", ("a", "identity - raw"): "unresolved",
                   ("d", "identity - raw"): "unresolved"}


def test_a_flagged_identity_leaves_every_claim_unresolved():
    def iv(lo, hi):
        return {"point": (lo + hi) / 2, "lower": lo, "upper": hi}

    diffs = {"exp": {"gold_bon4": iv(0.01, 0.03)},
             "raw": {"gold_bon4": iv(-0.10, -0.05), "gold_standard": iv(-0.06, -0.02)}}
    claims = report._claims({"procedure": "bon", "same_judge": False}, diffs,
                            {"identity": True, "exp": False, "raw": False}, 4)
    assert len(claims) == 4
    assert {c["verdict"] for c in claims} == {"unresolved (KL not matched)"}
    # a flagged method with a single seed: the KL mismatch is what is said
    claims = report._claims({"procedure": "bon", "same_judge": True}, diffs, {"exp": True}, 4,
                            {"exp": 1, "identity": 3, "raw": 3})
    assert [c["verdict"] for c in claims if c["difference"] == "exp - identity"] == [
        "unresolved (KL not matched)"]


def test_won_claims_are_exp_against_identity_on_won():
    def iv(lo, hi):
        return {"point": (lo + hi) / 2, "lower": lo, "upper": hi}

    diffs = {"exp": {"gold_won4": iv(0.01, 0.03), "gold_bon4": iv(-0.2, -0.1)},
             "raw": {"gold_won4": iv(0.02, 0.04), "gold_bon4": iv(-0.2, -0.1),
                     "gold_standard": iv(-0.06, -0.02)}}
    claims = report._claims({"procedure": "won", "same_judge": False}, diffs, {}, 4)
    got = {(c["claim"], c["difference"]): c for c in claims}
    assert sorted(got) == [("b", "exp - identity"), ("c", "identity - raw"),
                           ("d", "identity - raw")]
    assert got[("b", "exp - identity")]["verdict"] == "holds"
    assert "WoN_4" in got[("b", "exp - identity")]["statement"]
    # (c) on a WoN task: identity - raw on WoN_4, raw above identity there
    assert got[("c", "identity - raw")]["verdict"] == "does not hold"
    assert got[("c", "identity - raw")]["interval"] == pytest.approx(
        {"point": -0.03, "lower": -0.04, "upper": -0.02})
    assert got[("c", "identity - raw")]["note"] == ""
    assert got[("d", "identity - raw")]["verdict"] == "holds"


def test_kl_matching_band_is_relative_and_a_nan_kl_is_off_the_target():
    seeds = (0, 1, 2)
    # tolerance 0.1 of a target of 0.5 is 0.05
    assert report.kl_match_status(np.array([0.56, 0.5, 0.5]), 0.5, 0.1, seeds) == \
        "no (seed 0: 0.560)"
    assert report.kl_match_status(np.array([0.54, 0.5, 0.5]), 0.5, 0.1, seeds) == "yes"
    nan = float("nan")
    assert report.kl_match_status(np.array([1.0, nan]), 1.0, 0.1, seeds) == \
        "no (mean; seed 1: nan)"
    assert report.kl_match_status(np.array([1.0, nan]), 1.0, 0.1, seeds, per_seed=False) == \
        "no (mean)"


def test_the_convergence_table_gives_the_gain_fraction_of_the_optimum():
    rng = np.random.default_rng(0)
    evals = {"identity": [_synthetic_eval(rng, 1.0, 0.1) for _ in range(3)]}
    cc = rc.parse_comparison({"methods": "identity", "kl_target": 1.0, "n": 4})
    summary = report.summarise({"task": "helpfulness", "procedure": "bon", "kl_target": 1.0,
                                "evals": evals, "same_judge": True, "gold": "g", "proxy": "p"},
                               cc)
    (row,) = summary["rows"]
    row.update(proxy_standard=0.6, proxy_bon4=0.74, optimum={"standard": 0.7, "bon4": 0.8})
    text = report.markdown(summary, cc)
    # (0.6 - 1/2) / (0.7 - 1/2) = 0.50 and (0.74 - 1/2) / (0.8 - 1/2) = 0.80
    assert "| identity | 1.000 | 0.600 | 0.700 | 0.50 | 0.740 | 0.800 | 0.80 |" in text
    # one judge: the gain table has no proxy columns
    assert "| method | gold_standard | gold_bon4 |\n" in text


def test_the_optimum_is_reported_only_where_the_grid_resolves_it():
    from infalign_jax.analysis import analytic
    top = analytic.max_resolved_kl(analytic.DEFAULT_GRID)
    assert report.optimum("identity", "bon", 4, 4.0, 0.99 * top) is not None
    assert report.optimum("identity", "bon", 4, 4.0, top) is None
    assert report.optimum("identity", "bon", 4, 4.0, 2 * top) is None


def test_a_rows_alpha_is_the_mean_over_its_seeds_and_absent_unless_every_seed_has_one():
    rng = np.random.default_rng(2)
    evals = {"identity": [{**_synthetic_eval(rng, 1.0, 0.05), "alpha": np.float64(a)}
                          for a in (0.5, 1.0, 1.8)],
             "exp": [_synthetic_eval(rng, 1.0, 0.1),
                     {**_synthetic_eval(rng, 1.0, 0.1), "alpha": np.float64(0.7)}]}
    cc = rc.parse_comparison({"methods": "identity,exp", "kl_target": 1.0, "n": 4})
    summary = report.summarise({"task": "helpfulness", "procedure": "bon", "kl_target": 1.0,
                                "evals": evals, "same_judge": True, "gold": "g", "proxy": "p"},
                               cc)
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["identity"]["alpha"] == pytest.approx(1.1) and rows["exp"]["alpha"] is None


def test_vbon_setting_the_target_is_matched_on_its_mean_and_bon_ref_is_not_matched():
    rng = np.random.default_rng(0)
    evals = {"vbon": [_synthetic_eval(rng, kl, 0.1) for kl in (0.7, 1.0, 1.3)],
             "identity": [_synthetic_eval(rng, kl, 0.1) for kl in (0.7, 1.0, 1.3)],
             "bon_ref": [_synthetic_eval(rng, 0.64, 0.1) for _ in range(3)]}
    cc = rc.parse_comparison({"methods": "vbon,identity,bon_ref", "n": 4})   # vBoN's target
    summary = report.summarise({"task": "helpfulness", "procedure": "bon", "kl_target": 1.0,
                                "evals": evals, "same_judge": True, "gold": "g", "proxy": "p"},
                               cc)
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["vbon"]["kl_matched"] == "yes"   # its seeds' spread is the target's
    assert rows["identity"]["kl_matched"] == "no (seed 0: 0.700, seed 2: 1.300)"
    assert rows["bon_ref"]["kl_matched"] == "n/a"
    # mean and sample sd (ddof 1) over seeds
    assert rows["vbon"]["kl"] == pytest.approx(1.0) and rows["vbon"]["kl_sd"] == pytest.approx(0.3)
    per_seed = [e["gold_bon4_B"].mean() for e in evals["identity"]]
    assert rows["identity"]["gold_bon4"] == pytest.approx(sum(per_seed) / 3)
    assert rows["identity"]["gold_bon4_sd"] == pytest.approx(
        math.sqrt(sum((x - sum(per_seed) / 3) ** 2 for x in per_seed) / 2))


def test_differences_are_each_method_minus_identity():
    rng = np.random.default_rng(1)
    evals = {"identity": [_synthetic_eval(rng, 1.0, 0.05) for _ in range(3)],
             "exp": [_synthetic_eval(rng, 1.0, 0.2) for _ in range(3)]}
    cc = rc.parse_comparison({"methods": "identity,exp", "kl_target": 1.0, "n": 4})
    summary = report.summarise({"task": "helpfulness", "procedure": "bon", "kl_target": 1.0,
                                "evals": evals, "same_judge": True, "gold": "g", "proxy": "p"},
                               cc)
    assert list(summary["differences_vs_identity"]) == ["exp"]
    d = summary["differences_vs_identity"]["exp"]["gold_bon4"]
    want = np.mean([e["gold_bon4_B"] for e in evals["exp"]]) - np.mean(
        [e["gold_bon4_B"] for e in evals["identity"]])
    assert want > 0.1 and d["point"] == pytest.approx(want) and d["lower"] > 0
    (claim,) = [c for c in summary["claims"] if c["claim"] == "a"]
    assert claim["difference"] == "exp - identity" and claim["verdict"] == "holds"


def test_bon_sampling_from_pi_ref_keeps_the_best_of_each_n_by_the_training_reward():
    from infalign_jax.decoding.sampling import SamplingConfig
    ev = rc.Evaluator.__new__(rc.Evaluator)   # pi_ref's samples given here, no models
    ev.cc = rc.parse_comparison({"methods": "bon_ref", "kl_target": 0.5, "n": 2,
                                 "eval_samples": 2})
    ev.scfg, ev.ref_params = SamplingConfig(n=2, max_new_tokens=4), None
    ev.ref_gold_BxM, ev.ref_proxy_BxM = np.array([[2.5, 2.5]]), np.array([[0.5, 0.5]])
    drawn = []

    def sample_and_score(params, seed, scfg):
        drawn.append(scfg.n)
        # N M = 4 samples of one prompt: groups (a, b) and (c, d); the proxy prefers b and c,
        # the gold judge b and d
        return {"gold_BxM": np.array([[1.0, 2.0, 3.0, 4.0]]),
                "proxy_BxM": np.array([[0.1, 0.9, 0.7, 0.3]]), "texts": ["a", "b", "c", "d"],
                "gold_texts_cut": np.asarray(0), "proxy_texts_cut": np.asarray(1)}

    ev.sample_and_score = sample_and_score
    got = ev.evaluate_bon_ref(seed=7)
    assert drawn == [4] and got["texts"] == ["b", "c"]
    np.testing.assert_array_equal(got["proxy_BxM"], [[0.9, 0.7]])
    np.testing.assert_array_equal(got["gold_BxM"], [[2.0, 3.0]])
    np.testing.assert_allclose(got["kl_B"], [math.log(2) - 1 / 2])
    assert got["gold_standard_B"].tolist() == [0.5] and got["proxy_standard_B"].tolist() == [1.0]
    assert int(got["proxy_texts_cut"]) == 1


def test_vbon_sets_the_target_first_and_bonbon_alone_is_not_matched(tmp_path):
    """vBoN listed after identity is still trained first (its KL is identity's target); BoNBoN
    alone, with no target (no KL-controlled method), is evaluated as trained."""
    config = load_config_module(os.path.join(ROOT, "configs/compare_real.py")).get_config(
        "size=smoke,tasks=harmlessness")
    config.base.task.policy.checkpoint = save_policy(tmp_path / "policy")
    config.base.task.reward.kind = "hf"
    config.base.task.reward.checkpoint = save_reward_model(tmp_path / "rm", seed=3)
    config.comparison.seeds = (0,)
    config.comparison.methods = "identity,vbon"
    lines = []
    rc.run(rc.task_configs(config), config.comparison, str(tmp_path / "a"), log=lines.append,
           devices=jax.devices()[:1])
    task = tmp_path / "a" / "harmlessness"
    trained = [x.split()[0] for x in lines if x.endswith("steps) ...")]
    assert trained == ["vbon", "identity"], lines
    vbon_kl = np.load(task / "evaluation" / "vbon_seed0.npz")["kl_B"].mean()
    rl = json.load(open(task / "identity" / "seed=0" / "manifest.json"))["config"]["rl"]
    assert rl["beta_schedule"] == "adaptive" and rl["kl_target"] == pytest.approx(vbon_kl)
    config.comparison.methods = "bonbon"
    rc.run(rc.task_configs(config), config.comparison, str(tmp_path / "b"), log=lines.append,
           devices=jax.devices()[:1])
    got = np.load(tmp_path / "b" / "harmlessness" / "evaluation" / "bonbon_seed0.npz")
    assert "alpha" not in got and np.isfinite(got["kl_B"]).all()
