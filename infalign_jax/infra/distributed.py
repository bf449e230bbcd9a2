"""Multi-process (multi-host) set-up: one JAX process per host, one global mesh over all devices.

JAX on several hosts is multi-controller: every process runs the same program, sees every device
through `jax.devices()` but addresses only its own (`jax.local_devices()`), and global arrays are
assembled from the shards each process holds. This module holds the few things that differ from
the single-process path; everything else (mesh, shardings, jitted steps, Orbax checkpoints) is
unchanged code:

* `DistributedConfig` / `from_env` / `initialize`: start `jax.distributed` before any JAX
  computation. One process is a no-op (apart from the CPU device count); `"auto"` as coordinator
  defers to `jax.distributed.initialize()`'s cluster detection (Cloud TPU pods, SLURM, Open MPI).
* `is_primary`: process 0, the one that logs and writes host-side files (Orbax coordinates its
  own multi-host writes: every process calls `save`). `barrier`: all processes meet, without a
  device computation (see its docstring for why that matters on CPU). `report_failure`: a
  process's error, so that peers waiting for it in `barrier` or `from_primary` raise
  `PeerFailed` naming it at once (every entrypoint reports through `cli.run`); `watch_peers`:
  stops a process blocked in a collective with a failed peer (`cli.start` starts it).
* `process_shard` / `host_local_batch`: which rows of a global batch, prompt set or reference
  table this process feeds to `sharding.shard_batch` (`jax.make_array_from_process_local_data`).
* `global_from_host`: a global array from a host value every process holds identically (reward or
  reference tables), without a cross-process `device_put`.
* `gather_to_host`: a global array (tree) as numpy on every host, for metrics and final results.
* `stack_from_processes`: host values (each process's own) stacked over the processes on every
  host, e.g. the rows of the calibration pass each process drew.
* `from_primary`: work only process 0 does (a file it writes), its JSON result on every process;
  its failure is every process's, at once.

On CPU, cross-process collectives need an implementation: `jax_cpu_collectives_implementation`
("gloo" over TCP, the jax 0.10 default, or "mpi"); without one a multi-process CPU computation
that needs communication fails. The option is read only when the CPU client is created, so
`initialize` sets it first. Two gloo hazards measured with jax 0.10.2 on a busy 2-core host:
a process reaching a new collective more than ~30 s after its peers fails (`barrier` after long
compilations avoids it), and many small collective programs dispatched without waiting (e.g. one
eager reduction per leaf of a sharded tree) can deadlock: put such work in one jitted program.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the client, for barriers
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

AUTO = "auto"
CPU_COLLECTIVES = ("gloo", "mpi")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "INFALIGN_HEARTBEAT_TIMEOUT_S"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where this process sits in a multi-process run; bad values fail here, naming the field.

    coordinator_address: "host:port" of process 0's coordinator service, `"auto"` (let
      `jax.distributed.initialize()` detect everything on TPU pods / SLURM / Open MPI), or None
      for a single process.
    local_device_count: on CPU, the number of devices this process creates
      (`jax_num_cpu_devices`); None keeps the default (or `XLA_FLAGS`). Ignored off CPU.
    heartbeat_timeout: seconds without a heartbeat after which the coordination service declares
      a process dead and stops the others; None keeps jax's default (100 s). A process killed
      outright (SIGKILL, the out-of-memory killer, a lost host) reports nothing, so this is how
      long its peers wait for it (env INFALIGN_HEARTBEAT_TIMEOUT_S).
    """

    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_count: int | None = None
    cpu_collectives: str = "gloo"
    initialization_timeout: int = 120
    heartbeat_timeout: int | None = None

    def __post_init__(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ValueError(f"DistributedConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for field in ("num_processes", "process_id", "initialization_timeout"):
            if not _is_int(getattr(self, field)):
                fail(field, "must be an int")
        if self.num_processes < 1:
            fail("num_processes", "must be >= 1")
        if not 0 <= self.process_id < self.num_processes:
            fail("process_id", f"must be in [0, num_processes={self.num_processes})")
        if self.initialization_timeout < 1:
            fail("initialization_timeout", "must be >= 1 second")
        if self.heartbeat_timeout is not None and (
                not _is_int(self.heartbeat_timeout) or self.heartbeat_timeout < 1):
            fail("heartbeat_timeout", "must be None or an int >= 1 (seconds)")
        if self.local_device_count is not None and (
                not _is_int(self.local_device_count) or self.local_device_count < 1):
            fail("local_device_count", "must be None or an int >= 1")
        if self.cpu_collectives not in CPU_COLLECTIVES:
            fail("cpu_collectives", f"must be one of {CPU_COLLECTIVES}")
        address = self.coordinator_address
        if address is None:
            if self.num_processes > 1:
                fail("coordinator_address",
                     f"is required when num_processes={self.num_processes} > 1 ('host:port' or"
                     f" {AUTO!r})")
        elif address == AUTO:
            # Cluster detection supplies both; explicit values here would be silently ignored.
            if (self.num_processes, self.process_id) != (1, 0):
                fail("num_processes",
                     f"with coordinator_address={AUTO!r} leave num_processes=1 and process_id=0:"
                     " the cluster environment supplies them")
        else:
            host, sep, port = str(address).rpartition(":")
            if not isinstance(address, str) or not sep or not host or not port.isdigit() \
                    or not 0 < int(port) < 65536:
                fail("coordinator_address", f"must be 'host:port' with port in 1..65535, or"
                                            f" {AUTO!r}, or None")

    @property
    def is_multi_process(self) -> bool:
        return self.num_processes > 1 or self.coordinator_address == AUTO


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> DistributedConfig:
    """`DistributedConfig` from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (and
    INFALIGN_HEARTBEAT_TIMEOUT_S).

    None of them set means one process. JAX_COORDINATOR_ADDRESS=auto means cluster detection.
    `overrides` are further `DistributedConfig` fields (e.g. local_device_count).
    """
    env = os.environ if environ is None else environ
    kwargs: dict[str, Any] = {}
    address = env.get(ENV_COORDINATOR, "").strip()
    if address:
        kwargs["coordinator_address"] = address
    for var, field in ((ENV_NUM_PROCESSES, "num_processes"), (ENV_PROCESS_ID, "process_id"),
                       (ENV_HEARTBEAT, "heartbeat_timeout")):
        text = env.get(var, "").strip()
        if not text:
            continue
        try:
            kwargs[field] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {var}={text!r}: expected an integer") from None
    if address and address != AUTO:
        # without a count every host ran as a lone process 0 of 1, all into one work dir
        missing = [var for var in (ENV_NUM_PROCESSES, ENV_PROCESS_ID)
                   if not env.get(var, "").strip()]
        if missing:
            raise ValueError(f"environment variable {ENV_COORDINATOR}={address!r} is set without "
                             f"{' and '.join(missing)}: set both with the address (or "
                             f"{ENV_COORDINATOR}={AUTO!r} for cluster detection)")
    kwargs.update(overrides)
    return DistributedConfig(**kwargs)


def _may_use_cpu() -> bool:
    platforms = jax.config.jax_platforms
    return not platforms or "cpu" in str(platforms).split(",")


def initialize(cfg: DistributedConfig) -> None:
    """Starts `jax.distributed` for `cfg`; call before any JAX computation (backends start lazily).

    One process: only the CPU device count is applied. Several: the CPU collectives
    implementation is set (it only affects the CPU client, so it is harmless on GPU/TPU hosts,
    whose CPU client is secondary) and `jax.distributed.initialize` is called, which blocks until
    all `num_processes` have connected or `initialization_timeout` seconds have passed.
    """
    if cfg.local_device_count is not None and _may_use_cpu():
        jax.config.update("jax_num_cpu_devices", int(cfg.local_device_count))
    if not cfg.is_multi_process:
        return
    if jax.distributed.is_initialized():
        raise RuntimeError("initialize: jax.distributed is already initialized in this process")
    if _may_use_cpu():
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    timeouts: dict[str, int] = {"initialization_timeout": cfg.initialization_timeout}
    if cfg.heartbeat_timeout is not None:
        timeouts["heartbeat_timeout_seconds"] = cfg.heartbeat_timeout
    if cfg.coordinator_address == AUTO:
        jax.distributed.initialize(**timeouts)
    else:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id,
                                   **timeouts)
    logger.info("process %d of %d: %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Whether this is process 0: the one that logs and writes host-side outputs."""
    return jax.process_index() == 0


# Key-value directory of reported failures: one key per report, numbered in the order of the
# reports (`key_value_increment`), so that peers name the first failure, the likely cause.
FAILED = "infalign_failed/"
_FAILURE_COUNT = "infalign_failure_count"
# Set when this process is on its way out by itself (it reported its own error, or the
# interpreter is exiting), so that `watch_peers` leaves it to finish.
_EXITING = threading.Event()


class PeerFailed(RuntimeError):
    """Another process of the job failed while this one waited for it."""


def report_failure(error: BaseException) -> None:
    """Records this process's failure in the coordination service, so that every peer waiting
    in `barrier` or `from_primary` raises `PeerFailed` naming it at once instead of waiting out
    the timeout, and peers blocked elsewhere are stopped by `watch_peers` (`cli.run` calls it
    for any error of an entrypoint). A `PeerFailed` is not recorded (the failure it names is, so
    peers name the cause, not its echo). This process's own watch then stands down. A no-op on
    one process or before `jax.distributed` starts; never raises (it runs while an error
    propagates)."""
    _EXITING.set()
    client = _job_client()
    if client is None or isinstance(error, PeerFailed):
        return
    try:
        number = client.key_value_increment(_FAILURE_COUNT, 1)
        client.key_value_set(f"{FAILED}{number:09d}", json.dumps(
            {"process": jax_distributed.global_state.process_id, "error": _first_line(error)}))
    except Exception as e:  # the service may be gone already; the original error goes on
        logger.warning("could not report this process's failure to its peers: %s", e)


def _job_client() -> Any:
    """The coordination client of a job of several processes; None on one process or before
    `jax.distributed` starts (without starting a backend, unlike `jax.process_count`)."""
    state = jax_distributed.global_state
    return None if (state.num_processes or 1) == 1 else state.client


def _first_failure(client: Any, other_than: int | None = None) -> tuple[int, str] | None:
    """(process, error) of the earliest reported failure (of a process other than
    `other_than`), or None."""
    for _, value in sorted(client.key_value_dir_get(FAILED)):
        got = json.loads(value)
        if got["process"] != other_than:
            return got["process"], got["error"]
    return None


EXIT_PEER_FAILED = 3   # the exit status of a process `watch_peers` stopped


def watch_peers(poll_s: float = 1.0, grace_s: float = 10.0, shutdown_s: float = 30.0,
                exit_fn: Callable[[int], Any] = os._exit) -> threading.Thread | None:
    """Starts a daemon thread that stops this process when another one fails (`report_failure`).

    A process blocked in a cross-process collective (a training step's all-reduce) waits for a
    failed peer for ever: nothing can interrupt it from Python. The thread polls the failures
    every `poll_s`; on one it waits `grace_s` for the main thread to stop by itself (a `barrier`
    or `from_primary` raises `PeerFailed`). If this process is not then on its way out by itself
    (its own error reported, or the interpreter exiting), it names the failed process on stderr,
    shuts `jax.distributed` down (waiting at most `shutdown_s`, so that the failed process's own
    shutdown completes) and exits with `EXIT_PEER_FAILED` without unwinding the blocked thread.
    Checkpoints stay consistent: an interrupted Orbax save leaves only a temporary directory,
    which a resume removes. A no-op (None) on one process or before `jax.distributed` starts.
    """
    client = _job_client()
    if client is None:
        return None
    me = jax_distributed.global_state.process_id
    atexit.register(_EXITING.set)   # runs before jax's own shutdown at exit (registered earlier)

    def watch() -> None:
        failed = None
        while failed is None:
            time.sleep(poll_s)
            if _EXITING.is_set():
                return
            try:
                failed = _first_failure(client, other_than=me)
            except Exception:  # the coordination service is gone: the job is ending anyway
                return
        time.sleep(grace_s)
        if _EXITING.is_set():
            return
        who, error = failed
        print(f"process {who} failed ({error}); process {me} stops (it may be blocked in a "
              f"collective with it)", file=sys.stderr, flush=True)
        closer = threading.Thread(target=jax.distributed.shutdown, daemon=True)
        closer.start()
        closer.join(shutdown_s)
        exit_fn(EXIT_PEER_FAILED)

    thread = threading.Thread(target=watch, name="infalign-watch-peers", daemon=True)
    thread.start()
    return thread


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _wait(what: str, timeout_s: float, key: str, slice_s: float = 1.0) -> str:
    """The value of `key` once some process sets it, read by blocking reads of at most `slice_s`
    each (the coordination service answers as soon as the key is set: one call per process per
    slice, whatever the number of processes). Raises `PeerFailed` as soon as any process has
    reported a failure (`report_failure`; checked before each read: a peer that came here and
    then gave up, e.g. at its timeout, is not met), and TimeoutError after `timeout_s`."""
    client, start = _client(), time.monotonic()
    while True:
        failed = _first_failure(client)
        if failed is not None:
            raise PeerFailed(f"{what}: process {failed[0]} failed ({failed[1]})")
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            raise TimeoutError(f"{what}: not done after {timeout_s:g} s")
        try:
            return client.blocking_key_value_get(key, max(1, int(min(slice_s, left) * 1000)))
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Waits until every process reaches `barrier(name)`; a no-op on one process.

    Meets through the coordination service's key-value store (no device computation), so it can
    sit right after an expensive compilation: gloo waits only ~30 s (fixed in XLA, not
    configurable from jax 0.10) for peers to join a new communicator, and processes that compile
    at different speeds (a busy host) would otherwise fail the first collective with "Gloo context
    initialization failed: DEADLINE_EXCEEDED". Each process marks its arrival and counts itself
    in; the last to come posts "done", which the others wait for (`_wait`). A peer that fails
    first (`report_failure`) ends the wait at once with `PeerFailed` naming its error; a peer
    that never comes, with TimeoutError naming the missing processes after `timeout_s`. `name`
    must be unique per barrier and equal on all processes (`numbered`); a reused name is refused.
    """
    count = jax.process_count()
    if count == 1:
        return
    client, where = _client(), f"infalign_barrier/{name}/"
    try:
        client.key_value_set(f"{where}arrived/{jax.process_index()}", "1")
    except jax.errors.JaxRuntimeError as e:
        if "ALREADY_EXISTS" in str(e):
            raise ValueError(f"barrier {name!r} was met before: each barrier needs a name of its "
                             f"own (distributed.numbered)") from None
        raise
    if client.key_value_increment(f"{where}count", 1) == count:
        client.key_value_set(f"{where}done", "1")
    try:
        _wait(f"barrier {name}", timeout_s, f"{where}done")
    except TimeoutError as e:
        arrived = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(
            f"{where}arrived/")}
        missing = sorted(set(range(count)) - arrived)
        raise TimeoutError(f"{e}: process(es) {missing} did not arrive") from None


def from_primary(name: str, fn: Callable[[], Any], timeout_s: float = 600.0) -> Any:
    """`fn()` run by process 0 alone (e.g. writing a file once); every process returns its
    result, which must be JSON (it travels through the coordination service's key-value store).
    The others wait for it (up to `timeout_s`), so on return the work is done; if `fn` raises,
    process 0 raises it and the others raise a RuntimeError naming it, without waiting out the
    timeout, as they do (`PeerFailed`) when any process fails first. `name` must be unique per
    call and equal on all processes (`numbered`)."""
    if jax.process_count() == 1:
        return fn()
    key = f"infalign_from_primary/{name}"
    if is_primary():
        try:
            value = fn()
        except BaseException as e:
            _client().key_value_set(key, json.dumps({"error": _first_line(e)}))
            raise
        _client().key_value_set(key, json.dumps({"value": value}))
        return value
    got = json.loads(_wait(f"from_primary {name}", timeout_s, key))
    if "error" in got:
        raise RuntimeError(f"{name}: process 0 failed ({got['error']})")
    return got["value"]


def from_every_process(name: str, value: Any, timeout_s: float = 600.0) -> list[Any]:
    """Every process's `value` (JSON), in process order; one process: [value]. Through the
    coordination service's key-value store (no device computation): each process posts its own,
    meets the others at a `barrier`, then reads them all. A collective: every process calls it
    with the same `name` (`numbered`)."""
    if jax.process_count() == 1:
        return [value]
    where = f"infalign_every/{name}/"
    _client().key_value_set(f"{where}{jax.process_index()}", json.dumps(value))
    barrier(f"every_{name}", timeout_s)
    got = {int(k.rsplit("/", 1)[-1]): json.loads(v)
           for k, v in _client().key_value_dir_get(where)}
    return [got[i] for i in range(jax.process_count())]


_BARRIERS = itertools.count()


def _client() -> Any:
    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("several processes but jax.distributed has no client")
    return client


def numbered(name: str) -> str:
    """`name` with this process's next barrier number: a fresh name for a barrier met more than
    once in a run, equal on every process as long as all meet their barriers in the same order."""
    return f"{name}_{next(_BARRIERS)}"


def process_shard(n: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """This process's contiguous, equal slice of `n` rows (prompts, reference-table rows, ...).

    Process i gets rows [i * n / count, (i + 1) * n / count). That is the layout
    `make_array_from_process_local_data` expects when the processes' devices follow each other
    along the batch axes of the mesh (what `jax.make_mesh` gives); `host_local_batch` reads the
    rows off the sharding instead, for any mesh.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not _is_int(n) or n < 0:
        raise ValueError(f"process_shard: n must be an int >= 0, got {n!r}")
    if not _is_int(count) or count < 1:
        raise ValueError(f"process_shard: process_count must be an int >= 1, got {count!r}")
    if not _is_int(index) or not 0 <= index < count:
        raise ValueError(f"process_shard: process_index must be in [0, {count}), got {index!r}")
    if n % count:
        raise ValueError(f"process_shard: {n} rows are not divisible by {count} processes; pad"
                         f" or trim to a multiple of {count}")
    per = n // count
    return slice(index * per, (index + 1) * per)


def _local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a `shape` array whose shards live on this process; must be contiguous."""
    index_map = sharding.addressable_devices_indices_map(shape)
    rows = sorted({(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop)
                   for s in index_map.values()})
    for (_, stop), (start, _) in zip(rows, rows[1:]):
        if start != stop:
            raise ValueError(f"this process's batch rows {rows} are not contiguous on mesh"
                             f" {dict(sharding.mesh.shape)}: order the mesh devices by process")
    return slice(rows[0][0], rows[-1][1])


def host_local_batch(global_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of a host batch every process holds whole (numpy leaves).

    The rows are read from `sharding.batch_sharding` on `mesh`, so passing the result to
    `sharding.shard_batch` rebuilds exactly `global_batch` as a global array. Scalars pass
    through (they are replicated).
    """
    from infalign_jax.infra.sharding import batch_sharding

    def take(x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 0:
            return x
        return x[_local_rows(batch_sharding(mesh, x.ndim), x.shape)]

    return jax.tree.map(take, global_batch)


def global_from_host(tree: Any, shardings: Any) -> Any:
    """Global arrays from host values that every process holds identically.

    `shardings` is one `Sharding` or a matching tree. Each process copies only the slices its own
    devices hold (`jax.make_array_from_callback`), so no cross-process transfer happens and
    nothing checks that the hosts really agree: build such data deterministically.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def stack_from_processes(tree: Any) -> Any:
    """Each leaf (a host array, the same shape and dtype on every process) stacked over the
    processes: [process_count, ...], row i from process i; one process: a leading axis of 1.
    A collective: all processes must call it with the same tree, in the same order as their
    other calls. The processes first meet at a `barrier` (the coordination service), so one that
    arrives much later (a slower share of work, a longer load) does not fail the collective."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)
    barrier(numbered("stack_from_processes"))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=False))



def gather_to_host(tree: Any) -> Any:
    """Every leaf (a global `jax.Array`, possibly spread over hosts) as a full numpy array.

    A collective: all processes must call it with the same tree. Leaves with a `NamedSharding`
    are replicated by one jitted identity for the whole tree (one compilation, not one per
    leaf as with `multihost_utils.process_allgather`). Leaves this process holds whole (numpy
    arrays, scalars, a jax.Array on its own devices) are returned as they are: all-gathering
    them joined the processes' copies (a (3,) leaf came back (6,) on two processes). Other
    leaves go through `process_allgather`.
    """
    leaves, treedef = jax.tree.flatten(tree)
    named = [i for i, x in enumerate(leaves)
             if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)]
    out: list[Any] = list(leaves)
    if named:
        shardings = [NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in named]
        copies = jax.jit(lambda xs: xs, out_shardings=shardings)([leaves[i] for i in named])
        for i, x in zip(named, copies):
            out[i] = np.asarray(x.addressable_data(0))
    rest = []
    for i in sorted(set(range(len(leaves))) - set(named)):
        x = leaves[i]
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            out[i] = np.asarray(x)
        else:
            rest.append(i)
    if rest:
        gathered = multihost_utils.process_allgather([leaves[i] for i in rest], tiled=True)
        for i, x in zip(rest, gathered):
            out[i] = np.asarray(x)
    return jax.tree.unflatten(treedef, out)
