"""One process of a two-process check of the trainers' batch path; driven by
`tests/test_multihost.py::test_every_mesh_layout_gets_the_global_batch_across_processes`.

Usage::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_multihost_batch_worker.py \
        --process_id I --port P --out DIR

For meshes whose batch axes span both processes, one of them, or neither (pure tensor
parallelism across hosts), it builds step 0's prompt batch with `train.step_batch` (what the
policy trainer feeds its step), reduces it in a jitted sum and gathers it to the host; process 0
writes what each layout gave to DIR/batch.json.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _multihost_pair  # noqa: E402  (tests/, the script's own directory)
from infalign_jax.infra import distributed as dist  # noqa: E402

LAYOUTS = {"data=4,fsdp=2": dict(data=4, fsdp=2), "data=2,tensor=4": dict(data=2, tensor=4),
           "tensor=8": dict(tensor=8)}


def main() -> None:
    args = _multihost_pair.start()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from infalign_jax.data import pipeline
    from infalign_jax.infra import sharding
    from infalign_jax.loops import train

    prompts = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    mask = np.ones_like(prompts, bool)
    loader = pipeline.LoaderConfig(batch_size=8, seed=3, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    out = {"rows": pipeline.global_batch_indices(loader, 16, 0).tolist()}
    for name, axes in LAYOUTS.items():
        mesh = sharding.make_mesh(sharding.MeshConfig(**axes))
        batch = train.step_batch(prompts, mask, loader, mesh, 0)
        total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(batch["prompt_BxP"])
        host = dist.gather_to_host(batch)
        out[name] = {"shape": list(batch["prompt_BxP"].shape), "sum": float(total),
                     "prompt_idx": host["prompt_idx_B"].tolist(),
                     "first_tokens": host["prompt_BxP"][:, 0].tolist()}
    # leaves each process holds whole: returned as they are (they were joined across processes)
    whole = dist.gather_to_host({"one_device": jnp.arange(3.0), "numpy": np.arange(4),
                                 "scalar": 2.5})
    out["whole_leaves"] = {k: np.asarray(v).tolist() for k, v in whole.items()}
    if jax.process_index() == 0:
        with open(os.path.join(args.out, "batch.json"), "w") as f:
            json.dump(out, f)
    dist.barrier("done")


if __name__ == "__main__":
    main()
