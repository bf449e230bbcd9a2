"""Stopping a run cleanly when its scheduler asks, by SIGTERM, during the training steps.

Schedulers send SIGTERM some time before SIGKILL: SLURM's preemption and `scancel`, Kubernetes'
pod termination, a spot VM's shutdown. Python's default action ends the process at once, and the
steps since the last checkpoint are lost. Inside `sigterm_noted()` (the run loop's steps):

* one process: the signal is noted; the loop finishes the step it is in, saves that step's
  checkpoint, and raises `Preempted` (a SystemExit with status 143 = 128 + SIGTERM, what a shell
  reports for a process SIGTERM ended). Rerunning the same command resumes from that step. A
  second SIGTERM ends the process at once, as without the handler.
* several processes (`jax.distributed`): JAX's preemption service catches SIGTERM itself and
  agrees with every process on one step at which all save (Orbax's `reached_preemption`, which
  `Checkpointer.reached_preemption` asks); the loop stops after that save. No handler is
  installed here then: it would replace JAX's.

The reference table's pass uses it too, between its chunks, when it keeps a partial file
(`calibration_pass.run_calibration`, one process only; `Preempted(None)`: no training step).
Elsewhere (loading, the final evaluation) SIGTERM acts as always.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

import jax

EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(SystemExit):
    """A run stopped by SIGTERM after saving the checkpoint of `step` (None: stopped before its
    steps, in the reference table's pass, whose partial file holds what it drew); exit status
    143."""

    def __init__(self, step: int | None):
        super().__init__(EXIT_STATUS)
        self.step = step


@contextlib.contextmanager
def sigterm_noted() -> Iterator[Callable[[], bool]]:
    """Within, a SIGTERM to this (single-process) job is noted instead of ending it; yields
    `requested()`, whether one came. Elsewhere (several processes, or not the main thread, where
    Python cannot install a handler) `requested()` is always False. The previous handler is put
    back on exit."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    noted = []

    def handler(signum, frame):
        if noted:   # a second SIGTERM: the default action, now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        noted.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda: bool(noted)
    finally:
        # None: a handler installed outside Python, which cannot be put back from here
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
