"""The latency of `distributed.barrier` (coordination-service key-value store, failures checked
between blocking reads) against jax's own `wait_at_barrier` (one RPC, no failure check), on N
local CPU processes of one job, alternating the two in each round.

    .venv/bin/python bench/barrier.py [--processes 8 --rounds 40]

Process 0 prints the median and 90th percentile of each, in ms, and the hardware.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    from infalign_jax.infra import distributed as dist

    dist.initialize(dist.DistributedConfig(coordinator_address=f"127.0.0.1:{args.port}",
                                           num_processes=args.processes,
                                           process_id=args.process_id,
                                           initialization_timeout=120))
    client = dist._client()
    ours, theirs = [], []
    dist.barrier("warm-up", timeout_s=120)
    for i in range(args.rounds):
        t = time.perf_counter()
        dist.barrier(f"ours_{i}", timeout_s=120)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.wait_at_barrier(f"theirs_{i}", timeout_in_ms=120_000)
        theirs.append(time.perf_counter() - t)
    if args.process_id == 0:
        from run_benchmarks import hardware
        print(f"hardware: {hardware()}; {args.processes} processes, {args.rounds} rounds")
        for name, times in (("distributed.barrier", ours), ("jax wait_at_barrier", theirs)):
            ms = np.asarray(times) * 1e3
            print(f"{name:22s} median {np.median(ms):7.2f} ms   p90 {np.percentile(ms, 90):7.2f} "
                  f"ms")
        print(f"ratio of medians (ours / jax): {np.median(ours) / np.median(theirs):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--process_id", type=int, default=None)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    if args.process_id is not None:
        return worker(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, __file__, "--processes", str(args.processes),
                               "--rounds", str(args.rounds), "--process_id", str(i),
                               "--port", str(port)], env=env, cwd=ROOT)
             for i in range(args.processes)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"worker exit codes {codes}")


if __name__ == "__main__":
    main()
