"""Evaluates a policy checkpoint against pi_ref under inference-time procedures (BoN / WoN over an
N grid, RBoN-KL / RBoN-WD, uncertainty-penalised BoN, tokenwise and blockwise controlled decoding):
win rates with CIs, KL, plots and every generated text. See configs/evaluate.py.

    .venv/bin/python experiments/evaluate.py --config=configs/evaluate.py --workdir=runs/eval \
        --config.policy.checkpoint=RUN_OR_HF_DIR_OR_GGUF --config.data.prompts=prompts.jsonl

All the work is in infalign_jax.workflows.evaluate.run.
"""

from absl import flags

from infalign_jax.infra import cli
from infalign_jax.workflows import evaluate

_CONFIG = cli.define_config("config", "configs/evaluate.py", "Evaluation config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the results, samples and manifest go.",
                               required=True)


def main(argv):
    cli.start(argv)
    results = evaluate.run(_CONFIG.value, _WORKDIR.value, progress=lambda s: print(s, flush=True))
    for r in results["rows"]:
        w = r["win_rate"]
        print(f"{r['procedure']:>22} N={r['n']:<3} vs {r['against']:<15} {w['point']:.3f} "
              f"[{w['lower']:.3f}, {w['upper']:.3f}]", flush=True)


if __name__ == "__main__":
    cli.run(main)
