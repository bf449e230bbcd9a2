"""The embedded demo (`make demo`): SmolLM2 base policy, VADER judge, calibration, transforms, BoN.

Command (about 2 minutes on 2 CPU cores; 116 s measured with `make demo`):
    .venv/bin/python experiments/demo.py --config=configs/demo.py --workdir=runs/demo
Variants: `--config=configs/demo.py:prompts=8,k_ref=48` or `--config.n=8`.
Expected result: the fresh samples' mean calibrated reward is near 0.5 (they come from the base
policy itself); Best-of-N picks the most positive review per prompt; the analytic lines print the
same numbers as configs/analytic.py at KL 0.5; step 6 trains CTRL with identity, log (vBoN) and
exp(t=5) at one matched KL and prints each trained policy's exact KL and standard / BoN_4 / WoN_4
win rates next to its exact optimum (exp t>0 the highest BoN_4, log the highest WoN_4 of the three).
"""

from infalign_jax.infra.config_utils import config_section, parse_arg
from infalign_jax.workflows.demo import DemoConfig


def get_config(arg=None):
    config = parse_arg(arg, **config_section(DemoConfig).to_dict())
    config.lock()
    return config
