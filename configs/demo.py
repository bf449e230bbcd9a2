"""The embedded demo (`make demo`): SmolLM2 base policy, VADER judge, calibration, transforms, BoN.

Command (about 1 minute on 2 CPU cores):
    .venv/bin/python experiments/demo.py --config=configs/demo.py --workdir=runs/demo
Variants: `--config=configs/demo.py:prompts=8,k_ref=48` or `--config.n=8`.
Expected result: the fresh samples' mean calibrated reward is near 0.5 (they come from the base
policy itself); Best-of-N picks the most positive review per prompt; the analytic lines print the
same numbers as configs/analytic.py at KL 0.5.
"""

from infalign_jax.config_utils import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, prompts=4, k_ref=24, n=4, seed=0)
    config = a
    config.max_new_tokens = 24
    config.kl = 0.5
    config.lock()
    return config
