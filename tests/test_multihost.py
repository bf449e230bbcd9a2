"""Tests of `infalign_jax.infra.distributed`: config validation, environment parsing, per-process rows,
and a real two-process CTRL run (gloo CPU collectives) against a one-process reference.

The two-process test starts `tests/_multihost_worker.py` twice (4 CPU devices each, one global
8-device (data=4, fsdp=2) mesh) and meanwhile runs the same worker's `main` with one process and
8 devices in the test process. The
program and the mesh are the same; what differs is that the cross-device reductions of the pair
go through gloo over TCP, whose summation order is not the in-process one, so results agree to
float32 rounding, not bitwise (measured here: at most 1.5e-6 absolute on parameters, 2e-5 on a
gradient norm of ~17, i.e. < 0.4 of the tolerance below). A single sampled token coming out
differently would move the rewards by >= 1/(64 * 32) and the parameters far more than that, so
the tolerance still pins the whole trajectory. Checkpoint restore must be bitwise.

Two CPU-gloo hazards the worker works around (see `_multihost_worker.py`): a process that reaches
a new collective > 30 s after its peer fails (hence an ahead-of-time compile and a barrier), and
many small collective programs dispatched without waiting can deadlock (hence one jitted
finiteness check instead of `Checkpointer.save`'s per-leaf one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infalign_jax.infra import distributed as dist
from infalign_jax.infra import sharding as sh

from xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_multihost_worker.py"
RTOL, ATOL = 1e-5, 1e-6
WORKER_TIMEOUT_S = 240  # a hang guard, not a speed assertion: a wedged collective fails here
STEPS = 3


# -- DistributedConfig ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"num_processes": 0}, "num_processes"),
    ({"num_processes": 2.0, "coordinator_address": "h:1"}, "num_processes"),
    ({"num_processes": True}, "num_processes"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, "process_id"),
    ({"process_id": -1}, "process_id"),
    ({"num_processes": 2}, "coordinator_address"),
    ({"num_processes": 2, "process_id": 1, "coordinator_address": "localhost"},
     "coordinator_address"),
    ({"coordinator_address": "h:0"}, "coordinator_address"),
    ({"coordinator_address": "h:70000"}, "coordinator_address"),
    ({"coordinator_address": "h:65536"}, "coordinator_address"),
    ({"coordinator_address": ":1234"}, "coordinator_address"),
    ({"coordinator_address": "auto", "num_processes": 4}, "num_processes"),
    ({"local_device_count": 0}, "local_device_count"),
    ({"local_device_count": 2.5}, "local_device_count"),
    ({"cpu_collectives": "nccl"}, "cpu_collectives"),
    ({"initialization_timeout": 0}, "initialization_timeout"),
    ({"heartbeat_timeout": 0}, "heartbeat_timeout"),
    ({"heartbeat_timeout": 2.5}, "heartbeat_timeout"),
])
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=f"DistributedConfig.{field}"):
        dist.DistributedConfig(**kwargs)


def test_config_accepts_valid_and_reports_multi_process():
    assert not dist.DistributedConfig().is_multi_process
    assert dist.DistributedConfig("10.0.0.1:1234", 4, 3).is_multi_process
    assert dist.DistributedConfig("[::1]:80", 2, 0).is_multi_process  # IPv6 host keeps its ':'
    assert dist.DistributedConfig("auto").is_multi_process
    # One process with an address is allowed (a one-host job launched like a multi-host one).
    assert not dist.DistributedConfig("h:1").is_multi_process


def test_from_env():
    assert dist.from_env({}) == dist.DistributedConfig()
    env = {"JAX_COORDINATOR_ADDRESS": "node0:8476", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": " 2 ", "UNRELATED": "x"}
    assert dist.from_env(env) == dist.DistributedConfig("node0:8476", 4, 2)
    assert dist.from_env(env, local_device_count=4).local_device_count == 4
    assert dist.from_env({"JAX_COORDINATOR_ADDRESS": "auto"}).coordinator_address == "auto"
    assert dist.from_env({"INFALIGN_HEARTBEAT_TIMEOUT_S": "15"}).heartbeat_timeout == 15
    with pytest.raises(ValueError, match="INFALIGN_HEARTBEAT_TIMEOUT_S='soon'"):
        dist.from_env({"INFALIGN_HEARTBEAT_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match="DistributedConfig.heartbeat_timeout"):
        dist.from_env({"INFALIGN_HEARTBEAT_TIMEOUT_S": "0"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four'"):
        dist.from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="DistributedConfig.process_id"):
        dist.from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                       "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="DistributedConfig.coordinator_address"):
        dist.from_env({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    # an address alone ran every host as process 0 of 1
    with pytest.raises(ValueError, match=r"JAX_COORDINATOR_ADDRESS='h:1' is set without "
                                         r"JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        dist.from_env({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match=r"without JAX_PROCESS_ID"):
        dist.from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


def test_initialize_and_barrier_single_process_are_no_ops():
    dist.initialize(dist.DistributedConfig())
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and dist.is_primary()
    dist.barrier("single_process")  # would raise without a client if it tried to sync


class _KeyValueStore:
    """The coordination client's key-value calls, in memory (one process's view)."""

    def __init__(self):
        self.kv: dict[str, str] = {}
        self.counters: dict[str, int] = {}
        self.shut_down = False

    def key_value_set(self, key, value, allow_overwrite=False):
        if key in self.kv and not allow_overwrite:
            raise jax.errors.JaxRuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
        self.kv[key] = value

    def key_value_increment(self, key, increment):
        self.counters[key] = self.counters.get(key, 0) + increment
        return self.counters[key]

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

    def blocking_key_value_get(self, key, timeout_in_ms):
        if key not in self.kv:
            time.sleep(timeout_in_ms / 1000)
            raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out: {key}")
        return self.kv[key]

    def shutdown(self):
        self.shut_down = True


@pytest.fixture
def two_process_client(monkeypatch):
    """This process as process 1 of 2, with an in-memory coordination client."""
    client = _KeyValueStore()
    state = dist.jax_distributed.global_state
    monkeypatch.setattr(state, "client", client)
    monkeypatch.setattr(state, "num_processes", 2)
    monkeypatch.setattr(state, "process_id", 1)
    monkeypatch.setattr(dist, "_EXITING", dist.threading.Event())
    return client


def _as_process(monkeypatch, index):
    monkeypatch.setattr(dist.jax_distributed.global_state, "process_id", index)


def test_report_failure_records_the_cause_and_waits_end_on_it(two_process_client, monkeypatch):
    kv = two_process_client.kv
    dist.report_failure(dist.PeerFailed("barrier x: process 0 failed (OSError: disk full)"))
    assert kv == {}   # an echo of another process's failure is not recorded
    kv["ready"] = "yes"
    assert dist._wait("barrier y", 60, "ready") == "yes"   # no failure: the key's value
    with pytest.raises(TimeoutError, match=r"^barrier y: not done after 0.05 s$"):
        dist._wait("barrier y", 0.05, "absent", slice_s=0.01)
    dist.report_failure(OSError("disk full\nsecond line"))
    assert json.loads(kv["infalign_failed/000000001"]) == {"process": 1,
                                                           "error": "OSError: disk full"}
    _as_process(monkeypatch, 0)
    dist.report_failure(RuntimeError("gloo: connection reset"))   # a later failure, an echo
    # a failure ends a wait before its key is read (a peer that came and gave up is not met),
    # naming the first failure reported, not the lowest process
    with pytest.raises(dist.PeerFailed, match=r"^barrier y: process 1 failed \(OSError: disk "
                                              r"full\)$"):
        dist._wait("barrier y", 60, "ready")
    assert dist._first_failure(two_process_client, other_than=1) == (
        0, "RuntimeError: gloo: connection reset")


def test_report_failure_is_a_no_op_on_one_process_and_never_raises(two_process_client,
                                                                  monkeypatch):
    monkeypatch.setattr(dist.jax_distributed.global_state, "num_processes", 1)
    dist.report_failure(ValueError("alone"))
    assert two_process_client.kv == {}
    monkeypatch.setattr(dist.jax_distributed.global_state, "num_processes", 2)

    def unreachable(*args, **kwargs):
        raise RuntimeError("coordination service unavailable")

    monkeypatch.setattr(two_process_client, "key_value_increment", unreachable)
    dist.report_failure(ValueError("the original error goes on"))   # logged, not raised


def test_a_reused_barrier_name_is_refused(two_process_client, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    two_process_client.kv["infalign_barrier/b/arrived/0"] = "1"   # process 0 came first
    two_process_client.counters["infalign_barrier/b/count"] = 1
    dist.barrier("b")   # process 1, the last, posts "done" and passes
    assert two_process_client.kv["infalign_barrier/b/done"] == "1"
    with pytest.raises(ValueError, match="barrier 'b' was met before"):
        dist.barrier("b")


def test_watch_peers_stops_this_process_on_a_peer_failure_unless_it_is_exiting(
        two_process_client, monkeypatch, capsys):
    exits = []
    _as_process(monkeypatch, 0)
    dist.report_failure(ValueError("out of memory"))    # process 0's failure ...
    _as_process(monkeypatch, 1)
    monkeypatch.setattr(dist, "_EXITING", dist.threading.Event())   # ... seen from process 1
    thread = dist.watch_peers(poll_s=0.01, grace_s=0.0, exit_fn=exits.append)
    thread.join(10)
    assert exits == [dist.EXIT_PEER_FAILED] and two_process_client.shut_down
    assert ("process 0 failed (ValueError: out of memory); process 1 stops"
            in capsys.readouterr().err)

    # its own failure reported, a process is on its way out: its watch leaves it alone
    exits.clear()
    monkeypatch.setattr(dist.jax_distributed.global_state, "client", two_process_client)
    dist.report_failure(KeyError("its own"))
    thread = dist.watch_peers(poll_s=0.01, grace_s=0.0, exit_fn=exits.append)
    thread.join(10)
    assert not thread.is_alive() and exits == []


# -- rows per process -------------------------------------------------------------------------

@pytest.mark.parametrize("n,count", [(8, 2), (12, 3), (5, 1), (0, 4), (64, 8)])
def test_process_shard_partitions_rows_in_order(n, count):
    slices = [dist.process_shard(n, i, count) for i in range(count)]
    rows = np.concatenate([np.arange(n)[s] for s in slices])
    np.testing.assert_array_equal(rows, np.arange(n))  # contiguous, in order, disjoint, complete
    assert {s.stop - s.start for s in slices} == {n // count}
    assert dist.process_shard(n, 0, count) == slice(0, n // count)


def test_process_shard_defaults_to_this_process():
    assert dist.process_shard(6) == slice(0, 6)


@pytest.mark.parametrize("args,match", [
    ((10, 0, 3), "10 rows are not divisible by 3 processes"),
    ((8, 2, 2), r"process_index must be in \[0, 2\)"),
    ((8, -1, 2), "process_index"),
    ((8, 0, 0), "process_count must be an int >= 1"),
    ((-4, 0, 2), "n must be an int >= 0"),
])
def test_process_shard_errors(args, match):
    with pytest.raises(ValueError, match=match):
        dist.process_shard(*args)


def test_host_local_batch_and_host_round_trip_on_one_process():
    mesh = sh.make_mesh(sh.MeshConfig(data=4, fsdp=2))
    batch = {"x_BxT": np.arange(48, dtype=np.float32).reshape(8, 6),
             "idx_B": np.arange(8, dtype=np.int32), "scale": np.float32(2.0)}
    local = dist.host_local_batch(batch, mesh)  # one process owns every row
    for k in batch:
        np.testing.assert_array_equal(local[k], batch[k])
    back = dist.gather_to_host(sh.shard_batch(local, mesh))
    for k in batch:
        np.testing.assert_array_equal(back[k], batch[k])
    table = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    split = NamedSharding(mesh, P("fsdp", "data"))
    arr = dist.global_from_host(table, split)
    assert arr.sharding == split
    assert {tuple(s.data.shape) for s in arr.addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(dist.gather_to_host(arr), table)
    # Mixed tree: NamedSharding leaves, a single-device array and a numpy leaf.
    mixed = dist.gather_to_host({"a": arr, "b": jax.numpy.arange(3), "c": np.ones(2)})
    np.testing.assert_array_equal(mixed["a"], table)
    np.testing.assert_array_equal(mixed["b"], np.arange(3))
    np.testing.assert_array_equal(mixed["c"], np.ones(2))


def test_host_local_rows_must_be_contiguous():
    # One process holds every row; a process holding rows 0-1 and 4-5 (a mesh whose devices
    # are not ordered by process) is faked through the one method the check reads.
    mesh = sh.make_mesh(sh.MeshConfig(data=4, fsdp=2))
    sharding = NamedSharding(mesh, P("data"))
    full = dist._local_rows(sharding, (8, 3))
    assert full == slice(0, 8)

    class Gappy:
        mesh = sharding.mesh

        @staticmethod
        def addressable_devices_indices_map(shape):
            return {0: (slice(0, 2), slice(None)), 1: (slice(4, 6), slice(None))}

    with pytest.raises(ValueError, match="not contiguous"):
        dist._local_rows(Gappy(), (8, 3))


# -- the two-process run ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(process_id: int, num_processes: int, devices: int, port: int, out: Path
            ) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ)
    # Replaces conftest's 8-device flag: the device count per process is the point here.
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    log = out / f"worker{process_id}.log"
    cmd = [sys.executable, str(WORKER), "--process_id", str(process_id), "--num_processes",
           str(num_processes), "--port", str(port), "--out", str(out), "--steps", str(STEPS)]
    with open(log, "w") as f:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def _load_worker():
    spec = importlib.util.spec_from_file_location("_multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_all(procs: dict[str, tuple[subprocess.Popen, Path]], timeout_s: float) -> None:
    """Waits for every worker; on a failure or the deadline kills the rest and fails with logs."""
    deadline = time.monotonic() + timeout_s
    problem = None
    while problem is None and any(p.poll() is None for p, _ in procs.values()):
        failed = [n for n, (p, _) in procs.items() if p.poll() not in (None, 0)]
        if failed:
            problem = f"worker(s) {failed} exited with an error"
        elif time.monotonic() > deadline:
            problem = f"workers still running after {timeout_s:.0f} s (a hang?)"
        else:
            time.sleep(0.2)
    if problem is None and any(p.returncode != 0 for p, _ in procs.values()):
        problem = "worker(s) exited with an error"
    if problem is None:
        return
    for p, _ in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    report = [problem]
    for name, (p, log) in procs.items():
        # gloo logs a line per communicator; the tail holds the traceback.
        report.append(f"--- {name} (exit code {p.returncode}) ---\n"
                      + "\n".join(log.read_text().splitlines()[-60:]))
    pytest.fail("\n".join(report))


@pytest.mark.slow
def test_two_processes_match_one_process_and_restore_exactly(tmp_path):
    pair, single = tmp_path / "pair", tmp_path / "single"
    pair.mkdir()
    single.mkdir()
    port = _free_port()
    t0 = time.perf_counter()
    procs = {f"pair process {i}": _launch(i, 2, 4, port, pair) for i in range(2)}
    try:
        # The reference runs meanwhile, in this process (conftest's 8 devices, warm caches).
        _load_worker().main(["--process_id", "0", "--num_processes", "1", "--out", str(single),
                             "--steps", str(STEPS)])
    except BaseException:
        for p, _ in procs.values():
            p.kill()
            p.wait()
        raise
    t_single = time.perf_counter() - t0
    _wait_all(procs, WORKER_TIMEOUT_S)
    wall = time.perf_counter() - t0
    got, want = np.load(pair / "result.npz"), np.load(single / "result.npz")
    print(f"reference {t_single:.1f} s, pair {wall:.1f} s (timings: "
          + ", ".join(f"{k[8:]}={float(got[k]):.1f}" for k in got.files if "timings" in k) + ")")
    assert sorted(got.files) == sorted(want.files)
    state_keys = [k for k in got.files if k.startswith("final")]
    assert any("opt_state" in k for k in state_keys) and any("params" in k for k in state_keys)

    for result in (got, want):
        assert int(result["final.step"]) == STEPS + 1
        for key in [k for k in result.files if k.startswith("saved")]:
            restored, fresh = "restored" + key[5:], "fresh" + key[5:]
            assert result[restored].dtype == result[key].dtype, key
            np.testing.assert_array_equal(result[restored], result[key], err_msg=key)
            if "params" in key and result[key].size > 1:
                # The restore target started elsewhere, so equality means it was overwritten.
                assert not np.array_equal(result[fresh], result[key]), key

    compared = [k for k in want.files if k.startswith(("final", "metrics"))]
    used = max(float(np.max(np.abs(got[k] - want[k]) / (ATOL + RTOL * np.abs(want[k]))))
               for k in compared if want[k].size)
    print(f"largest difference: {used:.3f} of the tolerance")
    for key in compared:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
    assert got["metrics/reward"].shape == (STEPS + 1,)
    # The step after the restore moved the policy (a no-op step would also "match").
    assert not np.allclose(got["final.params['embed']"], got["saved.params['embed']"])


BATCH_WORKER = REPO / "tests" / "_multihost_batch_worker.py"


def _worker_on_two_processes(worker: Path, tmp_path: Path, name: str, devices: int) -> None:
    """Runs a worker script (`_multihost_pair.start`'s arguments) as the two processes of one
    job, `devices` CPU devices each, writing to tmp_path; logs in tmp_path/<name><i>.log."""
    _wait_all(_start_worker_on_two_processes(worker, tmp_path, name, devices), WORKER_TIMEOUT_S)


def _start_worker_on_two_processes(worker: Path, tmp_path: Path, name: str, devices: int
                                   ) -> dict[str, tuple[subprocess.Popen, Path]]:
    """`_worker_on_two_processes`' two processes, started and not waited for."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
    procs = {}
    for i in range(2):
        log = tmp_path / f"{name}{i}.log"
        with open(log, "w") as f:
            procs[f"process {i}"] = (subprocess.Popen(
                [sys.executable, str(worker), "--process_id", str(i), "--port", str(port),
                 "--out", str(tmp_path)], env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT),
                log)
    return procs


@pytest.mark.slow
def test_every_mesh_layout_gets_the_global_batch_across_processes(tmp_path):
    """`train.step_batch` on two processes: whether the batch axes span both, one or neither
    process (tensor=8 across the two hosts), the global batch is step 0's 8 prompts. Feeding
    each process its loader slice gave a (4, 3) "batch" under tensor=8 whose sum differed
    between the processes (60 and 87 for a true 147)."""
    _worker_on_two_processes(BATCH_WORKER, tmp_path, "batch", devices=4)
    got = json.loads((tmp_path / "batch.json").read_text())
    rows = got.pop("rows")
    assert len(rows) == 8 and len(set(rows)) == 8
    # a leaf a process holds whole came back joined with the other's copy: (3,) -> (6,)
    assert got.pop("whole_leaves") == {"one_device": [0.0, 1.0, 2.0], "numpy": [0, 1, 2, 3],
                                       "scalar": 2.5}
    prompts = np.arange(16 * 3).reshape(16, 3)
    for layout, out in got.items():
        assert out["shape"] == [8, 3], layout
        assert out["prompt_idx"] == rows, layout
        assert out["first_tokens"] == prompts[rows, 0].tolist(), layout
        assert out["sum"] == float(prompts[rows].sum()), layout


CALIBRATION_WORKER = REPO / "tests" / "_multihost_calibration_worker.py"
LOAD_WORKER = REPO / "tests" / "_multihost_load_worker.py"
RESTORE_WORKER = REPO / "tests" / "_multihost_restore_worker.py"


@pytest.mark.slow
def test_processes_restore_one_step_when_one_host_cannot_read_the_newest(tmp_path):
    """Process 1 cannot read step 2 (a host-local read error): each process chose its step
    alone, so process 1 restored step 1 while process 0 kept step 2 (its restore released by
    process 1's at Orbax's one shared barrier name). Now both retry together and, when the
    error lasts, both restore step 1 (step 2 set aside once). Config records that differ between
    the processes are refused on both."""
    _worker_on_two_processes(RESTORE_WORKER, tmp_path, "restore", devices=1)
    for i in range(2):
        got = json.loads((tmp_path / f"restored_p{i}.json").read_text())
        assert got["passing"]["step"] == 2 and got["passing"]["sum"] == 8.0, (i, got)
        assert got["lasting"]["step"] == 1 and got["lasting"]["sum"] == 4.0, (i, got)
        assert "2.corrupt" in got["lasting"]["dirs"], got
        # hosts with their own copies of a data file: the run started, fed from both
        assert got["disagree"] == ("process 1 resolved another config than process 0 ("
                                   "data.train_path.sha256: process 0 'a', process 1 'b'): every "
                                   "process must read the same config and data files")


@pytest.mark.slow
def test_two_processes_share_the_calibration_pass(tmp_path):
    """Each of two processes (2 CPU devices each) draws every other prompt batch, its rows split
    over its own devices when the batch has 2 prompts; both return the table one process draws
    alone (the same keys per batch and chunk), and the pass's progress counts only each
    process's share. The shared table is written once, by process 0, and reused by both."""
    from _multihost_calibration_worker import the_pass
    _worker_on_two_processes(CALIBRATION_WORKER, tmp_path, "calibration", devices=2)
    for bp in (1, 2):
        alone = the_pass(bp, progress=None)
        for i in range(2):
            with np.load(tmp_path / f"table_p{i}_bp{bp}.npz") as got:
                np.testing.assert_array_equal(got["sorted_rewards_BxK"], alone.sorted_rewards_BxK)
                np.testing.assert_array_equal(got["counts_B"], alone.counts_B)
                assert int(got["processes"]) == 2
    assert not list(tmp_path.glob("partial*"))          # each process's side file is removed
    logs = [json.loads((tmp_path / f"log_p{i}.json").read_text()) for i in range(2)]
    # batch_prompts=1: process 0 draws batches 0 and 2 (2 prompts), process 1 batch 1
    assert any("prompts 2/2 (process 0's share)" in line for line in logs[0])
    assert any("prompts 1/1 (process 1's share)" in line for line in logs[1])
    assert all(not line.startswith("calibration") or "share" in line or "done" in line
               or "split over" in line for line in logs[0] + logs[1])
    for log in logs:   # batch_prompts 1, then 2
        splits = [line for line in log if "split over" in line]
        assert [line.split("split over ")[1] for line in splits] == [
            "1 of 2 local devices", "2 of 2 local devices"], splits
    assert sorted(p.name for p in tmp_path.glob("reference_table*")) == ["reference_table.npz"]
    for log in logs:
        assert sum("reusing reference table" in line for line in log) == 1
    assert "table saves: 1" in logs[0] and "table saves: 0" in logs[1]   # process 0 writes


def test_combining_shares_needs_every_process():
    """One process told that two share the pass cannot make up the other's rows."""
    from _multihost_calibration_worker import the_pass
    with pytest.raises(ValueError, match="process_count=2, but 1 processes took part"):
        the_pass(1, progress=None, process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, process_count=2\)"):
        the_pass(1, progress=None, process_index=2, process_count=2)


def _command_on_two_processes(args: list, tmp_path: Path, name: str) -> None:
    """Runs `python args...` as two processes of one job (one CPU device each), started from
    the environment variables a pod launcher sets; logs in tmp_path/<name><i>.log."""
    _wait_all(_start_on_two_processes(args, tmp_path, name), WORKER_TIMEOUT_S)


def _start_on_two_processes(args: list, tmp_path: Path, name: str, **extra_env: str
                            ) -> dict[str, tuple[subprocess.Popen, Path]]:
    """`_command_on_two_processes`' two processes (with `extra_env` in their environment),
    started and not waited for."""
    port = _free_port()
    procs = {}
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
                   INFALIGN_JAX_CACHE="off", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), **extra_env)
        log = tmp_path / f"{name}{i}.log"
        with open(log, "w") as f:
            procs[f"process {i}"] = (subprocess.Popen(
                [sys.executable, *map(str, args)], env=env, cwd=REPO, stdout=f,
                stderr=subprocess.STDOUT), log)
    return procs


FAIL_WORKER = REPO / "tests" / "_multihost_fail_worker.py"


def _finish(procs: dict[str, tuple[subprocess.Popen, Path]], timeout_s: float
            ) -> tuple[list[str], dict[str, str]]:
    """Waits up to `timeout_s` for every process, whatever its exit status; kills those still
    running. Returns their names and every process's log."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p, _ in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    waiting = [n for n, (p, _) in procs.items() if p.poll() is None]
    for name in waiting:
        procs[name][0].kill()
        procs[name][0].wait()
    return waiting, {n: log.read_text() for n, (_, log) in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fail,at,what", [(1, "barrier", "barrier meet"),
                                          (0, "from_primary", "from_primary value")])
def test_a_process_that_fails_stops_its_peer_waiting_for_it(tmp_path, fail, at, what):
    """One process of two fails (through `cli.run`, as every entrypoint) before the point where
    its peer waits for it, a barrier or process 0's `from_primary` work. The peer stops at once
    with `PeerFailed` naming the error, instead of waiting out its 300 s timeout and reporting
    only a missed deadline; both exit, each with its own error."""
    timeout_s = 300
    procs = _start_on_two_processes([FAIL_WORKER, f"--fail={fail}", f"--at={at}",
                                     f"--timeout_s={timeout_s}"], tmp_path, "fail")
    waiting, logs = _finish(procs, timeout_s / 2)
    assert not waiting, f"{waiting} still waiting after {timeout_s / 2:.0f} s:\n{logs}"
    failing, peer = f"process {fail}", f"process {1 - fail}"
    message = f"process {fail} fails before the {at}"
    error = f"ValueError: {message}"
    assert procs[failing][0].returncode == 2, logs[failing][-3000:]
    assert f"error (ValueError): {message}" in logs[failing], logs[failing][-3000:]
    assert procs[peer][0].returncode == 1, logs[peer][-3000:]
    assert f"PeerFailed: {what}: process {fail} failed ({error})" in logs[peer], logs[peer][-3000:]
    assert "passed the meeting point" not in logs[peer]


@pytest.mark.slow
@pytest.mark.parametrize("fail", [1, 0])
def test_a_process_that_fails_during_training_stops_its_peer_blocked_in_a_collective(tmp_path,
                                                                                     fail):
    """`experiments/train_policy.py` on two processes; one raises while building step 2's batch,
    so its peer enters the step and blocks in its cross-process collective, which nothing in
    Python can interrupt (without `distributed.watch_peers` it waited for ever). The peer's watch
    names the failure and stops it with status 3 (`EXIT_PEER_FAILED`); the failing process exits
    with its own one-line error. Process 0 failing also stops the coordination service's host."""
    procs = _start_on_two_processes(
        [REPO / "tests" / "_multihost_train_fail_worker.py",
         "--config=configs/ctrl_exact.py:samples=8,steps=6", "--config.mesh.data=2",
         "--config.train.tensorboard=false", f"--workdir={tmp_path / 'run'}"], tmp_path, "train",
        FAIL_PROCESS=str(fail), FAIL_STEP="2")
    waiting, logs = _finish(procs, WORKER_TIMEOUT_S)
    assert not waiting, logs
    failing, peer = procs[f"process {fail}"][0], procs[f"process {1 - fail}"][0]
    error = f"process {fail} fails at step 2"
    assert failing.returncode == 2, logs
    assert f"error (ValueError): {error}" in logs[f"process {fail}"], logs
    assert peer.returncode == dist.EXIT_PEER_FAILED, logs
    assert (f"process {fail} failed (ValueError: {error}); process {1 - fail} stops"
            in logs[f"process {1 - fail}"]), logs


@pytest.mark.slow
def test_a_barrier_that_times_out_names_the_missing_process(tmp_path):
    """Process 1 comes 60 s late to a barrier process 0 waits at for 3 s: process 0's TimeoutError
    names process 1, and process 1, still on its way, is stopped by its watch of the peers."""
    procs = _start_on_two_processes([FAIL_WORKER, "--fail=1", "--at=barrier", "--late_s=60",
                                     "--timeout_s=3"], tmp_path, "late")
    waiting, by_name = _finish(procs, WORKER_TIMEOUT_S)
    assert not waiting, by_name
    logs = [by_name["process 0"], by_name["process 1"]]
    timeout = "TimeoutError: barrier meet: not done after 3 s: process(es) [1] did not arrive"
    assert procs["process 0"][0].returncode == 1 and timeout in logs[0], logs[0][-3000:]
    assert procs["process 1"][0].returncode == dist.EXIT_PEER_FAILED, logs[1][-3000:]
    assert f"process 0 failed ({timeout}); process 1 stops" in logs[1], logs[1][-3000:]
    assert "passed the meeting point" not in logs[1]


@pytest.mark.slow
def test_a_killed_process_stops_its_peer_after_the_configured_heartbeat_timeout(tmp_path):
    """Process 1 is killed outright (SIGKILL: nothing reported), so process 0 waits at the
    barrier until the coordination service misses process 1's heartbeats. With
    INFALIGN_HEARTBEAT_TIMEOUT_S=5 it is stopped, naming the unhealthy process, well before the
    barrier's 300 s and jax's default 100 s (measured: 101.6 s without the setting, 12.7 s with
    10 s)."""
    started = time.monotonic()
    procs = _start_on_two_processes([FAIL_WORKER, "--fail=1", "--at=barrier", "--kill",
                                     "--timeout_s=300"], tmp_path, "killed",
                                    INFALIGN_HEARTBEAT_TIMEOUT_S="5")
    waiting, logs = _finish(procs, 80)
    took = time.monotonic() - started
    assert not waiting, logs
    assert procs["process 1"][0].returncode == -signal.SIGKILL, logs["process 1"][-3000:]
    assert procs["process 0"][0].returncode != 0, logs["process 0"][-3000:]
    assert "stopped sending heartbeats" in logs["process 0"], logs["process 0"][-3000:]
    assert "passed the meeting point" not in logs["process 0"]
    assert took < 60, took


@pytest.mark.slow
def test_the_training_command_runs_on_two_processes_from_the_environment(tmp_path):
    """`experiments/train_policy.py` started twice with JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID (one CPU device each, mesh data=2) trains as one process
    does on two devices; one manifest, written by process 0, records both processes. A command
    that runs as one process refuses that environment by name."""
    from infalign_jax.infra.config_utils import load_config_module
    from infalign_jax.infra.metrics_io import read_jsonl
    from infalign_jax.loops import train
    spec, steps = "samples=8,steps=3", 3
    _command_on_two_processes(
        ["experiments/train_policy.py", f"--config=configs/ctrl_exact.py:{spec}",
         "--config.mesh.data=2", "--config.train.tensorboard=false",
         f"--workdir={tmp_path / 'run'}"], tmp_path, "cli")
    config = load_config_module(str(REPO / "configs" / "ctrl_exact.py")).get_config(spec)
    config.unlock()
    config.mesh.data, config.train.tensorboard = 2, False
    config.lock()
    train.run(config, str(tmp_path / "one"), log=lambda _: None, devices=jax.devices()[:2])
    two = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    one = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) >= 1
    for a, b in zip(two, one):
        for key in ("loss", "reward", "kl_k1", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), key
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["devices"]["process_count"] == 2 and manifest["devices"]["process_index"] == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_step"] == steps

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS="127.0.0.1:1",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
    out = subprocess.run([sys.executable, "experiments/analytic.py"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "analytic.py runs as one process, but the environment asks for several " \
           "(JAX_COORDINATOR_ADDRESS='127.0.0.1:1', JAX_NUM_PROCESSES=2)" in out.stderr


def _sigterm_to_process_1_once(procs: dict[str, tuple[subprocess.Popen, Path]],
                               ready: Callable[[], bool]) -> dict[str, str]:
    """Sends process 1 a SIGTERM once `ready()` (or a process has ended), waits for both and
    checks that both stopped with status 143; returns their logs."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline and all(p.poll() is None for p, _ in procs.values()) \
            and not ready():
        time.sleep(0.005)
    procs["process 1"][0].send_signal(signal.SIGTERM)
    waiting, logs = _finish(procs, WORKER_TIMEOUT_S)
    assert not waiting, logs
    codes = [p.returncode for p, _ in procs.values()]
    assert codes == [143, 143], (codes, {n: t[-2000:] for n, t in logs.items()})
    return logs


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_at_one_saved_step_and_the_job_resumes(tmp_path):
    """A SIGTERM to one process of two (a preempted host): JAX's preemption service picks one
    step for both, Orbax saved it, and the loop trained on past it to the end or the SIGKILL.
    Both now stop after that step with status 143, and the same command resumes from it."""
    from infalign_jax.infra.metrics_io import read_jsonl
    steps = 40
    args = ["experiments/train_policy.py", f"--config=configs/ctrl_exact.py:samples=8,steps={steps}",
            "--config.mesh.data=2", "--config.train.tensorboard=false",
            "--config.train.checkpoint_every=100", "--config.train.log_every=1",
            "--config.train.eval_every=0", f"--workdir={tmp_path / 'run'}"]
    metrics, ckpts = tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "checkpoints"
    logs = _sigterm_to_process_1_once(
        _start_on_two_processes(args, tmp_path, "term"),
        lambda: metrics.exists() and len(read_jsonl(str(metrics))) >= 2)
    stopped = len(read_jsonl(str(metrics)))
    assert 2 <= stopped < steps
    committed = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    assert committed == [1, stopped]   # 1: Orbax's first save; the stop is no interval step
    for name, text in logs.items():
        assert f"SIGTERM: stopped after step {stopped} of {steps}" in text, (name, text[-2000:])
        assert "Traceback" not in text, (name, text[-3000:])
    assert not (tmp_path / "run" / "summary.json").exists()

    # A SIGTERM to the resumed job before its first step (while it loads or compiles): JAX's
    # service counts steps from 0 there, so its stop step was 1, which a job resumed at step s
    # never calls again, and the job trained to the end. It stops after step s + 1.
    early = tmp_path / "early1.log"
    logs = _sigterm_to_process_1_once(
        _start_on_two_processes(args, tmp_path, "early"),
        lambda: f"resumed from checkpoint step {stopped}" in early.read_text())
    for name, text in logs.items():
        assert f"SIGTERM: stopped after step {stopped + 1} of {steps}" in text, \
            (name, text[-2000:])
    assert len(read_jsonl(str(metrics))) == stopped + 1

    _command_on_two_processes(args, tmp_path, "resume")
    resumed = (tmp_path / "resume0.log").read_text()
    assert f"resumed from checkpoint step {stopped + 1}" in resumed, resumed[-2000:]
    assert [r["step"] for r in read_jsonl(str(metrics))] == list(range(1, steps + 1))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_step"] == steps


CALIBRATION_SIGTERM_WORKER = REPO / "tests" / "_multihost_calibration_sigterm_worker.py"


@pytest.mark.slow
def test_a_sigterm_stops_both_processes_of_a_calibration_pass_at_one_chunk(tmp_path):
    """A SIGTERM to one process of a two-process calibration pass with a partial file: JAX's
    preemption service holds the signal, and the pass ran on to its end or the SIGKILL. Both
    processes now stop after one chunk of one round, the chunks drawn kept in their partial
    files, with status 143; the same command resumes both and returns the table one process
    draws alone (process 0 draws batches 0 and 2, process 1 batch 1, then nothing)."""
    from _multihost_calibration_sigterm_worker import CHUNKS, the_pass
    first = tmp_path / "term0.log"
    logs = _sigterm_to_process_1_once(
        _start_worker_on_two_processes(CALIBRATION_SIGTERM_WORKER, tmp_path, "term", 1),
        lambda: first.read_text().count("calibration: prompts") >= 2)
    stops = [next(line for line in text.splitlines() if line.startswith("SIGTERM"))
             for text in logs.values()]
    where = [line.split(", where")[0] for line in stops]
    assert where[0] == where[1] and where[0].startswith("SIGTERM: calibration stopped after "
                                                        "round 1/2, chunk "), stops
    for i in range(2):
        with np.load(tmp_path / f"partial.process{i}of2.npz") as kept:
            done = kept["done_BxC"]
        assert 2 <= done.sum() < CHUNKS and done[i].sum() == done.sum(), done   # round 1: batch i
        assert f"({int(done.sum())}/{CHUNKS * (2 - i)} of this process's chunks)" in stops[i]
    assert not list(tmp_path.glob("table_p*"))

    _worker_on_two_processes(CALIBRATION_SIGTERM_WORKER, tmp_path, "resume", 1)
    alone = the_pass(progress=None)
    for i in range(2):
        assert "calibration: resuming from" in (tmp_path / f"resume{i}.log").read_text()
        with np.load(tmp_path / f"table_p{i}.npz") as got:
            np.testing.assert_array_equal(got["sorted_rewards_BxK"], alone.sorted_rewards_BxK)
    assert not list(tmp_path.glob("partial*"))


@pytest.mark.slow
def test_head_only_reward_training_runs_with_the_trunk_split_over_two_processes(tmp_path):
    """`trainable=head` with the trunk split over both processes (mesh fsdp=2): the trunk's digest
    and the cached features fetched parameters another process held, and the run crashed at
    its first step. It now gives the loss of one process on two devices."""
    from infalign_jax.infra.metrics_io import read_jsonl
    flags_ = ["--config.train.log_every=1",
              "--config.mesh.fsdp=2", "--config.mesh.data=1",
              "--config.data.synthetic_train_pairs=32", "--config.data.synthetic_eval_pairs=8",
              "--config.train.tensorboard=false"]
    args = ["experiments/train_reward.py",
            "--config=configs/reward_model.py:trainable=head,steps=2", *flags_]
    _command_on_two_processes(args + [f"--workdir={tmp_path / 'run'}"], tmp_path, "head")
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu", INFALIGN_JAX_CACHE="off")
    subprocess.run([sys.executable, *args, f"--workdir={tmp_path / 'one'}"], env=env, cwd=REPO,
                   check=True, capture_output=True, timeout=WORKER_TIMEOUT_S)
    two = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    one = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL, abs=ATOL)
    assert len(os.listdir(tmp_path / "run" / "features")) == 2   # written once, by process 0


@pytest.mark.slow
def test_the_reward_command_runs_an_ensemble_on_two_processes(tmp_path):
    """`experiments/train_reward.py`, a 2-member ensemble over two processes (one member on each
    process's device, mesh data=2), trains as one process does on two devices."""
    from infalign_jax.infra.config_utils import load_config_module
    from infalign_jax.infra.metrics_io import read_jsonl
    from infalign_jax.loops import train_reward
    flags_ = ["--config.train.log_every=1",
              "--config.train.eval_every=3", "--config.mesh.data=2",
              "--config.data.synthetic_train_pairs=64", "--config.data.synthetic_eval_pairs=16",
              "--config.train.tensorboard=false"]
    _command_on_two_processes(
        ["experiments/train_reward.py", "--config=configs/reward_model.py:ensemble=2,steps=3",
         *flags_, f"--workdir={tmp_path / 'run'}"], tmp_path, "rm")
    config = load_config_module(str(REPO / "configs" / "reward_model.py")).get_config(
        "ensemble=2,steps=3")
    config.unlock()
    for flag in flags_:
        key, value = flag[len("--config."):].split("=")
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(
            value == "true" if isinstance(config[section][name], bool) else value)
    config.lock()
    _, summary = train_reward.run(config, str(tmp_path / "one"), log=lambda _: None,
                                  devices=jax.devices()[:2])
    two = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    one = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL, abs=ATOL)
    got = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert got["eval"]["eval_accuracy"] == pytest.approx(summary["eval"]["eval_accuracy"])
    # the run as a trained judge (config.task.reward.kind="trained"), read on each process
    from infalign_jax.infra import provenance
    from infalign_jax.rewards import reward_runs
    loaded = _load_on_two_processes(tmp_path, reward_run=str(tmp_path / "run"))
    alone = reward_runs.load_run(str(tmp_path / "run"))
    assert [got["reward"] for got in loaded] == [
        [provenance.params_digest(alone.params), alone.step]] * 2


@pytest.mark.slow
def test_the_calibrate_command_shares_a_real_task_table_over_two_processes(dirs, tmp_path):
    """`experiments/calibrate.py` on a transformers policy and reward model over two processes:
    each draws every other prompt, and the table process 0 writes equals one process's."""
    from workflow_files import REAL_TASK_SPEC, as_flags, real_task_config, real_task_overrides
    from infalign_jax.core.calibration import load_reference_table
    from infalign_jax.workflows import calibrate
    extra = {"task.calib_batch_prompts": 1}
    _command_on_two_processes(
        ["experiments/calibrate.py", f"--config=configs/ctrl_real.py:{REAL_TASK_SPEC}",
         *as_flags({k: v for k, v in {**real_task_overrides(dirs), **extra}.items()
                    if k.startswith(calibrate.READS)}),   # it refuses the others, unread
         f"--workdir={tmp_path / 'run'}"],
        tmp_path, "calibrate")
    c = real_task_config(dirs, extra=extra)
    one = load_reference_table(calibrate.run(c, str(tmp_path / "one"), progress=lambda _: None))
    two = load_reference_table(str(tmp_path / "run" / "reference_table.npz"))
    assert list(two.prompt_ids) == list(one.prompt_ids)
    np.testing.assert_array_equal(two.sorted_rewards_BxK, one.sorted_rewards_BxK)
    assert two.base_model_id == one.base_model_id and two.created["processes"] == 2
    logs = [(tmp_path / f"calibrate{i}.log").read_text() for i in range(2)]
    assert "prompts 2/2 (process 0's share)" in logs[0] and "(process 1's share)" in logs[1]


@pytest.mark.slow
def test_the_training_command_runs_a_real_task_on_two_processes(dirs, tmp_path):
    """`experiments/train_policy.py` on a transformers policy scored by a transformers reward
    model (the text judge runs on each process's host), two processes, mesh data=2: the same
    steps as one process on two devices."""
    from workflow_files import REAL_TASK_SPEC, as_flags, real_task_config, real_task_overrides
    from infalign_jax.infra.metrics_io import read_jsonl
    from infalign_jax.loops import train
    extra = {"mesh.data": 2, "export.hf": True}
    _command_on_two_processes(
        ["experiments/train_policy.py", f"--config=configs/ctrl_real.py:{REAL_TASK_SPEC}",
         *as_flags({**real_task_overrides(dirs), **extra}), f"--workdir={tmp_path / 'run'}"],
        tmp_path, "real")
    c = real_task_config(dirs, extra=extra)
    train.run(c, str(tmp_path / "one"), log=lambda _: None, devices=jax.devices()[:2])
    two = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    one = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one):
        for key in ("reward", "calibrated_reward", "kl_k1", "loss"):
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), key
    # config.export.hf: written once, by process 0, from the checkpoint both processes saved
    from safetensors.numpy import load_file
    exported = [load_file(str(tmp_path / run / "export" / "hf" / "model.safetensors"))
                for run in ("run", "one")]
    assert sorted(exported[0]) == sorted(exported[1]) and len(exported[0]) > 1
    for name, value in exported[0].items():
        np.testing.assert_allclose(value, exported[1][name], rtol=RTOL, atol=ATOL, err_msg=name)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["export"]["dir"] == str(tmp_path / "run" / "export" / "hf")
    logs = [(tmp_path / f"real{i}.log").read_text() for i in range(2)]
    assert all("as a transformers checkpoint to" in log for log in logs)
    # the run as config.task.policy.checkpoint, read on each process's own device
    from infalign_jax.infra import provenance
    from infalign_jax.rl.tasks import sources
    loaded = _load_on_two_processes(tmp_path, policy_run=str(tmp_path / "run"))
    alone = sources.load_policy(sources.PolicyConfig(str(tmp_path / "run")))
    assert [got["policy"] for got in loaded] == [
        [provenance.params_digest(alone.params), f"{tmp_path / 'run'}@2"]] * 2


def _load_on_two_processes(tmp_path: Path, **request: str) -> list[dict]:
    """What `_multihost_load_worker.py` loaded on each of two processes (one device each)."""
    (tmp_path / "load_request.json").write_text(json.dumps(request))
    _worker_on_two_processes(LOAD_WORKER, tmp_path, "load", devices=1)
    got = [json.loads((tmp_path / f"loaded_p{i}.json").read_text()) for i in range(2)]
    # distributed.from_primary: process 0's value on both; its failure raised on both at once
    assert [g["shared"] for g in got] == [{"by": True}] * 2
    assert got[0]["failed"] == "OSError: disk full\nsecond line"
    assert got[1]["failed"] == "RuntimeError: failing: process 0 failed (OSError: disk full)"
    return got


def test_from_every_process_returns_each_value_in_process_order(two_process_client, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    kv = two_process_client.kv
    kv["infalign_every/agree_0/0"] = json.dumps({"seed": 0})          # process 0 came first
    kv["infalign_barrier/every_agree_0/arrived/0"] = "1"
    two_process_client.counters["infalign_barrier/every_agree_0/count"] = 1
    assert dist.from_every_process("agree_0", {"seed": 7}) == [{"seed": 0}, {"seed": 7}]


def test_from_primary_gives_process_0s_result_or_its_error(two_process_client, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    ran = []
    two_process_client.kv["infalign_from_primary/table_0"] = json.dumps({"value": [1, 2]})
    assert dist.from_primary("table_0", lambda: ran.append(1)) == [1, 2] and ran == []
    two_process_client.kv["infalign_from_primary/table_1"] = json.dumps(
        {"error": "OSError: disk full"})
    with pytest.raises(RuntimeError, match=r"table_1: process 0 failed \(OSError: disk full\)"):
        dist.from_primary("table_1", lambda: ran.append(1))
    assert ran == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert dist.from_primary("table_2", lambda: {"rows": 3}) == {"rows": 3}
    assert json.loads(two_process_client.kv["infalign_from_primary/table_2"]) == \
        {"value": {"rows": 3}}
    with pytest.raises(OSError, match="disk full"):
        dist.from_primary("table_3", lambda: (_ for _ in ()).throw(OSError("disk full")))
    assert json.loads(two_process_client.kv["infalign_from_primary/table_3"]) == \
        {"error": "OSError: disk full"}


def test_a_barrier_passes_only_once_every_process_arrived(two_process_client, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    two_process_client.kv["infalign_barrier/b/arrived/0"] = "1"
    two_process_client.counters["infalign_barrier/b/count"] = 1
    with pytest.raises(TimeoutError, match=r"barrier b: not done after .*process\(es\) \[2\] "
                                           r"did not arrive"):
        dist.barrier("b", timeout_s=0.05)
    assert "infalign_barrier/b/done" not in two_process_client.kv


def test_watch_peers_stands_down_when_this_process_exits_during_the_grace(two_process_client,
                                                                          monkeypatch):
    """A peer's failure seen just before this process's own exit (its report, or the interpreter
    ending): after the grace it is on its way out and must not be stopped with
    EXIT_PEER_FAILED (which would replace its own status)."""
    exits, grace_s = [], 0.25
    _as_process(monkeypatch, 0)
    dist.report_failure(ValueError("out of memory"))
    _as_process(monkeypatch, 1)
    exiting = dist.threading.Event()
    monkeypatch.setattr(dist, "_EXITING", exiting)
    real_sleep = time.sleep

    def sleep(seconds):
        if seconds == grace_s:   # the failure was seen: this process's own exit begins now
            exiting.set()
        real_sleep(0.001)

    monkeypatch.setattr(dist.time, "sleep", sleep)
    thread = dist.watch_peers(poll_s=0.01, grace_s=grace_s, exit_fn=exits.append)
    thread.join(10)
    assert not thread.is_alive() and exiting.is_set()
    assert exits == [] and not two_process_client.shut_down
