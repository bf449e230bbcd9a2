"""Real RL tasks: config presets, section validation, and one CTRL step with SmolLM2 (slow)."""

from __future__ import annotations

import json
import os
import re
import time

import jax
import numpy as np
import pytest

from infalign_jax import models
from infalign_jax.rl.tasks import real, sources
from infalign_jax.rl import tasks as rl_tasks
from infalign_jax.loops import train
from infalign_jax.core.calibration import load_reference_table
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.infra.metrics_io import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ctrl_real = load_config_module(os.path.join(ROOT, "configs", "ctrl_real.py"))


def test_tasks_are_registered():
    assert {"helpfulness", "harmlessness", "exact"} <= set(rl_tasks.known_tasks())


@pytest.mark.parametrize("task", ["helpfulness", "harmlessness"])
@pytest.mark.parametrize("size", ["tiny", "small", "full"])
def test_config_samples_the_reference_like_the_rollouts(task, size):
    # experiments/calibrate.py reads this same config's task and reference sections.
    train_cfg = ctrl_real.get_config(f"task={task},size={size}")
    # The reference is drawn with the rollout budget and temperature of the RL step.
    assert train_cfg.rl.max_new_tokens == train_cfg.task.max_new_tokens
    assert train_cfg.task.temperature == 1.0
    assert train_cfg.train.batch_size <= train_cfg.task.num_prompts
    section = real.parse_section(train_cfg.task)
    assert section.name == task and section.eval_prompts <= section.num_prompts
    # InfAlign's sign: t > 0 for Best-of-N (helpfulness), t < 0 for Worst-of-N (harmlessness).
    assert (train_cfg.transform.t > 0) == (task == "helpfulness")
    with pytest.raises(ValueError, match="size"):
        ctrl_real.get_config("size=huge")


@pytest.mark.parametrize("change,message", [
    ({"name": "summaries"}, r"config.task.name: unknown real task 'summaries'"),
    ({"num_prompts": 0}, r"config.task.num_prompts must be a positive integer"),
    ({"eval_samples": -1}, r"config.task.eval_samples must be an integer >= 0"),
    ({"eval_prompts": 9, "num_prompts": 4}, r"config.task.eval_prompts=9 exceeds"),
    ({"temperature": 0.0}, r"config.task.temperature must be a finite number > 0"),
    ({"gguf_path": "/nonexistent.gguf"}, r"config.task.gguf_path: no such file"),
    ({"promts": 3}, r"config.task: unknown keys \['promts'\]"),
])
def test_bad_task_section_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        real.parse_section(change)


def test_config_has_the_policy_reward_and_data_subsections():
    from infalign_jax.infra.config_utils import config_fields
    from infalign_jax.rl.tasks import sources
    c = ctrl_real.get_config("task=harmlessness,size=tiny")
    for name, cls in sources.SECTIONS.items():
        assert set(c.task[name]) == {f.name for f in config_fields(cls)}, name
    section = real.parse_section(c.task)   # the defaults: SmolLM2, the task's judge, its prompts
    assert (section.policy.checkpoint, section.reward.kind, section.data.prompts) == \
        ("", "judge", "")


def test_base_model_id_carries_the_sampling_budget():
    a = real.parse_section(dict(max_new_tokens=12))
    b = real.parse_section(dict(max_new_tokens=32))
    policy = sources.Policy(None, {"w": np.arange(3.0)}, None, "/x/SmolLM2-135M-Instruct.Q4_1.gguf")
    ida = real.base_model_id(policy, a)
    assert re.fullmatch(r"SmolLM2-135M-Instruct\.Q4_1\.gguf#[0-9a-f]{16}\|max_new_tokens=12,"
                        r"temperature=1\.0,require_eos=False", ida)
    assert ida != real.base_model_id(policy, b)


def _first_layers(n):
    """load_gguf_checkpoint keeping SmolLM2's first n of 30 decoder layers (real weights, real
    tokenizer and judge; a shorter stack runs the step faster)."""
    from infalign_jax.models import gguf_import
    load = gguf_import.load_gguf_checkpoint

    def truncated(path, *args, **kwargs):
        return models.first_layers(*load(path, *args, **kwargs), n)

    return truncated


@pytest.mark.slow
def test_one_ctrl_step_on_helpfulness_with_smollm2(tmp_path, monkeypatch):
    from infalign_jax.models import gguf_import
    monkeypatch.setattr(gguf_import, "load_gguf_checkpoint", _first_layers(4))
    start = time.perf_counter()
    c = ctrl_real.get_config("task=helpfulness,size=tiny")
    c.unlock()
    # Evaluation off (its own compiles would double the runtime); evaluate() runs in the tiny
    # config's end-to-end command instead (see configs/ctrl_real.py).
    c.task.num_prompts, c.task.eval_prompts, c.task.eval_samples = 2, 1, 0
    c.task.max_new_tokens = c.rl.max_new_tokens = 6
    c.reference.k = 4
    c.rl.samples_per_prompt = 2
    c.rl.full_kl = False  # two fewer 30-layer forwards to compile (host callbacks defeat the cache)
    c.train.num_steps, c.train.batch_size, c.train.tensorboard = 1, 2, False
    c.lock()
    lines = []
    _, summary = train.run(c, str(tmp_path), log=lines.append, devices=jax.devices()[:1])
    seconds = time.perf_counter() - start

    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1] and summary["skipped_steps"] == 0
    for key in ("reward", "calibrated_reward", "transformed_reward", "kl_k1", "kl_k3", "loss",
                "grad_norm"):
        assert np.isfinite(rows[0][key]), key
    assert 0.0 <= rows[0]["calibrated_reward"] <= 1.0 and -1.0 <= rows[0]["reward"] <= 1.0
    # The first step samples pi_ref itself: the sampler's log-probs and pi_ref's teacher-forced
    # ones agree, so the k1 KL estimate is 0 up to float rounding (not sampling noise).
    assert abs(rows[0]["kl_k1"]) < 1e-3 and rows[0]["grad_norm"] > 0

    table = load_reference_table(str(tmp_path / "reference_table.npz"))
    assert table.reward_model_id == "vader"
    assert re.fullmatch(r"SmolLM2-135M-Instruct\.Q4_1\.gguf#[0-9a-f]{16}\|max_new_tokens=6,"
                        r"temperature=1\.0,require_eos=False", table.base_model_id)
    assert list(table.prompt_ids) == ["help-000", "help-001"]
    np.testing.assert_array_equal(table.counts_B, [4, 4])
    assert np.all(np.abs(table.sorted_rewards_BxK) <= 1.0)

    assert summary["eval"] == {}
    with open(tmp_path / "manifest.json") as f:
        assert json.load(f)["config"]["task"]["name"] == "helpfulness"
    print(f"\none CTRL step on helpfulness (2 prompts, K=4) incl. load, calibration, compile: "
          f"{seconds:.1f} s; metrics: {rows[0]}")
