"""Evaluation of a policy checkpoint against pi_ref under inference-time procedures.

Command (defaults: SmolLM2-135M-Instruct against itself on 4 shipped helpfulness prompts, VADER;
measured 7.8 minutes wall on the 2 shared CPU cores at load average ~10, of which tokenwise CD
2.2 minutes and blockwise CD 1.4 minutes; drop them from eval.procedures for a quick look):
    .venv/bin/python experiments/evaluate.py --config=configs/evaluate.py --workdir=runs/eval
On the researcher's files:
    .venv/bin/python experiments/evaluate.py --config=configs/evaluate.py --workdir=runs/eval \
        --config.policy.checkpoint=RUN_DIR_OR_HF_DIR_OR_GGUF \
        --config.reference.checkpoint=HF_DIR_OR_GGUF --config.data.prompts=prompts.jsonl \
        --config.reward.kind=hf --config.reward.checkpoint=RM_DIR
    (or --config.reward.kind=ensemble --config.reward.checkpoints="('rm1','rm2')" of hf
    sequence-classifier directories (a train_reward.py ensemble run is one kind=trained dir), and
    --config.eval.procedures="('bon','won','uncertainty_bon')"; the judge's ensemble score is
    mean - reward.std_penalty * std, the uncertainty-penalised selection uses select.uncertainty_k).
Procedures (`config.eval.procedures`): bon, won, rbon_kl, rbon_wd, uncertainty_bon, cd_tokenwise,
cd_blockwise (see infalign_jax/workflows/evaluate.py); unknown names are refused.
Variants: `--config=configs/evaluate.py:prompts=16,samples=16` (ns follows: 1, 2, 4, ... samples);
`--config.eval.against=base` compares BoN_N / WoN_N of the policy (and of the decoders) with plain
pi_ref samples (the spec's alternative reading) instead of BoN_N / WoN_N of pi_ref.
Outputs in the work dir: manifest.json, results.json, win_rates.csv, samples.jsonl (every generated
text with its score), policy.json/.csv and cd_*.json/.csv, win_rate_vs_n.png, win_rate_vs_kl.png.
Expected result of the default: the policy is pi_ref, so its KL is 0 and its standard, BoN_N and
WoN_N win rates are 1/2 up to noise (measured, seed 0: standard 0.61; 4 prompts make the bootstrap
CIs too narrow to trust, use prompts=16 or more for numbers); BoN selection from pi_ref wins
0.66 / 0.82 / 0.92 against pi_ref at N = 2 / 4 / 8 and ~0.5-0.6 against BoN_N(pi_ref); RBoN-KL
(beta 0.1) stays closer to pi_ref (0.56 / 0.61 / 0.63); tokenwise CD with the in-run FUDGE scorer
0.69 (exact KL 2.7), blockwise 0.50 (KL bound 1.3).
"""

from infalign_jax.infra.config_utils import config_section, parse_arg
from infalign_jax.rl.tasks.sources import PolicyConfig, PromptsConfig, RewardConfig
from infalign_jax.workflows.evaluate import CDConfig, EvalConfig, SelectConfig


# `--config.eval.samples` alone would keep the N grid derived from the argument's samples
# (`cli.refuse_stale_derived_flags`): write `:samples=16`, or set eval.ns too.
FLAG_DERIVED = {"eval.samples": ("samples", {"eval.ns": None})}


def get_config(arg=None):
    a = parse_arg(arg, prompts=4, samples=8, max_new_tokens=8)
    c = parse_arg(None)
    c.policy = config_section(PolicyConfig)
    c.reference = config_section(PolicyConfig)
    c.reward = config_section(RewardConfig)
    c.data = config_section(PromptsConfig)
    ns = tuple(2 ** i for i in range(a.samples.bit_length()) if 2 ** i <= a.samples)
    c.eval = config_section(EvalConfig, num_prompts=a.prompts, samples=a.samples, ns=ns,
                            max_new_tokens=a.max_new_tokens)
    c.select = config_section(SelectConfig)
    c.cd = config_section(CDConfig)
    c.lock()
    return c
