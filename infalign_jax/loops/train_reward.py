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
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.infra import checkpointing, provenance, sharding
from infalign_jax import models
from infalign_jax.rewards import reward_models as rt
from infalign_jax.infra.config_utils import dataclass_from, section
from infalign_jax.data import (LoaderConfig, TokenizeConfig, batch_indices, read_preferences,
                               tokenize_preferences)
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.infra import validate as check
from infalign_jax.infra.files import no_empty_dirs_left, write_json
from infalign_jax.loops.skeleton import LoopContext, run_loop

MODEL_SOURCES = ("tiny",)


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
    bootstrap: bool = False
    async_checkpoint: bool = True
    tensorboard: bool = True
    init_from: str = ""            # a run / checkpoint dir whose parameters a fresh run starts from

    def __post_init__(self):
        check.ints(self, ("num_steps", "batch_size", "log_every", "checkpoint_every",
                          "keep_checkpoints", "ensemble_size"))
        check.ints(self, ("eval_every",), low=0)
        if not isinstance(self.init_from, str):
            check.fail(self, "init_from", "a directory path or ''")


# The model section: `source` and the ModelConfig fields the tokenizer and the reward head do not fix.
MODEL_FIXED = ("vocab_size", "heads")


@dataclasses.dataclass(frozen=True)
class RMDataConfig:
    """`config.data`: preference pairs from files, or made offline by a gold judge (`synthetic`)."""

    _config_owner = "config.data"
    # "": read train_path / eval_path; "<judge>" (e.g. "vader"): templated review pairs labelled
    # by that judge; "task:<real task>": SmolLM2 samples of that task labelled by its judge.
    synthetic: str = "vader"
    synthetic_train_pairs: int = 4000
    synthetic_eval_pairs: int = 500
    train_path: str = ""
    eval_path: str = ""
    format: str = "auto"
    skip_bad: bool = False
    max_prompt_len: int = 64
    max_response_len: int = 64
    samples_per_prompt: int = 8      # task:<name>: base samples per prompt, pairs drawn among them
    pairs_per_prompt: int = 20
    sample_new_tokens: int = 32
    eval_first_prompt: int = 36      # task:<name>: eval pairs come from prompts from this one on
    label_noise: float = 0.0         # fraction of training labels flipped (proxy vs gold)

    def __post_init__(self):
        check.ints(self, ("max_prompt_len", "max_response_len", "samples_per_prompt",
                          "pairs_per_prompt", "sample_new_tokens"))
        # The pair counts only matter when pairs are made here.
        check.ints(self, ("synthetic_train_pairs", "synthetic_eval_pairs"),
                   low=1 if self.synthetic else 0)
        check.ints(self, ("eval_first_prompt",), low=0)
        check.bools(self, ("skip_bad",))
        check.numbers(self, ("label_noise",), high=1.0)
        if not self.synthetic and not (self.train_path and self.eval_path):
            check.fail(self, "train_path", "set (with eval_path) when synthetic is ''")


def build_model(model_section: dict[str, Any]) -> tuple[models.ModelConfig, ByteTokenizer]:
    values = dict(model_section)
    source = values.pop("source", None)
    if source not in MODEL_SOURCES:
        raise ValueError(f"config.model.source must be one of {MODEL_SOURCES}, got {source!r}")
    for key in MODEL_FIXED:
        if key in values:
            raise ValueError(f"config.model.{key} is fixed by the byte tokenizer and the reward "
                             f"head; remove it")
    tok = ByteTokenizer()
    cfg = dataclass_from(models.ModelConfig, values, "model", vocab_size=tok.vocab_size,
                         heads=("reward",))
    return cfg, tok


def ensure_synthetic_data(data: RMDataConfig, workdir: str, seed: int,
                          log: Callable[[str], None] = print) -> RMDataConfig:
    """Writes gold-judge-labelled pairs into workdir/data once, when `data.synthetic` says so:

    * ``"<judge>"`` (e.g. "vader"): templated review pairs labelled by that judge;
    * ``"task:<real task>"`` (e.g. "task:helpfulness"): pairs of SmolLM2 base samples of the
      task's prompts labelled by the task's gold judge, train and eval on disjoint prompts, with
      `data.label_noise` of the training labels flipped (the proxy-vs-gold set-up).
    """
    if not data.synthetic:
        return data
    from infalign_jax.data import synthetic
    from infalign_jax.rl.tasks import real
    name, paths = data.synthetic, {}
    for split, n, offset in (("train", data.synthetic_train_pairs, 0),
                             ("eval", data.synthetic_eval_pairs, 1)):
        path = os.path.join(workdir, "data", f"{name.replace(':', '_')}_{split}.jsonl")
        if not os.path.exists(path):
            if name.startswith("task:"):
                per_prompt = data.pairs_per_prompt
                prompts = -(-n // per_prompt)
                first = 0 if split == "train" else data.eval_first_prompt
                if split == "train" and prompts > data.eval_first_prompt:
                    raise ValueError(
                        f"config.data: {n} training pairs at {per_prompt} per prompt need "
                        f"{prompts} prompts, which overlap the eval prompts from "
                        f"eval_first_prompt={data.eval_first_prompt}")
                rows = real.sample_judged_pairs(
                    name[5:], num_prompts=prompts, samples_per_prompt=data.samples_per_prompt,
                    pairs_per_prompt=per_prompt, max_new_tokens=data.sample_new_tokens,
                    seed=seed * 1000 + offset, first_prompt=first, progress=log,
                    label_noise=data.label_noise if split == "train" else 0.0)[:n]
            else:
                from infalign_jax.rewards.judges import get_judge
                rows = synthetic.make_judged_pairs(get_judge(name), n, seed=seed * 1000 + offset)
            synthetic.write_jsonl(path, rows)
        paths[f"{split}_path"] = path
    return dataclasses.replace(data, **paths)


def load_pairs(data: RMDataConfig, split: str, tok: ByteTokenizer, log: Callable[[str], None]
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = getattr(data, f"{split}_path")
    examples, report = read_preferences(path, data.format, skip_bad=data.skip_bad)
    tcfg = TokenizeConfig(max_prompt_len=data.max_prompt_len,
                          max_response_len=data.max_response_len, eos_id=tok.eos_id,
                          pad_id=tok.pad_id)
    packed, tok_report = tokenize_preferences(examples, tok, tcfg, skip_bad=data.skip_bad)
    report = report.merge(tok_report)
    if report.total or report.truncated:
        log(f"{split}: {path}: {report.summary()}")
    arrays = {k: v for k, v in packed.as_dict().items() if k in rt.BATCH_KEYS}
    # What was read, what reached training ("pairs"), what was dropped (per reason) or cut.
    return arrays, {"path": path, "pairs": len(packed), **report.as_dict()}


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
        devices: Any = None) -> tuple[rt.TrainState, dict[str, Any]]:
    """Trains (or resumes) the reward model (or bootstrap ensemble) of `config` in `workdir`;
    returns the final state and the summary (held-out accuracy, ECE, the model id to cite).

    One function (`_run`) for the same reason as `train.run`: the order of checks, data, state,
    loop (`loops.skeleton`) and outputs is the contract. A run that fails leaves no empty work
    dir behind.
    """
    with no_empty_dirs_left(workdir):
        return _run(config, workdir, log, devices)


def _run(config: Any, workdir: str, log: Callable[[str], None] | None, devices: Any
         ) -> tuple[rt.TrainState, dict[str, Any]]:
    started = provenance.now()
    log = log or (lambda s: print(s, flush=True))
    seed = int(config.seed)
    tcfg = dataclass_from(RMTrainConfig, section(config, "train"), "train")
    rcfg = dataclass_from(rt.RMConfig, section(config, "rm"), "rm")
    model_cfg, tok = build_model(section(config, "model"))
    checkpointing.check_writable(workdir)
    data = ensure_synthetic_data(dataclass_from(RMDataConfig, section(config, "data"), "data"),
                                 workdir, seed, log)
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

    boot_key = jax.random.key(seed + 1)

    def one_step(state: rt.TrainState, step: int, context: LoopContext):
        rows = batch_indices(loader_cfg, n, step)
        batch = {k: v[rows] for k, v in train_arrays.items()}
        if ensemble and tcfg.bootstrap:
            batch["member_idx_ExB"] = np.asarray(rt.bootstrap_indices(
                jax.random.fold_in(boot_key, step), tcfg.ensemble_size, len(rows)))
        if ensemble:  # members are vmapped on the default device layout
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
        else:
            batch = sharding.shard_batch(batch, mesh)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        if not all(np.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"step {step + 1}: non-finite metrics {metrics}; the last "
                                     f"checkpoint (step {context.latest_checkpoint()}) is intact")
        metrics["step_time_s"] = time.perf_counter() - t0
        return state, metrics

    result = run_loop(workdir, state, one_step, tcfg, seed=seed, manifest=manifest, log=log,
                      progress_keys=("loss", "accuracy"),
                      evaluate=lambda state, step: _eval(pair_fn, state.params, eval_arrays,
                                                         tcfg.batch_size, ensemble))
    state, start, last_eval = result.state, result.resumed_from, result.last_eval
    digest = hashlib.sha256(b"".join(np.asarray(x).tobytes()
                                     for x in jax.tree.leaves(jax.device_get(state.params))))
    model_id = f"rm[{model_cfg.n_layers}x{model_cfg.d_model},{tok.name}]:{digest.hexdigest()[:16]}"
    info = {"reward_model_id": model_id, "model_config": dataclasses.asdict(model_cfg),
            "tokenizer": tok.name, "ensemble_size": tcfg.ensemble_size,
            "checkpoint_step": tcfg.num_steps}
    write_json(os.path.join(workdir, "reward_model.json"), info)
    summary = {"final_step": tcfg.num_steps, "resumed_from": start, "eval": last_eval,
               "train_data": train_info, "eval_data": eval_info, "reward_model_id": model_id}
    write_json(os.path.join(workdir, "summary.json"), summary)
    provenance.write_manifest(workdir, **manifest, extra={"summary": summary})
    log(f"done: reward model {model_id}; results in {workdir}")
    return state, summary
