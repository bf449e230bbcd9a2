"""CTRL on the enumerable exact task: every KL and win rate of the trained policy is exact.

Command (about 1.5 minutes on 2 CPU cores):
    .venv/bin/python experiments/train_policy.py --config=configs/ctrl_exact.py --workdir=runs/ctrl_exact
Variants: `--config=configs/ctrl_exact.py:transform=identity,beta=0.15,steps=3000` (steps also
sets the lr decay and the beta warm-up, 2/3 of it; a `--config.train.num_steps` flag alone is
refused, as it would leave them at 1500 steps) or flags such as
`--config.transform.t=4 --config.rl.beta=1.5`;
`--config.task.kl_budget=1.0` solves beta so that the exact target has that KL(pi* || pi_ref);
`--config.task.eos=true` uses responses of length 1..3 ending with EOS.
Sweep (t grid at matched KL budgets, one run per point, results in runs/sweep/sweep_results.md):
    .venv/bin/python experiments/sweep.py --config=configs/ctrl_exact.py --workdir=runs/sweep
    (add --sweep=print for one command line per point; --sweep_arg="ts=-5;5,kls=0.5;1")
Expected result (defaults: exp t=3, beta=1.5, RLOO, 1500 steps, beta warm-up over the first 1000
from 10 x beta): summary.json says converged (KL(pi || pi*) <= 0.01, exact, by enumeration) and
eval.jsonl's last row has every exact_* win rate within 0.01 of its target_* and exact_kl within
5% of target_kl (pi* ∝ pi_ref exp(Phi(C)/beta) for the same reference table). Which transforms
and KL budgets converge with these defaults, over 3 seeds, is in docs/results.md section 2.
"""

from infalign_jax.core.transforms import transform_param_names, transform_section
from infalign_jax.infra.config_utils import arg_keys, config_section, parse_arg
from infalign_jax.infra.sharding import MeshConfig
from infalign_jax.loops.train import TrainConfig
from infalign_jax.rl import RLConfig
from infalign_jax.rl.bon_distillation import BoNBoNConfig
from infalign_jax.rl.tasks import ReferenceConfig
from infalign_jax.rl.tasks.exact import ExactTaskConfig


# Keys a flag may not change alone: get_config derives the decay and warm-up from `steps`.
FLAG_DERIVED = {"train.num_steps": ("steps", {"rl.decay_steps": None,
                                               "rl.beta_anneal_steps": None})}


def get_config(arg=None):
    a = parse_arg(arg, transform="exp", t=3.0, beta=1.5, algorithm="rloo", steps=1500,
                  samples=256, seed=0)
    c = parse_arg(None, seed=a.seed)
    # task.kl_budget > 0 solves rl.beta so that the exact target's KL(pi* || pi_ref) is the budget.
    c.task = config_section(ExactTaskConfig)
    c.reference = config_section(ReferenceConfig)
    # t goes to the transforms that take it (exp); written for another one, it is refused.
    takes_t = "t" in transform_param_names(a.transform) or "t" in arg_keys(arg)
    c.transform = transform_section(a.transform, **({"t": a.t} if takes_t else {}))
    c.rl = config_section(RLConfig, algorithm=a.algorithm, beta=a.beta, samples_per_prompt=a.samples,
                          max_new_tokens=3, learning_rate=3e-3, decay_steps=a.steps,
                          beta_anneal_steps=a.steps * 2 // 3)
    # method="bonbon": BoN distillation over the same data path (bonbon section; the rl section's
    # learning rate, decay and response length apply). vBoN is method="ctrl" with the log
    # transform and beta = 1/(N-1).
    c.method = "ctrl"
    c.bonbon = config_section(BoNBoNConfig, n=4)
    c.train = config_section(TrainConfig, num_steps=a.steps, batch_size=2, log_every=100,
                             eval_every=250, checkpoint_every=250)
    c.mesh = config_section(MeshConfig)
    c.lock()
    return c


def get_sweep(arg=None):
    """The t sweep of the paper (t < 0 for WoN, t > 0 for BoN; t = 0 is the identity) at matched
    KL: each point's beta is solved so that its exact target has KL(pi* || pi_ref) = kl."""
    a = parse_arg(arg, ts=(-10.0, -5.0, -1.0, 0.0, 1.0, 5.0, 10.0), kls=(0.5,))
    return [{"transform.name": "exp", "transform.t": t, "task.kl_budget": kl}
            for kl in a.kls for t in a.ts]
