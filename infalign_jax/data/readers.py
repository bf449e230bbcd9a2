"""Readers for preference pairs and RL prompts stored as JSON lines (`.jsonl` or `.jsonl.gz`).

Formats:
* Anthropic HH-RLHF (Bai et al. 2022): `{"chosen": transcript, "rejected": transcript}`, each
  transcript a "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue. The prompt is the shared prefix
  up to and including the final "\\n\\nAssistant:"; the responses are the final assistant turns.
  A response that itself contains "\\n\\nAssistant:" is kept: the prompt then ends at the last
  marker the two transcripts share, and the pair is refused ("mismatched_prefix") when a
  "\\n\\nHuman:" turn follows that marker (the two dialogues differ before their last turn);
  a transcript whose last turn is a Human one is refused too ("human_turn_in_response").
* TL;DR comparisons (Stiennon et al. 2020, summarize-from-feedback): `{"info": {"post", "title",
  "subreddit", ...}, "summaries": [{"text"}, {"text"}], "choice": 0|1}`.
* generic `{"prompt", "chosen", "rejected"}`.
* prompts only, for RL: `{"prompt"}` with an optional `"id"`.

Nothing is dropped silently: the first bad record raises `DataError` naming file, line and what
was expected, or, with `skip_bad=True`, is counted in a `SkipReport`. Blank lines are not records
and are ignored; a UTF-8 byte-order mark before a line (Windows editors write one) is ignored. A
string that is not valid Unicode (a lone surrogate escape such as "\\ud83d", half an emoji) is
a bad record ("bad_encoding"): no tokenizer can encode it. An object with a key written twice is
a bad record ("duplicate_key": JSON readers differ on which value wins, so the record is
ambiguous). Text made only of whitespace and invisible format characters (zero-width space,
byte-order mark, soft hyphen, word joiner: Unicode category Cf) is empty. A Git LFS pointer in
place of the data is named as such; a `.gz` file cut short names the line reached (with
`skip_bad`, the records before the cut are kept and the cut counted).
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import os
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

HH_MARKER = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
FORMATS = ("auto", "hh", "tldr", "jsonl")


class DataError(ValueError):
    """Bad input data: `str(err)` is "path:line: what is wrong (what was expected)"."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str, detail: str):
        self.path, self.line, self.reason, self.detail = str(path), line, reason, detail
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {detail}")

    def __reduce__(self):  # exceptions with custom __init__ need this to pickle (worker processes)
        return (DataError, (self.path, self.line, self.reason, self.detail))


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    source: str
    line: int


@dataclasses.dataclass(frozen=True)
class PromptExample:
    prompt_id: str
    prompt: str
    source: str
    line: int


@dataclasses.dataclass
class SkipReport:
    """What was skipped and why: counts per reason plus the first `max_examples` errors; and
    what was kept but cut short (`truncated`: records per part cut at its length limit, e.g.
    {"prompt": 3, "chosen": 1})."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[tuple[str, int | None, str, str]] = dataclasses.field(default_factory=list)
    kept: int = 0
    max_examples: int = 5
    truncated: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, err: DataError) -> None:
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append((err.path, err.line, err.reason, str(err)))

    def add_truncated(self, part: str) -> None:
        self.truncated[part] = self.truncated.get(part, 0) + 1

    def merge(self, other: "SkipReport") -> "SkipReport":
        """This stage followed by `other` (e.g. reading, then tokenising the records read): the
        skips and truncations of both, and the records `other` kept (they passed both stages)."""
        out = SkipReport(dict(self.counts), list(self.examples), other.kept, self.max_examples,
                         dict(self.truncated))
        for reason, count in other.counts.items():
            out.counts[reason] = out.counts.get(reason, 0) + count
        for part, count in other.truncated.items():
            out.truncated[part] = out.truncated.get(part, 0) + count
        out.examples = (out.examples + other.examples)[: self.max_examples]
        return out

    def plus(self, other: "SkipReport") -> "SkipReport":
        """This report and `other` of sources read side by side (the files of one split): the
        skips, truncations and kept records of both."""
        out = self.merge(other)
        out.kept = self.kept + other.kept
        return out

    def as_dict(self) -> dict[str, Any]:
        """For a run's summary: records read, kept (what reaches training), skipped per reason
        and in total, and the kept records cut at a length limit, per part."""
        return {"read": self.kept + self.total, "kept": self.kept, "skipped": dict(self.counts),
                "skipped_total": self.total, "truncated": dict(self.truncated)}

    def summary(self) -> str:
        cut = ""
        if self.truncated:
            cut = " (cut at the length limit: " + ", ".join(
                f"{n} {part}" for part, n in sorted(self.truncated.items())) + ")"
        if not self.total:
            return f"kept {self.kept} records{cut}, skipped none"
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
        return (f"kept {self.kept} records{cut}, skipped {self.total} ({reasons}); "
                f"first: {self.examples[0][3]}")


def _handle(err: DataError, skip_bad: bool, report: SkipReport) -> None:
    if not skip_bad:
        raise err
    report.add(err)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


LFS_POINTER = b"version https://git-lfs.github.com/spec"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line, raw bytes) of every line. A compressed stream that ends early raises
    `_Cut(lines read)` after the last complete line (a partial line is part of the cut)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    done, pending = 0, None   # each line waits for the next: only then is it known complete
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if pending is not None:
                    yield pending
                    done = pending[0]
                pending = (lineno, raw)
    except (EOFError, zlib.error) as e:
        if pending is not None and pending[1].endswith(b"\n"):
            yield pending
            done = pending[0]
        raise _Cut(done, e) from e
    if pending is not None:
        yield pending


class _Cut(Exception):
    def __init__(self, lines: int, cause: BaseException):
        self.lines, self.cause = lines, cause


def _check_not_lfs_pointer(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise DataError(path, None, "lfs_pointer", "is a Git LFS pointer file, not the data "
                        "(fetch the file with `git lfs pull`)")


def _records(path: Path, skip_bad: bool, report: SkipReport) -> Iterator[tuple[int, dict]]:
    """(1-based line, JSON object) for every non-blank line; bad lines raise or are counted.

    A compressed file cut short (a partial download) raises naming the line reached, or with
    `skip_bad` keeps the records before the cut and counts the cut ("truncated_file")."""
    if not path.is_file():
        raise DataError(path, None, "missing_file", "file not found (expected a .jsonl or "
                        ".jsonl.gz file)")
    seen_any = False
    try:
        _check_not_lfs_pointer(path)
        for lineno, raw in _lines(path):
            if raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            seen_any = True
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _handle(DataError(path, lineno, "bad_encoding",
                                  f"line is not valid UTF-8 ({e.reason})"), skip_bad, report)
                continue
            try:
                obj = json.loads(text, object_pairs_hook=_object_without_repeats)
            except _RepeatedKey as e:
                _handle(DataError(path, lineno, "duplicate_key",
                                  f"key {e.args[0]!r} appears twice in one object (expected each "
                                  f"key once: which value counts is ambiguous)"), skip_bad, report)
                continue
            except json.JSONDecodeError as e:
                _handle(DataError(path, lineno, "malformed_json",
                                  f"malformed JSON ({_json_problem(e)}); expected one JSON "
                                  "object per line"), skip_bad, report)
                continue
            if not isinstance(obj, dict):
                _handle(DataError(path, lineno, "wrong_type", "expected a JSON object, got "
                                  f"{type(obj).__name__}"), skip_bad, report)
                continue
            bad = _not_unicode(obj) if "\\u" in text else None   # only escapes make surrogates
            if bad is not None:
                _handle(DataError(path, lineno, "bad_encoding", f"{bad} is not valid Unicode "
                                  "(a lone surrogate escape such as \"\\ud83d\", e.g. an emoji "
                                  "cut in half; expected UTF-8 text)"), skip_bad, report)
                continue
            yield lineno, obj
    except _Cut as cut:
        seen_any = True
        _handle(DataError(path, cut.lines + 1, "truncated_file",
                          f"compressed file ends early (truncated: {_first(cut.cause)}); "
                          f"{cut.lines} lines read before the cut"), skip_bad, report)
    except OSError as e:  # not gzip data, unreadable file
        raise DataError(path, None, "unreadable", f"cannot read file: {e}") from e
    if not seen_any:
        raise DataError(path, None, "empty_file", "file holds no records (expected JSON lines)")


class _RepeatedKey(ValueError):
    """A JSON object with a key written twice (`json.loads` keeps the last value silently)."""


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _RepeatedKey(key)
        obj[key] = value
    return obj


def blank(text: str) -> bool:
    """Whether `text` holds nothing visible: only whitespace and Unicode format characters
    (category Cf: zero-width space, byte-order mark, soft hyphen, word joiner, ...), which
    `str.strip` keeps."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


def prompt_key(text: str) -> str:
    """What makes two prompt texts one prompt: equal after Unicode NFC normalisation, with runs
    of whitespace made one space, the ends stripped, and case folded ("Café? " and "cafe\u0301?"
    are one prompt), so that a training prompt cannot return as an evaluation prompt in another
    spelling (`sources.split_prompts`, `prompt_sets.split`)."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def _not_unicode(value: Any, where: str = "") -> str | None:
    """Where the first string that UTF-8 cannot encode sits in a JSON value ("field 'a.b[0]'"),
    or None. `json.loads` accepts lone surrogate escapes; every tokenizer then fails on them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"field {where!r}" if where else "a string"
        return None
    if isinstance(value, list):
        items = ((f"{where}[{k}]", item) for k, item in enumerate(value))
    elif isinstance(value, dict):
        for key in value:
            if _not_unicode(key) is not None:
                return f"a key of {f'field {where!r}' if where else 'the record'}"
        items = ((f"{where}.{key}" if where else key, item) for key, item in value.items())
    else:
        return None
    for name, item in items:
        bad = _not_unicode(item, name)
        if bad is not None:
            return bad
    return None


def _json_problem(e: json.JSONDecodeError) -> str:
    """The decoder's message with the column, e.g. "Unterminated string starting at column 12"
    (some of its messages end in "at" already: "at at" is not written)."""
    msg = e.msg if e.msg.endswith(" at") else f"{e.msg} at"
    return f"{msg} column {e.pos + 1}"


def _first(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _field(obj: dict, key: str, kind: type, path: Path, line: int, where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in obj:
        raise DataError(path, line, "missing_field",
                        f"field {name!r} missing (expected {_kind_name(kind)})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(path, line, "wrong_type", f"field {name!r} is "
                        f"{type(value).__name__} (expected {_kind_name(kind)})")
    return value


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", dict: "an object", list: "a list", int: "an integer"}
    return names.get(kind, "a value")


def _strip_leading_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def _check_pair(prompt: str, chosen: str, rejected: str, path: Path, line: int
                ) -> PreferenceExample:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if blank(text):
            raise DataError(path, line, "empty_response",
                            f"response {name!r} is empty (expected non-blank text)")
    if blank(prompt):
        raise DataError(path, line, "empty_prompt", "prompt is empty (expected non-blank text)")
    if chosen == rejected:
        raise DataError(path, line, "identical_responses",
                        "chosen and rejected responses are identical (expected two different "
                        "responses)")
    return PreferenceExample(prompt, chosen, rejected, str(path), line)


def _split_hh(transcript: str, name: str, path: Path, line: int) -> tuple[str, str]:
    cut = transcript.rfind(HH_MARKER)
    if cut < 0:
        raise DataError(path, line, "missing_marker", f"field {name!r} has no {HH_MARKER!r} turn "
                        "(expected an HH-RLHF transcript)")
    cut += len(HH_MARKER)
    return transcript[:cut], _strip_leading_space(transcript[cut:])


def _shared_prompt_end(chosen: str, rejected: str) -> int:
    """Where the prompt of an HH pair ends: after the last Assistant marker inside the shared
    prefix of the two transcripts (-1 if none). A response may itself contain role markers
    ("\n\nAssistant:"), so the last marker of each transcript is not always the prompt's."""
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_MARKER, 0, shared)
    return cut + len(HH_MARKER) if cut >= 0 else -1


def _parse_hh(obj: dict, path: Path, line: int) -> PreferenceExample:
    chosen_t = _field(obj, "chosen", str, path, line)
    rejected_t = _field(obj, "rejected", str, path, line)
    prompt, chosen = _split_hh(chosen_t, "chosen", path, line)
    prompt_r, rejected = _split_hh(rejected_t, "rejected", path, line)
    two_dialogues = prompt != prompt_r
    if two_dialogues:   # a role marker inside a response: split at the shared prefix
        cut = _shared_prompt_end(chosen_t, rejected_t)
        if cut < 0:
            raise DataError(path, line, "mismatched_prefix", "'chosen' and 'rejected' share no "
                            "dialogue up to an Assistant turn (expected a shared dialogue prefix)")
        prompt = chosen_t[:cut]
        chosen = _strip_leading_space(chosen_t[cut:])
        rejected = _strip_leading_space(rejected_t[cut:])
    # A response may hold an Assistant marker, but not a Human turn: after a shared prefix it
    # means the dialogues differ before their last turn (no single prompt fits both); in one
    # dialogue, that the transcript goes on past its last Assistant turn.
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_HUMAN in text and two_dialogues:
            raise DataError(path, line, "mismatched_prefix", f"'chosen' and 'rejected' "
                            f"differ before their last Assistant turn ({name!r} has a "
                            f"{HH_HUMAN!r} turn after the shared dialogue; expected the "
                            "same dialogue up to the final responses)")
        if HH_HUMAN in text:
            raise DataError(path, line, "human_turn_in_response", f"{name!r} ends with a "
                            f"{HH_HUMAN!r} turn after its last Assistant turn (expected the "
                            "transcript to end with the Assistant's response)")
    return _check_pair(prompt, chosen, rejected, path, line)


def _parse_tldr(obj: dict, path: Path, line: int) -> PreferenceExample:
    info = _field(obj, "info", dict, path, line)
    parts = {key: _field(info, key, str, path, line, "info.")
             for key in ("subreddit", "title", "post")}
    summaries = _field(obj, "summaries", list, path, line)
    if len(summaries) != 2:
        raise DataError(path, line, "wrong_type", f"field 'summaries' has {len(summaries)} "
                        "entries (expected exactly 2)")
    texts = []
    for k, summary in enumerate(summaries):
        if not isinstance(summary, dict):
            raise DataError(path, line, "wrong_type", f"field 'summaries[{k}]' is "
                            f"{type(summary).__name__} (expected an object)")
        texts.append(_strip_leading_space(_field(summary, "text", str, path, line,
                                                 f"summaries[{k}].")))
    choice = _field(obj, "choice", int, path, line)
    if choice not in (0, 1):
        raise DataError(path, line, "bad_choice", f"field 'choice' is {choice} (expected 0 or 1)")
    return _check_pair(TLDR_TEMPLATE.format(**parts), texts[choice], texts[1 - choice], path, line)


def _parse_jsonl(obj: dict, path: Path, line: int) -> PreferenceExample:
    prompt, chosen, rejected = (_field(obj, key, str, path, line)
                                for key in ("prompt", "chosen", "rejected"))
    return _check_pair(prompt, chosen, rejected, path, line)


_PARSERS: dict[str, Callable[[dict, Path, int], PreferenceExample]] = {
    "hh": _parse_hh, "tldr": _parse_tldr, "jsonl": _parse_jsonl}


def detect_format(obj: dict) -> str | None:
    """The preference format a record's keys indicate, or None."""
    keys = set(obj)
    if {"info", "summaries"} <= keys:
        return "tldr"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "jsonl"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    return None


def first_record(path: str | os.PathLike) -> tuple[int, dict]:
    """(line, JSON object) of a file's first record, for deciding what kind of file it is; a
    bad first record or file raises as the readers do."""
    records = _records(Path(path), False, SkipReport())
    try:
        return next(records)
    finally:
        records.close()


def read_preferences(path: str | os.PathLike, format: str = "auto", *, skip_bad: bool = False
                     ) -> tuple[list[PreferenceExample], SkipReport]:
    """Reads preference pairs; `format="auto"` decides from the first JSON object's keys."""
    if format not in FORMATS:
        raise ValueError(f"read_preferences: format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    report, out = SkipReport(), []
    for line, obj in _records(path, skip_bad, report):
        if format == "auto":
            format = detect_format(obj) or "auto"
            if format == "auto":
                raise DataError(path, line, "unknown_format", f"cannot detect the format from "
                                f"keys {sorted(obj)} (expected 'chosen'+'rejected' for HH-RLHF, "
                                "'prompt'+'chosen'+'rejected' for JSONL, or 'info'+'summaries'+"
                                "'choice' for TL;DR)")
        try:
            out.append(_PARSERS[format](obj, path, line))
        except DataError as err:
            _handle(err, skip_bad, report)
    return _finish(out, report, path)


def read_prompts(path: str | os.PathLike, *, skip_bad: bool = False
                 ) -> tuple[list[PromptExample], SkipReport]:
    """Reads `{"prompt", "id"?}` lines; the default id is "<file stem>:<line>"."""
    path = Path(path)
    report, out, first_line = SkipReport(), [], {}
    for line, obj in _records(path, skip_bad, report):
        try:
            prompt = _field(obj, "prompt", str, path, line)
            if blank(prompt):
                raise DataError(path, line, "empty_prompt",
                                "prompt is empty (expected non-blank text)")
            prompt_id = obj.get("id", f"{_stem(path)}:{line}")
            if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
                raise DataError(path, line, "wrong_type", f"field 'id' is "
                                f"{type(prompt_id).__name__} (expected a string or integer)")
            prompt_id = str(prompt_id)
            if blank(prompt_id):
                raise DataError(path, line, "empty_id", f"field 'id' is {prompt_id!r} (expected "
                                f"a non-blank id, or no 'id' for the default)")
            if prompt_id in first_line:
                raise DataError(path, line, "duplicate_id", f"prompt id {prompt_id!r} already "
                                f"used on line {first_line[prompt_id]} (expected unique ids)")
            first_line[prompt_id] = line
            out.append(PromptExample(prompt_id, prompt, str(path), line))
        except DataError as err:
            _handle(err, skip_bad, report)
    return _finish(out, report, path)


def _finish(out: list, report: SkipReport, path: Path) -> tuple[list, SkipReport]:
    report.kept = len(out)
    if not out:
        raise DataError(path, None, "no_records",
                        f"no usable records (expected at least one); {report.summary()}")
    return out, report
