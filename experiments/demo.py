"""The embedded demo (`make demo`). See configs/demo.py for the command and expected result.

All the work is in infalign_jax.workflows.demo.
"""

from absl import flags

from infalign_jax.workflows import demo
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/demo.py", "Experiment config.")
_CTRL = cli.define_config("ctrl_config", "configs/ctrl_exact.py",
                                        "Config of step 6's CTRL training (the exact task).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where results and the manifest go.")


def main(argv):
    cli.start(argv)
    demo.run(_CONFIG.value, _WORKDIR.value, ctrl_config=_CTRL.value,
             log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    cli.run(main)
