"""Export of a trained CTRL policy as a transformers checkpoint (issue 18): a tiny transformers
policy trained 2 CTRL steps (full parameters, or LoRA adapters merged on export), written by
`config.export.hf` / `experiments/export.py`, loaded back with `AutoModelForCausalLM.from_pretrained`
and compared, in PyTorch, with our Flax forward of the run's final parameters and with the base."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers

from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.loops import train
from infalign_jax.models import hf_import, lora
from hf_tiny import hf_logits, left_padded_batch, our_logits
from workflow_files import real_task_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(dirs, lora_rank: int = 0, export_hf: bool = False):
    return real_task_config(dirs, lora_rank=lora_rank, export_hf=export_hf)


def _check_export(out: str, base_dir: str, cfg, params) -> None:
    """from_pretrained(out) gives our logits of `params` (< 1e-5), not the base's; the
    tokenizer round-trips."""
    tokens, mask, positions = left_padded_batch(cfg.vocab_size, low=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    got = hf_logits(model, tokens, mask, positions)
    ours = our_logits(cfg, params, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ours[real], atol=1e-5)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    moved = np.abs(hf_logits(base, tokens, mask, positions)[real] - got[real]).max()
    assert moved > 1e-3, moved          # training moved them
    tok = transformers.AutoTokenizer.from_pretrained(out)
    base_tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    assert tok.get_vocab() == base_tok.get_vocab()
    assert (tok.eos_token_id, tok.pad_token_id) == (1, 0)
    assert tok("w3 w5 w7")["input_ids"] == [3, 5, 7]
    assert tok.decode([5, 7, 1], skip_special_tokens=True).strip() == "w5 w7"


@pytest.mark.slow
def test_export_at_the_end_of_training(dirs, tmp_path):
    c = _config(dirs, export_hf=True)
    state, summary = train.run(c, str(tmp_path), log=lambda _: None, devices=jax.devices()[:1])
    out = str(tmp_path / "export" / "hf")
    assert summary["export"] == {"dir": out, "checkpoint": f"{tmp_path}@2"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == "llama"
    cfg, _ = hf_import.load_hf_checkpoint(dirs["policy"])
    _check_export(out, dirs["policy"], cfg, jax.device_get(state.params))


@pytest.mark.slow
def test_lora_run_resumes_and_exports_merged_weights_from_the_command_line(dirs, tmp_path):
    c = _config(dirs, lora_rank=4)
    run = tmp_path / "run"
    state, summary = train.run(c, str(run), log=lambda _: None, devices=jax.devices()[:1])
    assert summary["skipped_steps"] == 0 and "export" not in summary
    cfg, base = hf_import.load_hf_checkpoint(dirs["policy"])
    adapters = jax.device_get(state.params)
    assert set(adapters) == {"q", "k", "v", "o", "gate", "up", "down"}
    with open(run / "manifest.json") as f:
        record = json.load(f)["extra"]["lora"]
    assert record["adapter_params"] == lora.num_adapter_params(adapters)
    assert re.match(r"policy#[0-9a-f]{16}\|", record["base"])
    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "export.py"),
                           f"--run={run}", f"--out={out}", "--step=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    merged = lora.merge(base, adapters, lora.LoraConfig(rank=4, alpha=8.0))
    _check_export(str(out), dirs["policy"], cfg, merged)

    # Killed after step 1 and resumed (with the export asked for only then): the same adapters
    # bit for bit, and the export at the end is the same checkpoint's.
    legs = tmp_path / "legs"
    c1 = _config(dirs, lora_rank=4)
    c1.unlock()
    c1.train.num_steps = 1
    c1.lock()
    train.run(c1, str(legs), log=lambda _: None, devices=jax.devices()[:1])
    state2, summary2 = train.run(_config(dirs, lora_rank=4, export_hf=True), str(legs),
                                 log=lambda _: None, devices=jax.devices()[:1])
    assert summary2["resumed_from"] == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state2.params)), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(a, b)
    _check_export(str(legs / "export" / "hf"), dirs["policy"], cfg, merged)


def test_export_refuses_runs_without_a_transformers_policy(tmp_path):
    # an exact-task run (a byte-level model of its own, no tokenizer): refused by name
    run = tmp_path / "exact"
    (run / "checkpoints").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"config": {"task": {"name": "exact"}}}))
    with pytest.raises(ValueError, match=r"export: the run .* is a 'exact' run; its policy is not "
                                         r"a transformers model"):
        train.export_hf(str(run), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"export: .* is not a run directory"):
        train.export_hf(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # asked for at the start of training on such a task: refused before any work
    c = load_config_module(os.path.join(ROOT, "configs", "ctrl_exact.py")).get_config()
    c.unlock()
    c.export = {"hf": True}
    c.lock()
    with pytest.raises(ValueError, match=r"config.export.hf=True: task .* has no transformers"):
        train.run(c, str(tmp_path / "w"), log=lambda _: None)
    assert not (tmp_path / "w").exists()
