"""Trains a policy with CTRL (or a baseline) from an experiment config; resumes from --workdir.

    .venv/bin/python experiments/train_policy.py --config=configs/ctrl_exact.py \
        --workdir=runs/ctrl_exact --config.transform.t=4 --config.rl.beta=1.5

All the work is in infalign_jax.loops.train.run; the config's docstring gives the
expected runtime and result. With configs/ctrl_real.py, `--config.export.hf=true` also writes the
trained policy as a transformers checkpoint to <workdir>/export/hf (`experiments/export.py` does
the same for any real-task run); `--config.rl.lora.rank=8` trains LoRA adapters instead of the
whole policy (merged on export). `--reference_table=PATH` starts from a reference table drawn
elsewhere (`experiments/calibrate.py`; a sweep's printed commands share one this way), copied into
--workdir unless it holds one, and checked against this run's task, K and seed.
"""

from absl import flags

from infalign_jax.loops import train
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/ctrl_exact.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, manifest).",
                               required=True)
_TABLE = flags.DEFINE_string("reference_table", None, "A reference table drawn elsewhere "
                             "(experiments/calibrate.py) to copy into --workdir unless it holds "
                             "one; checked like any.")


def main(argv):
    cli.start(argv, processes=True)
    train.run(_CONFIG.value, _WORKDIR.value, reference_table=_TABLE.value)


if __name__ == "__main__":
    cli.run(main)
