"""The run-loop skeleton the policy and reward-model trainers share.

    resume (refusing another seed or config, or num_steps below the checkpoint's step) or start
    (from `train.init_from`'s parameters if set) -> manifest -> for each step: step_fn,
    metrics.jsonl, progress, periodic evaluation (eval.jsonl), checkpoint -> final evaluation;
    a SIGTERM during the steps: that step's checkpoint, then `preemption.Preempted` (status 143)

What a trainer brings is its state, its `step_fn(state, step, context) -> (state, metrics)` (the
batch of `step` is a pure function of the seed and the step, so a resumed run sees the same data)
and optionally `evaluate(state, step) -> scalars`. Counters (e.g. skipped non-finite steps) are
saved in every checkpoint's metadata and restored with it, and so is the resolved config: a work
dir is only resumed by the same experiment (`RESUMABLE_KEYS` may change: length, reporting,
checkpointing, device layout, how the same quantities are computed). Another experiment may start
from a run's parameters with `train.init_from` (a fresh run: its own optimiser state, step 0).
The manifest keeps the run's first start time, what it started from, the git state and package
versions of its first start (`started_with`) and a list of its resumes ({time, step, git,
packages, environment}); a resume under another git revision, package version or XLA_FLAGS
(`provenance.numeric_environment`) says so in the log.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import jax

from infalign_jax.core.transforms import is_set, known_transforms, transform_param_names
from infalign_jax.infra import checkpointing, distributed, preemption, provenance
from infalign_jax.infra.metrics_io import MetricsWriter, Progress, read_jsonl, truncate_stream


class LoopSettings(Protocol):
    """The `config.train` fields the skeleton reads (TrainConfig, RMTrainConfig)."""

    num_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoint: str      # checkpointing.ASYNC_CHECKPOINT
    tensorboard: bool
    init_from: str


class LoopResult(NamedTuple):
    state: Any
    resumed_from: int
    last_metrics: dict[str, float]
    last_eval: dict[str, float]
    counters: dict[str, int]


class LoopContext:
    """What a step function may ask of the loop: the counters it keeps in checkpoint metadata,
    and the latest checkpoint (for error messages that say what survives)."""

    def __init__(self, counters: dict[str, int], ckpt: checkpointing.Checkpointer):
        self.counters = counters
        self._ckpt = ckpt

    def latest_checkpoint(self) -> int | None:
        return self._ckpt.latest_step()


StepFn = Callable[[Any, int, LoopContext], tuple[Any, dict[str, float]]]

# Keys a resumed run may change: how long it runs, how it reports (the N the exact task
# evaluates) and checkpoints, the device layout, and how the same quantities are computed (the
# prompt's KV shared by its samples in the update, rematerialisation; a record written before
# such a key existed has it absent). Any other difference (the transform, beta, the data, the
# learning rate...) means the checkpoint belongs to another experiment.
RESUMABLE_KEYS = ("train.num_steps", "train.log_every", "train.eval_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
                  "train.tensorboard", "train.nan_policy", "train.init_from", "mesh.data",
                  "mesh.fsdp", "mesh.tensor", "mesh.rollout", "export.hf", "export.dir",
                  "rl.shared_prompt", "model.remat", "task.eval_ns")

# Keys added after runs were recorded, with the value every earlier run had: a record holding
# that value compares equal to one written before the key existed.
ADDED_KEYS = {"model.reward_pool": "last", "model.trunk_layers": 0}


# The content of a file a config names by path only, recorded under this key: a run resumes (or
# a sweep reuses a point) only with the same table behind the path.
TABLE_DIGEST_KEY = "transform_table.sha256"
# Data files a config names by path, recorded by content under "<key>.sha256" as well: a run
# resumes only on the same data (a reward model's pairs, a real task's prompt file). Records
# written before these were added lack the digests and are compared without them.
DATA_FILE_KEYS = ("data.train_path", "data.eval_path", "task.data.prompts")
# Values a run derives from its config and inputs (`run_loop`'s `derived`, e.g. the beta solved
# for a KL budget, which depends on train.num_steps when a warm-up outlasts the run), recorded
# under this prefix and compared on resume like config keys.
DERIVED = "derived."


def config_record(config: Any) -> dict[str, Any]:
    """The config as the manifest writes it (`provenance.jsonable`), flattened to
    {dotted key: value}, without the RESUMABLE_KEYS (`canonical_record`); an `optimal`
    transform's table (TABLE_DIGEST_KEY) and the data files (DATA_FILE_KEYS) are recorded by
    their sha256 as well as their path."""
    return with_input_digests(canonical_record(flat_record(config)))


def with_input_digests(record: dict[str, Any]) -> dict[str, Any]:
    """A flat config record with the sha256 of the files it names that hold numbers the run
    reads (an `optimal` transform's table, the DATA_FILE_KEYS), so that a file rewritten behind
    its path makes the record differ."""
    path = record.get("transform.path")
    if record.get("transform.name") == "optimal" and isinstance(path, str) and path \
            and os.path.isfile(path):
        record[TABLE_DIGEST_KEY] = provenance.file_sha256(path)
    for key in DATA_FILE_KEYS:
        path = record.get(key)
        if isinstance(path, str) and path and os.path.isfile(path):
            record[f"{key}.sha256"] = provenance.file_sha256(path)
    return record


def flat_record(config: Any) -> dict[str, Any]:
    """The config as the manifest writes it (`provenance.jsonable`), as {dotted key: value}."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value
    walk("", provenance.jsonable(config if config is not None else {}))
    return flat


def canonical_record(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config record without the RESUMABLE_KEYS, without the transform parameters the
    named transform does not use (unset, or another family's), and without the ADDED_KEYS at
    their earlier value, so records written before those were unset or added compare equal to
    today's."""
    name = flat.get("transform.name")
    taken = transform_param_names(name) if name in known_transforms() else None

    def used(key: str, value: Any) -> bool:
        if taken is None or not key.startswith("transform.") or key == "transform.name":
            return True
        return key.split(".", 1)[1] in taken and is_set(value)
    lora_off = not flat.get("rl.lora.rank")   # then its other keys are unused (or not recorded)
    return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS and used(k, v)
            and not (lora_off and k.startswith("rl.lora."))
            and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}


def differing_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(saved) | set(now)
                  if saved.get(k, "<absent>") != now.get(k, "<absent>"))


def describe_differences(keys: Sequence[str], saved: dict[str, Any], now: dict[str, Any],
                         saved_name: str, now_name: str) -> str:
    """'key: <saved_name> value, <now_name> value; ...' for the first 8 `keys`."""
    diff = "; ".join(f"{k}: {saved_name} {saved.get(k, '<absent>')!r}, {now_name} "
                     f"{now.get(k, '<absent>')!r}" for k in keys[:8])
    return diff + ("; ..." if len(keys) > 8 else "")


def check_processes_agree(record: dict[str, Any]) -> None:
    """Refuses a run whose processes resolved different config records (data files by content
    included: a host with another copy of the training file fed its rows from it, and the
    manifest recorded process 0's), naming the keys. A collective; one process: nothing."""
    records = distributed.from_every_process(distributed.numbered("config_record"),
                                             json.loads(json.dumps(record, default=str)))
    for index, other in enumerate(records[1:], 1):
        keys = differing_keys(records[0], other)
        if keys:
            diff = describe_differences(keys, records[0], other, "process 0", f"process {index}")
            raise ValueError(f"process {index} resolved another config than process 0 ({diff}): "
                             f"every process must read the same config and data files")


def without_keys_added_since(saved: Mapping[str, Any], now: dict[str, Any],
                             also: Sequence[str] = ()) -> dict[str, Any]:
    """`now` without the keys a record written before them lacks: the data digests, the derived
    values and `also` (keys a caller's records gained later); such a record is compared
    without them."""
    return {k: v for k, v in now.items() if k in saved or not (
        k.removesuffix(".sha256") in DATA_FILE_KEYS or k.startswith(DERIVED) or k in also)}


class ConfigMismatchError(ValueError):
    """A work dir holds a run this config may not resume. `workdir` and `what` (the run it
    holds, with the differing keys) let a command that runs the loop under its own flags (a
    sweep, a reproduction) give its own advice: `with_advice`."""

    def __init__(self, workdir: str, what: str, advice: str):
        super().__init__(f"{workdir} holds {what}; {advice}")
        self.workdir, self.what = workdir, what

    def with_advice(self, advice: str) -> "ConfigMismatchError":
        return ConfigMismatchError(self.workdir, self.what, advice)


def check_same_config(workdir: str, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuses to resume a checkpoint written under another config, naming the keys."""
    if saved is None:
        raise ConfigMismatchError(
            workdir, "a checkpoint without a config record (written by an older version); it "
            "cannot be checked against this config, so it is not resumed",
            f"use another work dir (--config.train.init_from={workdir} starts a fresh run from "
            f"its parameters)")
    saved = canonical_record(saved)
    keys = differing_keys(saved, without_keys_added_since(saved, now))
    if keys:
        diff = describe_differences(keys, saved, now, "checkpoint", "config")
        raise ConfigMismatchError(
            workdir, f"a run of another config ({diff})",
            f"use another work dir, with --config.train.init_from={workdir} to start a fresh run "
            f"from its parameters (only {', '.join(RESUMABLE_KEYS)} may change on resume)")


def code_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two {git, packages, environment} records (an unrecorded side counts
    as unknown, not as a change): the git revision, its dirty flag, each package's version and
    each numeric environment variable (`provenance.numeric_environment`)."""
    out = []
    git_a, git_b = before.get("git") or {}, now.get("git") or {}
    if git_a.get("revision") and git_b.get("revision") and git_a != git_b:
        out.append(f"git {str(git_a['revision'])[:10]}{' (dirty)' if git_a.get('dirty') else ''}"
                   f" -> {str(git_b['revision'])[:10]}{' (dirty)' if git_b.get('dirty') else ''}")
    pk_a, pk_b = before.get("packages") or {}, now.get("packages") or {}
    out += [f"{name} {pk_a[name]} -> {pk_b.get(name)}" for name in sorted(pk_a)
            if name in pk_b and pk_a[name] != pk_b[name]]
    env_a, env_b = before.get("environment"), now.get("environment")
    if env_a is not None and env_b is not None:   # XLA_FLAGS and the like: other numbers
        out += [f"{k} {env_a.get(k)!r} -> {env_b.get(k)!r}" for k in sorted({*env_a, *env_b})
                if env_a.get(k) != env_b.get(k)]
    return out


def _previous_manifest(workdir: str) -> dict[str, Any]:
    """The manifest of the run in `workdir` ({} if none): its first start, what it started from
    and its resumes are kept across resumes."""
    try:
        with open(os.path.join(workdir, "manifest.json")) as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return {}


def state_platform(state: Any) -> str:
    """The platform ("cpu", "gpu", "tpu") the arrays of `state` live on: where its checkpoints
    are copied from, which need not be JAX's default backend (a run placed on the CPU devices of
    a GPU host); "cpu" if any array is there. JAX's default backend when `state` holds no placed
    array."""
    platforms = {d.platform for x in jax.tree.leaves(state) if isinstance(x, jax.Array)
                 for d in x.devices()}
    if not platforms:
        return jax.default_backend()
    return "cpu" if "cpu" in platforms else sorted(platforms)[0]


def _init_from(path: str, state: Any, record: dict[str, Any], log: Callable[[str], None]
               ) -> tuple[Any, dict[str, Any]]:
    """`state` with the parameters of the newest checkpoint under `path`, and what the manifest
    records of it (path, step, the config keys in which that run differs)."""
    params, step, meta = checkpointing.restore_params(
        path, checkpointing.abstract_state(state.params))
    differs = differing_keys(canonical_record(meta.get("config") or {}), record)
    log(f"started from the parameters of {path} (checkpoint step {step}); this run's own "
        f"optimiser state and step 0" + (f"; its config differs in {', '.join(differs)}"
                                         if differs else ""))
    return state._replace(params=params), {"path": os.path.abspath(path), "step": step,
                                           "config_differs": differs}


def run_loop(workdir: str, state: Any, step_fn: StepFn, settings: LoopSettings, *, seed: int,
             manifest: dict[str, Any], log: Callable[[str], None],
             progress_keys: Sequence[str],
             evaluate: Callable[[Any, int], dict[str, float]] | None = None,
             counters: Sequence[str] = (), derived: Mapping[str, Any] | None = None
             ) -> LoopResult:
    """Runs steps [resumed step, num_steps) of one training run in `workdir` (see the module doc).
    `derived`: values computed from the config that a resume must reproduce (recorded under
    DERIVED with the config record). `manifest["code"]`: the run's `provenance.code_state()` from
    its start (taken here when absent).

    `state` is the fresh step-0 state (its structure and shardings are the restore target).
    Its length is the loop's order (resume, manifest, steps, checkpoints, final evaluation), the
    one thing the trainers share.
    """
    # The code this run runs, as of its start (the trainers take it with `started`): the
    # manifest is written again at the end, by when the work tree may hold other code.
    code = manifest.setdefault("code", provenance.code_state())
    record = config_record(manifest.get("config"))
    record.update({f"{DERIVED}{k}": v for k, v in (derived or {}).items()})
    check_processes_agree(record)
    backend = state_platform(state)
    in_background = checkpointing.saves_asynchronously(settings.async_checkpoint, backend)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=settings.keep_checkpoints,
                                      save_interval_steps=settings.checkpoint_every,
                                      async_save=in_background)
    every = "step" if settings.checkpoint_every == 1 else f"{settings.checkpoint_every} steps"
    log(f"checkpoints every {every}, each written "
        f"{'in the background' if in_background else 'before the next step'} "
        f"(train.async_checkpoint={settings.async_checkpoint}, {backend} backend)")

    def check_same_run(meta: Mapping[str, Any]) -> None:
        if meta.get("seed") != seed:
            raise ValueError(f"{workdir} holds a run with seed {meta.get('seed')}, the config "
                             f"says {seed}; use another work dir")
        check_same_config(workdir, meta.get("config"), record)

    # Before any array is read: another config's state may not fit this one's (LoRA adapters,
    # a clipped optimiser, an accumulator), and Orbax's refusal names tree paths, not the keys.
    saved = ckpt.latest_meta()
    try:
        if saved is not None:
            check_same_run(saved)
        restored = ckpt.restore_latest(checkpointing.abstract_state(state))
    except Exception:
        ckpt.close()
        raise
    start, count = 0, {name: 0 for name in counters}
    # The data files by content among the manifest's inputs, where a sweep's reuse of a finished
    # point looks (the config record's digests are recomputed from the files named).
    inputs = manifest.setdefault("inputs", {})
    named = {os.path.abspath(p) for p in inputs.values()}
    for key in DATA_FILE_KEYS:
        path = record.get(key)
        if isinstance(path, str) and os.path.isfile(path) and os.path.abspath(path) not in named:
            inputs[key] = path
    if restored is not None:
        try:
            check_same_run(restored.meta)
            if restored.step > settings.num_steps:
                # Nothing would be trained, and the final evaluation and summary would label the
                # restored state with the smaller step.
                raise ValueError(f"config.train.num_steps={settings.num_steps} is below the "
                                 f"checkpoint step {restored.step} found in {workdir}; set "
                                 f"num_steps >= {restored.step} or use a fresh work dir")
            was = (_previous_manifest(workdir).get("init_from") or {}).get("path")
            if settings.init_from and os.path.abspath(settings.init_from) != was:
                # A resume continues from its own checkpoint; init_from would be ignored.
                raise ValueError(
                    f"config.train.init_from={settings.init_from!r}, but {workdir} holds a run "
                    f"(checkpoint step {restored.step}) that started from "
                    f"{was or 'its own initialisation'}; a resume continues from that "
                    f"checkpoint: drop init_from to resume, or use another work dir")
        except ValueError:
            ckpt.close()
            raise
        state, start = restored.state, restored.step
        count.update({name: int(restored.meta.get(name, 0)) for name in counters})
        log(f"resumed from checkpoint step {start} in {ckpt.directory}")
        previous = _previous_manifest(workdir)
        manifest["started"] = previous.get("started") or manifest.get("started")
        here = {**code, "environment": provenance.numeric_environment()}
        # The manifest was last written by the segment that made the checkpoint.
        before = {k: previous.get(k) for k in here}
        manifest["started_with"] = previous.get("started_with") or before
        changed = code_changes(before, here)
        if changed:
            log(f"resuming under other code than step {start} was trained with: "
                f"{'; '.join(changed)} (each segment's is in manifest.json's resumes)")
        manifest["resumes"] = [*previous.get("resumes", []),
                               {"time": provenance.now(), "step": start, **here}]
        if previous.get("init_from"):
            manifest["init_from"] = previous["init_from"]
    else:
        manifest["resumes"] = []
        if settings.init_from:
            try:
                state, manifest["init_from"] = _init_from(settings.init_from, state, record, log)
            except Exception:
                ckpt.close()
                raise
    # Only now: a refused resume must not overwrite the manifest of the run in workdir.
    if distributed.is_primary():   # one writer: the manifest records process 0's view
        provenance.write_manifest(workdir, **manifest, finished=False)
    truncate_stream(workdir, "metrics", start + 1)
    # The final evaluation always runs again (a finished run rerun rewrites its last row once).
    truncate_stream(workdir, "eval", min(start + 1, settings.num_steps))
    writer = MetricsWriter(workdir, "metrics", tensorboard=settings.tensorboard)
    eval_writer = MetricsWriter(workdir, "eval", tensorboard=settings.tensorboard)
    progress = Progress(settings.num_steps, start, out=log)
    context = LoopContext(count, ckpt)
    last_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}

    def run_eval(step: int) -> dict[str, float]:
        scalars = evaluate(state, step)
        eval_writer.write(step, scalars)
        log(f"eval @ {step}: " + " ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        return scalars

    ckpt.count_preemption_from(start)   # a SIGTERM before the first step stops after it
    try:
        with preemption.sigterm_noted() as sigterm:
            for step in range(start, settings.num_steps):
                state, metrics = step_fn(state, step, context)
                done = step + 1
                writer.write(done, metrics)
                if done % settings.log_every == 0 or done in (settings.num_steps, start + 1):
                    progress.update(done, {k: metrics[k] for k in progress_keys if k in metrics})
                if (evaluate is not None and settings.eval_every
                        and done % settings.eval_every == 0 and done != settings.num_steps):
                    last_eval = run_eval(done)
                stop = sigterm() and done < settings.num_steps
                ckpt.save(done, state, {"seed": seed, "step": done, "data_position": done,
                                        "config": record, **count},
                          force=done == settings.num_steps or stop)
                last_metrics = metrics
                if stop or (done < settings.num_steps and ckpt.reached_preemption(done)):
                    ckpt.wait()
                    log(f"SIGTERM: stopped after step {done} of {settings.num_steps}, whose "
                        f"checkpoint is saved in {ckpt.directory}; the same command resumes it")
                    raise preemption.Preempted(done)
        ckpt.wait()
        if evaluate is not None:
            last_eval = run_eval(settings.num_steps)
    finally:
        ckpt.close()
        writer.close()
        eval_writer.close()
    if not last_metrics:   # resumed at the end: the last step's row, as its run logged it
        last_metrics = _logged_metrics(workdir, settings.num_steps)
    return LoopResult(state, start, last_metrics, last_eval, count)


def _logged_metrics(workdir: str, step: int) -> dict[str, float]:
    """The metrics row of `step` in workdir/metrics.jsonl ({} if absent): a run resumed at its
    last step trains nothing, and its summary's last_train_metrics (the sweep table's train.*
    columns) were left empty."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [r for r in read_jsonl(path) if r.get("step") == step] if os.path.exists(path) else []
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
