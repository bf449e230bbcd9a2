"""Tests of `infalign_jax.infra.checkpointing`: exact round trips, retention, sharded restore, fallback
from a damaged newest step, NaN refusal, unwritable directories, and a worker killed (also in the
middle of a save) and restarted that must end bitwise equal to an uninterrupted run."""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from infalign_jax.infra import checkpointing
from infalign_jax.infra.checkpointing import (CheckpointRestoreError, Checkpointer, NonFiniteError,
                                        WorkdirError, abstract_state, check_writable,
                                        nonfinite_leaves)

from xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
LOGGER = "infalign_jax.infra.checkpointing"


def _example_state(seed: int = 0) -> dict:
    """params (f32 + bf16), a non-trivial adamw state, int step, typed key, data position."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((8,)), jnp.bfloat16)}
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt = tx.update(grads, opt, params)
    return {"params": optax.apply_updates(params, updates), "opt": opt,
            "step": jnp.asarray(7 + seed, jnp.int32),
            "key": jax.random.split(jax.random.key(seed))[1],
            "data_pos": np.asarray([3, 1 + seed], np.int32)}


def _assert_trees_equal(got, want) -> None:
    """Same structure, dtypes and bits (typed keys compared through their key data)."""
    unwrap = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.random.key_data(x)
        if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key) else x, t)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path_g, g, w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype, (path_g[0], g.dtype, w.dtype)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(unwrap(got))[0],
                            jax.tree.leaves(unwrap(want))):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes(), path


def test_round_trip_is_exact(tmp_path):
    state = _example_state()
    meta = {"config": {"lr": 0.01, "name": "tiny"}, "data_pos": [3, 1]}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore_latest(jax.eval_shape(lambda: state)) is None
        assert ckpt.save(7, state, meta)
        ckpt.wait()
        step, restored, restored_meta = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert step == 7 and restored_meta == meta
    assert restored["key"].dtype == state["key"].dtype  # still a typed threefry key
    _assert_trees_equal(restored, state)
    with Checkpointer(tmp_path / "ckpt") as ckpt:  # abstract tree taken from a concrete state
        _assert_trees_equal(ckpt.restore(7, abstract_state(state)).state, state)
    # A restored key must drive the same random stream as the original.
    np.testing.assert_array_equal(jax.random.normal(restored["key"], (5,)),
                                  jax.random.normal(state["key"], (5,)))


def test_retention_interval_and_force(tmp_path):
    state = _example_state()
    with Checkpointer(tmp_path / "keep", max_to_keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "keep").iterdir() if not p.name.startswith(".")) \
        == ["4", "5"]
    with Checkpointer(tmp_path / "every2", max_to_keep=None, save_interval_steps=2) as ckpt:
        saved = [step for step in range(2, 8) if ckpt.save(step, state)]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4, 6, 7]


def test_sharded_restore_gets_requested_shardings(tmp_path):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    values = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    saved_state = {"w": jax.device_put(values, NamedSharding(mesh, P("model", "data"))),
                   "v": jax.device_put(values[0], NamedSharding(mesh, P())),
                   "key": jax.random.key(3)}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, saved_state)
        ckpt.wait()
        wanted = {"w": NamedSharding(mesh, P("data", "model")),
                  "v": NamedSharding(mesh, P("model")),
                  "key": NamedSharding(mesh, P())}
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved_state, wanted)
        restored = ckpt.restore(1, abstract).state
    for name, sharding in wanted.items():
        assert restored[name].sharding.is_equivalent_to(sharding, restored[name].ndim), name
    assert restored["w"].addressable_shards[0].data.shape == (4, 4)
    assert restored["v"].addressable_shards[0].data.shape == (4,)
    _assert_trees_equal(restored, saved_state)
    # abstract_state keeps the shardings of a concrete state.
    abstract2 = abstract_state({"w": jax.device_put(values, wanted["w"])})
    assert abstract2["w"].sharding == wanted["w"]


def _truncate_array_data(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(max(p.stat().st_size // 2, 1))


def _delete_array_data(step_dir: Path) -> None:
    for p in (step_dir / "state").rglob("manifest.ocdbt"):
        p.unlink()


def _garble_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text('{"data_pos": ')


def _three_saved_steps(tmp_path: Path):
    """(states by step, their abstract tree, the directory) of steps 1-3 saved, each {"step": s}."""
    states = {step: _example_state(seed=step) for step in (1, 2, 3)}
    root = tmp_path / "ckpt"
    with Checkpointer(root, max_to_keep=3) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"step": step})
        ckpt.wait()
    return states, jax.eval_shape(lambda: states[1]), root


# A failed TensorStore read leaves Orbax's pending asyncio reads to be torn down with their loop;
# the resulting "Event loop is closed" report is Orbax-internal noise, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate_array_data, _delete_array_data, _garble_meta],
                         ids=["truncated-data", "deleted-manifest", "garbled-meta"])
def test_damaged_newest_step_falls_back_to_previous(tmp_path, caplog, damage):
    states, abstract, root = _three_saved_steps(tmp_path)
    damage(root / "3")
    with Checkpointer(root, max_to_keep=3) as ckpt, caplog.at_level(logging.WARNING, LOGGER):
        step, state, meta = ckpt.restore_latest(abstract)
        assert (step, meta) == (2, {"step": 2})
        _assert_trees_equal(state, states[2])
        assert any("step 3" in r.getMessage() and "cannot be restored" in r.getMessage()
                   for r in caplog.records)
        # The bad step is moved aside, so replaying step 3 after the fallback can save it.
        assert (root / "3.corrupt").is_dir() and ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, states[3], {"step": 3})
        ckpt.wait()
        assert ckpt.restore_latest(abstract).step == 3


def test_a_passing_read_error_is_retried_not_quarantined(tmp_path, caplog, monkeypatch):
    """The newest step fails once (a transient read error): it is tried again before any older
    step is restored (one state in memory at a time), restored, and never renamed. Out of memory
    on the newest step is raised as it is, with an older step intact and nothing renamed."""
    states, abstract, root = _three_saved_steps(tmp_path)
    real_restore, calls = Checkpointer.restore, []

    def flaky(self, step, abstract_state):
        calls.append(step)
        if calls == [3]:
            raise OSError("stale file handle")
        return real_restore(self, step, abstract_state)

    monkeypatch.setattr(checkpointing, "RETRY_PAUSE_S", 0.0)
    monkeypatch.setattr(Checkpointer, "restore", flaky)
    with Checkpointer(root, max_to_keep=3) as ckpt, caplog.at_level(logging.WARNING, LOGGER):
        step, state, _ = ckpt.restore_latest(abstract)
        assert step == 3 and calls == [3, 3]
        _assert_trees_equal(state, states[3])
        assert ckpt.all_steps() == [1, 2, 3] and not list(root.glob("*.corrupt*"))
        assert any("second try" in r.getMessage() for r in caplog.records)

    for error in (MemoryError(), RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")):
        def no_memory_at_3(self, step, abstract_state, error=error):
            if step == 3:
                raise error
            return real_restore(self, step, abstract_state)

        monkeypatch.setattr(Checkpointer, "restore", no_memory_at_3)
        with Checkpointer(root, max_to_keep=3) as ckpt:
            with pytest.raises(type(error)) as info:
                ckpt.restore_latest(abstract)
            assert not isinstance(info.value, checkpointing.CheckpointRestoreError)
            assert ckpt.all_steps() == [1, 2, 3] and not list(root.glob("*.corrupt*"))


def test_no_restorable_step_is_a_clear_error_and_renames_nothing(tmp_path):
    state = _example_state()
    root = tmp_path / "ckpt"
    with Checkpointer(root) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
        ckpt.wait()
    _garble_meta(root / "1")
    _garble_meta(root / "2")
    with Checkpointer(root) as ckpt:
        with pytest.raises(CheckpointRestoreError, match=r"step 2: .*step 1: "):
            ckpt.restore_latest(jax.eval_shape(lambda: state))
        assert ckpt.all_steps() == [1, 2]


def test_a_field_the_restoring_state_lacks_is_named(tmp_path):
    """Orbax's "tree structures do not match:" was cut at its colon: the field was not named."""
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(1, {"params": jnp.ones(3), "critic": jnp.full(2, 7.0)}, force=True)
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        with pytest.raises(CheckpointRestoreError, match=r"do not match: critic: - Source: "
                                                         r"MISSING"):
            ckpt.restore_latest(jax.eval_shape(lambda: {"params": jnp.zeros(3)}))


def test_a_nonfinite_numpy_scalar_leaf_is_refused_too(tmp_path):
    """A numpy float32 scalar (np.generic: no ndarray, no Python float) was not looked at, and a
    state holding NaN there was saved."""
    assert nonfinite_leaves({"a": np.float32("nan"), "b": np.float16(1.0),
                             "c": np.array(np.inf, np.float32), "i": np.int32(3)}) == \
        ["['a']", "['c']"]
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(NonFiniteError, match=r"\['loss_scale'\]"):
            ckpt.save(1, {"w": jnp.ones(2), "loss_scale": np.float32("inf")})
        assert ckpt.all_steps() == []


def test_restore_params_refuses_a_parameter_the_checkpoint_lacks(tmp_path):
    """A model parameter the checkpoint does not hold (another architecture, or a LoRA run's
    adapters read as a whole model) came back as its ShapeDtypeStruct, so `init_from` and
    `task.policy.checkpoint` failed later and elsewhere; it is refused here, naming it."""
    with Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(1, {"params": {"w": jnp.ones((4, 8))}, "opt": jnp.zeros(3)}, {"step": 1})
    spec = jax.ShapeDtypeStruct
    want = checkpointing.local_abstract({"w": spec((4, 8), jnp.float32),
                                         "extra_bias": spec((8,), jnp.float32)})
    with pytest.raises(ValueError, match=r"step 1 holds no params\['extra_bias'\] \(it does not "
                                         r"hold parameters of this run's model\)"):
        checkpointing.restore_params(str(tmp_path / "run"), want)
    three = checkpointing.local_abstract({k: spec((2,), jnp.float32) for k in "abc"})
    with pytest.raises(ValueError, match=r"holds no params\['a'\] \(nor 2 more of this run's 3\)"):
        checkpointing.restore_params(str(tmp_path / "run"), three)
    params, step, _ = checkpointing.restore_params(
        str(tmp_path / "run"), checkpointing.local_abstract({"w": spec((4, 8), jnp.float32)}))
    assert step == 1 and np.asarray(params["w"]).tolist() == np.ones((4, 8)).tolist()


def test_restore_params_counts_the_checkpoints_parameters_it_does_not_read(tmp_path, caplog):
    """Parameters the checkpoint holds beyond the model's (a value head read by a run without
    one) are left unread, as intended, but no longer without a word: a warning counts and names
    them. A checkpoint holding exactly the model's parameters reads without one."""
    spec = jax.ShapeDtypeStruct
    with Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(1, {"params": {"w": jnp.ones((4, 8)), "head": {"v": jnp.ones(3), "b": jnp.ones(1)},
                                 "layers": [jnp.ones(2), jnp.ones(2)]},
                      "opt": jnp.zeros(3)}, {"step": 1})
    want = {"w": spec((4, 8), jnp.float32), "layers": [spec((2,), jnp.float32)] * 2}
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        params, step, _ = checkpointing.restore_params(str(tmp_path / "run"),
                                                       checkpointing.local_abstract(want))
    assert step == 1 and sorted(params) == ["layers", "w"]
    warned = [r.getMessage() for r in caplog.records if r.name == checkpointing.__name__]
    assert len(warned) == 1, warned
    assert ("checkpoint step 1 holds 2 parameter(s) this run's model does not have, not read: "
            "params['head']['b'], params['head']['v']") in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        checkpointing.restore_params(str(tmp_path / "run"), checkpointing.local_abstract(
            {**want, "head": {"v": spec((3,), jnp.float32), "b": spec((1,), jnp.float32)}}))
    assert [r.getMessage() for r in caplog.records if r.name == checkpointing.__name__] == []


def test_nonfinite_state_is_refused_and_previous_checkpoint_survives(tmp_path):
    good = _example_state()
    bad = jax.tree.map(lambda x: x, good)
    bad["params"]["w"] = good["params"]["w"].at[1, 2].set(jnp.nan)
    bad["params"]["b"] = good["params"]["b"].at[0].set(jnp.inf)  # bfloat16 inf
    assert nonfinite_leaves(good) == []
    assert nonfinite_leaves({"x": np.array([1.0, np.nan]), "y": 2.0, "z": float("inf"),
                             "i": np.array([1])}) == ["['x']", "['z']"]
    with Checkpointer(tmp_path / "ckpt", max_to_keep=1) as ckpt:
        ckpt.save(1, good)
        with pytest.raises(NonFiniteError, match=r"step 2.*\['params'\]\['b'\].*\['w'\]") as err:
            ckpt.save(2, bad)
        assert isinstance(err.value, ValueError)
        assert err.value.paths == ["['params']['b']", "['params']['w']"]
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        step, restored, _ = ckpt.restore_latest(jax.eval_shape(lambda: good))
        assert step == 1
        _assert_trees_equal(restored, good)


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(ValueError, match="step 1 is not JSON-serialisable"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"pos": np.zeros(2)})


def test_unwritable_directory_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    # Root ignores permission bits, so a path under a regular file stands in for a directory
    # that cannot be created or written (see the chmod test below for non-root users).
    with pytest.raises(WorkdirError, match=r"a_file/ckpt.*not writable"):
        check_writable(blocker / "ckpt")
    with pytest.raises(WorkdirError, match="a_file/ckpt"):
        Checkpointer(blocker / "ckpt")
    # Full-disk guard: demand more free space than any disk has.
    with pytest.raises(WorkdirError, match=r"bytes free, fewer than"):
        check_writable(tmp_path / "ok", min_free_bytes=1 << 62)
    check_writable(tmp_path / "ok")
    assert list((tmp_path / "ok").iterdir()) == []  # the probe is removed


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores permission bits; covered by the path-under-a-file case")
def test_read_only_directory_is_reported(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(WorkdirError, match="ro.*not writable"):
            check_writable(read_only)
    finally:
        read_only.chmod(0o700)


def _step_5_and_a_leftover(root, state, leftover_step: int) -> Path:
    """Step 5 of `state` committed under `root`, and the half-written temporary directory of
    `leftover_step` an interrupted save leaves (returned)."""
    with Checkpointer(root) as ckpt:
        ckpt.save(5, state)
        ckpt.wait()
    leftover = root / f"{leftover_step}.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "half_written").write_bytes(b"\0" * 100)
    return leftover


def test_leftover_temporary_directory_is_ignored_and_removed(tmp_path, caplog):
    state = _example_state()
    root = tmp_path / "ckpt"
    leftover = _step_5_and_a_leftover(root, state, 6)
    with caplog.at_level(logging.WARNING, LOGGER), Checkpointer(root) as ckpt:
        assert any("6.orbax-checkpoint-tmp" in r.getMessage() for r in caplog.records)
        assert ckpt.latest_step() == 5
        assert ckpt.restore_latest(jax.eval_shape(lambda: state)).step == 5
        ckpt.save(6, state)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 6]
    assert not leftover.exists()


# ---- kill test -------------------------------------------------------------------------------

NUM_STEPS = 24
BALLAST_FLOATS = 8_000_000  # 32 MB per save: ~0.1-0.2 s, long enough to be killed mid-save


def _load_worker():
    spec = importlib.util.spec_from_file_location("_ckpt_worker", REPO / "tests" / "_ckpt_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start_worker(workdir: Path, out: Path, stderr_path: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = xla_flags()  # one device is enough; keeps start-up short
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "_ckpt_worker.py"), str(workdir), str(NUM_STEPS),
         str(out), str(BALLAST_FLOATS)],
        stdout=subprocess.PIPE, stderr=open(stderr_path, "w"), text=True, cwd=REPO, env=env)


def _committed_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in workdir.iterdir() if p.name.isdigit())


@pytest.mark.slow  # 12-16 s here: five worker start-ups
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """SIGKILL the worker mid-save and after random delays; the resumed run ends bitwise equal."""
    expected = _load_worker().run_uninterrupted(NUM_STEPS)
    workdir, out = tmp_path / "ckpt", tmp_path / "final.npz"
    rng = random.Random(1234)
    # ("save", k): kill right after the worker announces the save of step k, while the save of
    # step k-1 is still being written in the background. ("delay", s): kill s seconds after the
    # worker's first line of output.
    plan = [("save", 6), ("delay", rng.uniform(0.2, 0.8)), ("save", 14),
            ("delay", rng.uniform(0.2, 0.8))]
    saw_uncommitted, resumed_from = False, []
    for i, (how, when) in enumerate(plan):
        before = _committed_steps(workdir) if workdir.exists() else []
        proc = _start_worker(workdir, out, tmp_path / f"stderr{i}.txt")
        first_line_at = None
        for line in proc.stdout:
            if line.startswith("RESUMED"):
                resumed_from.append(int(line.split()[1]))
            first_line_at = first_line_at or time.monotonic()
            if how == "save" and line.strip() == f"SAVING {when}":
                break
            if how == "delay" and time.monotonic() - first_line_at >= when:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, (i, proc.returncode)
        assert not out.exists()
        uncommitted = [p.name for p in workdir.iterdir() if ".orbax-checkpoint-tmp" in p.name]
        saw_uncommitted |= bool(uncommitted)
        after = _committed_steps(workdir)
        # Half-written steps never appear as committed ones; progress is never lost.
        assert not set(after) & {int(n.split(".")[0]) for n in uncommitted}
        assert max(after, default=0) >= max(before, default=0)
    assert saw_uncommitted, "no kill landed during a save; the ballast is too small to catch one"
    proc = _start_worker(workdir, out, tmp_path / "stderr_final.txt")
    lines = proc.stdout.read().splitlines()
    assert proc.wait(timeout=60) == 0, (tmp_path / "stderr_final.txt").read_text()[-2000:]
    assert lines[-1] == "DONE" and lines[0].startswith("RESUMED")
    assert len(resumed_from) >= 2
    got = dict(np.load(out))
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].tobytes() == expected[name].tobytes(), name
    # The restarted worker logged the uncommitted directories it discarded.
    logs = "".join((tmp_path / f"stderr{i}.txt").read_text() for i in range(1, len(plan)))
    logs += (tmp_path / "stderr_final.txt").read_text()
    assert "uncommitted checkpoint left by an interrupted save" in logs


@pytest.mark.parametrize("kwargs,match", [({"max_to_keep": 0}, "max_to_keep must be >= 1"),
                                          ({"save_interval_steps": 0},
                                           "save_interval_steps must be >= 1")])
def test_a_checkpointer_that_would_keep_or_save_nothing_is_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path / "ckpt", **kwargs)


def test_latest_meta_reads_the_newest_step_that_reads(tmp_path):
    """What a resume checks (seed, config) before reading any array: the newest step's, and a
    step whose meta is damaged is passed over for the next older one."""
    _, _, root = _three_saved_steps(tmp_path)
    with Checkpointer(root, max_to_keep=3) as ckpt:
        assert ckpt.latest_meta() == {"step": 3}
    _garble_meta(root / "3")
    with Checkpointer(root, max_to_keep=3) as ckpt:
        assert ckpt.latest_meta() == {"step": 2}
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_meta() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_step_damaged_again_after_its_replay_is_moved_aside_beside_the_first(tmp_path):
    """`<step>.corrupt` already held the first bad copy: the second rename must not fail on it
    (or overwrite it)."""
    states, abstract, root = _three_saved_steps(tmp_path)
    for attempt in range(2):
        _truncate_array_data(root / "3")
        with Checkpointer(root, max_to_keep=3) as ckpt:
            assert ckpt.restore_latest(abstract).step == 2
            assert ckpt.all_steps() == [1, 2]
            ckpt.save(3, states[3], {"step": 3})
            ckpt.wait()
    assert sorted(p.name for p in root.iterdir() if "corrupt" in p.name) == \
        ["3.corrupt", "3.corrupt1"]
    with Checkpointer(root, max_to_keep=3) as ckpt:
        assert ckpt.restore_latest(abstract).step == 3


def test_a_leftover_temporary_directory_of_a_step_not_saved_again_is_removed(tmp_path):
    """Orbax replaces an uncommitted directory of a step it saves again; the leftover of a step
    the resumed run does not reach again (a run resumed with fewer steps, a newer step saved
    after it) is removed all the same, by the clean-up the Checkpointer asks Orbax for."""
    state = _example_state()
    root = tmp_path / "ckpt"
    leftover = _step_5_and_a_leftover(root, state, 9)
    with Checkpointer(root) as ckpt:
        assert ckpt.all_steps() == [5]
        ckpt.save(6, state)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 6]
    assert not leftover.exists()


def test_meta_must_be_a_mapping(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        for meta in ([("step", 1)], "step=1"):
            with pytest.raises(ValueError, match="meta must be a mapping"):
                ckpt.save(1, {"x": jnp.zeros(2)}, meta)
        assert ckpt.all_steps() == []


def test_the_steps_count_for_the_preemption_service_after_the_counts_a_pass_gave(
        tmp_path, monkeypatch):
    """JAX's preemption service stops every process one past the highest count given when a
    SIGTERM came. A calibration pass gives counts before the steps; counted from 1 again, the
    steps of a job whose notice came during the pass's last round would have stopped at the
    pass's count, far past the first step. They go on from the pass's counts."""
    from jax.experimental import multihost_utils
    from infalign_jax.infra import preemption
    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda count: asked.append(count) or False)
    monkeypatch.setattr(preemption, "_ask_service", lambda count: False)
    for count in range(preemption.counts_given() + 1, preemption.counts_given() + 7):
        preemption.reached_sync_point(count)   # a pass's six chunks
    given = preemption.counts_given()
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    try:
        ckpt.count_preemption_from(4)   # resumed at step 4
        assert not ckpt.reached_preemption(5)
        assert asked == [given + 1] and preemption.counts_given() == given + 1
    finally:
        ckpt.close()


def test_the_service_is_asked_each_count_only_on_several_processes_and_off_is_no_stop(
        monkeypatch):
    """`reached_sync_point` without `ask` asks JAX's service the count it is given and returns
    its answer, on several processes only; a service that is off (JAX's RuntimeError) is no
    stop, not a crash. The highest count given is kept, whatever the order."""
    from jax.experimental import multihost_utils
    from infalign_jax.infra import preemption
    given = preemption.counts_given()
    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda count: asked.append(count) or count == given + 2)
    assert not preemption.reached_sync_point(given + 2) and asked == []   # one process
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    answers = [preemption.reached_sync_point(given + c) for c in (1, 2, 3)]
    assert answers == [False, True, False] and asked == [given + 1, given + 2, given + 3]

    def off(count):
        raise RuntimeError("Preemption sync manager has not been initialized")

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", off)
    assert preemption.reached_sync_point(given + 4) is False
    assert preemption.reached_sync_point(given + 1, ask=lambda count: True) is True
    assert preemption.counts_given() == given + 4   # a lower count does not lower it


def test_the_checkpointer_stops_at_the_step_of_the_count_the_service_picks(tmp_path,
                                                                           monkeypatch):
    """Resumed at step 4 after a pass that gave counts, the service's pick (one past the
    highest count given) is the step the Checkpointer reports as reached, and no other."""
    from jax.experimental import multihost_utils
    from infalign_jax.infra import preemption
    for count in range(preemption.counts_given() + 1, preemption.counts_given() + 4):
        preemption.reached_sync_point(count, ask=lambda c: False)   # a pass's chunks
    pick = preemption.counts_given() + 2
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda count: count == pick)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    try:
        ckpt.count_preemption_from(4)
        assert [ckpt.reached_preemption(s) for s in (5, 6, 7)] == [False, True, False]
    finally:
        ckpt.close()


def test_async_checkpoint_auto_is_asynchronous_except_on_the_cpu_and_bad_values_are_named():
    from infalign_jax.loops.train import TrainConfig
    from infalign_jax.loops.train_reward import RMTrainConfig
    assert [checkpointing.saves_asynchronously("auto", b) for b in ("cpu", "gpu", "tpu")] == \
        [False, True, True]
    for setting, want in ((True, True), ("TRUE", True), (False, False), ("false", False)):
        assert [checkpointing.saves_asynchronously(setting, b) for b in ("cpu", "gpu")] == \
            [want, want], setting
    with pytest.raises(ValueError, match=r"train.async_checkpoint must be one of .* got 'yes'"):
        checkpointing.saves_asynchronously("yes", "gpu")
    # both trainers' config sections: a flag's string (any case) or a bool, kept normalised
    for cls in (TrainConfig, RMTrainConfig):
        assert cls().async_checkpoint == "auto"
        assert [cls(async_checkpoint=v).async_checkpoint for v in ("False", True, "AUTO")] == \
            ["false", "true", "auto"]
        for bad in ("yes", 1, None):
            with pytest.raises(ValueError, match=r"^config.train.async_checkpoint must be one "
                                                 r"of \('auto', 'true', 'false'\) or a bool"):
                cls(async_checkpoint=bad)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_synchronous_save_hands_the_memory_it_freed_back(tmp_path, monkeypatch, async_save):
    """glibc kept a synchronous save's freed host copies: the SmolLM2 tiny run's peak grew step by
    step (infra/memory.py). A synchronous save trims after it commits; a background save, whose
    copies are still in use when `save` returns, does not."""
    from infalign_jax.infra import memory
    trims = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(
        sorted(p.name for p in (tmp_path / "ckpt").iterdir())))
    with Checkpointer(tmp_path / "ckpt", async_save=async_save, save_interval_steps=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, _example_state(step))
    assert trims == ([] if async_save else [["1"], ["1", "2"], ["1", "2", "4"]])
