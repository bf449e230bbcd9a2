"""Reproduces the paper's tables at the chosen size; see configs/reproduce.py.

The exact and convergence stages train configs/ctrl_exact.py's config (`--exact_config`, whose
keys can be overridden like any config: `--exact_config.rl.learning_rate=1e-3`); the real stage
is configs/compare_real.py's comparison (`--real_config`, e.g.
`--real_config=configs/compare_real.py:size=small`). All the work is in
infalign_jax.workflows.reproduce.
"""


from absl import flags

from infalign_jax.workflows import real_comparison, reproduce
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/reproduce.py", "Experiment config.")
_EXACT = cli.define_config("exact_config", "configs/ctrl_exact.py",
                                         "Base config of the exact-task stages.")
_REAL = cli.define_config("real_config", "configs/compare_real.py",
                                        "Config of the real stage's comparison.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/reproduce", "Output directory.")


def main(argv):
    cli.refuse_overrides("exact_config", reproduce.EXACT_KEYS_SET,
                         "each exact-stage run sets it from the size and its method")
    cli.refuse_overrides("real_config", real_comparison.KEYS_SET,
                         "the comparison sets it per run (or, for size, in "
                         "--real_config=...:size=)")
    stages = set(reproduce.stage_names(_CONFIG.value.stages))
    for name, readers in reproduce.CONFIG_READS.items():
        given = [f"--{name}.{k}" for k in cli.config_overrides(name)] + (
            [f"--{name}"] if flags.FLAGS[name].present else [])
        if given and not stages & set(readers):
            raise ValueError(f"{given[0]} is not used: it is read by the "
                             f"{' and '.join(readers)} stage{'s' * (len(readers) > 1)} only, and "
                             f"config.stages={_CONFIG.value.stages!r} does not run "
                             f"{'either' if len(readers) > 1 else 'it'}")
    cli.start(argv)
    reproduce.refuse_unread_exact_overrides(_CONFIG.value, _EXACT.value,
                                            cli.config_overrides("exact_config"))
    real_comparison.refuse_unread_base_overrides(_REAL.value, cli.config_overrides("real_config"),
                                                 "real_config")
    reproduce.run(_CONFIG.value, _WORKDIR.value, exact_config=_EXACT.value, real_config=_REAL.value,
                  log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    cli.run(main, overrides_checked_by_main=("exact_config",))
