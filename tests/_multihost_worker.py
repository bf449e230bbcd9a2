"""One process of a multi-process CTRL run on the exact task; driven by `tests/test_multihost.py`.

Usage::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_multihost_worker.py \
        --process_id I --num_processes 2 --port P --out DIR [--steps 3]

Every process builds the same task, reference table and initial parameters (seeded), the global
(data=4, fsdp=2) mesh over all processes' devices, and feeds only its own rows of the prompt batch
to `sharding.shard_batch`. It runs `--steps` jitted RL steps, saves a checkpoint with
`Checkpointer` (all processes call save), restores it into a freshly initialised state of another
seed, runs one more step, and process 0 writes `DIR/result.npz` with the state saved, the fresh
state, the state restored, the final state and every step's metrics (all gathered to full numpy
arrays). The RL key of step s is `fold_in(key(SEED), s)`, so the restored state alone determines
what follows. With `--num_processes 1` the same program runs on one process (the reference run;
the test calls `main` in its own process for that, with conftest's 8 devices).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from infalign_jax.infra import distributed as dist# noqa: E402  (imports jax; backends start lazily)

SEED = 11
NUM_PROMPTS = 8       # the global batch: one row per prompt, split 8 ways over (data, fsdp)
TABLE_K = 64


def _flat(prefix: str, tree) -> dict:
    import jax
    return {prefix + jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    cfg = dist.DistributedConfig(
        coordinator_address=f"127.0.0.1:{args.port}" if args.num_processes > 1 else None,
        num_processes=args.num_processes, process_id=args.process_id, initialization_timeout=60)
    dist.initialize(cfg)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from infalign_jax.rl.tasks import exact as et
    from infalign_jax import models, rl
    from infalign_jax.infra import sharding as sh
    from infalign_jax.infra.checkpointing import Checkpointer, abstract_state

    if args.num_processes > 1:
        from absl import flags
        # Orbax's barriers default to device collectives (`sync_global_devices`); the
        # coordination-service barrier needs no gloo communicator and has a timeout.
        flags.FLAGS(["worker", "--experimental_orbax_use_distributed_barrier=true"],
                    known_only=True)

    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.device_count() == 8, (jax.device_count(), jax.local_device_count())
    mesh = sh.make_mesh(sh.MeshConfig(data=4, fsdp=2))
    t_init = time.perf_counter()

    # Host-side data, identical on every process (seeded numpy and single-device jax).
    task = et.make_task(0, vocab=4, length=3, num_prompts=NUM_PROMPTS, d_model=32)
    table_XxK = et.sample_reference_table(task, TABLE_K, seed=1)
    rl_cfg = rl.RLConfig(algorithm="rloo", beta=0.2, transform="exp",
                         transform_params={"t": 2.0}, samples_per_prompt=4, max_new_tokens=3,
                         learning_rate=1e-2)
    opt = rl.make_optimizer(rl_cfg)
    rl_step = rl.make_rl_step(rl_cfg, models.decoder_fns(task.model_cfg),
                              functools.partial(et.table_reward_fn, vocab=task.vocab), opt)

    # Parameters and optimiser state created sharded; frozen tables replicated.
    specs = models.param_logical_axes(task.model_cfg)
    ref_params = sh.sharded_init(lambda k: models.init_params(task.model_cfg, k),
                                 jax.random.key(0), mesh, specs)

    def policy_init(key):
        # Start away from pi_ref so that the KL terms are not trivially zero.
        return jax.tree.map(lambda x: x * 1.1, models.init_params(task.model_cfg, key))

    def fresh_state(seed: int) -> rl.RLState:
        # One init function object for every call, so its jit is compiled once.
        params = sh.sharded_init(policy_init, jax.random.key(seed), mesh, specs)
        step = dist.global_from_host(np.zeros((), np.int32), sh.replicated(mesh))
        return rl.RLState(params, sh.sharded_optimizer_init(opt, params, mesh), step)

    rep = sh.replicated(mesh)
    frozen = rl.Frozen(ref_params, *dist.global_from_host(
        (task.rewards_XxY, table_XxK, np.full((NUM_PROMPTS,), TABLE_K, np.int32)), rep))

    # Each process feeds only its rows; they must be the ones the mesh assigns to it.
    global_batch = {"prompt_BxP": task.prompts_XxP,
                    "prompt_mask_BxP": np.ones(task.prompts_XxP.shape, bool),
                    "prompt_idx_B": np.arange(NUM_PROMPTS, dtype=np.int32)}
    rows = dist.process_shard(NUM_PROMPTS)
    local_batch = {k: v[rows] for k, v in global_batch.items()}
    for k, v in dist.host_local_batch(global_batch, mesh).items():
        np.testing.assert_array_equal(v, local_batch[k], err_msg=k)
    batch = sh.shard_batch(local_batch, mesh)

    def train_step(state, frozen, batch):
        return rl_step(state, frozen, batch, jax.random.fold_in(jax.random.key(SEED), state.step))

    state = fresh_state(0)
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    # Compiled ahead of time, then a barrier: a process still compiling when its peer runs the
    # first collective would fail gloo's fixed ~30 s rendezvous (see `distributed.barrier`).
    jstep = jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, rep)
                    ).lower(state, frozen, batch).compile()
    dist.barrier("compiled_rl_step")
    t_setup = time.perf_counter()

    metrics = []
    for _ in range(args.steps):
        state, m = jstep(state, frozen, batch)
        metrics.append(m)
        jax.block_until_ready(m)  # one collective program in flight at a time (see below)
    t_steps = time.perf_counter()

    # `Checkpointer.save`'s own finiteness check dispatches one small reduction per leaf without
    # waiting; on CPU with gloo, many such collective programs in flight at once deadlock (both
    # processes stuck in dispatch; reproduced with 40 leaves). One jitted program does not.
    leaves = jax.tree.leaves(state)
    finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])(leaves)
    assert all(bool(f) for f in jax.device_get(finite)), "non-finite state after the RL steps"
    ckpt = Checkpointer(os.path.join(args.out, "ckpt"), max_to_keep=1)
    ckpt.save(args.steps, state, {"steps": args.steps, "processes": args.num_processes},
              check_finite=False)
    ckpt.wait()
    saved = dist.gather_to_host(state)
    # A differently seeded state: restore must overwrite every leaf.
    fresh = fresh_state(5)
    fresh_host = dist.gather_to_host(fresh)
    restored = ckpt.restore(args.steps, abstract_state(fresh))
    ckpt.close()
    assert restored.meta == {"steps": args.steps, "processes": args.num_processes}, restored.meta
    state = restored.state
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(fresh)):
        assert a.sharding == b.sharding, (a.sharding, b.sharding)
    restored_host = dist.gather_to_host(state)
    state, m = jstep(state, frozen, batch)
    metrics.append(m)
    jax.block_until_ready(m)
    final = dist.gather_to_host(state)
    metrics_host = dist.gather_to_host(metrics)
    t_end = time.perf_counter()

    if dist.is_primary():
        out = {**_flat("saved", saved), **_flat("fresh", fresh_host),
               **_flat("restored", restored_host), **_flat("final", final)}
        for name in metrics_host[0]:
            out[f"metrics/{name}"] = np.array([float(m[name]) for m in metrics_host])
        out["timings/init_s"] = np.float64(t_init - t0)
        out["timings/setup_s"] = np.float64(t_setup - t_init)
        out["timings/steps_s"] = np.float64(t_steps - t_setup)
        out["timings/ckpt_restore_step_s"] = np.float64(t_end - t_steps)
        np.savez(os.path.join(args.out, "result.npz"), **out)
    print(f"process {jax.process_index()}/{jax.process_count()} DONE in"
          f" {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    # the tests' cache (conftest's INFALIGN_JAX_CACHE); none when run by hand without it
    from infalign_jax.infra.cli import CACHE_ENV, enable_compilation_cache
    enable_compilation_cache(os.environ.get(CACHE_ENV) or "off", min_compile_s=0.5)
    try:
        main()
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip atexit: jax.distributed's shutdown would wait minutes for the peer processes.
        os._exit(1)
