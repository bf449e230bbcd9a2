"""Issue 18's whole workflow in one test, on tiny models and files made here: a transformers
policy dir + a sequence-classification reward-model dir + a prompt JSONL -> calibrate -> CTRL
(2 steps, reusing the table) -> evaluate the run against its base -> export -> from_pretrained
logits equal the run's."""

from __future__ import annotations

import json
import re
import os

import pytest

import jax
import numpy as np

from infalign_jax.core.calibration import load_reference_table
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.loops import train
from infalign_jax.rl.tasks import sources
from infalign_jax.workflows import calibrate, evaluate
from hf_tiny import hf_logits, left_padded_batch, our_logits
from workflow_files import real_task_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_calibrate_train_evaluate_export(dirs, tmp_path):
    import transformers
    c = real_task_config(dirs, export_hf=True)
    run_dir = str(tmp_path / "run")

    # 1. calibrate: the table the run then reuses (same reward and base ids)
    table_path = calibrate.run(c, run_dir, progress=lambda _: None)
    table = load_reference_table(table_path)
    assert re.fullmatch(r"hf:rm1#[0-9a-f]{16}\|max_len=512\|last_not_pad=0", table.reward_model_id)
    mtime = os.path.getmtime(table_path)

    # 2. CTRL, 2 steps, exported at the end
    state, summary = train.run(c, run_dir, log=lambda _: None, devices=jax.devices()[:1])
    assert os.path.getmtime(table_path) == mtime            # reused, not rebuilt
    assert summary["export"]["dir"] == os.path.join(run_dir, "export", "hf")

    # 3. evaluate the run against its base on the file's held-out prompts: 3 of them, where the
    # run held out 2 (split_seed 0 both), so the plain split would take one training prompt
    e = load_config_module(os.path.join(ROOT, "configs", "evaluate.py")).get_config(
        "prompts=3,samples=4,max_new_tokens=5")
    e.unlock()
    e.policy.checkpoint, e.reference.checkpoint = run_dir, dirs["policy"]
    e.reward.kind, e.reward.checkpoint = "hf", dirs["rm"]
    e.data.prompts = dirs["prompts"]
    e.eval.procedures = ("bon",)
    e.lock()
    out = evaluate.run(e, str(tmp_path / "eval"), progress=lambda _: None)
    assert out
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert results
    rows = [json.loads(x) for x in open(tmp_path / "eval" / "samples.jsonl")]
    assert {r["prompt_id"] for r in rows} and all("response" in r for r in rows)
    policy_rows = [r for r in rows if r["method"] == "policy"]
    assert len(policy_rows) == 3 * 4
    trained_on = sources.split_prompts(dirs["prompts"], c.task.num_prompts, c.task.eval_prompts,
                                       seed=0).train_texts
    assert len(trained_on) == 4 and not {r["prompt"] for r in policy_rows} & set(trained_on)
    assert len(set(sources.split_prompts(dirs["prompts"], 0, 3, seed=0).eval_texts)
               & set(trained_on)) == 1
    assert results["prompts"]["held_out"] == {"policy_training_prompts": 4, "left_out": 1,
                                              "merged": 1}
    record = json.load(open(tmp_path / "eval" / "policy.json"))
    assert record["kl"]["full_vocab"]["mean"] > 1e-4    # the trained policy is not its base

    # 4. the export is the run's policy, in transformers
    trained = sources.load_policy(sources.PolicyConfig(run_dir))
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    tokens, mask, positions = left_padded_batch(trained.model_cfg.vocab_size, low=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(run_dir, "export", "hf")).eval()
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(model, tokens, mask, positions)[real],
                               our_logits(trained.model_cfg, trained.params, tokens, mask)[real],
                               atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    ({"task.temperature": 0.7}, r"config.task.temperature=0.7: the reference table would "
                                r"calibrate pi_ref's samples at that temperature, but the "
                                r"rollouts sample at temperature 1"),
    # e.g. --config.task.max_new_tokens=8 alone: configs/ctrl_real.py set rl's from the default
    ({"task.max_new_tokens": 8}, r"config.rl.max_new_tokens=5 but task 'helpfulness' scores "
                                 r"responses of exactly length 8"),
    # The table would keep only pi_ref's samples that emitted EOS while every rollout is
    # scored: with 90% truncated at the budget, mean C of pi_ref's samples was 0.86, not 1/2.
    ({"task.require_eos": True}, r"config.task.require_eos=True: the reference table would "
                                 r"keep only pi_ref's samples that emitted EOS"),
])
def test_training_refuses_a_table_drawn_unlike_the_rollouts(dirs, tmp_path, extra, message):
    c = real_task_config(dirs, extra=extra)
    with pytest.raises(ValueError, match=message):
        train.run(c, str(tmp_path / "run"), log=lambda _: None, devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "reference_table.npz").exists()


def test_a_table_drawn_in_other_batches_or_chunks_is_refused(dirs, tmp_path):
    """The calibration pass draws each chunk of a prompt batch with its own key, so one K and
    seed drawn in chunks of 1 or of 2 are two tables. A finished table was reused under another
    `calib_chunk` / `calib_batch_prompts` (a partial pass refused the change): the run's config
    then named a split that did not draw its table. A split that draws the same (a batch past
    the prompts) is kept."""
    from infalign_jax.core.calibration import ReferenceTableError
    run_dir = str(tmp_path / "run")
    quiet = lambda _: None   # noqa: E731
    path = calibrate.run(real_task_config(dirs, extra={"task.calib_chunk": 1}), run_dir,
                         progress=quiet)
    mtime = os.path.getmtime(path)
    for extra, message in (
            ({"task.calib_chunk": 2}, r"config.task.calib_chunk: table 1, config 2"),
            ({"task.calib_chunk": 1, "task.calib_batch_prompts": 1},
             r"config.task.calib_batch_prompts: table 4, config 1")):
        with pytest.raises(ReferenceTableError, match=message):
            calibrate.run(real_task_config(dirs, extra=extra), run_dir, progress=quiet)
    same = real_task_config(dirs, extra={"task.calib_chunk": 1, "task.calib_batch_prompts": 16})
    assert calibrate.run(same, run_dir, progress=quiet) == path
    assert os.path.getmtime(path) == mtime
