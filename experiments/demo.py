"""The embedded demo (`make demo`). See configs/demo.py for the command and expected result.

All the work is in infalign_jax.demo.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from infalign_jax import demo, sweep

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where results and the manifest go.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    c = _CONFIG.value
    methods = tuple(m.strip() for m in c.train_methods.split(",") if m.strip())
    ctrl = sweep.load_config_module(c.ctrl_config).get_config() if methods else None
    demo.run_demo(_WORKDIR.value, num_prompts=c.prompts, k_ref=c.k_ref, n=c.n,
                  max_new_tokens=c.max_new_tokens, seed=c.seed, kl=c.kl,
                  train_methods=methods, train_size=c.train_size, ctrl_config=ctrl,
                  log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    app.run(main)
