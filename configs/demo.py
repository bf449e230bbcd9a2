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

from infalign_jax.config_utils import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, prompts=4, k_ref=24, n=4, seed=0)
    config = a
    config.max_new_tokens = 24
    config.kl = 0.5
    # Step 6: CTRL trained with three transforms on the exact task (configs/ctrl_exact.py).
    config.ctrl_config = "configs/ctrl_exact.py"
    config.train_methods = "identity,vbon,exp_bon"
    config.train_size = "demo"
    config.lock()
    return config
