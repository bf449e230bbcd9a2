"""Run manifests carry config, seeds, versions, devices, git state and input hashes."""

import hashlib
import json
import os
import subprocess

import jax
import ml_collections
import numpy as np
import pytest

from infalign_jax.infra import provenance


def test_manifest_contents(tmp_path):
    data = tmp_path / "table.npz"
    data.write_bytes(b"reference table bytes")
    cfg = ml_collections.ConfigDict({"transform": {"name": "exp", "t": 4.0}, "seed": 3})
    path = provenance.write_manifest(str(tmp_path / "out"), cfg, seeds={"seed": 3},
                                     inputs={"reference_table": str(data)},
                                     started="2026-01-01T00:00:00+00:00")
    m = json.loads(open(path).read())
    assert m["config"] == {"transform": {"name": "exp", "t": 4.0}, "seed": 3}
    assert m["seeds"] == {"seed": 3}
    assert m["inputs"]["reference_table"]["sha256"] == hashlib.sha256(b"reference table bytes").hexdigest()
    assert m["devices"]["device_count"] == 8  # conftest forces 8 CPU devices
    assert m["packages"]["jax"] is not None
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:
        assert m["git"]["revision"] == head
        assert isinstance(m["git"]["dirty"], bool)
    assert not (tmp_path / "out" / "manifest.json.tmp").exists()



def test_manifest_records_the_environment_that_changes_the_numbers(tmp_path, monkeypatch):
    """XLA_FLAGS (e.g. --xla_backend_optimization_level=0) change a run's metrics bitwise (an
    exact-task run: grad_norm 12.310634 against 12.310628 at step 1) while the manifests of the
    two runs were equal in every field; the XLA_ / JAX_ variables are recorded."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "not recorded")
    m = json.loads(open(provenance.write_manifest(str(tmp_path), {"seed": 0})).read())
    assert m["environment"]["XLA_FLAGS"] == "--xla_backend_optimization_level=0"
    assert m["environment"]["JAX_DEFAULT_MATMUL_PRECISION"] == "highest"
    assert "HOME_OF_SOMETHING_ELSE" not in m["environment"]


def test_manifest_records_numpy_numbers_as_numbers(tmp_path):
    """The validators take numpy scalars, but the manifest wrote them as "np.int64(64)" strings,
    and a numpy seed raised TypeError (no manifest written)."""
    cfg = ml_collections.ConfigDict({"batch_size": np.int64(64), "lr": np.float32(1e-3),
                                     "flag": np.bool_(True), "name": "x"})
    path = provenance.write_manifest(str(tmp_path / "out"), cfg, seeds={"seed": np.int64(0)})
    m = json.loads(open(path).read())
    assert m["config"]["batch_size"] == 64 and isinstance(m["config"]["batch_size"], int)
    assert m["config"]["lr"] == pytest.approx(1e-3) and m["config"]["flag"] is True
    assert m["seeds"] == {"seed": 0}


def test_is_number_refuses_an_int_past_float_range():
    from infalign_jax.infra import validate
    assert not validate.is_number(10 ** 400)      # raised OverflowError, not a named refusal
    assert validate.is_number(10 ** 300) and validate.is_number(np.float32(2.0))


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path):
    from infalign_jax.infra.files import atomic_open, write_json
    path = tmp_path / "summary.json"
    write_json(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write('{"a": 2')          # torn write, then the run dies
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]   # no temporary left
    write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}


def test_an_npz_is_written_whole_or_not_at_all(tmp_path):
    import numpy as np
    from infalign_jax.infra.files import write_npz
    path = tmp_path / "table.npz"
    write_npz(str(path), x=np.arange(3))

    class KilledMidway:   # the archive's second member fails after the first is written
        def __array__(self, *args, **kwargs):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_npz(str(path), x=np.arange(5), y=KilledMidway())
    with np.load(path) as z:
        assert z.files == ["x"] and z["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["table.npz"]   # no temporary left
    with pytest.raises(ValueError, match="'.npz'"):   # np.savez would write elsewhere: table.npz
        write_npz(str(tmp_path / "table"), x=np.arange(3))


def test_a_figure_is_saved_whole_or_not_at_all(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from infalign_jax.infra.files import save_figure
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "curves.png"
    save_figure(fig, str(path), dpi=50)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG")   # the format from the extension, not the temp name
    plt.close(fig)

    class KilledWhileSaving:
        def savefig(self, where, **kwargs):
            with open(where, "wb") as f:
                f.write(b"\x89PNG torn")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_figure(KilledWhileSaving(), str(path))
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]   # no temporary left


def test_progress_rate_and_eta_leave_out_the_compiling_first_step(monkeypatch):
    from infalign_jax.infra import metrics_io
    clock = iter([0.0, 60.0, 70.0])   # construction; step 1 after 60 s compiling; step 11 10 s on
    monkeypatch.setattr(metrics_io.time, "perf_counter", lambda: next(clock))
    progress = metrics_io.Progress(total=101)
    assert "60.0s to step 1 (compiling) eta ?" in progress.line(1, {})
    # 10 steps in 10 s: 1 it/s, 90 steps left -> 1m30s (a rate that counted the compile would
    # say 0.16 it/s and 9 minutes).
    assert "1.00 it/s eta 1m30s" in progress.line(11, {})


def test_files_named_by_a_writer_are_moved_in_whole_or_not_at_all(tmp_path):
    from infalign_jax.infra.files import atomic_files_into
    out = tmp_path / "export"
    with atomic_files_into(str(out)) as tmp:
        (tmp_path / "export" / "old.txt").write_text("kept")
        os.makedirs(os.path.join(tmp, "sub"))
        for name in ("a.json", os.path.join("sub", "b.txt")):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("first")
    assert (out / "a.json").read_text() == "first" and (out / "sub" / "b.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_files_into(str(out)) as tmp:
            with open(os.path.join(tmp, "a.json"), "w") as f:
                f.write("torn")
            raise RuntimeError("killed")
    assert (out / "a.json").read_text() == "first" and (out / "old.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]   # no temporary left



def test_params_digest_is_content_and_layout():
    import jax.numpy as jnp
    from infalign_jax.infra.provenance import params_digest
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.zeros(4, np.int32)}}
    d = params_digest(tree)
    assert len(d) == 64 and d == params_digest(jax.tree.map(jnp.asarray, tree))  # host or device
    changed = jax.tree.map(np.copy, tree)
    changed["a"][1, 2] += 1e-6
    variants = [changed,
                {**tree, "a": tree["a"].reshape(3, 2)},                       # same bytes, shape
                {**tree, "b": {"c": np.zeros(4, np.float32)}},                # same bytes, dtype
                {"a2": tree["a"], "b": tree["b"]}]                            # same bytes, key
    assert len({d, *(params_digest(v) for v in variants)}) == 1 + len(variants)
    skip_b = params_digest(tree, skip=lambda path: path[0].key == "b")
    assert skip_b == params_digest({"a": tree["a"]}) != d
    assert params_digest({"s": np.float32(2.0)}) != params_digest({"s": np.asarray([2.0],
                                                                                    np.float32)})


def _committed_repo(path, ignore: str) -> None:
    """A git repository at `path` with one commit: infalign_jax/a.py and a .gitignore of
    `ignore`."""
    def git(*args):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)

    git("init", "-q")
    (path / "infalign_jax").mkdir()
    (path / "infalign_jax" / "a.py").write_text("x = 1\n")
    (path / ".gitignore").write_text(ignore + "\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")


def test_untracked_sources_make_the_git_state_dirty(tmp_path):
    """An untracked module the run imports was not counted (`--untracked-files=no`): a run of
    code the revision lacks was recorded clean."""
    _committed_repo(tmp_path, ignore="runs/")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "out.py").write_text("")        # ignored
    (tmp_path / "notes.py").write_text("")               # outside the source dirs
    assert provenance.git_state(str(tmp_path))["dirty"] is False
    (tmp_path / "infalign_jax" / "new_module.py").write_text("y = 2\n")
    state = provenance.git_state(str(tmp_path / "infalign_jax"))
    assert state["dirty"] is True and state["untracked_sources"] == ["infalign_jax/new_module.py"]


def test_a_manifest_written_at_the_start_does_not_say_it_finished(tmp_path):
    m = provenance.build_manifest({"a": 1}, with_devices=False, finished=False)
    assert m["finished"] is None
    assert provenance.build_manifest({"a": 1}, with_devices=False)["finished"] is not None


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """mkstemp creates its file 0600: an output renamed from it as it is was unreadable to the
    group and others (a shared results directory), unlike a file written with open()."""
    from infalign_jax.infra.files import atomic_open, write_json
    old = os.umask(0o022)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        write_json(str(tmp_path / "summary.json"), {"a": 1})
        with atomic_open(str(tmp_path / "table.bin"), "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o644
    for name in ("summary.json", "table.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name


def test_atomic_open_refuses_an_append_or_read_mode(tmp_path):
    """Appending through a temporary file would replace the file with the appended part alone."""
    from infalign_jax.infra.files import atomic_open
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    for mode in ("a", "r", "w+"):
        with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
            with atomic_open(str(path), mode):
                pass
    assert path.read_text() == '{"step": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_refused_start_removes_the_directories_it_created_and_no_file(tmp_path):
    from infalign_jax.infra.files import no_empty_dirs_left
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "kept.txt").write_text("before")
    workdir = tmp_path / "runs" / "sweep" / "point" / "run"
    with pytest.raises(RuntimeError):
        with no_empty_dirs_left(str(workdir)):
            os.makedirs(workdir / "checkpoints" / "tmp")
            raise RuntimeError("refused at start-up")
    # every directory the run created is gone, up to the one that existed before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kept.txt"]
    with pytest.raises(RuntimeError):
        with no_empty_dirs_left(str(workdir)):
            os.makedirs(workdir / "checkpoints")
            (workdir / "manifest.json").write_text("{}")
            raise RuntimeError("refused after writing a file")
    # a directory holding a file stays, with the file; only the empty one goes
    assert (workdir / "manifest.json").read_text() == "{}"
    assert not (workdir / "checkpoints").exists()
    assert (tmp_path / "runs" / "kept.txt").read_text() == "before"
    with no_empty_dirs_left(str(tmp_path / "ok")):   # no exception: nothing removed
        os.makedirs(tmp_path / "ok")
    assert (tmp_path / "ok").is_dir()


def test_the_manifest_records_the_versions_of_every_package_that_changes_the_numbers(tmp_path):
    import importlib.metadata
    m = provenance.build_manifest({"a": 1}, with_devices=False)
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert m["packages"][name] == importlib.metadata.version(name), name


def test_a_manifest_records_the_command_its_tuple_config_values_and_all_device_kinds(tmp_path):
    import sys
    cfg = ml_collections.ConfigDict({"mesh": {"shape": (2, 4)}, "ks": [1, 2]})
    m = provenance.build_manifest(cfg)
    assert m["config"] == {"mesh": {"shape": [2, 4]}, "ks": [1, 2]}   # numbers, not "(2, 4)"
    assert m["argv"] == sys.argv
    assert sum(m["devices"]["kinds"].values()) == len(jax.devices())


def test_manifest_input_hashes_read_the_whole_file_and_record_absolute_paths(tmp_path,
                                                                            monkeypatch):
    data = os.urandom(3 * 1024 + 5)
    (tmp_path / "table.npz").write_bytes(data)
    assert provenance.file_sha256(str(tmp_path / "table.npz"), chunk=1024) == \
        hashlib.sha256(data).hexdigest()
    monkeypatch.chdir(tmp_path)
    m = provenance.build_manifest(None, with_devices=False,
                                  inputs={"reference_table": "table.npz",
                                          "not_there": "missing.npz"})
    assert m["inputs"] == {"reference_table": {"path": str(tmp_path / "table.npz"),
                                               "sha256": hashlib.sha256(data).hexdigest()}}


def test_git_state_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))   # no repository above
    assert provenance.git_state(str(tmp_path)) == {"revision": None, "dirty": None}


def test_a_changed_tracked_file_makes_the_git_state_dirty_other_untracked_files_do_not(tmp_path):
    _committed_repo(tmp_path, ignore="infalign_jax/generated_*.py")
    (tmp_path / "infalign_jax" / "notes.txt").write_text("")            # not a source file
    (tmp_path / "infalign_jax" / "generated_table.py").write_text("")   # ignored
    assert provenance.git_state(str(tmp_path)) == {
        "revision": subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, text=True,
                                   capture_output=True).stdout.strip(),
        "dirty": False}
    (tmp_path / "infalign_jax" / "a.py").write_text("x = 2\n")          # a tracked change
    assert provenance.git_state(str(tmp_path))["dirty"] is True


def _metrics_rows(path):
    with open(path) as f:
        return f.read()


def test_truncate_after_drops_the_resumed_steps_and_a_torn_line(tmp_path):
    """On resume from step 3 the rows of steps >= 4 that a killed run wrote are dropped, with
    the torn line it left; a row whose newline the kill cut off is kept whole."""
    from infalign_jax.infra.metrics_io import read_jsonl, truncate_after
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x": 3}')
    assert truncate_after(str(path), 4) == 0
    with open(path, "a") as f:   # the resumed run appends
        f.write('{"step": 4, "x": 4}\n')
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3, 4]
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n{"step": 5, "x"')
    assert truncate_after(str(path), 3) == 3
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert truncate_after(str(tmp_path / "absent.jsonl"), 1) == 0
    assert not (tmp_path / "absent.jsonl").exists()


def test_read_jsonl_skips_only_the_torn_line(tmp_path):
    from infalign_jax.infra.metrics_io import read_jsonl
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 3]


def test_metrics_rows_are_flushed_and_nonfinite_values_stay_json(tmp_path):
    import math
    from infalign_jax.infra.metrics_io import MetricsWriter
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": float("nan"), "kl": np.float32(np.inf), "n": np.int32(3)})
    # read while the writer is open: a run killed now keeps the row
    line = (tmp_path / "metrics.jsonl").read_text()
    writer.close()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert row["step"] == 1 and row["n"] == 3 and isinstance(row["n"], int)
    assert math.isnan(float(row["loss"])) and float(row["kl"]) == math.inf


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_truncate_stream_drops_the_resumed_steps_of_its_own_stream_only(tmp_path):
    """A killed run wrote steps 1-5 of "metrics" and an evaluation at step 4; resuming from step 3
    drops metrics >= 4 and evaluations >= 4 (both streams' JSONL and TensorBoard events), keeps
    the rest, and a file of events left with no scalar is removed."""
    from infalign_jax.infra.metrics_io import MetricsWriter, read_jsonl, truncate_stream
    with MetricsWriter(str(tmp_path), "metrics") as metrics, \
            MetricsWriter(str(tmp_path), "eval") as evals:
        for step in range(1, 6):
            metrics.write(step, {"loss": float(step)})
        evals.write(4, {"exact_kl": 0.5})
    truncate_stream(str(tmp_path), "metrics", 4)
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]
    assert _scalars(tmp_path / "tb", "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert _scalars(tmp_path / "tb", "eval/exact_kl") == [(4, 0.5)]   # another stream: kept
    truncate_stream(str(tmp_path), "eval", 5)
    assert _scalars(tmp_path / "tb", "eval/exact_kl") == [(4, 0.5)]
    truncate_stream(str(tmp_path), "eval", 4)
    assert read_jsonl(str(tmp_path / "eval.jsonl")) == []
    assert _scalars(tmp_path / "tb", "eval/exact_kl") == []
    assert not [f for f in os.listdir(tmp_path / "tb") if f.endswith(".eval")]
    assert _scalars(tmp_path / "tb", "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    with MetricsWriter(str(tmp_path), "metrics") as metrics:   # the resumed run
        metrics.write(4, {"loss": 4.5})
    assert _scalars(tmp_path / "tb", "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5)]
