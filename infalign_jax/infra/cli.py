"""What every entrypoint in experiments/ shares: argument checks, quiet logging, short errors."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from infalign_jax.infra.checkpointing import WorkdirError

# Errors that describe bad input (a config value, a data file, a work dir): reported in one line.
INPUT_ERRORS = (ValueError, WorkdirError, FileNotFoundError)


def start(argv: Sequence[str]) -> None:
    """No positional arguments (a mistyped flag would land there); absl logging at WARNING unless
    --verbosity is given (Orbax logs every checkpoint save at INFO)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


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
