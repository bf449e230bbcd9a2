"""The calibration pass of a real task into a work dir, for `experiments/calibrate.py`."""

from __future__ import annotations

import os
from typing import Any

import jax

from infalign_jax.infra import distributed, provenance
from infalign_jax.loops import train
from infalign_jax.rl.tasks import real


READS = ("task.", "reference.")   # the config sections the calibration pass reads


def run(config: Any, workdir: str, progress: Any = print) -> str:
    """Builds the reference table of `config.task` into `workdir/reference_table.npz`.

    The same file `train.run` then reuses: both go through `train.prepare_reference_table`, which
    records `config.reference.k` and `.seed` inside the table and refuses an existing table of
    other model ids, other settings or none recorded, naming the keys. Resumable: an interrupted
    pass continues from `workdir/reference_table.partial.npz`. Writes
    `workdir/calibration/manifest.json`. Returns the table path.
    """
    started, code = provenance.now(), provenance.code_state()
    task = real.rl_task(config.task)
    path = os.path.join(workdir, train.REFERENCE_TABLE)
    k, seed = train.reference_settings(config)
    table = train.prepare_reference_table(task, path, k, seed, progress)
    if distributed.is_primary():   # one writer
        provenance.write_manifest(os.path.join(workdir, "calibration"), config,
                                  seeds={"reference": seed}, inputs={"reference_table": path},
                                  started=started, code=code, extra={"table": table.metadata(),
                                                          "jax_devices": str(jax.devices())})
    return path
