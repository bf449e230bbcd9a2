"""Sweeps over an experiment config: `get_sweep()` beside `get_config()`, run here or on a cluster.

A config module may define ``get_sweep(arg=None) -> list[dict]``, each dict a point of dotted
overrides, e.g. ``{"transform.t": 4.0, "rl.beta": 1.5}`` (big_vision's habit: the sweep lives next
to the config). `run` trains every point one after another in ``<workdir>/<point name>`` and
gathers each run's `summary.json` into one table and one figure (`sweep_plot`: every evaluated
metric against the swept value); `command_lines` prints one command per point for a cluster
scheduler instead, and `collect` gathers the points that finished there. Points already finished
are skipped on a re-run (their summary is read back), and an unfinished one resumes from its
checkpoints, so a killed sweep just restarts. Points whose task and reference settings agree (a
t sweep) share one reference table: `run` draws it in the first point's run and copies it into
the others', so the K base samples per prompt are drawn once; printed commands of a real task
do the same through `reference_commands` (a calibration command first, then each point copies its
table).
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
from infalign_jax.loops.skeleton import ConfigMismatchError, config_record, flat_record
from infalign_jax.infra.config_utils import float_text, refuse_unused_overrides
from infalign_jax.infra import provenance
from infalign_jax.infra.files import atomic_open, write_json
from infalign_jax.infra.memory import release_freed_memory
from infalign_jax.infra.metrics_io import duration
from infalign_jax.loops.train import REFERENCE_TABLE, share_reference_table
from infalign_jax.workflows import sweep_plot
from infalign_jax.workflows.calibrate import READS as CALIBRATION_READS

# Keys a resume may change (skeleton.RESUMABLE_KEYS) that change a finished run's outputs.
OUTPUT_KEYS = ("task.eval_ns", "export.hf", "export.dir")


def sweep_points(module: Any, arg: str | None = None,
                 config: ml_collections.ConfigDict | None = None) -> list[dict[str, Any]]:
    """The config module's `get_sweep(arg)` points; a `get_sweep` that takes a `config`
    parameter also gets the resolved base `config` (e.g. to give a default the task's sign)."""
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"config {module.__name__} defines no get_sweep(); nothing to sweep")
    kwargs = {"config": config} if config is not None and \
        "config" in inspect.signature(module.get_sweep).parameters else {}
    points = list(module.get_sweep(arg, **kwargs) if arg else module.get_sweep(**kwargs))
    if not points or not all(isinstance(p, Mapping) and p for p in points):
        raise ValueError(f"{module.__name__}.get_sweep() must return a non-empty list of non-empty "
                         f"dicts of overrides, got {points!r}")
    return [dict(p) for p in points]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted overrides; unknown keys, type changes and RL options the
    result does not read (`config_utils.refuse_unused_overrides`) are errors."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ValueError(f"sweep override {dotted!r}: config has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"sweep override {dotted!r}: unknown key; known: {sorted(node.keys())}")
        try:
            node[leaf] = value  # ConfigDict refuses a value of another type
        except TypeError as e:
            raise ValueError(f"sweep override {dotted}={value!r}: {e}") from e
    refuse_unused_overrides(config, overrides, "sweep override ")
    return config


def point_name(overrides: Mapping[str, Any]) -> str:
    """A directory name for a point: ``t=4,beta=1.5`` (last part of each dotted key)."""
    parts = []
    for dotted, value in overrides.items():
        text = float_text(value) if isinstance(value, float) else str(value)
        parts.append(f"{dotted.rsplit('.', 1)[-1]}={text}")
    return ",".join(parts).replace("/", "_")


def command_lines(entrypoint: str, config_path: str, workdir: str,
                  points: Sequence[Mapping[str, Any]], shared: Sequence[str] = (),
                  extra: Sequence[Sequence[str]] = ()) -> list[str]:
    """One shell command per point (for a cluster scheduler); `shared` flags go to every point,
    `extra[i]` to point i's. Each starts with this interpreter (the virtualenv's: a bare `python`
    lacks the packages)."""
    lines = []
    for i, p in enumerate(points):
        args = [f"--config={config_path}", f"--workdir={os.path.join(workdir, point_name(p))}",
                *shared]
        args += [f"--config.{k}={v}" for k, v in p.items()]
        args += list(extra[i]) if extra else []
        lines.append(" ".join(shlex.quote(a) for a in [sys.executable, entrypoint, *args]))
    return lines


def reference_commands(config_path: str, workdir: str, configs: Sequence[Any],
                       points: Sequence[Mapping[str, Any]], shared: Sequence[str] = ()
                       ) -> tuple[list[str], list[list[str]]]:
    """For printed commands of a real task, whose reference table costs K base samples a prompt:
    one `experiments/calibrate.py` command per group of points with equal reference settings
    (`reference_key`), drawing that table once into ``<workdir>/reference`` (``reference_<i>``
    for several groups), and each point's ``--reference_table`` flag, which copies it into the
    point's dir. The calibration gets only the task and reference flags (the others it
    refuses). Returns (the calibration commands, each point's extra flags)."""
    keys = [reference_key(cfg) for cfg in configs]
    groups = list(dict.fromkeys(keys))
    dirs = {k: os.path.join(workdir, "reference" if len(groups) == 1 else f"reference_{i}")
            for i, k in enumerate(groups)}
    read = [f for f in shared if f.startswith(tuple(f"--config.{r}" for r in CALIBRATION_READS))]
    lines = []
    for key in groups:
        p = points[keys.index(key)]
        args = [f"--config={config_path}", f"--workdir={dirs[key]}", *read]
        args += [f"--config.{k}={v}" for k, v in p.items() if k.startswith(CALIBRATION_READS)]
        lines.append(" ".join(shlex.quote(a) for a in
                              [sys.executable, "experiments/calibrate.py", *args]))
    return lines, [[f"--reference_table={os.path.join(dirs[k], REFERENCE_TABLE)}"] for k in keys]


def shared_flags(config: ml_collections.ConfigDict, keys: Iterable[str]) -> list[str]:
    """``--config.<key>=<value>`` for each overridden key, its value read from the resolved
    config: what every printed command must carry, however the flag was given (a single dash
    or a --flagfile, which a scan of the command line for "--config." missed)."""
    def value(key: str) -> Any:
        node = config
        for part in key.split("."):
            node = node[part]
        return node
    return [f"--config.{k}={value(k)}" for k in keys]


def point_configs(config: ml_collections.ConfigDict, points: Sequence[Mapping[str, Any]],
                  flag_keys: Iterable[str] = ()) -> list[ml_collections.ConfigDict]:
    """Each point's config (`apply_overrides`), all errors before any training. `flag_keys`:
    the keys the command line set on `config` for every point (``--config.<key>``), refused when
    a point's config does not read them (`config_utils.refuse_unused_overrides`): checked per
    point, since a point may set the option's setting (``rl.beta_schedule``) itself."""
    names = [point_name(p) for p in points]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"sweep points {repeated} occur more than once (or differ only in what "
                         f"their work dir's name keeps): each would train into one work dir")
    flag_keys = list(flag_keys)
    replaced = [k for k in flag_keys if all(k in p for p in points)]
    if replaced:
        raise ValueError(f"--config.{replaced[0]} is set by every sweep point (get_sweep), so "
                         f"the value given would be replaced; leave it out (or sweep it with "
                         f"--sweep_arg)")
    configs = [apply_overrides(config, p) for p in points]
    for cfg in configs:
        refuse_unused_overrides(cfg, flag_keys, "--config.")
    return configs


def run(config: ml_collections.ConfigDict, points: Sequence[Mapping[str, Any]],
        workdir: str, runner: Callable[[ml_collections.ConfigDict, str], dict[str, Any]],
        log: Callable[[str], None] = print, flag_keys: Iterable[str] = ()
        ) -> list[dict[str, Any]]:
    """Runs every point (skipping finished ones); returns one flat row per point. `flag_keys`:
    see `point_configs`."""
    rows = []
    configs = point_configs(config, points, flag_keys)  # all errors before any training
    tables: dict[str, str] = {}   # reference settings -> a point's table drawn with them
    dones = [_finished(os.path.join(workdir, point_name(p), "summary.json"), cfg)
             for p, cfg in zip(points, configs)]
    trained: list[float] = []     # seconds each point trained here took
    for i, (p, cfg, done) in enumerate(zip(points, configs, dones)):
        run_dir = os.path.join(workdir, point_name(p))
        left = sum(d is None for d in dones[i:])
        eta = (f"; {left} to train, about {duration(left * sum(trained) / len(trained))} left "
               f"at {duration(sum(trained) / len(trained))} a point" if trained and not done
               else "")
        log(f"[sweep {i + 1}/{len(points)}] {point_name(p)}"
            + (" (done, reusing)" if done else eta))
        key, table = reference_key(cfg), os.path.join(run_dir, REFERENCE_TABLE)
        if not done and key in tables and share_reference_table(tables[key], run_dir):
            log(f"[sweep] reference table copied from {os.path.relpath(tables[key], workdir)} "
                f"(the same task and reference settings: drawn once for the sweep)")
        started = time.perf_counter()
        try:
            summary = done or runner(cfg, run_dir)
        except ConfigMismatchError as e:   # train.init_from would apply to every point
            raise e.with_advice(f"this sweep's point {point_name(p)} was run under another base "
                                f"config: rerun with the flags it ran with (its manifest.json) "
                                f"or use another --workdir") from None
        if not done:
            trained.append(time.perf_counter() - started)
            release_freed_memory()   # before the next point: the process would grow run by run
        rows.append(flat_row(p, summary))
        if os.path.exists(table):
            tables.setdefault(key, table)
    write_results(rows, points, workdir, log, config)
    return rows


def reference_key(cfg: ml_collections.ConfigDict) -> str:
    """What a run's reference table depends on: its config's `task` and `reference` sections
    (with the digests of the data files they name). Points of one key share one table (the
    trainer still checks a copied table against its own task, K and seed)."""
    record = config_record(cfg)
    return json.dumps({k: v for k, v in record.items() if k.startswith(("task.", "reference."))},
                      sort_keys=True, default=str)


def collect(config: ml_collections.ConfigDict, points: Sequence[Mapping[str, Any]],
            workdir: str, log: Callable[[str], None] = print, flag_keys: Iterable[str] = ()
            ) -> list[dict[str, Any]]:
    """The table and figure of the points that have finished (`run`'s test: this config's
    steps, on the same input files), training nothing: for a sweep whose points ran elsewhere
    (`command_lines` on a cluster). The points left out are counted and named; ValueError when
    none has finished."""
    configs = point_configs(config, points, flag_keys)
    rows, done, missing = [], [], []
    for p, cfg in zip(points, configs):
        summary = _finished(os.path.join(workdir, point_name(p), "summary.json"), cfg)
        (missing if summary is None else done).append(p)
        if summary is not None:
            rows.append(flat_row(p, summary))
    if not rows:
        raise ValueError(f"no point of this sweep has finished in {workdir} (each point's run "
                         f"dir is <workdir>/<point name>, e.g. {point_name(points[0])})")
    if missing:
        log(f"[sweep] {len(missing)} of {len(points)} points not finished under this config "
            f"(left out): " + ", ".join(point_name(p) for p in missing))
    write_results(rows, done, workdir, log, config, missing)
    return rows


def write_results(rows: Sequence[Mapping[str, Any]], points: Sequence[Mapping[str, Any]],
                  workdir: str, log: Callable[[str], None] = print,
                  config: ml_collections.ConfigDict | None = None,
                  left_out: Sequence[Mapping[str, Any]] = ()) -> None:
    """`sweep_results.csv` / `.md` (`write_table`), `sweep_results.png` (`sweep_plot`; an
    earlier figure is removed when these rows draw none, so it never shows other points) and
    `sweep_manifest.json`: the base `config`, the points tabled and those `left_out`, with the
    provenance every run records (git revision, packages, command line; each point's run dir
    has its own manifest with its devices)."""
    write_json(os.path.join(workdir, "sweep_manifest.json"), provenance.build_manifest(
        config, with_devices=False, extra={"points": [dict(p) for p in points],
                                           "left_out": [dict(p) for p in left_out]}),
               sort_keys=True)
    write_table(rows, workdir)
    keys = list(dict.fromkeys(k for p in points for k in p))
    path = os.path.join(workdir, "sweep_results.png")
    figure = sweep_plot.plot(rows, keys, path)
    if figure is None and os.path.exists(path):
        os.remove(path)
    log(f"[sweep] {os.path.join(workdir, 'sweep_results.csv')}, .md"
        + (f" and {os.path.basename(figure)} (each metric against {sweep_plot.x_key(rows, keys)})"
           if figure else " (no plot: no swept key varies)"))


def _finished(summary_path: str, cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The point's summary if its run finished *this* config's steps on the same input files
    (the manifest's `inputs` digests: a transform table rewritten behind its path); else None,
    and the runner resumes it (or refuses, naming the keys, if the work dir holds another
    config's run)."""
    if not os.path.exists(summary_path):
        return None
    with open(summary_path) as f:
        summary = json.load(f)
    manifest_path = os.path.join(os.path.dirname(summary_path), "manifest.json")
    if not os.path.exists(manifest_path):
        return None
    with open(manifest_path) as f:
        manifest = json.load(f)
    if summary.get("final_step") != cfg.train.num_steps or \
            config_record(manifest.get("config")) != config_record(cfg):
        return None
    # Resumable keys that change what a finished run reports: the runner re-evaluates (or
    # exports) on resume, so such a point goes back to it.
    was, now = flat_record(manifest.get("config")), flat_record(cfg)
    if any(was.get(k) != now.get(k) for k in OUTPUT_KEYS):
        return None
    for recorded in (manifest.get("inputs") or {}).values():
        if os.path.isfile(recorded["path"]) and \
                provenance.file_sha256(recorded["path"]) != recorded["sha256"]:
            return None
    return summary


def flat_row(point: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The point's table row; its eval and train columns sorted, as a finished point's
    summary.json (written with sorted keys) reads back, so that the table of a sweep does not
    depend on which of its points were reused."""
    row = {"point": point_name(point), **dict(point)}
    row.update({f"eval.{k}": v for k, v in sorted(summary.get("eval", {}).items())})
    row.update({f"train.{k}": v for k, v in sorted(summary.get("last_train_metrics", {}).items())
                if k in ("kl_k1", "kl_full_vocab", "calibrated_reward", "transformed_reward")})
    return row


def write_table(rows: Sequence[Mapping[str, Any]], workdir: str) -> tuple[str, str]:
    """`sweep_results.csv` and `sweep_results.md` in `workdir`."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = os.path.join(workdir, "sweep_results.csv")
    with atomic_open(csv_path) as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(workdir, "sweep_results.md")
    with atomic_open(md_path) as f:
        f.write(markdown_table(rows, columns) + "\n")
    return csv_path, md_path


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
