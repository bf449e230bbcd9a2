"""Runs a config's `get_sweep()` points one after another, or prints one command per point.

    .venv/bin/python experiments/sweep.py --config=configs/ctrl_exact.py --workdir=runs/sweep
    .venv/bin/python experiments/sweep.py --config=configs/ctrl_exact.py:steps=200 \
        --workdir=runs/sweep --sweep=print --sweep_arg="ts=-5;5"
    # once the printed commands have run (on a cluster): their table and figure, training nothing
    .venv/bin/python experiments/sweep.py --config=configs/ctrl_exact.py:steps=200 \
        --workdir=runs/sweep --sweep=collect --sweep_arg="ts=-5;5"

Printed commands of a real task start with one experiments/calibrate.py line per set of reference
settings, which draws the table once; run it first: the training lines copy it
(--reference_table). Flags on the config (--config.x=...) apply to every point; the point's
overrides come last. An RL option flag a point's config does not read is refused (a point may set
its setting itself).
Results: <workdir>/sweep_results.{csv,md}, one row per point, sweep_results.png (each evaluated
metric against the swept value) and sweep_manifest.json (the base config, the points, provenance).
"""


import sys

from absl import flags
from ml_collections import config_flags

from infalign_jax.infra.config_utils import load_config_module
from infalign_jax.rl.tasks import real
from infalign_jax.workflows import sweep
from infalign_jax.loops import train
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/ctrl_exact.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one run dir per point).",
                               required=True)
_MODE = flags.DEFINE_enum("sweep", "local", ["local", "print", "collect"],
                          "local: run the points here; print: one command line per point; "
                          "collect: the table and figure of the points finished in --workdir, "
                          "training nothing.")
_ARG = flags.DEFINE_string("sweep_arg", None, "Argument passed to the config's get_sweep().")


def main(argv):
    cli.start(argv)
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    points = sweep.sweep_points(load_config_module(path), _ARG.value, _CONFIG.value)
    flag_keys = cli.config_overrides("config")
    if _MODE.value == "print":
        configs = sweep.point_configs(_CONFIG.value, points, flag_keys)   # errors first
        shared = sweep.shared_flags(_CONFIG.value, flag_keys)   # -config.x, --flagfile too
        calibration, extra = [], []
        if _CONFIG.value.task.name in real.known_tasks():   # K base samples a prompt: draw once
            calibration, extra = sweep.reference_commands(path, _WORKDIR.value, configs, points,
                                                          shared)
        print("\n".join(calibration + sweep.command_lines(
            "experiments/train_policy.py", path, _WORKDIR.value, points, shared, extra)))
        first = (f"run the first {len(calibration)} line(s) first: each draws the reference "
                 f"table of its points once, and the {len(points)} training commands after "
                 f"them copy it (--reference_table)" if calibration else
                 "each command draws its own reference table (the exact task's takes "
                 "milliseconds)")
        print(f"({first}. Once they have run, the same sweep command with --sweep=collect "
              f"writes their table and figure)", file=sys.stderr)
        return
    if _MODE.value == "collect":
        rows = sweep.collect(_CONFIG.value, points, _WORKDIR.value, flag_keys=flag_keys)
    else:
        rows = sweep.run(_CONFIG.value, points, _WORKDIR.value,
                         lambda config, workdir: train.run(config, workdir)[1],
                         flag_keys=flag_keys)
    print(sweep.markdown_table(rows, list(dict.fromkeys(k for r in rows for k in r))))


if __name__ == "__main__":
    # --config.* flags apply to every point and are checked against each point's config
    cli.run(main, overrides_checked_by_main=("config",))
