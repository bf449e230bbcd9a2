"""The CTRL run loop: exact resume, 1 vs 8 devices, non-finite steps, outputs, start-up errors."""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.rl import tasks as rl_tasks
from infalign_jax.rl.tasks import exact as exact_tasks
from infalign_jax.infra import provenance
from infalign_jax.loops import train
from infalign_jax.data import pipeline
from infalign_jax.core.calibration import ReferenceTableError, build_reference_table
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.infra.metrics_io import read_jsonl

from adam_numerics import assert_agree_after_adam

TIMING_KEYS = {"step_time_s", "tokens_per_s"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ctrl_exact = load_config_module(os.path.join(ROOT, "configs", "ctrl_exact.py"))


def _config(**overrides):
    c = ctrl_exact.get_config("samples=8,steps=6")
    c.unlock()
    c.reference.k = 64
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    c.lock()
    return c


ONE = jax.devices()[:1]   # most runs use one device, like a run on a laptop


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    state, summary = train.run(_config(), workdir, log=_quiet, devices=ONE)
    return workdir, state, summary


def test_resume_gives_identical_parameters_and_metrics(uninterrupted, tmp_path):
    workdir, state, _ = uninterrupted
    # Stop after 3 steps (the last step is always checkpointed), then resume to 6.
    train.run(_config(**{"train.num_steps": 3}), str(tmp_path), log=_quiet, devices=ONE)
    lines = []
    resumed, summary = train.run(_config(), str(tmp_path), log=lines.append, devices=ONE)
    assert summary["resumed_from"] == 3
    assert any("resumed from checkpoint step 3" in line for line in lines)
    for a, b in zip(_leaves(state), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    want, got = read_jsonl(os.path.join(workdir, "metrics.jsonl")), \
        read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(1, 7))
    for w, g in zip(want, got):
        assert {k: v for k, v in w.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in g.items() if k not in TIMING_KEYS}


def test_each_step_gets_its_own_key_and_batch(tmp_path, monkeypatch):
    """Step i's rollout key is fold_in(key(seed), i) and its prompts are the pipeline's global
    batch i (4 prompts, batches of 2): what the exact resume rests on, and a key or batch fixed
    over the run would pass the resume test all the same."""
    calls = []
    real_start = train._sharded_start

    def spy(*args, **kwargs):
        state, frozen, step_fn = real_start(*args, **kwargs)

        def recorded(state, frozen, batch, rng):
            calls.append((np.asarray(jax.random.key_data(rng)),
                          np.asarray(batch["prompt_idx_B"])))
            return step_fn(state, frozen, batch, rng)
        return state, frozen, recorded
    monkeypatch.setattr(train, "_sharded_start", spy)
    c = _config(**{"task.num_prompts": 4, "train.num_steps": 4})
    train.run(c, str(tmp_path), log=_quiet, devices=ONE)
    loader = pipeline.LoaderConfig(batch_size=2, seed=c.seed)
    assert len(calls) == 4
    for i, (key, idx) in enumerate(calls):
        np.testing.assert_array_equal(
            key, jax.random.key_data(jax.random.fold_in(jax.random.key(c.seed), i)))
        np.testing.assert_array_equal(idx, pipeline.global_batch_indices(loader, 4, i))
    assert len({tuple(idx) for _, idx in calls}) > 1


def test_outputs_metrics_tensorboard_manifest(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    workdir, _, summary = uninterrupted
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("reward", "calibrated_reward", "transformed_reward", "kl_k1", "kl_k3",
                "kl_full_vocab", "entropy", "clip_fraction", "grad_norm", "tokens_per_s",
                "step_time_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    acc = EventAccumulator(os.path.join(workdir, "tb"))
    acc.Reload()
    events = acc.Scalars("train/kl_k1")   # tags say which stream: train/..., eval/...
    assert [e.step for e in events] == list(range(1, 7))
    np.testing.assert_allclose([e.value for e in events], [r["kl_k1"] for r in rows], rtol=1e-6)
    manifest = json.load(open(os.path.join(workdir, "manifest.json")))
    assert manifest["config"]["transform"]["name"] == "exp"
    assert manifest["seeds"] == {"seed": 0, "reference": 1}
    assert "reference_table" in manifest["inputs"] and "git" in manifest
    assert manifest["devices"]["device_count"] == 8 and manifest["mesh"]["data"] == 1
    assert os.path.getsize(os.path.join(workdir, "training_curves.png")) > 1000
    # The final evaluation is exact: the trained policy and the exact target, by enumeration.
    ev = summary["eval"]
    assert 0 < ev["exact_kl"] and 0.5 < ev["target_bon1"] < 1
    assert read_jsonl(os.path.join(workdir, "eval.jsonl"))[-1]["step"] == 6
    # Six steps are far from pi*: the summary says so, with the measured distance.
    assert ev["exact_kl_to_target"] > 0.01 and ev["range_phi_over_beta"] > 0
    assert summary["converged"] is False and summary["kl_to_target"] == ev["exact_kl_to_target"]
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [2, 4, 6]


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_numbers(tmp_path):
    overrides = {"task.num_prompts": 8, "train.batch_size": 8, "train.num_steps": 2}
    one, s1 = train.run(_config(**overrides, **{"mesh.data": 1}), str(tmp_path / "one"),
                        log=_quiet, devices=jax.devices()[:1])
    eight, s8 = train.run(_config(**overrides, **{"mesh.data": 2, "mesh.fsdp": 2,
                                                  "mesh.tensor": 2}),
                          str(tmp_path / "eight"), log=_quiet)
    assert len(jax.devices()) == 8
    # Other reduction orders, so Adam's rounding caveat applies (`adam_numerics`).
    assert_agree_after_adam(_leaves(one), _leaves(eight), min_fraction=0.99, atol=2e-5, rtol=1e-4,
                            learning_rate=_config().rl.learning_rate,
                            updates=overrides["train.num_steps"])
    m1, m8 = s1["last_train_metrics"], s8["last_train_metrics"]
    for key in ("reward", "calibrated_reward", "kl_k1", "kl_full_vocab", "loss"):
        assert m1[key] == pytest.approx(m8[key], rel=1e-4, abs=1e-5), key


def _poisoned_exact(bad_prompt: int):
    """The exact task whose reward is NaN for one prompt (a NaN reward at chosen steps)."""

    def build(section):
        task = exact_tasks.rl_task(section)
        base = task.reward_fn

        def reward_fn(params, idx_R, tokens, mask):
            r = base(params, idx_R, tokens, mask)
            return jnp.where(idx_R == bad_prompt, jnp.nan, r)

        return dataclasses.replace(task, reward_fn=reward_fn)

    return build


def test_nan_reward_stops_with_step_named_and_last_checkpoint_intact(tmp_path, monkeypatch):
    monkeypatch.setitem(rl_tasks._BUILDERS, "exact_nan", _poisoned_exact(1))
    cfg = _config(**{"task.name": "exact_nan", "train.batch_size": 1, "train.checkpoint_every": 1})
    first_bad = next(s for s in range(6) if pipeline.batch_indices(pipeline.LoaderConfig(1, 0), 2, s)[0] == 1)
    with pytest.raises(train.NonFiniteStepError, match=f"step {first_bad + 1}: non-finite") as e:
        train.run(cfg, str(tmp_path), log=_quiet, devices=ONE)
    assert "reward" in str(e.value)
    ckpts = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert (ckpts[-1] if ckpts else 0) == first_bad


def test_nan_reward_skip_mode_counts_and_keeps_state(tmp_path, monkeypatch):
    monkeypatch.setitem(rl_tasks._BUILDERS, "exact_nan", _poisoned_exact(1))
    cfg = _config(**{"task.name": "exact_nan", "train.batch_size": 1,
                     "train.nan_policy": "skip", "train.num_steps": 4})
    bad_steps = [s for s in range(4) if pipeline.batch_indices(pipeline.LoaderConfig(1, 0), 2, s)[0] == 1]
    assert 0 < len(bad_steps) < 4
    state, summary = train.run(cfg, str(tmp_path), log=_quiet, devices=ONE)
    assert summary["skipped_steps"] == len(bad_steps)
    assert int(state.step) == 4
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["skipped_total"] for r in rows] == list(np.cumsum(
        [s in bad_steps for s in range(4)]))
    assert all(np.isfinite(x).all() for x in _leaves(state))
    # Resumed to 6 steps: the count goes on from the checkpoint's (it restarted at 0).
    bad6 = [s for s in range(6) if pipeline.batch_indices(pipeline.LoaderConfig(1, 0), 2, s)[0] == 1]
    _, summary = train.run(_config(**{"task.name": "exact_nan", "train.batch_size": 1,
                                      "train.nan_policy": "skip", "train.num_steps": 6}),
                           str(tmp_path), log=_quiet, devices=ONE)
    assert summary["resumed_from"] == 4 and summary["skipped_steps"] == len(bad6) > len(bad_steps) - 1
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["skipped_total"] for r in rows] == list(np.cumsum([s in bad6 for s in range(6)]))


def test_skip_under_accumulation_counts_the_open_window(tmp_path, monkeypatch):
    """grad_accum_steps = 2, two steps, the second skipped: the first step's gradient waits in
    the accumulator when the run ends; the summary counts it (it was silently dropped)."""
    monkeypatch.setitem(rl_tasks._BUILDERS, "exact_nan", _poisoned_exact(1))
    bad_steps = [s for s in range(2) if pipeline.batch_indices(pipeline.LoaderConfig(1, 0), 2, s)[0] == 1]
    assert len(bad_steps) == 1
    lines: list[str] = []
    cfg = _config(**{"task.name": "exact_nan", "train.batch_size": 1, "train.nan_policy": "skip",
                     "train.num_steps": 2, "rl.grad_accum_steps": 2})
    state, summary = train.run(cfg, str(tmp_path / "skip"), log=lines.append, devices=ONE)
    assert summary["skipped_steps"] == 1 and summary["unapplied_micro_steps"] == 1
    assert any("1 micro-steps' gradients wait in the accumulator" in line for line in lines)
    clean = _config(**{"train.num_steps": 2, "rl.grad_accum_steps": 2, "train.batch_size": 1})
    _, summary = train.run(clean, str(tmp_path / "clean"), log=_quiet, devices=ONE)
    assert summary["unapplied_micro_steps"] == 0


def test_guard_keeps_state_bitwise_on_nonfinite_step():
    from infalign_jax import rl

    def step(state, frozen, batch, rng):
        new = jax.tree.map(lambda x: x * batch["scale"], state)
        return new._replace(step=state.step + 1), {"loss": jnp.sum(new.params["w"])}

    state = rl.RLState({"w": jnp.arange(3.0)}, {"mu": jnp.ones(3)}, jnp.zeros((), jnp.int32))
    guarded = jax.jit(train.guard_nonfinite(step))
    good, m_good = guarded(state, None, {"scale": 2.0}, None)
    bad, m_bad = guarded(state, None, {"scale": jnp.nan}, None)
    assert int(m_good["skipped"]) == 0 and int(m_bad["skipped"]) == 1
    np.testing.assert_array_equal(good.params["w"], [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(bad.params["w"], state.params["w"])
    np.testing.assert_array_equal(bad.opt_state["mu"], state.opt_state["mu"])
    assert int(bad.step) == 1


def test_serving_rollout_layout_gives_the_training_layouts_numbers(tmp_path):
    """mesh.rollout="serve" reshards the policy once per step for decoding (weights split over
    tensor only): the same rollouts, hence the same run, as decoding from the FSDP layout."""
    overrides = {"task.num_prompts": 8, "train.batch_size": 8, "train.num_steps": 2,
                 "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    fsdp, s_fsdp = train.run(_config(**overrides), str(tmp_path / "train"), log=_quiet)
    serve, s_serve = train.run(_config(**overrides, **{"mesh.rollout": "serve"}),
                               str(tmp_path / "serve"), log=_quiet)
    # The update runs in the same layout, but the rollout's reductions differ, so Adam's rounding
    # caveat applies (`adam_numerics`; one entry in 2048 differed by 3e-6 on one machine).
    assert_agree_after_adam(_leaves(fsdp), _leaves(serve), min_fraction=0.99, atol=1e-6, rtol=1e-6,
                            learning_rate=_config().rl.learning_rate,
                            updates=overrides["train.num_steps"])
    m1, m2 = s_fsdp["last_train_metrics"], s_serve["last_train_metrics"]
    for key in ("reward", "kl_k1", "kl_full_vocab", "response_length"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-6, abs=1e-7), key
    # The loss is a mean of advantage-weighted log-probs whose terms cancel, so its relative
    # rounding is larger than its terms' (1.4e-6 at XLA's CPU optimisation level 0).
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match=r"config.mesh.rollout must be one of \['serve', 'train'\]"):
        train.run(_config(**{"mesh.rollout": "decode"}), str(tmp_path / "bad"), log=_quiet)


def test_batch_not_divisible_by_mesh_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="batch_size=2 is not divisible by the 8 batch shards"):
        train.run(_config(), str(tmp_path), log=_quiet)


@pytest.mark.parametrize("key,value,match", [
    ("rl.beta", 0.0, r"config.rl: RLConfig.beta must be a finite number > 0"),
    ("rl.beta", -1.0, r"RLConfig.beta"),
    ("transform.name", "nope", r"unknown transform 'nope'; known transforms"),
    ("transform.name", "optimal", r"needs a table"),
    ("task.name", "nope", r"config.task.name: unknown task 'nope'"),
    ("train.batch_size", 3, r"batch_size=3 exceeds the task's 2 prompts"),
    ("train.nan_policy", "ignore", r"nan_policy must be one of"),
    ("train.async_checkpoint", "sometimes", r"config.train.async_checkpoint must be one of "
                                            r"\('auto', 'true', 'false'\) or a bool, got 'sometimes'"),
    ("train.num_steps", 0, r"num_steps must be a positive integer"),
    ("rl.samples_per_prompt", 1, r"samples_per_prompt must be >= 2 for RLOO"),
    ("rl.kl_mode", "both", r"kl_mode"),
    ("mesh.data", 3, r"multiply to 3 but there are 1 devices"),
    ("bonbon.n", -5, r"config.bonbon: BoNBoNConfig.n"),   # checked under method="ctrl" too
    ("bonbon.data", "bogus", r"BoNBoNConfig.data must be one of"),
])
def test_bad_config_fails_before_training(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        train.run(_config(**{key: value}), str(tmp_path), log=_quiet, devices=ONE)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_reference_table_of_another_reward_model_is_refused(tmp_path):
    table = build_reference_table(["p0", "p1"], np.zeros((2, 4)), reward_model_id="other_rm",
                                  base_model_id="other_base")
    table.save(str(tmp_path / "reference_table.npz"))
    with pytest.raises(ReferenceTableError, match="other_rm"):
        train.run(_config(), str(tmp_path), log=_quiet, devices=ONE)


def test_resume_with_another_seed_is_refused(uninterrupted, tmp_path):
    workdir, _, _ = uninterrupted
    import shutil
    shutil.copytree(workdir, tmp_path / "run")
    with pytest.raises(ValueError, match="seed 0, the config says 5"):
        train.run(_seeded(5), str(tmp_path / "run"), log=_quiet, devices=ONE)


def test_resume_with_another_config_is_refused_naming_the_keys(uninterrupted, tmp_path):
    workdir, _, _ = uninterrupted
    import shutil
    shutil.copytree(workdir, tmp_path / "run")
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    changed = _config(**{"transform.t": 8.0, "rl.beta": 0.5})
    with pytest.raises(ValueError, match=r"another config \(rl.beta: checkpoint 1.5, config 0.5; "
                                         r"transform.t: checkpoint 3.0, config 8.0\)"):
        train.run(changed, str(tmp_path / "run"), log=_quiet, devices=ONE)
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest   # left as it was
    # Running longer, reporting differently or on another mesh is a resume of the same run.
    longer = _config(**{"train.num_steps": 8, "train.log_every": 1, "mesh.data": 1})
    _, summary = train.run(longer, str(tmp_path / "run"), log=_quiet, devices=ONE)
    assert summary["resumed_from"] == 6 and summary["final_step"] == 8



@pytest.mark.parametrize("key, value, named", [
    ("rl.max_grad_norm", 1.0, "rl.max_grad_norm: checkpoint 0.0, config 1.0"),
    ("rl.grad_accum_steps", 2, "rl.grad_accum_steps: checkpoint 1, config 2"),
    ("rl.lora.rank", 2, "rl.lora.rank: checkpoint '<absent>', config 2"),
])
def test_resume_under_a_config_whose_state_is_shaped_otherwise_names_the_keys(
        uninterrupted, tmp_path, key, value, named):
    """Clipping, accumulation or LoRA adapters change the state's tree: a resume under them
    failed in Orbax's restore (CheckpointRestoreError, a 74-190 line traceback through the CLI,
    exit 1, naming tree paths such as opt_state[0].mu.down) before the config was compared."""
    import shutil
    workdir, _, _ = uninterrupted
    shutil.copytree(workdir, tmp_path / "run")
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    changed = _config()
    changed.unlock()
    *parents, leaf = key.split(".")
    section = changed
    for part in parents:
        section = section[part]
    section[leaf] = value
    changed.lock()
    with pytest.raises(ValueError, match=r"holds a run of another config \(.*" + re.escape(named)):
        train.run(changed, str(tmp_path / "run"), log=_quiet, devices=ONE)
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest


def test_resume_with_another_optimal_table_behind_the_same_path_is_refused(tmp_path):
    """The optimal transform names its table by path; a run resumed after the file changed
    would train on another transform (found by a review: it resumed and its targets moved)."""
    table = tmp_path / "phi.npz"
    u = np.linspace(0.0, 1.0, 9)
    np.savez(table, u=u, phi=np.log(np.maximum(u, 1e-3)))

    def config(steps):
        c = ctrl_exact.get_config(f"samples=8,steps={steps},transform=identity")
        c.unlock()   # as --config.transform.name=optimal --config.transform.path=... set it
        c.reference.k, c.train.eval_every = 64, 0
        c.transform.name, c.transform.path = "optimal", str(table)
        c.lock()
        return c
    train.run(config(2), str(tmp_path / "run"), log=_quiet, devices=ONE)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    want = provenance.file_sha256(str(table))
    assert manifest["inputs"]["transform_table"]["sha256"] == want
    np.savez(table, u=u, phi=-np.exp(-4.0 * u))   # another table, the same path
    with pytest.raises(ValueError, match=r"another config \(transform_table.sha256: checkpoint "
                                         + f"'{want}'"):   # rerun (or resumed) as it was
        train.run(config(2), str(tmp_path / "run"), log=_quiet, devices=ONE)


def test_rerunning_a_finished_run_adds_no_rows_and_keeps_its_start_time(uninterrupted, tmp_path):
    workdir, _, summary = uninterrupted
    import shutil
    shutil.copytree(workdir, tmp_path / "run")
    before = json.loads((tmp_path / "run" / "manifest.json").read_text())
    evals = read_jsonl(str(tmp_path / "run" / "eval.jsonl"))
    _, again = train.run(_config(), str(tmp_path / "run"), log=_quiet, devices=ONE)
    assert again["resumed_from"] == 6 and again["eval"] == summary["eval"]
    # the summary's train metrics are the last step's, as the run logged them (they were {}:
    # the sweep table's train.* columns of a rerun point came out empty)
    assert again["last_train_metrics"] == summary["last_train_metrics"] != {}
    assert read_jsonl(str(tmp_path / "run" / "eval.jsonl")) == evals
    after = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert after["started"] == before["started"]



def test_the_manifest_records_the_code_the_run_started_with_not_a_commit_made_during_it(
        tmp_path, monkeypatch):
    """The manifest written at a run's end read the git state and package versions then: a
    commit (or an install) made while the run went on was recorded as the code that ran, in
    `git` / `packages` and in a fresh run's `started_with`. They are the run's start's."""
    at_start, committed = {"revision": "a" * 40, "dirty": False}, \
        {"revision": "b" * 40, "dirty": False}
    now = {"git": at_start, "packages": provenance.package_versions()}
    first_packages = dict(now["packages"])
    monkeypatch.setattr(provenance, "git_state", lambda path=None: now["git"])
    monkeypatch.setattr(provenance, "package_versions",
                        lambda names=provenance.PACKAGES: now["packages"])
    batch = train.step_batch

    def committing_at_step_4(*args):
        if args[-1] == 3:   # a commit and an upgrade while the run goes on
            now.update(git=committed, packages={**first_packages, "jax": "9.9.9"})
        return batch(*args)
    monkeypatch.setattr(train, "step_batch", committing_at_step_4)
    train.run(_config(), str(tmp_path), log=_quiet, devices=ONE)
    assert now["git"] == committed   # the commit happened during the run
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["finished"] is not None
    assert manifest["git"] == at_start and manifest["packages"] == first_packages
    assert manifest["started_with"] == {"git": at_start, "packages": first_packages}


def _seeded(seed):
    c = _config()
    c.unlock()
    c.seed = seed
    c.lock()
    return c


def test_kl_budget_solves_beta_and_unconverged_runs_say_so(tmp_path):
    lines = []
    cfg = _config(**{"task.kl_budget": 0.5, "train.num_steps": 2, "task.eos": True})
    _, summary = train.run(cfg, str(tmp_path), log=lines.append, devices=ONE)
    beta = json.load(open(tmp_path / "manifest.json"))["extra"]["beta"]
    assert beta != cfg.rl.beta and any("config.task.kl_budget = 0.5" in ln for ln in lines)
    # The evaluation enumerates the target for that beta: its KL is the budget.
    assert summary["eval"]["target_kl"] == pytest.approx(0.5, rel=1e-6)
    assert any(line.startswith("NOT CONVERGED: KL(pi || pi*)") and "range(Phi)/beta" in line
               for line in lines)
    assert summary["converged"] is False
    bonbon = _config(**{"task.kl_budget": 0.5})
    bonbon.unlock()
    bonbon.method = "bonbon"
    with pytest.raises(ValueError, match="kl_budget"):
        train.run(bonbon, str(tmp_path / "b"), log=_quiet, devices=ONE)


def test_a_kl_budget_run_resumes_only_at_the_beta_it_solved(tmp_path):
    """task.kl_budget's beta is solved for the last step; while the warm-up outlasts the run it
    depends on train.num_steps, so extending such a run would train its rest at another beta
    (found by a review: not the uninterrupted run). Refused, naming the solved beta; without a
    warm-up in the way the same extension resumes."""
    def config(steps, anneal):
        return _config(**{"task.kl_budget": 0.5, "train.num_steps": steps,
                          "train.checkpoint_every": 2, "rl.beta_anneal_steps": anneal})
    train.run(config(2, 4), str(tmp_path / "warm"), log=_quiet, devices=ONE)
    with pytest.raises(ValueError, match=r"another config \(derived.rl.beta: checkpoint "):
        train.run(config(4, 4), str(tmp_path / "warm"), log=_quiet, devices=ONE)
    train.run(config(2, 0), str(tmp_path / "plain"), log=_quiet, devices=ONE)
    _, summary = train.run(config(4, 0), str(tmp_path / "plain"), log=_quiet, devices=ONE)
    assert summary["resumed_from"] == 2


def test_runs_recorded_before_shared_prompt_or_remat_resume_under_either_setting():
    """rl.shared_prompt and model.remat change how the same quantities are computed, not what
    is trained: a record without them (written before they existed) resumes under either value,
    while a change of what is trained is still refused by name."""
    from infalign_jax.loops import skeleton
    old = {"rl.beta": 0.1, "transform.name": "identity"}
    for shared, remat in ((False, "none"), (True, "full")):
        now = skeleton.canonical_record({**old, "rl.shared_prompt": shared, "model.remat": remat})
        skeleton.check_same_config("run", old, now)
    other = skeleton.canonical_record({**old, "rl.beta": 0.2, "rl.shared_prompt": True})
    with pytest.raises(ValueError, match=r"another config \(rl.beta: checkpoint 0.1, config 0.2\)"):
        skeleton.check_same_config("run", old, other)


def test_runs_recorded_before_the_reward_pool_resume_only_at_the_value_they_had():
    """model.reward_pool and model.trunk_layers were added later: a record without them resumes
    under their earlier values ("last", 0), and under any other value it is refused by name."""
    from infalign_jax.loops import skeleton
    old = {"model.d_model": 64, "transform.name": "identity"}
    now = skeleton.canonical_record({**old, "model.reward_pool": "last", "model.trunk_layers": 0})
    skeleton.check_same_config("run", old, now)
    for key, value in (("model.reward_pool", "mean"), ("model.trunk_layers", 4)):
        with pytest.raises(ValueError, match=rf"another config \({key}: checkpoint '<absent>', "
                                             rf"config {value!r}\)"):
            skeleton.check_same_config("run", old, skeleton.canonical_record({**old, key: value}))


def test_guard_skips_a_ppo_step_whose_critic_goes_nan():
    """A PPO/GAE step whose critic update goes NaN (its Adam second moment made negative, so
    mu / sqrt(nu) is NaN) while the policy and the logged metrics (the first epoch's, computed
    before that update) stay finite: the guard skips it and keeps the critic."""
    import functools
    import optax
    from infalign_jax import models, rl
    task = exact_tasks.make_task(0, vocab=4, length=3, d_model=32)
    cfg = rl.RLConfig(algorithm="ppo", advantage="gae", ppo_epochs=2, beta=0.2,
                      samples_per_prompt=4, max_new_tokens=3, learning_rate=1e-2, full_kl=False,
                      value_model=dict(vocab_size=4, d_model=16, n_layers=1, n_heads=2,
                                       n_kv_heads=2, head_dim=8, d_ff=32, max_len=32))
    opt = rl.make_optimizer(cfg)
    step = rl.make_rl_step(cfg, models.decoder_fns(task.model_cfg),
                           functools.partial(exact_tasks.table_reward_fn, vocab=task.vocab), opt)
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_XxY),
                       jnp.asarray(exact_tasks.sample_reference_table(task, 64, seed=1)),
                       jnp.full((2,), 64, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(task.prompts_XxP),
             "prompt_mask_BxP": jnp.ones(task.prompts_XxP.shape, bool),
             "prompt_idx_B": jnp.arange(2)}
    state = rl.init_state(task.ref_params, opt, cfg, jax.random.key(11))
    poison = lambda s: s._replace(nu=jax.tree.map(lambda x: -jnp.ones_like(x), s.nu))
    state = state._replace(value_opt_state=jax.tree.map(
        lambda s: poison(s) if isinstance(s, optax.ScaleByAdamState) else s,
        state.value_opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)))
    # Unguarded, the step is exactly the failure the guard must catch.
    raw, raw_metrics = jax.jit(step)(state, frozen, batch, jax.random.key(0))
    assert all(np.isfinite(float(v)) for v in raw_metrics.values())
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(raw.params))
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(raw.value_params))
    kept, metrics = jax.jit(train.guard_nonfinite(step))(state, frozen, batch, jax.random.key(0))
    assert int(metrics["skipped"]) == 1 and int(kept.step) == 1
    for a, b in zip(jax.tree.leaves(kept.value_params), jax.tree.leaves(state.value_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(kept.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_evaluation_targets_the_beta_the_linear_schedule_ends_at(tmp_path):
    """beta_schedule="linear" from rl.beta = 1.5 to beta_final = 0.3 in 2 steps: after 3 steps the
    evaluation's target is pi* of 0.3, checked against the closed form
    pi* ∝ pi_ref exp(Phi(C) / beta) enumerated here."""
    cfg = _config(**{"train.num_steps": 3, "rl.beta_schedule": "linear", "rl.beta_final": 0.3,
                     "rl.beta_steps": 2, "rl.beta_anneal_steps": 0})
    state, summary = train.run(cfg, str(tmp_path), log=_quiet, devices=ONE)
    task = exact_tasks.make_task(0)
    ref_logp = exact_tasks.policy_logprobs(task, task.ref_params)
    sorted_XxK = np.load(tmp_path / "reference_table.npz")["sorted_rewards_BxK"]
    ref_XxK = np.asarray(sorted_XxK, np.float64)
    # C(x, y) = (#{ref < r} + 1/2 #{ref = r}) / K  (no ties here; the exp transform is unsmoothed)
    cal = ((ref_XxK[:, None, :] < task.rewards_XxY[:, :, None]).sum(-1)
           + 0.5 * (ref_XxK[:, None, :] == task.rewards_XxY[:, :, None]).sum(-1)) / ref_XxK.shape[1]
    t = float(cfg.transform.t)

    def target(beta):
        logits = ref_logp + np.expm1(t * cal) / t / beta   # exp transform: (e^{tC} - 1) / t
        return logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def kl(logp, logq):
        return float((np.exp(logp) * (logp - logq)).sum(1).mean())

    end = target(0.3)
    assert json.load(open(tmp_path / "manifest.json"))["extra"]["end_beta"] == pytest.approx(0.3)
    assert summary["eval"]["target_kl"] == pytest.approx(kl(end, ref_logp), rel=1e-4)
    assert kl(target(1.5), ref_logp) < 0.5 * kl(end, ref_logp)   # the start's pi* is far away
    logp = exact_tasks.policy_logprobs(task, jax.device_get(state.params))
    assert summary["eval"]["exact_kl_to_target"] == pytest.approx(kl(logp, end), rel=1e-4)


@pytest.mark.parametrize("schedule", [
    {"rl.beta_schedule": "linear", "rl.beta_final": 0.3, "rl.beta_steps": 2,
     "rl.beta_anneal_steps": 0},
    {"rl.beta_schedule": "adaptive", "rl.kl_target": 1.0, "rl.beta_anneal_steps": 0}])
def test_kl_budget_with_a_moving_beta_is_refused_before_the_table(tmp_path, schedule):
    with pytest.raises(ValueError, match=r"config.task.kl_budget=0.5 solves one constant beta, "
                                         r"but config.rl.beta_schedule="):
        train.run(_config(**{"task.kl_budget": 0.5}, **schedule), str(tmp_path), log=_quiet,
                  devices=ONE)
    assert not os.path.exists(tmp_path / "reference_table.npz")


def test_an_adaptive_horizon_that_could_make_beta_negative_is_refused_before_the_table(tmp_path):
    """batch 2 x 8 samples = 16 rollouts an update: a horizon of 3 puts the controller's factor
    at 1 - 0.2 * 16 / 3 < 0; refused at start, before the reference table is built."""
    cfg = _config(**{"rl.beta_schedule": "adaptive", "rl.kl_target": 0.5, "rl.kl_horizon": 3.0,
                     "rl.beta_anneal_steps": 0})
    n = cfg.train.batch_size * cfg.rl.samples_per_prompt
    with pytest.raises(ValueError, match=rf"rl.kl_horizon=3 with {n} rollouts per update"):
        train.run(cfg, str(tmp_path), log=_quiet, devices=ONE)
    assert not os.path.exists(tmp_path / "reference_table.npz")


def test_steps_that_leave_an_accumulation_window_open_are_refused(tmp_path):
    """grad_accum_steps = 2 with 3 steps: step 3's gradient waited in the accumulator and was
    never applied (the parameters bit-equal to a 2-step run's) while the evaluation's target
    took step 3's beta; refused at start, CTRL and BoNBoN alike."""
    cfg = _config(**{"rl.grad_accum_steps": 2, "train.num_steps": 3})
    with pytest.raises(ValueError, match=r"config.train.num_steps=3 is not a multiple of "
                                         r"config.rl.grad_accum_steps=2: the last 1 steps'"):
        train.run(cfg, str(tmp_path / "a"), log=_quiet, devices=ONE)
    cfg = _config(**{"bonbon.grad_accum_steps": 4, "train.num_steps": 6})
    cfg.unlock()
    cfg.method = "bonbon"
    cfg.lock()
    with pytest.raises(ValueError, match=r"config.bonbon.grad_accum_steps=4"):
        train.run(cfg, str(tmp_path / "b"), log=_quiet, devices=ONE)
    assert not os.path.exists(tmp_path / "a" / "reference_table.npz")


def test_bonbon_offline_data_is_refused_at_start(tmp_path):
    cfg = _config(**{"bonbon.data": "offline"})
    cfg.unlock()
    cfg.method = "bonbon"
    cfg.lock()
    with pytest.raises(ValueError, match=r"config.bonbon.data='offline'"):
        train.run(cfg, str(tmp_path), log=_quiet, devices=ONE)
    assert not os.path.exists(tmp_path / "reference_table.npz")


# Every rl option BoNBoN leaves unread, at a valid value other than ctrl_exact's.
BONBON_UNREAD = {
    "algorithm": "ppo", "samples_per_prompt": 3, "ppo_epochs": 1, "ppo_clip": 0.05,
    "kl_mode": "loss", "max_grad_norm": 1e-4, "full_kl": False, "beta_schedule": "linear",
    "beta_final": 0.5, "beta_steps": 3, "kl_target": 0.3, "kl_horizon": 50.0,
    "beta_anneal_steps": 1, "beta_anneal_factor": 3.0, "advantage": "gae", "gamma": 0.9,
    "gae_lambda": 0.5, "whiten_advantages": False, "value_learning_rate": 1e-2,
    "value_clip": 0.0, "grad_accum_steps": 2, "beta": 0.01,
    "value_model": dict(vocab_size=4, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                        head_dim=8, d_ff=32, max_len=32)}


def _bonbon(rl_changes=None):
    c = _config(**{"train.num_steps": 2, "train.checkpoint_every": 2})
    c.unlock()
    c.method = "bonbon"
    for name, value in (rl_changes or {}).items():
        c.rl[name] = value
    c.lock()
    return c


def test_a_bonbon_run_is_evaluated_against_bon_n_of_pi_ref(tmp_path):
    """BoNBoN distills BoN_n(pi_ref): its evaluation's target_* numbers, exact_kl_to_target and
    the converged verdict are of BoN_n, enumerated here in reward order (distinct rewards),
    P[y] = F(<= y)^n - F(< y)^n; they were of pi* of the transform and rl.beta, which a BoNBoN
    run does not optimise."""
    cfg = _bonbon()
    n = cfg.bonbon.n
    lines = []
    state, summary = train.run(cfg, str(tmp_path), log=lines.append, devices=ONE)
    task = exact_tasks.make_task(0)
    ref_logp = exact_tasks.policy_logprobs(task, task.ref_params)
    ref, r = np.exp(ref_logp), np.asarray(task.rewards_XxY, np.float64)
    assert all(np.unique(row).size == row.size for row in r)
    bon = np.zeros_like(ref)
    for x in range(r.shape[0]):
        order = np.argsort(r[x])
        le = np.cumsum(ref[x, order])
        bon[x, order] = le ** n - np.concatenate([[0.0], le[:-1]]) ** n
    logp = exact_tasks.policy_logprobs(task, jax.device_get(state.params))
    kl = lambda p_log, q: float((np.exp(p_log) * (p_log - np.log(q))).sum(1).mean())
    ev = summary["eval"]
    assert ev["target_kl"] == pytest.approx(kl(np.log(bon), ref), rel=1e-6)
    assert ev["target_kl"] < np.log(n) - (n - 1) / n      # KL(BoN_n || pi_ref), discrete
    assert ev["exact_kl_to_target"] == pytest.approx(kl(logp, bon), rel=1e-5)
    assert "range_phi_over_beta" not in ev
    assert summary["target"] == f"BoN_{n}" and summary["kl_to_target"] == ev["exact_kl_to_target"]
    assert any(f"KL(pi || BoN_{n})" in line for line in lines)


def test_bonbon_reads_none_of_the_rl_options_whose_overrides_it_refuses(tmp_path):
    """Under method="bonbon" overrides of the rl options `bon_distillation.unused_rl_options`
    names are refused. Set in the config itself, all of them changed at once leave the run
    bit-identical, while a read option (rl.learning_rate) changes it."""
    from infalign_jax.infra.config_utils import as_dict
    from infalign_jax.rl.bon_distillation import unused_rl_options
    assert set(unused_rl_options(as_dict(_bonbon()))) == {f"rl.{k}" for k in BONBON_UNREAD}

    def trained(name, changes=None):
        state, summary = train.run(_bonbon(changes), str(tmp_path / name), log=_quiet,
                                   devices=ONE)
        metrics = {k: v for k, v in summary["last_train_metrics"].items()
                   if k not in TIMING_KEYS}
        return _leaves(state), metrics, summary["eval"]

    base, changed, lr = trained("base"), trained("changed", BONBON_UNREAD), trained(
        "lr", {"learning_rate": 2 * _bonbon().rl.learning_rate})
    for a, b in zip(base[0], changed[0]):
        np.testing.assert_array_equal(a, b)
    assert base[1:] == changed[1:]
    assert any(not np.array_equal(a, b) for a, b in zip(base[0], lr[0]))


def test_negative_seed_is_refused_at_start_naming_config_seed(tmp_path):
    with pytest.raises(ValueError, match=r"config.seed must be an integer >= 0, got -1"):
        train.run(_seeded(-1), str(tmp_path), log=_quiet, devices=ONE)
    assert not os.path.exists(tmp_path / "reference_table.npz")


def test_reference_table_records_k_and_seed_and_refuses_others(tmp_path):
    task = exact_tasks.rl_task(_config().task)
    path = str(tmp_path / "reference_table.npz")
    # A table saved without its settings (an older writer, or one killed before its settings
    # file) is refused, not assumed to be of whatever K and seed the config asks for.
    task.reference_table(64, 0).save(path)
    with pytest.raises(ReferenceTableError, match=r"does not record the config.reference.k"):
        train.prepare_reference_table(task, path, 64, 5)
    os.remove(path)
    built = train.prepare_reference_table(task, path, 64, 0)
    assert sorted(os.listdir(tmp_path)) == ["reference_table.npz"]   # recorded inside the npz
    with pytest.raises(ReferenceTableError, match=r"\(config.reference.seed: table 0, config 5\)"):
        train.prepare_reference_table(task, path, 64, 5)
    with pytest.raises(ReferenceTableError, match=r"\(config.reference.k: table 64, config 32; "
                                                  r"config.reference.seed: table 0, config 7\)"):
        train.prepare_reference_table(task, path, 32, 7)
    again = train.prepare_reference_table(task, path, 64, 0)
    np.testing.assert_array_equal(again.sorted_rewards_BxK, built.sorted_rewards_BxK)
    np.testing.assert_array_equal(built.sorted_rewards_BxK,
                                  task.reference_table(64, 0).sorted_rewards_BxK)
    # A prompt's text edited under the same id: its row was drawn for the old text.
    prompts = task.prompts_XxP.copy()
    row = int(np.flatnonzero(task.prompt_mask_XxP[1])[0])
    prompts[1, row] = (prompts[1, row] + 1) % task.model_cfg.vocab_size
    edited = dataclasses.replace(task, prompts_XxP=prompts)
    with pytest.raises(ReferenceTableError, match=rf"other texts of 1 prompt\(s\) under the same "
                                                  rf"ids \(e.g. \['{task.prompt_ids[1]}'\]\)"):
        train.prepare_reference_table(edited, path, 64, 0)
    # A table recorded before the digests: used, with a warning that it cannot be checked.
    older = dataclasses.replace(built, created={**built.created,
                                                "reference": {"k": 64, "seed": 0}})
    older.save(path)
    lines = []
    train.prepare_reference_table(edited, path, 64, 0, log=lines.append)
    assert any("predates prompt digests" in line for line in lines)


def test_calibrate_refuses_an_existing_table_of_other_settings(tmp_path, monkeypatch):
    """workflows.calibrate on the exact task (its real-task loader swapped out): a second pass
    with other K / seed is refused naming them, and train refuses the table under another seed."""
    from infalign_jax.rl.tasks import real
    from infalign_jax.workflows import calibrate
    monkeypatch.setattr(real, "rl_task", exact_tasks.rl_task)
    c = _config()
    path = calibrate.run(c, str(tmp_path), progress=_quiet)
    # its manifest, in workdir/calibration: the table's seed, the table hashed, its metadata
    assert path == str(tmp_path / "reference_table.npz")
    import hashlib
    import json
    from infalign_jax.core.calibration import load_reference_table
    manifest = json.loads((tmp_path / "calibration" / "manifest.json").read_text())
    assert not (tmp_path / "manifest.json").exists()
    assert manifest["seeds"] == {"reference": 1} and manifest["config"]["reference"]["k"] == 64
    assert manifest["inputs"] == {"reference_table": {
        "path": path, "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}}
    table = load_reference_table(path)
    assert manifest["extra"]["table"]["base_model_id"] == table.base_model_id
    assert manifest["extra"]["table"]["reward_model_id"] == table.reward_model_id
    assert manifest["started"] <= manifest["finished"]
    with pytest.raises(ReferenceTableError, match=r"config.reference.k: table 64, config 128; "
                                                  r"config.reference.seed: table 1, config 7"):
        calibrate.run(_config(**{"reference.k": 128, "reference.seed": 7}), str(tmp_path),
                      progress=_quiet)
    assert c.reference.k == 64 and c.reference.seed == 1
    task = exact_tasks.rl_task(c.task)
    with pytest.raises(ReferenceTableError, match=r"config.reference.seed: table 1, config 5"):
        train.prepare_reference_table(task, path, 64, 5)
    assert calibrate.run(c, str(tmp_path), progress=_quiet) == path   # same settings: kept


def test_exact_table_of_another_d_model_is_refused(tmp_path):
    """pi_ref depends on task.d_model, so the table's model ids must too."""
    path = str(tmp_path / "reference_table.npz")
    train.prepare_reference_table(exact_tasks.rl_task(_config(**{"task.d_model": 32}).task),
                                  path, 64, 0)
    other = exact_tasks.rl_task(_config(**{"task.d_model": 16}).task)
    with pytest.raises(ReferenceTableError, match=r"d_model=32.*d_model=16"):
        train.prepare_reference_table(other, path, 64, 0)
    # floats in full: init_std 0.2 and 0.2000004 (another pi_ref) shared the tag "0.2"
    near = [exact_tasks.table_tag(exact_tasks.exact_task_config(
        _config(**{"task.init_std": v}).task)) for v in (0.2, 0.2000004)]
    assert near[0] != near[1] and "init_std=0.2," in near[0] + ","
    # a value :g writes without loss keeps the tag it had (a table built before is still found)
    whole = exact_tasks.table_tag(exact_tasks.exact_task_config(
        _config(**{"task.init_std": 1.0}).task))
    assert "init_std=1," in whole + ","


def test_guard_skips_an_infinite_optimiser_moment_beside_finite_params():
    """Adam's nu at +inf leaves mu / sqrt(nu) = 0, so the parameters stay finite while the
    moment is poisoned for good: the guard checks it too (in the reduction it shares with the
    parameters of its shape)."""
    from infalign_jax import rl

    def step(state, scale):
        nu = state.opt_state["nu"].at[1].multiply(scale)
        return state._replace(params={"w": state.params["w"] + 1.0}, opt_state={"nu": nu},
                              beta=state.beta * 0.5, step=state.step + 1), {"loss": jnp.float32(1)}

    state = rl.RLState({"w": jnp.arange(3.0)}, {"nu": jnp.ones(3)}, jnp.zeros((), jnp.int32),
                       jnp.float32(0.2))
    guarded = jax.jit(train.guard_nonfinite(step))
    good, m_good = guarded(state, 2.0)
    assert int(m_good["skipped"]) == 0 and float(good.beta) == pytest.approx(0.1)
    bad, m_bad = guarded(state, jnp.inf)
    assert int(m_bad["skipped"]) == 1
    np.testing.assert_array_equal(bad.opt_state["nu"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(bad.params["w"], [0.0, 1.0, 2.0])


def test_a_calibration_pass_table_is_checked_against_the_seed_and_k_it_records(tmp_path):
    """`rl.calibration_pass` tables (the real tasks') record their own seed and K in `created`:
    a work dir holding one is reused under those settings and refused under others."""
    import dataclasses
    task = exact_tasks.rl_task(_config().task)
    path = str(tmp_path / "reference_table.npz")
    table = task.reference_table(64, 3)
    dataclasses.replace(table, created={**table.created, "seed": 3}).save(path)
    assert table.created["num_samples_per_prompt"] == 64
    reused = train.prepare_reference_table(task, path, 64, 3)
    np.testing.assert_array_equal(reused.sorted_rewards_BxK, table.sorted_rewards_BxK)
    with pytest.raises(ReferenceTableError, match=r"config.reference.seed: table 3, config 4"):
        train.prepare_reference_table(task, path, 64, 4)


def test_prompts_that_fit_no_batch_are_counted_and_said(tmp_path):
    lines = []
    _, summary = train.run(_config(**{"task.num_prompts": 3, "train.num_steps": 1}),
                           str(tmp_path), log=lines.append, devices=ONE)
    assert summary["train_data"]["prompts"] == 3
    assert summary["train_data"]["dropped_per_epoch"] == 1    # batches of 2
    assert any("1 of 3 prompts fit no batch each epoch" in line for line in lines)


def test_a_global_batch_the_mesh_cannot_split_is_refused_at_start_on_several_processes(
        tmp_path, monkeypatch):
    """config.train.batch_size is the global batch: 4 prompts over data=8 is refused on two
    processes as on one (the check took it per process, 4 x 2 = 8, and passed it; the first
    step then failed after the reference table was built)."""
    cfg = _config(**{"task.num_prompts": 8, "train.batch_size": 4, "mesh.data": 8})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"config.train.batch_size=4 is not divisible by the 8 "
                                         r"batch shards"):
        train.run(cfg, str(tmp_path), log=_quiet)
    assert not os.path.exists(tmp_path / "reference_table.npz")


def test_a_reference_table_drawn_elsewhere_is_copied_in_checked_and_reused(uninterrupted,
                                                                          tmp_path):
    """`train.run(reference_table=)` (`train_policy.py --reference_table`, a printed sweep's
    commands): the table is copied into the work dir and reused (the run's numbers are the run
    that drew it), a dir that holds a table keeps its own, a table of other reference settings
    is refused and its copy removed (a rerun with the right one is not blocked by it), and a
    missing file is refused before anything runs."""
    from infalign_jax.core.calibration import ReferenceTableError
    workdir, state, _ = uninterrupted
    drawn = os.path.join(workdir, train.REFERENCE_TABLE)
    lines = []
    got, _ = train.run(_config(), str(tmp_path / "b"), log=lines.append, devices=ONE,
                       reference_table=drawn)
    assert any("copied into the work dir" in line for line in lines)
    assert any("reusing reference table" in line for line in lines)
    with open(drawn, "rb") as a, open(tmp_path / "b" / train.REFERENCE_TABLE, "rb") as b:
        assert a.read() == b.read()
    for x, y in zip(_leaves(state), _leaves(got)):
        np.testing.assert_array_equal(x, y)
    lines.clear()
    train.run(_config(), str(tmp_path / "b"), log=lines.append, devices=ONE,
              reference_table=drawn)
    assert any("holds a reference table already" in line for line in lines)
    # other reference settings: refused by the check, the copy removed
    with pytest.raises(ReferenceTableError, match="config.reference.k: table 64, config 32"):
        train.run(_config(**{"reference.k": 32}), str(tmp_path / "c"), log=_quiet,
                  devices=ONE, reference_table=drawn)
    assert not (tmp_path / "c" / train.REFERENCE_TABLE).exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        train.run(_config(), str(tmp_path / "d"), log=_quiet, devices=ONE,
                  reference_table=str(tmp_path / "none.npz"))
    assert not (tmp_path / "d").exists()


def test_a_refused_table_the_work_dir_held_is_kept_not_removed_drawn_elsewhere(uninterrupted,
                                                                               tmp_path):
    """`train.run(reference_table=)` removes a refused table only when it copied it: a table
    the work dir held already (its own draw, K base samples a prompt) is refused for other
    reference settings and left where it was, not deleted with the given one's copy."""
    from infalign_jax.core.calibration import ReferenceTableError
    workdir, _, _ = uninterrupted
    drawn = os.path.join(workdir, train.REFERENCE_TABLE)
    own = tmp_path / "e" / train.REFERENCE_TABLE
    own.parent.mkdir()
    shutil.copyfile(drawn, own)
    with pytest.raises(ReferenceTableError, match="config.reference.k: table 64, config 32"):
        train.run(_config(**{"reference.k": 32}), str(tmp_path / "e"), log=_quiet,
                  devices=ONE, reference_table=drawn)
    assert own.exists()
