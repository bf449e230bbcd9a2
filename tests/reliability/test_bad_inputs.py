"""Bad inputs across data files, configs, reference tables, checkpoints and tokenizers.

Each case must fail with an error naming the file / field (and line) and what was expected, exit
non-zero where it goes through the CLI, and leave nothing a later run could mistake for complete
output (no summary.json, no committed checkpoint step). Cases marked xfail(strict) state the
expected behaviour of a bug that is reported and not yet fixed.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax import models
from infalign_jax.decoding import sampling
from infalign_jax.loops import train
from infalign_jax.core.calibration import ReferenceTableError, build_reference_table
from infalign_jax.infra.checkpointing import CheckpointRestoreError
from infalign_jax.data import DataError, TokenizeConfig, read_preferences, read_prompts
from infalign_jax.data import tokenize_prompts
from infalign_jax.models import hf_import

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fault_injection import REPO, _env, _load_config  # noqa: E402

ONE = jax.devices()[:1]


def _quiet(_):
    pass


# ---- data files ------------------------------------------------------------------------------

def _write(tmp_path: Path, name: str, lines: list, raw: bytes | None = None) -> Path:
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                                for x in lines))
    return path


GOOD = {"prompt": "hello"}
TLDR = {"info": {"post": "p", "title": "t", "subreddit": "s"},
        "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}

DATA_CASES = [
    # id, reader, file name, lines (or raw bytes), expected message (after "path:line: ")
    ("malformed-json", "prompts", [GOOD, '{"prompt": "x"'], 2, "malformed JSON"),
    ("array-not-object", "prompts", [GOOD, [1, 2]], 2, "expected a JSON object, got list"),
    ("prompt-is-int", "prompts", [{"prompt": 7}], 1, "field 'prompt' is int (expected a string)"),
    ("prompt-is-nan", "prompts", ['{"prompt": NaN}'], 1, "field 'prompt' is float"),
    ("prompt-missing", "prompts", [GOOD, {"text": "x"}], 2, "field 'prompt' missing"),
    ("prompt-blank", "prompts", [{"prompt": "   "}], 1, "prompt is empty"),
    ("id-is-bool", "prompts", [{"prompt": "a", "id": True}], 1, "field 'id' is bool"),
    ("duplicate-id", "prompts", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": "1"}], 2,
     "prompt id '1' already used on line 1"),
    # (a UTF-8 byte-order mark is read past: test_utf8_byte_order_mark_is_not_a_bad_record)
    ("lone-surrogate", "prompts", b'{"prompt": "a"}\n{"prompt": "\\ud83d"}\n', 2,
     "field 'prompt' is not valid Unicode"),
    ("not-utf8", "prompts", b'{"prompt": "\xff\xfe"}\n', 1, "not valid UTF-8"),
    ("tldr-choice-2", "prefs", [dict(TLDR, choice=2)], 1, "field 'choice' is 2 (expected 0 or 1)"),
    ("tldr-3-summaries", "prefs", [dict(TLDR, summaries=[{"text": "a"}] * 3)], 1,
     "has 3 entries (expected exactly 2)"),
    ("identical-pair", "prefs", [{"prompt": "p", "chosen": "a", "rejected": "a"}], 1,
     "chosen and rejected responses are identical"),
    ("hh-no-assistant", "prefs", [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}], 1,
     "has no '\\n\\nAssistant:' turn"),
    ("chosen-is-list", "prefs", [{"prompt": "p", "chosen": ["a"], "rejected": "b"}], 1,
     "field 'chosen' is list (expected a string)"),
]


@pytest.mark.parametrize("reader,lines,line,match", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_names_file_line_and_expectation(tmp_path, reader, lines, line, match):
    raw = lines if isinstance(lines, bytes) else None
    path = _write(tmp_path, "data.jsonl", [] if raw else lines, raw)
    read = read_prompts if reader == "prompts" else read_preferences
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert match in str(err.value)


def test_empty_and_truncated_gzip_files_name_the_file(tmp_path):
    empty = _write(tmp_path, "empty.jsonl", [], b"\n\n")
    with pytest.raises(DataError, match=f"^{empty}: file holds no records"):
        read_prompts(empty)
    whole = gzip.compress(b'{"prompt": "a"}\n' * 200)
    cut = _write(tmp_path, "cut.jsonl.gz", [], whole[: len(whole) // 2])
    with pytest.raises(DataError, match=f"^{cut}:[0-9]+: compressed file ends early"):
        read_prompts(cut)


def test_prompt_longer_than_the_limit_names_line_and_lengths(tmp_path):
    path = _write(tmp_path, "p.jsonl", [{"prompt": "a b"}, {"prompt": "a b c d e f g"}])
    examples, _ = read_prompts(path)
    cfg = TokenizeConfig(max_prompt_len=4, max_response_len=4, prompt_truncation="error",
                         append_eos=False)
    with pytest.raises(DataError, match=rf"^{path}:2: prompt has 7 tokens \(limit max_prompt_len=4\)"):
        tokenize_prompts(examples, lambda s: [1] * len(s.split()), cfg)


# ---- configs through the run loop ------------------------------------------------------------

def _assert_no_complete_output(workdir: Path) -> None:
    assert not (workdir / "summary.json").exists()
    ckpts = workdir / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


CONFIG_CASES = [
    ("rl.samples_per_prompt", 0, r"RLConfig.samples_per_prompt must be a positive integer"),
    ("rl.max_new_tokens", 0, r"RLConfig.max_new_tokens must be a positive integer"),
    ("rl.beta", float("nan"), r"RLConfig.beta must be a finite number > 0"),
    ("rl.learning_rate", -1e-3, r"RLConfig.learning_rate must be a finite number > 0"),
    ("transform.t", float("inf"), r"transform parameter 't' must be finite, got inf"),
    ("transform.t", float("nan"), r"transform parameter 't' must be finite, got nan"),
    ("train.checkpoint_every", 0, r"config.train.checkpoint_every must be a positive integer"),
    ("train.eval_every", -1, r"config.train.eval_every must be an integer >= 0"),
    ("train.keep_checkpoints", 0, r"config.train.keep_checkpoints must be a positive integer"),
    ("seed", -1, r"seed"),
    # A prompt plus max_new_tokens longer than the model's context (exact task: max_len 32).
    ("rl.max_new_tokens", 1000, r"max_new_tokens=1000 but task 'exact' scores responses of exactly length 3"),
]
BUG_CONFIG_CASES = [
    pytest.param("reference.k", 0, r"reference.k"),
    pytest.param("reference.k", -3, r"reference.k"),
    pytest.param("rl.max_new_tokens", 5, r"max_new_tokens.*length|length.*max_new_tokens"),
    pytest.param("rl.max_new_tokens", 2, r"max_new_tokens.*length|length.*max_new_tokens"),
]


@pytest.mark.parametrize("key,value,match", CONFIG_CASES + BUG_CONFIG_CASES)
def test_bad_config_value_names_the_field(tmp_path, key, value, match):
    overrides = {"train.num_steps": 2}
    if key == "seed":
        c = _load_config(**overrides)
        c.unlock()
        c.seed = value
        c.lock()
    else:
        c = _load_config(**overrides, **{key: value})
    with pytest.raises(ValueError, match=match):
        train.run(c, str(tmp_path), log=_quiet, devices=ONE)
    _assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("overrides", [
    {"rl.beta_schedule": "adaptive", "rl.kl_target": 1.0, "rl.beta_anneal_steps": 0},
    {"rl.algorithm": "ppo", "rl.advantage": "gae", "rl.value_model": {
        "vocab_size": 4, "d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2,
        "head_dim": 8, "d_ff": 32, "max_len": 32}},
], ids=["adaptive-beta", "gae-critic"])
def test_options_rlconfig_accepts_also_train(tmp_path, overrides):
    _, summary = train.run(_load_config(**{"train.num_steps": 2, **overrides}), str(tmp_path),
                           log=_quiet, devices=ONE)
    assert summary["final_step"] == 2


CLI_CASES = [
    ("--config.rl.betta=1", "betta"),                 # unknown key in a locked config
    ("--config.rl.beta=abc", "beta"),                 # wrong type
    ("--config.rl.beta=-1", "RLConfig.beta must be a finite number > 0"),
    # an option the run would not read: PPO's clip under RLOO
    ("--config.rl.ppo_clip=0.1", "--config.rl.ppo_clip is not used by this run: it is read only "
                                 "with rl.algorithm='ppo' (this config has 'rloo')"),
    # an RL option BoNBoN does not read (space-separated flags)
    ("--config.method=bonbon --config.rl.max_grad_norm=1",
     "--config.rl.max_grad_norm is not used by this run: it is read only with method='ctrl' "
     "(this config has 'bonbon'; BoNBoN's own is bonbon.max_grad_norm)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("flag,match", CLI_CASES, ids=["unknown-key", "wrong-type", "negative",
                                                         "unused-option", "unused-by-bonbon"])
def test_bad_cli_flag_exits_nonzero_naming_the_key(tmp_path, flag, match):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "train_policy.py"),
                           "--config=configs/ctrl_exact.py", f"--workdir={workdir}", *flag.split()],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert match in proc.stderr, proc.stderr[-2000:]
    _assert_no_complete_output(workdir)


# ---- reference tables ------------------------------------------------------------------------

def _exact_ids() -> tuple[str, str]:
    from infalign_jax.rl import tasks as rl_tasks
    task = rl_tasks.build_task(_load_config().task)
    return task.reward_model_id, task.base_model_id


def _table(ids=("p0", "p1"), reward_id=None, base_id=None, k=4):
    rid, bid = _exact_ids()
    return build_reference_table(list(ids), np.arange(len(ids) * k, dtype=float).reshape(-1, k),
                                 reward_model_id=reward_id or rid, base_model_id=base_id or bid)


def _npz_with(path: Path, **changes) -> None:
    table = _table()
    meta = table.metadata()
    meta.update(changes.pop("meta", {}))
    arrays = dict(prompt_ids=table.prompt_ids, sorted_rewards_BxK=table.sorted_rewards_BxK,
                  counts_B=table.counts_B, metadata=np.asarray(json.dumps(meta)))
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


TABLE_CASES = {
    "other-base-model": (lambda p: _table(base_id="another_base").save(str(p)),
                         r"built for base model 'another_base'"),
    "missing-prompt": (lambda p: _table(ids=("p0",)).save(str(p)),
                       r"1 prompt id\(s\) not in the reference table .*'p1'"),
    "garbage-bytes": (lambda p: p.write_bytes(b"not an npz file"),
                      r"corrupt or unreadable reference table file .*reference_table.npz"),
    "version-99": (lambda p: _npz_with(p, meta={"version": 99}), r"has version 99"),
    "nan-in-table": (lambda p: _npz_with(p, sorted_rewards_BxK=np.array(
        [[0, 1, np.nan, 3], [0, 1, 2, 3]], np.float32)),
        r"inconsistent reference table file .*bad prompts: 'p0'"),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_bad_reference_table_in_workdir_is_refused(tmp_path, case):
    make, match = TABLE_CASES[case]
    make(tmp_path / "reference_table.npz")
    with pytest.raises(ReferenceTableError, match=match):
        train.run(_load_config(**{"train.num_steps": 2}), str(tmp_path), log=_quiet,
                  devices=ONE)
    _assert_no_complete_output(tmp_path)


def test_reference_table_of_another_k_is_not_silently_reused(tmp_path):
    train.run(_load_config(**{"train.num_steps": 1}), str(tmp_path), log=_quiet, devices=ONE)
    with pytest.raises(ValueError, match=r"reference.k"):
        train.run(_load_config(**{"train.num_steps": 2, "reference.k": 128}), str(tmp_path),
                  log=_quiet, devices=ONE)


# ---- checkpoints -----------------------------------------------------------------------------

def test_leftover_tmp_checkpoint_dir_is_ignored_by_the_run(tmp_path):
    train.run(_load_config(**{"train.num_steps": 2}), str(tmp_path), log=_quiet, devices=ONE)
    leftover = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "half_written").write_bytes(b"\0" * 64)
    lines: list[str] = []
    _, summary = train.run(_load_config(**{"train.num_steps": 3}), str(tmp_path),
                           log=lines.append, devices=ONE)
    assert summary["resumed_from"] == 2
    assert any("resumed from checkpoint step 2" in line for line in lines)
    assert not leftover.exists() and (tmp_path / "checkpoints" / "3").is_dir()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    train.run(_load_config(**{"train.num_steps": 2}), str(tmp_path), log=_quiet, devices=ONE)
    (tmp_path / "summary.json").unlink()
    for step in ("1", "2"):
        (tmp_path / "checkpoints" / step / "meta" / "metadata").write_text('{"step": ')
    with pytest.raises(CheckpointRestoreError, match=r"step 2: .*step 1: "):
        train.run(_load_config(**{"train.num_steps": 3}), str(tmp_path), log=_quiet,
                  devices=ONE)
    assert not (tmp_path / "summary.json").exists()


def test_checkpoint_of_another_model_is_refused_and_manifest_kept(tmp_path):
    train.run(_load_config(**{"train.num_steps": 2}), str(tmp_path), log=_quiet, devices=ONE)
    before = (tmp_path / "manifest.json").read_text()
    # Its reference table names the model it was built for, so it is refused before the
    # checkpoint is read (which would refuse the parameters' shapes).
    with pytest.raises(ReferenceTableError, match=r"built for reward model .*d_model=32.*but "
                                                  r"reward model .*d_model=16.* was expected"):
        train.run(_load_config(**{"train.num_steps": 3, "task.d_model": 16}), str(tmp_path),
                  log=_quiet, devices=ONE)
    assert (tmp_path / "manifest.json").read_text() == before
    (tmp_path / "reference_table.npz").unlink()   # then the checkpoint's config refuses it,
    # before its arrays are read (they would not fit: Orbax named shapes, not the key)
    with pytest.raises(ValueError, match=r"another config \(task.d_model: checkpoint 32, "
                                         r"config 16\)"):
        train.run(_load_config(**{"train.num_steps": 3, "task.d_model": 16}), str(tmp_path),
                  log=_quiet, devices=ONE)
    assert (tmp_path / "manifest.json").read_text() == before


# ---- model checkpoints and tokenizers --------------------------------------------------------

TINY = models.ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                          head_dim=8, d_ff=32, max_len=32)


@pytest.fixture(scope="module")
def tiny_params():
    return models.init_params(TINY, jax.random.key(0))


def _hf_dir(tmp_path, params, edit=None) -> Path:
    directory = tmp_path / "hf"
    hf_import.save_hf_checkpoint(str(directory), TINY, params)
    if edit:
        edit(directory)
    return directory


def _drop_key(key):
    def edit(directory):
        cfg = json.loads((directory / "config.json").read_text())
        del cfg[key]
        (directory / "config.json").write_text(json.dumps(cfg))
    return edit


def _bad_index(directory):
    (directory / "model.safetensors.index.json").write_text("{not json")


@pytest.mark.parametrize("edit,match", [
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "vocab_size": "many"})),
     r"ModelConfig.vocab_size must be a positive integer, got 'many'"),
    pytest.param(_drop_key("num_hidden_layers"), r"config.json.*num_hidden_layers"),
    pytest.param(_bad_index, r"model.safetensors.index.json"),
], ids=["vocab-is-string", "missing-config-key", "malformed-shard-index"])
def test_bad_hf_checkpoint_names_file_and_field(tmp_path, tiny_params, edit, match):
    directory = _hf_dir(tmp_path, tiny_params, edit)
    with pytest.raises(ValueError, match=match):
        hf_import.load_hf_checkpoint(str(directory))


def test_token_ids_outside_the_model_vocabulary_are_refused(tiny_params):
    # A tokenizer with a larger vocabulary than the model produced id 100 (vocab 16).
    prompt = jnp.array([[3, 100]])
    with pytest.raises(ValueError, match=r"vocab"):
        sampling.sample(models.decoder_fns(TINY), tiny_params, prompt, jnp.ones((1, 2), bool),
                        jax.random.key(0), sampling.SamplingConfig(n=2, max_new_tokens=3))


def test_eos_id_outside_the_model_vocabulary_is_refused(tiny_params):
    with pytest.raises(ValueError, match=r"SamplingConfig.eos_id must be a token id in \[0, 16\)"):
        sampling.sample(models.decoder_fns(TINY), tiny_params, jnp.array([[3, 4]]),
                        jnp.ones((1, 2), bool), jax.random.key(0),
                        sampling.SamplingConfig(n=2, max_new_tokens=3, eos_id=16))
