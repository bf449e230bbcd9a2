"""Exports a trained CTRL policy as a transformers checkpoint (config.json, model.safetensors and
the base policy's tokenizer), loadable with `AutoModelForCausalLM.from_pretrained(out)`.

    .venv/bin/python experiments/export.py --run=runs/ctrl_real_help_tiny --out=exported/help
    .venv/bin/python experiments/export.py --run=runs/ctrl_real_help_tiny --out=exported/s2 --step=2

The newest checkpoint of the run (or `--step`) on top of the base policy its manifest names; a
LoRA run's adapters are merged in. Only real-task runs (config.task.policy) have a transformers
policy and tokenizer; other runs are refused. The same export runs at the end of training with
`--config.export.hf=true` (into <workdir>/export/hf). All the work is in
infalign_jax.loops.train.export_hf.
"""

from absl import flags

from infalign_jax.loops import train
from infalign_jax.infra import cli

_RUN = flags.DEFINE_string("run", None, "CTRL run directory (manifest.json + checkpoints/).",
                           required=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write the transformers checkpoint to.",
                           required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def main(argv):
    cli.start(argv)
    written = train.export_hf(_RUN.value, _OUT.value, _STEP.value)
    print(f"exported {written['checkpoint']} to {written['dir']}")


if __name__ == "__main__":
    cli.run(main)
