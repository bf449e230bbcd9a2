"""Reproduces the paper's tables at the chosen size; see configs/reproduce.py.

All the work is in infalign_jax.reproduce.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from infalign_jax import reproduce

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/reproduce", "Output directory.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    reproduce.run(_CONFIG.value, _WORKDIR.value, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    app.run(main)
