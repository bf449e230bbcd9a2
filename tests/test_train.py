"""The CTRL run loop: exact resume, 1 vs 8 devices, non-finite steps, outputs, start-up errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.rl import tasks as rl_tasks
from infalign_jax.rl.tasks import exact as exact_tasks
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
    ("train.num_steps", 0, r"num_steps must be a positive integer"),
    ("rl.samples_per_prompt", 1, r"samples_per_prompt must be >= 2 for RLOO"),
    ("rl.kl_mode", "both", r"kl_mode"),
    ("mesh.data", 3, r"multiply to 3 but there are 1 devices"),
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


def test_rerunning_a_finished_run_adds_no_rows_and_keeps_its_start_time(uninterrupted, tmp_path):
    workdir, _, summary = uninterrupted
    import shutil
    shutil.copytree(workdir, tmp_path / "run")
    before = json.loads((tmp_path / "run" / "manifest.json").read_text())
    evals = read_jsonl(str(tmp_path / "run" / "eval.jsonl"))
    _, again = train.run(_config(), str(tmp_path / "run"), log=_quiet, devices=ONE)
    assert again["resumed_from"] == 6 and again["eval"] == summary["eval"]
    assert read_jsonl(str(tmp_path / "run" / "eval.jsonl")) == evals
    after = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert after["started"] == before["started"]


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
