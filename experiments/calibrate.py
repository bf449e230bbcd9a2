"""Builds a real task's reference table into --workdir (resumable); see configs/calibrate_real.py.

    .venv/bin/python experiments/calibrate.py \
        --config=configs/calibrate_real.py:task=helpfulness,size=tiny \
        --workdir=runs/ctrl_real_help_tiny

All the work is in infalign_jax.real_rl_tasks.calibrate_to_workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from infalign_jax import real_rl_tasks

_CONFIG = config_flags.DEFINE_config_file("config", "configs/calibrate_real.py", "Task config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (reference_table.npz, manifest).",
                               required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    path = real_rl_tasks.calibrate_to_workdir(_CONFIG.value, _WORKDIR.value,
                                              progress=lambda s: print(s, flush=True))
    print(f"reference table: {path}", flush=True)


if __name__ == "__main__":
    app.run(main)
