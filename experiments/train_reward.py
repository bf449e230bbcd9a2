"""Trains a Bradley-Terry reward model (or ensemble) from a config; resumes from --workdir.

    .venv/bin/python experiments/train_reward.py --config=configs/reward_model.py --workdir=runs/rm
    # from a pretrained trunk (SmolLM2-135M-Instruct from the wheel; or a transformers dir / GGUF
    # file), on the researcher's pairs, reward head only:
    .venv/bin/python experiments/train_reward.py \
        --config=configs/reward_model.py:trunk=smollm2,trainable=head --workdir=runs/rm_smollm2 \
        --config.data.train_path=train.jsonl --config.data.eval_path=eval.jsonl

The run directory is then a CTRL reward: `--config.task.reward.kind=trained
--config.task.reward.checkpoint=runs/rm_smollm2`.
All the work is in infalign_jax.loops.train_reward.run; the config's docstring gives runtime and result.
"""

from absl import flags

from infalign_jax.loops import train_reward
from infalign_jax.infra import cli

_CONFIG = cli.define_config("config", "configs/reward_model.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, manifest).",
                               required=True)


def main(argv):
    cli.start(argv, processes=True)
    train_reward.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
