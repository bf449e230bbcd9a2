"""A `experiments/train_reward.py` run directory as a reward: its model, newest checkpoint and
tokenizer (`load_run`), and a text judge of it (`run_judge`; `config.task.reward.kind="trained"`).

The run's manifest holds what scoring needs (`extra.reward_model`: the model config, the trunk
source, the packing limits and special ids, the ensemble size), written by
`loops.train_reward`; text is scored as the run packed its pairs (`hf_reward.PairLayoutJudge`),
an ensemble run as mean - std_penalty * std over its members. `trunk_tokenizer` is the
tokenizer of a pretrained trunk (transformers directory or GGUF file) with its EOS and pad ids.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import jax

from infalign_jax import models
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.data.tokenize import special_ids
from infalign_jax.infra import checkpointing
from infalign_jax.rewards import reward_models as rt


def trunk_tokenizer(source: str, where: str = "config.model.source") -> tuple[Any, int, int]:
    """(tokenizer, eos_id, pad_id) of a transformers directory or GGUF file."""
    from infalign_jax.rewards.hf_reward import load_tokenizer
    tok = load_tokenizer(source, where)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if (im_end is None or im_end == tok.unk_token_id) and tok.eos_token_id is None:
        raise ValueError(f"{where}: the tokenizer of {source!r} has no EOS token (a response "
                         f"must end with one)")
    eos_id, pad_id = special_ids(tok)
    return tok, eos_id, pad_id


class RewardRun(NamedTuple):
    cfg: models.ModelConfig
    params: Any                    # the newest checkpoint's; a leading member axis if ensemble
    tokenizer: Any
    info: dict[str, Any]           # the manifest's extra.reward_model (limits, special ids)
    step: int
    path: str


def load_run(path: str, where: str = "config.task.reward.checkpoint") -> RewardRun:
    """The reward model of a `train_reward.py` run directory: its config from the run's manifest
    (`extra.reward_model`), the parameters of its newest checkpoint, its tokenizer."""
    import json
    manifest_path = os.path.join(path, "manifest.json")
    if not (os.path.isfile(manifest_path) and os.path.isdir(os.path.join(path, "checkpoints"))):
        raise ValueError(f"{where}: {path!r} is not a run directory (expected manifest.json and "
                         f"checkpoints/ written by experiments/train_reward.py)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        info = (manifest.get("extra") or {}).get("reward_model")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: cannot read {manifest_path} ({e})") from e
    if not isinstance(info, dict):
        raise ValueError(f"{where}: {path!r} is not a reward-model run (its manifest has no "
                         f"extra.reward_model; experiments/train_reward.py writes it)")
    cfg = models.ModelConfig(**info["model_config"])
    tok = ByteTokenizer() if info["source"] == "tiny" else trunk_tokenizer(info["source"],
                                                                            where)[0]
    size = int(info["ensemble_size"])
    shapes = jax.eval_shape((lambda k: rt.init_ensemble(cfg, k, size)) if size > 1
                            else (lambda k: models.init_params(cfg, k)), jax.random.key(0))
    try:
        params, step, _ = checkpointing.restore_params(path, checkpointing.local_abstract(shapes))
    except ValueError as e:
        raise ValueError(str(e).replace("config.train.init_from", where)) from e
    if not manifest.get("finished"):   # a run killed (or still running) before its last step
        warnings.warn(f"{where}: the run {path!r} has not finished (its manifest records no "
                      f"finish); scoring with its newest checkpoint, step {step}", stacklevel=2)
    return RewardRun(cfg, params, tok, info, step, os.path.abspath(path))


def run_judge(path: str, *, std_penalty: float | None = None, batch_size: int = 16,
              padding: str = "right", where: str = "config.task.reward.checkpoint") -> Any:
    """A text judge (`hf_reward.PairLayoutJudge`) of a run's newest checkpoint; for an ensemble
    run, mean - std_penalty * std over its members (`hf_reward.EnsembleJudge`; None: 1). A
    std_penalty given for a one-model run is refused (there is no spread to penalise)."""
    from infalign_jax.rewards import hf_reward
    run = load_run(path, where)
    info = run.info

    def member(params, name):
        return hf_reward.PairLayoutJudge(
            run.cfg, params, run.tokenizer, name=name, eos_id=info["eos_id"],
            pad_id=info["pad_id"], max_prompt_len=info["max_prompt_len"],
            max_response_len=info["max_response_len"], batch_size=batch_size, padding=padding,
            where=where.rsplit(".", 1)[0])
    name = f"rm:{run.path}@{run.step}"
    size = int(info["ensemble_size"])
    if size == 1:
        if std_penalty is not None:
            raise ValueError(f"{where.rsplit('.', 1)[0]}.std_penalty={std_penalty} is set, but "
                             f"the run at {path} trained one model (ensemble_size 1): its "
                             f"scores have no spread to penalise; remove it")
        return member(run.params, name)
    return hf_reward.EnsembleJudge(
        [member(jax.tree.map(lambda x, e=e: x[e], run.params), f"{name}#{e}")
         for e in range(size)], 1.0 if std_penalty is None else std_penalty)
