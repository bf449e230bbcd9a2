"""Analytic tool report (tables, plots, manifest). See configs/analytic.py for the command.

All the work is in infalign_jax.analytic_report.
"""

from absl import app, flags
from ml_collections import config_flags

from infalign_jax import analytic_report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/analytic.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/analytic", "Output directory.")


def main(argv):
    del argv
    c = _CONFIG.value
    analytic_report.run_report(_WORKDIR.value, ns=[int(n) for n in c.ns],
                               kls=[float(k) for k in c.kls], grid_size=c.grid,
                               reading=c.reading, progress=lambda s: print(s, flush=True))


if __name__ == "__main__":
    app.run(main)
