"""Fault injection on the CTRL run loop through its CLI (`experiments/train_policy.py`).

* SIGKILL at several points (after the k-th metrics row, and while a checkpoint directory is still
  `*.orbax-checkpoint-tmp*`), resumed by rerunning the same command: the final parameters,
  optimiser state, metrics and evaluation equal an uninterrupted run's bit for bit.
* The newest checkpoint truncated on disk: the rerun falls back to the previous step, says so,
  quarantines the bad step and ends equal to the uninterrupted run.
* Non-finite rewards at a chosen step: "stop" names the step and metric, exits non-zero from the
  CLI, writes no summary and leaves the last good checkpoint restorable; "skip" leaves params and
  optimiser state bit-identical across the skipped step.
* An unwritable or full work directory fails before any training output is written.

Subprocesses use one CPU device (`xla_env.xla_flags()`) and the persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.infra import checkpointing
from infalign_jax import rl
from infalign_jax.rl import tasks as rl_tasks
from infalign_jax.rl.tasks import exact as exact_tasks
from infalign_jax.loops import train
from infalign_jax.infra.checkpointing import Checkpointer
from infalign_jax.data import pipeline
from infalign_jax.infra.metrics_io import read_jsonl

from xla_env import xla_flags

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "reliability" / "_train_worker.py"
CLI = REPO / "experiments" / "train_policy.py"
TIMING_KEYS = {"step_time_s", "tokens_per_s"}
NUM_STEPS = 12
# steps in the config string: it also sets the lr decay and the beta warm-up, which a
# --config.train.num_steps flag alone would leave at the file's 1500 steps (refused)
FLAGS = [f"--config=configs/ctrl_exact.py:steps={NUM_STEPS}", "--config.rl.samples_per_prompt=8",
         "--config.reference.k=64",
         "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=20",
         "--config.train.eval_every=0", "--config.train.log_every=1",
         "--config.train.tensorboard=False",
         # asynchronous, as on an accelerator ("auto" writes synchronously on the CPU): the kills
         # and the SIGTERM land while a save is written in the background
         "--config.train.async_checkpoint=true"]


def _env(**extra: str) -> dict[str, str]:
    """The commands' environment: one device; their compilation cache is conftest's
    INFALIGN_JAX_CACHE, which `cli.start` reads."""
    return dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                **extra)


def _cli(workdir: Path, *extra: str, script: Path = CLI, env: dict | None = None,
         preexec=None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), f"--workdir={workdir}", *FLAGS, *extra],
                          cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def _committed(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) \
        if ckpt_dir.exists() else []


def _uncommitted(ckpt_dir: Path) -> list[str]:
    return [p.name for p in ckpt_dir.iterdir() if checkpointing.TMP_DIR_SUFFIX in p.name] \
        if ckpt_dir.exists() else []


def _load_config(**overrides):
    import importlib.util
    spec = importlib.util.spec_from_file_location("ctrl_exact", REPO / "configs" / "ctrl_exact.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(f"samples=8,steps={NUM_STEPS}")
    c.unlock()
    c.reference.k = 64
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 20
    c.train.eval_every = 0
    c.train.log_every = 1
    c.train.tensorboard = False
    c.train.async_checkpoint = "true"
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    c.lock()
    return c


def _restore(workdir: Path, step: int, config=None) -> tuple[rl.RLState, dict]:
    """Restores checkpoint `step` of a run of `config` (the CLI flags above by default)."""
    config = config or _load_config()
    task = rl_tasks.build_task(config.task) if config.task.name in rl_tasks.known_tasks() \
        else exact_tasks.rl_task(config.task)
    cfg = train.rl_config(config, task)
    optimizer = rl.make_optimizer(cfg)
    state = rl.RLState(task.ref_params, optimizer.init(task.ref_params),
                          jnp.zeros((), jnp.int32))
    with Checkpointer(workdir / "checkpoints", max_to_keep=None) as ckpt:
        restored = ckpt.restore(step, jax.eval_shape(lambda: state))
    return restored.state, restored.meta


def _assert_states_equal(a: rl.RLState, b: rl.RLState, what: str) -> None:
    leaves_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
    leaves_b = jax.tree.leaves(jax.device_get(b))
    assert len(leaves_a) == len(leaves_b), what
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, jax.tree_util.keystr(path))
        assert x.tobytes() == y.tobytes(), (what, jax.tree_util.keystr(path))


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(str(path))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _committed(workdir / "checkpoints")[-1] == NUM_STEPS
    return workdir


# ---- SIGKILL and resume ----------------------------------------------------------------------

def _run_until_signalled(workdir: Path, how: str, when: int, log: Path,
                         sig: int = signal.SIGKILL, extra: tuple[str, ...] = ()) -> int:
    """Starts the CLI (FLAGS, then `extra`) and sends it `sig`: ("row", k) once metrics.jsonl has
    k rows; ("tmp", k) at the first uncommitted checkpoint directory seen after k rows. Returns
    its exit status."""
    metrics, ckpts = workdir / "metrics.jsonl", workdir / "checkpoints"
    start_rows = len(read_jsonl(str(metrics))) if metrics.exists() else 0
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(CLI), f"--workdir={workdir}", *FLAGS,
                                 *extra],
                                cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                rows = len(read_jsonl(str(metrics))) if metrics.exists() else 0
                if rows > start_rows and rows >= when and (how == "row" or _uncommitted(ckpts)):
                    break
                time.sleep(0.002)
            assert proc.poll() is None, f"run ended before kill point {how} {when}: " \
                                        f"{log.read_text()[-2000:]}"
        finally:
            proc.send_signal(sig)
            proc.wait(timeout=120)   # a SIGTERM lets the run finish its step and save it
    return proc.returncode


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bit_exact(uninterrupted, tmp_path):
    workdir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    plan = [("row", 3), ("tmp", 6), ("row", 9)]
    seen_tmp, history = [], []
    for i, (how, when) in enumerate(plan):
        before = _committed(ckpts)
        assert _run_until_signalled(workdir, how, when, tmp_path / f"kill{i}.log") == \
            -signal.SIGKILL
        after, tmp = _committed(ckpts), _uncommitted(ckpts)
        seen_tmp += tmp
        history.append((how, when, after[-1] if after else 0, tmp))
        assert not {int(n.split(".")[0]) for n in tmp} & set(after), (after, tmp)
        assert max(after, default=0) >= max(before, default=0)  # progress is never lost
        assert not (workdir / "summary.json").exists()
    assert any(how == "tmp" and tmp for how, _, _, tmp in history), history
    last = _committed(ckpts)[-1]
    proc = _cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from checkpoint step {last}" in proc.stdout + proc.stderr
    assert "uncommitted checkpoint left by an interrupted save" in proc.stderr or not seen_tmp
    got, _ = _restore(workdir, NUM_STEPS)
    want, _ = _restore(uninterrupted, NUM_STEPS)
    _assert_states_equal(got, want, "final state after 3 kills")
    assert _rows(workdir / "metrics.jsonl") == _rows(uninterrupted / "metrics.jsonl")
    assert read_jsonl(str(workdir / "eval.jsonl")) == read_jsonl(str(uninterrupted / "eval.jsonl"))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] == last and summary["final_step"] == NUM_STEPS


@pytest.mark.slow
def test_sigterm_stops_after_its_step_with_that_checkpoint_then_resumes_bit_exact(uninterrupted,
                                                                                  tmp_path):
    """A scheduler's SIGTERM (preemption, scancel): the run finishes the step it is in, saves
    it although it is no checkpoint step, says so and exits with status 143; the same command
    resumes from that step and ends equal to an uninterrupted run."""
    workdir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    metrics, log = workdir / "metrics.jsonl", tmp_path / "term.log"
    status = _run_until_signalled(workdir, "row", 2, log, signal.SIGTERM,
                                  ("--config.train.checkpoint_every=100",))
    text = log.read_text()
    assert status == 143, text[-3000:]
    stopped = len(read_jsonl(str(metrics)))
    assert 2 <= stopped < NUM_STEPS, text[-2000:]
    # step 1 is Orbax's first save; `stopped` is no checkpoint step (every 100)
    assert _committed(ckpts) == [1, stopped] and not _uncommitted(ckpts)
    assert f"SIGTERM: stopped after step {stopped} of {NUM_STEPS}" in text
    assert "Traceback" not in text and not (workdir / "summary.json").exists()
    proc = _cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from checkpoint step {stopped}" in proc.stdout + proc.stderr
    got, _ = _restore(workdir, NUM_STEPS)
    want, _ = _restore(uninterrupted, NUM_STEPS)
    _assert_states_equal(got, want, "final state after a SIGTERM")
    assert _rows(workdir / "metrics.jsonl") == _rows(uninterrupted / "metrics.jsonl")


def _truncate_newest(ckpts: Path) -> int:
    newest = _committed(ckpts)[-1]
    files = [p for p in (ckpts / str(newest) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(max(p.stat().st_size // 2, 1))
    return newest


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_newest_checkpoint_falls_back_and_ends_equal(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    newest = _truncate_newest(workdir / "checkpoints")
    assert newest == NUM_STEPS
    proc = _cli(workdir)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"checkpoint step {newest} in" in output and "cannot be restored" in output
    assert f"resumed from checkpoint step {newest - 1}" in output
    assert (workdir / "checkpoints" / f"{newest}.corrupt").is_dir()
    got, meta = _restore(workdir, NUM_STEPS)
    want, _ = _restore(uninterrupted, NUM_STEPS)
    _assert_states_equal(got, want, "state after falling back past a truncated step")
    assert meta["step"] == NUM_STEPS
    assert _rows(workdir / "metrics.jsonl") == _rows(uninterrupted / "metrics.jsonl")


# ---- non-finite steps ------------------------------------------------------------------------

NUM_PROMPTS = 8   # batch_size 1: each prompt appears once per 8-step epoch


def _prompt_first_seen_at(step0: int) -> int:
    """The prompt drawn at 0-based `step0` (seed 0, batch 1); it is not drawn before it."""
    cfg = pipeline.LoaderConfig(batch_size=1, seed=0)
    drawn = [int(pipeline.batch_indices(cfg, NUM_PROMPTS, s)[0]) for s in range(step0 + 1)]
    assert drawn[-1] not in drawn[:-1]
    return drawn[-1]


def _poison_flags() -> list[str]:
    return ["--config.task.name=exact_poisoned", f"--config.task.num_prompts={NUM_PROMPTS}",
            "--config.train.batch_size=1"]


@pytest.mark.slow
def test_nan_reward_stop_mode_from_the_cli(tmp_path):
    bad_step0 = 4                                     # the 5th step (1-based step 5)
    prompt = _prompt_first_seen_at(bad_step0)
    workdir = tmp_path / "run"
    proc = _cli(workdir, *_poison_flags(), script=WORKER,
                env=_env(RELIABILITY_POISON=f"nan:{prompt}"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "NonFiniteStepError" in output
    assert f"step {bad_step0 + 1}: non-finite values (metrics [" in output
    assert "'reward'" in output and f"last checkpoint (step {bad_step0}) is intact" in output
    assert not (workdir / "summary.json").exists()
    assert _committed(workdir / "checkpoints") == list(range(1, bad_step0 + 1))
    assert [r["step"] for r in read_jsonl(str(workdir / "metrics.jsonl"))] == \
        list(range(1, bad_step0 + 1))
    config = _load_config(**{"task.name": "exact_poisoned", "task.num_prompts": NUM_PROMPTS,
                             "train.batch_size": 1})
    state, meta = _restore(workdir, bad_step0, config)
    assert meta["step"] == bad_step0 and int(state.step) == bad_step0
    assert checkpointing.nonfinite_leaves(state) == []


def _register_poison(monkeypatch, kind: str, prompt: int) -> None:
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _train_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    monkeypatch.setitem(rl_tasks._BUILDERS, "exact_poisoned",
                        _train_worker.poisoned_builder(kind, prompt))


ONE = jax.devices()[:1]


def _poisoned_config(**overrides):
    return _load_config(**{"task.name": "exact_poisoned", "task.num_prompts": NUM_PROMPTS,
                           "train.batch_size": 1, **overrides})


@pytest.mark.parametrize("kind,transform,metrics", [
    ("nan", "exp", ["reward"]),
    ("inf", "exp", ["reward"]),
    # 3e38 rewards with the raw transform: the batch mean, the advantages' sums and the loss
    # overflow; the error must name what overflowed.
    ("big", "raw", ["loss", "reward"]),
])
def test_nonfinite_skip_mode_keeps_params_and_optimizer_bitwise(tmp_path, monkeypatch, kind,
                                                                transform, metrics):
    bad_step0 = 2
    _register_poison(monkeypatch, kind, _prompt_first_seen_at(bad_step0))
    # raw takes no t: the section's t (exp's) is unset, or the run refuses it.
    cfg = _poisoned_config(**{"train.nan_policy": "skip", "train.num_steps": 5,
                              "transform.name": transform,
                              **({"transform.t": None} if transform == "raw" else {})})
    lines: list[str] = []
    state, summary = train.run(cfg, str(tmp_path), log=lines.append, devices=ONE)
    assert summary["skipped_steps"] == 1
    assert any(line.startswith(f"step {bad_step0 + 1}: non-finite ") and "skipped (1 so far)"
               in line for line in lines), lines
    bad_line = next(line for line in lines if line.startswith(f"step {bad_step0 + 1}:"))
    for name in metrics:
        assert f"'{name}'" in bad_line, bad_line
    before, _ = _restore(tmp_path, bad_step0, cfg)
    after, meta = _restore(tmp_path, bad_step0 + 1, cfg)
    assert meta["skips"] == 1 and int(after.step) == bad_step0 + 1
    _assert_states_equal(after.params, before.params, "params across the skipped step")
    _assert_states_equal(after.opt_state, before.opt_state, "optimizer state across the skip")
    later, _ = _restore(tmp_path, bad_step0 + 2, cfg)   # training goes on after the skip
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
               zip(jax.tree.leaves(later.params), jax.tree.leaves(after.params)))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["skipped_total"] for r in rows] == [0, 0, 1, 1, 1]


# ---- unwritable and full work directories ----------------------------------------------------

def _assert_failed_before_training(proc: subprocess.CompletedProcess, workdir: Path,
                                   match: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "WorkdirError" in output and match in output, output[-2000:]
    assert str(workdir) in output
    for name in ("manifest.json", "reference_table.npz", "metrics.jsonl", "summary.json",
                 "checkpoints"):
        assert not (workdir / name).exists(), name
    assert "1/12" not in output   # no step ran


@pytest.mark.slow
def test_workdir_under_a_regular_file_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _cli(blocker / "run", timeout=120)
    _assert_failed_before_training(proc, blocker / "run", "is not writable")


@pytest.mark.slow
def test_read_only_workdir_fails_before_training(tmp_path):
    """chmod 0500 blocks other users; root ignores it, so then /proc/self (never writable)."""
    if os.geteuid() == 0:
        workdir = Path("/proc/self/infalign_run")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        workdir = tmp_path / "ro" / "run"
    try:
        proc = _cli(workdir, timeout=120)
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o700)
    _assert_failed_before_training(proc, workdir, "is not writable")


def _file_size_limit(nbytes: int):
    def preexec():
        # Writes past the limit fail with EFBIG (as on a full disk) instead of killing us.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


@pytest.mark.slow
def test_full_disk_fails_before_training(tmp_path):
    """A file-size limit below the start-up probe's 4 KiB stands in for a full disk."""
    workdir = tmp_path / "run"
    proc = _cli(workdir, preexec=_file_size_limit(1024), timeout=120)
    _assert_failed_before_training(proc, workdir, "File too large")
