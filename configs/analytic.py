"""Analytic tool report: win rate vs KL of identity / log / best exp-t / optimal transforms.

Command (4 min 23 s measured at grid 8000 on 2 CPU cores; seconds on a GPU):
    .venv/bin/python experiments/analytic.py --config=configs/analytic.py --workdir=runs/analytic
Variants: `--config=configs/analytic.py:grid=4000,against=base`, or flags such as
`--config.kls="(0.5,1.0)"`.
Expected result (grid 8000, T(pi) against T(pi_ref)): at KL 0.5, BoN_4 win rates identity
0.7998, log 0.7682, best exp-t (t ~ 12.6) 0.8727, optimal 0.8733; WoN_4 identity 0.8860,
log 0.9270, best exp-t (t ~ -9.7) 0.9476, optimal 0.9479; BoN_32 best exp-t (t ~ 393) 0.9911,
optimal 0.9926.
"""

from infalign_jax.infra.config_utils import config_section, parse_arg
from infalign_jax.workflows.analytic_report import AnalyticConfig


def get_config(arg=None):
    config = parse_arg(arg, **config_section(AnalyticConfig).to_dict())
    config.lock()
    return config
