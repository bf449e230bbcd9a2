"""Checkpoints that survive a kill and resume exactly: a thin layer over Orbax's CheckpointManager.

A checkpoint holds two items, saved together under one step directory:

* ``state``: any pytree of `jax.Array`s / numpy arrays (parameters, optax state, step, PRNG key
  -- new-style typed keys from `jax.random.key` included --, data-iterator position), written
  with ``ocp.args.StandardSave`` and read back with ``ocp.args.StandardRestore(abstract_state)``
  so every array comes back with the shape, dtype and *sharding* of the abstract leaf;
* ``meta``: a JSON object (resolved config, data position, anything a human reads).

Design choices:

* Atomicity is Orbax's: a step is written into ``<step>.orbax-checkpoint-tmp`` and renamed to
  ``<step>`` only once every item (and, on several hosts, every process) has finished. A process
  killed mid-save therefore leaves only a temporary directory, which the manager never lists as
  a step; on the next start we log its name and let Orbax delete it
  (``cleanup_tmp_directories=True``). `tests/test_checkpointing.py` kills a worker mid-save to
  check this.
* A committed step can still be damaged afterwards (truncated file, partial copy, disk fault).
  `restore_latest` walks the steps newest first; a step that fails to restore is reported
  (warning naming the step and the error) and the next older one is tried. Once a good step is
  found, the bad newer ones are renamed to ``<step>.corrupt`` (kept for inspection, invisible to
  Orbax): otherwise Orbax would refuse to save those step numbers again when training replays
  them. If no step restores, nothing is renamed -- the likely cause is then a wrong
  ``abstract_state`` rather than damage -- and `CheckpointRestoreError` lists every reason.
* ``save(..., check_finite=True)`` refuses a state with a NaN/Inf floating leaf
  (`NonFiniteError`, naming the leaf paths), so a diverged run can never push the last good
  checkpoint out of the ``max_to_keep`` window. The check runs only on steps that will actually
  be saved, since it costs a device-to-host transfer per floating leaf.
* `check_writable` writes and deletes a probe file (and can demand free space) before training
  starts, so a read-only, missing-permission or full work directory fails in the first second,
  not at the first save hours later.
* Nothing is process-0-only except the rename of corrupt steps, which the primary host does
  between two Orbax barriers; saving, retention and temporary-directory clean-up are Orbax's own
  multi-host protocol. Every process must call `save` / `restore_latest` with the same arguments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from infalign_jax.infra import distributed, memory, preemption
from infalign_jax.infra import validate as check

logger = logging.getLogger(__name__)

PyTree = Any
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's marker of a step that was never committed.
CORRUPT_SUFFIX = ".corrupt"


class NonFiniteError(ValueError):
    """The state holds NaN or Inf in a floating leaf; ``paths`` names those leaves."""

    def __init__(self, step: int, paths: list[str]):
        self.step = step
        self.paths = paths
        super().__init__(
            f"refusing to save checkpoint step {step}: non-finite values in leaves {paths}")


class CheckpointRestoreError(RuntimeError):
    """No checkpoint step in the directory could be restored."""


class WorkdirError(OSError):
    """The checkpoint directory cannot be created or written, or has too little free space."""


class Restored(NamedTuple):
    step: int
    state: PyTree
    meta: dict[str, Any]


def check_writable(workdir: str | os.PathLike, min_free_bytes: int = 0) -> None:
    """Creates ``workdir`` if needed, writes, syncs and deletes a probe file in it.

    Raises `WorkdirError` naming the directory if any of that fails, or if the file system
    (local paths only) has fewer than ``min_free_bytes`` bytes free.
    """
    path = epath.Path(workdir)
    # Host name and pid keep probes of several processes sharing one directory apart.
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if "://" in os.fspath(workdir):
            probe.write_bytes(b"\0" * 4096)
        else:
            with open(os.fspath(probe), "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise WorkdirError(f"checkpoint directory {os.fspath(workdir)!r} is not writable: "
                           f"{reason} ({type(e).__name__})") from e
    if min_free_bytes > 0 and "://" not in os.fspath(workdir):
        free = shutil.disk_usage(os.fspath(path)).free
        if free < min_free_bytes:
            raise WorkdirError(f"checkpoint directory {os.fspath(workdir)!r} has {free} bytes "
                               f"free, fewer than the {min_free_bytes} required")


def nonfinite_leaves(tree: PyTree) -> list[str]:
    """Key paths (``jax.tree_util.keystr``) of floating leaves holding a NaN or Inf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths, flags, device_paths, device_leaves = [], [], [], []
    for key_path, leaf in leaves:
        path = jax.tree_util.keystr(key_path)
        if isinstance(leaf, float):
            paths.append(path)
            flags.append(math.isfinite(leaf))
        elif isinstance(leaf, (np.ndarray, np.generic)) and np.issubdtype(leaf.dtype, np.inexact):
            paths.append(path)
            flags.append(bool(np.all(np.isfinite(leaf))))
        elif isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact):
            device_paths.append(path)
            device_leaves.append(leaf)
    if device_leaves:
        # One program for all leaves: the full reductions leave replicated scalars readable on
        # every host, and a single collective program (not one per leaf) cannot interleave
        # differently across processes (many small eager ones deadlock gloo on CPU).
        device_flags = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])(device_leaves)
        paths += device_paths
        flags += [bool(f) for f in jax.device_get(device_flags)]
    return [p for p, ok in zip(paths, flags) if not ok]


def abstract_state(state: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct` tree of ``state`` keeping each `jax.Array`'s sharding.

    What `Checkpointer.restore` needs when a concrete (e.g. freshly initialised) state is at
    hand; `jax.eval_shape` of a jitted initialiser with ``out_shardings`` gives the same without
    allocating.
    """
    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, (np.ndarray, np.generic)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x
    return jax.tree.map(leaf, state)


def local_abstract(tree: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct` tree of `tree` (arrays or shape structs) on this process's first
    device: what a reader that wants whole parameters on its own host restores into, on any
    process of a job (`jax.devices()[0]` belongs to process 0; another cannot address it)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


class _Manager(ocp.CheckpointManager):
    """Orbax's manager with JAX's preemption steps counted from `preemption_origin`
    (`Checkpointer.count_preemption_from`): Orbax asks `reached_preemption` in its own
    `should_save` and `save` too, so every count goes through here."""

    preemption_origin = 0

    def reached_preemption(self, step: int) -> bool:
        return preemption.reached_sync_point(int(step) - self.preemption_origin,
                                             ask=super().reached_preemption)


# `train.async_checkpoint` of both trainers: "true" writes each checkpoint in the background
# (`save` returns once the arrays are copied to host), "false" writes it before the next step,
# "auto" (the default) is asynchronous unless the state is on the CPU (the devices the run is
# placed on, not JAX's default backend: `loops.skeleton.state_platform`). With accelerators the
# host copy is host memory beside device memory and the write overlaps device compute. On the CPU
# the copy is a second copy of the state in the memory the step uses, and the writer threads take
# the cores the step runs on: the SmolLM2 tiny real run (a checkpoint every step, 2 cores) peaked
# at 8.84 GB asynchronous against 4.72 GB synchronous, in the same wall time (2:21 each;
# docs/benchmarks.md, stop 59).
ASYNC_CHECKPOINT = ("auto", "true", "false")
_ASYNC_EXPECTED = f"one of {ASYNC_CHECKPOINT} or a bool"


def async_checkpoint_setting(value: Any) -> str | None:
    """`train.async_checkpoint` as one of ASYNC_CHECKPOINT (a bool, or a string in any case, as
    a command-line flag gives it), or None if it is none of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in ASYNC_CHECKPOINT:
        return value.lower()
    return None


def check_async_checkpoint(config: Any) -> None:
    """Normalises a trainer config's (frozen dataclass) `async_checkpoint`, or fails naming it."""
    check.normalized(config, "async_checkpoint", async_checkpoint_setting, _ASYNC_EXPECTED)


def saves_asynchronously(setting: str, backend: str | None = None) -> bool:
    """Whether checkpoints of `train.async_checkpoint` = `setting` are written in the background
    on `backend` (default: JAX's default backend); see ASYNC_CHECKPOINT's comment."""
    value = async_checkpoint_setting(setting)
    if value is None:
        raise ValueError(f"train.async_checkpoint must be {_ASYNC_EXPECTED}, got {setting!r}")
    if value == "auto":
        return (backend or jax.default_backend()) != "cpu"
    return value == "true"


class Checkpointer:
    """Saves and restores ``(step, state, meta)`` under ``directory`` with Orbax.

    Args:
      directory: root of the step directories (created; probed with `check_writable`).
      max_to_keep: newest committed steps kept; older ones are deleted after each save
        (None keeps all).
      save_interval_steps: `save` writes only steps that are multiples of this (plus the first
        save, and whenever Orbax sees a preemption signal); ``force=True`` overrides.
      async_save: write in a background thread; `save` returns once arrays are copied to host.
        Otherwise `save` returns once the step is committed, and hands the memory its host
        copies took back to the system (`memory.release_freed_memory`).
      min_free_bytes: free space demanded by the start-up probe.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True,
                 min_free_bytes: int = 0):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = epath.Path(directory).absolute() if "://" not in os.fspath(directory) \
            else epath.Path(directory)
        check_writable(self.directory, min_free_bytes)
        for leftover in sorted(self.directory.iterdir()):
            if TMP_DIR_SUFFIX in leftover.name:
                logger.warning("ignoring and removing %s: an uncommitted checkpoint left by an "
                               "interrupted save", leftover)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.async_save = async_save
        self._manager = _Manager(self.directory, options=options)

    # -- saving ------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(int(step))

    def reached_preemption(self, step: int) -> bool:
        """Whether every process of a multi-process job has reached the step JAX's preemption
        service chose after a SIGTERM (Orbax saves that step whatever the interval); False in a
        single-process job (`preemption.sigterm_noted` covers that)."""
        return bool(self._manager.reached_preemption(int(step)))

    def count_preemption_from(self, step: int) -> None:
        """Steps count for JAX's preemption service from `step`, where the run (every process of
        it) resumed. The service stops a job at one past the highest count its processes had
        given it when the notice came, and a process that has not given one counts 0; counted
        from step 0, a job resumed at step s that got its SIGTERM before its first step (loading,
        compiling) was stopped at step 1, which it never reaches again: it trained on to the end
        or the SIGKILL. Counted from s, it stops after step s + 1. The counts go on from those
        this process gave already (`preemption.counts_given`: a calibration pass's rounds)."""
        self._manager.preemption_origin = int(step) - preemption.counts_given()

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None, *,
             force: bool = False, check_finite: bool = True) -> bool:
        """Saves ``state`` and JSON ``meta`` as ``step`` if the interval (or ``force``) says so.

        Returns whether a save was started. Raises `NonFiniteError` before writing anything if
        ``check_finite`` and a floating leaf is not finite, and `ValueError` if ``meta`` is not
        a JSON-serialisable mapping.
        """
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        meta = {} if meta is None else meta
        if not isinstance(meta, Mapping):
            raise ValueError(f"meta must be a mapping, got {type(meta).__name__}")
        try:
            meta = json.loads(json.dumps(dict(meta)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta for checkpoint step {step} is not JSON-serialisable: {e}") from e
        if check_finite:
            bad = nonfinite_leaves(state)
            if bad:
                raise NonFiniteError(step, bad)
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=force)
        if saved and not self.async_save:
            # The save's host copies are freed by now, but glibc keeps their memory: the SmolLM2
            # tiny run (checkpoints every step, the cores shared) peaked at 6.5-6.7 GB without
            # this, 4.6 GB with it, at 0.3-0.5 s a save (`memory`'s docstring).
            memory.release_freed_memory()
        return saved

    def wait(self) -> None:
        """Blocks until a background save has committed (or raised)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- restoring ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, abstract: PyTree, barrier_prefix: str | None = None
                ) -> Restored:
        """Restores ``step``; leaves take shape, dtype and sharding from ``abstract``'s leaves.
        `barrier_prefix` names the barrier Orbax's restore ends in (several processes meet
        there), so that one attempt's barrier cannot be met by another attempt's
        (`restore_latest`); None: the manager's."""
        self._manager.wait_until_finished()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                  meta=ocp.args.JsonRestore())
        if barrier_prefix is None:
            out = self._manager.restore(int(step), args=args)
        else:
            reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                                      multiprocessing_options=ocp.options.MultiprocessingOptions(
                                          barrier_sync_key_prefix=barrier_prefix))
            try:
                out = reader.restore(self.directory / str(int(step)), args=args)
            finally:
                reader.close()
        return Restored(int(step), out.state, out.meta)

    def latest_meta(self) -> dict[str, Any] | None:
        """The JSON meta of the newest step whose meta reads (None: no step, or none reads), no
        array read: what a run checks (its seed, its config) before restoring a state, which
        another config's may not fit. Each process reads it alone (no barrier): a step whose meta
        one process cannot read is left to `restore_latest`, which all call together."""
        self._manager.wait_until_finished()
        me = jax.process_index()
        reader = ocp.Checkpointer(ocp.JsonCheckpointHandler(),
                                  multiprocessing_options=ocp.options.MultiprocessingOptions(
                                      primary_host=me, active_processes={me},
                                      barrier_sync_key_prefix=f"meta_p{me}"))
        try:
            for step in sorted(self._manager.all_steps(), reverse=True):
                try:
                    return dict(reader.restore(self.directory / str(step) / "meta",
                                               args=ocp.args.JsonRestore()) or {})
                except Exception:  # noqa: BLE001  (a damaged step: restore_latest reports it)
                    continue
            return None
        finally:
            reader.close()

    def restore_latest(self, abstract: PyTree) -> Restored | None:
        """Restores the newest step that restores cleanly; None if there is no step at all.

        A step that fails is tried once more after `RETRY_PAUSE_S` (a passing read error, e.g. of
        a network file system, is not corruption); one that fails again is logged with its error
        and, once an older step has restored, renamed to ``<step>.corrupt``. Running out of
        memory is raised, never taken for corruption; only one step's state is held at a time.
        Raises `CheckpointRestoreError` if every step fails.
        """
        self._manager.wait_until_finished()
        failures: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            restored, error = self._restore_twice(step, abstract)
            if error is not None:
                logger.warning("checkpoint step %d in %s cannot be restored (%s: %s); "
                               "falling back to the previous step", step, self.directory,
                               type(error).__name__, _first_line(error))
                failures.append((step, error))
                continue
            if failures:
                logger.warning("restored checkpoint step %d instead of newer bad step(s) %s",
                               step, [s for s, _ in failures])
                self._quarantine([s for s, _ in failures])
            return restored
        if not failures:
            return None
        reasons = "; ".join(f"step {s}: {type(e).__name__}: {_first_line(e)}"
                            for s, e in failures)
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} could be restored with the given abstract state "
            f"({reasons})") from failures[0][1]

    def _restore_twice(self, step: int, abstract: PyTree
                       ) -> tuple[Restored | None, Exception | None]:
        """(the restored step, None), or (None, the second try's error).

        With several processes every attempt is collective: a step counts as restored only if
        every process read it, and all retry or fall back together (a read error on one host
        sent that process alone to an older step while its peers trained on, their restores
        released by its own at Orbax's shared barrier). Each attempt's Orbax barrier has a name
        of its own, and a process whose read failed still meets it, so no peer waits there."""
        multi = jax.process_count() > 1
        for attempt in (1, 2):
            prefix = distributed.numbered(f"infalign_restore_{step}") if multi else None
            try:
                restored = (self.restore(step, abstract) if prefix is None
                            else self.restore(step, abstract, barrier_prefix=prefix))
                error = None
            except Exception as e:  # noqa: BLE001  (Orbax/TensorStore/JSON raise many types)
                if _out_of_memory(e):
                    raise
                restored, error = None, e
                if multi:
                    _meet_restore_barrier(prefix)
            failed = [i for i, ok in enumerate(distributed.from_every_process(
                f"{prefix}_read", error is None)) if not ok] if multi else []
            if error is None and failed:
                restored, error = None, RuntimeError(
                    f"process(es) {failed} could not restore step {step}")
            if error is None:
                if attempt == 2:
                    logger.warning("checkpoint step %d restored on a second try", step)
                return restored, None
            if attempt == 2:
                return None, error
            logger.warning("checkpoint step %d failed to restore (%s: %s); trying once more",
                           step, type(error).__name__, _first_line(error))
            time.sleep(RETRY_PAUSE_S)
        raise AssertionError("unreachable")

    def _quarantine(self, steps: list[int]) -> None:
        ocp.multihost.sync_global_processes("infalign_checkpoint_quarantine_start")
        if ocp.multihost.is_primary_host(0):
            for step in steps:
                src = self.directory / str(step)
                dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
                n = 1
                while dst.exists():
                    dst = self.directory / f"{step}{CORRUPT_SUFFIX}{n}"
                    n += 1
                src.rename(dst)
                logger.warning("moved bad checkpoint %s to %s", src, dst)
        ocp.multihost.sync_global_processes("infalign_checkpoint_quarantine_end")
        self._manager.reload()


RETRY_PAUSE_S = 1.0   # before a failed step's second try


def _meet_restore_barrier(prefix: str) -> None:
    """The barrier an Orbax restore with `prefix` ends in, met by a process whose restore failed
    before it (its peers that read the step wait there)."""
    try:
        ocp.multihost.sync_global_processes(
            ocp.multihost.unique_barrier_key("Checkpointer:restore", prefix=prefix))
    except Exception as e:  # noqa: BLE001  (a peer that failed too never comes: a timeout)
        logger.warning("restore barrier %s: %s", prefix, _first_line(e))


def _out_of_memory(e: BaseException) -> bool:
    """Host (MemoryError) or accelerator (XLA's RESOURCE_EXHAUSTED) memory ran out: a reason to
    stop, not a sign of a corrupt checkpoint."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def _on_this_process(abstract: PyTree) -> bool:
    """Whether every leaf's sharding lies on this process's devices."""
    mine = set(jax.local_devices())
    return all(getattr(x, "sharding", None) is not None and x.sharding.device_set <= mine
               for x in jax.tree.leaves(abstract))


def _checkpoint_root(path: str) -> tuple[epath.Path, int | None]:
    """(directory of step directories, the step asked for or None for the newest) of `path`: a
    run directory holding checkpoints/, that checkpoints/ directory, or one step directory."""
    p = epath.Path(path)
    if not p.is_dir():
        raise ValueError(f"config.train.init_from={path!r} is not a directory (expected a run "
                         f"directory, its checkpoints/ directory or one step directory in it)")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", None
    if p.name.isdigit() and (p / "meta").is_dir():
        return p.parent, int(p.name)
    return p, None


def restore_params(path: str, abstract_params: PyTree) -> tuple[PyTree, int, dict[str, Any]]:
    """(params, step, meta) of a checkpoint under `path` (`_checkpoint_root`: the newest step
    unless a step directory is given), read-only; the parameters take the shapes, dtypes and
    shardings of `abstract_params` (a state's ``params``; the rest of that checkpoint's state,
    e.g. its optimiser state, is not read). Into shardings of this process's devices alone
    (`local_abstract`) it reads without the other processes; into global shardings every process
    must call it. A directory without checkpoints, or parameters of another shape, is a
    ValueError naming `path`."""
    root, step = _checkpoint_root(path)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    if _on_this_process(abstract_params):
        # This process alone: a read into its own devices needs no peer, so a process may read
        # where others do not (process 0 exporting a run) or at another time (Orbax's default
        # waits for every process).
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"read_p{me}"))
    absl_log = logging.getLogger("absl")   # Orbax warns that a read-only manager is read-only
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        manager = ocp.CheckpointManager(root.absolute(), options=options)
    finally:
        absl_log.setLevel(level)
    try:
        steps = sorted(manager.all_steps())
        if step is None and not steps:
            raise ValueError(f"config.train.init_from={path!r} holds no checkpoint (expected a "
                             f"run directory, its checkpoints/ directory or one step directory)")
        step = steps[-1] if step is None else step
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore({"params": abstract_params},
                                             restore_args={"params": restore_args},
                                             partial_restore=True),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001  (Orbax/TensorStore raise many types)
            raise ValueError(f"config.train.init_from={path!r}: checkpoint step {step} does not "
                             f"hold parameters of this run's model ({type(e).__name__}: "
                             f"{_first_line(e)})") from e
    finally:
        manager.close()
    params = out.state["params"]
    # A partial restore gives a parameter the checkpoint lacks back as its abstract struct.
    missing = [jax.tree_util.keystr(key)
               for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"config.train.init_from={path!r}: checkpoint step {step} holds no "
                         f"params{missing[0]}" + (f" (nor {len(missing) - 1} more of this run's "
                                                   f"{len(jax.tree.leaves(abstract_params))})"
                                                   if len(missing) > 1 else "")
                         + " (it does not hold parameters of this run's model)")
    unread = _unread_params(root / str(step) / "state", abstract_params)
    if unread:   # intended (e.g. a value head a run without one does not use), but counted
        logger.warning("%s: checkpoint step %d holds %d parameter(s) this run's model does not "
                       "have, not read: %s", path, step, len(unread),
                       ", ".join(f"params{k}" for k in unread[:5])
                       + (f" and {len(unread) - 5} more" if len(unread) > 5 else ""))
    # Orbax restores a stored array of another shape as stored: refuse it here.
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    want = jax.tree.leaves(abstract_params)
    for (key, leaf), spec in zip(got, want):
        if (leaf.shape, leaf.dtype) != (spec.shape, spec.dtype):
            raise ValueError(f"config.train.init_from={path!r}: checkpoint step {step} holds "
                             f"params{jax.tree_util.keystr(key)} of shape {leaf.shape} "
                             f"{leaf.dtype}, this run's model needs {spec.shape} {spec.dtype} "
                             f"(it does not hold parameters of this run's model)")
    return params, int(step), dict(out.meta or {})


def _unread_params(state_dir: epath.Path, abstract_params: PyTree) -> list[str]:
    """The key paths of the parameters stored under `state_dir` (a step's state item) that
    `abstract_params` does not have: a partial restore leaves them unread. Read from the
    checkpoint's tree metadata (no array is read)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        stored = handler.metadata(epath.Path(state_dir)).tree["params"]
    finally:
        handler.close()
    # compared as plain names: the stored metadata names a sequence index as a dict key
    plain = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")  # noqa: E731
    wanted = {plain(k) for k, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(stored)[0]
            if plain(k) not in wanted]


def _first_line(e: BaseException) -> str:
    """The error's first line; when it ends in ':' (Orbax's "tree structures do not match:"), the
    few lines that say what (the field names) joined to it."""
    lines = [line.strip() for line in str(e).strip().splitlines()]
    if not lines:
        return ""
    if lines[0].endswith(":"):
        return " ".join(lines[:6])[:500]
    return lines[0][:300]
