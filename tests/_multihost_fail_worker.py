"""One of two processes of a job started from the environment (`cli.start`), in which process
--fail raises before meeting its peer at --at ("barrier" or "from_primary"), through `cli.run` as
every entrypoint does. The peer must stop waiting at once, naming the error. With --late_s the
process comes late instead, for the peer's timeout; with --kill it kills itself (SIGKILL), which
reports nothing, for the coordination service's heartbeat timeout."""

from __future__ import annotations

import os
import signal
import time

import jax
from absl import flags

from infalign_jax.infra import cli, distributed

_FAIL = flags.DEFINE_integer("fail", 1, "the process that fails")
_AT = flags.DEFINE_enum("at", "barrier", ["barrier", "from_primary"], "where the peer waits")
_TIMEOUT = flags.DEFINE_float("timeout_s", 300.0, "how long the peer would wait")
_LATE = flags.DEFINE_float("late_s", 0.0, "> 0: process --fail comes this late instead of failing")
_KILL = flags.DEFINE_bool("kill", False, "process --fail kills itself (SIGKILL) instead of failing")


def main(argv):
    cli.start(argv, processes=True)
    if jax.process_index() == _FAIL.value and _LATE.value > 0:
        time.sleep(_LATE.value)
    elif jax.process_index() == _FAIL.value and _KILL.value:
        os.kill(os.getpid(), signal.SIGKILL)
    elif jax.process_index() == _FAIL.value:
        raise ValueError(f"process {_FAIL.value} fails before the {_AT.value}")
    if _AT.value == "barrier":
        distributed.barrier("meet", timeout_s=_TIMEOUT.value)
    else:
        distributed.from_primary("value", lambda: 1, timeout_s=_TIMEOUT.value)
    print("passed the meeting point", flush=True)


if __name__ == "__main__":
    cli.run(main)
