"""The CTRL run loop: rollout -> score -> calibrate -> transform -> update, checkpointed.

    run(config, workdir) -> (final state, summary dict)

`config` is the `ConfigDict` of `configs/ctrl_*.py` (sections task, reference, transform, rl, train,
mesh; optionally method and bonbon). Every step is `guarded_rl_step` (the pure step of
`rl.make_rl_split_step` for RLOO or PPO of one epoch, `rl.make_rl_step` for PPO of several) — or,
with `method="bonbon"`, `bon_distillation.make_bonbon_split_step` (the same state) — wrapped by
`guard_nonfinite` and jitted once with explicit in/out shardings and the state donated.

Exact resume. Everything a step depends on is a function of what the checkpoint holds:
* params, optimiser state and the step counter are the checkpointed `RLState`;
* the step's RNG key is `fold_in(key(seed), step)`, not a carried key;
* the step's prompts are `data.pipeline.global_batch_indices(loader_cfg, n, step)`, a pure
  function of (seed, epoch, index); each process feeds the rows the mesh puts on its devices
  (`distributed.host_local_batch`);
so a run killed after step k and restarted from the work dir produces the same parameters as a run
that was never interrupted (tests/test_train.py checks bit equality).

Non-finite steps. The jitted step keeps the previous state when any metric or any floating leaf of
the new state (parameters, optimiser states, critic, beta) is not finite and reports
`skipped = 1`. With `train.nan_policy = "stop"` (default) the loop then stops with
the step and the offending metrics named; the last checkpoint is the last good state. With
"skip" the loop counts the skip and goes on. A skipped step keeps the optimiser state whole, its
update count included, so the learning-rate decay (`rl.decay_steps`, a function of that count)
falls one step behind per skip, as under `optax.apply_if_finite`; the step counter, and with it
the batch, the rollout key and the beta schedule, moves on. Under gradient accumulation a skip
leaves the accumulator where it was, so later windows close one step later; micro-steps still
waiting in the last window when the run ends are logged and counted (summary
`unapplied_micro_steps`).

A reward model that cuts texts past its length limit (`HostReward.cut`) has its cuts counted:
`reward_texts_cut` per step in the metrics, the run's total in the summary, a log line the first
time; the checkpoints keep the count, so a resumed run's total is the whole run's.

Outputs in the work dir: `manifest.json` (config, seeds, packages, devices, mesh, git, input hashes),
`reference_table.npz`, `checkpoints/`, `metrics.jsonl` + `tb/` (TensorBoard) every step,
`eval.jsonl` every `eval_every` steps, `summary.json` and `training_curves.png` at the end; with
`config.export.hf` (real tasks) the trained policy as a transformers checkpoint in `export/hf`
(`export_hf`, also `experiments/export.py`).

LoRA (`config.rl.lora.rank` > 0, `models.lora`): the state's params (and the checkpoints) are the
adapters; the policy is pi_ref's parameters with them attached (`rl.step.policy_params`), and the
manifest records the base (`extra.lora`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.rl import bon_distillation, tasks as rl_tasks
from infalign_jax.infra import checkpointing, distributed, provenance, sharding
from infalign_jax.infra import validate as check
from infalign_jax import models, rl
from infalign_jax.models import lora
from infalign_jax.rewards import judges
from infalign_jax.rl.step import policy_params
from infalign_jax.rl.config import check_kl_horizon
from infalign_jax.data import pipeline
from infalign_jax.core.calibration import ReferenceTable, ReferenceTableError, load_reference_table
from infalign_jax.infra.config_utils import UNUSED_OPTION_RULES, dataclass_from, section
from infalign_jax.infra.metrics_io import read_jsonl
from infalign_jax.loops.skeleton import LoopContext, run_loop
from infalign_jax.core.transforms import transform_from_config
from infalign_jax.core.types import HostReward, SplitStep
from infalign_jax.infra.files import atomic_path, no_empty_dirs_left, save_figure, write_json

logger = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")
METHODS = ("ctrl", "bonbon")   # the KL-regularised RL step, or BoN distillation (BoNBoN)


class NonFiniteStepError(FloatingPointError):
    """A step produced NaN/Inf; the state was left at the previous step's values."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    _config_owner = "config.train"
    num_steps: int = 100
    batch_size: int = 8            # prompts per step (times rl.samples_per_prompt responses)
    log_every: int = 10
    eval_every: int = 0            # 0: evaluate at the end only
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    nan_policy: str = "stop"
    async_checkpoint: str = "auto"   # "true" | "false" | "auto": checkpointing.ASYNC_CHECKPOINT
    tensorboard: bool = True
    # A run dir, its checkpoints/ dir or a step dir: a fresh run starts from those parameters
    # (e.g. another config's run, which cannot be resumed under this one).
    init_from: str = ""

    def __post_init__(self):
        check.ints(self, ("num_steps", "batch_size", "log_every", "checkpoint_every",
                          "keep_checkpoints"))
        check.ints(self, ("eval_every",), low=0)
        check.choice(self, "nan_policy", NAN_POLICIES)
        checkpointing.check_async_checkpoint(self)
        if not isinstance(self.init_from, str):
            check.fail(self, "init_from", "a directory path or ''")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    _config_owner = "config.export"
    hf: bool = False    # at the end of the run, the trained policy as a transformers checkpoint
    dir: str = ""       # where; "" = <workdir>/export/hf

    def __post_init__(self):
        check.bools(self, ("hf",))
        if not isinstance(self.dir, str):
            check.fail(self, "dir", "a directory path or ''")


def export_config(config: Any) -> ExportConfig:
    """`config.export` (a section only some configs have; none: no export)."""
    return dataclass_from(ExportConfig, section(config, "export") if "export" in config else {},
                          "export")


def export_hf(run_dir: str, out_dir: str, step: int | None = None) -> dict[str, Any]:
    """Writes the policy of CTRL run `run_dir` (its newest checkpoint, or `step`; a LoRA run's
    adapters merged into its base) as a transformers checkpoint (config.json, model.safetensors,
    the base policy's tokenizer) in `out_dir`; returns what was written. Only real-task runs have
    a transformers policy and tokenizer; other runs are refused by name."""
    from infalign_jax.models import hf_import
    from infalign_jax.rl.tasks import sources
    manifest = sources.run_manifest(run_dir)
    if not manifest:
        raise ValueError(f"export: {run_dir!r} is not a run directory (manifest.json + "
                         f"checkpoints/)")
    with open(manifest, encoding="utf-8") as f:
        task = (json.load(f).get("config") or {}).get("task") or {}
    if "policy" not in task and "gguf_path" not in task:
        raise ValueError(f"export: the run {run_dir!r} is a {task.get('name', '?')!r} run; its "
                         f"policy is not a transformers model with a tokenizer (only real-task "
                         f"runs, config.task.policy, can be exported)")
    path = run_dir if step is None else os.path.join(os.path.dirname(manifest), "checkpoints",
                                                     str(int(step)))
    if step is not None and not os.path.isdir(path):
        raise ValueError(f"export: the run {run_dir!r} has no checkpoint step {step}")
    policy = sources.load_run_policy(path, manifest)
    if not hasattr(policy.tokenizer, "save_pretrained"):
        raise ValueError(f"export: the run {run_dir!r}'s tokenizer "
                         f"({type(policy.tokenizer).__name__}) is not a transformers tokenizer")
    hf_import.save_hf_checkpoint(out_dir, policy.model_cfg, policy.params,
                                 tokenizer=policy.tokenizer)
    return {"dir": os.path.abspath(out_dir), "checkpoint": policy.source}


def step_batch(prompts_XxP: np.ndarray, prompt_mask_XxP: np.ndarray,
               loader_cfg: pipeline.LoaderConfig, mesh: jax.sharding.Mesh, step: int
               ) -> dict[str, jax.Array]:
    """The prompts of `step` as global arrays on `mesh`: the global batch
    (`pipeline.global_batch_indices`), each process feeding the rows the mesh puts on its
    devices (`distributed.host_local_batch`; on one process all of them), whatever axes span
    the processes."""
    idx = pipeline.global_batch_indices(loader_cfg, len(prompts_XxP), step)
    host = {"prompt_BxP": prompts_XxP[idx], "prompt_mask_BxP": prompt_mask_XxP[idx],
            "prompt_idx_B": idx.astype(np.int32)}
    return sharding.shard_batch(distributed.host_local_batch(host, mesh), mesh,
                                global_rows=len(idx))


def rl_config(config: Any, task: rl_tasks.RLTask) -> rl.RLConfig:
    """`rl.RLConfig` from `config.rl` + `config.transform`; the task sets EOS/pad ids."""
    name, params = transform_from_config(section(config, "transform"), strict=True)
    values = section(config, "rl")
    return dataclass_from(rl.RLConfig, values, "rl", transform=name, transform_params=params,
                           eos_id=task.eos_id, pad_id=task.pad_id)


def bonbon_config(config: Any, task: rl_tasks.RLTask) -> bon_distillation.BoNBoNConfig:
    """BoNBoN (Gui et al. 2024) from `config.bonbon`; sampling length/ids as the RL section's."""
    return dataclass_from(bon_distillation.BoNBoNConfig, section(config, "bonbon"), "bonbon",
                          max_new_tokens=int(config.rl.max_new_tokens), eos_id=task.eos_id,
                          pad_id=task.pad_id, learning_rate=float(config.rl.learning_rate),
                          decay_steps=int(config.rl.decay_steps),
                          shared_prompt=config.rl.get("shared_prompt",
                                                      rl.RLConfig.shared_prompt))


def train_config(config: Any) -> TrainConfig:
    return dataclass_from(TrainConfig, section(config, "train"), "train")


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the mesh splits a batch (the product of the "batch" rule's axes)."""
    spec = sharding.batch_sharding(mesh, 1).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def all_finite(state: Any, metrics: Mapping[str, jax.Array]) -> jax.Array:
    """Whether every metric and every floating leaf of `state` is finite (a bool scalar)."""
    finite = [jnp.all(jnp.isfinite(v)) for v in metrics.values()]
    # Leaves of one shape and dtype share one reduction (x * 0 is 0, or NaN where x is not
    # finite; fused elementwise, no copy): a reduction per leaf would triple the check's
    # reductions at SmolLM2's size and its compile time.
    zeros: dict[Any, jax.Array] = {}
    for x in jax.tree.leaves(state):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            key = (x.shape, x.dtype)
            zeros[key] = zeros[key] + x * 0 if key in zeros else x * 0
    finite += [jnp.all(jnp.isfinite(z)) for z in zeros.values()]
    return jnp.all(jnp.stack(finite))


def guard_nonfinite(step_fn: Callable | SplitStep) -> Callable:
    """Wraps a step: if a metric or any floating leaf of the new state (params, optimiser states,
    critic, beta) is non-finite, keep the old state (counted).

    The whole state, not only the policy: a NaN critic, Adam moment or accumulated gradient kept
    here poisons every later step. One branch over the whole state, not a select per leaf (a
    per-leaf `where` copies the flag into every parameter's fusion). A SplitStep is guarded
    without holding two states: its `apply` runs once for the check (fused into the reductions)
    and again inside the branch that keeps it, in place of the donated state. A plain step's new
    state is held beside the old one until the branch. For one Adam update at SmolLM2-135M's
    shapes the temporaries are 0.60 GiB split against 1.60 GiB plain (`bench/guard_memory.py`)."""
    if not isinstance(step_fn, SplitStep):   # a whole step: its new state is what it applies
        step_fn = SplitStep(step_fn, lambda state, new_state: new_state)
    prepare, apply = step_fn

    def guarded(state: Any, *args: Any):
        pending, metrics = prepare(state, *args)
        ok = all_finite(apply(state, pending), metrics)
        kept = jax.lax.cond(ok, apply, lambda old, _: old, state, pending)
        return kept._replace(step=state.step + 1), {**metrics, "skipped": (~ok).astype(jnp.int32)}

    return guarded


def guarded_rl_step(cfg: rl.RLConfig, fns: Any, reward_fn: Any, optimizer: Any,
                    rollout_params: Callable | None = None) -> Callable:
    """The CTRL step as the trainer runs it, under `guard_nonfinite`: `rl.make_rl_split_step`
    where the update is one optimiser step (the guard then holds one state), else the whole
    `rl.make_rl_step` (PPO of several epochs). `workflows.compile_check` compiles this."""
    args = (cfg, fns, reward_fn, optimizer, rollout_params)
    return guard_nonfinite(rl.make_rl_split_step(*args) or rl.make_rl_step(*args))


REFERENCE_TABLE = "reference_table.npz"   # a run dir's reference table (`prepare_reference_table`)


def share_reference_table(table_path: str, run_dir: str) -> bool:
    """Copies a drawn reference table into `run_dir` (as its REFERENCE_TABLE) for a run of the
    same task and reference settings to reuse, unless the dir holds one: the copy is whole or
    absent, and the run's `prepare_reference_table` checks whatever is there. Returns whether it
    copied."""
    dst = os.path.join(run_dir, REFERENCE_TABLE)
    if os.path.exists(dst):
        return False
    with atomic_path(dst) as tmp:
        shutil.copyfile(table_path, tmp)
    return True


def reference_settings(config: Any) -> tuple[int, int]:
    """(K, seed) of `config.reference`, validated."""
    c = dataclass_from(rl_tasks.ReferenceConfig, section(config, "reference"), "reference")
    return c.k, c.seed


def _recorded_settings(table: ReferenceTable, path: str) -> dict[str, Any] | None:
    """The (K, seed) `table` was built with: recorded inside the npz (`created["reference"]`; a
    `calibration_pass` table's own `seed` and K), or, for tables written before that, in the
    `reference_table.json` the trainer wrote after them; None when nothing records them."""
    if "reference" in table.created:
        return dict(table.created["reference"])
    if "seed" in table.created and "num_samples_per_prompt" in table.created:
        return {"k": int(table.created["num_samples_per_prompt"]),
                "seed": int(table.created["seed"])}
    legacy = os.path.splitext(path)[0] + ".json"
    if os.path.exists(legacy):
        with open(legacy) as f:
            return json.load(f)
    return None


def prompt_digests(task: rl_tasks.RLTask) -> dict[str, str]:
    """{prompt id: sha256 (16 hex) of its token ids}: what a table's row was drawn for, so a
    prompt file edited under the same ids is not scored against the old texts' references."""
    return {str(pid): hashlib.sha256(np.asarray(row)[np.asarray(m, bool)].astype(np.int64)
                                     .tobytes()).hexdigest()[:16]
            for pid, row, m in zip(task.prompt_ids, task.prompts_XxP, task.prompt_mask_XxP)}


def prepare_reference_table(task: rl_tasks.RLTask, path: str, k: int, seed: int,
                            log: Callable[[str], None] | None = None) -> ReferenceTable:
    """Loads `path` (checking it belongs to this task's reward and base models, holds every
    training prompt and was built with this K and seed) or builds it once.

    K and seed are recorded inside the npz (its metadata's `created["reference"]`), written in
    the same atomic save as the table, so a table never lies beside a settings file that is
    missing or another table's. A table that records no settings is refused, never assumed.

    Several processes: all must see the file or none (the work dir is shared); a table built
    here is drawn by all of them together (each its share of the prompts) and written by
    process 0, which the others wait for.
    """
    log = log or logger.info
    exists = os.path.exists(path)
    if jax.process_count() > 1:
        seen = distributed.stack_from_processes(np.asarray(exists))
        if seen.any() and not seen.all():
            raise ReferenceTableError(
                f"{path} exists for processes {np.flatnonzero(seen).tolist()} but not for "
                f"{np.flatnonzero(~seen).tolist()}: the work dir must be one file system that "
                f"every process shares")
    if exists:
        table = load_reference_table(path, expected_reward_model_id=task.reward_model_id,
                                     expected_base_model_id=task.base_model_id)
        table.lookup(list(task.prompt_ids))  # every training prompt must be in it
        built = _recorded_settings(table, path)
        if built is None:
            raise ReferenceTableError(
                f"{path} does not record the config.reference.k and config.reference.seed it "
                f"was built with (an older or interrupted write); delete it to rebuild it with "
                f"config.reference.k={k}, config.reference.seed={seed}, or use another work dir")
        differ = [f"config.reference.{key}: table {built.get(key)}, config {want}"
                  for key, want in (("k", k), ("seed", seed)) if built.get(key) != want]
        # the same K and seed drawn in other batches or chunks: other samples (tables recording
        # no split are not compared)
        draw = task.reference_draw(k) if task.reference_draw is not None else {}
        differ += [f"{name}: table {table.created[key]}, config {want}"
                   for name, (key, want) in draw.items()
                   if key in table.created and table.created[key] != want]
        if differ:
            raise ReferenceTableError(
                f"{path} was built with other reference settings ({'; '.join(differ)}); use "
                f"another work dir, or delete the table to rebuild it")
        recorded = built.get("prompts")
        if recorded is None:
            log(f"warning: {path} predates prompt digests, so it cannot be checked against "
                f"edited prompt texts; delete it to rebuild it if the prompts changed")
        else:
            changed = [pid for pid, d in prompt_digests(task).items() if recorded.get(pid) != d]
            if changed:
                raise ReferenceTableError(
                    f"{path} was drawn for other texts of {len(changed)} prompt(s) under the "
                    f"same ids (e.g. {changed[:5]}); delete it to rebuild it, or use another "
                    f"work dir")
        log(f"reusing reference table {path} ({table.num_prompts} prompts, K={k}, seed={seed})")
        return table
    table = task.reference_table(k, seed, partial_path=os.path.splitext(path)[0] + ".partial.npz",
                                 progress=log)
    table = dataclasses.replace(table, created={**table.created, "reference": {
        "k": int(k), "seed": int(seed), "prompts": prompt_digests(task)}})
    if distributed.is_primary():
        table.save(path)
    distributed.barrier(distributed.numbered("reference_table_saved"))
    return table


def _given_reference_table(task: rl_tasks.RLTask, given: str | None, table_path: str, k: int,
                           seed: int, log: Callable[[str], None]) -> ReferenceTable:
    """`prepare_reference_table` of the run dir's table, after copying `given` there when the
    dir holds none; the copy is removed again when it is refused (a rerun then copies the right
    one, instead of finding a wrong table in its dir)."""
    copied = False
    if given:
        if distributed.is_primary():
            copied = share_reference_table(given, os.path.dirname(table_path))
        distributed.barrier(distributed.numbered("reference_table_given"))
        if distributed.is_primary():   # the one that copied knows whether it did
            log(f"reference table {given} copied into the work dir" if copied else
                f"the work dir holds a reference table already; {given} not copied")
    try:
        return prepare_reference_table(task, table_path, k, seed, log)
    except ReferenceTableError:
        if copied:
            os.remove(table_path)
        raise


def _kl_budget(config: Any) -> float:
    """`config.task.kl_budget` (0 when unset) of a ConfigDict or a plain dict."""
    return float((config.get("task") or {}).get("kl_budget", 0.0) or 0.0)


# A KL budget solves beta (`_beta_for_budget`): an rl.beta override would be logged as unused.
UNUSED_OPTION_RULES.append(
    lambda config: {"rl.beta": "task.kl_budget=0 (a budget > 0 solves beta)"}
    if _kl_budget(config) > 0 else {})


def _check_budget(config: Any, task: rl_tasks.RLTask, cfg: rl.RLConfig, bonbon: bool) -> None:
    """Refuses a `config.task.kl_budget` the run cannot honour (before the table is built)."""
    budget = _kl_budget(config)
    if budget <= 0:
        return
    if task.beta_for_kl is None:
        raise ValueError(f"config.task.kl_budget={budget}: task {task.name!r} has no exact target "
                         f"to solve beta from; set config.rl.beta instead")
    if bonbon:
        raise ValueError("config.task.kl_budget sets the CTRL beta; method='bonbon' has none")
    if cfg.beta_schedule != "constant":
        raise ValueError(f"config.task.kl_budget={budget} solves one constant beta, but "
                         f"config.rl.beta_schedule={cfg.beta_schedule!r} moves beta during the "
                         f"run; set config.rl.beta_schedule='constant' or "
                         f"config.task.kl_budget=0")


def end_beta(cfg: rl.RLConfig, state: rl.RLState | None, num_steps: int) -> float:
    """The beta the run ends at, whose pi* the evaluation compares with: the schedule's beta at
    the last step (0-based num_steps - 1; "linear" and an unfinished warm-up included), or the
    adaptive controller's current beta (`state.beta`; only it reads `state`)."""
    if cfg.beta_schedule == "adaptive":
        return float(jax.device_get(state.beta))
    return float(rl.scheduled_beta(cfg, num_steps - 1))


def _beta_for_budget(config: Any, task: rl_tasks.RLTask, cfg: rl.RLConfig, table: ReferenceTable,
                     num_steps: int, log: Callable[[str], None]) -> rl.RLConfig:
    """`cfg` with beta solved from `config.task.kl_budget` (> 0; `_check_budget` passed) so that
    the beta the run ends at (after a warm-up that outlasts the run, too) has the budget's KL."""
    budget = _kl_budget(config)
    if budget <= 0:
        return cfg
    beta = task.beta_for_kl(budget, cfg.get_transform(), table)
    warmup = float(rl.scheduled_beta(dataclasses.replace(cfg, beta=1.0), num_steps - 1))
    log(f"beta = {beta:.6g} at the last step: the exact target's KL(pi* || pi_ref) is "
        f"config.task.kl_budget = {budget:g} (config.rl.beta={cfg.beta:g} is not used"
        + (f"; the warm-up still multiplies beta by {warmup:.4g} there" if warmup != 1.0 else "")
        + ")")
    return dataclasses.replace(cfg, beta=beta / warmup)


def convergence_report(task: rl_tasks.RLTask, scalars: dict[str, float],
                       log: Callable[[str], None], bon_n: int | None = None) -> dict[str, Any]:
    """For tasks with an exact target: whether the run reached it (KL(pi || target) <= the task's
    threshold), said in the log and returned for summary.json; {} otherwise. The target is pi*,
    or BoN_n(pi_ref) for a BoNBoN run (`bon_n`)."""
    if task.converged_kl is None or "exact_kl_to_target" not in scalars:
        return {}
    dist = scalars["exact_kl_to_target"]
    converged = bool(dist <= task.converged_kl)
    name = "pi*" if bon_n is None else f"BoN_{bon_n}"
    if converged:
        log(f"converged: KL(pi || {name}) = {dist:.4g} <= {task.converged_kl}")
    elif bon_n is None:
        log(f"NOT CONVERGED: KL(pi || pi*) = {dist:.4g} > {task.converged_kl}; the target is "
            f"range(Phi)/beta = {scalars.get('range_phi_over_beta', float('nan')):.1f} sharp "
            f"(above ~20 it needs config.rl.beta_anneal_steps and more steps); the exact_* numbers "
            f"are not those of pi*")
    else:
        log(f"NOT CONVERGED: KL(pi || {name}) = {dist:.4g} > {task.converged_kl}; BoNBoN's loss "
            f"has BoN_{bon_n} as its minimiser only at bonbon.alpha = 1 (its preference term "
            f"matches BoN_{bon_n}'s mean log-ratio gap, not the policy); the exact_* numbers are "
            f"not those of BoN_{bon_n}")
    return {"converged": converged, "kl_to_target": dist, "converged_kl": task.converged_kl,
            "target": name}


def _frozen(task: rl_tasks.RLTask, table: ReferenceTable, param_shardings: Any,
            mesh: jax.sharding.Mesh) -> rl.Frozen:
    sorted_XxK, count_X = table.lookup(list(task.prompt_ids))  # a missing prompt fails here
    rep = sharding.replicated(mesh)
    return rl.Frozen(jax.device_put(task.ref_params, param_shardings),
                     jax.device_put(task.reward_params, rep),
                     jax.device_put(jnp.asarray(sorted_XxK), rep),
                     jax.device_put(jnp.asarray(count_X), rep))


def _plot_curves(metrics_path: str, out_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(metrics_path)
    if not rows:
        return
    keys = [k for k in ("transformed_reward", "calibrated_reward", "kl_k1", "kl_full_vocab",
                        "entropy", "grad_norm") if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    steps = [r["step"] for r in rows]
    for ax, key in zip(np.atleast_1d(axes), keys):
        ax.plot(steps, [float(r[key]) for r in rows], lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, out_path, dpi=110)
    plt.close(fig)


def _check_run(task: rl_tasks.RLTask, cfg: rl.RLConfig, tcfg: TrainConfig,
               bonbon: bon_distillation.BoNBoNConfig | None, mesh: jax.sharding.Mesh,
               log: Callable[[str], None]) -> None:
    """Refuses (or warns about) settings the task, the schedule or the mesh cannot honour."""
    if bonbon is not None and bonbon.data != "online":
        # The step reads data="offline" responses from the batch, which this loop (prompts
        # only) has no source for; the library's step takes them (bon_distillation).
        raise ValueError(f"config.bonbon.data={bonbon.data!r}: the training loop feeds prompts "
                         f"only, so BoNBoN runs here need config.bonbon.data='online' (offline "
                         f"responses are for bon_distillation.make_bonbon_step called directly)")
    if task.response_length is not None and cfg.max_new_tokens != task.response_length:
        raise ValueError(f"config.rl.max_new_tokens={cfg.max_new_tokens} but task "
                         f"{task.name!r} scores responses of exactly length "
                         f"{task.response_length} (its reward / reference table assume that "
                         f"budget); set them equal")
    if task.reference_temperature != 1.0:
        raise ValueError(f"config.task.temperature={task.reference_temperature}: the reference "
                         f"table would calibrate pi_ref's samples at that temperature, but the "
                         f"rollouts sample at temperature 1; train with 1.0 (other temperatures "
                         f"are for experiments/calibrate.py and evaluate.py)")
    if task.reference_require_eos:
        raise ValueError("config.task.require_eos=True: the reference table would keep only "
                         "pi_ref's samples that emitted EOS, while the rollouts are scored "
                         "truncated or not, so C would not be uniform under pi_ref; train with "
                         "False (True is for experiments/calibrate.py and evaluate.py)")
    accum = bonbon.grad_accum_steps if bonbon is not None else cfg.grad_accum_steps
    if tcfg.num_steps % accum:
        key = "bonbon" if bonbon is not None else "rl"
        raise ValueError(f"config.train.num_steps={tcfg.num_steps} is not a multiple of "
                         f"config.{key}.grad_accum_steps={accum}: the last "
                         f"{tcfg.num_steps % accum} steps' gradients would wait in the "
                         f"accumulator and never be applied")
    if bonbon is None and cfg.beta_anneal_steps > tcfg.num_steps:
        log(f"warning: config.rl.beta_anneal_steps={cfg.beta_anneal_steps} > "
            f"config.train.num_steps={tcfg.num_steps}: the run ends before beta reaches "
            f"config.rl.beta, so it cannot reach the target pi* of that beta (the evaluation "
            f"compares with pi* of the beta it ends at)")
    if cfg.lora.rank:
        lora.target_names(cfg.lora, task.ref_params)   # a target the model lacks fails here
    if bonbon is None and cfg.beta_schedule == "adaptive":   # before the reference table
        check_kl_horizon(cfg.kl_horizon, tcfg.batch_size * cfg.samples_per_prompt)
    if tcfg.batch_size > len(task.prompt_ids):
        raise ValueError(f"config.train.batch_size={tcfg.batch_size} exceeds the task's "
                         f"{len(task.prompt_ids)} prompts")
    shards = batch_shards(mesh)
    if tcfg.batch_size % shards:   # the global batch (every process's rows together)
        raise ValueError(f"config.train.batch_size={tcfg.batch_size} is not divisible by the "
                         f"{shards} batch shards of the mesh {dict(mesh.shape)}; change the "
                         f"batch size or config.mesh")


def _sharded_start(task: rl_tasks.RLTask, step_cfg: Any, cfg: rl.RLConfig, table: ReferenceTable,
                   mesh: jax.sharding.Mesh, seed: int, bonbon: bool, rollout_layout: str = "train"
                   ) -> tuple[Any, ...]:
    """(state, frozen, jitted step) laid out on `mesh`; the policy starts as a copy of pi_ref.
    The CTRL rollout decodes from `rollout_layout` (`sharding.rollout_resharder`; with LoRA the
    base weights are resharded and the adapters attached as they are)."""
    logical = models.param_logical_axes(task.model_cfg)
    param_sh = sharding.logical_to_shardings(logical, task.ref_params, mesh)
    optimizer = rl.make_optimizer(step_cfg)
    rep = sharding.replicated(mesh)
    if cfg.lora.rank:   # the trained params are the adapters (small: replicated)
        params = jax.device_put(lora.init_adapters(cfg.lora, task.ref_params,
                                                   jax.random.key(seed + 2)), rep)
    else:
        params = jax.device_put(rl_tasks.replicate_params(task.ref_params), param_sh)
    extra = {} if bonbon else rl.init_extra_state(cfg, jax.random.key(seed + 1))
    state = rl.RLState(params, sharding.sharded_optimizer_init(optimizer, params, mesh),
                       jax.device_put(jnp.zeros((), jnp.int32), rep),
                       **jax.device_put(extra, rep))
    frozen = _frozen(task, table, param_sh, mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    fns = models.decoder_fns(task.model_cfg)
    reshard = sharding.rollout_resharder(rollout_layout, logical, mesh)
    if not bonbon and isinstance(task.reward_fn, HostReward) and jax.process_count() == 1:
        return state, frozen, _host_reward_step(step_cfg, fns, task.reward_fn, optimizer,
                                                state_sh, frozen_sh, rep, reshard)
    if bonbon:
        step = guard_nonfinite(bon_distillation.make_bonbon_split_step(
            step_cfg, fns, task.reward_fn, optimizer, cfg.lora))
    else:
        step = guarded_rl_step(step_cfg, fns, task.reward_fn, optimizer, reshard)
    step_fn = jax.jit(step, in_shardings=(state_sh, frozen_sh, None, rep),
                      out_shardings=(state_sh, rep), donate_argnums=(0,))
    return state, frozen, step_fn


def _host_reward_step(cfg: rl.RLConfig, fns: Any, reward: HostReward, optimizer: Any,
                      state_sh: Any, frozen_sh: Any, rep: Any,
                      reshard: Callable | None = None) -> Callable:
    """The CTRL step for a host-side reward (a text judge): the jitted rollout, the judge on the
    host with numpy arrays, the jitted (guarded) update. Neither program holds a host callback,
    so a second run of the same config loads both from JAX's persistent compilation cache."""
    programs = rl.make_rl_programs(cfg, fns, optimizer, reshard)
    roll = jax.jit(programs.roll, in_shardings=(state_sh, None, rep, frozen_sh))
    learn = jax.jit(guard_nonfinite(programs.learn_split or programs.learn),
                    in_shardings=(state_sh, frozen_sh, None, rep), out_shardings=(state_sh, rep),
                    donate_argnums=(0,))

    def step_fn(state: rl.RLState, frozen: rl.Frozen, batch: Any, rng: jax.Array):
        ro = roll(state, batch, rng, frozen)
        return learn(state, frozen, ro, jax.device_put(rl.host_rollout_rewards(reward, ro), rep))

    return step_fn


def run(config: Any, workdir: str, *, log: Callable[[str], None] | None = None,
        devices: Any = None, reference_table: str | None = None
        ) -> tuple[rl.RLState, dict[str, Any]]:
    """Runs (or resumes) the CTRL run of `config` in `workdir`; returns the final state and the
    summary. `devices` restricts the mesh. A run that fails leaves no empty work dir behind.
    `reference_table`: a table drawn elsewhere (`experiments/calibrate.py`, once for the points
    of a sweep), copied into `workdir` unless it holds one (`share_reference_table`) and checked
    there like any; a copy the run refuses is removed again.

    The order is the contract (and why `_run` is one function): every config and mesh check
    before any expensive work, the reference table before the state, the manifest only once the
    resume is accepted (`loops.skeleton`), the summary and plots after the last checkpoint.
    """
    with no_empty_dirs_left(workdir):
        return _run(config, workdir, log, devices, reference_table)


def _run(config: Any, workdir: str, log: Callable[[str], None] | None, devices: Any,
         reference_table: str | None = None) -> tuple[rl.RLState, dict[str, Any]]:
    started, code = provenance.now(), provenance.code_state()
    log = log or (lambda s: print(s, flush=True))
    seed = int(check.int_arg("config.seed", config.get("seed"), low=0))
    tcfg = train_config(config)
    checkpointing.check_writable(workdir)          # before any expensive work
    export = export_config(config)
    if reference_table and not os.path.isfile(reference_table):
        raise FileNotFoundError(f"reference table {reference_table!r}: no such file (draw it "
                                f"first: experiments/calibrate.py with this --config)")
    if export.hf and "policy" not in config.task:
        raise ValueError(f"config.export.hf=True: task {config.task.name!r} has no transformers "
                         f"policy and tokenizer to export (only the real tasks' "
                         f"config.task.policy)")
    log(f"task {config.task.name}: loading ...")
    task = rl_tasks.build_task(config.task)
    cfg = rl_config(config, task)
    method = str(config.get("method", "ctrl"))
    if method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}, got {method!r}")
    # The section is checked wherever a config has it (a bad value there is refused under
    # method="ctrl" too), and read only under method="bonbon".
    parsed = bonbon_config(config, task) if method == "bonbon" or "bonbon" in config else None
    bonbon = parsed if method == "bonbon" else None
    ref_k, ref_seed = reference_settings(config)
    mesh_cfg = sharding.mesh_config_from_dict(section(config, "mesh"))
    mesh = sharding.make_mesh(mesh_cfg, devices)
    _check_run(task, cfg, tcfg, bonbon, mesh, log)
    _check_budget(config, task, cfg, bonbon is not None)
    table_path = os.path.join(workdir, REFERENCE_TABLE)
    table = _given_reference_table(task, reference_table, table_path, ref_k, ref_seed, log)
    cfg = _beta_for_budget(config, task, cfg, table, tcfg.num_steps, log)
    transform = cfg.get_transform()
    manifest = dict(config=config, seeds={"seed": seed, "reference": ref_seed},
                    inputs={"reference_table": table_path}, mesh=mesh, started=started, code=code,
                    extra={} if bonbon is not None else {"beta": cfg.beta})   # BoNBoN: none
    if bonbon is None and transform.params.get("path"):   # an optimal transform's table
        manifest["inputs"]["transform_table"] = transform.params["path"]
    if bonbon is None and cfg.beta_schedule != "adaptive":   # the beta of the evaluation's pi*
        manifest["extra"]["end_beta"] = end_beta(cfg, None, tcfg.num_steps)
    if cfg.lora.rank:
        manifest["extra"]["lora"] = {
            "base": task.base_model_id,
            "targets": list(lora.target_names(cfg.lora, task.ref_params)),
            "adapter_params": lora.num_adapter_params(lora.adapter_shapes(cfg.lora,
                                                                          task.ref_params))}
    per_prompt = cfg.samples_per_prompt if bonbon is None else bonbon.n
    loader_cfg = pipeline.LoaderConfig(batch_size=tcfg.batch_size, seed=seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
    dropped = pipeline.dropped_per_epoch(loader_cfg, len(task.prompt_ids))
    if dropped:   # shuffled, each epoch leaves out other prompts
        log(f"{dropped} of {len(task.prompt_ids)} prompts fit no batch each epoch "
            f"(config.train.batch_size={tcfg.batch_size})")
    root = jax.random.key(seed)

    with sharding.axis_rules(mesh):
        state, frozen, step_fn = _sharded_start(task, bonbon or cfg, cfg, table, mesh, seed,
                                                bonbon is not None, mesh_cfg.rollout)
        log(f"{method} step on mesh {dict(mesh.shape)}: the first step compiles it ...")

        cut = getattr(task.reward_fn, "cut", None)   # a judge that cuts long texts

        def one_step(state: rl.RLState, step: int, context: LoopContext):
            batch = step_batch(task.prompts_XxP, task.prompt_mask_XxP, loader_cfg, mesh, step)
            t0 = time.perf_counter()
            cuts = judges.cuts_since(cut)
            state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(root, step))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            if metrics.pop("skipped"):
                _handle_nonfinite(tcfg, step + 1, metrics, context, log)
            metrics.update(step_time_s=dt, skipped_total=context.counters["skips"])
            if cut:
                _count_reward_cuts(cuts(), step + 1, metrics, context, log)
            if "response_length" in metrics:  # BoNBoN without monitor samples has none
                metrics["tokens_per_s"] = (metrics["response_length"] * tcfg.batch_size
                                           * per_prompt / dt)
            return state, metrics

        def evaluate(state: rl.RLState, step: int) -> dict[str, float]:
            # pi* of the beta the run ends at, not cfg.beta (the schedule's start); BoNBoN's
            # target is BoN_n(pi_ref), whatever the transform and beta.
            beta = cfg.beta if bonbon is not None else end_beta(cfg, state, tcfg.num_steps)
            target = {} if bonbon is None else {"bon_n": bonbon.n}
            # A collective: parameters may be spread over the devices of several processes.
            params = distributed.gather_to_host(policy_params(cfg, state.params, frozen))
            with sharding.no_mesh():   # on this host's device, readable by every process
                return task.evaluate(params, transform, beta, table, **target)

        result = run_loop(workdir, state, one_step, tcfg, seed=seed, manifest=manifest, log=log,
                          progress_keys=("transformed_reward", "calibrated_reward", "kl_k1",
                                         "kl_full_vocab", "step_time_s"),
                          evaluate=None if task.evaluate is None else evaluate,
                          counters=("skips", "reward_cuts"),
                          # the solved beta depends on num_steps while a warm-up outlasts the
                          # run: a resume with more steps would train its rest at another beta
                          derived={"rl.beta": float(f"{cfg.beta:.10g}")} if _kl_budget(config) > 0
                          else None)

    # A skipped step leaves the accumulator where it was: the last window may still be open.
    pending = rl.pending_micro_steps(result.state.opt_state)
    if pending:
        log(f"warning: the last {pending} micro-steps' gradients wait in the accumulator and "
            f"were not applied (config.train.nan_policy='skip' skipped "
            f"{result.counters['skips']} steps, so the accumulation windows closed later); "
            f"counted in the summary as unapplied_micro_steps")
    # The task's prompts reach training whole (padded to the longest, never cut); those that fit
    # no batch of an epoch are counted.
    summary = {"final_step": tcfg.num_steps, "resumed_from": result.resumed_from,
               "train_data": {"prompts": len(task.prompt_ids), "dropped_per_epoch": dropped,
                              "prompt_tokens": int(task.prompts_XxP.shape[1])},
               "skipped_steps": result.counters["skips"], "unapplied_micro_steps": pending,
               "reward_texts_cut": result.counters["reward_cuts"],
               "last_train_metrics": result.last_metrics, "eval": result.last_eval}
    summary.update(convergence_report(task, result.last_eval, log,
                                      None if bonbon is None else bonbon.n))
    if export.hf:   # from the last checkpoint (the final state), as experiments/export.py does
        out_dir = export.dir or os.path.join(workdir, "export", "hf")
        summary["export"] = distributed.from_primary(distributed.numbered("export_hf"),
                                                     lambda: export_hf(workdir, out_dir))
        log(f"exported {summary['export']['checkpoint']} as a transformers checkpoint to "
            f"{summary['export']['dir']}")
    if distributed.is_primary():   # one writer of the run's files; every process returns them
        write_json(os.path.join(workdir, "summary.json"), summary, sort_keys=True)
        _plot_curves(os.path.join(workdir, "metrics.jsonl"),
                     os.path.join(workdir, "training_curves.png"))
        provenance.write_manifest(workdir, **{**manifest, "extra": {**manifest["extra"],
                                                                    "summary": summary}})
    log(f"done: results in {workdir} (summary.json, metrics.jsonl, eval.jsonl, tb/, "
        f"training_curves.png)")
    return result.state, summary


def _count_reward_cuts(cuts: int, done: int, metrics: dict[str, float], context: LoopContext,
                       log: Callable[[str], None]) -> None:
    """The texts the judge cut at its length limit in this step: a metric, a counter kept in the
    checkpoints (summary `reward_texts_cut`), and a log line the first time a run sees one."""
    if cuts and not context.counters["reward_cuts"]:
        log(f"step {done}: the reward model cut {cuts} scored texts at its length limit (it "
            f"scores only the kept part); counted per step as reward_texts_cut and in the "
            f"summary")
    context.counters["reward_cuts"] += cuts
    metrics["reward_texts_cut"] = float(cuts)


def _handle_nonfinite(tcfg: TrainConfig, done: int, metrics: dict[str, float],
                      context: LoopContext, log: Callable[[str], None]) -> None:
    """A step the guard skipped (non-finite metrics or parameters): stop, or count and go on."""
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if tcfg.nan_policy == "stop":
        raise NonFiniteStepError(
            f"step {done}: non-finite values (metrics {bad or 'finite'}, or the updated "
            f"parameters); the state was not updated and the last checkpoint (step "
            f"{context.latest_checkpoint()}) is intact. Set config.train.nan_policy='skip' to "
            f"skip such steps.")
    context.counters["skips"] += 1
    log(f"step {done}: non-finite {bad or 'parameters'}; step skipped "
        f"({context.counters['skips']} so far)")
