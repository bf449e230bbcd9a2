"""The calibration pass of a real task into a work dir, for `experiments/calibrate.py`."""

from __future__ import annotations

import os
from typing import Any

import jax

from infalign_jax.core.calibration import load_reference_table
from infalign_jax.infra import provenance
from infalign_jax.rl.tasks import real


def run(config: Any, workdir: str, progress: Any = print) -> str:
    """Builds the reference table of `config.task` into `workdir/reference_table.npz`.

    The same file `train.run` then reuses (it checks the reward and base model ids). Resumable:
    an interrupted pass continues from `workdir/reference_table.partial.npz`. An existing table
    with the same ids is kept. Writes `workdir/calibration/manifest.json`. Returns the table path.
    """
    started = provenance.now()
    task = real.rl_task(config.task)
    path = os.path.join(workdir, "reference_table.npz")
    k, seed = int(config.reference.k), int(config.reference.seed)
    if os.path.exists(path):
        table = load_reference_table(path, expected_reward_model_id=task.reward_model_id,
                                     expected_base_model_id=task.base_model_id)
        missing = sorted(set(task.prompt_ids) - set(table.prompt_ids.tolist()))
        if missing:
            raise ValueError(f"{path} lacks prompts {missing[:5]}; move it away to rebuild")
        progress(f"calibration: {path} already holds this task's table; kept")
    else:
        table = task.reference_table(k, seed, partial_path=path.replace(".npz", ".partial.npz"),
                                     progress=progress)
        table.save(path)
    provenance.write_manifest(os.path.join(workdir, "calibration"), config,
                              seeds={"reference": seed}, inputs={"reference_table": path},
                              started=started, extra={"table": table.metadata(),
                                                      "jax_devices": str(jax.devices())})
    return path
