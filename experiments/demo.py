"""The embedded demo (`make demo`). See configs/demo.py for the command and expected result.

All the work is in infalign_jax.workflows.demo.
"""

from absl import flags

from infalign_jax.infra.config_utils import as_dict, dataclass_from
from infalign_jax.workflows import demo, reproduce
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/demo.py", "Experiment config.")
_CTRL = cli.define_config("ctrl_config", "configs/ctrl_exact.py",
                                        "Config of step 6's CTRL training (the exact task).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where results and the manifest go.")


def main(argv):
    # Step 6 trains reproduce's exact-stage runs, which set these keys themselves; without
    # methods to train, no --ctrl_config flag is read.
    cli.refuse_overrides("ctrl_config", reproduce.EXACT_KEYS_SET,
                         "each of step 6's runs sets it from the size and its method")
    cli.start(argv)
    given = cli.config_overrides("ctrl_config")
    if given and not dataclass_from(demo.DemoConfig, as_dict(_CONFIG.value), "demo").methods:
        raise ValueError(f"--ctrl_config.{given[0]} is not used: config.train_methods is empty, "
                         f"so step 6 trains nothing")
    demo.run(_CONFIG.value, _WORKDIR.value, ctrl_config=_CTRL.value,
             log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    cli.run(main)
