"""Analytic tool report (tables, plots, manifest). See configs/analytic.py for the command.

All the work is in infalign_jax.workflows.analytic_report.
"""

from absl import flags

from infalign_jax.workflows import analytic_report
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/analytic.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/analytic", "Output directory.")


def main(argv):
    cli.start(argv)
    analytic_report.run(_CONFIG.value, _WORKDIR.value, progress=lambda s: print(s, flush=True))


if __name__ == "__main__":
    cli.run(main)
