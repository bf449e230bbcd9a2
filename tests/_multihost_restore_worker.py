"""One process of a two-process job that restores a checkpoint one host cannot fully read;
driven by `tests/test_multihost.py`.

Usage::

    python tests/_multihost_restore_worker.py --process_id I --port P --out DIR

Both processes save steps 1 and 2 of a replicated state, then restore the newest step twice:
first with process 1 failing its first read of step 2 (a passing error: both retry and restore
step 2), then with process 1 failing every read of step 2 (both restore step 1). Each writes
what it restored, and a collective over the restored state, to DIR/restored_p<I>.json, with
what `skeleton.check_processes_agree` said of config records that differ between them.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import _multihost_pair  # noqa: E402


def main() -> None:
    args = _multihost_pair.start()
    from absl import flags
    import orbax.checkpoint  # noqa: F401  (defines the flag; set as infra.cli does)
    flags.FLAGS(["worker", "--experimental_orbax_use_distributed_barrier=true"], known_only=True)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from infalign_jax.infra import checkpointing as ck

    ck.RETRY_PAUSE_S = 0.1
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices())
    rep = NamedSharding(mesh, PartitionSpec())

    def state(value):
        return {"w": jax.make_array_from_callback(
            (4,), rep, lambda i: np.full((4,), value, np.float32)[i])}

    root = os.path.join(args.out, "ckpt")
    with ck.Checkpointer(root, async_save=False, max_to_keep=5) as c:
        for step in (1, 2):
            c.save(step, state(float(step)), {"step": step}, force=True)
        c.wait()
    original, reads = ck.Checkpointer.restore, {"n": 0}

    def failing(bad_reads):
        def restore(self, step, abstract, *rest, **kw):
            if jax.process_index() == 1 and step == 2:
                reads["n"] += 1
                if reads["n"] <= bad_reads:
                    raise OSError("stale file handle (this host only)")
            return original(self, step, abstract, *rest, **kw)
        return restore

    out = {}
    for name, bad_reads in (("passing", 1), ("lasting", 99)):
        reads["n"] = 0
        ck.Checkpointer.restore = failing(bad_reads)
        with ck.Checkpointer(root, async_save=False, max_to_keep=5) as c:
            got = c.restore_latest(ck.abstract_state(state(0.0)))
        total = jax.jit(lambda x: x["w"].sum(), out_shardings=rep)(got.state)
        out[name] = {"step": got.step, "sum": float(total), "dirs": sorted(os.listdir(root))}
    # the processes' config records: the same, then a data file each host holds its own copy of
    from infalign_jax.loops import skeleton
    skeleton.check_processes_agree({"data.train_path": "t.jsonl", "data.train_path.sha256": "a"})
    try:
        skeleton.check_processes_agree({"data.train_path": "t.jsonl",
                                        "data.train_path.sha256": "ab"[args.process_id]})
    except ValueError as e:
        out["disagree"] = str(e)
    with open(os.path.join(args.out, f"restored_p{args.process_id}.json"), "w",
              encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
