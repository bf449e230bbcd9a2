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


def test_untracked_sources_make_the_git_state_dirty(tmp_path):
    """An untracked module the run imports was not counted (`--untracked-files=no`): a run of
    code the revision lacks was recorded clean."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "infalign_jax").mkdir()
    (tmp_path / "infalign_jax" / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("runs/\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
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
