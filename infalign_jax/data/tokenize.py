"""Tokenisation and packing of prompts and preference pairs into fixed-shape numpy arrays.

Layout (the convention of `infalign_jax.decoding.sampling`): prompts are LEFT-padded so every prompt ends
at column P-1 and generation continues from there; responses are RIGHT-padded. Shapes are the
configured limits, not the longest example, so every dataset packs to the same shapes and a
jitted step compiles once.

Truncation: prompts lose tokens on the left (the end of a dialogue, with its "Assistant:" cue,
is what conditions the response); responses lose tokens on the right. EOS is appended before
truncating, so a truncated response carries no EOS: it did not end. Every cut is counted in the
returned `SkipReport.truncated` (per part: prompt, chosen, rejected).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from infalign_jax.data.readers import DataError, PreferenceExample, PromptExample, SkipReport
from infalign_jax.infra import validate as check

Encoder = Callable[[str], list[int]]


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Length limits (in tokens; the response limit counts the appended EOS) and special ids."""

    max_prompt_len: int
    max_response_len: int
    prompt_truncation: str = "left"      # "left" | "error"
    response_truncation: str = "right"   # "right" | "error"
    append_eos: bool = True
    eos_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        check.ints(self, ("max_prompt_len", "max_response_len"))
        check.choice(self, "prompt_truncation", ("left", "error"))
        check.choice(self, "response_truncation", ("right", "error"))
        check.bools(self, ("append_eos",))
        if self.append_eos and self.eos_id is None:
            check.fail(self, "eos_id", "set when append_eos=True")
        check.ints(self, ("eos_id",), low=0, optional=True)
        check.ints(self, ("pad_id",), low=0)


@dataclasses.dataclass(frozen=True)
class PackedPrompts:
    prompt_BxP: np.ndarray        # int32, left-padded with pad_id
    prompt_mask_BxP: np.ndarray   # bool, True on real tokens
    line_B: np.ndarray            # int32 source line of each example
    prompt_ids: tuple[str, ...]
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return self.prompt_BxP.shape[0]

    def as_dict(self) -> dict[str, np.ndarray]:
        """The numeric arrays, for `pipeline.make_loader` (ids/sources: index with the rows)."""
        return {"prompt_BxP": self.prompt_BxP, "prompt_mask_BxP": self.prompt_mask_BxP,
                "line_B": self.line_B}


@dataclasses.dataclass(frozen=True)
class PackedPairs:
    prompt_BxP: np.ndarray
    prompt_mask_BxP: np.ndarray
    chosen_BxL: np.ndarray        # int32, right-padded with pad_id
    chosen_mask_BxL: np.ndarray
    rejected_BxL: np.ndarray
    rejected_mask_BxL: np.ndarray
    line_B: np.ndarray
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return self.prompt_BxP.shape[0]

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "sources"}


def as_encoder(tokenizer: Any) -> Encoder:
    """text -> token ids from a tokenizer object with `encode` or a plain callable.

    Hugging Face tokenizers get `add_special_tokens=False`: BOS/EOS placement is the packer's
    job, and a BOS in the middle of [prompt | response] would corrupt the sequence.
    `tokenizers.Tokenizer.encode` returns an `Encoding`; its `.ids` are used.
    """
    fn = getattr(tokenizer, "encode", None)
    if fn is None:
        if not callable(tokenizer):
            raise TypeError("tokenizer must have an encode(text) method or be callable, got "
                            f"{type(tokenizer).__name__}")
        fn = tokenizer
    try:
        params = inspect.signature(fn).parameters
        special_kw = "add_special_tokens" in params
    except (TypeError, ValueError):  # builtins without a signature
        special_kw = False

    def encode(text: str) -> list[int]:
        out = fn(text, add_special_tokens=False) if special_kw else fn(text)
        out = getattr(out, "ids", out)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        ids = np.asarray(out)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"tokenizer returned {type(out).__name__} of shape {ids.shape} "
                            "(expected a flat list of integer ids)")
        return [int(i) for i in ids]

    return encode


def _valid(text: str, part: str, source: str, line: int) -> str:
    """`text`, or a counted "bad_encoding" error for a string UTF-8 cannot hold (a lone
    surrogate: examples built outside `data.readers`); tokenizers would raise an uncounted
    UnicodeEncodeError or TypeError on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(source, line, "bad_encoding", f"{part} is not valid Unicode ({e.reason} "
                        f"at character {e.start}; expected UTF-8 text)") from None
    return text


def _pack_prompt(ids: list[int], cfg: TokenizeConfig, source: str, line: int
                 ) -> tuple[list[int], bool]:
    """(ids, whether they were cut to max_prompt_len)."""
    if not ids:
        raise DataError(source, line, "empty_prompt",
                        "prompt is empty after tokenisation (expected at least one token)")
    if len(ids) > cfg.max_prompt_len:
        if cfg.prompt_truncation == "error":
            raise DataError(source, line, "too_long", f"prompt has {len(ids)} tokens (limit "
                            f"max_prompt_len={cfg.max_prompt_len})")
        return ids[-cfg.max_prompt_len:], True
    return ids, False


def _pack_response(ids: list[int], name: str, cfg: TokenizeConfig, source: str, line: int
                   ) -> tuple[list[int], bool]:
    """(ids with EOS appended, whether they were cut to max_response_len)."""
    if not ids:
        raise DataError(source, line, "empty_response", f"response {name!r} is empty after "
                        "tokenisation (expected at least one token)")
    if cfg.append_eos:
        ids = ids + [cfg.eos_id]
    if len(ids) > cfg.max_response_len:
        if cfg.response_truncation == "error":
            eos = " including EOS" if cfg.append_eos else ""
            raise DataError(source, line, "too_long", f"response {name!r} has {len(ids)} tokens"
                            f"{eos} (limit max_response_len={cfg.max_response_len})")
        return ids[: cfg.max_response_len], True
    return ids, False


def pad_rows(rows: Sequence[list[int]], width: int, pad_id: int, left: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """(int32 tokens, bool mask) of `rows` padded to `width`, on the left or on the right."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, ids in enumerate(rows):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        tokens[i, cols] = ids
        mask[i, cols] = True
    return tokens, mask


def _no_records(examples: Sequence, report: SkipReport) -> DataError:
    source = examples[0].source if examples else "<no examples>"
    return DataError(source, None, "no_records", "no examples survived tokenisation (expected "
                     f"at least one); {report.summary()}")


def _pack_each(examples: Sequence[Any], pack: Callable[[Any], tuple[tuple, tuple[str, ...]]],
               skip_bad: bool) -> tuple[list[tuple], SkipReport]:
    """[(example, *rows)] for the examples that pack (`pack(ex) -> (rows, parts cut)`, the cut
    parts counted in the report's `truncated`); a bad one (DataError) is raised, or with
    `skip_bad` counted in the report and dropped. No record left is an error."""
    report, kept = SkipReport(), []
    for ex in examples:
        try:
            rows, cut = pack(ex)
        except DataError as err:
            if not skip_bad:
                raise
            report.add(err)
            continue
        kept.append((ex, *rows))
        for part in cut:
            report.add_truncated(part)
    report.kept = len(kept)
    if not kept:
        raise _no_records(examples, report)
    return kept, report


def tokenize_prompts(examples: Sequence[PromptExample], tokenizer: Any, cfg: TokenizeConfig, *,
                     skip_bad: bool = False) -> tuple[PackedPrompts, SkipReport]:
    encode = as_encoder(tokenizer)

    def pack(ex: PromptExample) -> tuple[tuple, tuple[str, ...]]:
        ids, cut = _pack_prompt(encode(_valid(ex.prompt, "prompt", ex.source, ex.line)), cfg,
                                ex.source, ex.line)
        return (ids,), ("prompt",) * cut

    kept, report = _pack_each(examples, pack, skip_bad)
    prompt, prompt_mask = pad_rows([ids for _, ids in kept], cfg.max_prompt_len, cfg.pad_id, True)
    return PackedPrompts(prompt, prompt_mask, np.array([ex.line for ex, _ in kept], np.int32),
                         tuple(ex.prompt_id for ex, _ in kept),
                         tuple(ex.source for ex, _ in kept)), report


def tokenize_preferences(examples: Sequence[PreferenceExample], tokenizer: Any,
                         cfg: TokenizeConfig, *, skip_bad: bool = False
                         ) -> tuple[PackedPairs, SkipReport]:
    encode = as_encoder(tokenizer)

    def pack(ex: PreferenceExample) -> tuple[tuple, tuple[str, ...]]:
        tokens = {part: encode(_valid(getattr(ex, part), part, ex.source, ex.line))
                  for part in ("prompt", "chosen", "rejected")}
        packed = {"prompt": _pack_prompt(tokens["prompt"], cfg, ex.source, ex.line),
                  "chosen": _pack_response(tokens["chosen"], "chosen", cfg, ex.source, ex.line),
                  "rejected": _pack_response(tokens["rejected"], "rejected", cfg, ex.source,
                                             ex.line)}
        if packed["chosen"][0] == packed["rejected"][0]:
            # Truncation can make two different texts identical; such a pair carries no
            # preference signal, so it is an error like an identical pair in the file.
            raise DataError(ex.source, ex.line, "identical_responses", "chosen and rejected "
                            f"are identical after tokenisation and truncation to "
                            f"max_response_len={cfg.max_response_len} tokens")
        return (tuple(ids for ids, _ in packed.values()),
                tuple(part for part, (_, cut) in packed.items() if cut))

    kept, report = _pack_each(examples, pack, skip_bad)
    prompt, prompt_mask = pad_rows([k[1] for k in kept], cfg.max_prompt_len, cfg.pad_id, True)
    chosen, chosen_mask = pad_rows([k[2] for k in kept], cfg.max_response_len, cfg.pad_id, False)
    rejected, rejected_mask = pad_rows([k[3] for k in kept], cfg.max_response_len, cfg.pad_id, False)
    return PackedPairs(prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask,
                       np.array([k[0].line for k in kept], np.int32),
                       tuple(k[0].source for k in kept)), report


# ------------------------------------------------ Hugging Face chat tokenizers (SmolLM2)
# The end-of-turn token of each chat format, in the order they are looked for: ChatML (SmolLM2,
# Qwen), Llama 3, Gemma, Phi-3. A chat response ends there, not at the tokenizer's end of text.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos_id, pad_id): the first END_OF_TURN_TOKENS entry the tokenizer knows ends a response,
    else its EOS token; pad falls back to that id."""
    eos_id = None
    for token in END_OF_TURN_TOKENS:
        got = tokenizer.convert_tokens_to_ids(token)
        if got is not None and got != tokenizer.unk_token_id:
            eos_id = got
            break
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no end-of-turn token (none of "
                         f"{', '.join(END_OF_TURN_TOKENS)}) and no EOS token: a response could "
                         f"not end")
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
