"""`infra.cli`: a config file that cannot be loaded, refused in one line naming its flag."""

import os
import subprocess
import sys

import pytest

from infalign_jax.infra import cli

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_unloaded_config_is_named_by_the_flag_its_override_belongs_to(tmp_path):
    """With an override, the refusal comes from the flag parsing, which names the `--x=...` flag
    that an override `--x.key=...` reads, not another flag given before it (--workdir)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "train_policy.py"),
         f"--workdir={tmp_path / 'run'}", "--config=configs/no_such.py", "--config.rl.beta=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: --config=configs/no_such.py: the config file could not be loaded (" \
        in proc.stderr, proc.stderr
    assert "--workdir" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_unloaded_config_message_gives_the_cause_and_the_working_directory_of_a_relative_path(
        monkeypatch, tmp_path):
    """`_unloaded_message`: the cause is the error ml_collections kept (the `__cause__` of the
    "Configuration is not available" error raised when the config is read), not that wrapper;
    the working directory is named for a relative path only (with or without a `:arg`), where
    it tells the user where the file was looked for; an absolute path needs no such hint."""
    monkeypatch.chdir(tmp_path)
    try:
        try:
            raise FileNotFoundError("no such file: configs/typo.py")
        except FileNotFoundError as inner:
            raise OSError("Configuration is not available: wrapper") from inner
    except OSError as e:
        err = e
    hint = f"; a relative path is read from the working directory, {tmp_path}"
    assert cli._unloaded_message("--config=configs/typo.py:size=tiny", err) == (
        "--config=configs/typo.py:size=tiny: the config file could not be loaded "
        "(no such file: configs/typo.py)" + hint)
    assert cli._unloaded_message("--config=/abs/typo.py:size=tiny", err) == (
        "--config=/abs/typo.py:size=tiny: the config file could not be loaded "
        "(no such file: configs/typo.py)")
    # an error without a cause is reported itself, its lines joined into one
    assert cli._unloaded_message("--config=/abs/typo.py", OSError("first\n  second")) == (
        "--config=/abs/typo.py: the config file could not be loaded (first second)")


@pytest.mark.parametrize("args,wanted", [
    (["--config=a.py", "--config.rl.beta=1"], "--config=a.py"),
    # absl keeps the last of a flag given twice; the space and one-dash forms are flags too
    (["--config=a.py", "--config=b.py", "--config.rl.beta=1"], "--config=b.py"),
    (["--config", "b.py", "--config.rl.beta=1"], "--config=b.py"),
    (["-config=b.py", "-config.rl.beta=1"], "--config=b.py"),
    # the flag an override reads, not another config flag or another flag with a value
    (["--workdir=w", "--ctrl_config=c.py", "--config=b.py", "--config.rl.beta=1"],
     "--config=b.py"),
    (["--config.rl.beta=1"], "a config flag"),
])
def test_the_config_flag_an_override_reads_is_found_as_absl_reads_it(args, wanted):
    """The flag named when a config file fails to load under an override (`parse_flags`): the
    first `--x=` flag an override reads was named, so a repeated flag named the file absl did
    not read, and `--config FILE` or `-config=FILE` were "a config flag" with no hint."""
    assert cli._overridden_config_flag(["prog", *args]) == wanted


def test_a_config_file_that_fails_while_loading_is_not_reported_missing(monkeypatch, tmp_path):
    """A config file that exists but whose `get_config` raises an OSError (it opens a missing
    data file) is reported as failing while loading, with the error's own file name, and
    without the working-directory hint meant for a file that was not found; a missing file
    still gets it. Through absl and ml_collections as a run reads them (an import error in the
    file is raised by the flag parsing itself, with its traceback)."""
    from absl import flags
    from ml_collections import config_flags
    monkeypatch.chdir(tmp_path)
    (tmp_path / "opens.py").write_text(
        "def get_config():\n    open('/no/such/dir/data.json')\n")
    got = {}
    for name in ("opens.py", "missing.py"):
        holder = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=holder)
        holder(["prog", f"--config={name}"])
        with pytest.raises(OSError) as e:
            holder.config.keys()
        got[name] = cli._unloaded_message(f"--config={name}", e.value)
    hint = f"a relative path is read from the working directory, {tmp_path}"
    assert got["opens.py"].startswith("--config=opens.py: the config file failed while loading (")
    assert "/no/such/dir/data.json" in got["opens.py"] and hint not in got["opens.py"]
    assert got["missing.py"].startswith("--config=missing.py: the config file could not be "
                                        "loaded (") and got["missing.py"].endswith(hint)
    assert "missing.py" in got["missing.py"].partition("(")[2]


def _refusal(monkeypatch, spec):
    """What `refuse_unloaded_configs` raises for `--config=<spec>` (parsed as a run parses it)."""
    from absl import flags
    from ml_collections import config_flags
    holder = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=holder)
    holder(["prog", f"--config={spec}"])
    monkeypatch.setattr(flags, "FLAGS", holder)
    with pytest.raises(OSError) as e:
        cli.refuse_unloaded_configs()
    return e.value


def test_a_config_file_that_fails_while_loading_is_a_config_file_error_found_without_its_arg(
        monkeypatch, tmp_path):
    """`refuse_unloaded_configs`: a get_config that hit a PermissionError is refused as a
    `ConfigFileError` (one of INPUT_ERRORS) naming the file it could not read, and a file given
    with a config-string argument (`file.py:arg`) that exists is still "failed while loading",
    found by its path without the argument."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "denied.py").write_text(
        "def get_config(arg=None):\n"
        "    raise PermissionError(13, 'Permission denied', '/no/access/data.json')\n")
    err = _refusal(monkeypatch, "denied.py")
    assert type(err) is cli.ConfigFileError, type(err)
    assert str(err).startswith("--config=denied.py: the config file failed while loading (")
    assert "/no/access/data.json" in str(err)
    (tmp_path / "sized.py").write_text(
        "def get_config(arg=None):\n"
        "    open(f'/no/such/dir/{arg}.json')\n")
    err = _refusal(monkeypatch, "sized.py:size=tiny")
    assert str(err).startswith("--config=sized.py:size=tiny: the config file failed while "
                               "loading ("), str(err)
    assert "/no/such/dir/size=tiny.json" in str(err) and "working directory" not in str(err)


@pytest.mark.parametrize("name", ["missing.py", "denied.py"])
def test_an_unloaded_config_is_refused_as_an_input_error(monkeypatch, tmp_path, name):
    """`cli.run` reports the refusal in one line, exit status 2, only for an INPUT_ERRORS kind:
    840f86d raised ml_collections' plain OSError for a file not found (a traceback, exit 1)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "denied.py").write_text(
        "def get_config():\n    raise PermissionError(13, 'Permission denied', '/x.json')\n")
    assert isinstance(_refusal(monkeypatch, name), cli.INPUT_ERRORS)
