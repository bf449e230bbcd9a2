"""Reward-model run loop: preference file -> packed pairs -> Bradley-Terry steps -> eval, checkpointed.

    run(config, workdir) -> (state, summary)

`config` is `configs/reward_model.py`'s ConfigDict (sections data, model, rm, train, mesh). The step
is `reward_training.make_rm_step` (or its vmapped ensemble), jitted with the state donated; batches
are `data.pipeline.batch_indices(loader_cfg, n, step)`, a pure function of (seed, step), so resume
from the work dir is exact (the same design as `train.py`). A bad record in the data files fails
with file and line before any training (or is counted with `data.skip_bad=True`, and the counts
are written to the summary).

Models: `model.source = "tiny"` builds a fresh decoder of the given size with the byte tokenizer
(everything offline); the config records it, and `reward_model.json` in the work dir holds the id
(`reward_model_id`) that reference tables built with this model carry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import checkpointing, models, provenance, reward_training as rt, sharding
from infalign_jax.config_utils import dataclass_from, section
from infalign_jax.data import (LoaderConfig, TokenizeConfig, batch_indices, read_preferences,
                               tokenize_preferences)
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.metrics_io import MetricsWriter, Progress, truncate_after

MODEL_SOURCES = ("tiny",)


@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
    num_steps: int = 200
    batch_size: int = 32
    log_every: int = 20
    eval_every: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    ensemble_size: int = 1
    bootstrap: bool = False
    async_checkpoint: bool = True

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "log_every", "checkpoint_every",
                     "keep_checkpoints", "ensemble_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.train.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"config.train.eval_every must be an integer >= 0, got {self.eval_every!r}")


def build_model(model_section: dict[str, Any]) -> tuple[models.ModelConfig, ByteTokenizer]:
    source = model_section.pop("source", None)
    if source not in MODEL_SOURCES:
        raise ValueError(f"config.model.source must be one of {MODEL_SOURCES}, got {source!r}")
    tok = ByteTokenizer()
    cfg = dataclass_from(models.ModelConfig, model_section, "model", vocab_size=tok.vocab_size,
                         heads=("reward",))
    return cfg, tok


def ensure_synthetic_data(data: dict[str, Any], workdir: str, seed: int,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes gold-judge-labelled pairs into workdir/data once, when `data.synthetic` says so:

    * ``"<judge>"`` (e.g. "vader"): templated review pairs labelled by that judge;
    * ``"task:<real task>"`` (e.g. "task:helpfulness"): pairs of SmolLM2 base samples of the
      task's prompts labelled by the task's gold judge, train and eval on disjoint prompts, with
      `data.label_noise` of the training labels flipped (the proxy-vs-gold set-up).
    """
    if not data.get("synthetic"):
        return data
    from infalign_jax.data import synthetic
    data = dict(data)
    name = data["synthetic"]
    for split, n, offset in (("train", data["synthetic_train_pairs"], 0),
                             ("eval", data["synthetic_eval_pairs"], 1)):
        path = os.path.join(workdir, "data", f"{name.replace(':', '_')}_{split}.jsonl")
        if not os.path.exists(path):
            if name.startswith("task:"):
                per_prompt = data["pairs_per_prompt"]
                prompts = -(-n // per_prompt)
                first = 0 if split == "train" else data["eval_first_prompt"]
                if split == "train" and prompts > data["eval_first_prompt"]:
                    raise ValueError(
                        f"config.data: {n} training pairs at {per_prompt} per prompt need "
                        f"{prompts} prompts, which overlap the eval prompts from "
                        f"eval_first_prompt={data['eval_first_prompt']}")
                rows = synthetic.sample_judged_pairs(
                    name[5:], num_prompts=prompts, samples_per_prompt=data["samples_per_prompt"],
                    pairs_per_prompt=per_prompt, max_new_tokens=data["sample_new_tokens"],
                    seed=seed * 1000 + offset, first_prompt=first, progress=log,
                    label_noise=data["label_noise"] if split == "train" else 0.0)[:n]
            else:
                from infalign_jax.judges import get_judge
                rows = synthetic.make_judged_pairs(get_judge(name), n, seed=seed * 1000 + offset)
            synthetic.write_jsonl(path, rows)
        data[f"{split}_path"] = path
    return data


def load_pairs(data: dict[str, Any], split: str, tok: ByteTokenizer, log: Callable[[str], None]
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = data[f"{split}_path"]
    examples, report = read_preferences(path, data["format"], skip_bad=data["skip_bad"])
    tcfg = TokenizeConfig(max_prompt_len=data["max_prompt_len"],
                          max_response_len=data["max_response_len"], eos_id=tok.eos_id,
                          pad_id=tok.pad_id)
    packed, tok_report = tokenize_preferences(examples, tok, tcfg, skip_bad=data["skip_bad"])
    report.merge(tok_report)
    if report.total:
        log(f"{split}: {path}: {report.summary()}")
    # Rows of the packed arrays become batch rows: prompt_NxP -> prompt_BxP, as the step expects.
    arrays = {k.replace("_Nx", "_Bx"): v for k, v in packed.as_dict().items() if "_Nx" in k}
    return arrays, {"path": path, "pairs": len(packed), "skipped": dict(report.counts)}


def _eval(eval_fn, params, arrays: dict[str, np.ndarray], batch: int, ensemble: bool
          ) -> dict[str, float]:
    """Accuracy / loss / ECE over the whole eval set (batched; ECE from all rewards at once)."""
    n = len(next(iter(arrays.values())))
    outs = []
    for start in range(0, n, batch):
        rows = {k: jnp.asarray(v[start:start + batch]) for k, v in arrays.items()}
        outs.append(jax.device_get(eval_fn(params, rows)))
    rc = np.concatenate([o[0] for o in outs], axis=-1)
    rr = np.concatenate([o[1] for o in outs], axis=-1)
    if ensemble:  # the ensemble's prediction is its mean reward
        rc, rr = rc.mean(0), rr.mean(0)
    rc, rr = jnp.asarray(rc), jnp.asarray(rr)
    return {"eval_accuracy": float(rt.pairwise_accuracy(rc, rr)),
            "eval_ece": float(rt.expected_calibration_error(rc, rr)),
            "eval_reward_gap": float(jnp.mean(rc - rr)), "eval_pairs": n}


def run(config: Any, workdir: str, *, log: Callable[[str], None] | None = None,
        devices: Any = None) -> tuple[rt.RMState, dict[str, Any]]:
    started = provenance.now()
    log = log or (lambda s: print(s, flush=True))
    seed = int(config.seed)
    tcfg = dataclass_from(RMTrainConfig, section(config, "train"), "train")
    rcfg = dataclass_from(rt.RMConfig, section(config, "rm"), "rm")
    model_cfg, tok = build_model(section(config, "model"))
    checkpointing.check_writable(workdir)
    data = ensure_synthetic_data(section(config, "data"), workdir, seed, log)
    train_arrays, train_info = load_pairs(data, "train", tok, log)
    eval_arrays, eval_info = load_pairs(data, "eval", tok, log)
    n = train_info["pairs"]
    loader_cfg = LoaderConfig(batch_size=tcfg.batch_size, seed=seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
    mesh = sharding.make_mesh(sharding.mesh_config_from_dict(section(config, "mesh")), devices)
    ensemble = tcfg.ensemble_size > 1
    optimizer = rt.make_optimizer(rcfg)
    key = jax.random.key(seed)
    if ensemble:  # members are vmapped on the default device layout
        state = rt.init_ensemble_state(rt.init_ensemble(model_cfg, key, tcfg.ensemble_size),
                                       optimizer)
        step_fn = jax.jit(rt.make_ensemble_rm_step(model_cfg, rcfg, optimizer), donate_argnums=0)
        pair_fn = jax.jit(jax.vmap(lambda p, b: rt.pair_rewards(model_cfg, p, b), (0, None)))
    else:
        state = rt.init_rm_state(rt.init_rm_params(model_cfg, key, mesh), optimizer, mesh)
        step_fn = rt.jit_rm_step(rt.make_rm_step(model_cfg, rcfg, optimizer), state, mesh)
        pair_fn = jax.jit(lambda p, b: rt.pair_rewards(model_cfg, p, b))
    manifest = dict(config=config, seeds={"seed": seed}, mesh=mesh, started=started,
                    inputs={"train": train_info["path"], "eval": eval_info["path"]})
    provenance.write_manifest(workdir, **manifest)

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=tcfg.keep_checkpoints,
                                      save_interval_steps=tcfg.checkpoint_every,
                                      async_save=tcfg.async_checkpoint)
    start = 0
    restored = ckpt.restore_latest(checkpointing.abstract_state(state))
    if restored is not None:
        state, start = restored.state, restored.step
        log(f"resumed from checkpoint step {start} in {ckpt.directory}")
    truncate_after(os.path.join(workdir, "metrics.jsonl"), start + 1)
    writer = MetricsWriter(workdir, "metrics")
    progress = Progress(tcfg.num_steps, start, out=log)
    boot_key = jax.random.key(seed + 1)
    last_eval: dict[str, float] = {}
    try:
        for step in range(start, tcfg.num_steps):
            rows = batch_indices(loader_cfg, n, step)
            batch = {k: v[rows] for k, v in train_arrays.items()}
            if ensemble and tcfg.bootstrap:
                batch["member_idx_ExB"] = np.asarray(rt.bootstrap_indices(
                    jax.random.fold_in(boot_key, step), tcfg.ensemble_size, len(rows)))
                batch = {k: jnp.asarray(v) for k, v in batch.items()}
            else:
                batch = sharding.shard_batch(batch, mesh) if not ensemble else \
                    {k: jnp.asarray(v) for k, v in batch.items()}
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
            if not all(np.isfinite(v) for v in metrics.values()):
                raise FloatingPointError(f"step {step + 1}: non-finite metrics {metrics}; the "
                                         f"last checkpoint (step {ckpt.latest_step()}) is intact")
            done = step + 1
            metrics["step_time_s"] = time.perf_counter() - t0
            writer.write(done, metrics)
            if tcfg.eval_every and done % tcfg.eval_every == 0:
                last_eval = _eval(pair_fn, state.params, eval_arrays, tcfg.batch_size, ensemble)
                writer.write(done, last_eval)
            if done % tcfg.log_every == 0 or done == tcfg.num_steps:
                progress.update(done, {k: metrics[k] for k in ("loss", "accuracy")})
            ckpt.save(done, state, {"seed": seed, "step": done}, force=done == tcfg.num_steps)
        ckpt.wait()
    finally:
        ckpt.close()
        writer.close()
    last_eval = _eval(pair_fn, state.params, eval_arrays, tcfg.batch_size, ensemble)
    log("eval: " + " ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
    digest = hashlib.sha256(b"".join(np.asarray(x).tobytes()
                                     for x in jax.tree.leaves(jax.device_get(state.params))))
    model_id = f"rm[{model_cfg.n_layers}x{model_cfg.d_model},{tok.name}]:{digest.hexdigest()[:16]}"
    info = {"reward_model_id": model_id, "model_config": dataclasses.asdict(model_cfg),
            "tokenizer": tok.name, "ensemble_size": tcfg.ensemble_size,
            "checkpoint_step": tcfg.num_steps}
    with open(os.path.join(workdir, "reward_model.json"), "w") as f:
        json.dump(info, f, indent=2)
    summary = {"final_step": tcfg.num_steps, "resumed_from": start, "eval": last_eval,
               "train_data": train_info, "eval_data": eval_info, "reward_model_id": model_id}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    provenance.write_manifest(workdir, **manifest, extra={"summary": summary})
    log(f"done: reward model {model_id}; results in {workdir}")
    return state, summary
