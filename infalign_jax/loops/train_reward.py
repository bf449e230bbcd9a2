"""Reward-model run loop: preference file -> packed pairs -> Bradley-Terry steps -> eval, checkpointed.

    run(config, workdir) -> (state, summary)

`config` is `configs/reward_model.py`'s ConfigDict (sections data, model, rm, train, mesh). The step
is `reward_training.make_rm_step` (or its vmapped ensemble), jitted with the state donated; batches
are `data.pipeline.batch_indices(loader_cfg, n, step)`, a pure function of (seed, step), so resume
from the work dir is exact (the same design as `train.py`). A bad record in the data files fails
with file and line before any training (or is counted with `data.skip_bad=True`, and the counts
are written to the summary).

Models (`build_model`): `model.source = "tiny"` builds a fresh decoder of the given size with the
byte tokenizer (everything offline). A transformers directory (a causal LM or a one-label sequence
classifier) or a GGUF file is a pretrained trunk: its parameters are loaded, an lm head dropped
and a reward head added (zeros, as `models.init_params` starts it; a sequence classifier keeps its
score head), and its own tokenizer encodes the pairs (`data.tokenize_preferences`, no special
tokens; the response ends with the chat end-of-turn token, else EOS: `data.tokenize.special_ids`).
The trunk fixes the ModelConfig, so `config.model` holds only `source` and `TRUNK_KEYS`.
`train.trainable` ("all" | "head" | "last:<n>": the reward head, the final norm and the last n
layers) freezes the rest: an optax mask on the updates, and a stopped gradient in the step so a
wholly frozen part costs no backward pass. Ensemble members over one trunk start from the trunk's
head plus N(0, init_std^2) noise each, so they differ before the first step.

`trainable="head"` (one model): the frozen trunk and final norm make the reward the head applied
to one fixed feature per sequence, the final hidden state at the token the head reads
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
import hashlib
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax.infra import checkpointing, provenance, sharding
from infalign_jax import models
from infalign_jax.rewards import reward_models as rt
from infalign_jax.infra.config_utils import dataclass_from, section
from infalign_jax.data import (LoaderConfig, TokenizeConfig, batch_indices, read_preferences,
                               tokenize_preferences)
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.rewards.reward_runs import trunk_tokenizer
from infalign_jax.infra import validate as check
from infalign_jax.infra.files import no_empty_dirs_left, write_json
from infalign_jax.loops.skeleton import LoopContext, run_loop

# With a pretrained trunk these ModelConfig keys may still be set: they change how the trunk is
# computed (rematerialisation, activation dtype), not what it computes.
TRUNK_KEYS = ("remat", "dtype")
TRAINABLE = "'all', 'head' or 'last:<n>' (the reward head, final norm and last n layers)"


def _parse_trainable(value: Any) -> int | None:
    """Layers that train: None for "all", 0 for "head", n for "last:<n>"; anything else refused."""
    if value == "all":
        return None
    if value == "head":
        return 0
    if isinstance(value, str) and value.startswith("last:") and value[5:].isdigit() \
            and int(value[5:]) > 0:
        return int(value[5:])
    raise ValueError(f"config.train.trainable must be {TRAINABLE}, got {value!r}")


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
    trainable: str = "all"         # "all" | "head" | "last:<n>" (see the module docstring)

    def __post_init__(self):
        _parse_trainable(self.trainable)
        check.ints(self, ("num_steps", "batch_size", "log_every", "checkpoint_every",
                          "keep_checkpoints", "ensemble_size"))
        check.ints(self, ("eval_every",), low=0)
        if not isinstance(self.init_from, str):
            check.fail(self, "init_from", "a directory path or ''")


# The "tiny" model section: `source` and the ModelConfig fields the byte tokenizer and the reward
# head do not fix.
MODEL_FIXED = ("vocab_size", "heads")


@dataclasses.dataclass(frozen=True)
class RMDataConfig:
    """`config.data`: preference pairs from files, or made offline by a gold judge (`synthetic`)."""

    _config_owner = "config.data"
    # "auto": read train_path / eval_path when given, else "vader"; "": read them; "<judge>" (e.g.
    # "vader"): templated review pairs labelled by that judge; "task:<real task>": SmolLM2
    # samples of that task labelled by its judge. A judge with paths given is refused.
    synthetic: str = "auto"
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
        paths = self.train_path or self.eval_path
        if self.synthetic == "auto":
            object.__setattr__(self, "synthetic", "" if paths else "vader")
        elif self.synthetic and paths:
            given = "train_path" if self.train_path else "eval_path"
            raise ValueError(f"config.data.{given} is set but config.data.synthetic="
                             f"{self.synthetic!r} makes the pairs; set config.data.synthetic="
                             f"'auto' (or '') to read the files")
        check.ints(self, ("max_prompt_len", "max_response_len", "samples_per_prompt",
                          "pairs_per_prompt", "sample_new_tokens"))
        # The pair counts only matter when pairs are made here.
        check.ints(self, ("synthetic_train_pairs", "synthetic_eval_pairs"),
                   low=1 if self.synthetic else 0)
        check.ints(self, ("eval_first_prompt",), low=0)
        check.bools(self, ("skip_bad",))
        check.numbers(self, ("label_noise",), high=1.0)
        if not self.synthetic:
            for key, other in (("train_path", "eval_path"), ("eval_path", "train_path")):
                if not getattr(self, key):
                    raise ValueError(f"config.data.{key} must name a preference file (with "
                                     f"config.data.{other}) when no synthetic pairs are made")


class RMModel(NamedTuple):
    cfg: models.ModelConfig
    tokenizer: Any
    params: Any                    # the pretrained trunk with its reward head; None for "tiny"
    tokenizer_name: str
    eos_id: int
    pad_id: int


def _load_trunk(source: str, overrides: dict[str, Any]) -> tuple[models.ModelConfig, Any]:
    from infalign_jax.models import gguf_import, hf_import
    if os.path.isfile(source):
        hf, state = gguf_import.read_gguf(source)
        cfg = hf_import.config_from_hf(hf, source=source, **overrides)
        return cfg, hf_import.params_from_hf_state_dict(cfg, state, source=source)
    return hf_import.load_hf_checkpoint(source, **overrides)


def build_model(model_section: dict[str, Any]) -> RMModel:
    """The reward model of `config.model` (see the module docstring): "tiny" (fresh, byte
    tokenizer; parameters initialised by the caller) or a pretrained trunk with its tokenizer."""
    values = dict(model_section)
    source = values.pop("source", None)
    if source == "tiny":
        for key in MODEL_FIXED:
            if key in values:
                raise ValueError(f"config.model.{key} is fixed by the byte tokenizer and the "
                                 f"reward head; remove it")
        tok = ByteTokenizer()
        cfg = dataclass_from(models.ModelConfig, values, "model", vocab_size=tok.vocab_size,
                             heads=("reward",))
        return RMModel(cfg, tok, None, tok.name, tok.eos_id, tok.pad_id)
    if not isinstance(source, str) or not (
            (os.path.isfile(source) and source.endswith(".gguf"))
            or os.path.isfile(os.path.join(source, "config.json"))):
        raise ValueError(f"config.model.source must be 'tiny', a transformers directory (with "
                         f"config.json) or a .gguf file, got {source!r}")
    fixed = sorted(k for k in values if k not in TRUNK_KEYS)
    if fixed:
        raise ValueError(f"config.model.{fixed[0]} is fixed by the pretrained trunk "
                         f"config.model.source={source!r}; remove it"
                         + (f" (and {', '.join(fixed[1:])})" if fixed[1:] else "")
                         + f": only {', '.join(TRUNK_KEYS)} may be set "
                         f"(configs/reward_model.py:trunk=<path> writes such a section)")
    tok, eos_id, pad_id = trunk_tokenizer(source)
    cfg, params = _load_trunk(source, dict(values, heads=("reward",)))
    name = os.path.basename(os.path.normpath(source))
    return RMModel(cfg, tok, params, name, eos_id, pad_id)


def trainable_mask(trainable: str, cfg: models.ModelConfig) -> Any:
    """None ("all") or a tree like the parameters: True / False per leaf, and for the stacked
    decoder layers a bool (n_layers,) array (`reward_models.stop_frozen_gradients`)."""
    n = _parse_trainable(trainable)
    if n is None:
        return None
    if n > cfg.n_layers:
        raise ValueError(f"config.train.trainable={trainable!r}: the model has only "
                         f"{cfg.n_layers} layers")
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))

    def leaf(path, _):
        top = path[0].key
        if top == "layers":
            return np.arange(cfg.n_layers) >= cfg.n_layers - n
        return top.startswith("reward_head") or (top == "final_norm" and n > 0)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def freeze_optimizer(optimizer: optax.GradientTransformation, trainable: Any
                     ) -> optax.GradientTransformation:
    """`optimizer` whose updates are zero where `trainable` is False (weight decay included): a
    stateless optax mask after it, so the optimiser state keeps the parameters' structure (and
    layout). The step stops those gradients (`stop_frozen_gradients`), so clipping and the
    moments see the trainable parameters only."""
    if trainable is None:
        return optimizer

    def keep_only_trainable(updates, params=None):
        del params

        def one(u, t):
            t = np.asarray(t, bool)
            if t.all():
                return u
            return u * jnp.asarray(t.reshape(t.shape + (1,) * (u.ndim - t.ndim)), u.dtype)
        return jax.tree.map(one, updates, trainable)
    return optax.chain(optimizer, optax.stateless(keep_only_trainable))


def _trunk_ensemble(cfg: models.ModelConfig, params: Any, key: jax.Array, size: int) -> Any:
    """`size` copies of the trunk stacked on a leading axis, each reward head the trunk's plus
    N(0, init_std^2) noise of its own."""
    stacked = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], size, 0), params)
    head = stacked["reward_head_kernel"]
    noise = jax.random.normal(key, head.shape, head.dtype) * cfg.init_std
    return dict(stacked, reward_head_kernel=head + noise)


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
    return dataclasses.replace(data, synthetic="", **paths)  # now read from the files


def load_pairs(data: RMDataConfig, split: str, model: RMModel, log: Callable[[str], None]
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = getattr(data, f"{split}_path")
    examples, report = read_preferences(path, data.format, skip_bad=data.skip_bad)
    tcfg = TokenizeConfig(max_prompt_len=data.max_prompt_len,
                          max_response_len=data.max_response_len, eos_id=model.eos_id,
                          pad_id=model.pad_id)
    packed, tok_report = tokenize_preferences(examples, model.tokenizer, tcfg,
                                              skip_bad=data.skip_bad)
    report = report.merge(tok_report)
    if report.total or report.truncated:
        log(f"{split}: {path}: {report.summary()}")
    arrays = {k: v for k, v in packed.as_dict().items() if k in rt.BATCH_KEYS}
    # What was read, what reached training ("pairs"), what was dropped (per reason) or cut.
    return arrays, {"path": path, "pairs": len(packed), **report.as_dict()}


def _trunk_digest(params: Any, model_cfg: models.ModelConfig) -> str:
    """sha256 over the model config and every parameter but the reward head (path, dtype,
    shape, bytes): what the cached features depend on."""
    h = hashlib.sha256(repr(sorted(dataclasses.asdict(model_cfg).items())).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[0].key in rt.HEAD_KEYS:
            continue
        leaf = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def cached_features(workdir: str, split: str, trunk_digest: str, arrays: dict[str, np.ndarray],
                    feature_fn: Callable[[dict[str, Any]], tuple[Any, Any]], batch: int,
                    log: Callable[[str], None]) -> tuple[dict[str, np.ndarray], str]:
    """({chosen_BxD, rejected_BxD}, file) of a split: read from workdir/features/ when the key
    (trunk digest + the packed arrays) matches, else computed batch by batch with `feature_fn`
    (one trunk forward over 2 x batch sequences) and written there."""
    h = hashlib.sha256(trunk_digest.encode())
    for k in sorted(arrays):
        h.update(f"{k}:{arrays[k].dtype}:{arrays[k].shape}".encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    path = os.path.join(workdir, "features", f"{split}-{h.hexdigest()[:20]}.npz")
    n = len(next(iter(arrays.values())))
    if os.path.exists(path):
        with np.load(path) as f:
            out = {k: f[k] for k in rt.FEATURE_KEYS}
        log(f"features {split}: {n} pairs read from {path}")
        return out, path
    log(f"features {split}: one trunk forward pass over {n} pairs ({2 * n} sequences), "
        f"cached in {path}")
    t0 = last = time.perf_counter()
    parts = []
    for start in range(0, n, batch):
        rows = {k: jnp.asarray(v[start:start + batch]) for k, v in arrays.items()}
        parts.append(jax.device_get(feature_fn(rows)))
        done, now = min(start + batch, n), time.perf_counter()
        if done == n or now - last >= 30:
            log(f"features {split}: {done}/{n} pairs ({2 * done} sequences), "
                f"{now - t0:.0f} s")
            last = now
    out = {k: np.concatenate([p[i] for p in parts]) for i, k in enumerate(rt.FEATURE_KEYS)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[:-4] + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out, path


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
    started = provenance.now()
    log = log or (lambda s: print(s, flush=True))
    seed = int(config.seed)
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
    n = train_info["pairs"]
    loader_cfg = LoaderConfig(batch_size=tcfg.batch_size, seed=seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
    mesh = sharding.make_mesh(sharding.mesh_config_from_dict(section(config, "mesh")), devices)
    ensemble = tcfg.ensemble_size > 1
    head_only = tcfg.trainable == "head" and cache_head_features and not ensemble
    if tcfg.trainable == "head" and ensemble:
        log("train.trainable='head' with an ensemble: every step runs the trunk (features are "
            "cached for a single model only)")
    optimizer = freeze_optimizer(rt.make_optimizer(rcfg), trainable)
    key = jax.random.key(seed)
    if ensemble:  # members are vmapped on the default device layout
        params = (rt.init_ensemble(model_cfg, key, tcfg.ensemble_size) if model.params is None
                  else _trunk_ensemble(model_cfg, model.params, key, tcfg.ensemble_size))
        state = rt.init_ensemble_state(params, optimizer)
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
            feature_fn = jax.jit(lambda p, b: rt.pair_features(model_cfg, p, b))
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
    manifest = dict(config=config, seeds={"seed": seed}, mesh=mesh, started=started,
                    inputs={"train": train_info["path"], "eval": eval_info["path"]},
                    extra={"reward_model": run_info})

    boot_key = jax.random.key(seed + 1)
    features: dict[str, dict[str, np.ndarray]] = {}
    feature_files: dict[str, str] = {}

    def head_features(params: Any) -> dict[str, dict[str, np.ndarray]]:
        """The splits' features under this trunk (the state's: a resumed or init_from trunk)."""
        if not features:
            digest = _trunk_digest(params, model_cfg)
            for split, arrays in (("train", train_arrays), ("eval", eval_arrays)):
                features[split], feature_files[split] = cached_features(
                    workdir, split, digest, arrays, lambda b: feature_fn(params, b),
                    tcfg.batch_size, log)
        return features

    def head_of(state: rt.TrainState) -> dict[str, Any]:
        return {k: state.params[k] for k in rt.HEAD_KEYS}

    def one_step(state: rt.TrainState, step: int, context: LoopContext):
        rows = batch_indices(loader_cfg, n, step)
        if head_only:
            batch = {k: v[rows] for k, v in head_features(state.params)["train"].items()}
        else:
            batch = {k: v[rows] for k, v in train_arrays.items()}
        if ensemble and tcfg.bootstrap:
            batch["member_idx_ExB"] = np.asarray(rt.bootstrap_indices(
                jax.random.fold_in(boot_key, step), tcfg.ensemble_size, len(rows)))
        if ensemble:  # members are vmapped on the default device layout
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
        else:
            batch = sharding.shard_batch(batch, mesh)
        t0 = time.perf_counter()
        if head_only:
            head_state, metrics = step_fn(rt.TrainState(head_of(state), state.opt_state,
                                                        state.step), batch)
            state = rt.TrainState(dict(state.params, **head_state.params), head_state.opt_state,
                                  head_state.step)
        else:
            state, metrics = step_fn(state, batch)
        metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
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
    digest = hashlib.sha256(b"".join(np.asarray(x).tobytes()
                                     for x in jax.tree.leaves(jax.device_get(state.params))))
    model_id = f"rm[{model_cfg.n_layers}x{model_cfg.d_model},{tok_name}]:{digest.hexdigest()[:16]}"
    info = {"reward_model_id": model_id, "model_config": dataclasses.asdict(model_cfg),
            "tokenizer": tok_name, "ensemble_size": tcfg.ensemble_size,
            "checkpoint_step": tcfg.num_steps}
    write_json(os.path.join(workdir, "reward_model.json"), info)
    summary = {"final_step": tcfg.num_steps, "resumed_from": start, "eval": last_eval,
               "train_data": train_info, "eval_data": eval_info, "reward_model_id": model_id}
    if feature_files:
        summary["head_features"] = feature_files
    write_json(os.path.join(workdir, "summary.json"), summary)
    manifest["extra"] = {"reward_model": run_info, "summary": summary}
    provenance.write_manifest(workdir, **manifest)
    log(f"done: reward model {model_id}; results in {workdir}")
    return state, summary


# ------------------------------------------------------------------ a run's model, read back
