"""Analytic tool report: win rate vs KL of identity / log / best exp-t / optimal transforms.

    .venv/bin/python experiments/analytic.py --out_dir=/tmp/analytic

Writes frontier.csv, bonbon.csv, tables.md, frontier_{bon,won}.png, best_t.png and manifest.json
(about a minute on 2 CPU cores at the default grid). All the work is in
infalign_jax.analytic_report.
"""

from absl import app, flags

from infalign_jax import analytic_report

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/infalign_analytic", "Output directory.")
_GRID = flags.DEFINE_integer("grid", 2000, "Number of bins of the calibrated-space grid.")
_KL_GRID = flags.DEFINE_list("kl_grid", ["0.1", "0.25", "0.5", "1.0"], "KL budgets.")
_NS = flags.DEFINE_list("ns", ["1", "2", "4", "8", "32"], "Numbers of samples N.")
_READING = flags.DEFINE_enum("reading", "both", ["both", "vs_ref"],
                             "Win rate of T(pi) against T(pi_ref) (both) or plain pi_ref.")


def main(argv):
    del argv
    analytic_report.run_report(_OUT_DIR.value, ns=[int(n) for n in _NS.value],
                               kls=[float(k) for k in _KL_GRID.value], grid_size=_GRID.value,
                               reading=_READING.value, progress=lambda s: print(s, flush=True))


if __name__ == "__main__":
    app.run(main)
