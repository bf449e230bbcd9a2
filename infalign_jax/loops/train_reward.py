"""Reward-model run loop: preference file -> packed pairs -> Bradley-Terry steps -> eval, checkpointed.

    run(config, workdir) -> (state, summary)

`config` is `configs/reward_model.py`'s ConfigDict (sections data, model, rm, train, mesh). The step
is `reward_training.make_rm_step` (or its vmapped ensemble, whose members lie side by side over
the mesh's "data" x "fsdp" devices: `sharding.ensemble_shardings`), jitted with the state donated; batches
are `data.pipeline.global_batch_indices(loader_cfg, n, step)`, a pure function of (seed, step),
each process feeding the rows the mesh puts on its devices, so resume
from the work dir is exact (the same design as `train.py`). A bad record in the data files fails
with file and line before any training (or is counted with `data.skip_bad=True`, and the counts
are written to the summary).

Models (`rm_model.build_model`; pairs, their packing and the feature cache: `rm_data`):
`model.source = "tiny"` builds a fresh decoder of the given size with the byte tokenizer
(everything offline). A transformers directory (a causal LM or a one-label sequence
classifier) or a GGUF file is a pretrained trunk: its parameters are loaded, an lm head dropped
and a reward head added (zeros, as `models.init_params` starts it; a sequence classifier keeps its
score head), and its own tokenizer encodes the pairs (`data.tokenize_preferences`, no special
tokens; the response ends with the chat end-of-turn token, else EOS: `data.tokenize.special_ids`).
The trunk fixes the ModelConfig, so `config.model` holds only `source`,
`rm_model.TRUNK_KEYS` (`reward_pool="mean"` reads the head at the mean hidden state over the real
tokens instead of the last one) and `trunk_layers` (keep the trunk's first n layers: a cheaper
reward model).
`train.trainable` ("all" | "head" | "last:<n>": the reward head, the final norm and the last n
layers) freezes the rest: an optax mask on the updates, and a stopped gradient in the step so a
wholly frozen part costs no backward pass. Ensemble members over one trunk start from the trunk's
head plus N(0, init_std^2) noise each, so they differ before the first step.

`trainable="head"` (one model): the frozen trunk and final norm make the reward the head applied
to one fixed feature per sequence, the final hidden state where the head reads it
(`reward_models.pair_features`). These are computed once, one trunk forward pass over every
(prompt, chosen) and (prompt, rejected) of both splits, and cached in workdir/features/, keyed
by the trunk's parameters, the model config and the packed token arrays (so the data and
packing settings): a resume or rerun reads them, another trunk or data computes its own. The
steps then run the same BT loss and optimiser on the head alone (`make_rm_step` with
`head_pair_rewards`), exactly the slow path's updates, and the checkpoints hold the whole model
(trunk and trained head) with the head's optimiser state.

Outputs: the manifest (`extra.reward_model`: the model config, the absolute source, special ids
and length limits, what `rewards.reward_runs.load_run` needs), `reward_model.json` with the id
(`reward_model_id`) that reference tables built with this model carry, and summary.json (held-out
accuracy, data counts with truncation per part).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax.data import LoaderConfig, dropped_per_epoch, global_batch_indices
from infalign_jax.infra import checkpointing, distributed, provenance, sharding
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import dataclass_from, section
from infalign_jax.infra.files import no_empty_dirs_left, write_json
from infalign_jax.loops.rm_data import (RMDataConfig, cached_features, ensure_synthetic_data,
                                        load_pairs, pairs_in_both, trunk_digest)
from infalign_jax.loops.rm_model import (build_model, freeze_optimizer, parse_trainable,
                                         trainable_mask, trunk_ensemble)
from infalign_jax.loops.skeleton import LoopContext, run_loop
from infalign_jax.rewards import reward_models as rt


@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
    _config_owner = "config.train"
    num_steps: int = 200
    batch_size: int = 32
    log_every: int = 20
    eval_every: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    ensemble_size: int = 1
    bootstrap: bool = False        # each member on its own bootstrap resample of the pairs
    async_checkpoint: str = "auto"   # "true" | "false" | "auto": checkpointing.ASYNC_CHECKPOINT
    tensorboard: bool = True
    init_from: str = ""            # a run / checkpoint dir whose parameters a fresh run starts from
    trainable: str = "all"         # "all" | "head" | "last:<n>" (see the module docstring)

    def __post_init__(self):
        parse_trainable(self.trainable)
        check.ints(self, ("num_steps", "batch_size", "log_every", "checkpoint_every",
                          "keep_checkpoints", "ensemble_size"))
        check.ints(self, ("eval_every",), low=0)
        checkpointing.check_async_checkpoint(self)
        if not isinstance(self.init_from, str):
            check.fail(self, "init_from", "a directory path or ''")


def _eval(eval_fn, params, arrays: dict[str, np.ndarray], batch: int, ensemble: bool
          ) -> dict[str, float]:
    """Accuracy / loss / ECE over the whole eval set (batched; ECE from all rewards at once)."""
    n = len(next(iter(arrays.values())))
    outs = []
    for start in range(0, n, batch):
        rows = {k: jnp.asarray(v[start:start + batch]) for k, v in arrays.items()}
        outs.append(distributed.gather_to_host(eval_fn(params, rows)))
    rc = np.concatenate([o[0] for o in outs], axis=-1)
    rr = np.concatenate([o[1] for o in outs], axis=-1)
    if ensemble:  # the ensemble's prediction is its mean reward
        rc, rr = rc.mean(0), rr.mean(0)
    rc, rr = jnp.asarray(rc), jnp.asarray(rr)
    return {"eval_accuracy": float(rt.pairwise_accuracy(rc, rr)),
            "eval_ece": float(rt.expected_calibration_error(rc, rr)),
            "eval_reward_gap": float(jnp.mean(rc - rr)), "eval_pairs": n}


def run(config: Any, workdir: str, *, log: Callable[[str], None] | None = None,
        devices: Any = None, cache_head_features: bool = True
        ) -> tuple[rt.TrainState, dict[str, Any]]:
    """Trains (or resumes) the reward model (or bootstrap ensemble) of `config` in `workdir`;
    returns the final state and the summary (held-out accuracy, ECE, the model id to cite).
    `cache_head_features=False` runs `trainable="head"` through the trunk at every step (the
    reference the cached-feature path is tested against).

    One function (`_run`) for the same reason as `train.run`: the order of checks, data, state,
    loop (`loops.skeleton`) and outputs is the contract. A run that fails leaves no empty work
    dir behind.
    """
    with no_empty_dirs_left(workdir):
        return _run(config, workdir, log, devices, cache_head_features)


def _run(config: Any, workdir: str, log: Callable[[str], None] | None, devices: Any,
         cache_head_features: bool) -> tuple[rt.TrainState, dict[str, Any]]:
    started, code = provenance.now(), provenance.code_state()
    log = log or (lambda s: print(s, flush=True))
    seed = int(check.int_arg("config.seed", config.get("seed"), low=0))
    tcfg = dataclass_from(RMTrainConfig, section(config, "train"), "train")
    rcfg = dataclass_from(rt.RMConfig, section(config, "rm"), "rm")
    data = dataclass_from(RMDataConfig, section(config, "data"), "data")
    model = build_model(section(config, "model"))
    model_cfg = model.cfg
    if data.max_prompt_len + data.max_response_len > model_cfg.max_len:
        raise ValueError(f"config.data.max_prompt_len + config.data.max_response_len = "
                         f"{data.max_prompt_len + data.max_response_len} exceed the model's "
                         f"max_len={model_cfg.max_len}")
    trainable = trainable_mask(tcfg.trainable, model_cfg)
    source = section(config, "model")["source"]
    source_path = source if source == "tiny" else os.path.abspath(source)
    tok_name, eos_id, pad_id = model.tokenizer_name, model.eos_id, model.pad_id
    checkpointing.check_writable(workdir)
    data = ensure_synthetic_data(data, workdir, seed, log)
    train_arrays, train_info = load_pairs(data, "train", model, log)
    eval_arrays, eval_info = load_pairs(data, "eval", model, log)
    eval_info["also_in_train"] = pairs_in_both(train_arrays, eval_arrays)
    if eval_info["also_in_train"]:
        log(f"eval: {eval_info['also_in_train']} of {eval_info['pairs']} pairs are also training "
            f"pairs (same prompt and responses): the held-out accuracy counts them")
    n = train_info["pairs"]
    loader_cfg = LoaderConfig(batch_size=tcfg.batch_size, seed=seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
    train_info["dropped_per_epoch"] = dropped_per_epoch(loader_cfg, n)
    if train_info["dropped_per_epoch"]:   # shuffled, each epoch leaves out other pairs
        log(f"{train_info['dropped_per_epoch']} of {n} pairs fit no batch each epoch "
            f"(config.train.batch_size={tcfg.batch_size})")
    mesh = sharding.make_mesh(sharding.mesh_config_from_dict(section(config, "mesh")), devices)
    ensemble = tcfg.ensemble_size > 1
    head_only = tcfg.trainable == "head" and cache_head_features and not ensemble
    if tcfg.trainable == "head" and ensemble:
        log("train.trainable='head' with an ensemble: every step runs the trunk (features are "
            "cached for a single model only)")
    optimizer = freeze_optimizer(rt.make_optimizer(rcfg), trainable)
    key = jax.random.key(seed)
    if ensemble:  # members vmapped, side by side over the mesh's batch devices
        def init_state(key: Any, trunk: Any) -> rt.TrainState:
            params = (rt.init_ensemble(model_cfg, key, tcfg.ensemble_size) if trunk is None
                      else trunk_ensemble(model_cfg, trunk, key, tcfg.ensemble_size))
            return rt.init_ensemble_state(params, optimizer)
        # built in place: no device holds more members than its share
        layout = sharding.ensemble_shardings(jax.eval_shape(init_state, key, model.params), mesh)
        state = jax.jit(init_state, out_shardings=layout)(key, model.params)
        params = None
        step_fn = jax.jit(rt.make_ensemble_rm_step(model_cfg, rcfg, optimizer, trainable),
                          donate_argnums=0)
        pair_fn = jax.jit(jax.vmap(lambda p, b: rt.pair_rewards(model_cfg, p, b), (0, None)))
    else:
        if model.params is None:
            params = rt.init_rm_params(model_cfg, key, mesh)
        else:
            params = jax.device_put(model.params, sharding.logical_to_shardings(
                models.param_logical_axes(model_cfg), model.params, mesh))
        if head_only:  # the head alone trains, on cached features; the state keeps the trunk
            optimizer = rt.make_optimizer(rcfg)
            head_state = rt.init_rm_state({k: params[k] for k in rt.HEAD_KEYS}, optimizer, mesh)
            state = rt.TrainState(params, head_state.opt_state, head_state.step)
            step_fn = rt.jit_rm_step(rt.make_rm_step(model_cfg, rcfg, optimizer,
                                                     rewards=rt.head_pair_rewards),
                                     head_state, mesh)
            pair_fn = jax.jit(rt.head_pair_rewards)
            features_of = jax.jit(lambda p, b: rt.pair_features(model_cfg, p, b))

            def feature_fn(p: Any, rows: dict[str, np.ndarray]) -> Any:
                # rows held alike by every process, as one global array beside a trunk that
                # may span them; the features come back whole on each (a collective)
                return distributed.gather_to_host(features_of(p, distributed.global_from_host(
                    rows, sharding.replicated(mesh))))
        else:
            state = rt.init_rm_state(params, optimizer, mesh)
            step_fn = rt.jit_rm_step(rt.make_rm_step(model_cfg, rcfg, optimizer, trainable),
                                     state, mesh)
            pair_fn = jax.jit(lambda p, b: rt.pair_rewards(model_cfg, p, b))
    del params, model  # the state holds the parameters now (the trunk is not kept twice)
    # What `reward_runs.load_run` needs to score text with this run's checkpoints.
    run_info = {"model_config": dataclasses.asdict(model_cfg), "source": source_path,
                "tokenizer": tok_name, "eos_id": eos_id, "pad_id": pad_id,
                "max_prompt_len": data.max_prompt_len,
                "max_response_len": data.max_response_len,
                "ensemble_size": tcfg.ensemble_size}
    manifest = dict(config=config, seeds={"seed": seed}, mesh=mesh, started=started, code=code,
                    inputs={"train": train_info["path"], "eval": eval_info["path"]},
                    extra={"reward_model": run_info})

    boot_key = jax.random.key(seed + 1)
    # Each member's bootstrap resample of the training pairs, fixed for the run.
    counts_ExN = (np.asarray(rt.bootstrap_counts(jax.random.key(seed + 2), tcfg.ensemble_size, n))
                  if ensemble and tcfg.bootstrap else None)
    features: dict[str, dict[str, np.ndarray]] = {}
    feature_files: dict[str, str] = {}

    def head_features(params: Any) -> dict[str, dict[str, np.ndarray]]:
        """The splits' features under this trunk (the state's: a resumed or init_from trunk)."""
        if not features:
            digest = trunk_digest(params, model_cfg)
            for split, arrays in (("train", train_arrays), ("eval", eval_arrays)):
                features[split], feature_files[split] = cached_features(
                    workdir, split, digest, arrays, lambda b: feature_fn(params, b),
                    tcfg.batch_size, log)
        return features

    def head_of(state: rt.TrainState) -> dict[str, Any]:
        return {k: state.params[k] for k in rt.HEAD_KEYS}

    def one_step(state: rt.TrainState, step: int, context: LoopContext):
        rows = global_batch_indices(loader_cfg, n, step)
        if head_only:
            batch = {k: v[rows] for k, v in head_features(state.params)["train"].items()}
        else:
            batch = {k: v[rows] for k, v in train_arrays.items()}
        if ensemble and tcfg.bootstrap:
            batch["member_idx_ExB"] = np.asarray(rt.bootstrap_indices(
                jax.random.fold_in(boot_key, step), counts_ExN[:, rows]))
        if ensemble:  # every member sees the whole batch (or its own rows of it)
            batch = distributed.global_from_host(batch, sharding.replicated(mesh))
        else:   # each process feeds the rows the mesh puts on its devices
            batch = sharding.shard_batch(distributed.host_local_batch(batch, mesh), mesh,
                                         global_rows=len(rows))
        t0 = time.perf_counter()
        if head_only:
            head_state, metrics = step_fn(rt.TrainState(head_of(state), state.opt_state,
                                                        state.step), batch)
            state = rt.TrainState(dict(state.params, **head_state.params), head_state.opt_state,
                                  head_state.step)
        else:
            state, metrics = step_fn(state, batch)
        metrics = distributed.gather_to_host(metrics) if ensemble else jax.device_get(metrics)
        metrics = {k: float(np.mean(v)) for k, v in metrics.items()}
        if not all(np.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"step {step + 1}: non-finite metrics {metrics}; the last "
                                     f"checkpoint (step {context.latest_checkpoint()}) is intact")
        metrics["step_time_s"] = time.perf_counter() - t0
        return state, metrics

    def evaluate(state: rt.TrainState, step: int) -> dict[str, float]:
        if head_only:
            return _eval(pair_fn, head_of(state), head_features(state.params)["eval"],
                         tcfg.batch_size, ensemble)
        return _eval(pair_fn, state.params, eval_arrays, tcfg.batch_size, ensemble)

    result = run_loop(workdir, state, one_step, tcfg, seed=seed, manifest=manifest, log=log,
                      progress_keys=("loss", "accuracy"), evaluate=evaluate)
    state, start, last_eval = result.state, result.resumed_from, result.last_eval
    digest = provenance.params_digest(distributed.gather_to_host(state.params))
    pool = "" if model_cfg.reward_pool == "last" else f",{model_cfg.reward_pool}"
    model_id = f"rm[{model_cfg.n_layers}x{model_cfg.d_model},{tok_name}{pool}]:{digest[:16]}"
    info = {"reward_model_id": model_id, "model_config": dataclasses.asdict(model_cfg),
            "tokenizer": tok_name, "ensemble_size": tcfg.ensemble_size,
            "checkpoint_step": tcfg.num_steps}
    summary = {"final_step": tcfg.num_steps, "resumed_from": start, "eval": last_eval,
               "train_data": train_info, "eval_data": eval_info, "reward_model_id": model_id}
    if feature_files:
        summary["head_features"] = feature_files
    manifest["extra"] = {"reward_model": run_info, "summary": summary}
    if distributed.is_primary():   # one writer of the run's files
        write_json(os.path.join(workdir, "reward_model.json"), info)
        write_json(os.path.join(workdir, "summary.json"), summary)
        provenance.write_manifest(workdir, **manifest)
    log(f"done: reward model {model_id}; results in {workdir}")
    return state, summary

