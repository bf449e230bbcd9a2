"""Silent wrong results (issue 19): each case used to finish without a word and now either does
the right thing or says what it did. The old behaviour of each is in docs/reliability.md.

* runs: another config is refused and pointed to `train.init_from`, which starts a fresh run
  from a run's parameters; the manifest lists every resume; a failed start leaves no empty work
  dir; TensorBoard after kill + resume holds each step once, tagged train/ and eval/;
* data: cuts at the length limits are counted, and the summary says what was read, kept,
  dropped (per reason) and cut; HH responses holding role markers are kept; Git LFS pointers and
  cut .gz files are named as such; no "at at";
* rewards: stopping at once (EOS first) earns every judge's minimum;
* config: a transform parameter the transform does not take is refused; a config key typo is
  one clean line.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from infalign_jax.core.calibration import calibrate
from infalign_jax.core.transforms import transform_from_config
from infalign_jax.data import (DataError, TokenizeConfig, read_preferences, read_prompts,
                               tokenize_preferences, tokenize_prompts)
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.infra import checkpointing
from infalign_jax.infra import cli
from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.infra.metrics_io import read_jsonl
from infalign_jax.loops import train, train_reward
from infalign_jax.rewards import judges
from infalign_jax.rl import tasks as rl_tasks
from infalign_jax.workflows import sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fault_injection import REPO, _env, _load_config  # noqa: E402

ONE = jax.devices()[:1]


def _quiet(_):
    pass


def _config(**overrides):
    return _load_config(**{"train.num_steps": 2, **overrides})


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run of the exact task (t=3, beta=1.5)."""
    workdir = tmp_path_factory.mktemp("finished")
    state, summary = train.run(_config(), str(workdir), log=_quiet, devices=ONE)
    return workdir, state, summary


# ---- runs: init_from, resumes, failed start-up, TensorBoard ---------------------------------

def test_init_from_starts_another_config_from_a_runs_parameters(finished, tmp_path):
    workdir, state, summary = finished
    assert summary["train_data"]["prompts"] == 2
    other = {"transform.t": 8.0}
    with pytest.raises(ValueError, match=r"transform.t: checkpoint 3.0, config 8.0.*"
                                         rf"--config.train.init_from={workdir} to start a fresh"):
        train.run(_config(**other), str(workdir), log=_quiet, devices=ONE)
    lines: list[str] = []
    new_dir = tmp_path / "t8"
    _, new = train.run(_config(**other, **{"train.init_from": str(workdir),
                                           "train.num_steps": 1}),
                       str(new_dir), log=lines.append, devices=ONE)
    assert new["resumed_from"] == 0 and any("started from the parameters of" in ln for ln in lines)
    manifest = json.loads((new_dir / "manifest.json").read_text())
    assert manifest["init_from"] == {"path": str(workdir), "step": 2,
                                     "config_differs": ["transform.t"]}
    assert manifest["config"]["train"]["init_from"] == str(workdir)
    # Step 1 samples from the starting policy: the other run's, not pi_ref (KL 0 exactly).
    first = read_jsonl(str(new_dir / "metrics.jsonl"))[0]
    assert first["kl_full_vocab"] > 1e-4
    _, fresh = train.run(_config(**other, **{"train.num_steps": 1}), str(tmp_path / "fresh"),
                         log=_quiet, devices=ONE)
    assert read_jsonl(str(tmp_path / "fresh" / "metrics.jsonl"))[0]["kl_full_vocab"] == 0.0


def test_init_from_takes_a_run_its_checkpoints_or_one_step_and_names_bad_paths(finished,
                                                                               tmp_path):
    workdir, state, _ = finished
    abstract = checkpointing.abstract_state(state.params)
    for path, step in ((workdir, 2), (workdir / "checkpoints", 2),
                       (workdir / "checkpoints" / "1", 1)):
        params, got_step, meta = checkpointing.restore_params(str(path), abstract)
        assert got_step == step and meta["step"] == step
        if step == 2:
            for a, b in zip(jax.tree.leaves(params), _params(state)):
                np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match=r"init_from='.*nope' is not a directory"):
        checkpointing.restore_params(str(tmp_path / "nope"), abstract)
    with pytest.raises(ValueError, match=r"holds no checkpoint"):
        checkpointing.restore_params(str(tmp_path), abstract)
    other_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3, 3), x.dtype), abstract)
    with pytest.raises(ValueError, match=r"does not hold parameters of this run's model"):
        checkpointing.restore_params(str(workdir), other_shape)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A run killed after writing step 3's metrics but before its checkpoint (step 2 is the last
    committed one), then resumed to step 4 by the same command made longer."""
    workdir = tmp_path_factory.mktemp("killed")
    common = {"train.tensorboard": True, "train.checkpoint_every": 2}
    train.run(_config(**common, **{"train.num_steps": 3}), str(workdir), log=_quiet, devices=ONE)
    first = json.loads((workdir / "manifest.json").read_text())
    shutil.rmtree(workdir / "checkpoints" / "3")   # the kill: step 3 never committed
    (workdir / "summary.json").unlink()
    train.run(_config(**common, **{"train.num_steps": 4}), str(workdir), log=_quiet,
              devices=ONE)
    return workdir, first


def _tensorboard_steps(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} over every event file, read raw (no reader-side purging)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.iterdir()):
        for record in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_after_kill_and_resume_holds_each_step_once_with_stream_tags(
        killed_and_resumed):
    workdir, _ = killed_and_resumed
    events = _tensorboard_steps(workdir / "tb")
    assert events and all(tag.startswith(("train/", "eval/")) for tag in events), sorted(events)
    rows = read_jsonl(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [s for s, _ in events["train/kl_k1"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in events["train/kl_k1"]], [r["kl_k1"] for r in rows],
                               rtol=1e-6)
    # The killed run's final evaluation (step 3) is not the resumed run's: only step 4 stays.
    assert [s for s, _ in events["eval/exact_kl"]] == [4]
    assert [r["step"] for r in read_jsonl(str(workdir / "eval.jsonl"))] == [4]


def test_manifest_lists_each_resume_and_keeps_the_first_start(killed_and_resumed):
    workdir, first = killed_and_resumed
    assert first["resumes"] == []
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["started"] == first["started"]
    assert [r["step"] for r in manifest["resumes"]] == [2]
    assert manifest["resumes"][0]["time"] >= first["started"]


def _missing_model(section):
    raise FileNotFoundError("model file SmolLM2-135M-Instruct.Q4_1.gguf not found")


@pytest.mark.parametrize("overrides,error", [
    ({"train.batch_size": 3}, "batch_size=3 exceeds"),              # caught after the dir exists
    ({"task.name": "exact_missing_model"}, "model file"),          # the model fails to load
], ids=["bad-config", "model-load-error"])
def test_failed_startup_leaves_no_empty_work_dir(tmp_path, monkeypatch, overrides, error):
    monkeypatch.setitem(rl_tasks._BUILDERS, "exact_missing_model", _missing_model)
    workdir = tmp_path / "runs" / "new"          # neither directory exists yet
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        train.run(_config(**overrides), str(workdir), log=_quiet, devices=ONE)
    assert not (tmp_path / "runs").exists()


def test_failed_startup_keeps_a_pre_existing_work_dir_and_its_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README").write_text("mine")
    for workdir in (empty, notes):
        with pytest.raises(ValueError, match="batch_size=3 exceeds"):
            train.run(_config(**{"train.batch_size": 3}), str(workdir), log=_quiet, devices=ONE)
    assert empty.is_dir() and (notes / "README").read_text() == "mine"


# ---- data: counts, HH role markers, LFS pointers, cut archives, messages ---------------------

def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_cuts_at_the_length_limits_are_counted_per_part(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "short", "chosen": "ok", "rejected": "no"},
        {"prompt": "a very long prompt", "chosen": "a long chosen answer", "rejected": "no"},
        {"prompt": "p", "chosen": "fine", "rejected": "a long rejected answer"}]))
    examples, _ = read_preferences(path)
    cfg = TokenizeConfig(max_prompt_len=8, max_response_len=8, eos_id=0)
    packed, report = tokenize_preferences(examples, _chars, cfg)
    assert len(packed) == 3 and report.total == 0
    assert report.truncated == {"prompt": 1, "chosen": 1, "rejected": 1}
    assert "cut at the length limit: 1 chosen, 1 prompt, 1 rejected" in report.summary()
    prompts, _ = read_prompts(_lines(tmp_path / "p.jsonl", [{"prompt": "x" * 20},
                                                           {"prompt": "y"}]))
    _, report = tokenize_prompts(prompts, _chars, cfg)
    assert report.truncated == {"prompt": 1} and report.kept == 2


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reward_model_summary_says_what_was_read_dropped_cut_and_trained_on(tmp_path):
    rows = [{"prompt": "rate", "chosen": "ok!!", "rejected": "ok"}] * 6 + [
        {"prompt": "rate", "chosen": "same", "rejected": "same"},          # dropped: identical
        "{not json",                                                       # dropped: malformed
        {"prompt": "rate", "chosen": "ok" + "!" * 40, "rejected": "ok"}]   # kept, cut
    train_path = _lines(tmp_path / "train.jsonl", rows)
    eval_path = _lines(tmp_path / "eval.jsonl", rows[:2])
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(synthetic="", train_path=str(train_path), eval_path=str(eval_path),
                  format="jsonl", skip_bad=True, max_prompt_len=8, max_response_len=8)
    c.model = dict(source="tiny", d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8,
                   d_ff=32, max_len=16)
    c.rm = dict(learning_rate=1e-3)
    c.train = dict(num_steps=1, batch_size=2, checkpoint_every=1, tensorboard=False)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    _, summary = train_reward.run(c, str(tmp_path / "rm"), log=_quiet, devices=ONE)
    assert summary["train_data"] == {
        "path": str(train_path), "pairs": 7, "read": 9, "kept": 7,
        "skipped": {"identical_responses": 1, "malformed_json": 1}, "skipped_total": 2,
        "truncated": {"chosen": 1}, "dropped_per_epoch": 1}   # 7 pairs in batches of 2


def test_hh_response_holding_a_role_marker_is_kept_split_at_the_shared_prefix(tmp_path):
    dialogue = "\n\nHuman: Can you help?\n\nAssistant:"
    rows = [{"chosen": dialogue + " Sure.\n\nAssistant: Anything else?",
             "rejected": dialogue + " No."},
            {"chosen": dialogue + " Yes.", "rejected": dialogue + " Go away.\n\nAssistant: Bye."}]
    examples, report = read_preferences(_lines(tmp_path / "hh.jsonl", rows), format="hh")
    assert report.total == 0
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        (dialogue, "Sure.\n\nAssistant: Anything else?", "No."),
        (dialogue, "Yes.", "Go away.\n\nAssistant: Bye.")]


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.jsonl.gz"])
def test_git_lfs_pointer_is_named_as_such(tmp_path, name):
    path = tmp_path / name
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a2146a4f7b2c8c1b3d3e9a0f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3\n"
                    "size 13421772\n")
    with pytest.raises(DataError, match=r"is a Git LFS pointer file, not the data \(fetch the "
                                        r"file with `git lfs pull`\)") as err:
        read_preferences(path)
    assert err.value.reason == "lfs_pointer" and "gzip" not in str(err.value)


def test_cut_gzip_keeps_the_records_before_the_cut_and_names_the_line(tmp_path):
    data = b"".join(b'{"prompt": "prompt number %d"}\n' % i for i in range(3000))
    whole = gzip.compress(data)
    path = tmp_path / "prompts.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"prompts.jsonl.gz:([0-9]+): compressed file ends early "
                                        r"\(truncated: .*\); ([0-9]+) lines read before the cut"):
        read_prompts(path)
    examples, report = read_prompts(path, skip_bad=True)
    n = len(examples)
    assert 0 < n < 3000 and [e.prompt for e in examples] == [f"prompt number {i}"
                                                             for i in range(n)]
    assert report.counts == {"truncated_file": 1} and report.kept == n
    assert report.examples[0][1] == n + 1 and f"{n} lines read before the cut" in \
        report.examples[0][3]


@pytest.mark.parametrize("line", ['{"prompt": "unterminated', '{"prompt": "a\tb"}'])
def test_malformed_json_message_has_no_doubled_word(tmp_path, line):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n' + line.encode())   # the bad line is the last
    with pytest.raises(DataError, match=r"p.jsonl:2: malformed JSON \(.* at column [0-9]+\)") \
            as err:
        read_prompts(path)
    assert " at at " not in str(err.value)


# ---- rewards: stopping at once is never rewarded --------------------------------------------

REAL_ANSWERS = ["Thank you for asking, here is a careful answer.", "No.", "ok",
                "Shut up, you pathetic idiot.", "The train leaves at nine.", "!!!", ":("]


@pytest.mark.parametrize("name", judges.known_judges())
def test_stopping_at_once_earns_every_judges_minimum(name):
    """An RL policy cannot gain reward by emitting EOS first: under every judge, through the
    jitted and the host reward path, an EOS-only, empty or blank response scores the judge's
    minimum, no real answer scores less, and its calibrated reward is the least."""
    judge = judges.get_judge(name)
    tok = ByteTokenizer()
    width = 64
    rows = [[tok.eos_id], [], tok.encode(" \n ") + [tok.eos_id]] + \
        [tok.encode(t) + [tok.eos_id] for t in REAL_ANSWERS]
    resp_RxL = np.zeros((len(rows), width), np.int32)
    mask_RxL = np.zeros((len(rows), width), bool)
    for i, ids in enumerate(rows):
        resp_RxL[i, :len(ids)], mask_RxL[i, :len(ids)] = ids, True
    idx_R = np.zeros(len(rows), np.int32)
    reward = judges.text_reward_fn(judge, lambda ids: tok.decode(ids).strip(), ["Answer me."])
    host = reward.host(idx_R, resp_RxL, mask_RxL)
    jitted = np.asarray(jax.jit(reward.in_graph)(None, jnp.asarray(idx_R), jnp.asarray(resp_RxL),
                                                 jnp.asarray(mask_RxL)))
    np.testing.assert_array_equal(host, jitted)
    np.testing.assert_array_equal(host[:3], [judge.lo] * 3)
    np.testing.assert_array_equal(host[3:], judge(["Answer me."] * len(REAL_ANSWERS),
                                                  REAL_ANSWERS))
    assert host[3:].min() >= judge.lo
    # Calibrated against the real answers (CTRL's reward is Phi(C), Phi increasing): the least.
    cal = np.asarray(calibrate(jnp.asarray(host[None, :]), jnp.asarray(np.sort(host[3:])[None])))
    assert np.all(cal[0, :3] == cal[0, 0]) and cal[0, 0] <= cal[0, 3:].min()


# ---- config: transform parameters, typos -----------------------------------------------------

def test_transform_parameter_the_transform_does_not_take_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^config.transform.t=10.0: transform 'identity' does "
                                         r"not take t \(it takes no parameters; t is a parameter "
                                         r"of 'exp'\)\. To switch transforms, use the config "
                                         r"file's argument, e\.g\. "
                                         r"--config=<file>:transform=identity$"):
        train.run(_config(**{"transform.name": "identity", "transform.t": 10.0}),
                  str(tmp_path / "run"), log=_quiet, devices=ONE)
    assert not (tmp_path / "run").exists()


def test_default_configs_variants_and_sweeps_still_validate():
    exact = load_config_module(str(REPO / "configs" / "ctrl_exact.py"))
    real = load_config_module(str(REPO / "configs" / "ctrl_real.py"))
    for config in (exact.get_config(), exact.get_config("transform=identity"),
                   exact.get_config("transform=log,beta=0.333"), real.get_config(),
                   real.get_config("task=harmlessness"), real.get_config("transform=identity")):
        transform_from_config(config.transform, strict=True)
    assert transform_from_config(exact.get_config().transform, strict=True) == ("exp", {"t": 3.0})
    for point in sweep.sweep_points(exact):       # the t grid over exp
        name, params = transform_from_config(
            sweep.apply_overrides(exact.get_config(), point).transform, strict=True)
        assert name == "exp" and params == {"t": point["transform.t"]}
    with pytest.raises(ValueError, match=r"transform 'identity' does not take t"):
        exact.get_config("transform=identity,t=5")


def test_config_key_typo_is_one_clean_line():
    def message(flag: str, err: BaseException) -> str:
        return cli.config_key_message(["train_policy.py", "--config=x.py", flag], err)
    typo = AttributeError(KeyError('\'bta\'\nDid you mean "beta" instead of "bta"?'))
    assert message("--config.rl.bta=1", typo) == \
        "config key rl.bta does not exist; did you mean rl.beta?"
    section = KeyError('\'rll\'\nDid you mean "rl" instead of "rll"?')
    assert message("--config.rll.beta=1", section) == \
        "config key rll.beta does not exist; did you mean rl.beta?"
    deep = KeyError("Attribute <class 'float'>.x does not exist and the type does not support "
                    "indexing. Attempting to lookup: rl.beta.x")
    assert message("--config.rl.beta.x=1", deep) == \
        "config key rl.beta.x does not exist (rl.beta holds a value, not a section)"


@pytest.mark.parametrize("entrypoint, config, typo, name", [
    ("train_policy", "--config=configs/ctrl_exact.py", "--config.rl.bta=1", "config"),
    # The entrypoint's default file: ml_collections applies the override at import time.
    ("train_policy", None, "--config.rl.bta=1", "config"),
    ("reproduce", None, "--exact_config.rl.bta=1", "exact_config"),
])
def test_config_key_typo_from_the_cli_exits_2_with_one_line(tmp_path, entrypoint, config, typo,
                                                             name):
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / f"{entrypoint}.py"),
                           *filter(None, [config]), f"--workdir={tmp_path / 'run'}", typo],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"error: {name} key rl.bta does not exist; did you mean rl.beta?",
        "(run with --verbosity=1 for the traceback)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("entrypoint, flags_, name, bad", [
    # a valid override sharing the bad key's last part comes first (it was named instead)
    ("train_policy", ["--config.rl.learning_rate=1e-3", "--config.train.learning_rate=1e-3"],
     "config", "train.learning_rate"),
    ("train_policy", ["--config.seed=1", "--config.train.seed=3"], "config", "train.seed"),
    ("reproduce", ["--exact_config.rl.learning_rate=1", "--exact_config.task.learning_rate=1"],
     "exact_config", "task.learning_rate"),
])
def test_a_typo_is_named_among_valid_overrides_of_the_same_name(tmp_path, entrypoint, flags_,
                                                                  name, bad):
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / f"{entrypoint}.py"),
                           f"--workdir={tmp_path / 'run'}", *flags_], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[0].startswith(f"error: {name} key {bad} does not exist"), \
        proc.stderr[-2000:]


def test_config_key_message_without_a_matching_argument_names_the_missing_key():
    """No argument overrides the key ml_collections names (a typo in a config file's own
    override): the key alone, not the quoted message with its hint."""
    typo = KeyError('\'bta\'\nDid you mean "beta" instead of "bta"?')
    assert cli.config_key_message(["train_policy.py", "--config.rl.beta=1"], typo) == \
        "config key bta does not exist"


def test_compilation_cache_directory_from_the_argument_then_the_environment_then_home(
        monkeypatch, tmp_path):
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    default = str(home / ".cache" / "infalign_jax" / "xla")
    assert cli.enable_compilation_cache() == default
    assert updates == [("jax_compilation_cache_dir", default),
                       ("jax_persistent_cache_min_compile_time_secs", 1.0)]
    monkeypatch.setenv(cli.CACHE_ENV, "~/env")
    updates.clear()
    assert cli.enable_compilation_cache(min_compile_s=0.25) == str(home / "env")
    assert updates == [("jax_compilation_cache_dir", str(home / "env")),
                       ("jax_persistent_cache_min_compile_time_secs", 0.25)]
    assert cli.enable_compilation_cache("rel") == str(tmp_path / "rel")   # the argument first
    updates.clear()
    assert cli.enable_compilation_cache("off") is None
    monkeypatch.setenv(cli.CACHE_ENV, "off")
    assert cli.enable_compilation_cache() is None and updates == []


def _flags_of(monkeypatch, *args: str):
    """`cli`'s view of absl's flags: a fresh set holding absl's --verbosity, parsed from args."""
    from absl import flags as absl_flags
    values = absl_flags.FlagValues()
    absl_flags.DEFINE_integer("verbosity", -1, "absl's logging verbosity", flag_values=values)
    values(["prog", *args])
    monkeypatch.setattr(cli, "flags", type("Flags", (), {"FLAGS": values}))


def test_start_refuses_stray_arguments_and_a_multi_process_environment(monkeypatch):
    from absl import app
    from absl import logging as absl_logging
    from infalign_jax.infra import distributed
    caches, started = [], []
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: caches.append("on"))
    monkeypatch.setattr(distributed, "initialize", started.append)
    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    before = absl_logging.get_verbosity()
    try:
        _flags_of(monkeypatch)
        with pytest.raises(app.UsageError, match=r"^unexpected arguments: \['stray'\]$"):
            cli.start(["prog.py", "stray"])
        assert caches == [] and started == []
        absl_logging.set_verbosity(absl_logging.INFO)
        cli.start(["prog.py"])
        assert absl_logging.get_verbosity() == absl_logging.WARNING   # quiet by default
        assert caches == ["on"] and len(started) == 1 and not started[0].is_multi_process
        _flags_of(monkeypatch, "--verbosity=1")
        absl_logging.set_verbosity(absl_logging.INFO)
        cli.start(["prog.py"])
        assert absl_logging.get_verbosity() == absl_logging.INFO      # as given
        monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1")
        monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
        monkeypatch.setenv(distributed.ENV_PROCESS_ID, "0")
        monkeypatch.setattr(sys, "argv", ["/somewhere/lone.py"])
        with pytest.raises(ValueError, match=r"^lone.py runs as one process, but the environment "
                                             r"asks for several \(JAX_COORDINATOR_ADDRESS="
                                             r"'127.0.0.1:1', JAX_NUM_PROCESSES=2\)"):
            cli.start(["lone.py"])
        assert len(started) == 2   # refused before jax.distributed starts
    finally:
        absl_logging.set_verbosity(before)


_ENTRYPOINT = """
from absl import flags

from infalign_jax.infra import cli

flags.DEFINE_string("fail", "", "the error main raises")
CONFIG = cli.define_config("config", "configs/analytic.py", "a config file")


def main(argv):
    cli.start(argv)
    raise {"missing": FileNotFoundError("no such file: prompts.jsonl"),
           "bug": RuntimeError("a bug")}[flags.FLAGS.fail]


if __name__ == "__main__":
    cli.run(main)
"""


def test_run_reports_bad_input_in_one_line_and_keeps_tracebacks_when_verbose(tmp_path):
    """A missing file is bad input: one line, exit status 2; --verbosity keeps the traceback
    (also of a config key typo, where -v=1 asks for it too), as it does for any other error."""
    script = tmp_path / "entry.py"
    script.write_text(_ENTRYPOINT)

    def entry(*args):
        return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=120)

    proc = entry("--fail=missing")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error (FileNotFoundError): no such file: prompts.jsonl",
        "(run with --verbosity=1 for the traceback)"], proc.stderr[-2000:]
    proc = entry("--fail=missing", "--verbosity=1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.rstrip().endswith("FileNotFoundError: no such file: prompts.jsonl")
    proc = entry("--config=configs/analytic.py", "--config.no_such=1", "-v=1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert "error: config key" not in proc.stderr


def test_a_typo_is_looked_for_in_the_config_file_given_not_the_default():
    """--config names another file than the entrypoint's default: its keys decide which override
    is the typo (the default file has no rl section, so rl.beta was named)."""
    argv = ["prog.py", f"--config={REPO / 'configs' / 'ctrl_exact.py'}", "--config.rl.beta=1",
            "--config.rl.bta=1"]
    assert cli._unresolved_override(argv, "config", str(REPO / "configs" / "analytic.py")) == \
        "--config.rl.bta=1"


def test_refuse_overrides_matches_whole_keys_and_sections_ending_in_a_dot(monkeypatch):
    from absl import flags as absl_flags
    from ml_collections import config_flags
    argv = ["prog", "--config.seed2=1", "--config.trainer.steps=2"]
    monkeypatch.setattr(sys, "argv", argv)   # ml_collections reads the overrides' names here
    values = absl_flags.FlagValues()
    config_flags.DEFINE_config_dict(
        "config", ml_collections.ConfigDict({"seed": 0, "seed2": 0, "train": {"steps": 1},
                                             "trainer": {"steps": 1}}), flag_values=values)
    values(argv)
    monkeypatch.setattr(cli, "flags", type("Flags", (), {"FLAGS": values}))
    cli.refuse_overrides("config", ["seed", "train."], "the command sets them")
    with pytest.raises(ValueError, match=r"^--config.seed2 is not used: the command sets them, "
                                         r"so the value given would be replaced; leave it out$"):
        cli.refuse_overrides("config", ["seed2"], "the command sets them")
    with pytest.raises(ValueError, match=r"^--config.trainer.steps is not used"):
        cli.refuse_overrides("config", ["trainer."], "the command sets them")
