"""A reward model as a text judge: a transformers sequence-classification checkpoint, a
`train_reward.py` run (`PairLayoutJudge`), and ensembles of them.

The policy and the reward model rarely share a tokenizer, so the reward of a response is computed
from text, as a user of the reward model would: the policy's response tokens are decoded with the
policy's tokenizer (`judges.text_reward_fn` does that), the (prompt, response) text is rendered
(`template`), re-encoded with the reward model's own tokenizer on the host, padded into fixed
(batch_size, bucket) shapes, and scored by the Flax decoder with its `("reward",)` head under
`jit` (`models.apply(...).reward`, read where `ModelConfig.reward_pool` says: the last real
token, the token transformers scores, or the mean over the real tokens for a run trained so).
One program is compiled per bucket length (powers of two up to `max_len`).

Truncation keeps the end of the text (the response, where a last-token score is read) and counts
the cut rows in `truncated`.

`ModelJudge` takes (cfg, params, tokenizer); `SequenceClassifierJudge` loads them from a
transformers directory; `PairLayoutJudge` encodes (prompt, response) as `train_reward.py` packed
its pairs (`rewards.reward_runs.run_judge` builds it from a run directory).

`EnsembleJudge` scores with several such models and returns mean - k * std over the members (a
pessimistic, uncertainty-penalised reward; Coste et al. 2024, "Reward model ensembles help
mitigate overoptimization", the UWO objective).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax.data.tokenize import as_encoder, pad_rows
from infalign_jax.infra import provenance
from infalign_jax.models import hf_import

logger = logging.getLogger(__name__)
DEFAULT_TEMPLATE = "{prompt}\n{response}"
PADDING_SIDES = ("left", "right")


def _bucket(n: int, max_len: int, smallest: int = 16) -> int:
    width = smallest
    while width < n:
        width *= 2
    return min(width, max_len)


def _template_fields(template: str) -> set[str]:
    """The replacement fields of a format string; a malformed one has none we accept."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template)
                if field is not None}
    except ValueError:
        return set()


def render(tokenizer: Any, template: str, prompt: str, response: str) -> str:
    """The text the reward model scores: its chat template ("chat") or `template.format(...)`."""
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False)
    return template.format(prompt=prompt, response=response)


def load_tokenizer(source: str, where: str) -> Any:
    """The tokenizer of a transformers directory or a GGUF file; a failure names `where`."""
    from infalign_jax.models import gguf_import
    try:
        if os.path.isfile(source):
            return gguf_import.load_gguf_tokenizer(source)
        return hf_import.load_tokenizer(source)
    except Exception as e:  # transformers raises several types for a missing tokenizer
        raise ValueError(f"{where}: cannot load the tokenizer saved in {source!r} "
                         f"({type(e).__name__}: {e})") from e


@functools.lru_cache(maxsize=None)
def _scorer(cfg: models.ModelConfig):
    """The jitted reward forward of `cfg`, shared by every judge (and ensemble member) of it."""
    return jax.jit(lambda p, t, m: models.apply(p, t, cfg, attention_mask_BxT=m).reward)


class ModelJudge:
    """Scores (prompt, response) texts with the `("reward",)` head of a decoder given as
    (cfg, params, tokenizer): the rendered text (`template`) is encoded and scored in padded
    batches (see the module docstring).

    `template`: "auto" (the tokenizer's chat template when it has one, else `DEFAULT_TEMPLATE`),
    "chat", or a format string with `{prompt}` and `{response}`. A format string's text is
    encoded with the tokenizer's defaults (special tokens such as BOS included), as
    `tokenizer(text)` encodes it for transformers; a chat text as `apply_chat_template(...,
    tokenize=True)` does, without added special tokens (the template writes its own BOS: Llama 3,
    Gemma). Subclasses may encode otherwise (`encode`). `max_len` may not exceed the context of
    a model with learned positions.
    """

    def __init__(self, cfg: models.ModelConfig, params: Any, tokenizer: Any, *, name: str,
                 template: str = "auto", max_len: int = 512, batch_size: int = 16,
                 padding: str = "right", where: str = "reward", pad_id: int | None = None):
        if "reward" not in cfg.heads:
            raise ValueError(f"{where}: {name} has no reward head (heads {cfg.heads})")
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else DEFAULT_TEMPLATE
        elif template != "chat" and _template_fields(template) != {"prompt", "response"}:
            raise ValueError(f"{where}.template must be 'auto', 'chat' or a format string with "
                             f"the fields {{prompt}} and {{response}} (and no others), got "
                             f"{template!r}")
        if cfg.learned_positions and int(max_len) > cfg.max_len:
            raise ValueError(f"{where}.max_len={max_len} exceeds the {cfg.max_len} positions of "
                             f"{name} (learned positions): a longer text would fail mid-run; "
                             f"set it <= {cfg.max_len}")
        if padding not in PADDING_SIDES:
            raise ValueError(f"{where}.padding must be one of {PADDING_SIDES}, got {padding!r}")
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name
        self.params = jax.device_put(params)   # once, not at every call
        self.template, self.max_len, self.batch_size, self.padding = \
            template, int(max_len), int(batch_size), padding
        if pad_id is None:
            pad = tokenizer.pad_token_id
            pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.pad_id = int(pad_id)
        self.truncated = 0
        self._score = _scorer(cfg)

    @functools.cached_property
    def id(self) -> str:
        """Identifies the reward in reference tables: the model (its name and the digest of its
        parameters, so two checkpoints in folders of one name never share a table) and what
        changes the score."""
        return (f"{self.name}#{provenance.params_digest(self.params)[:16]}|max_len={self.max_len}"
                + self._template_id() + self._id_suffix())

    def _template_id(self) -> str:
        """The rendering, when it is not the default (tables scored under another template are
        not this reward's; an id without it is the default's, as tables before it recorded)."""
        if self.template == DEFAULT_TEMPLATE:
            return ""
        text = (getattr(self.tokenizer, "chat_template", None) or ""
                if self.template == "chat" else self.template)
        return f"|template={hashlib.sha256(f'{self.template}:{text}'.encode()).hexdigest()[:12]}"

    def _id_suffix(self) -> str:
        return ""

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of the rendered texts, cut on the left to `max_len` (cuts counted)."""
        rows = []
        # a chat template writes the special tokens itself (apply_chat_template(tokenize=True))
        specials = {"add_special_tokens": False} if self.template == "chat" else {}
        for p, r in zip(prompts, responses, strict=True):
            ids = [int(i) for i in self.tokenizer(render(self.tokenizer, self.template, p, r),
                                                  **specials)["input_ids"]]
            if len(ids) > self.max_len:
                self.truncated += 1
                ids = ids[-self.max_len:]
            rows.append(ids or [self.pad_id])
        return rows

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        rows = self.encode(prompts, responses)
        out = np.zeros((len(rows),), np.float32)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = _bucket(max(len(r) for r in chunk), self.max_len)
            filler = [[self.pad_id]] * (self.batch_size - len(chunk))   # one fixed shape
            tokens_BxT, mask_BxT = pad_rows(chunk + filler, width, self.pad_id,
                                            left=self.padding == "left")
            scores_B = self._score(self.params, jnp.asarray(tokens_BxT), jnp.asarray(mask_BxT))
            out[start:start + len(chunk)] = np.asarray(scores_B)[:len(chunk)]
        return out


class SequenceClassifierJudge(ModelJudge):
    """A one-label `...ForSequenceClassification` directory with its own tokenizer."""

    def __init__(self, directory: str, *, where: str = "reward", **kw: Any):
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise ValueError(f"{where}: {directory!r} is not a transformers directory "
                             f"(no config.json)")
        self.directory = directory
        cfg, params = hf_import.load_hf_checkpoint(directory)
        if "reward" not in cfg.heads:
            raise ValueError(f"{where}: {directory!r} is not a sequence-classification checkpoint "
                             f"(no score head; heads {cfg.heads})")
        super().__init__(cfg, params, load_tokenizer(directory, where), where=where,
                         name=f"hf:{os.path.basename(os.path.normpath(directory))}", **kw)
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            pad = json.load(f).get("pad_token_id")
        self.hf_pad_id = pad if isinstance(pad, int) else None

    def _id_suffix(self) -> str:
        # Tables scored before the score was read past trailing pad ids are not this reward's.
        return "" if self.hf_pad_id is None else f"|last_not_pad={self.hf_pad_id}"

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """As transformers reads a sequence classifier's score: at the last token whose id is not
        the checkpoint's `pad_token_id`. Many reward models pad with EOS, and a text ending in
        EOS is then scored at the token before it; the trailing pad ids are dropped here (by
        causal attention they cannot change the score at that token)."""
        rows = super().encode(prompts, responses)
        if self.hf_pad_id is None:
            return rows
        out = []
        for ids in rows:
            n = len(ids)
            while n > 1 and ids[n - 1] == self.hf_pad_id:
                n -= 1
            out.append(ids[:n])
        return out


class PairLayoutJudge(ModelJudge):
    """A reward model scored on text laid out as `train_reward.py` trained it: the prompt's ids
    (no special tokens, cut on the left to `max_prompt_len`) followed by the response's ids and
    `eos_id` (cut on the right to `max_response_len`), as `data.tokenize_preferences` packs a
    pair; a row with either part cut is counted in `truncated`."""

    def __init__(self, cfg: models.ModelConfig, params: Any, tokenizer: Any, *, name: str,
                 eos_id: int, pad_id: int, max_prompt_len: int, max_response_len: int,
                 batch_size: int = 16, padding: str = "right", where: str = "reward"):
        super().__init__(cfg, params, tokenizer, name=name, template=DEFAULT_TEMPLATE,
                         max_len=max_prompt_len + max_response_len, batch_size=batch_size,
                         padding=padding, where=where, pad_id=pad_id)
        self.eos_id, self.max_prompt_len, self.max_response_len = \
            int(eos_id), int(max_prompt_len), int(max_response_len)
        self._encode = as_encoder(tokenizer)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        rows = []
        for p, r in zip(prompts, responses, strict=True):
            prompt, response = self._encode(p), self._encode(r) + [self.eos_id]
            if len(prompt) > self.max_prompt_len or len(response) > self.max_response_len:
                self.truncated += 1
            rows.append(prompt[-self.max_prompt_len:] + response[:self.max_response_len])
        return rows


class EnsembleJudge:
    """mean - k * std (population std) of several judges' scores, one per (prompt, response)."""

    def __init__(self, members: Sequence[Any], k: float):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 reward models, got {len(members)}")
        if not (math.isfinite(float(k)) and float(k) >= 0):
            raise ValueError(f"an ensemble's std penalty k must be finite and >= 0, got {k}")
        self.members, self.k = list(members), float(k)
        self.name = "ensemble(" + ",".join(m.name for m in self.members) + f")-{self.k:g}std"

    @property
    def id(self) -> str:
        return "ensemble(" + ",".join(getattr(m, "id", m.name) for m in self.members) + \
            f")-{self.k:g}std"

    @property
    def truncated(self) -> int:
        """Texts cut by any member (each member sees every text; counted once per text only when
        the members share their length limits, as an ensemble run's do: the largest count)."""
        return max(int(getattr(m, "truncated", 0)) for m in self.members)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        scores_MxR = np.stack([np.asarray(m(prompts, responses), np.float32)
                               for m in self.members])
        return (scores_MxR.mean(0) - self.k * scores_MxR.std(0)).astype(np.float32)
