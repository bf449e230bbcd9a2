"""The CTRL run loop: rollout -> score -> calibrate -> transform -> update, checkpointed.

    train_and_evaluate(config, workdir) -> summary dict

`config` is the `ConfigDict` of `configs/ctrl_*.py` (sections task, reference, transform, rl, train,
mesh; optionally method and bonbon). Every step is the pure `rl.rl_step` — or, with
`method="bonbon"`, `bon_distillation.make_bonbon_step`, same signature — wrapped by
`guard_nonfinite` and jitted once with explicit in/out shardings and the state donated.

Exact resume. Everything a step depends on is a function of what the checkpoint holds:
* params, optimiser state and the step counter are the checkpointed `TrainState`;
* the step's RNG key is `fold_in(key(seed), step)`, not a carried key;
* the step's prompts are `data.pipeline.batch_indices(loader_cfg, n, step)`, a pure function of
  (seed, epoch, index) (each process takes its slice of the global batch);
so a run killed after step k and restarted from the work dir produces the same parameters as a run
that was never interrupted (tests/test_train.py checks bit equality).

Non-finite steps. The jitted step keeps the previous state when any metric or new parameter is not
finite and reports `skipped = 1`. With `train.nan_policy = "stop"` (default) the loop then stops with
the step and the offending metrics named; the last checkpoint is the last good state. With
"skip" the loop counts the skip and goes on.

Outputs in the work dir: `manifest.json` (config, seeds, packages, devices, mesh, git, input hashes),
`reference_table.npz`, `checkpoints/`, `metrics.jsonl` + `tb/` (TensorBoard) every step,
`eval.jsonl` every `eval_every` steps, `summary.json` and `training_curves.png` at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import (bon_distillation, checkpointing, models, provenance, rl, rl_tasks,
                          sharding)
from infalign_jax.data import pipeline
from infalign_jax.calibration import ReferenceTable, ReferenceTableError, load_reference_table
from infalign_jax.config_utils import dataclass_from, section
from infalign_jax.metrics_io import MetricsWriter, Progress, read_jsonl, truncate_after
from infalign_jax.transforms import transform_from_config

logger = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")
METHODS = ("ctrl", "bonbon")   # the KL-regularised RL step, or BoN distillation (BoNBoN)


class NonFiniteStepError(FloatingPointError):
    """A step produced NaN/Inf; the state was left at the previous step's values."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 100
    batch_size: int = 8            # prompts per step (times rl.samples_per_prompt responses)
    log_every: int = 10
    eval_every: int = 0            # 0: evaluate at the end only
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    nan_policy: str = "stop"
    async_checkpoint: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.train.{name} must be a positive integer, got {value!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) \
                or self.eval_every < 0:
            raise ValueError(f"config.train.eval_every must be an integer >= 0, got {self.eval_every!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"config.train.nan_policy must be one of {NAN_POLICIES}, "
                             f"got {self.nan_policy!r}")


def rl_config(config: Any, task: rl_tasks.RLTask) -> rl.RLConfig:
    """`rl.RLConfig` from `config.rl` + `config.transform`; the task sets EOS/pad ids."""
    name, params = transform_from_config(section(config, "transform"))
    values = section(config, "rl")
    return dataclass_from(rl.RLConfig, values, "rl", transform=name, transform_params=params,
                           eos_id=task.eos_id, pad_id=task.pad_id)


def bonbon_config(config: Any, task: rl_tasks.RLTask) -> bon_distillation.BoNBoNConfig:
    """BoNBoN (Gui et al. 2024) from `config.bonbon`; sampling length/ids as the RL section's."""
    return dataclass_from(bon_distillation.BoNBoNConfig, section(config, "bonbon"), "bonbon",
                          max_new_tokens=int(config.rl.max_new_tokens), eos_id=task.eos_id,
                          pad_id=task.pad_id, learning_rate=float(config.rl.learning_rate),
                          decay_steps=int(config.rl.decay_steps))


def train_config(config: Any) -> TrainConfig:
    return dataclass_from(TrainConfig, section(config, "train"), "train")


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the mesh splits a batch (the product of the "batch" rule's axes)."""
    spec = sharding.batch_sharding(mesh, 1).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def guard_nonfinite(step_fn: Callable) -> Callable:
    """Wraps a step: if a metric or a new parameter is non-finite, keep the old state (counted)."""

    def guarded(state: rl.TrainState, frozen: rl.Frozen, batch: Any, rng: jax.Array):
        new_state, metrics = step_fn(state, frozen, batch, rng)
        finite = [jnp.all(jnp.isfinite(v)) for v in metrics.values()]
        finite += [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_state.params)]
        ok = jnp.all(jnp.stack(finite))
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        kept = kept._replace(step=state.step + 1)
        return kept, {**metrics, "skipped": (~ok).astype(jnp.int32)}

    return guarded


def reference_settings(config: Any) -> tuple[int, int]:
    """(K, seed) of `config.reference`, validated."""
    values = section(config, "reference")
    unknown = sorted(set(values) - {"k", "seed"})
    if unknown:
        raise ValueError(f"config.reference: unknown keys {unknown}; known: ['k', 'seed']")
    k, seed = values.get("k"), values.get("seed")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"config.reference.k (reference samples per prompt) must be an integer "
                         f">= 1, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"config.reference.seed must be an integer, got {seed!r}")
    return k, seed


def prepare_reference_table(task: rl_tasks.RLTask, path: str, k: int, seed: int,
                            log: Callable[[str], None] | None = None) -> ReferenceTable:
    """Loads `path` (checking it belongs to this task's reward and base models and was built with
    this K and seed, recorded beside it) or builds it once."""
    settings_path = os.path.splitext(path)[0] + ".json"
    if os.path.exists(path):
        table = load_reference_table(path, expected_reward_model_id=task.reward_model_id,
                                     expected_base_model_id=task.base_model_id)
        table.lookup(list(task.prompt_ids))  # every training prompt must be in it
        built = {"k": int(table.sorted_rewards_BxK.shape[1])}
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                built = json.load(f)
        if built.get("k") != k or built.get("seed", seed) != seed:
            raise ReferenceTableError(
                f"{path} was built with K={built.get('k')}, seed={built.get('seed')} but "
                f"config.reference.k={k}, config.reference.seed={seed}; use another work dir, "
                f"or delete the table to rebuild it")
        logger.info("reusing reference table %s (%d prompts, K=%d)", path, table.num_prompts, k)
        return table
    table = task.reference_table(k, seed, partial_path=os.path.splitext(path)[0] + ".partial.npz",
                                 progress=lambda line: (log or logger.info)(f"calibration: {line}"))
    table.save(path)
    with open(settings_path, "w") as f:
        json.dump({"k": k, "seed": seed}, f)
    return table


def _beta_for_budget(config: Any, task: rl_tasks.RLTask, cfg: rl.RLConfig, table: ReferenceTable,
                     bonbon: bool, log: Callable[[str], None]) -> rl.RLConfig:
    """`cfg` with beta solved from `config.task.kl_budget` (> 0) for tasks with an exact target."""
    budget = float(config.task.get("kl_budget", 0.0) or 0.0)
    if budget <= 0:
        return cfg
    if task.beta_for_kl is None:
        raise ValueError(f"config.task.kl_budget={budget}: task {task.name!r} has no exact target "
                         f"to solve beta from; set config.rl.beta instead")
    if bonbon:
        raise ValueError("config.task.kl_budget sets the CTRL beta; method='bonbon' has none")
    beta = task.beta_for_kl(budget, cfg.get_transform(), table)
    log(f"beta = {beta:.6g}: the exact target's KL(pi* || pi_ref) is config.task.kl_budget = "
        f"{budget:g} (config.rl.beta={cfg.beta:g} is not used)")
    return dataclasses.replace(cfg, beta=beta)


def convergence_report(task: rl_tasks.RLTask, scalars: dict[str, float],
                       log: Callable[[str], None]) -> dict[str, Any]:
    """For tasks with an exact target: whether the run reached it (KL(pi || pi*) <= the task's
    threshold), said in the log and returned for summary.json; {} otherwise."""
    if task.converged_kl is None or "exact_kl_to_target" not in scalars:
        return {}
    dist = scalars["exact_kl_to_target"]
    converged = bool(dist <= task.converged_kl)
    if converged:
        log(f"converged: KL(pi || pi*) = {dist:.4g} <= {task.converged_kl}")
    else:
        log(f"NOT CONVERGED: KL(pi || pi*) = {dist:.4g} > {task.converged_kl}; the target is "
            f"range(Phi)/beta = {scalars.get('range_phi_over_beta', float('nan')):.1f} sharp "
            f"(above ~20 it needs config.rl.beta_anneal_steps and more steps); the exact_* numbers "
            f"are not those of pi*")
    return {"converged": converged, "kl_to_target": dist, "converged_kl": task.converged_kl}


def _frozen(task: rl_tasks.RLTask, table: ReferenceTable, param_shardings: Any,
            mesh: jax.sharding.Mesh) -> rl.Frozen:
    sorted_PxK, count_P = table.lookup(list(task.prompt_ids))  # a missing prompt fails here
    rep = sharding.replicated(mesh)
    return rl.Frozen(jax.device_put(task.ref_params, param_shardings),
                     jax.device_put(task.reward_params, rep),
                     jax.device_put(jnp.asarray(sorted_PxK), rep),
                     jax.device_put(jnp.asarray(count_P), rep))


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
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def train_and_evaluate(config: Any, workdir: str, *, log: Callable[[str], None] | None = None
                       ) -> dict[str, Any]:
    """Runs (or resumes) the CTRL run of `config` in `workdir`; returns the summary."""
    return run(config, workdir, log=log)[1]


def run(config: Any, workdir: str, *, log: Callable[[str], None] | None = None,
        devices: Any = None) -> tuple[rl.TrainState, dict[str, Any]]:
    """`train_and_evaluate`, also returning the final state; `devices` restricts the mesh."""
    started = provenance.now()
    log = log or (lambda s: print(s, flush=True))
    seed = int(config.seed)
    tcfg = train_config(config)
    checkpointing.check_writable(workdir)          # before any expensive work
    task = rl_tasks.build_task(config.task)
    cfg = rl_config(config, task)
    method = str(config.get("method", "ctrl"))
    if method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}, got {method!r}")
    bonbon = bonbon_config(config, task) if method == "bonbon" else None
    ref_k, ref_seed = reference_settings(config)
    if task.response_length is not None and cfg.max_new_tokens != task.response_length:
        raise ValueError(f"config.rl.max_new_tokens={cfg.max_new_tokens} but task "
                         f"{task.name!r} scores responses of exactly length "
                         f"{task.response_length} (its reward / reference table assume that "
                         f"budget); set them equal")
    if bonbon is None and cfg.beta_anneal_steps > tcfg.num_steps:
        log(f"warning: config.rl.beta_anneal_steps={cfg.beta_anneal_steps} > "
            f"config.train.num_steps={tcfg.num_steps}: the run ends before beta reaches "
            f"config.rl.beta, so it cannot reach the target pi* of that beta")
    if tcfg.batch_size > len(task.prompt_ids):
        raise ValueError(f"config.train.batch_size={tcfg.batch_size} exceeds the task's "
                         f"{len(task.prompt_ids)} prompts")
    mesh = sharding.make_mesh(sharding.mesh_config_from_dict(section(config, "mesh")), devices)
    shards = batch_shards(mesh)
    if (tcfg.batch_size * jax.process_count()) % shards:
        raise ValueError(f"config.train.batch_size={tcfg.batch_size} is not divisible by the "
                         f"{shards} batch shards of the mesh {dict(mesh.shape)}; change the "
                         f"batch size or config.mesh")
    table_path = os.path.join(workdir, "reference_table.npz")
    table = prepare_reference_table(task, table_path, ref_k, ref_seed, log)
    cfg = _beta_for_budget(config, task, cfg, table, bonbon is not None, log)
    transform = cfg.get_transform()
    manifest = dict(config=config, seeds={"seed": seed, "reference": ref_seed},
                    inputs={"reference_table": table_path}, mesh=mesh, started=started,
                    extra={"beta": cfg.beta})

    with sharding.axis_rules(mesh):
        logical = models.param_logical_axes(task.model_cfg)
        param_sh = sharding.logical_to_shardings(logical, task.ref_params, mesh)
        optimizer = rl.make_optimizer(cfg if bonbon is None else bonbon)
        params = jax.device_put(rl_tasks.replicate_params(task.ref_params), param_sh)
        rep = sharding.replicated(mesh)
        extra = {} if bonbon is not None else rl.init_extra_state(cfg, jax.random.key(seed + 1))
        state = rl.TrainState(params, sharding.sharded_optimizer_init(optimizer, params, mesh),
                              jax.device_put(jnp.zeros((), jnp.int32), rep),
                              **jax.device_put(extra, rep))
        frozen = _frozen(task, table, param_sh, mesh)
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
        fns = models.decoder_fns(task.model_cfg)
        make_step = rl.make_rl_step if bonbon is None else bon_distillation.make_bonbon_step
        step_fn = jax.jit(guard_nonfinite(make_step(
            cfg if bonbon is None else bonbon, fns, task.reward_fn, optimizer)),
            in_shardings=(state_sh, frozen_sh, None, rep), out_shardings=(state_sh, rep),
            donate_argnums=(0,))

        ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          max_to_keep=tcfg.keep_checkpoints,
                                          save_interval_steps=tcfg.checkpoint_every,
                                          async_save=tcfg.async_checkpoint)
        restored = ckpt.restore_latest(checkpointing.abstract_state(state))
        start, skips = 0, 0
        if restored is not None:
            if restored.meta.get("seed") != seed:
                raise ValueError(f"{workdir} holds a run with seed {restored.meta.get('seed')}, "
                                 f"the config says {seed}; use another work dir")
            state, start = restored.state, restored.step
            skips = int(restored.meta.get("skips", 0))
            log(f"resumed from checkpoint step {start} in {ckpt.directory}")
        # Only now: a refused resume must not overwrite the manifest of the run in workdir.
        provenance.write_manifest(workdir, **manifest)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        truncate_after(metrics_path, start + 1)
        truncate_after(os.path.join(workdir, "eval.jsonl"), start + 1)
        writer = MetricsWriter(workdir, "metrics", tensorboard=tcfg.tensorboard)
        eval_writer = MetricsWriter(workdir, "eval", tensorboard=tcfg.tensorboard)
        progress = Progress(tcfg.num_steps, start, out=log)
        root = jax.random.key(seed)
        n_prompts = len(task.prompt_ids)
        loader_cfg = pipeline.LoaderConfig(batch_size=tcfg.batch_size, seed=seed,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())
        last_eval, summary = {}, {}

        def evaluate(step: int) -> dict[str, float]:
            if task.evaluate is None:
                return {}
            scalars = task.evaluate(jax.device_get(state.params), transform, cfg.beta, table)
            eval_writer.write(step, scalars)
            log(f"eval @ {step}: " + " ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
            return scalars

        try:
            for step in range(start, tcfg.num_steps):
                idx = pipeline.batch_indices(loader_cfg, n_prompts, step)
                batch = sharding.shard_batch({"prompt_BxP": task.prompts_PxS[idx],
                                              "prompt_mask_BxP": task.prompt_mask_PxS[idx],
                                              "prompt_idx_B": idx.astype(np.int32)}, mesh)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(root, step))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                done = step + 1
                if metrics.pop("skipped"):
                    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
                    if tcfg.nan_policy == "stop":
                        raise NonFiniteStepError(
                            f"step {done}: non-finite values (metrics {bad or 'finite'}, or the "
                            f"updated parameters); the state was not updated and the last "
                            f"checkpoint (step {ckpt.latest_step()}) is intact. Set "
                            f"config.train.nan_policy='skip' to skip such steps.")
                    skips += 1
                    log(f"step {done}: non-finite {bad or 'parameters'}; step skipped ({skips} so far)")
                metrics.update(step_time_s=dt, skipped_total=skips)
                if "response_length" in metrics:  # BoNBoN without monitor samples has none
                    per_prompt = cfg.samples_per_prompt if bonbon is None else bonbon.n
                    metrics["tokens_per_s"] = (metrics["response_length"] * tcfg.batch_size
                                               * per_prompt / dt)
                writer.write(done, metrics)
                if done % tcfg.log_every == 0 or done == tcfg.num_steps or done == start + 1:
                    progress.update(done, {k: metrics[k] for k in (
                        "transformed_reward", "calibrated_reward", "kl_k1", "kl_full_vocab",
                        "step_time_s") if k in metrics})
                if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.num_steps:
                    last_eval = evaluate(done)
                ckpt.save(done, state, {"seed": seed, "step": done, "data_position": done,
                                        "skips": skips}, force=done == tcfg.num_steps)
                summary = metrics
            ckpt.wait()
            last_eval = evaluate(tcfg.num_steps)
        finally:
            ckpt.close()
            writer.close()
            eval_writer.close()

    summary = {"final_step": tcfg.num_steps, "resumed_from": start, "skipped_steps": skips,
               "last_train_metrics": summary, "eval": last_eval}
    summary.update(convergence_report(task, last_eval, log))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    _plot_curves(metrics_path, os.path.join(workdir, "training_curves.png"))
    provenance.write_manifest(workdir, **{**manifest, "extra": {**manifest["extra"],
                                                                "summary": summary}})
    log(f"done: results in {workdir} (summary.json, metrics.jsonl, eval.jsonl, tb/, "
        f"training_curves.png)")
    return state, summary
