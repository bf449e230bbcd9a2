"""What every entrypoint in experiments/ does first: refuse stray arguments, quiet absl logging."""

from __future__ import annotations

from typing import Sequence

from absl import app, flags, logging


def start(argv: Sequence[str]) -> None:
    """No positional arguments (a mistyped flag would land there); absl logging at WARNING unless
    --verbosity is given (Orbax logs every checkpoint save at INFO)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
