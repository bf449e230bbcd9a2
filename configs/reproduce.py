"""Paper-table reproduction: analytic figures, exact-task methods at matched KL, real tasks.

Command (tiny: about 12 minutes on 2 CPU cores; small: about an hour; full: GPU):
    .venv/bin/python experiments/reproduce.py --config=configs/reproduce.py:size=tiny \
        --workdir=runs/reproduce
Sizes: smoke (plumbing, seconds), tiny, small, full. Stages: `--config.stages="analytic,exact,real"`
(comma-separated; "real" trains the SmolLM2 tasks of configs/ctrl_real.py at the same size: tiny
takes about 4 x 4 minutes more on a quiet machine).
Expected result: runs/reproduce/results.md with (1) the analytic frontier table (exp-t beats
identity and log for BoN_N / WoN_N at matched KL, the optimum bounds it), (2) the exact-task table:
every method trained to the exact target of its transform at vBoN(N=4)'s KL budget, CTRL exp t>0
highest in BoN_4 and t<0 highest in WoN_4 among the trained exp/identity/log methods; see
docs/results.md for a recorded run and which claims hold at this scale.
"""

from infalign_jax.config_utils import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, size="tiny", n=4, t=5.0, seed=0)
    c = a
    c.stages = "analytic,exact"
    c.analytic = parse_arg(None, grid=2000, reading="both", ns=(1, 4, 32), kls=(0.25, 0.5, 1.0))
    c.exact_config = "configs/ctrl_exact.py"
    # "all" or a comma-separated subset of raw,identity,vbon,exp_bon,exp_won,optimal_bon,optimal_won
    c.methods = "all"
    c.lock()
    return c
