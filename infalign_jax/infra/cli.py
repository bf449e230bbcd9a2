"""What every entrypoint in experiments/ shares: argument checks, quiet logging, short errors."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from infalign_jax.infra import distributed, preemption
from infalign_jax.infra.checkpointing import WorkdirError
from infalign_jax.infra.config_utils import refuse_unused_overrides

# Errors that describe bad input (a config value, a data file, a work dir): reported in one line.
class ConfigFileError(OSError):
    """A config file that exists but failed while loading (its `get_config` raised an OSError)."""


INPUT_ERRORS = (ValueError, WorkdirError, FileNotFoundError, NotADirectoryError, ConfigFileError)


CACHE_ENV = "INFALIGN_JAX_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "infalign_jax", "xla")


def enable_compilation_cache(path: str | None = None, min_compile_s: float = 1.0) -> str | None:
    """Turns on JAX's persistent compilation cache, so a rerun of a config loads its programs
    instead of compiling them: at `path`, else $INFALIGN_JAX_CACHE, else ~/.cache/infalign_jax/xla
    ("off" leaves it off). Programs that took at least `min_compile_s` to compile are stored.
    Returns the directory used (None when off)."""
    import jax
    path = path or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    if path == "off":
        return None
    path = os.path.abspath(os.path.expanduser(path))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    return path


def start(argv: Sequence[str], *, processes: bool = False,
          reads: Sequence[str] | None = None) -> None:
    """No positional arguments (a mistyped flag would land there); absl logging at WARNING unless
    --verbosity is given (Orbax logs every checkpoint save at INFO); the persistent compilation
    cache on (`enable_compilation_cache`); `jax.distributed` started from the environment
    (`distributed.from_env`: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) before
    any JAX computation, with `distributed.watch_peers` stopping this process when another one
    fails. An entrypoint that does not run on several processes (`processes` False) refuses an
    environment that asks for them, naming the variables. `reads`: the config sections (key
    prefixes such as "task.") a command reads when it reads only part of its config; a flag
    outside them is refused. Config flags that `get_config` derived other keys from are refused
    alone (`refuse_stale_derived_flags`, which leaves out derived keys outside `reads`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if reads is not None:
        for name in list(flags.FLAGS):
            unread = [k for k in config_overrides(name) if not k.startswith(tuple(reads))]
            if unread:
                raise ValueError(
                    f"--{name}.{unread[0]} is not used: {os.path.basename(sys.argv[0])} reads "
                    f"only the config's {' and '.join(s.rstrip('.') for s in reads)} sections "
                    f"(give the other flags to the command that reads them)")
    # after a command's own refusals of keys it sets per run (`refuse_overrides`, called before
    # `start`), whose message says more
    refuse_stale_derived_flags(reads)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    cfg = distributed.from_env()
    if cfg.is_multi_process and not processes:
        raise ValueError(
            f"{os.path.basename(sys.argv[0])} runs as one process, but the environment asks for "
            f"several ({distributed.ENV_COORDINATOR}={cfg.coordinator_address!r}, "
            f"{distributed.ENV_NUM_PROCESSES}={cfg.num_processes}); unset them, or use "
            f"experiments/train_policy.py, train_reward.py or calibrate.py")
    if cfg.is_multi_process:
        # Orbax's barriers through the coordination service (not a device collective, which
        # CPU gloo fails when a process arrives > 30 s late)
        import orbax.checkpoint  # noqa: F401  (defines the flag)
        flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True
    distributed.initialize(cfg)
    # a peer's failure stops this process even inside a collective that will never complete
    distributed.watch_peers()


def _innermost_text(err: BaseException) -> str:
    """The message of a KeyError that ml_collections may have wrapped in an AttributeError."""
    arg: Any = err
    while isinstance(arg, BaseException):
        arg = arg.args[0] if arg.args else str(arg)
    return str(arg)


def config_key_message(argv: Sequence[str], err: BaseException) -> str:
    """One line for an override of a config key that does not exist, e.g.
    ``config key rl.bta does not exist; did you mean rl.beta?`` (ml_collections' own message is
    a quoted repr with a newline in it)."""
    text = _innermost_text(err)
    looked_up = re.search(r"Attempting to lookup: (\S+)", text)
    bad = re.match(r"'([^']+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv[1:]:
        flag, _, _ = arg.lstrip("-").partition("=")
        name, _, path = flag.partition(".")
        parts = path.split(".")
        if not path or (looked_up and path != looked_up.group(1)) or \
                (not looked_up and (not bad or bad.group(1) not in parts)):
            continue
        if looked_up:
            return f"{name} key {path} does not exist ({'.'.join(parts[:-1])} holds a value, " \
                   f"not a section)"
        fixed = [hint.group(1) if p == bad.group(1) else p for p in parts] if hint else None
        return f"{name} key {path} does not exist" + \
            (f"; did you mean {'.'.join(fixed)}?" if fixed else "")
    return f"config key {bad.group(1) if bad else text.splitlines()[0]!s} does not exist"


def _overrides(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
    """(argument, dotted key) of each ``--<name>.<key>[=value]`` argument, in order."""
    out = []
    for arg in argv[1:]:
        flag = arg.lstrip("-").partition("=")[0]
        if arg.startswith("--") and flag.startswith(f"{name}."):
            out.append((arg, flag[len(name) + 1:]))
    return out


def refuse_overrides(name: str, keys: Sequence[str], why: str) -> None:
    """Refuses a ``--<name>.<key>`` flag for a key the command sets itself (it would be accepted
    and then replaced): `keys` are dotted keys, or sections ending in "."; `why` says who sets
    them. The keys are absl's parsed overrides (`config_overrides`), so a single-dash flag or
    one from a --flagfile is checked too (a scan of sys.argv for "--" missed both)."""
    for key in config_overrides(name):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            raise ValueError(f"--{name}.{key} is not used: {why}, so the value given would be "
                             f"replaced; leave it out")


def _verbose(argv: Sequence[str]) -> bool:
    return any(re.match(r"-{1,2}(verbosity|v)(=|$)", a) for a in argv[1:])


def _key_error_exit(argv: Sequence[str], err: BaseException) -> None:
    """Reports a config key that does not exist in one line and exits with status 2."""
    print(f"error: {config_key_message(argv, err)}\n(run with --verbosity=1 for the "
          f"traceback)", file=sys.stderr, flush=True)
    sys.exit(2)


def _unresolved_override(argv: Sequence[str], name: str, default: str) -> str | None:
    """The first ``--<name>.<path>`` argument whose path the config does not hold (ml_collections
    names only the missing key's last part, which a valid override may share), or None when the
    config cannot be loaded here or every path resolves."""
    from infalign_jax.infra.config_utils import load_config_module
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{name}=")), default)
    path, _, arg = spec.partition(":")
    try:
        module = load_config_module(path)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001  (the flag's own loading reports the file's problems)
        return None
    return next((arg for arg, key in _overrides(argv, name) if not _holds(config, key)), None)


def define_config(name: str, default: str, help_string: str) -> Any:
    """`config_flags.DEFINE_config_file(name, default, help_string)`. ml_collections loads the
    default file and applies its ``--<name>.*`` overrides from sys.argv right here, at import
    time, so a typo in one is reported here, as `parse_flags` reports it for a given file."""
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file(name, default, help_string)
    except (AttributeError, KeyError) as e:
        if _verbose(sys.argv):
            raise
        bad = _unresolved_override(sys.argv, name, default)
        _key_error_exit(sys.argv if bad is None else [sys.argv[0], bad], e)


def parse_flags(argv: Sequence[str]) -> Any:
    """absl's flag parsing, with an override of a config key that does not exist (a typo such as
    ``--config.rl.bta=1``) reported in one line, exit status 2 (`config_key_message`)."""
    try:
        return app.parse_flags_with_usage(list(argv))
    except OSError as e:
        # an override of a config whose file could not be loaded (`refuse_unloaded_configs`
        # reports the file when no override reads it)
        if _verbose(argv):
            raise
        print(f"error: {_unloaded_message(_overridden_config_flag(argv), e)}\n(run with "
              f"--verbosity=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        if _verbose(argv):
            raise
        for name in dict.fromkeys(a[2:].split(".", 1)[0] for a in argv[1:]
                                  if a.startswith("--") and "." in a.partition("=")[0]):
            flag = flags.FLAGS[name] if name in flags.FLAGS else None
            default = (getattr(flag, "default_as_str", None) or "").strip("'\"") or None
            bad = _unresolved_override(argv, name, default) if isinstance(default, str) else None
            if bad is not None:
                _key_error_exit([argv[0], bad], e)
        _key_error_exit(argv, e)


def config_overrides(name: str) -> list[str]:
    """The keys ``--<name>.<key>=...`` flags set on config flag `name` (none when the flag has no
    value: a config flag whose default is None and that was not given)."""
    if flags.FLAGS[name].value is None:
        return []
    return list(getattr(flags.FLAGS[name], "override_values", None) or ())


def refuse_unloaded_configs() -> None:
    """Refuses a config flag whose file could not be loaded (``--config=configs/typo.py``), naming
    the flag and the reason. ml_collections keeps such a flag's error until the config is first
    read, deep inside the run, as an OSError with a traceback."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if not hasattr(type(flag), "config_filename") or flag.value is None:
            continue
        spec = flag.config_filename
        try:
            getattr(flag.value, "keys", None)
        except OSError as e:
            # one of INPUT_ERRORS, so that cli.run reports it in one line (ml_collections keeps
            # a plain OSError for a file not found, and a get_config may raise any OSError)
            kind = ConfigFileError if _config_file_exists(spec) else FileNotFoundError
            raise kind(_unloaded_message(f"--{name}={spec}", e)) from e


def _overridden_config_flag(argv: Sequence[str]) -> str:
    """``--name=file`` of the last config flag given (``--name=file``, ``--name file`` or one
    dash, as absl reads them; the last one given is the one absl keeps) among those an override
    ``--name.key=...`` reads; "a config flag" when none is found."""
    names = {a.lstrip("-").split("=", 1)[0].split(".", 1)[0] for a in argv[1:]
             if a.startswith("-") and "." in a.lstrip("-").split("=", 1)[0]}
    found = None
    for i, a in enumerate(argv[1:], start=1):
        name, eq, value = a.lstrip("-").partition("=")
        if not a.startswith("-") or name not in names:
            continue
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value, eq = argv[i + 1], "="
        if eq:
            found = f"--{name}={value}"
    return found or "a config flag"


def _config_file_exists(spec: str) -> bool:
    """Whether a config flag's value (``file.py`` or ``file.py:arg``) names a file that exists:
    then it failed while loading, rather than not being found."""
    path = spec.partition(":")[0]
    return bool(path) and os.path.isfile(path)


def _unloaded_message(flag: str, err: OSError) -> str:
    """One line for a config flag whose file did not load: the error ml_collections kept (the
    cause of its "not available" error; an OSError's text names the file it was about); for a
    file that exists, that it failed while loading (its `get_config` raised), else where a
    relative path was looked for."""
    cause = " ".join(str(err.__cause__ or err).split())
    spec = flag.partition("=")[2]
    if _config_file_exists(spec):
        return f"{flag}: the config file failed while loading ({cause})"
    path = spec.partition(":")[0]
    where = (f"; a relative path is read from the working directory, {os.getcwd()}"
             if path and not os.path.isabs(path) else "")
    return f"{flag}: the config file could not be loaded ({cause}){where}"


def refuse_unused_flags(skip: Sequence[str] = ()) -> None:
    """Refuses a ``--config.rl.<option>`` flag the resolved config does not read (e.g.
    ``--config.rl.ppo_clip=0.1`` while ``rl.algorithm`` is 'rloo'), naming the setting that would
    read it (`config_utils.refuse_unused_overrides`). Config flags in `skip` are left to the
    entrypoint (a sweep checks them against each point's config)."""
    for name in list(flags.FLAGS):
        keys = config_overrides(name)
        if keys and flags.FLAGS[name].value is not None and name not in skip:
            refuse_unused_overrides(flags.FLAGS[name].value, keys, f"--{name}.")


def refuse_stale_derived_flags(reads: Sequence[str] | None = None) -> None:
    """Refuses a ``--<name>.<key>`` flag for a key from which the config file's `get_config`
    derived others (its module's ``FLAG_DERIVED``: key -> (the config-string argument that sets
    it, {derived key: the argument that sets that key itself, or None})), unless each derived
    key is set by a flag too, by its own argument, or (`reads`: the key prefixes the command
    reads) not read: the flag changes the key after `get_config` ran, so the derived values would
    stay those of the argument (e.g. ``--config.train.num_steps`` leaving a learning-rate decay
    over the file's default steps)."""
    from infalign_jax.infra.config_utils import arg_keys, load_config_module
    for name in list(flags.FLAGS):
        keys = set(config_overrides(name))
        spec = getattr(flags.FLAGS[name], "config_filename", None) if keys else None
        if not isinstance(spec, str) or flags.FLAGS[name].value is None:
            continue
        path, _, given = spec.partition(":")
        try:
            module = load_config_module(path)
        except Exception:  # noqa: BLE001  (the flag's own loading reports the file's problems)
            continue
        config, written = flags.FLAGS[name].value, arg_keys(given)
        for key, (arg, derived) in getattr(module, "FLAG_DERIVED", {}).items():
            left = [d for d, own in derived.items()
                    if d not in keys and own not in written and _holds(config, d)
                    and (reads is None or d.startswith(tuple(reads)))]
            if key in keys and left:
                # the argument's value replaced where the string gives it (twice is refused)
                items = [f"{arg}=VALUE" if item.split("=", 1)[0].strip() == arg else item
                         for item in given.split(",") if item.strip()]
                if arg not in written:
                    items.append(f"{arg}=VALUE")
                raise ValueError(
                    f"--{name}.{key} changes a value that {os.path.basename(path)}'s get_config "
                    f"derived {', '.join(left)} from (its config-string argument {arg!r}), after "
                    f"it ran, so they would keep the argument's values; write "
                    f"--{name}={path}:{','.join(items)} instead (or set {', '.join(left)} too)")


def _holds(config: Any, dotted: str) -> bool:
    """Whether `config` holds the dotted key (every part a key of the section above it)."""
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


def run(main: Callable[[Sequence[str]], Any], *, overrides_checked_by_main: Sequence[str] = ()
        ) -> None:
    """`app.run(main)`, with bad input reported as one line on stderr and exit status 2 instead of
    a long traceback (`--verbosity=1` keeps the traceback): config keys that do not exist
    (`parse_flags`), overrides the run would not read (`refuse_unused_flags`), bad values, data
    files and work dirs (`INPUT_ERRORS`). Any error is first reported to the other processes of a
    multi-process job (`distributed.report_failure`), which stop waiting for this one.
    `overrides_checked_by_main`: config flags whose overrides `main` checks itself."""
    def guarded(argv: Sequence[str]) -> Any:
        try:
            refuse_unloaded_configs()
            refuse_unused_flags(skip=overrides_checked_by_main)
            return main(argv)
        except BaseException as e:
            # on several processes, peers waiting for this one stop at once, naming the error
            # (a preempted job's processes all stop at the step they agreed on)
            if not (isinstance(e, SystemExit) and e.code in (0, None)
                    or isinstance(e, preemption.Preempted)):
                distributed.report_failure(e)
            if not isinstance(e, INPUT_ERRORS) or flags.FLAGS["verbosity"].present:
                raise
            print(f"error ({type(e).__name__}): {e}\n(run with --verbosity=1 for the traceback)",
                  file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(guarded, flags_parser=parse_flags)
