"""Bradley-Terry reward model (or ensemble) trained on preference pairs; proxy for a gold judge.

Command (measured 8.5 minutes wall on 2 busy CPU cores, 2 minutes of CPU time):
    .venv/bin/python experiments/train_reward.py --config=configs/reward_model.py --workdir=runs/rm
With files in HH-RLHF / TL;DR / {prompt, chosen, rejected} JSONL format:
    --config.data.synthetic="" --config.data.train_path=hh_train.jsonl.gz \
    --config.data.eval_path=hh_test.jsonl.gz --config.data.format=hh
Variants: `--config=configs/reward_model.py:ensemble=4` (an ensemble for uncertainty-penalised
rewards), `:data=helpfulness` / `:data=harmlessness` (pairs of SmolLM2 base samples of the real
task's prompts, labelled by its gold judge, held-out prompts for eval; `label_noise=0.1` flips 10%
of the training labels), `--config.train.num_steps=1000`.
Default data: `synthetic="vader"` writes VADER-labelled review pairs (data/synthetic.py) into the
work dir, so the run is offline; the model is a fresh byte-level 2-layer decoder.
Expected result (measured, seed 0): held-out pairwise accuracy of the proxy against the VADER
labels 0.81 after 300 steps with ECE 0.019 (summary.json: eval.eval_accuracy, eval.eval_ece); the
proxy is imperfect on purpose, as a learned reward model is next to its gold judge.
`:data=helpfulness` / `:data=harmlessness` (measured, seed 0, ~3.5 min each): held-out accuracy
0.585 / 0.580 against the gold judge on prompts not seen in training (ECE 0.23 / 0.22).
"""

from infalign_jax.config_utils import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, ensemble=1, steps=300, seed=0, data="vader", label_noise=0.0)
    c = parse_arg(None, seed=a.seed)
    real = a.data in ("helpfulness", "harmlessness")
    c.data = parse_arg(None, synthetic=f"task:{a.data}" if real else a.data,
                       synthetic_train_pairs=600 if real else 4000,
                       synthetic_eval_pairs=200 if real else 500, train_path="", eval_path="",
                       format="auto", skip_bad=False, max_prompt_len=96 if real else 64,
                       max_response_len=128 if real else 64,
                       # "task:<name>" only: SmolLM2 samples per prompt, pairs per prompt, new
                       # tokens per sample, first eval prompt (train prompts come before it)
                       samples_per_prompt=8, pairs_per_prompt=20, sample_new_tokens=32,
                       eval_first_prompt=36, label_noise=a.label_noise)
    c.model = parse_arg(None, source="tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                        head_dim=16, d_ff=128, max_len=256 if real else 128)
    c.rm = parse_arg(None, learning_rate=1e-3, weight_decay=0.01, max_grad_norm=1.0, margin=0.0,
                     label_smoothing=0.0, warmup_steps=20, total_steps=a.steps)
    c.train = parse_arg(None, num_steps=a.steps, batch_size=32, log_every=25, eval_every=100,
                        checkpoint_every=100, keep_checkpoints=3, ensemble_size=a.ensemble,
                        bootstrap=a.ensemble > 1, async_checkpoint=True)
    c.mesh = parse_arg(None, data=-1, fsdp=1, tensor=1)
    c.lock()
    return c
