"""The shared run loop (`loops.skeleton.run_loop`) on a counter state: resume rules."""

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from infalign_jax.infra import checkpointing
from infalign_jax.loops import skeleton
from infalign_jax.loops.skeleton import run_loop


@dataclasses.dataclass(frozen=True)
class _Settings:
    num_steps: int
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 2
    keep_checkpoints: int = 3
    async_checkpoint: str = "false"
    tensorboard: bool = False
    init_from: str = ""


def _run(workdir, num_steps, log=lambda _: None):
    """Steps of a state that counts them; its evaluation reports the count."""
    def step_fn(state, step, context):
        return {"count": state["count"] + 1}, {"loss": 0.0}

    def evaluate(state, step):
        return {"count": float(state["count"])}

    return run_loop(str(workdir), {"count": jnp.zeros((), jnp.int32)}, step_fn,
                    _Settings(num_steps), seed=0, manifest={"config": {"seed": 0}},
                    log=log, progress_keys=("loss",), evaluate=evaluate)


def _snapshot(workdir):
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, workdir)] = f.read()
    return files


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    """A work dir trained to step 4, rerun with num_steps=2, would train nothing and report the
    step-4 state as step 2: it is refused, naming the field and both steps, writing nothing."""
    assert _run(tmp_path, 4).last_eval == {"count": 4.0}
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"config\.train\.num_steps=2 is below the checkpoint "
                                         r"step 4 .*num_steps >= 4 or use a fresh work dir"):
        _run(tmp_path, 2)
    assert _snapshot(tmp_path) == before
    # The same length reruns the final evaluation; a longer one trains on from step 4.
    assert _run(tmp_path, 4).last_eval == {"count": 4.0}
    longer = _run(tmp_path, 6)
    assert longer.resumed_from == 4 and longer.last_eval == {"count": 6.0}


class _Counter(NamedTuple):
    params: dict   # {"count": int32}: a state `train.init_from` can start from


def _run_from(workdir, num_steps, init_from=""):
    def step_fn(state, step, context):
        return _Counter({"count": state.params["count"] + 1}), {"loss": 0.0}

    def evaluate(state, step):
        return {"count": float(state.params["count"])}

    return run_loop(str(workdir), _Counter({"count": jnp.zeros((), jnp.int32)}), step_fn,
                    _Settings(num_steps, init_from=str(init_from)), seed=0,
                    manifest={"config": {"seed": 0}}, log=lambda _: None,
                    progress_keys=("loss",), evaluate=evaluate)


def test_init_from_on_a_resume_must_be_the_one_the_run_started_from(tmp_path):
    """A resume continues from its own checkpoint: an init_from it would ignore (another run's,
    or one given to a run that started fresh) is refused, not recorded as if used."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _run_from(a, 4).last_eval == {"count": 4.0}
    assert _run_from(c, 1).last_eval == {"count": 1.0}
    assert _run_from(b, 2, init_from=a).last_eval == {"count": 6.0}   # from a's 4, two steps
    longer = _run_from(b, 3, init_from=a)            # the same command, longer: a resume
    assert longer.resumed_from == 2 and longer.last_eval == {"count": 7.0}
    before = _snapshot(b)
    with pytest.raises(ValueError, match=r"config.train.init_from=.*/c', but .*/b holds a run "
                                         r"\(checkpoint step 3\) that started from .*/a; a resume"):
        _run_from(b, 3, init_from=c)
    assert _snapshot(b) == before
    with pytest.raises(ValueError, match=r"that started from its own initialisation"):
        _run_from(a, 4, init_from=c)
    assert _run_from(b, 3).resumed_from == 3          # without init_from: resumed


def test_a_resume_under_other_code_is_said_and_each_segments_code_is_recorded(tmp_path,
                                                                             monkeypatch):
    """The manifest's git and packages were rewritten by each resume, so a run trained partly
    under one revision and partly under another recorded only the last. The first start's are
    kept (`started_with`), each resume records its own, and a change is said in the log."""
    import json
    from infalign_jax.infra import provenance
    first_git, first_packages = provenance.git_state(), provenance.package_versions()
    _run(tmp_path, 2)
    lines = []
    _run(tmp_path, 3, lines.append)       # same code: nothing said
    assert not [line for line in lines if "other code" in line]
    other = {"revision": "f" * 40, "dirty": True}
    monkeypatch.setattr(provenance, "git_state", lambda path=None: other)
    monkeypatch.setattr(provenance, "package_versions",
                        lambda names=provenance.PACKAGES: {**first_packages, "jax": "9.9.9"})
    _run(tmp_path, 5, lines.append)
    said = [line for line in lines if "other code" in line]
    assert len(said) == 1 and "step 3" in said[0] and "-> ffffffffff (dirty)" in said[0], lines
    assert f"jax {first_packages['jax']} -> 9.9.9" in said[0]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["started_with"] == {"git": first_git, "packages": first_packages}
    assert [r["step"] for r in manifest["resumes"]] == [2, 3]
    assert manifest["resumes"][0]["git"] == first_git and manifest["resumes"][1]["git"] == other
    assert manifest["resumes"][1]["packages"]["jax"] == "9.9.9"
    assert manifest["git"] == other



def test_a_resume_under_other_xla_flags_is_said_and_recorded(tmp_path, monkeypatch):
    """XLA_FLAGS change the numbers bitwise; a resume under other flags was taken without a word
    and the segments' flags recorded nowhere."""
    import json
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    _run(tmp_path, 2)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    lines = []
    _run(tmp_path, 3, lines.append)
    said = [line for line in lines if "other code" in line]
    assert len(said) == 1 and ("XLA_FLAGS '--xla_cpu_enable_fast_math=false' -> "
                               "'--xla_backend_optimization_level=0'") in said[0], lines
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["resumes"][0]["environment"]["XLA_FLAGS"] == \
        "--xla_backend_optimization_level=0"


def test_sigterm_during_the_steps_saves_that_step_and_a_rerun_resumes_it(tmp_path):
    """A scheduler's SIGTERM (preemption, scancel) ended the process at once, losing the steps
    since the last checkpoint (every 2 steps here): the loop now finishes the step, saves it,
    and raises Preempted (exit status 143); the same call resumes from that step."""
    import signal

    from infalign_jax.infra import preemption
    from infalign_jax.infra.checkpointing import Checkpointer

    lines = []

    def step_fn(state, step, context):
        if step == 2:   # during the third step
            os.kill(os.getpid(), signal.SIGTERM)
        return {"count": state["count"] + 1}, {"loss": 0.0}

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted) as e:
        run_loop(str(tmp_path), {"count": jnp.zeros((), jnp.int32)}, step_fn, _Settings(6),
                 seed=0, manifest={"config": {"seed": 0}}, log=lines.append,
                 progress_keys=("loss",))
    assert e.value.code == 128 + signal.SIGTERM and e.value.step == 3
    assert signal.getsignal(signal.SIGTERM) == before   # the handler is put back
    assert any(line.startswith("SIGTERM: stopped after step 3 of 6") for line in lines), lines
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == 3   # not an interval step (checkpoint_every = 2)
    ckpt.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.read().splitlines()) == 3
    resumed = _run(tmp_path, 6)
    assert resumed.resumed_from == 3 and resumed.last_eval == {"count": 6.0}


def test_a_second_sigterm_ends_the_process_at_once(tmp_path):
    """The first SIGTERM is noted; a second one (a scheduler that will not wait) takes the default
    action, and the process ends by the signal."""
    import signal
    import subprocess
    import sys

    script = ("import os, signal, time\n"
              "from infalign_jax.infra import preemption\n"
              "with preemption.sigterm_noted() as sigterm:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.1)\n"
              "    print('noted', sigterm(), flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "print('not reached', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stdout.split() == ["noted", "True"]


def test_sigterm_noted_puts_back_a_python_handler_that_was_there_before():
    """The handler in place before (here a Python function, not SIG_DFL) is the one put back on
    exit, also when the block raises; a SIGTERM inside is noted, not passed to it."""
    import signal

    from infalign_jax.infra import preemption

    seen = []

    def mine(signum, frame):
        seen.append(signum)

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(KeyError):
            with preemption.sigterm_noted() as sigterm:
                assert signal.getsignal(signal.SIGTERM) is not mine
                assert not sigterm()
                os.kill(os.getpid(), signal.SIGTERM)
                assert sigterm()
                raise KeyError("the block fails")
        assert signal.getsignal(signal.SIGTERM) is mine and seen == []
        os.kill(os.getpid(), signal.SIGTERM)   # the restored handler is the one that runs
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_noted_outside_the_main_thread_installs_nothing_and_never_reports():
    """Python installs signal handlers only from the main thread: elsewhere the block runs with
    `requested()` always False and the process's handler untouched."""
    import signal
    import threading

    from infalign_jax.infra import preemption

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker():
        try:
            with preemption.sigterm_noted() as sigterm:
                seen.append(("inside", sigterm(), signal.getsignal(signal.SIGTERM)))
            seen.append(("after", sigterm()))
        except BaseException as e:   # noqa: BLE001  (reported to the main thread)
            seen.append(("error", repr(e)))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert seen == [("inside", False, before), ("after", False)]
    assert signal.getsignal(signal.SIGTERM) == before


def test_auto_reads_the_platform_the_state_is_on_not_the_default_backend(tmp_path,
                                                                        monkeypatch):
    """A state placed on CPU devices saves synchronously under "auto" even where JAX's default
    backend is an accelerator (a GPU host running on its CPU), and names the CPU in its log."""
    made, real = [], checkpointing.Checkpointer

    def checkpointer(*args, **kwargs):
        made.append(kwargs["async_save"])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "Checkpointer", checkpointer)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    lines = []
    state = {"count": jax.device_put(jnp.zeros((), jnp.int32), jax.devices("cpu")[0])}
    run_loop(str(tmp_path), state, lambda st, step, ctx: ({"count": st["count"] + 1},
                                                          {"loss": 0.0}),
             _Settings(2, checkpoint_every=1, async_checkpoint="auto"), seed=0,
             manifest={"config": {"seed": 0}}, log=lines.append, progress_keys=("loss",))
    assert made == [False]
    assert ("checkpoints every step, each written before the next step "
            "(train.async_checkpoint=auto, cpu backend)") in lines
    # a state holding no array falls back to the default backend
    assert skeleton.state_platform({"step": 3}) == "gpu"


@pytest.mark.parametrize("setting,background", [("auto", False), ("false", False),
                                                ("true", True)])
def test_auto_writes_each_checkpoint_before_the_next_step_on_the_cpu(tmp_path, monkeypatch,
                                                                     setting, background):
    """"auto" is synchronous on the CPU backend: the step after a save finds it committed."""
    made, real = [], checkpointing.Checkpointer

    def checkpointer(*args, **kwargs):
        made.append(kwargs["async_save"])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "Checkpointer", checkpointer)
    listed, lines = {}, []

    def step_fn(state, step, context):
        listed[step] = sorted(os.listdir(tmp_path / "checkpoints"))
        return {"count": state["count"] + 1}, {"loss": 0.0}

    run_loop(str(tmp_path), {"count": jnp.zeros((), jnp.int32)}, step_fn,
             _Settings(4, checkpoint_every=1, async_checkpoint=setting), seed=0,
             manifest={"config": {"seed": 0}}, log=lines.append, progress_keys=("loss",))
    assert made == [background]
    where = "in the background" if background else "before the next step"
    assert (f"checkpoints every step, each written {where} (train.async_checkpoint="
            f"{setting}, cpu backend)") in lines
    assert sorted(listed) == [0, 1, 2, 3] and listed[0] == []
    if not background:   # step s (from 0) starts after step s's save (from 1) is committed
        for step in (1, 2, 3):
            assert listed[step] == [str(s) for s in range(1, step + 1)], listed
