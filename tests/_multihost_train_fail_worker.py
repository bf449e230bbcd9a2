"""`experiments/train_policy.py`, unchanged, as one process of a two-process job in which process
$FAIL_PROCESS raises when it builds the batch of step $FAIL_STEP: its peer is then blocked in the
training step's cross-process collective (`distributed.watch_peers` must stop it)."""

from __future__ import annotations

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from infalign_jax.loops import train

    batch = train.step_batch
    fail_process, fail_step = int(os.environ["FAIL_PROCESS"]), int(os.environ["FAIL_STEP"])

    def step_batch(*args, **kwargs):
        if int(os.environ["JAX_PROCESS_ID"]) == fail_process and args[-1] == fail_step:
            raise ValueError(f"process {fail_process} fails at step {fail_step}")
        return batch(*args, **kwargs)

    train.step_batch = step_batch
    script = os.path.join(ROOT, "experiments", "train_policy.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
