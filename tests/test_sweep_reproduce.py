"""Sweeps (overrides, names, commands, resume of finished points) and the reproduction stages."""

import json
import os
import re
import shlex
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest

from infalign_jax.rl.tasks import exact as et
from infalign_jax.infra import provenance
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.core.calibration import load_reference_table
from infalign_jax.loops import skeleton, train
from infalign_jax.workflows import reproduce, sweep, sweep_plot
from infalign_jax.core.transforms import get_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTRL_EXACT = os.path.join(ROOT, "configs", "ctrl_exact.py")


def _base():
    return load_config_module(CTRL_EXACT).get_config()


def test_get_sweep_is_the_t_grid_at_matched_kl_budgets():
    points = sweep.sweep_points(load_config_module(CTRL_EXACT), "ts=-5;5,kls=0.5;1")
    assert [(p["transform.t"], p["task.kl_budget"]) for p in points] == [
        (-5.0, 0.5), (5.0, 0.5), (-5.0, 1.0), (5.0, 1.0)]
    assert {p["transform.name"] for p in points} == {"exp"}
    default = sweep.sweep_points(load_config_module(CTRL_EXACT))
    assert [p["transform.t"] for p in default] == [-10, -5, -1, 0, 1, 5, 10]


def test_the_real_tasks_sweep_is_exp_t_at_one_beta_and_each_point_is_a_valid_config():
    """configs/ctrl_real.py's get_sweep: exp(t C) over the given ts, by default 1, 2, 4, 8 with
    the sign of the base config's task (it gave the Best-of-N sign to the Worst-of-N task), each
    point a config the sweep accepts, beta left as given."""
    module = load_config_module(os.path.join(ROOT, "configs", "ctrl_real.py"))
    for task, sign in (("helpfulness", 1.0), ("harmlessness", -1.0)):
        points = sweep.sweep_points(module, None, module.get_config(f"task={task}"))
        assert points == [{"transform.name": "exp", "transform.t": sign * t}
                          for t in (1.0, 2.0, 4.0, 8.0)], task
    # ts given are taken as written, whatever the task
    assert [p["transform.t"] for p in sweep.sweep_points(
        module, "ts=1;-2", module.get_config("task=harmlessness"))] == [1.0, -2.0]
    points = sweep.sweep_points(module, "ts=-1;-4")
    assert [p["transform.t"] for p in points] == [-1.0, -4.0]
    base = module.get_config("task=harmlessness,beta=0.3")
    configs = sweep.point_configs(base, points)
    assert [(c.transform.name, c.transform.t, c.rl.beta) for c in configs] == \
        [("exp", -1.0, 0.3), ("exp", -4.0, 0.3)]
    # one task and reference: one table for the sweep
    assert len({sweep.reference_key(c) for c in configs}) == 1


def test_get_sweep_must_give_points_that_each_override_something():
    import types
    for points in ([], [{"transform.t": 1.0}, {}], [{"transform.t": 1.0}, "t=2"]):
        module = types.SimpleNamespace(__name__="cfg", get_sweep=lambda arg=None, p=points: p)
        with pytest.raises(ValueError, match=r"cfg.get_sweep\(\) must return a non-empty list"):
            sweep.sweep_points(module)
    with pytest.raises(ValueError, match="defines no get_sweep"):
        sweep.sweep_points(types.SimpleNamespace(__name__="cfg"))


def test_apply_overrides_copies_and_refuses_unknown_or_mistyped():
    base = _base()
    cfg = sweep.apply_overrides(base, {"transform.t": 4, "rl.beta": 0.05})
    assert cfg.transform.t == 4.0 and cfg.rl.beta == 0.05 and base.transform.t == 3.0
    with pytest.raises(ValueError, match="unknown key"):
        sweep.apply_overrides(base, {"rl.betta": 1.0})
    with pytest.raises(ValueError, match="no section 'rll'"):
        sweep.apply_overrides(base, {"rll.beta": 1.0})
    # A ValueError (reported in one line by the CLI), naming the override.
    with pytest.raises(ValueError, match=r"sweep override rl.beta='high'"):
        sweep.apply_overrides(base, {"rl.beta": "high"})
    with pytest.raises(ValueError, match=r"sweep override train.num_steps=2.5"):
        sweep.apply_overrides(base, {"train.num_steps": 2.5})


@pytest.mark.parametrize("option,value,switch,off,on", [
    ("rl.ppo_clip", 0.1, "rl.algorithm", "rloo", "ppo"),
    ("rl.ppo_epochs", 2, "rl.algorithm", "rloo", "ppo"),
    ("rl.gae_lambda", 0.9, "rl.advantage", "rloo", "gae"),
    ("rl.value_clip", 0.0, "rl.advantage", "rloo", "gae"),
    ("rl.beta_final", 0.5, "rl.beta_schedule", "constant", "linear"),
    ("rl.kl_horizon", 50.0, "rl.beta_schedule", "linear", "adaptive"),
    ("rl.beta_anneal_factor", 3.0, "rl.beta_anneal_steps", 0, 5),
])
def test_apply_overrides_refuses_an_rl_option_the_run_does_not_read(option, value, switch, off,
                                                                    on):
    base = sweep.apply_overrides(_base(), {switch: off})  # a setting alone is never refused
    reader = f"{switch} > 0" if isinstance(on, int) else f"{switch}={on!r}"
    with pytest.raises(ValueError, match=rf"sweep override {option} is not used by this run: it "
                                         rf"is read only with {reader} \(this config has"):
        sweep.apply_overrides(base, {option: value})
    # set together with the setting that reads it, in either order
    for overrides in ({switch: on, option: value}, {option: value, switch: on}):
        assert sweep.apply_overrides(base, overrides).rl[option[3:]] == value


def test_a_flag_is_checked_against_each_points_config():
    """A --config flag applies to every point; a point may set the setting that reads it."""
    base = sweep.apply_overrides(_base(), {"rl.beta_schedule": "constant"})
    base.unlock()
    base.rl.kl_horizon = 50.0   # as --config.rl.kl_horizon=50 would
    base.lock()
    adaptive = [{"rl.beta_schedule": "adaptive", "rl.kl_target": 0.5, "transform.t": t}
                for t in (1.0, 2.0)]
    cfgs = sweep.point_configs(base, adaptive, flag_keys=["rl.kl_horizon"])
    assert [c.rl.kl_horizon for c in cfgs] == [50.0, 50.0]
    with pytest.raises(ValueError, match=r"^--config.rl.kl_horizon is not used by this run: it is "
                                         r"read only with rl.beta_schedule='adaptive'"):
        sweep.point_configs(base, [adaptive[0], {"transform.t": 3.0}], flag_keys=["rl.kl_horizon"])
    with pytest.raises(ValueError, match=r"^--config.rl.kl_horizon is not used"):
        sweep.run(base, [{"transform.t": 3.0}], "unused-dir", runner=None, log=lambda s: None,
                  flag_keys=["rl.kl_horizon"])


def test_bonbon_refuses_rl_overrides_it_does_not_read():
    """method="bonbon" reads only rl.max_new_tokens / learning_rate / decay_steps /
    shared_prompt / lora (test_train.py checks that the others change nothing): not rl.beta or
    the transform, since its target is BoN_n(pi_ref) (t = 3 against 8 gave bit-identical runs);
    CTRL reads no bonbon option."""
    bonbon = sweep.apply_overrides(_base(), {"method": "bonbon"})
    with pytest.raises(ValueError, match=r"sweep override rl.max_grad_norm is not used by this "
                                         r"run: it is read only with method='ctrl' \(this config "
                                         r"has 'bonbon'; BoNBoN's own is bonbon.max_grad_norm\)"):
        sweep.apply_overrides(bonbon, {"rl.max_grad_norm": 1.0})
    # unread for two reasons: both are named
    with pytest.raises(ValueError, match=r"read only with rl.algorithm='ppo' \(this config has "
                                         r"'rloo'\) and method='ctrl' .*; set those too"):
        sweep.apply_overrides(bonbon, {"rl.ppo_clip": 0.1})
    for option, value in (("rl.learning_rate", 1e-2), ("rl.max_new_tokens", 3),
                          ("rl.decay_steps", 5), ("rl.shared_prompt", True),
                          ("rl.lora.rank", 2), ("bonbon.max_grad_norm", 1.0)):
        assert sweep.apply_overrides(bonbon, {option: value}) is not None
    for option, value, reader in (("rl.beta", 2.0, "method='ctrl'"),
                                  ("transform.t", 8.0, "method='ctrl'"),
                                  ("mesh.rollout", "serve", "method='ctrl'")):
        with pytest.raises(ValueError, match=rf"sweep override {option} is not used by this run: "
                                             rf"it is read only with {reader}"):
            sweep.apply_overrides(bonbon, {option: value})
    with pytest.raises(ValueError, match=r"sweep override bonbon.n is not used by this run: it "
                                         r"is read only with method='bonbon' \(this config has "
                                         r"'ctrl'\)"):
        sweep.apply_overrides(_base(), {"bonbon.n": 8})
    # the adapters' settings without adapters, and with them
    with pytest.raises(ValueError, match=r"rl.lora.alpha is not used by this run: it is read "
                                         r"only with rl.lora.rank > 0"):
        sweep.apply_overrides(_base(), {"rl.lora.alpha": 64.0})
    assert sweep.apply_overrides(_base(), {"rl.lora.rank": 2, "rl.lora.alpha": 64.0}
                                 ).rl.lora.alpha == 64.0
    # the same override is read under CTRL, and under BoNBoN set after the method is switched
    assert sweep.apply_overrides(_base(), {"rl.max_grad_norm": 1.0}).rl.max_grad_norm == 1.0
    assert sweep.apply_overrides(_base(), {"mesh.rollout": "serve"}).mesh.rollout == "serve"
    # bonbon.full_kl is the monitor samples' KL: none without them
    quiet = sweep.apply_overrides(bonbon, {"bonbon.monitor_samples": 0})
    with pytest.raises(ValueError, match=r"sweep override bonbon.full_kl is not used by this run: "
                                         r"it is read only with config.bonbon.monitor_samples > 0"):
        sweep.apply_overrides(quiet, {"bonbon.full_kl": False})
    assert not sweep.apply_overrides(bonbon, {"bonbon.full_kl": False}).bonbon.full_kl
    assert sweep.apply_overrides(bonbon, {"method": "ctrl", "rl.max_grad_norm": 1.0}
                                 ).method == "ctrl"


def test_an_override_inside_an_unread_option_is_refused_with_it():
    from infalign_jax.infra.config_utils import refuse_unused_overrides
    with pytest.raises(ValueError, match=r"^--config.rl.value_model.d_model is not used by this "
                                         r"run: it is read only with rl.advantage='gae'"):
        refuse_unused_overrides(_base(), ["rl.value_model.d_model"], "--config.")
    refuse_unused_overrides(_base(), ["rl.lora.rank", "rl.beta", "transform.t"],
                            "--config.")   # read: no error


def test_rl_unused_options_cover_every_option_of_a_setting():
    from infalign_jax.rl import config as rl_config
    rl = rl_config.RLConfig()
    unused = rl_config.unused_options({})  # every setting at its default
    assert set(unused) == {"ppo_epochs", "ppo_clip", "gamma", "gae_lambda", "whiten_advantages",
                           "value_model", "value_learning_rate", "value_clip", "beta_final",
                           "beta_steps",
                           "kl_target", "kl_horizon", "beta_anneal_factor"}
    assert rl.algorithm == "rloo" and unused["ppo_clip"].startswith("rl.algorithm='ppo'")
    used = rl_config.unused_options({"algorithm": "ppo", "advantage": "gae",
                                     "beta_schedule": "adaptive", "beta_anneal_steps": 3})
    assert set(used) == {"beta_final", "beta_steps"}


def test_point_names_and_command_lines():
    points = [{"transform.t": -5.0, "rl.beta": 1.5}, {"transform.t": 10.0, "rl.beta": 0.25}]
    assert sweep.point_name(points[0]) == "t=-5,beta=1.5"
    lines = sweep.command_lines("experiments/train_policy.py", "configs/ctrl_exact.py", "runs/s",
                                points, ["--config.train.num_steps=50"])
    assert lines[1] == (f"{shlex.quote(sys.executable)} experiments/train_policy.py "
                        "--config=configs/ctrl_exact.py "
                        "--workdir=runs/s/t=10,beta=0.25 --config.train.num_steps=50 "
                        "--config.transform.t=10.0 --config.rl.beta=0.25")


def test_points_that_share_a_work_dir_or_a_flag_every_point_replaces_are_refused():
    """t = 2.0000001 and 2.0000004 were both named "t=2" (one work dir for two runs on a
    cluster); repeated sweep values made repeated points; a --config flag for a key every point
    sets was printed into every command and replaced there; rl.beta under a KL budget, which
    solves beta, was accepted and logged as unused."""
    assert sweep.point_name({"transform.t": 2.0}) == "t=2"   # names of earlier sweeps kept
    names = [sweep.point_name({"transform.t": t}) for t in (2.0000001, 2.0000004, 1e-7, 0.1)]
    assert len(set(names)) == 4 and names[2:] == ["t=1e-07", "t=0.1"]
    # a numpy float (np.linspace in a get_sweep) is named by its value, not its repr
    assert sweep.point_name({"transform.t": np.float64(-1 / 3)}) == f"t={-1 / 3!r}"
    base = _base()
    with pytest.raises(ValueError, match=r"sweep points \['t=2'\] occur more than once"):
        sweep.point_configs(base, [{"transform.t": 2.0}, {"transform.t": 2.0}])
    points = [{"transform.t": t, "task.kl_budget": 0.5} for t in (-5.0, 5.0)]
    with pytest.raises(ValueError, match=r"^--config.transform.t is set by every sweep point"):
        sweep.point_configs(base, points, flag_keys=["transform.t"])
    with pytest.raises(ValueError, match=r"^--config.rl.beta is not used by this run: it is read "
                                         r"only with task.kl_budget=0"):
        sweep.point_configs(base, points, flag_keys=["rl.beta"])
    assert len(sweep.point_configs(base, points, flag_keys=["rl.learning_rate"])) == 2
    assert len(sweep.point_configs(base, points[:1] + [{"rl.learning_rate": 0.01}],
                                   flag_keys=["transform.t"])) == 2   # one point keeps the flag


def test_run_sweep_skips_finished_points_and_writes_table(tmp_path):
    calls = []

    def runner(cfg, run_dir):
        calls.append(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        summary = {"final_step": cfg.train.num_steps, "eval": {"exact_kl": cfg.transform.t / 10},
                   "last_train_metrics": {"kl_k1": 0.5, "loss": 1.0}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        provenance.write_manifest(run_dir, cfg, with_devices=False)   # as train.run does
        return summary

    points = [{"transform.t": 1.0}, {"transform.t": 2.0}]
    rows = sweep.run(_base(), points, str(tmp_path), runner, log=lambda s: None)
    assert len(calls) == 2 and [r["eval.exact_kl"] for r in rows] == [0.1, 0.2]
    assert "train.loss" not in rows[0] and rows[0]["train.kl_k1"] == 0.5
    rows2 = sweep.run(_base(), points, str(tmp_path), runner, log=lambda s: None)
    assert len(calls) == 2 and rows2 == rows  # finished points are read back, not re-run
    text = (tmp_path / "sweep_results.md").read_text()
    assert "| t=2 | 2.0000 | 0.2000 | 0.5000 |" in text
    # A longer run of the same points is not "finished": it runs (and would resume).
    longer = sweep.apply_overrides(_base(), {"train.num_steps": 500})
    sweep.run(longer, points[:1], str(tmp_path), runner, log=lambda s: None)
    assert len(calls) == 3
    # Nor is a finished point rerun with other settings: its stale summary is not reused.
    other = sweep.apply_overrides(_base(), {"rl.learning_rate": 1e-4})
    sweep.run(other, points[1:], str(tmp_path), runner, log=lambda s: None)
    assert len(calls) == 4
    # A resumable key that changes what a finished run reports (another eval_ns: the runner
    # re-evaluates on resume) sends the point back; it was reused with the column empty.
    more = sweep.apply_overrides(_base(), {"task.eval_ns": (1, 2, 4, 8)})
    sweep.run(more, points[:1], str(tmp_path), runner, log=lambda s: None)
    assert len(calls) == 5


def test_the_sweep_figure_puts_the_most_varied_numeric_key_on_x_and_lines_per_other_key():
    """`sweep_plot.panels` against a layout written out by hand: x = transform.t (three values
    against kl_budget's two), one line per kl_budget sorted by t, pi*'s target_* and the
    *_stderr columns joined to their metric, a point without a value left out of its line (not
    drawn as 0), a NaN kept, counts of cut texts and non-numeric columns left out."""
    rows = []
    for kl, t in ((0.5, 5.0), (0.5, -5.0), (1.0, 0.0), (0.5, 0.0), (1.0, 5.0), (1.0, -5.0)):
        rows.append({"point": f"t={t},kl_budget={kl}", "transform.name": "exp",
                     "transform.t": t, "task.kl_budget": kl,
                     "eval.exact_bon4": 0.5 + t / 100 + kl, "eval.target_bon4": 0.9 + t / 100,
                     "eval.est_bon_4": t * kl, "eval.est_bon_4_stderr": kl / 10,
                     "eval.est_reward_texts_cut": 3.0, "eval.note": "x",
                     "train.kl_k1": 9.0})
    del rows[4]["eval.exact_bon4"]                 # t=5, kl=1: no value
    rows[2]["eval.est_bon_4"] = float("nan")      # t=0, kl=1
    keys = ["transform.name", "transform.t", "task.kl_budget"]
    assert sweep_plot.x_key(rows, keys) == "transform.t"
    layout = sweep_plot.panels(rows, keys)
    assert [p.metric for p in layout] == ["eval.exact_bon4", "eval.est_bon_4"]
    bon = {line.label: line for line in layout[0].lines}
    assert list(bon) == ["kl_budget=0.5", "kl_budget=1"]
    half, one = bon["kl_budget=0.5"], bon["kl_budget=1"]
    assert half.x == [-5.0, 0.0, 5.0] and one.x == [-5.0, 0.0]
    np.testing.assert_allclose(half.y, [0.45 + 0.5, 0.5 + 0.5, 0.55 + 0.5])
    np.testing.assert_allclose(half.target, [0.85, 0.9, 0.95])
    np.testing.assert_allclose(one.target, [0.85, 0.9])
    assert half.stderr is None
    est = {line.label: line for line in layout[1].lines}
    assert est["kl_budget=1"].x == [-5.0, 0.0, 5.0] and est["kl_budget=1"].target is None
    np.testing.assert_allclose(est["kl_budget=1"].y, [-5.0, np.nan, 5.0])
    np.testing.assert_allclose(est["kl_budget=0.5"].stderr, [0.05] * 3)
    # a sweep over strings only: a categorical axis; one point: nothing to plot
    names = [{"point": n, "transform.name": n, "eval.exact_kl": k}
             for n, k in (("exp", 0.2), ("log", 0.3))]
    (panel,) = sweep_plot.panels(names, ["transform.name"])
    assert panel.lines == [sweep_plot.Line("", ["exp", "log"], [0.2, 0.3], None, None)]
    assert sweep_plot.panels(rows[:1], keys) == []
    # without eval columns the train metrics are drawn
    (panel,) = sweep_plot.panels([{k: v for k, v in r.items() if not k.startswith("eval.")}
                                  for r in rows], keys)
    assert panel.metric == "train.kl_k1"


def test_a_sweep_says_how_long_its_points_left_to_train_will_take(tmp_path, monkeypatch):
    """From the second point trained on, a sweep's progress line gives the points left to train
    and the time they will take at the mean of the points trained so far (finished points read
    back count as neither)."""
    clock = iter(range(0, 10_000, 30))   # each point trains for one tick: 30 s
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: float(next(clock)))

    def runner(cfg, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        summary = {"final_step": cfg.train.num_steps, "eval": {"exact_kl": 0.1}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        provenance.write_manifest(run_dir, cfg, with_devices=False)
        return summary

    points = [{"transform.t": float(t)} for t in range(1, 5)]
    sweep.run(_base(), points[1:2], str(tmp_path), runner, log=lambda s: None)   # t=2 done
    said = []
    sweep.run(_base(), points, str(tmp_path), runner, log=said.append)
    progress = [line for line in said if line.startswith("[sweep ") and "/4]" in line]
    assert progress == ["[sweep 1/4] t=1", "[sweep 2/4] t=2 (done, reusing)",
                        "[sweep 3/4] t=3; 2 to train, about 1m00s left at 0m30s a point",
                        "[sweep 4/4] t=4; 1 to train, about 0m30s left at 0m30s a point"]


def test_a_sweep_draws_its_figure(tmp_path):
    from PIL import Image

    def runner(cfg, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        summary = {"final_step": cfg.train.num_steps,
                   "eval": {"exact_kl": cfg.transform.t / 10, "target_kl": 0.5}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        provenance.write_manifest(run_dir, cfg, with_devices=False)
        return summary

    said = []
    sweep.run(_base(), [{"transform.t": 1.0}, {"transform.t": 2.0}], str(tmp_path), runner,
              log=said.append)
    assert said[-1].endswith("and sweep_results.png (each metric against transform.t)")
    with Image.open(tmp_path / "sweep_results.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100
    sweep.run(_base(), [{"transform.t": 1.0}], str(tmp_path / "one"), runner, log=said.append)
    assert said[-1].endswith("(no plot: no swept key varies)")
    assert not (tmp_path / "one" / "sweep_results.png").exists()
    # a rerun over one of the points removes the figure of both, which the table no longer holds
    sweep.run(_base(), [{"transform.t": 1.0}], str(tmp_path), runner, log=said.append)
    assert not (tmp_path / "sweep_results.png").exists()


def test_collect_gathers_the_finished_points_and_counts_the_others(tmp_path):
    """`--sweep=collect`: the points run elsewhere (the printed commands) gathered without
    training; a point not run, or run under another config, is counted and named, not tabled."""
    def runner(cfg, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        summary = {"final_step": cfg.train.num_steps, "eval": {"exact_kl": cfg.transform.t / 10}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        provenance.write_manifest(run_dir, cfg, with_devices=False)
        return summary

    points = [{"transform.t": 1.0}, {"transform.t": 2.0}, {"transform.t": 3.0}]
    with pytest.raises(ValueError, match="no point of this sweep has finished in"):
        sweep.collect(_base(), points, str(tmp_path), log=lambda s: None)
    sweep.run(_base(), points[:1], str(tmp_path), runner, log=lambda s: None)
    other = sweep.apply_overrides(_base(), {"rl.learning_rate": 1e-4})
    sweep.run(other, points[2:], str(tmp_path), runner, log=lambda s: None)
    said = []
    rows = sweep.collect(_base(), points, str(tmp_path), log=said.append)
    assert [r["point"] for r in rows] == ["t=1"] and rows[0]["eval.exact_kl"] == 0.1
    assert said[0] == "[sweep] 2 of 3 points not finished under this config (left out): t=2, t=3"
    assert "| t=1 |" in (tmp_path / "sweep_results.md").read_text()
    assert "t=3" not in (tmp_path / "sweep_results.md").read_text()
    assert not (tmp_path / "t=2").exists()   # nothing trained
    manifest = json.loads((tmp_path / "sweep_manifest.json").read_text())
    assert manifest["extra"] == {"points": [{"transform.t": 1.0}],
                                 "left_out": [{"transform.t": 2.0}, {"transform.t": 3.0}]}
    assert manifest["config"]["transform"]["name"] == _base().transform.name
    assert "git" in manifest and "packages" in manifest and "devices" not in manifest


def test_points_with_one_tasks_reference_settings_share_one_table_and_their_numbers(tmp_path):
    """A t sweep draws its reference table once: the first point's run draws it, the next point
    of the same task and reference settings gets a copy (its run reuses it), and its results
    equal that point run alone, drawing its own; a point with another K draws its own."""
    smoke = reproduce.sized_config(_base(), "smoke")
    assert smoke.reference.k == 64
    logs = {}

    def runner(cfg, run_dir):
        lines = logs.setdefault(os.path.basename(run_dir), [])
        return train.run(cfg, run_dir, log=lines.append, devices=jax.devices()[:1])[1]

    points = [{"transform.t": 1.0}, {"transform.t": 4.0},
              {"transform.t": 2.0, "reference.k": 32}]
    said = []
    rows = sweep.run(smoke, points, str(tmp_path / "sweep"), runner, log=said.append)
    first, second, other = (tmp_path / "sweep" / d / "reference_table.npz"
                            for d in ("t=1", "t=4", "t=2,k=32"))
    assert first.read_bytes() == second.read_bytes()
    assert "[sweep] reference table copied from t=1/reference_table.npz (the same task and " \
           "reference settings: drawn once for the sweep)" in said
    assert any(line.startswith("reusing reference table") for line in logs["t=4"])
    assert not any(line.startswith("reusing reference table") for line in logs["t=2,k=32"])
    assert load_reference_table(str(other)).sorted_rewards_BxK.shape[1] == 32
    alone = runner(sweep.apply_overrides(smoke, points[1]), str(tmp_path / "alone"))
    assert not any(line.startswith("reusing reference table") for line in logs["alone"])
    mine, shared = (load_reference_table(str(path)) for path in
                    (tmp_path / "alone" / "reference_table.npz", second))
    np.testing.assert_array_equal(mine.sorted_rewards_BxK, shared.sorted_rewards_BxK)
    assert list(mine.prompt_ids) == list(shared.prompt_ids) and mine.created["reference"]["k"] == 64
    assert {k: v for k, v in rows[1].items() if k.startswith("eval.")} == \
        {f"eval.{k}": v for k, v in sorted(alone["eval"].items())}
    assert sweep.reference_key(sweep.apply_overrides(smoke, points[0])) != \
        sweep.reference_key(sweep.apply_overrides(smoke, {"task.kl_budget": 1.0}))


def test_a_sweep_or_reproduction_over_another_configs_runs_is_refused_with_its_own_flags(
        tmp_path):
    """A point's work dir holding another config's run was refused with train's advice,
    `--config.train.init_from=<point dir>`: a flag reproduce does not have, and one that a sweep
    applies to every point."""
    smoke = reproduce.sized_config(_base(), "smoke")

    def runner(cfg, run_dir):
        return train.run(cfg, run_dir, log=lambda line: None, devices=jax.devices()[:1])[1]

    points = [{"transform.t": 1.0}]
    sweep.run(smoke, points, str(tmp_path / "sweep"), runner, log=lambda s: None)
    other = sweep.apply_overrides(smoke, {"rl.learning_rate": 1e-4})
    with pytest.raises(skeleton.ConfigMismatchError) as e:
        sweep.run(other, points, str(tmp_path / "sweep"), runner, log=lambda s: None)
    assert re.search(r"sweep/t=1 holds a run of another config \(rl.learning_rate: checkpoint "
                     r".*, config 0.0001\); this sweep's point t=1 was run under another base "
                     r"config: .* or use another --workdir$", str(e.value)), str(e.value)
    assert "init_from" not in str(e.value)
    # The train command itself still points to init_from.
    with pytest.raises(skeleton.ConfigMismatchError, match=r"--config.train.init_from="):
        runner(other, str(tmp_path / "sweep" / "t=1"))

    def exact(base):
        reproduce.run_exact_stage(base, str(tmp_path / "exact"), size="smoke", keys=("vbon",),
                                  log=lambda s: None, devices=jax.devices()[:1])

    exact(_base())
    with pytest.raises(skeleton.ConfigMismatchError) as e:
        exact(sweep.apply_overrides(_base(), {"rl.learning_rate": 1e-4}))
    assert re.search(r"exact/m=vBoN.*/seed=0 holds a run of another config \(rl.learning_rate: "
                     r".*; this reproduction's work dir was filled under other options "
                     r"\(--exact_config, .* or use another --workdir$", str(e.value)), str(e.value)
    assert "init_from" not in str(e.value)


def test_a_rerun_sweep_writes_the_table_it_wrote(tmp_path):
    """A finished point's summary is read back from its summary.json, which train.run writes
    with sorted keys, while a point run here gave its summary in the order it was built: a
    rerun (or a resumed sweep) wrote the same numbers under other column orders."""
    def runner(cfg, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        summary = {"final_step": cfg.train.num_steps,
                   "eval": {"exact_kl": cfg.transform.t / 10, "exact_bon1": 0.5},
                   "last_train_metrics": {"kl_k1": 0.5, "calibrated_reward": 0.25}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, sort_keys=True)   # as train.run writes it
        provenance.write_manifest(run_dir, cfg, with_devices=False)
        return summary

    points = [{"transform.t": 1.0}, {"transform.t": 2.0}]
    tables = []
    for _ in range(2):   # every point run, then every point reused
        sweep.run(_base(), points, str(tmp_path), runner, log=lambda s: None)
        tables.append([(tmp_path / f"sweep_results.{ext}").read_text() for ext in ("csv", "md")])
    assert tables[1] == tables[0]


def _finishing_runner(calls, inputs=None):
    """A sweep runner that finishes a point at once as train.run would leave it (summary.json,
    a manifest with its config and `inputs`), recording each run dir in `calls`."""
    def runner(cfg, run_dir):
        calls.append(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        summary = {"final_step": cfg.train.num_steps, "eval": {}, "last_train_metrics": {}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        provenance.write_manifest(run_dir, cfg, inputs=inputs, with_devices=False)
        return summary
    return runner


def test_a_finished_point_whose_input_file_changed_is_not_reused(tmp_path):
    """The manifest's input digests: a transform table rewritten behind its path sends the point
    back to the runner (whose resume then refuses it, naming transform_table.sha256)."""
    table = tmp_path / "phi.npz"
    table.write_bytes(b"first table")
    calls = []
    runner = _finishing_runner(calls, inputs={"transform_table": str(table)})

    points = [{"transform.t": 1.0}]
    sweep.run(_base(), points, str(tmp_path / "s"), runner, log=lambda s: None)
    sweep.run(_base(), points, str(tmp_path / "s"), runner, log=lambda s: None)
    assert len(calls) == 1
    table.write_bytes(b"another table")
    sweep.run(_base(), points, str(tmp_path / "s"), runner, log=lambda s: None)
    assert len(calls) == 2


def test_a_finished_point_rerun_with_other_outputs_goes_back_to_the_runner(tmp_path):
    """task.eval_ns and export.* may change on a resume, so the config record leaves them out;
    a finished point whose run reported other evaluations or exported elsewhere is not reused."""
    calls = []
    runner = _finishing_runner(calls)
    base = ml_collections.ConfigDict(_base().to_dict())
    base.export = ml_collections.ConfigDict({"hf": False, "dir": ""})
    points, workdir = [{"transform.t": 1.0}], str(tmp_path)
    sweep.run(base, points, workdir, runner, log=lambda s: None)
    sweep.run(base, points, workdir, runner, log=lambda s: None)
    assert len(calls) == 1
    more = sweep.apply_overrides(base, {"task.eval_ns": (1, 2, 4, 8)})
    sweep.run(more, points, workdir, runner, log=lambda s: None)
    assert len(calls) == 2
    exported = sweep.apply_overrides(more, {"export.hf": True})
    sweep.run(exported, points, workdir, runner, log=lambda s: None)
    sweep.run(exported, points, workdir, runner, log=lambda s: None)
    assert len(calls) == 3
    elsewhere = sweep.apply_overrides(exported, {"export.dir": str(tmp_path / "hf")})
    sweep.run(elsewhere, points, workdir, runner, log=lambda s: None)
    assert len(calls) == 4


def test_a_point_whose_input_file_is_gone_or_whose_manifest_is_missing(tmp_path):
    """A recorded input file deleted since is not a changed one: the point is reused. A summary
    without the run's manifest.json (which train.run writes beside it) cannot say what it ran,
    so the point goes back to the runner."""
    table = tmp_path / "phi.npz"
    table.write_bytes(b"a table")
    calls = []

    def runner(cfg, run_dir, manifest=True):
        calls.append(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        summary = {"final_step": cfg.train.num_steps, "eval": {}, "last_train_metrics": {}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        if manifest:
            provenance.write_manifest(run_dir, cfg, inputs={"transform_table": str(table)},
                                      with_devices=False)
        return summary

    points = [{"transform.t": 1.0}]
    sweep.run(_base(), points, str(tmp_path / "s"), runner, log=lambda s: None)
    table.unlink()
    sweep.run(_base(), points, str(tmp_path / "s"), runner, log=lambda s: None)
    assert len(calls) == 1
    bare = lambda cfg, run_dir: runner(cfg, run_dir, manifest=False)
    sweep.run(_base(), points, str(tmp_path / "bare"), bare, log=lambda s: None)
    sweep.run(_base(), points, str(tmp_path / "bare"), bare, log=lambda s: None)
    assert len(calls) == 3


def test_sweep_rows_keep_the_training_reward_columns_and_names_without_slashes():
    summary = {"eval": {"exact_kl": 0.1},
               "last_train_metrics": {"kl_k1": 0.5, "kl_full_vocab": 0.4, "loss": 1.0,
                                      "calibrated_reward": 0.6, "transformed_reward": 0.7}}
    row = sweep.flat_row({"transform.t": 1.0}, summary)
    assert row == {"point": "t=1", "transform.t": 1.0, "eval.exact_kl": 0.1,
                   "train.calibrated_reward": 0.6, "train.kl_full_vocab": 0.4,
                   "train.kl_k1": 0.5, "train.transformed_reward": 0.7}
    # a path in a value does not make a nested work dir
    assert sweep.point_name({"transform.path": "tables/phi.npz"}) == "path=tables_phi.npz"


def test_beta_for_kl_hits_the_budget_and_is_monotone():
    task = et.make_task(0)
    table = et.sample_reference_table(task, 256, seed=1)
    ref_logp = et.policy_logprobs(task, task.ref_params)
    for name, params in (("identity", {}), ("exp", {"t": 5.0}), ("exp", {"t": -5.0})):
        tr = get_transform(name, **params)
        cal = et.calibrated_table(task, table, tr.smoothing)
        betas = [et.beta_for_kl(ref_logp, cal, task.rewards_XxY, tr, kl)
                 for kl in (0.2, 0.8)]
        assert betas[0] > betas[1]
        for beta, kl in zip(betas, (0.2, 0.8)):
            tgt = et.target_policy(ref_logp, cal, tr, beta)
            assert et.exact_kl(tgt, np.exp(ref_logp)) == pytest.approx(kl, rel=1e-6)
    with pytest.raises(ValueError, match="outside the reachable range"):
        et.beta_for_kl(ref_logp, cal, task.rewards_XxY, tr, 50.0)


def test_exact_stage_smoke_writes_table_plot_manifest(tmp_path):
    rows = reproduce.run_exact_stage(_base(), str(tmp_path), size="smoke",
                                     keys=("identity", "vbon"), log=lambda s: None,
                                     devices=jax.devices()[:1])
    assert [r["method"] for r in rows] == ["calibrated identity", "vBoN (log, beta=1/(N-1), N=4)"]
    assert rows[1]["beta"] == pytest.approx(1 / 3)
    # Matched KL: both exact targets sit at the same budget.
    assert rows[0]["target_kl"] == pytest.approx(rows[1]["target_kl"], rel=1e-6)
    for name in ("exact_table.md", "exact_table.json", "exact_methods.png", "manifest.json"):
        assert (tmp_path / name).exists(), name
    # The training seeds start at first_seed (configs/reproduce.py's config.seed); a seed in
    # the base config would be replaced per run, so it is refused.
    reproduce.run_exact_stage(_base(), str(tmp_path / "from3"), size="smoke", keys=("vbon",),
                              first_seed=3, log=lambda s: None, devices=jax.devices()[:1])
    manifest = json.loads((tmp_path / "from3" / "manifest.json").read_text())
    assert manifest["seeds"] == {"seeds": [3]}
    assert [p.name for p in (tmp_path / "from3").glob("*/seed=*")] == ["seed=3"]
    # Another N (the exact task evaluated N = 1, 2, 4 only: --config.n=8 raised a KeyError after
    # the first seed's training)
    rows8 = reproduce.run_exact_stage(_base(), str(tmp_path / "n8"), size="smoke", n=8,
                                      keys=("vbon",), log=lambda s: None,
                                      devices=jax.devices()[:1])
    assert rows8[0]["beta"] == pytest.approx(1 / 7) and "exact_bon8" in rows8[0]
    assert rows8[0]["exact_won8"] != rows8[0]["exact_won4"]
    assert "BoN_8" in (tmp_path / "n8" / "exact_table.md").read_text()
    with pytest.raises(ValueError, match=r"config.task.eval_ns must be a non-empty tuple of "
                                         r"integers >= 1, got \(0,\)"):
        et.exact_task_config({"eval_ns": (0,)})
    with pytest.raises(ValueError, match=r"exact_config.seed=5 is not used.*config.seed"):
        reproduce.run_exact_stage(sweep.apply_overrides(_base(), {"seed": 5}), str(tmp_path))
    with pytest.raises(ValueError, match=r"exact_config.task.kl_budget=1.0 is not used"):
        reproduce.run_exact_stage(sweep.apply_overrides(_base(), {"task.kl_budget": 1.0}),
                                  str(tmp_path))
    with pytest.raises(ValueError, match="non-empty subset"):
        reproduce.run_exact_stage(_base(), str(tmp_path), keys=("nope",))
    with pytest.raises(ValueError, match="size must be one of"):
        reproduce.run_exact_stage(_base(), str(tmp_path), size="huge")


def test_the_exact_stage_trains_bonbon_against_bon_n_of_pi_ref(tmp_path):
    """BoNBoN's row: the exact config's bonbon section at N, samples_per_prompt / N independent
    pairs per prompt a step (each step draws as many responses as a CTRL step), its preference
    beta beta*_N, and a target that is BoN_N(pi_ref), enumerated here in reward order
    (P[y] = F(<= y)^N - F(< y)^N), with no range(Phi)/beta (no tilt to be sharp)."""
    from infalign_jax.core.preference_losses import bonbon_beta
    base = _base()
    base.bonbon.alpha = 0.25   # as --exact_config.bonbon.alpha=0.25 gives it
    rows = reproduce.run_exact_stage(base, str(tmp_path), size="smoke", keys=("bonbon",),
                                     log=lambda s: None, devices=jax.devices()[:1])
    row, moved = rows
    assert row["method"] == "BoNBoN (ipo, alpha=0.25, N=4)"
    assert row["beta"] == pytest.approx(bonbon_beta(4))
    task = et.make_task(0)
    ref = np.exp(et.policy_logprobs(task, task.ref_params)).astype(np.float64)
    bon = np.zeros_like(ref)
    for x, r in enumerate(np.asarray(task.rewards_XxY)):
        order = np.argsort(r)
        le = np.cumsum(ref[x, order])
        bon[x, order] = le ** 4 - np.concatenate([[0.0], le[:-1]]) ** 4
    assert row["target_kl"] == pytest.approx(
        float((bon * (np.log(bon) - np.log(ref))).sum(1).mean()), rel=1e-5)
    assert "range_phi_over_beta" not in row
    (run,) = tmp_path.glob("m=BoNBoN*/seed=0")
    config = json.loads((run / "manifest.json").read_text())["config"]
    assert config["method"] == "bonbon"
    assert config["bonbon"]["pairs_per_prompt"] == reproduce.SIZES["smoke"]["samples"] // 4
    assert config["bonbon"]["alpha"] == 0.25
    table = (tmp_path / "exact_table.md").read_text()
    assert "| BoNBoN (ipo, alpha=0.25, N=4) | 0.09091 | – |" in table
    assert "its π* is BoN_4(π_ref)" in table
    # and the same run moved along its line from pi_ref to the stage's KL budget (no beta of its
    # own to match it): exactly at the budget, against the same target
    budget = json.loads((tmp_path / "exact_table.json").read_text())["kl_budget"]
    assert moved["method"].startswith("BoNBoN (ipo, alpha=0.25, N=4), moved to the budget (weight")
    assert moved["exact_kl"] == pytest.approx(budget, rel=1e-5)
    assert abs(row["exact_kl"] / budget - 1) > 1e-3
    assert moved["target_kl"] == row["target_kl"] and 0 < moved["weight"] <= 2


def test_alpha_at_kl_bisects_an_exact_kl_along_the_line():
    """KL = c w^2 (the quadratic of a line from pi_ref): w = sqrt(target / c), from below 1 and
    beyond it; None where even w = MAX_ALPHA stays below; a non-monotone KL still lands on a
    root; and moved_to_kl on a policy a random step away from pi_ref lands on the exact KL."""
    from infalign_jax.workflows import kl_match
    for c in (4.0, 0.3):
        w = kl_match.alpha_at_kl(lambda a: c * a * a, 0.5, rtol=1e-9)
        assert w == pytest.approx(np.sqrt(0.5 / c), rel=1e-8)
    assert kl_match.alpha_at_kl(lambda a: 0.01 * a * a, 0.5) is None
    wavy = lambda a: a * (1.0 + 0.5 * np.sin(8 * a))
    w = kl_match.alpha_at_kl(wavy, 0.9, rtol=1e-9)
    assert wavy(w) == pytest.approx(0.9, rel=1e-8)
    with pytest.raises(ValueError, match="target > 0"):
        kl_match.alpha_at_kl(lambda a: a, 0.0)
    section = _base().task
    task = et.make_task(0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.5 * rng.standard_normal(x.shape)
                          .astype(np.asarray(x).dtype), task.ref_params)
    got = reproduce.moved_to_kl(et.rl_task(section), params, 0.3, 4)
    probs = np.exp(et.policy_logprobs(task, kl_match.interpolate(task.ref_params, params,
                                                                  got["weight"])))
    ref = np.exp(et.policy_logprobs(task, task.ref_params))
    assert float((probs * (np.log(probs) - np.log(ref))).sum(1).mean()) == pytest.approx(0.3,
                                                                                         rel=1e-5)
    assert got["exact_kl"] == pytest.approx(0.3, rel=1e-5) and got["weight"] < 1


def test_bonbon_flags_are_taken_where_the_exact_stage_trains_bonbon_and_refused_elsewhere():
    """The bonbon section is read by the exact stage's BoNBoN row only: the command's generic
    check (the base config has method='ctrl') refused --exact_config.bonbon.alpha even where that
    row trains. It is taken there, checked against the row's own config, and refused by name where
    no BoNBoN row trains; other keys are checked as before."""
    def load(**changes):   # as --config.methods=... and --config.stages=... give them
        c = load_config_module(os.path.join(ROOT, "configs", "reproduce.py")).get_config()
        for key, value in changes.items():
            c[key] = value
        return c

    refuse = reproduce.refuse_unread_exact_overrides
    refuse(load(), _base(), ["bonbon.alpha", "bonbon.variant", "rl.learning_rate"])
    refuse(load(methods="vbon,bonbon"), _base(), ["bonbon.alpha"])
    for changes in (dict(methods="vbon"), dict(stages="analytic,convergence")):
        with pytest.raises(ValueError, match=r"--exact_config.bonbon.alpha is not used: the "
                                             r"bonbon section is read by the exact stage's BoNBoN "
                                             r"row only"):
            refuse(load(**changes), _base(), ["rl.learning_rate", "bonbon.alpha"])
    quiet = _base()
    quiet.bonbon.monitor_samples = 0
    with pytest.raises(ValueError, match=r"--exact_config.bonbon.full_kl is not used by this run: "
                                         r"it is read only with config.bonbon.monitor_samples > 0"):
        refuse(load(), quiet, ["bonbon.full_kl"])
    with pytest.raises(ValueError, match=r"--exact_config.rl.ppo_clip is not used by this run"):
        refuse(load(), _base(), ["rl.ppo_clip"])


@pytest.mark.slow   # a command start
def test_the_reproduce_command_checks_bonbon_flags_itself(tmp_path):
    """The command leaves --exact_config's overrides to `refuse_unread_exact_overrides` (the
    generic check, which ran first, refused every bonbon flag as read under method='bonbon'
    only): its message, not the generic one, names the BoNBoN row."""
    import subprocess
    out = subprocess.run([sys.executable, os.path.join("experiments", "reproduce.py"),
                          "--config.methods=vbon", "--exact_config.bonbon.alpha=0.3",
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert ("--exact_config.bonbon.alpha is not used: the bonbon section is read by the exact "
            "stage's BoNBoN row only" in out.stderr), out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_convergence_stage_smoke_table_and_unreachable_budgets(tmp_path):
    rows = reproduce.run_convergence_stage(
        _base(), str(tmp_path), kls=(0.5, 50.0), size="smoke",
        transforms=(("identity", {}), ("exp", {"t": -5.0})), log=lambda s: None,
        devices=jax.devices()[:1])
    assert [(r["kl_budget"], r["transform"]) for r in rows] == [
        (0.5, "identity"), (0.5, "exp t=-5"), (50.0, "identity"), (50.0, "exp t=-5")]
    assert rows[0]["target_kl"] == pytest.approx(0.5, rel=1e-6)
    assert rows[0]["converged"] == "0/1"          # two steps are far from pi*
    assert rows[2]["unreachable"] and rows[3]["unreachable"]
    table = (tmp_path / "convergence_table.md").read_text()
    assert "| 0.5 | exp t=-5 |" in table and "unreachable" in table
    assert "BoN_4 trained − target" in table
    row = {**rows[0], "exact_bon3": 0.6, "target_bon3": 0.5, "exact_won3": 0.7,
           "target_won3": 0.75}
    three = reproduce.convergence_markdown([row], 3, {"seeds": [0], "steps": 2, "anneal": 1,
                                                      "samples": 2})
    assert "BoN_3 trained − target | WoN_3 trained − target |" in three
    assert "| +0.1000 | -0.0500 |" in three


def test_convergence_transforms_select_rows_by_label_and_refuse_unknown_ones(tmp_path):
    assert reproduce.select_transforms("all") == reproduce.CONVERGENCE_TRANSFORMS
    assert reproduce.select_transforms(" log , exp t=-5,optimal won") == (
        ("exp", {"t": -5.0}), ("log", {}), ("optimal", {"procedure": "won"}))
    for bad, named in (("log,exp t=-4", "'exp t=-4'"), (" , ", "[]"), ("Log", "'Log'")):
        with pytest.raises(ValueError, match=r"config.convergence_transforms: unknown "
                                             r"transforms .*" + re.escape(named)):
            reproduce.select_transforms(bad)
    cfg = ml_collections.ConfigDict({"stages": "analytic", "size": "tiny", "seed": 0,
                                     "convergence_transforms": "exp t=3"})
    with pytest.raises(ValueError, match=r"unknown transforms \['exp t=3'\]"):
        reproduce.run(cfg, str(tmp_path))


def test_seed_summary_mean_sd_and_convergence_count():
    runs = [{"exact_kl": kl, "target_kl": 0.5, "exact_kl_to_target": d,
             "range_phi_over_beta": 4.0} for kl, d in ((0.49, 0.004), (0.51, 0.02), (0.50, 0.01))]
    row = reproduce.seed_summary("m", 0.3, runs)
    assert row["exact_kl"] == pytest.approx(0.5) and row["exact_kl_sd"] == pytest.approx(0.01)
    assert row["target_kl"] == 0.5 and "target_kl_sd" not in row
    assert row["max_kl_to_target"] == 0.02 and row["converged"] == "2/3" and row["seeds"] == 3


def test_reproduce_rejects_unknown_stage(tmp_path):
    cfg = ml_collections.ConfigDict({"stages": "analytic,bogus", "size": "tiny", "seed": 0})
    with pytest.raises(ValueError, match=r"unknown stages \['bogus'\]"):
        reproduce.run(cfg, str(tmp_path))
    assert len(jax.devices()) == 8


def test_method_names_and_sizes_are_refused_before_any_stage():
    """A misspelt method (reproduce's config.methods, the demo's train_methods) or an unknown
    demo train_size was refused by the exact stage, after the analytic stage or the demo's steps
    1-5; config.methods without the exact stage was ignored."""
    from infalign_jax.workflows.demo import DemoConfig
    with pytest.raises(ValueError, match=r"config.methods must name a non-empty subset of "
                                         r"\['raw', 'identity', 'vbon'.*got \('exp', 'vbonn'\)"):
        reproduce.ReproduceConfig(methods="exp,vbonn")
    with pytest.raises(ValueError, match=r"config.methods='vbon' is read by the exact stage only"):
        reproduce.ReproduceConfig(methods="vbon", stages="analytic")
    assert reproduce.ReproduceConfig(methods="vbon,exp_bon").methods == "vbon,exp_bon"
    with pytest.raises(ValueError, match=r"config.train_methods must name a non-empty subset"):
        DemoConfig(train_methods="identity,exp")
    with pytest.raises(ValueError, match=r"train_size"):
        DemoConfig(train_size="huge")
    assert DemoConfig(train_methods="").methods == ()


def test_reproduce_refuses_an_exact_stage_without_its_config(tmp_path):
    cfg = ml_collections.ConfigDict({"stages": "exact", "size": "tiny", "seed": 0})
    with pytest.raises(ValueError, match="stage 'exact' needs exact_config"):
        reproduce.run(cfg, str(tmp_path))


def test_an_empty_method_list_and_a_convergence_stage_without_its_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"keys must name a non-empty subset .* got \(\)"):
        reproduce.check_method_keys((), "keys")
    with pytest.raises(ValueError, match=r"config.methods must name a non-empty subset"):
        reproduce.ReproduceConfig(methods=" , ")
    cfg = ml_collections.ConfigDict({"stages": "convergence", "size": "tiny", "seed": 0})
    with pytest.raises(ValueError, match="stage 'convergence' needs exact_config"):
        reproduce.run(cfg, str(tmp_path))


def test_the_stages_train_from_the_reproductions_seed(tmp_path, monkeypatch):
    got = {}

    def exact_stage(base, out, **kw):
        got["exact"] = kw["first_seed"]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "exact_table.md"), "w") as f:
            f.write("table\n")

    def convergence_stage(base, out, **kw):
        got["convergence"] = kw["first_seed"]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "convergence_table.md"), "w") as f:
            f.write("table\n")

    monkeypatch.setattr(reproduce, "run_exact_stage", exact_stage)
    monkeypatch.setattr(reproduce, "run_convergence_stage", convergence_stage)
    cfg = ml_collections.ConfigDict({"stages": "exact,convergence", "size": "tiny", "seed": 4})
    reproduce.run(cfg, str(tmp_path), exact_config=_base(), log=lambda s: None)
    assert got == {"exact": 4, "convergence": 4}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seeds"] == {"exact_and_convergence": [4, 5, 6]}   # tiny: three seeds


def test_the_convergence_stage_passes_on_errors_other_than_an_unreachable_budget(tmp_path,
                                                                                 monkeypatch):
    def broken(cfg, run_dir, devices):
        raise ValueError("a table of another task")

    monkeypatch.setattr(reproduce, "_train", broken)
    with pytest.raises(ValueError, match="a table of another task"):
        reproduce.run_convergence_stage(_base(), str(tmp_path), kls=(0.5,), size="smoke",
                                        transforms=(("identity", {}),), log=lambda s: None)


def test_a_convergence_row_reports_the_beta_its_runs_ended_at(tmp_path, monkeypatch):
    """The run's pi* is at the beta its schedule ends at (manifest extra.end_beta), which under
    a linear schedule or a warm-up is not the configured start (extra.beta)."""
    ev = {"exact_kl": 0.5, "target_kl": 0.5, "exact_kl_to_target": 0.01,
          "range_phi_over_beta": 2.0, "exact_bon4": 0.6, "target_bon4": 0.6, "exact_won4": 0.4,
          "target_won4": 0.4}

    def fake_train(cfg, run_dir, devices):
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "manifest.json"), "w") as f:
            json.dump({"extra": {"beta": 0.8, "end_beta": 0.2}}, f)
        return None, {"eval": ev}

    monkeypatch.setattr(reproduce, "_train", fake_train)
    (row,) = reproduce.run_convergence_stage(_base(), str(tmp_path), kls=(0.5,), size="smoke",
                                             transforms=(("identity", {}),), log=lambda s: None)
    assert row["beta"] == 0.2


def test_reproduce_refuses_keys_no_stage_it_runs_reads(tmp_path):
    """--config.stages=analytic with --config.t, --config.convergence_kls, --exact_config.* or
    --real_config ran the analytic stage and recorded the others in the manifest as if used."""
    import subprocess
    import sys
    from infalign_jax.infra.config_utils import load_config_module, refuse_unused_overrides
    config = load_config_module(os.path.join(os.path.dirname(CTRL_EXACT), "reproduce.py")
                                ).get_config()
    config.unlock()
    config.stages = "analytic"
    for key, readers in (("t", "'exact'"), ("convergence_kls", "'convergence'"),
                         ("seed", "'exact' or 'convergence'")):
        with pytest.raises(ValueError, match=rf"^--config.{key} is not used by this run: it is "
                                             rf"read only with config.stages including {readers}"):
            refuse_unused_overrides(config, [key], "--config.")
    refuse_unused_overrides(config, ["analytic.grid"], "--config.")
    config.stages = "exact"
    refuse_unused_overrides(config, ["t", "seed"], "--config.")
    with pytest.raises(ValueError, match=r"^--config.analytic.grid is not used"):
        refuse_unused_overrides(config, ["analytic.grid"], "--config.")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for flag in ("--exact_config.rl.learning_rate=0.5",
                 "--real_config=configs/compare_real.py:size=medium"):
        out = subprocess.run([sys.executable, "experiments/reproduce.py",
                              "--config.stages=analytic", flag, f"--workdir={tmp_path / 'run'}"],
                             cwd=root, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"{flag.split('=')[0]} is not used: it is read by the" in out.stderr, out.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.slow   # a command start each
@pytest.mark.parametrize("command,flag,message", [
    ("reproduce.py", "--exact_config.train.num_steps=7",
     r"--exact_config.train.num_steps is not used: each exact-stage run sets it from the size"),
    ("reproduce.py", "--exact_config.task.kl_budget=1.0", r"--exact_config.task.kl_budget is "),
    ("reproduce.py", "--exact_config.transform.t=2", r"--exact_config.transform.t is not used"),
    # the BoNBoN row sets its N and pairs; the method is each row's own
    ("reproduce.py", "--exact_config.bonbon.pairs_per_prompt=3",
     r"--exact_config.bonbon.pairs_per_prompt is not used: each exact-stage run sets it"),
    ("reproduce.py", "--real_config.base.seed=7", r"--real_config.base.seed is not used"),
    ("compare_real.py", "--config.base.rl.beta=0.5",
     r"--config.base.rl.beta is not used: the comparison sets it per run"),
    ("compare_real.py", "--config.size=small", r"--config.size is not used: .*:size="),
    # an option no run of the comparison reads
    ("compare_real.py", "--config.base.rl.ppo_clip=0.1",
     r"--config.base.rl.ppo_clip is not used by this run: it is read only with "
     r"rl.algorithm='ppo' .*\(under every trained method of the comparison: raw, identity"),
    # (the default stages do not run the real one, which is said first)
    ("reproduce.py", "--real_config.base.rl.gae_lambda=0.5",
     r"--real_config.base.rl.gae_lambda is not used: it is read by the real stage only"),
    # absl reads a single-dash flag and a --flagfile's flags too: both got past the refusal
    ("compare_real.py", "-config.base.seed=5", r"--config.base.seed is not used"),
    ("reproduce.py", "flagfile:--exact_config.rl.beta=0.3", r"--exact_config.rl.beta is not used"),
    # the demo's step 6 trains the exact stage's runs: the same keys are set per run
    ("demo.py", "--ctrl_config.rl.beta=0.3",
     r"--ctrl_config.rl.beta is not used: each of step 6's runs sets it"),
])
def test_commands_refuse_overrides_of_keys_they_set_per_run(tmp_path, command, flag, message):
    """A key the command sets for every run was accepted, recorded, then replaced (the exact
    table even labelled its rows with a kl_budget the runs never had)."""
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if flag.startswith("flagfile:"):
        (tmp_path / "flags").write_text(flag[len("flagfile:"):] + "\n")
        flag = f"--flagfile={tmp_path / 'flags'}"
    out = subprocess.run([sys.executable, os.path.join("experiments", command), flag,
                          f"--workdir={tmp_path / 'run'}"], cwd=root, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(message, out.stderr), out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# ---- the results, figure and shared table of a sweep --------------------------------------
def _runner(table_bytes=None, calls=None):
    """A runner as `train.run` leaves a run dir: summary, manifest and (`table_bytes`: drawn
    only when the dir holds none, as `prepare_reference_table` does) reference_table.npz."""
    def run(cfg, run_dir):
        if calls is not None:
            calls.append(os.path.basename(run_dir))
        os.makedirs(run_dir, exist_ok=True)
        table = os.path.join(run_dir, "reference_table.npz")
        if table_bytes is not None and not os.path.exists(table):
            with open(table, "wb") as f:
                f.write(table_bytes(run_dir))
        summary = {"final_step": cfg.train.num_steps,
                   "eval": {"exact_kl": cfg.transform.t * 10 + cfg.task.kl_budget}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        provenance.write_manifest(run_dir, cfg, with_devices=False)
        return summary
    return run


def test_equal_counts_of_values_put_the_first_swept_key_on_x_and_bools_are_not_numbers():
    """`sweep_plot.x_key`: of two numeric keys with as many values each, the first given is x
    (not the last); a bool key (`export.hf`) is a category, never the numeric axis: with it
    counted as a number it took x from transform.t, its two values as many as t's."""
    rows = [{"task.kl_budget": kl, "transform.t": t} for kl in (0.5, 1.0) for t in (-5.0, 5.0)]
    assert sweep_plot.x_key(rows, ["task.kl_budget", "transform.t"]) == "task.kl_budget"
    assert sweep_plot.x_key(rows, ["transform.t", "task.kl_budget"]) == "transform.t"
    flags = [{"export.hf": hf, "transform.t": t, "eval.exact_kl": t + hf}
             for hf in (True, False) for t in (1.0, 2.0)]
    assert sweep_plot.x_key(flags, ["export.hf", "transform.t"]) == "transform.t"
    (panel,) = sweep_plot.panels(flags, ["export.hf", "transform.t"])
    assert [(line.label, line.x, line.y) for line in panel.lines] == [
        ("hf=True", [1.0, 2.0], [2.0, 3.0]), ("hf=False", [1.0, 2.0], [1.0, 2.0])]


def test_a_key_some_points_leave_unset_names_lines_and_is_never_the_numeric_axis():
    """`rl.beta` set by three of four points: not every value a number, so not a candidate for
    the numeric x axis (counted as one, its values were read as r[key], a KeyError for the
    point without it); it names the lines, "beta=base" for the point without it (the base
    config's value)."""
    rows = [{"transform.t": t, "rl.beta": b, "eval.exact_kl": i}
            for i, (t, b) in enumerate(((1.0, 0.1), (2.0, 0.2), (1.0, 0.3)))]
    rows.append({"transform.t": 2.0, "eval.exact_kl": 3})
    keys = ["transform.t", "rl.beta"]
    assert sweep_plot.x_key(rows, keys) == "transform.t"
    (panel,) = sweep_plot.panels(rows, keys)
    assert [(line.label, line.x, line.y) for line in panel.lines] == [
        ("beta=0.1", [1.0], [0.0]), ("beta=0.2", [2.0], [1.0]), ("beta=0.3", [1.0], [2.0]),
        ("beta=base", [2.0], [3.0])]


def test_points_that_set_different_keys_get_their_table_and_figure():
    """Points need not set the same keys ({t=1}, {t=2}, {learning_rate=0.01}): no key is numeric
    in every row, so the first varying key is a categorical axis, "base" where a point leaves it
    to the base config. The figure read r[key] for it: a KeyError after every point had trained,
    for `run` and `collect` alike."""
    rows = [{"transform.t": 1.0, "eval.exact_kl": 0.1}, {"transform.t": 2.0, "eval.exact_kl": 0.2},
            {"rl.learning_rate": 0.01, "eval.exact_kl": 0.3}]
    keys = ["transform.t", "rl.learning_rate"]
    assert sweep_plot.x_key(rows, keys) == "transform.t"
    (panel,) = sweep_plot.panels(rows, keys)
    assert [(line.label, line.x, line.y) for line in panel.lines] == [
        ("learning_rate=base", ["1", "2"], [0.1, 0.2]), ("learning_rate=0.01", ["base"], [0.3])]


def test_cells_without_a_number_are_left_out_and_partial_error_columns_are_nan_there():
    """A metric's null cell (a summary's `null`) is left out of its line, not drawn (float(None)
    raised); a line of a group with no value at all is not drawn; a `_stderr` or `target_`
    column some points lack is NaN at those points (not 0, and not dropped for the whole line);
    a `_stderr` / `target_` column whose metric no row has gets its own panel."""
    rows = [
        {"transform.t": 1.0, "task.kl_budget": 0.5, "eval.exact_kl": 0.1,
         "eval.target_kl": 0.9, "eval.est": 1.0, "eval.est_stderr": 0.01,
         "eval.orphan_stderr": 0.5, "eval.target_lone": 7.0},
        {"transform.t": 2.0, "task.kl_budget": 0.5, "eval.exact_kl": None,
         "eval.est": 2.0, "eval.orphan_stderr": 0.6, "eval.target_lone": 8.0},
        {"transform.t": 3.0, "task.kl_budget": 0.5, "eval.exact_kl": 0.3, "eval.est": 3.0},
        {"transform.t": 1.0, "task.kl_budget": 1.0, "eval.exact_kl": None, "eval.est": 4.0},
    ]
    layout = {p.metric: p.lines for p in sweep_plot.panels(rows, ["transform.t",
                                                                   "task.kl_budget"])}
    assert list(layout) == ["eval.exact_kl", "eval.est", "eval.orphan_stderr",
                            "eval.target_lone"]
    (exact,) = layout["eval.exact_kl"]          # kl_budget=1 has no exact_kl: no line
    assert exact.label == "kl_budget=0.5" and exact.x == [1.0, 3.0] and exact.y == [0.1, 0.3]
    np.testing.assert_array_equal(exact.target, [0.9, np.nan])
    half, one = layout["eval.est"]
    assert (half.label, half.x, half.y) == ("kl_budget=0.5", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(half.stderr, [0.01, np.nan, np.nan])
    assert (one.label, one.stderr) == ("kl_budget=1", None)
    assert layout["eval.orphan_stderr"][0].y == [0.5, 0.6]
    assert layout["eval.target_lone"][0].y == [7.0, 8.0]


def test_the_sweeps_figure_is_drawn_against_the_swept_key_not_a_metric(tmp_path):
    """`write_results` chooses x among the points' keys: from the rows' columns it put a metric
    with more distinct values (one per point) than transform.t's on the x axis."""
    points = [{"transform.t": t, "task.kl_budget": kl} for t in (-5.0, 5.0) for kl in (0.5, 1.0)]
    said = []
    sweep.run(_base(), points, str(tmp_path), _runner(), log=said.append)
    assert said[-1].endswith("and sweep_results.png (each metric against transform.t)"), said[-1]
    assert (tmp_path / "sweep_results.png").exists()


def test_a_copy_cut_short_leaves_no_table_and_a_rerun_copies_it_whole(tmp_path, monkeypatch):
    """The table shared with the next point is copied beside its path and renamed: a sweep
    killed mid-copy left a partial reference_table.npz in the point's dir, which the rerun
    kept (it copies only into a dir without a table) and the trainer then failed to read."""
    table = b"table drawn once " * 1000
    real_copy = shutil.copyfile

    def killed_half_way(src, dst):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed_half_way)
    points = [{"transform.t": 1.0}, {"transform.t": 2.0}]
    with pytest.raises(KeyboardInterrupt):
        sweep.run(_base(), points, str(tmp_path), _runner(lambda d: table), log=lambda s: None)
    assert not (tmp_path / "t=2" / "reference_table.npz").exists()
    assert not [n for n in os.listdir(tmp_path / "t=2") if "tmp" in n]
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    calls = []
    sweep.run(_base(), points, str(tmp_path), _runner(lambda d: b"drawn again", calls),
              log=lambda s: None)
    assert calls == ["t=2"]
    assert (tmp_path / "t=2" / "reference_table.npz").read_bytes() == table


def test_a_table_a_points_dir_holds_and_a_finished_points_dir_are_left_as_they_are(tmp_path):
    """The first point's table is copied only into a dir that holds none and whose point still
    has to run: a table the point's dir already holds (its own earlier, interrupted run's) is
    the trainer's to check, not replaced; a finished point reused gets nothing copied in."""
    runner = _runner(lambda d: os.path.basename(d).encode())
    points = [{"transform.t": 1.0}, {"transform.t": 2.0}, {"transform.t": 3.0}]
    sweep.run(_base(), points[1:2], str(tmp_path), runner, log=lambda s: None)   # t=2 finished
    os.remove(tmp_path / "t=2" / "reference_table.npz")
    (tmp_path / "t=3").mkdir()
    (tmp_path / "t=3" / "reference_table.npz").write_bytes(b"own")
    said = []
    sweep.run(_base(), points, str(tmp_path), runner, log=said.append)
    assert (tmp_path / "t=1" / "reference_table.npz").read_bytes() == b"t=1"
    assert not (tmp_path / "t=2" / "reference_table.npz").exists()
    assert (tmp_path / "t=3" / "reference_table.npz").read_bytes() == b"own"
    assert not any("copied" in line for line in said), said


def test_reference_commands_draw_one_table_per_group_of_equal_reference_settings(tmp_path):
    """Points that differ in a task key need tables of their own: one calibration command per
    group (reference_0, reference_1, in the order the groups first occur), each with its
    group's task and reference overrides and the shared task / reference flags (not the RL
    ones), and each point's --reference_table names its group's table."""
    base = ml_collections.ConfigDict({"task": {"name": "helpfulness", "num_prompts": 4},
                                      "reference": {"k": 8}, "transform": {"t": 0.0},
                                      "rl": {"learning_rate": 1e-3}})
    points = [{"task.num_prompts": 4, "transform.t": 1.0},
              {"task.num_prompts": 8, "transform.t": 1.0},
              {"task.num_prompts": 4, "transform.t": 2.0}]
    configs = [sweep.apply_overrides(base, p) for p in points]
    shared = ["--config.reference.k=8", "--config.rl.learning_rate=0.002"]
    lines, extra = sweep.reference_commands("c.py", str(tmp_path), configs, points, shared)
    dirs = [tmp_path / "reference_0", tmp_path / "reference_1"]
    assert [shlex.split(line)[2:] for line in lines] == [
        ["--config=c.py", f"--workdir={dirs[0]}", "--config.reference.k=8",
         "--config.task.num_prompts=4"],
        ["--config=c.py", f"--workdir={dirs[1]}", "--config.reference.k=8",
         "--config.task.num_prompts=8"]]
    assert extra == [[f"--reference_table={d / train.REFERENCE_TABLE}"]
                     for d in (dirs[0], dirs[1], dirs[0])]
    commands = sweep.command_lines("train.py", "c.py", str(tmp_path), points, shared, extra)
    assert all(shlex.split(c)[-1] == e[0] for c, e in zip(commands, extra))
    # one group: <workdir>/reference
    lines, extra = sweep.reference_commands("c.py", str(tmp_path), configs[::2], points[::2])
    assert len(lines) == 1 and f"--workdir={tmp_path / 'reference'}" in shlex.split(lines[0])


def test_reference_commands_carry_a_points_reference_overrides_in_the_order_groups_occur(
        tmp_path):
    """A sweep of reference.seed: each group's calibration command gets its point's
    `--config.reference.*` override (not only the task ones), groups numbered in the order
    they first occur (not sorted), and each point copies its own group's table."""
    base = ml_collections.ConfigDict({"task": {"name": "helpfulness", "num_prompts": 4},
                                      "reference": {"k": 8, "seed": 0}, "transform": {"t": 0.0}})
    points = [{"reference.seed": 5, "transform.t": 1.0}, {"reference.seed": 2, "transform.t": 1.0},
              {"reference.seed": 5, "transform.t": 2.0}]
    configs = [sweep.apply_overrides(base, p) for p in points]
    lines, extra = sweep.reference_commands("c.py", str(tmp_path), configs, points)
    assert [shlex.split(line)[2:] for line in lines] == [
        ["--config=c.py", f"--workdir={tmp_path / 'reference_0'}", "--config.reference.seed=5"],
        ["--config=c.py", f"--workdir={tmp_path / 'reference_1'}", "--config.reference.seed=2"]]
    assert [e[0].rpartition("/")[0].rpartition("/")[2] for e in extra] == [
        "reference_0", "reference_1", "reference_0"]
