"""The preference pairs of a `train_reward` run: `RMDataConfig` (`config.data`), pairs made
offline by a gold judge (`ensure_synthetic_data`), read and packed for the model's tokenizer
(`load_pairs`, with what was dropped or cut counted), and the frozen trunk's per-sequence features
cached on disk for `train.trainable="head"` (`trunk_digest`, `cached_features`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from infalign_jax import models
from infalign_jax.data import TokenizeConfig, read_preferences, tokenize_preferences
from infalign_jax.infra import distributed, provenance, validate as check
from infalign_jax.infra.config_utils import UNUSED_OPTION_RULES
from infalign_jax.infra.files import write_npz
from infalign_jax.loops.rm_model import RMModel
from infalign_jax.rewards import reward_models as rt


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
            object.__setattr__(self, "synthetic", pairs_source("auto", paths))
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
        if not (check.is_number(self.label_noise) and 0.0 <= self.label_noise < 0.5):
            check.fail(self, "label_noise", "a number in [0, 0.5) (at 0.5 a label says nothing)")
        if self.label_noise and not self.synthetic:
            raise ValueError(f"config.data.label_noise={self.label_noise} flips labels of pairs "
                             f"made here (config.data.synthetic); the files' labels are read as "
                             f"they are")
        if not self.synthetic:
            for key, other in (("train_path", "eval_path"), ("eval_path", "train_path")):
                if not getattr(self, key):
                    raise ValueError(f"config.data.{key} must name a preference file (with "
                                     f"config.data.{other}) when no synthetic pairs are made")
            if os.path.realpath(self.train_path) == os.path.realpath(self.eval_path):
                raise ValueError(f"config.data.eval_path names the training file "
                                 f"{self.train_path!r}: its accuracy would be training accuracy "
                                 f"reported as held-out; give a held-out file")


# The data options read only when pairs are made here: by a judge or from a task's samples.
TASK_SAMPLE_OPTIONS = ("samples_per_prompt", "pairs_per_prompt", "sample_new_tokens",
                       "eval_first_prompt")


def pairs_source(synthetic: str, paths: Any) -> str:
    """`data.synthetic` resolved: "auto" reads the files when `paths` names any, else makes
    VADER-labelled pairs ("vader"); any other value as it is."""
    if synthetic == "auto":
        return "" if paths else "vader"
    return synthetic


def unused_data_options(config: Mapping[str, Any]) -> dict[str, str]:
    """The reward-model config's data options its pairs' source leaves unread: the synthetic
    pair counts when files are read, the sampling options unless pairs come from a task's
    samples (an override of one gave a run bit-identical to the one without)."""
    data, train = config.get("data"), config.get("train")
    if not isinstance(data, Mapping) or "synthetic" not in data or \
            not isinstance(train, Mapping) or "ensemble_size" not in train:
        return {}   # not a reward-model config
    source = pairs_source(data["synthetic"], data.get("train_path") or data.get("eval_path"))
    unread = {}
    if not source:
        unread.update({f"data.{k}": "config.data.synthetic naming a judge or 'task:<name>'"
                       for k in ("synthetic_train_pairs", "synthetic_eval_pairs")})
    if not str(source).startswith("task:"):
        unread.update({f"data.{k}": "config.data.synthetic='task:<name>'"
                       for k in TASK_SAMPLE_OPTIONS})
    if not train["ensemble_size"] > 1:
        unread["train.bootstrap"] = "config.train.ensemble_size > 1"
    return unread


UNUSED_OPTION_RULES.append(unused_data_options)


def ensure_synthetic_data(data: RMDataConfig, workdir: str, seed: int,
                          log: Callable[[str], None] = print) -> RMDataConfig:
    """Writes gold-judge-labelled pairs into workdir/data once, when `data.synthetic` says so:

    * ``"<judge>"`` (e.g. "vader"): templated review pairs labelled by that judge;
    * ``"task:<real task>"`` (e.g. "task:helpfulness"): pairs of SmolLM2 base samples of the
      task's prompts labelled by the task's gold judge, train and eval on disjoint prompts.

    With either, `data.label_noise` of the training labels are flipped (the proxy-vs-gold set-up).
    Each file is named for everything that makes its pairs (judge, split, noise and a digest of
    the count, seed and sampling settings), so pairs made under other settings (a fresh start in
    the work dir of a run killed before its first checkpoint) are never reused.
    """
    if not data.synthetic:
        return data
    from infalign_jax.data import synthetic
    from infalign_jax.rl.tasks import real
    name, paths = data.synthetic, {}
    for split, n, offset in (("train", data.synthetic_train_pairs, 0),
                             ("eval", data.synthetic_eval_pairs, 1)):
        noise = data.label_noise if split == "train" else 0.0
        makes = [n, seed, noise] + ([getattr(data, k) for k in TASK_SAMPLE_OPTIONS]
                                    if name.startswith("task:") else [])
        digest = hashlib.sha256(json.dumps(makes).encode()).hexdigest()[:12]
        path = os.path.join(workdir, "data", f"{name.replace(':', '_')}_{split}"
                                             f"{f'_noise{noise:g}' if noise else ''}_{digest}.jsonl")
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
                    label_noise=noise)[:n]
                if len(rows) < n:
                    log(f"warning: config.data: {len(rows)} {split} pairs of the {n} asked for "
                        f"(pairs whose gold scores differ by 1e-3 or less, or whose texts are "
                        f"equal or empty, are left out); raise samples_per_prompt or "
                        f"pairs_per_prompt for more")
            else:
                from infalign_jax.rewards.judges import get_judge
                rows = synthetic.make_judged_pairs(get_judge(name), n, seed=seed * 1000 + offset,
                                                   label_noise=noise)
            synthetic.write_jsonl(path, rows)
        paths[f"{split}_path"] = path
    # Now read from the files, whose labels carry the noise.
    return dataclasses.replace(data, synthetic="", label_noise=0.0, **paths)


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


def pairs_in_both(train: dict[str, np.ndarray], held_out: dict[str, np.ndarray]) -> int:
    """How many held-out pairs are also training pairs (same prompt and responses after
    tokenization, in either order: a swapped label is the same pair judged both ways)."""
    def keys(arrays: dict[str, np.ndarray]) -> list[bytes]:
        rows = []
        for i in range(len(arrays["prompt_BxP"])):
            parts = [arrays[k][i][arrays[f"{k[:-4]}_mask{k[-4:]}"][i].astype(bool)].tobytes()
                     for k in ("prompt_BxP", "chosen_BxL", "rejected_BxL")]
            rows.append(b"|".join([parts[0], *sorted(parts[1:])]))
        return rows
    seen = set(keys(train))
    return sum(k in seen for k in keys(held_out))


def trunk_digest(params: Any, model_cfg: models.ModelConfig) -> str:
    """sha256 over the model config and every parameter but the reward head
    (`provenance.params_digest`): what the cached features depend on. A collective: the
    parameters may be spread over the devices of several processes."""
    h = hashlib.sha256(repr(sorted(dataclasses.asdict(model_cfg).items())).encode())
    trunk = {k: v for k, v in params.items() if k not in rt.HEAD_KEYS}
    if jax.process_count() > 1:   # one leaf at a time: never the whole trunk on every device
        trunk = jax.tree.map(distributed.gather_to_host, trunk)
    h.update(provenance.params_digest(trunk).encode())
    return h.hexdigest()


def cached_features(workdir: str, split: str, digest: str, arrays: dict[str, np.ndarray],
                    feature_fn: Callable[[dict[str, Any]], tuple[Any, Any]], batch: int,
                    log: Callable[[str], None]) -> tuple[dict[str, np.ndarray], str]:
    """({chosen_BxD, rejected_BxD}, file) of a split: read from workdir/features/ when the key
    (`digest`, the trunk's `trunk_digest`, and the packed arrays) matches, else computed batch by
    batch with `feature_fn` (one trunk forward over 2 x batch sequences) and written there."""
    h = hashlib.sha256(digest.encode())
    for k in sorted(arrays):
        h.update(f"{k}:{arrays[k].dtype}:{arrays[k].shape}".encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    path = os.path.join(workdir, "features", f"{split}-{h.hexdigest()[:20]}.npz")
    n = len(next(iter(arrays.values())))
    # One answer for every process (`feature_fn` is a collective: a process that found the
    # file process 0 had just written would leave the others waiting in it).
    if distributed.from_primary(distributed.numbered("features_cached"),
                                lambda: os.path.exists(path)):
        with np.load(path) as f:
            out = {k: f[k] for k in rt.FEATURE_KEYS}
        log(f"features {split}: {n} pairs read from {path}")
        return out, path
    log(f"features {split}: one trunk forward pass over {n} pairs ({2 * n} sequences), "
        f"cached in {path}")
    t0 = last = time.perf_counter()
    parts = []
    for start in range(0, n, batch):
        rows = {k: v[start:start + batch] for k, v in arrays.items()}
        parts.append(jax.device_get(feature_fn(rows)))
        done, now = min(start + batch, n), time.perf_counter()
        if done == n or now - last >= 30:
            log(f"features {split}: {done}/{n} pairs ({2 * done} sequences), "
                f"{now - t0:.0f} s")
            last = now
    out = {k: np.concatenate([p[i] for p in parts]) for i, k in enumerate(rt.FEATURE_KEYS)}
    if distributed.is_primary():   # one writer
        write_npz(path, **out)
    return out, path
