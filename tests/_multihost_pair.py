"""What the two-process worker scripts share: their arguments and the start of `jax.distributed`
as one of two local processes (`tests/_multihost_batch_worker.py`,
`tests/_multihost_calibration_worker.py`)."""

from __future__ import annotations

import argparse

from infalign_jax.infra import distributed as dist


def arguments() -> argparse.Namespace:
    """--process_id, --port and --out, parsed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def start(args: argparse.Namespace | None = None) -> argparse.Namespace:
    """Joins the two-process job at 127.0.0.1:port (returning once both processes have joined),
    with `args` (`arguments()`, parsed here when None); returns them."""
    args = args or arguments()
    dist.initialize(dist.DistributedConfig(coordinator_address=f"127.0.0.1:{args.port}",
                                           num_processes=2, process_id=args.process_id,
                                           initialization_timeout=60))
    return args
