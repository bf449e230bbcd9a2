"""What every entrypoint in experiments/ shares: argument checks, quiet logging, short errors."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from infalign_jax.infra.checkpointing import WorkdirError

# Errors that describe bad input (a config value, a data file, a work dir): reported in one line.
INPUT_ERRORS = (ValueError, WorkdirError, FileNotFoundError)


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


def start(argv: Sequence[str]) -> None:
    """No positional arguments (a mistyped flag would land there); absl logging at WARNING unless
    --verbosity is given (Orbax logs every checkpoint save at INFO); the persistent compilation
    cache on (`enable_compilation_cache`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()


def run(main: Callable[[Sequence[str]], Any]) -> None:
    """`app.run(main)`, with bad input reported as one line on stderr and exit status 2 instead of
    a long traceback (`--verbosity=1` keeps the traceback)."""
    def guarded(argv: Sequence[str]) -> Any:
        try:
            return main(argv)
        except INPUT_ERRORS as e:
            if flags.FLAGS["verbosity"].present:
                raise
            print(f"error ({type(e).__name__}): {e}\n(run with --verbosity=1 for the traceback)",
                  file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(guarded)
