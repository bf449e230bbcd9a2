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

The reference table's pass stops between its chunks too, when it keeps a partial file
(`calibration_pass.run_calibration`; `Preempted(None)`: no training step): one process through
`sigterm_noted`, several through JAX's service, its chunk rounds counted like steps. Elsewhere
(loading, the final evaluation) SIGTERM acts as always.

JAX's service agrees on a count, not a step: every process gives it a count at each point where
it could stop (`reached_sync_point`), and after a SIGTERM to any of them it picks one past the
highest count given so far, where all stop. The counts must therefore rise through the whole
process, the same on every process: the pass's rounds take the first ones, and the training
steps go on from there (`counts_given`, which `Checkpointer.count_preemption_from` starts at).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

import jax
from jax.experimental import multihost_utils

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


_GIVEN = [0]   # the highest count this process has given JAX's preemption service


def counts_given() -> int:
    """The highest count this process has given JAX's preemption service (0: none yet)."""
    return _GIVEN[0]


def _ask_service(count: int) -> bool:
    if jax.process_count() == 1:
        return False
    try:
        return bool(multihost_utils.reached_preemption_sync_point(count))
    except RuntimeError:   # the service is off (jax_enable_preemption_service=False)
        return False


def reached_sync_point(count: int, ask: Callable[[int], bool] | None = None) -> bool:
    """Whether `count` is where every process of a multi-process job stops after a SIGTERM to
    any of them (JAX's preemption service: one past the highest count any process had given when
    the notice came); always False on one process. Every process must give the same counts in
    the same order, rising. `ask` replaces the service's own question (Orbax's manager asks it
    its own way); the count is recorded either way (`counts_given`)."""
    _GIVEN[0] = max(_GIVEN[0], int(count))
    return bool((ask or _ask_service)(int(count)))
