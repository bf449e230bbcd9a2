"""Builds a real task's reference table into --workdir (resumable); see configs/ctrl_real.py.

    .venv/bin/python experiments/calibrate.py \
        --config=configs/ctrl_real.py:task=helpfulness,size=tiny \
        --workdir=runs/ctrl_real_help_tiny

All the work is in infalign_jax.workflows.calibrate.run.
"""

from absl import flags

from infalign_jax.workflows import calibrate
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/ctrl_real.py", "Task config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (reference_table.npz, manifest).",
                               required=True)


def main(argv):
    cli.start(argv, processes=True, reads=calibrate.READS)
    path = calibrate.run(_CONFIG.value, _WORKDIR.value,
                                          progress=lambda s: print(s, flush=True))
    print(f"reference table: {path}", flush=True)


if __name__ == "__main__":
    cli.run(main)
