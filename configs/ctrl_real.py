"""CTRL on a real offline task: SmolLM2-135M-Instruct, shipped prompts, an offline judge as reward.

Command (tiny: about 4 min on a quiet 2-core CPU, 15.5 min measured at load ~10, both at revision
89e32c3, whose unrolled layers and in-graph judge made the first step mostly compiling; the step is
now two scanned programs around the judge, compiled in ~10 s and cached for a rerun, see
docs/benchmarks.md):
    .venv/bin/python experiments/calibrate.py \
        --config=configs/ctrl_real.py:task=helpfulness,size=tiny \
        --workdir=runs/ctrl_real_help_tiny        # optional: the table alone, resumable
    .venv/bin/python experiments/train_policy.py \
        --config=configs/ctrl_real.py:task=helpfulness,size=tiny \
        --workdir=runs/ctrl_real_help_tiny
Variants: `task=harmlessness`, `size=small|full`, `transform=identity`, `beta=0.5`, `t=-4`, or
flags such as `--config.rl.learning_rate=1e-5 --config.train.num_steps=20`. A sweep over t at one
beta (`get_sweep` below): `experiments/sweep.py --config=configs/ctrl_real.py:size=small
--workdir=runs/real_t --sweep_arg="ts=1;4;8"`.
Your own policy, reward model and prompts (README "Your policy, your reward model, your prompts"):
    --config.task.policy.checkpoint=DIR_OR_GGUF --config.task.reward.kind=hf \
    --config.task.reward.checkpoint=RM_DIR --config.task.data.prompts=PROMPTS.jsonl
(tiny models: 2 steps in ~45 s, tests/test_workflow.py).

Sizes (SIZES below; experiments/calibrate.py reads this file's task and reference sections, so the
table it builds is the one training reuses):
* tiny: 4 prompts, K=16, 2 prompts x 4 samples a step, 12 new tokens, 4 steps, eval 4 prompts x 4
  samples. Measured here at revision 89e32c3, quiet machine (load ~3): model load ~10 s,
  calibration 9 s, step 1 87 s (then compiling 30 unrolled layers through sampling, backward and
  the full-vocabulary KL), later steps 19-20 s. At load ~10: calibration 53 s, step 1 582 s, steps
  32-53 s, evaluation ~2 min, 15.5 min in all. A smoke run: the numbers move little, and its
  evaluation (4 prompts x 4 samples) cannot tell a policy from pi_ref: pi_ref evaluated against
  itself scores est_standard 0.27 (bootstrap stderr 0.06) at eval_seed 0, measured at 380de88.
  Peak RSS 4.6 GB (a checkpoint every step, each written before the next step on the CPU;
  8.8 GB with `--config.train.async_checkpoint=true`; docs/benchmarks.md, stop 59).
* small: 16 prompts, K=64, 4 x 8 samples a step, 32 new tokens, 50 steps, eval 8 x 16. Estimated
  (not measured) for this CPU when idle: calibration 3-5 min (32k new tokens at ~150-200 tokens/s),
  ~40 s a step, about 45 min in all; 2-3x that when the machine is shared.
* full: all 48 prompts, K=512, 16 x 16 samples a step, 48 new tokens, 500 steps, eval 48 x 64.
  For a GPU (many hours on this CPU).
Expected result: metrics.jsonl has finite rewards, calibrated rewards near 0.5 at step 1 (the
policy starts as pi_ref, whose calibrated reward is uniform on [0, 1]) and kl_full_vocab 0 at
step 1. Measured (tiny, helpfulness): calibrated 0.54 / 0.34 / 0.63 / 0.48 and kl_full_vocab
0 / 0.02 / 0.18 / 0.19 over the 4 steps; eval est_standard 0.52 +- 0.08, est_bon_4 0.34 +- 0.19
(4 steps move nothing measurable). Expected, not yet measured, for small/full: the calibrated
reward rises above 0.5 at a KL of a few tenths of a nat, and eval.jsonl's est_bon_4
(helpfulness) / est_won_4 (harmlessness) win rate against pi_ref exceeds 0.5 beyond its stderr.
Transform default (`t=0` in the arg picks it): exp with t=+4 for the Best-of-N task
(helpfulness) and t=-4 for the Worst-of-N task (harmlessness), the signs InfAlign prescribes.
"""

from infalign_jax.core.transforms import transform_param_names, transform_section
from infalign_jax.infra.config_utils import arg_keys, config_section, parse_arg
from infalign_jax.infra.sharding import MeshConfig
from infalign_jax.loops.train import ExportConfig, TrainConfig
from infalign_jax.rl import RLConfig
from infalign_jax.rl.tasks import ReferenceConfig
from infalign_jax.rl.tasks.real import RealTaskConfig, get_real_task

# Task fields, reference K, RL samples per prompt, steps, prompts per step.
SIZES = {
    "tiny": dict(num_prompts=4, max_new_tokens=12, eval_samples=4, eval_prompts=4, k=16,
                 samples=4, steps=4, batch_size=2, calib_chunk=16, calib_batch_prompts=4),
    "small": dict(num_prompts=16, max_new_tokens=32, eval_samples=16, eval_prompts=8, k=64,
                  samples=8, steps=50, batch_size=4, calib_chunk=32, calib_batch_prompts=8),
    "full": dict(num_prompts=48, max_new_tokens=48, eval_samples=64, eval_prompts=48, k=512,
                 samples=16, steps=500, batch_size=16, calib_chunk=128, calib_batch_prompts=16),
}
TASK_KEYS = ("num_prompts", "max_new_tokens", "eval_samples", "eval_prompts", "calib_chunk",
             "calib_batch_prompts")


# Keys a flag may not change alone: get_config picks t's sign from the `task` argument (unless
# the `t` argument gives t).
FLAG_DERIVED = {"task.name": ("task", {"transform.t": "t"})}


def get_config(arg=None):
    a = parse_arg(arg, task="helpfulness", size="tiny", transform="exp", t=0.0, beta=0.1,
                  algorithm="rloo", learning_rate=1e-5, seed=0, reference_seed=1)
    if a.size not in SIZES:
        raise ValueError(f"config arg size: {a.size!r} is not one of {', '.join(SIZES)}")
    size = SIZES[a.size]
    c = parse_arg(None, seed=a.seed)
    c.task = config_section(RealTaskConfig, name=a.task, **{k: size[k] for k in TASK_KEYS})
    c.reference = config_section(ReferenceConfig, k=size["k"], seed=a.reference_seed)
    t = a.t or (4.0 if get_real_task(a.task).procedure == "bon" else -4.0)
    # t goes to the transforms that take it (exp); written for another one, it is refused.
    takes_t = "t" in transform_param_names(a.transform) or "t" in arg_keys(arg)
    c.transform = transform_section(a.transform, **({"t": t} if takes_t else {}))
    # Rollouts sample like the reference table (same length, temperature 1).
    c.rl = config_section(RLConfig, algorithm=a.algorithm, beta=a.beta,
                          samples_per_prompt=size["samples"], max_new_tokens=c.task.max_new_tokens,
                          learning_rate=a.learning_rate, ppo_epochs=2, max_grad_norm=1.0)
    steps = size["steps"]
    c.train = config_section(TrainConfig, num_steps=steps, batch_size=size["batch_size"],
                             log_every=1 if steps < 20 else 10, eval_every=0,
                             checkpoint_every=max(1, steps // 5), keep_checkpoints=2)
    c.mesh = config_section(MeshConfig)
    # --config.export.hf=true: the trained policy as a transformers checkpoint, export/hf
    c.export = config_section(ExportConfig)
    c.lock()
    return c


def get_sweep(arg=None, config=None):
    """exp(t C) over `ts` at the config's beta (experiments/sweep.py; `--sweep_arg="ts=1;4"`).
    The default ts, 1, 2, 4 and 8, take the sign InfAlign prescribes for the base config's task
    (`config`, which experiments/sweep.py passes): + for a Best-of-N task (helpfulness), - for a
    Worst-of-N one (harmlessness); ts given are taken as written. The points share beta, not KL:
    each row of the sweep's table carries its est_kl_k1, and `experiments/compare_real.py`
    compares methods at matched KL."""
    a = parse_arg(arg, ts=(1.0, 2.0, 4.0, 8.0))
    ts = [float(t) for t in a.ts]
    if "ts" not in arg_keys(arg) and config is not None and \
            get_real_task(config.task.name).procedure == "won":
        ts = [-t for t in ts]
    return [{"transform.name": "exp", "transform.t": t} for t in ts]

