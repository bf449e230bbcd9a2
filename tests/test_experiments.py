"""Every config loads, is locked, and its entrypoint runs end to end on a tiny setting."""

import csv
import glob
import json
import math
import os
import shlex
import subprocess
import sys

import pytest

from infalign_jax.infra.config_utils import load_config_module

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_is_locked_and_documented(path):
    mod = load_config_module(path)
    assert "Command" in (mod.__doc__ or "") and "Expected" in mod.__doc__
    config = mod.get_config()
    with pytest.raises(AttributeError):
        config.no_such_field = 1
    with pytest.raises(ValueError, match="unknown config arg"):
        mod.get_config("no_such_field=1")


def _run(script, *args, tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # one device, like a user's run
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_analytic_entrypoint(tmp_path):
    out = tmp_path / "analytic"
    _run("analytic.py", f"--workdir={out}", "--config.ns=(1,4)", "--config.kls=(0.5,)",
         "--config.grid=500", tmp_path=tmp_path)
    for name in ("frontier.csv", "tables.md", "frontier_bon.png", "manifest.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["git"]["revision"] is None or len(manifest["git"]["revision"]) == 40


def test_entrypoint_rejects_unknown_override(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "analytic.py"),
                           f"--workdir={tmp_path}", "--config.no_such=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such" in proc.stderr


def _refused(script, *args):
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_a_config_file_that_cannot_be_loaded_is_refused_in_one_line(tmp_path):
    """ml_collections keeps a missing config file's error until the config is first read: the run
    started and failed deep inside with a traceback (with an override of it: a traceback from the
    flag parsing)."""
    for args in (["--config=configs/no_such.py"],
                 ["--config=configs/no_such.py", "--config.rl.beta=1"]):
        err = _refused("train_policy.py", *args, f"--workdir={tmp_path / 'run'}")
        assert ("--config=configs/no_such.py: the config file could not be loaded" in err
                and "No such file or directory" in err
                and f"a relative path is read from the working directory, {ROOT}" in err), err
        assert not (tmp_path / "run").exists()
    err = _refused("demo.py", "--ctrl_config=configs/no_such.py", f"--workdir={tmp_path}")
    assert "--ctrl_config=configs/no_such.py: the config file could not be loaded" in err, err


def test_a_config_flag_without_a_default_runs_without_it_and_reads_it_when_given(tmp_path):
    """`cli.define_config(name, None, ...)`: the run's flag checks read the overrides of an
    unparsed flag, which raised (ml_collections' UnparsedFlagError) before `main` ran."""
    script = tmp_path / "entry.py"
    script.write_text(
        "from infalign_jax.infra import cli\n"
        "C = cli.define_config('config', None, 'x')\n"
        "def main(argv):\n"
        "    print('value', None if C.value is None else C.value.rl.beta)\n"
        "cli.run(main)\n")
    env = dict(os.environ, XLA_FLAGS=xla_flags(), PYTHONPATH=ROOT)
    for args, wanted in (([], "value None"),
                         (["--config=configs/ctrl_exact.py", "--config.rl.beta=0.25"],
                          "value 0.25")):
        proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == wanted, proc.stdout + proc.stderr


def test_a_flag_that_get_config_derived_other_keys_from_is_refused_alone(tmp_path):
    """`--config.train.num_steps=3000` on ctrl_exact left the lr decay and the beta warm-up at
    the file's 1500 / 1000 steps (the lr at its floor for half the run); `--config.task.name=
    harmlessness` on ctrl_real kept t = +4, the Best-of-N sign, for the Worst-of-N task."""
    for script, config, flag, wanted in (
            ("train_policy.py", "configs/ctrl_exact.py", "--config.train.num_steps=3000",
             ("--config.train.num_steps changes a value that ctrl_exact.py's get_config derived "
              "rl.decay_steps, rl.beta_anneal_steps from (its config-string argument 'steps')",
              "--config=configs/ctrl_exact.py:steps=VALUE")),
            # the suggestion keeps the arguments given
            ("train_policy.py", "configs/ctrl_exact.py:transform=log,beta=0.333",
             "--config.train.num_steps=30",
             ("--config=configs/ctrl_exact.py:transform=log,beta=0.333,steps=VALUE instead",)),
            ("train_policy.py", "configs/ctrl_real.py", "--config.task.name=harmlessness",
             ("derived transform.t from (its config-string argument 'task')",)),
            # an argument the string gives already is replaced in the suggestion: appended, it
            # was given twice, which the config string refuses
            ("train_policy.py", "configs/ctrl_real.py:task=helpfulness,size=tiny",
             "--config.task.name=harmlessness",
             ("--config=configs/ctrl_real.py:task=VALUE,size=tiny instead",)),
            # evaluate's N grid follows its samples argument (a flag kept the old grid: no
            # N = 16 rows)
            ("evaluate.py", "configs/evaluate.py", "--config.eval.samples=16",
             ("derived eval.ns from (its config-string argument 'samples')",))):
        err = _refused(script, f"--config={config}", f"--workdir={tmp_path}", flag)
        for text in wanted:
            assert text in err, (config, flag, text)
    # taken when every derived key is set as well, by a flag or by its own argument, or is not
    # read by the command: each run then gets as far as the work dir (a path under a file: one
    # line and exit status 2, as for every bad work dir)
    (tmp_path / "file").write_text("")
    bad_dir = f"--workdir={tmp_path / 'file' / 'run'}"
    for script, config, *flags in (
            ("train_policy.py", "configs/ctrl_exact.py", "--config.train.num_steps=30",
             "--config.rl.decay_steps=30", "--config.rl.beta_anneal_steps=20"),
            ("train_policy.py", "configs/ctrl_real.py:t=-4", "--config.task.name=harmlessness"),
            ("calibrate.py", "configs/ctrl_real.py", "--config.task.name=harmlessness")):
        err = _refused(script, f"--config={config}", bad_dir, *flags)
        assert "error (NotADirectoryError)" in err or "error (WorkdirError)" in err, err
    err = _refused("analytic.py", f"--workdir={tmp_path / 'file' / 'run'}", "--config.grid=500")
    assert "error (NotADirectoryError)" in err


def test_calibrate_refuses_flags_outside_the_sections_it_reads(tmp_path):
    """calibrate.py accepted --config.transform.t / rl.beta / train.num_steps and recorded them
    in its manifest as if they had shaped the table."""
    err = _refused("calibrate.py", "--config=configs/ctrl_real.py:task=helpfulness,size=tiny",
                   f"--workdir={tmp_path}", "--config.reference.k=4", "--config.rl.beta=5")
    assert ("--config.rl.beta is not used: calibrate.py reads only the config's task and "
            "reference sections") in err
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_demo_entrypoint(tmp_path):
    out = tmp_path / "demo"
    _run("demo.py", f"--workdir={out}", "--config=configs/demo.py:prompts=2,k_ref=6,n=2",
         "--config.max_new_tokens=8", "--config.train_size=smoke",
         "--config.train_methods=identity,exp_bon", tmp_path=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert len(results["prompts"]) == 2
    for p in results["prompts"]:
        for s in p["fresh"]:
            assert 0.0 <= s["calibrated"] <= 1.0
    assert {r["procedure"] for r in results["analytic"]} == {"bon_2", "won_2"}
    assert (out / "manifest.json").exists() and (out / "reference_table.npz").exists()
    rows = results["ctrl_exact"]
    assert [r["method"].split(" ")[0] for r in rows] == ["calibrated", "CTRL"]
    assert all(0 < r["exact_bon1"] < 1 and r["exact_kl"] >= 0 for r in rows)
    assert (out / "ctrl" / "exact_table.md").exists() and (out / "ctrl" / "exact_methods.png").exists()


def test_the_demo_reports_an_unresolved_optimum_as_nan_with_its_reason(monkeypatch):
    """`--config.n=32` asks the optimal solver for an optimum grid 4000 does not resolve; the
    demo stopped there with a traceback. It now prints the reason and NaN, as the report does."""
    from infalign_jax.analysis import analytic_solver
    from infalign_jax.workflows import demo

    def unresolved(*args, **kwargs):
        raise analytic_solver.UnresolvedOptimum("grid 4000 does not resolve the optimum")

    monkeypatch.setattr(analytic_solver, "optimal_win_rate_at_kl", unresolved)
    lines = []
    row = demo.analytic_prediction("bon", 2, 0.5, lines.append)
    assert math.isnan(row["optimal"]) and 0.5 < row["best_exp_t"] < 1.0
    assert any("does not resolve the optimum" in line for line in lines)


def test_the_demo_reports_no_best_or_worst_text_for_a_prompt_without_a_valid_sample():
    """Prompt 1's fresh samples are all empty (invalid): its selection index is -1, which read
    the row's last text (a reference sample in the demo's rows) as its Best-of-N; it is None."""
    import jax.numpy as jnp
    from infalign_jax.core.selection import best_of_n, worst_of_n
    from infalign_jax.workflows.demo import chosen_texts
    texts = [["a", "bb", "ccc"], ["", "", ""]]
    scores = jnp.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    valid = jnp.array([[True, True, True], [False, False, False]])
    assert chosen_texts(texts, best_of_n(scores, valid)) == ["bb", None]
    assert chosen_texts(texts, worst_of_n(scores, valid)) == ["a", None]


TIMING = {"step_time_s", "tokens_per_s"}


def _metrics(path):
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("script,config,flags", [
    ("train_policy.py", "configs/ctrl_exact.py:steps=2",
     ["--config.reference.k=64", "--config.rl.samples_per_prompt=8"]),
    # (BoNBoN draws bonbon.n samples a prompt: rl.samples_per_prompt would be refused, unused)
    ("train_policy.py", "configs/ctrl_exact.py:transform=log,beta=0.333,steps=2",
     ["--config.reference.k=64", "--config.method=bonbon"]),
    ("train_reward.py", "configs/reward_model.py:steps=2",
     ["--config.data.synthetic_train_pairs=64",
      "--config.data.synthetic_eval_pairs=16", "--config.train.batch_size=8"]),
], ids=["ctrl_exact", "bonbon", "reward_model"])
def test_training_config_runs_two_steps_and_same_seed_reproduces(tmp_path, script, config, flags):
    """Each training config runs end to end; two fresh runs with one seed log the same numbers."""
    runs = []
    # Same-seed reproducibility is checked on the CTRL and reward-model configs; the BoNBoN
    # variant runs once (it shares the loop).
    for name in (("a",) if "--config.method=bonbon" in flags else ("a", "b")):
        out = tmp_path / name
        _run(script, f"--config={config}", f"--workdir={out}", *flags, tmp_path=tmp_path)
        assert (out / "summary.json").exists() and (out / "manifest.json").exists()
        runs.append(_metrics(out / "metrics.jsonl"))
    assert len(runs[0]) >= 2 and runs[0] == runs[-1]


def test_sweep_print_mode_lists_one_command_per_point(tmp_path):
    proc = _run("sweep.py", "--config=configs/ctrl_exact.py", f"--workdir={tmp_path}",
                "--sweep=print", "--sweep_arg=ts=-5;5", "--config.reference.k=32",
                tmp_path=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all("--config.reference.k=32" in line for line in lines)
    assert "--config.transform.t=-5.0" in lines[0] and "--config.transform.t=5.0" in lines[1]
    # a single-dash flag and a --flagfile's flag apply to the points as well: the printed
    # commands carry them (they were left out, and the cluster trained the default)
    (tmp_path / "flags").write_text("--config.rl.learning_rate=0.002\n")
    proc = _run("sweep.py", "--config=configs/ctrl_exact.py", f"--workdir={tmp_path}",
                "--sweep=print", "--sweep_arg=ts=-5;5", "-config.reference.k=32",
                f"--flagfile={tmp_path / 'flags'}", tmp_path=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert all("--config.reference.k=32" in line and "--config.rl.learning_rate=0.002" in line
               for line in lines), lines
    # a flag no point's config reads is refused before any command is printed
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
                          "--config=configs/ctrl_exact.py", f"--workdir={tmp_path}",
                          "--sweep=print", "--config.rl.ppo_clip=0.1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and not bad.stdout.strip(), bad.stdout + bad.stderr
    assert "--config.rl.ppo_clip is not used by this run" in bad.stderr, bad.stderr


def test_the_printed_commands_run_elsewhere_are_collected(tmp_path):
    """`--sweep=print`, one of its two commands run as printed (as a cluster would), then
    `--sweep=collect`: the run is recognised as the sweep's point (its config is the point's),
    tabled with its own summary's numbers, and the point not run is counted."""
    args = ["--config=configs/ctrl_exact.py:steps=4", f"--workdir={tmp_path}",
            "--sweep_arg=ts=-5;5", "--config.reference.k=32"]
    printed = _run("sweep.py", *args, "--sweep=print", tmp_path=tmp_path)
    assert "--sweep=collect" in printed.stderr
    first = shlex.split(printed.stdout.strip().splitlines()[0])
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    subprocess.run(first, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    proc = _run("sweep.py", *args, "--sweep=collect", tmp_path=tmp_path)
    assert "1 of 2 points not finished under this config (left out): name=exp,t=5,kl_budget=0.5" in proc.stdout
    assert not (tmp_path / "name=exp,t=5,kl_budget=0.5").exists()
    summary = json.loads((tmp_path / "name=exp,t=-5,kl_budget=0.5" / "summary.json").read_text())
    with open(tmp_path / "sweep_results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["point"] == "name=exp,t=-5,kl_budget=0.5"
    assert float(row["eval.exact_bon4"]) == summary["eval"]["exact_bon4"]
    # one point: nothing varies, so no figure
    assert "(no plot: no swept key varies)" in proc.stdout
    assert not (tmp_path / "sweep_results.png").exists()


def test_a_sweep_leaves_a_flag_a_point_reads_to_the_points(tmp_path):
    """`--config.rl.kl_horizon` with a base config whose beta is constant: the base alone does
    not read it, but the sweep's points switch the adaptive schedule on, which does. The sweep
    checks the flag against each point (`cli.run(overrides_checked_by_main=("config",))`)
    instead of refusing it against the base."""
    config = tmp_path / "adaptive_sweep.py"
    config.write_text(
        "from infalign_jax.infra.config_utils import load_config_module\n"
        f"_BASE = load_config_module({os.path.join(ROOT, 'configs', 'ctrl_exact.py')!r})\n"
        "get_config = _BASE.get_config\n"
        "def get_sweep(arg=None):\n"
        "    return [{'rl.beta_schedule': 'adaptive', 'rl.kl_target': 0.5, 'transform.t': t}\n"
        "            for t in (1.0, 2.0)]\n")
    proc = _run("sweep.py", f"--config={config}", f"--workdir={tmp_path / 'sweep'}",
                "--sweep=print", "--config.rl.kl_horizon=50", tmp_path=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all("--config.rl.kl_horizon=50" in line and
                                   "--config.rl.beta_schedule=adaptive" in line
                                   for line in lines), lines


@pytest.mark.slow
def test_reproduce_entrypoint_exact_stage_smoke(tmp_path):
    out = tmp_path / "repro"
    _run("reproduce.py", "--config=configs/reproduce.py:size=smoke", f"--workdir={out}",
         "--config.stages=exact", "--config.methods=identity,exp_bon", tmp_path=tmp_path)
    text = (out / "results.md").read_text()
    assert "## 2. Exact task" in text and "calibrated identity" in text and "CTRL exp t=5" in text
    assert (out / "exact" / "exact_methods.png").exists() and (out / "manifest.json").exists()


@pytest.mark.slow
def test_calibrate_entrypoint_builds_the_table_train_policy_reuses(tmp_path):
    """The real-task calibration pass (SmolLM2 + VADER) through its entrypoint, 2 prompts, K=2."""
    out = tmp_path / "cal"
    _run("calibrate.py", "--config=configs/ctrl_real.py:task=helpfulness,size=tiny",
         f"--workdir={out}", "--config.task.num_prompts=2", "--config.task.eval_prompts=2",
         "--config.reference.k=2",
         "--config.task.max_new_tokens=4", tmp_path=tmp_path)
    from infalign_jax.core.calibration import load_reference_table
    table = load_reference_table(str(out / "reference_table.npz"), expected_reward_model_id="vader")
    assert table.num_prompts == 2 and table.sorted_rewards_BxK.shape[1] == 2
    assert list(table.prompt_ids) == ["help-000", "help-001"]


def test_pod_check_shapes_follow_the_rollout_flags():
    """configs/pod.py computed the reward and calibration programs' shapes inside get_config, so
    --config.batch_size / rl.* flags left them at the file's workload (the headroom verdict was
    then for other shapes). They are now resolved after the flags; a check.* flag still wins."""
    from infalign_jax.workflows import compile_check
    config = load_config_module(os.path.join(ROOT, "configs", "pod.py")).get_config("model=tiny")
    for key, value in (("batch_size", 32), ("rl.samples_per_prompt", 4),
                       ("rl.max_new_tokens", 64), ("check.calibration_chunk", 3)):
        config.update_from_flattened_dict({key: value})   # what a --config.<key> flag does
    _, _, _, work = compile_check.configs(config)
    cc = compile_check.check_config(config)
    assert (cc.calibration_prompts, cc.calibration_chunk) == (32, 3)
    assert (cc.reward_batch, cc.reward_len) == (32 * 4, work.prompt_len + 64)


def test_pod_check_refuses_shapes_of_programs_it_does_not_compile():
    """--config.check.reward_len=100000 (past max_len) with check.programs=rl was accepted: only
    the reward program reads it, and it was not compiled."""
    from infalign_jax.infra.config_utils import refuse_unused_overrides
    from infalign_jax.workflows import compile_check  # noqa: F401  (registers the rule)
    config = load_config_module(os.path.join(ROOT, "configs", "pod.py")).get_config("model=tiny")
    for key, reader in (("check.reward_len", "'reward'"), ("check.calibration_chunk",
                                                             "'calibration'")):
        with pytest.raises(ValueError, match=rf"^--config.{key} is not used by this run: it is "
                                             rf"read only with check.programs including {reader}"):
            refuse_unused_overrides(config, [key], "--config.")
    refuse_unused_overrides(config, ["check.layouts"], "--config.")
    config.update_from_flattened_dict({"check.programs": "reward"})
    refuse_unused_overrides(config, ["check.reward_len", "check.reward_batch"], "--config.")
    with pytest.raises(ValueError, match=r"check.layouts is not used .* 'rl' or 'calibration'"):
        refuse_unused_overrides(config, ["check.layouts"], "--config.")


# ---------------------------------------------------------------- compile_check without libtpu
# tests_tpu/ compiles these programs with the TPU compiler; here the same `check_one` runs on a
# stand-in slice (4 or 8 of the fake CPU devices laid out as configs/pod.py's mesh) with the
# compile itself recorded instead of run, so its shapes, FLOPs, argument bytes, calls and
# refusals are checked against closed forms at no compile cost.
def _pod(arg="model=tiny,topology=v5e:2x2", **flat):
    config = load_config_module(os.path.join(ROOT, "configs", "pod.py")).get_config(arg)
    config.update_from_flattened_dict(flat)   # what --config.<key> flags do
    return config


def _param_counts(cfg):
    """(every parameter's element count, that of the "embed"-dimensioned ones FSDP splits), from
    the initialiser's shapes."""
    import jax
    from infalign_jax import models
    shapes = jax.tree.leaves(jax.eval_shape(lambda r: models.init_params(cfg, r),
                                            jax.random.key(0)))
    specs = jax.tree.leaves(models.param_logical_axes(cfg),
                            is_leaf=lambda x: isinstance(x, tuple) or x is None)
    assert len(shapes) == len(specs)
    total = sum(math.prod(x.shape) for x in shapes)
    split = sum(math.prod(x.shape) for x, s in zip(shapes, specs)
                if s is not None and "embed" in tuple(s))
    return total, split


def _kernel_count(cfg):
    """Elements of the trunk's matmul weights (the "*_kernel" leaves: no norm scales, no
    embedding table, which a lookup reads)."""
    import jax
    from infalign_jax import models
    shapes = jax.eval_shape(lambda r: models.init_params(cfg, r), jax.random.key(0))
    return sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(shapes)
               if jax.tree_util.keystr(path).endswith("_kernel']"))


@pytest.fixture(scope="module")
def stand_in_checks():
    """check_one of each program of model=tiny on v5e:2x2 (and the reward on v4:2x2x1, 8
    devices for 4 chips), the mesh over fake CPU devices, `_compile` recording what it was
    given: {(program, layout, topology): (CompileCheck, (fn, inputs, jit kwargs), mesh)}."""
    import jax
    from infalign_jax.infra import aot, sharding
    from infalign_jax.workflows import compile_check
    seen, out = {}, {}

    def mesh_of(topology, mesh_cfg):
        return sharding.make_mesh(mesh_cfg, jax.devices()[:8 if topology.startswith("v4") else 4])

    def record(fn, inputs, mesh, program, **kwargs):
        seen["last"] = (fn, inputs, kwargs)
        return None, 0.0

    def report(compiled, topology, num_devices, compile_s=0.0):
        return aot.CompileReport(topology, aot.chip_of(topology), aot.chips_in(topology),
                                 num_devices, 0, 0, 0, 0, 0, 0.0, 0.0, compile_s)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "topology_mesh", mesh_of)
        mp.setattr(aot, "compile_report", report)
        mp.setattr(compile_check, "_compile", record)
        config = _pod(**{"check.calibration_prompts": 12, "check.calibration_chunk": 3})
        for program, layout in (("rl", "train"), ("calibration", "train"),
                                ("calibration", "serve"), ("reward", "train")):
            check = compile_check.check_one(config, program, layout)
            out[(program, layout, "v5e:2x2")] = (check, seen.pop("last"),
                                                 mesh_of("v5e:2x2", compile_check.configs(config)[2]))
        v4 = _pod("model=tiny,topology=v4:2x2x1")
        out[("reward", "train", "v4:2x2x1")] = (compile_check.check_one(v4, "reward"),
                                                seen.pop("last"), None)
    return out


def test_pod_check_flops_calls_and_workload_are_the_closed_forms(stand_in_checks):
    """model=tiny (tied embeddings, remat="full", rloo, full_kl): B=8 prompts x M=2 samples,
    P=16, L=8, X=16 prompts x K=8 references; a calibration call of 12 prompts x 3 samples."""
    from infalign_jax.workflows import compile_check
    model_cfg = compile_check.configs(_pod())[0]
    trunk = _kernel_count(model_cfg)
    head = model_cfg.d_model * model_cfg.vocab_size       # the tied embedding as the lm head
    assert model_cfg.tie_embeddings and trunk == 2 * (4 * 256 * 256 + 3 * 256 * 512)
    b, p, m, l = 8, 16, 2, 8
    r, t = b * m, p + l
    rollout = 2 * trunk * b * p + 2 * head * b + 2 * (trunk + head) * b * m * l
    forward = 2 * trunk * r * t + 2 * head * r * l
    step = rollout + forward + 2 * trunk * r * t + 4 * forward + 2 * forward
    rl_check = stand_in_checks[("rl", "train", "v5e:2x2")][0]
    assert rl_check.flops_estimate == pytest.approx(step / 4, rel=1e-12)
    assert rl_check.calls == 1 and rl_check.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    # remat "none" drops the recompute, PPO runs its epochs, no full-vocabulary KL passes
    import dataclasses
    rl_cfg, work = rl_check.rl_cfg, compile_check.configs(_pod())[3]
    for model_change, rl_change, want in (
            ({"remat": "none"}, {}, step - forward),
            ({}, {"algorithm": "ppo", "ppo_epochs": 2}, step + 4 * forward),
            ({}, {"full_kl": False}, step - 2 * forward)):
        got = compile_check.step_flops(dataclasses.replace(model_cfg, **model_change),
                                       dataclasses.replace(rl_cfg, **rl_change), work)
        assert got == pytest.approx(want, rel=1e-12), (model_change, rl_change)
    cb, n = 12, 3
    calib = (2 * trunk * cb * p + 2 * head * cb + 2 * (trunk + head) * cb * n * l
             + 2 * trunk * cb * n * (p + l))
    for layout in ("train", "serve"):
        check = stand_in_checks[("calibration", layout, "v5e:2x2")][0]
        assert check.flops_estimate == pytest.approx(calib / 4, rel=1e-12)
        assert check.calls == 2 * 3     # ceil(16 / 12) prompt batches x ceil(8 / 3) chunks
        assert "12 prompts x 3 samples a call" in check.workload
        assert "X=16 prompts x K=8 = 6 calls" in check.workload
    reward = stand_in_checks[("reward", "train", "v5e:2x2")][0]
    assert reward.flops_estimate == pytest.approx(2 * trunk * r * t / 4, rel=1e-12)
    assert reward.workload.startswith(f"{r} sequences x T={t} tokens")
    # v4 shows each chip as 2 devices: the FLOPs are per device (8), not per chip (4)
    v4 = stand_in_checks[("reward", "train", "v4:2x2x1")][0]
    assert v4.report.num_devices == 8 and v4.mesh_shape["fsdp"] == 8
    assert v4.flops_estimate == pytest.approx(2 * trunk * r * t / 8, rel=1e-12)
    # one call: no whole-pass line; a calibration pass of 6 calls has one
    assert "whole pass" not in compile_check.summary(reward)
    calib_text = compile_check.summary(stand_in_checks[("calibration", "train", "v5e:2x2")][0])
    assert "whole pass, roofline" in calib_text and "6 calls:" in calib_text


def test_pod_check_inputs_are_the_programs_shapes_and_shardings(stand_in_checks):
    """The abstract inputs: per-device bytes as the shardings imply them (train splits the
    "embed"-dimensioned weights 4 ways, serve splits none: tensor=1), the batch and reference
    table shapes, and each program's output shape traced from those inputs."""
    import dataclasses
    import jax
    from infalign_jax.infra import sharding
    from infalign_jax.workflows import compile_check
    model_cfg = compile_check.configs(_pod())[0]
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))

    def per_device(cfg, layout):   # bf16 parameters
        total, split = _param_counts(cfg)
        return 2 * (total - split * 3 / 4 if layout == "train" else total)

    x, p = 16, 16
    table = x * p * (4 + 1)           # the reward model's prompt table, replicated
    for layout in ("train", "serve"):
        check, (fn, inputs, kwargs), mesh = stand_in_checks[("calibration", layout, "v5e:2x2")]
        batch = 12 * (p * (4 + 1) + 4) / 4
        closed = per_device(model_cfg, layout) + per_device(rm_cfg, "train") + table + batch + 8
        assert check.expected_argument_bytes == pytest.approx(closed, abs=64), layout
        assert inputs[2]["prompt_BxP"].shape == (12, p)
        assert inputs[1]["prompts_XxP"].shape == (x, p)
        with sharding.axis_rules(mesh):
            out = jax.eval_shape(fn, *inputs)
        assert out.shape == (12, 3) and out.dtype == jax.numpy.float32
    check, (fn, inputs, kwargs), mesh = stand_in_checks[("reward", "train", "v5e:2x2")]
    closed = per_device(rm_cfg, "train") + 16 * 24 * (4 + 1) / 4
    assert check.expected_argument_bytes == pytest.approx(closed, abs=64)
    assert [a.shape for a in inputs[1:]] == [(16, 16), (16, 16), (16, 8), (16, 8)]
    with sharding.axis_rules(mesh):
        assert jax.eval_shape(fn, *inputs).shape == (16,)
    _, (_, (state, frozen, batch, rng), _), _ = stand_in_checks[("rl", "train", "v5e:2x2")]
    assert frozen.ref_sorted_XxK.shape == (16, 8) and frozen.ref_count_X.shape == (16,)
    assert batch["prompt_BxP"].shape == (8, p)


def test_pod_check_refuses_shapes_the_slice_or_model_cannot_take(monkeypatch):
    """Refused before any compile: a calibration batch the 4 batch shards do not divide, a
    reward length not past the prompt or past max_len, a GAE step, a rollout past max_len (the
    boundary itself is taken); the plan compiles "reward" once; bad program lists."""
    import dataclasses
    import jax
    from infalign_jax.infra import aot, sharding
    from infalign_jax.infra.config_utils import refuse_unused_overrides
    from infalign_jax.workflows import compile_check
    monkeypatch.setattr(aot, "topology_mesh",
                        lambda topology, mesh_cfg: sharding.make_mesh(mesh_cfg, jax.devices()[:4]))
    monkeypatch.setattr(compile_check, "_compile",
                        lambda *a, **k: pytest.fail("compiled a refused program"))
    for flat, program, match in (
            ({"check.calibration_prompts": 6}, "calibration",
             r"config.check.calibration_prompts=6 is not divisible by the 4 batch shards"),
            ({"check.reward_len": 16}, "reward", r"config.check.reward_len=16 must exceed "
                                                 r"config.prompt_len=16"),
            ({"check.reward_len": 257}, "reward", r"config.check.reward_len=257 exceeds "
                                                  r"config.model.max_len=256")):
        with pytest.raises(ValueError, match=match):
            compile_check.check_one(_pod(**flat), program)
    with pytest.raises(ValueError, match=r"config.rl.advantage='gae'"):
        compile_check.configs(_pod(**{"rl.advantage": "gae", "rl.algorithm": "ppo",
                                      "rl.value_model": {"vocab_size": 1024}}))
    with pytest.raises(ValueError, match=r"= 257 exceeds config.model.max_len=256"):
        compile_check.configs(_pod(**{"prompt_len": 249}))
    assert compile_check.configs(_pod(**{"prompt_len": 248}))[3].prompt_len == 248
    # the calibration chunk defaults to the rollout's M samples a prompt
    cc = compile_check.check_config(_pod(**{"rl.samples_per_prompt": 4}))
    assert (cc.calibration_prompts, cc.calibration_chunk) == (8, 4)
    plan = compile_check.plan(_pod(**{"check.programs": "reward,rl",
                                      "check.layouts": "serve,train"}))
    assert plan == [("reward", "train"), ("rl", "serve"), ("rl", "train")]
    for programs, match in ((",", r"config.check.programs: ',' not among"),
                            ("rl,rl", r"names one twice")):
        with pytest.raises(ValueError, match=match):
            compile_check.plan(_pod(**{"check.programs": programs}))
    with pytest.raises(ValueError, match=r"reward_batch must be an integer >= 0"):
        compile_check.plan(_pod(**{"check.reward_batch": -1}))
    # check.layouts is read by the calibration program too
    refuse_unused_overrides(_pod(**{"check.programs": "calibration"}), ["check.layouts"],
                            "--config.")
    assert dataclasses.is_dataclass(cc)


def test_pod_check_names_an_out_of_memory_compile_does_not_fit(monkeypatch):
    """The compiler's refusal for lack of HBM (RESOURCE_EXHAUSTED, or libtpu's HbmOom) is
    `DoesNotFit` naming the program; any other compiler error is raised as it is."""
    import types
    import jax
    from infalign_jax.workflows import compile_check

    def jit_failing_with(message):
        def compile_():
            raise jax.errors.JaxRuntimeError(message)
        lowered = types.SimpleNamespace(compile=compile_)
        return types.SimpleNamespace(
            errors=jax.errors, jit=lambda fn, **kw: types.SimpleNamespace(lower=lambda *a: lowered))

    from infalign_jax.infra import sharding
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    for message in ("RESOURCE_EXHAUSTED: 20G of 16G\nmore", "INTERNAL: HbmOom: 20G of 16G"):
        monkeypatch.setattr(compile_check, "jax", jit_failing_with(message))
        with pytest.raises(compile_check.DoesNotFit, match=rf"^reward: {message.splitlines()[0]}$"):
            compile_check._compile(None, (), mesh, "reward")
    monkeypatch.setattr(compile_check, "jax", jit_failing_with("INTERNAL: RET_CHECK failure"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="RET_CHECK"):
        compile_check._compile(None, (), mesh, "reward")


def test_the_calibration_program_sorts_each_prompts_rewards_of_its_own_samples():
    """The compiled calibration call, run on a tiny model: row b is the sorted rewards of the N
    continuations sampled for batch prompt b, each scored by the reward model on the prompt
    table's row prompt_idx[b] (not another prompt's), recomputed one sequence at a time."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from infalign_jax import models
    from infalign_jax.decoding.sampling import SamplingConfig, sample
    from infalign_jax.rewards.reward_models import sequence_rewards
    from infalign_jax.workflows import compile_check
    import dataclasses
    cfg = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_len=16, init_std=0.5)
    rm_cfg = dataclasses.replace(cfg, heads=("reward",))
    ref_params = models.init_params(cfg, jax.random.key(0))
    rm_params = models.init_params(rm_cfg, jax.random.key(1))
    rm_params["reward_head_kernel"] = jax.random.normal(jax.random.key(2), (32, 1))   # zero at init
    table = np.array([[3, 4, 5], [6, 7, 8], [9, 10, 11]], np.int32)
    table_mask = np.ones_like(table, bool)
    idx = np.array([2, 0], np.int32)
    batch = {"prompt_BxP": table[idx], "prompt_mask_BxP": table_mask[idx], "prompt_idx_B": idx}
    scfg = SamplingConfig(n=3, max_new_tokens=4, eos_id=1)
    rng = jax.random.key(5)
    got = np.asarray(jax.jit(compile_check.calibration_program(cfg, scfg))(
        ref_params, {"params": rm_params, "prompts_XxP": table, "prompt_mask_XxP": table_mask},
        batch, rng))
    out = jax.jit(lambda params, p, m: sample(models.decoder_fns(cfg), params, p, m, rng, scfg))(
        ref_params, jnp.asarray(table[idx]), jnp.asarray(table_mask[idx]))
    pairs = [(b, j) for b in range(2) for j in range(3)]   # sample j of batch prompt b
    scores = jax.jit(lambda *a: sequence_rewards(rm_cfg, rm_params, *a))(table[[idx[b] for b, _ in pairs]],
                              table_mask[[idx[b] for b, _ in pairs]],
                              np.stack([out.tokens_BxNxL[b, j] for b, j in pairs]),
                              np.stack([out.mask_BxNxL[b, j] for b, j in pairs]))
    want = np.asarray(scores, np.float64).reshape(2, 3)
    assert got.shape == (2, 3)
    assert not np.array_equal(np.sort(want, 1), want)   # the sort is seen
    np.testing.assert_allclose(got, np.sort(want, 1), rtol=1e-5, atol=1e-5)


def test_the_demo_calibrates_transforms_and_selects_the_fresh_samples_against_the_references(
        tmp_path, monkeypatch):
    """Steps 1-6 of `workflows.demo.run` with its heavy parts stood in for (a tiny random Llama
    and the workflow tests' word tokenizer for SmolLM2, a deterministic judge for VADER, a stub
    analytic tool and exact stage that echo their arguments), everything else recomputed from the
    sampler's own output: the first k_ref samples of a prompt are its references, the next n its
    fresh samples; C = (#{ref < r} + 1/2 #{ref = r}) / K over the non-empty references."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from infalign_jax import models
    from infalign_jax.analysis import analytic, analytic_solver
    from infalign_jax.data.tokenize import detokenizer, encode_prompts, special_ids
    from infalign_jax.decoding import sampling
    from infalign_jax.models import gguf_import
    from infalign_jax.rewards import judges
    from infalign_jax.workflows import demo, reproduce
    from workflow_files import policy_tokenizer
    tok = policy_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"   # SmolLM2's has one
    cfg = models.ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=4,
                             n_kv_heads=2, head_dim=8, d_ff=64, max_len=64, init_std=0.5)
    params = models.init_params(cfg, jax.random.key(0))
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"stand-in")

    def judge(prompts, texts):   # depends on the prompt and the text; ties happen
        return [len(p) / 100 + sum(map(ord, t)) % 7 for p, t in zip(prompts, texts)]

    monkeypatch.setattr(gguf_import, "smollm2_gguf_path", lambda: str(weights))
    monkeypatch.setattr(gguf_import, "load_gguf_checkpoint", lambda path: (cfg, params))
    monkeypatch.setattr(gguf_import, "load_gguf_tokenizer", lambda path: tok)
    monkeypatch.setattr(judges, "get_judge", lambda name: judge)
    rates = {"identity": 0.61, "log": 0.62}
    monkeypatch.setattr(analytic, "win_rate_at_kl",
                        lambda name, kl, proc, n: rates[name] + (proc == "won") / 10 + n / 1e3
                        + kl / 1e4)
    monkeypatch.setattr(analytic, "best_t",
                        lambda proc, n, kl: (4.5 if proc == "bon" else -4.5, 0.7 + n / 1e3))
    monkeypatch.setattr(analytic_solver, "optimal_win_rate_at_kl",
                        lambda kl, proc, n: 0.8 + (proc == "won") / 10)
    trained = []

    def exact_stage(base_config, workdir, *, n, size, keys, log):
        trained.append((base_config, workdir, n, size, keys))
        os.makedirs(workdir, exist_ok=True)
        (tmp_path / "out" / "ctrl" / "exact_table.md").write_text("| table |")
        return [{"method": "CTRL identity"}]

    monkeypatch.setattr(reproduce, "run_exact_stage", exact_stage)
    k, n, new, seed, kl = 5, 3, 4, 3, 0.25
    config = demo.DemoConfig(prompts=3, k_ref=k, n=n, max_new_tokens=new, seed=seed, kl=kl,
                             train_methods="identity", train_size="smoke")
    res = demo.run(config, str(tmp_path / "out"), ctrl_config="ctrl", log=lambda s: None)

    prompts = [f"Write one sentence reviewing the {thing} you visited."
               for thing in ("pizza place", "science museum", "mountain hike")]
    p_BxP, m_BxP = encode_prompts(tok, prompts)
    eos, pad = special_ids(tok)
    scfg = sampling.SamplingConfig(n=k + n, max_new_tokens=new, eos_id=eos, pad_id=pad)
    out = jax.device_get(jax.jit(lambda p, r: sampling.sample(
        models.decoder_fns(cfg), p, jnp.asarray(p_BxP), jnp.asarray(m_BxP), r, scfg))(
        params, jax.random.key(seed)))
    detok = detokenizer(tok)
    texts = [[detok(out.tokens_BxNxL[b, j][out.mask_BxNxL[b, j]]) for j in range(k + n)]
             for b in range(3)]
    assert res["new_tokens"] == int(out.mask_BxNxL.sum())
    all_c, some_empty = [], False
    for b, row in enumerate(res["prompts"]):
        assert row["prompt"] == prompts[b]
        refs = np.array([r for t, r in zip(texts[b][:k], judge([prompts[b]] * k, texts[b][:k]))
                         if t], np.float32)
        np.testing.assert_allclose(row["ref_rewards_sorted"], np.sort(refs), rtol=1e-6)
        calibrated = {}
        for j, s in enumerate(row["fresh"]):
            text = texts[b][k + j]
            r = np.float32(judge([prompts[b]], [text])[0])
            c = (np.sum(refs < r) + 0.5 * np.sum(refs == r)) / refs.size
            assert s["text"] == text and s["reward"] == pytest.approx(float(r), rel=1e-6)
            assert s["calibrated"] == pytest.approx(c, abs=1e-6)
            assert s["identity"] == pytest.approx(c, abs=1e-6)
            assert s["exp(t=4)"] == pytest.approx(math.expm1(4 * c) / 4, rel=1e-5, abs=1e-6)
            assert s["exp(t=-4)"] == pytest.approx(math.expm1(-4 * c) / -4, rel=1e-5, abs=1e-6)
            assert s["log"] == pytest.approx(math.log((refs.size * c + 1) / (refs.size + 1)),
                                             rel=1e-5)
            if text:
                calibrated[text] = c
                all_c.append(c)
            some_empty |= not text
        if calibrated:
            assert calibrated[row["best_of_n"]] == max(calibrated.values())
            assert calibrated[row["worst_of_n"]] == min(calibrated.values())
        else:
            assert row["best_of_n"] is None and row["worst_of_n"] is None
    assert res["mean_calibrated_fresh"] == pytest.approx(np.mean(all_c), abs=1e-6)
    assert [r["procedure"] for r in res["analytic"]] == ["bon_3", "won_3"]
    for r, proc in zip(res["analytic"], ("bon", "won")):
        won = proc == "won"
        assert r["identity"] == pytest.approx(0.61 + won / 10 + 0.003 + 0.25e-4)
        assert r["log"] == pytest.approx(0.62 + won / 10 + 0.003 + 0.25e-4)
        assert (r["best_t"], r["best_exp_t"]) == (-4.5 if won else 4.5, pytest.approx(0.703))
        assert r["optimal"] == pytest.approx(0.8 + won / 10) and r["kl"] == kl
    assert trained == [("ctrl", str(tmp_path / "out" / "ctrl"), n, "smoke", ("identity",))]
    assert res["ctrl_exact"] == [{"method": "CTRL identity"}]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["seeds"] == {"sampling": seed}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["prompts"] == res["prompts"]
    # Best-/Worst-of-N needs two candidates; the analytic KL budget is positive
    with pytest.raises(ValueError, match=r"config.n must be an integer >= 2, got 1"):
        dataclasses_replace(config, n=1)
    with pytest.raises(ValueError, match=r"config.kl must be a finite number > 0, got 0.0"):
        dataclasses_replace(config, kl=0.0)
    # no methods: step 6 trains nothing, even with its config given
    trained.clear()
    again = demo.run(dataclasses_replace(config, train_methods=""), str(tmp_path / "none"),
                     ctrl_config="ctrl", log=lambda s: None)
    assert trained == [] and again["ctrl_exact"] == []


def dataclasses_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


def test_a_real_task_sweep_prints_its_reference_table_command_once(tmp_path):
    """`--sweep=print` of a real task (its table costs K base samples a prompt): first one
    `experiments/calibrate.py` command, with the task and reference flags only (calibrate.py
    refuses the others), drawing the table into <workdir>/reference; every training command
    then copies it (`--reference_table`), so a cluster draws it once, not once a point."""
    proc = _run("sweep.py", "--config=configs/ctrl_real.py:task=helpfulness,size=tiny",
                f"--workdir={tmp_path}", "--sweep=print", "--sweep_arg=ts=1;2",
                "--config.reference.k=8", "--config.rl.learning_rate=2e-05", tmp_path=tmp_path)
    lines = [shlex.split(line) for line in proc.stdout.strip().splitlines()]
    assert len(lines) == 3, proc.stdout
    calibrate, *points = lines
    assert calibrate[1] == "experiments/calibrate.py"
    assert calibrate[2:] == ["--config=configs/ctrl_real.py:task=helpfulness,size=tiny",
                             f"--workdir={tmp_path / 'reference'}", "--config.reference.k=8"]
    table = f"--reference_table={tmp_path / 'reference' / 'reference_table.npz'}"
    for line, t in zip(points, ("1.0", "2.0")):
        assert line[1] == "experiments/train_policy.py" and line[-1] == table
        assert f"--config.transform.t={t}" in line and "--config.reference.k=8" in line
        assert "--config.rl.learning_rate=2e-05" in line
    assert "run the first 1 line(s) first" in proc.stderr


def test_a_real_task_sweep_over_a_task_key_prints_one_reference_command_per_table(tmp_path):
    """Points that differ in a task key (num_prompts) need tables of their own: the printed
    sweep groups the points by their own configs, one calibration command per group, and each
    training command copies its group's table."""
    config = tmp_path / "prompts_sweep.py"
    config.write_text(
        "from infalign_jax.infra.config_utils import load_config_module\n"
        f"_BASE = load_config_module({os.path.join(ROOT, 'configs', 'ctrl_real.py')!r})\n"
        "get_config = _BASE.get_config\n"
        "def get_sweep(arg=None, config=None):\n"
        "    return [{'task.num_prompts': n, 'transform.t': t} for n in (4, 8) for t in (1.0, 2.0)]\n")
    proc = _run("sweep.py", f"--config={config}", f"--workdir={tmp_path / 'w'}",
                "--sweep=print", tmp_path=tmp_path)
    lines = [shlex.split(line) for line in proc.stdout.strip().splitlines()]
    assert [line[1] for line in lines] == ["experiments/calibrate.py"] * 2 + [
        "experiments/train_policy.py"] * 4, proc.stdout
    for line, n in zip(lines[:2], (4, 8)):
        assert line[-1] == f"--config.task.num_prompts={n}", line
    groups = [line[-1].split("/")[-2] for line in lines[2:]]
    assert groups == ["reference_0", "reference_0", "reference_1", "reference_1"], groups


def test_train_policy_passes_its_reference_table_flag_to_the_run(tmp_path):
    """`train_policy.py --reference_table=PATH` reaches `train.run`: a missing table is refused
    in one line before anything runs (a run that ignored the flag would train its 4 steps),
    and no work dir is left."""
    err = _refused("train_policy.py", "--config=configs/ctrl_exact.py:steps=4",
                   f"--workdir={tmp_path / 'run'}", f"--reference_table={tmp_path / 'none.npz'}")
    assert f"reference table '{tmp_path / 'none.npz'}': no such file" in err, err
    assert not (tmp_path / "run").exists()
