"""The embedded demo (`make demo`): SmolLM2 base policy, VADER judge, calibration, transforms, BoN.

    .venv/bin/python experiments/demo.py --out_dir=runs/demo

About 2-4 minutes on 2 CPU cores. All the work is in infalign_jax.demo.
"""

from absl import app, flags

from infalign_jax import demo

_OUT_DIR = flags.DEFINE_string("out_dir", "runs/demo", "Where results and the manifest go.")
_PROMPTS = flags.DEFINE_integer("num_prompts", 4, "Number of prompts.")
_K = flags.DEFINE_integer("k_ref", 24, "Reference samples per prompt for calibration.")
_N = flags.DEFINE_integer("n", 4, "Fresh samples per prompt (the N of Best-of-N).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    demo.run_demo(_OUT_DIR.value, num_prompts=_PROMPTS.value, k_ref=_K.value, n=_N.value,
                  seed=_SEED.value, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    app.run(main)
