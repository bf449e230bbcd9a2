"""Every method of the paper's comparison on the real tasks, at matched KL, with several seeds.

Command (smoke: plumbing only, about 20 minutes per task on 2 CPU cores; small: the CPU size;
medium: a GPU):
    .venv/bin/python experiments/compare_real.py \\
        --config=configs/compare_real.py:size=small,tasks=helpfulness --workdir=runs/compare_real
Training on a proxy reward model and judging with the gold judge (claim (c)):
    --config.base.task.reward.kind=trained --config.base.task.reward.checkpoint=runs/rm
Variants: `:tasks=harmlessness` (several: `:tasks=helpfulness+harmlessness`, or
`--config.tasks=helpfulness,harmlessness`), `--config.comparison.methods=vbon,identity,exp`,
`--config.comparison.seeds='(0,1,2,3,4)'`, `--config.comparison.kl_target=0.3`,
`--config.comparison.win_rates=plugin` (the plug-in BoN_N / WoN_N estimator instead of the
unbiased one, the default since stop 45; rerun into a finished work dir, either re-reports the
saved scores), and any key of the
base run config (configs/ctrl_real.py), e.g. `--config.base.rl.learning_rate=3e-5` (one that
no trained method's run would read, e.g. `base.rl.ppo_clip` under RLOO, is refused).
What it does and how claims are decided: infalign_jax/workflows/real_comparison.py. Prompts are
the tasks' generated sets (`task.data.prompts="generated"`), training and evaluation disjoint by
topic.
Sizes (SIZES): `smoke` measured end to end on SmolLM2 (helpfulness: 20 minutes at load ~10 on
2 CPU cores); `small` is the CPU size: one task's 15 training runs (5 methods x 3 seeds, rank-8
LoRA, 16 steps of 4 prompts x 4 samples, `rl.shared_prompt`) with 256 training / 128 evaluation
prompts, every run but the target-setting vBoN moved to the target KL by interpolation in weight
space (`comparison.kl_match`, one evaluation more a run). Measured at revision 5835d9b
(helpfulness, clean clone, 2 CPU cores, docs/results.md section 5): 83 min 31 s wall, peak RSS
5.8 GB, every method's KL within 2% of vBoN's 0.574; harmlessness at bacf951 (clean clone, quiet
machine): 88 min 01 s, the same numbers as at 47bf0e6 (92 min 38 s with other work at nice 19 on
the cores). Claim (c) (raw and identity on a proxy, helpfulness): 44 min 41 s on the tiny byte
proxy, 43 min 01 s on the SmolLM2 4-layer mean-pool proxy (docs/results.md section 5); every
method on that proxy (no `methods` / `kl_target` override): 81 min 45 s at 8981dc1, peak RSS
5.0 GB; harmlessness on its SmolLM2 proxy: 83 min 18 s at 96c5160, peak RSS 5.2 GB. `medium` is
for a GPU.
Expected result: comparison.md with one table per task (KL and standard / BoN_N / WoN_N win rates
against pi_ref, mean +- sd over seeds, under the gold judge and the proxy), the differences
against calibrated identity with 95% intervals over prompts and seeds, and each claim marked holds
/ does not hold / unresolved. At `smoke` (one step a run) every claim is unresolved (docs/results.md
section 5); at `small` (a), (b), (c) and (d) are unresolved, with intervals of about +-0.05
(section 5 there).
"""

import os

from infalign_jax.infra.config_utils import config_section, load_config_module, parse_arg
from infalign_jax.workflows.real_comparison import ComparisonConfig

# base run config (ctrl_real.py keys) and comparison settings per size
SIZES = {
    "smoke": dict(task=dict(num_prompts=4, eval_prompts=4, max_new_tokens=6, eval_samples=0),
                  k=8, samples=2, steps=1, batch_size=2, lr=1e-5, lora_rank=2,
                  comparison=dict(seeds=(0, 1), n=2, eval_samples=2)),
    # small: one task's 15 runs of 16 LoRA steps (83.5-93 minutes here, see the docstring);
    # rank-8 adapters at 3e-4 move KL(pi || pi_ref) by ~0.5 nats in 16 steps (vBoN) where
    # full-parameter Adam at 5e-5 overshoots to 1.3 nats in one.
    "small": dict(task=dict(num_prompts=256, eval_prompts=128, max_new_tokens=16, eval_samples=0,
                            calib_chunk=16, calib_batch_prompts=32),
                  k=16, samples=4, steps=16, batch_size=4, lr=3e-4, lora_rank=8, kl_horizon=64,
                  comparison=dict(seeds=(0, 1, 2), n=4, eval_samples=4, eval_batch_prompts=32,
                                  kl_match_tries=1)),
    "medium": dict(task=dict(num_prompts=384, eval_prompts=192, max_new_tokens=32,
                             eval_samples=0),
                   k=128, samples=8, steps=300, batch_size=16, lr=2e-5,
                   comparison=dict(seeds=(0, 1, 2), n=4, eval_samples=16)),
}


def get_config(arg=None):
    a = parse_arg(arg, size="smoke", tasks="helpfulness,harmlessness")
    if a.size not in SIZES:
        raise ValueError(f"config arg size: {a.size!r} is not one of {', '.join(SIZES)}")
    z = SIZES[a.size]
    base = load_config_module(os.path.join(os.path.dirname(__file__), "ctrl_real.py")).get_config(
        f"task=helpfulness,size=tiny,transform=identity,learning_rate={z['lr']}")
    base.unlock()
    base.task.update(z["task"])
    base.task.data.prompts = "generated"
    base.task.calib_chunk = min(base.task.calib_chunk, z["k"])
    base.reference.k = z["k"]
    base.rl.samples_per_prompt = z["samples"]
    base.rl.max_new_tokens = z["task"]["max_new_tokens"]
    base.rl.lora.rank = z.get("lora_rank", 0)
    # pi_ref's and the policy's log-probs over each prompt's KV computed once for its samples
    # (the same numbers; the update 1.6x faster at the small size, docs/benchmarks.md)
    base.rl.shared_prompt = True
    if "kl_horizon" in z:   # the adaptive beta controller reacts within a short run
        base.rl.kl_horizon = z["kl_horizon"]
    base.train.update(num_steps=z["steps"], batch_size=z["batch_size"], log_every=1,
                      checkpoint_every=max(1, z["steps"] // 3))
    base.lock()
    c = parse_arg(None, size=a.size, tasks=a.tasks.replace("+", ","))
    c.base = base
    c.comparison = config_section(ComparisonConfig, **z["comparison"])
    c.lock()
    return c
