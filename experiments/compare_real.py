"""The paper's methods compared on the real tasks at matched KL; see configs/compare_real.py.

All the work is in infalign_jax.workflows.real_comparison.
"""


from absl import flags

from infalign_jax.infra import cli
from infalign_jax.workflows import real_comparison

_CONFIG = cli.define_config("config", "configs/compare_real.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare_real", "Output directory.")


def main(argv):
    cli.start(argv)
    cli.refuse_overrides("config", real_comparison.KEYS_SET,
                         "the comparison sets it per run (or, for size, in --config=...:size=)")
    config = _CONFIG.value
    real_comparison.refuse_unread_base_overrides(config, cli.config_overrides("config"))
    real_comparison.run(real_comparison.task_configs(config), config.comparison, _WORKDIR.value,
                        log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    cli.run(main)
