"""One process of a two-process calibration pass; driven by
`tests/test_multihost.py::test_two_processes_share_the_calibration_pass`.

Usage::

    python tests/_multihost_calibration_worker.py --process_id I --port P --out DIR

Each process draws its share of the prompt batches of `tests/test_calibration_pass.py`'s tiny
decoder (batch sizes 1 and 2), and the processes exchange their rows; each writes the table it
returned to DIR/table_p<I>_bp<batch_prompts>.npz and what it drew to a log. It then builds the
exact task's table through `train.prepare_reference_table` (process 0 writes it) and, after a
barrier, reloads it from the shared directory.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import _multihost_pair  # noqa: E402


def the_pass(batch_prompts: int, **kwargs):
    """`tests/test_calibration_pass.py`'s tiny pass (its `_run`: k = 7, 3 samples a chunk) with
    its count reward, as each process runs it here; on one process, the table the two must both
    return."""
    import test_calibration_pass as tc
    return tc._run(reward_fn=tc.count_reward, batch_prompts=batch_prompts, **kwargs)


def main() -> None:
    args = _multihost_pair.start()
    import numpy as np

    from infalign_jax.infra.config_utils import load_config_module
    from infalign_jax.loops import train
    from infalign_jax.rl.tasks import exact as exact_tasks

    pid, lines = args.process_id, []
    for bp in (1, 2):
        table = the_pass(bp, partial_path=os.path.join(args.out, f"partial_bp{bp}.npz"),
                         progress=lines.append)
        np.savez(os.path.join(args.out, f"table_p{pid}_bp{bp}.npz"),
                 sorted_rewards_BxK=table.sorted_rewards_BxK, counts_B=table.counts_B,
                 processes=table.created["processes"])
    from infalign_jax.core import calibration
    saves, save = [], calibration.ReferenceTable.save
    calibration.ReferenceTable.save = lambda self, p: (saves.append(p), save(self, p))[1]
    c = load_config_module(os.path.join(REPO, "configs", "ctrl_exact.py")).get_config()
    task = exact_tasks.rl_task(c.task)
    path = os.path.join(args.out, "reference_table.npz")
    built = train.prepare_reference_table(task, path, 64, 0, log=lines.append)
    reused = train.prepare_reference_table(task, path, 64, 0, log=lines.append)
    np.testing.assert_array_equal(built.sorted_rewards_BxK, reused.sorted_rewards_BxK)
    lines.append(f"table saves: {len(saves)}")
    with open(os.path.join(args.out, f"log_p{pid}.json"), "w") as f:
        json.dump(lines, f)


if __name__ == "__main__":
    main()
