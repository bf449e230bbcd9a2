"""Readers (HH-RLHF, TL;DR, JSONL, prompts), their errors, and tokenisation/packing."""

import gzip
import json

import numpy as np
import pytest

from infalign_jax.data import (DataError, PreferenceExample, TokenizeConfig, as_encoder,
                               read_preferences, read_prompts, tokenize_preferences,
                               tokenize_prompts)
from infalign_jax.data.readers import PromptExample, SkipReport


def write_lines(path, lines, gz=False):
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


HH = [
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: Let me think.\n\nHuman: And?\n\nAssistant: 4",
     "rejected": "\n\nHuman: 2+2?\n\nAssistant: Let me think.\n\nHuman: And?\n\nAssistant: 5"},
]
HH_EXPECTED = [
    ("\n\nHuman: Hi there\n\nAssistant:", "Hello! How can I help?", "Go away."),
    ("\n\nHuman: 2+2?\n\nAssistant: Let me think.\n\nHuman: And?\n\nAssistant:", "4", "5"),
]


def tldr(choice=1, **info_overrides):
    info = {"id": "t3_abc", "post": "My cat sits on my laptop.", "title": "Cat help",
            "subreddit": "cats", **info_overrides}
    return {"info": info, "summaries": [{"text": " cat on laptop"}, {"text": " cat problem"}],
            "choice": choice}


@pytest.mark.parametrize("gz", [False, True])
def test_hh_parses_prompt_and_final_turns(tmp_path, gz):
    path = write_lines(tmp_path / ("hh.jsonl.gz" if gz else "hh.jsonl"), HH, gz)
    examples, report = read_preferences(path)           # auto-detected
    got = [(e.prompt, e.chosen, e.rejected) for e in examples]
    assert got == HH_EXPECTED
    assert [e.line for e in examples] == [1, 2] and examples[0].source == str(path)
    assert report.total == 0 and report.kept == 2


def test_hh_split_drops_only_the_space_after_the_marker(tmp_path):
    """A response's own leading whitespace (a second space, a newline) is part of it: the
    prompt, one space and the response rebuild each transcript."""
    row = {"chosen": "\n\nHuman: List?\n\nAssistant:  two spaces",
           "rejected": "\n\nHuman: List?\n\nAssistant: \n- a line"}
    (ex,), _ = read_preferences(write_lines(tmp_path / "hh.jsonl", [row]))
    assert (ex.chosen, ex.rejected) == (" two spaces", "\n- a line")
    assert ex.prompt + " " + ex.chosen == row["chosen"]
    assert ex.prompt + " " + ex.rejected == row["rejected"]


def test_tldr_prompt_template_and_choice(tmp_path):
    path = write_lines(tmp_path / "tldr.jsonl", [tldr(choice=1), tldr(choice=0)])
    examples, _ = read_preferences(path, format="tldr")
    prompt = "SUBREDDIT: r/cats\nTITLE: Cat help\nPOST: My cat sits on my laptop.\nTL;DR:"
    assert examples[0] == PreferenceExample(prompt, "cat problem", "cat on laptop", str(path), 1)
    assert (examples[1].chosen, examples[1].rejected) == ("cat on laptop", "cat problem")
    assert read_preferences(path)[0] == examples        # auto gives the same


def test_generic_jsonl_with_blank_lines(tmp_path):
    rows = [{"prompt": "Q1", "chosen": "a", "rejected": "b"}, "",
            {"prompt": "Q2", "chosen": " c ", "rejected": "d", "extra": 1}]
    path = write_lines(tmp_path / "pairs.jsonl", rows)
    examples, _ = read_preferences(path)
    assert [(e.prompt, e.chosen, e.rejected, e.line) for e in examples] == [
        ("Q1", "a", "b", 1), ("Q2", " c ", "d", 3)]


def test_prompts_default_and_explicit_ids(tmp_path):
    path = write_lines(tmp_path / "rl.jsonl.gz", [{"prompt": "p one"}, {"prompt": "p two",
                                                                        "id": 7}], gz=True)
    examples, _ = read_prompts(path)
    assert examples == [PromptExample("rl:1", "p one", str(path), 1),
                        PromptExample("7", "p two", str(path), 2)]


PAIR = {"prompt": "Q", "chosen": "a", "rejected": "b"}
BAD_PAIRS = [  # (format, bad record as written, reason)
    ("jsonl", '{"prompt": "Q", "chosen": "a", ', "malformed_json"),
    ("jsonl", "[1, 2]", "wrong_type"),
    ("jsonl", {"prompt": "Q", "chosen": "a"}, "missing_field"),
    ("jsonl", {"prompt": "Q", "chosen": "a", "rejected": 3}, "wrong_type"),
    ("jsonl", {"prompt": "Q", "chosen": "a", "rejected": "  "}, "empty_response"),
    ("jsonl", {"prompt": "", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ("jsonl", {"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical_responses"),
    ("hh", {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
     "mismatched_prefix"),
    ("hh", {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A only"},
     "missing_marker"),
    ("hh", {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A\n\nAssistant: "},
     "empty_response"),
    ("tldr", tldr(choice=2), "bad_choice"),
    ("tldr", tldr(choice=True), "wrong_type"),
    ("tldr", tldr(post=None), "wrong_type"),
    ("tldr", {"info": {"title": "t", "subreddit": "s"}, "summaries": [{"text": "a"},
                                                                       {"text": "b"}],
              "choice": 0}, "missing_field"),
    ("tldr", {**tldr(), "summaries": [{"text": "a"}]}, "wrong_type"),
]
GOOD = {"jsonl": PAIR, "hh": HH[0], "tldr": tldr()}


@pytest.mark.parametrize("fmt,bad,reason", BAD_PAIRS)
def test_bad_pair_names_file_line_reason(tmp_path, fmt, bad, reason):
    path = write_lines(tmp_path / "d.jsonl", [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]])
    with pytest.raises(DataError) as info:
        read_preferences(path, format=fmt)
    err = info.value
    assert (err.path, err.line, err.reason) == (str(path), 3, reason)
    assert str(err).startswith(f"{path}:3: ")
    # skip_bad keeps the three good records and counts the bad one
    examples, report = read_preferences(path, format=fmt, skip_bad=True)
    assert [e.line for e in examples] == [1, 2, 4]
    assert report.counts == {reason: 1} and report.total == 1 and report.kept == 3
    assert report.examples[0][:3] == (str(path), 3, reason) and reason in report.summary()


def test_missing_field_message_names_field_and_expectation(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl", [HH[0], {"chosen": HH[0]["chosen"]}])
    with pytest.raises(DataError, match=r"hh\.jsonl:2: field 'rejected' missing \(expected a "
                                        r"string\)"):
        read_preferences(path, format="hh")


def test_skip_report_counts_several_reasons(tmp_path):
    rows = ["{bad", PAIR, {"prompt": "Q", "chosen": "x", "rejected": "x"}, "{also bad",
            {"prompt": "Q", "chosen": "a"}, PAIR]
    path = write_lines(tmp_path / "d.jsonl", rows)
    examples, report = read_preferences(path, format="jsonl", skip_bad=True)
    assert [e.line for e in examples] == [2, 6]
    assert report.counts == {"malformed_json": 2, "identical_responses": 1, "missing_field": 1}
    assert report.total == 4 and [x[1] for x in report.examples] == [1, 3, 4, 5]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl") as info:
        read_preferences(tmp_path / "nope.jsonl")
    assert info.value.reason == "missing_file" and info.value.line is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError) as info:
        read_prompts(empty)
    assert info.value.reason == "empty_file"
    all_bad = write_lines(tmp_path / "bad.jsonl", ["{x", "{y"])
    with pytest.raises(DataError) as info:
        read_preferences(all_bad, format="jsonl", skip_bad=True)
    assert info.value.reason == "no_records" and "2 malformed_json" in str(info.value)
    corrupt = tmp_path / "c.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 50)[:40])
    with pytest.raises(DataError) as info:
        read_prompts(corrupt)
    # 40 bytes hold the 50 repeated lines but not the end of the stream: named as a cut file,
    # with the line it reached.
    assert info.value.reason == "truncated_file" and info.value.line == 51
    assert "50 lines read before the cut" in str(info.value)
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(b'{"prompt": "a"}\n')
    with pytest.raises(DataError, match="Not a gzipped file") as info:
        read_prompts(not_gzip)
    assert info.value.reason == "unreadable"


def test_auto_detect_reports_keys_it_saw(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"\['answer', 'question'\]") as info:
        read_preferences(path)
    assert (info.value.line, info.value.reason) == (1, "unknown_format")
    with pytest.raises(ValueError, match="format must be one of"):
        read_preferences(path, format="csv")


def test_prompt_errors(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b"},
                                              {"prompt": "c", "id": "x"}, {"prompt": " "},
                                              {"prompt": "d", "id": [1]}])
    with pytest.raises(DataError, match="already used on line 1") as info:
        read_prompts(path)
    assert (info.value.line, info.value.reason) == (3, "duplicate_id")
    examples, report = read_prompts(path, skip_bad=True)
    assert [e.prompt_id for e in examples] == ["x", "p:2"]
    assert report.counts == {"duplicate_id": 1, "empty_prompt": 1, "wrong_type": 1}


def test_a_key_written_twice_is_a_counted_bad_record(tmp_path):
    """json.loads keeps the last of two equal keys: a pair whose 'chosen' was written twice was
    read with the second value (here the worse answer: the label inverted), without a count."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Q1", "chosen": "good", "rejected": "bad", "chosen": "bad 2"}\n'
                    '{"prompt": "Q2", "chosen": "a", "rejected": "b", "meta": {"x": 1, "x": 2}}\n'
                    '{"prompt": "Q3", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:1: key 'chosen' appears twice") as e:
        read_preferences(path)
    assert e.value.reason == "duplicate_key"
    examples, report = read_preferences(path, skip_bad=True)
    assert [ex.line for ex in examples] == [3] and report.counts == {"duplicate_key": 2}
    prompts = write_lines(tmp_path / "p.jsonl", ['{"id": "a", "prompt": "one", "prompt": "two"}',
                                                 {"id": "b", "prompt": "three"}])
    examples, report = read_prompts(prompts, skip_bad=True)
    assert [e.prompt for e in examples] == ["three"] and report.counts == {"duplicate_key": 1}


def test_text_of_invisible_characters_only_is_empty(tmp_path):
    """A zero-width space, a byte-order mark, a soft hyphen or a word joiner survive
    `str.strip`: such a prompt or response was kept as text, and an id of "" as an id."""
    path = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "\u200b", "chosen": "A real answer.", "rejected": "\u200b\u2060"},
        {"prompt": "Say hi", "chosen": "\ufeff", "rejected": "hi"},
        {"prompt": "Say hi", "chosen": "hi", "rejected": " \u00ad\n"},
        {"prompt": "Say\u200bhi", "chosen": "hi\u00ad", "rejected": "hey"}])
    examples, report = read_preferences(path, skip_bad=True)
    assert [ex.line for ex in examples] == [4]   # visible text around them is kept as it is
    assert report.counts == {"empty_response": 3}
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "\ufeff\u200b"},
                                                 {"id": "", "prompt": "fine"},
                                                 {"id": "\u2060", "prompt": "fine too"},
                                                 {"id": "ok", "prompt": "kept"}])
    examples, report = read_prompts(prompts, skip_bad=True)
    assert [e.prompt_id for e in examples] == ["ok"]
    assert report.counts == {"empty_prompt": 1, "empty_id": 2}


# ---------------------------------------------------------------- tokenisation and packing
VOCAB = {w: i for i, w in enumerate("<pad> <eos> <bos> a b c d e f g h".split())}


def char_tokenizer(text):
    """One token per non-space character: an independent, hand-checkable encoder."""
    return [VOCAB[ch] for ch in text if ch != " "]


def pairs(*rows):
    return [PreferenceExample(p, c, r, "f.jsonl", i + 1) for i, (p, c, r) in enumerate(rows)]


def unpad(tokens, mask):
    return [list(t[m]) for t, m in zip(tokens, mask)]


def test_pack_pairs_shapes_padding_masks_and_roundtrip():
    cfg = TokenizeConfig(max_prompt_len=4, max_response_len=3, eos_id=1, pad_id=0)
    examples = pairs(("ab", "c", "de"), ("abcd", "ef", "g"))
    packed, report = tokenize_preferences(examples, char_tokenizer, cfg)
    assert packed.prompt_BxP.shape == (2, 4) and packed.chosen_BxL.shape == (2, 3)
    assert packed.prompt_BxP.dtype == np.int32 and packed.prompt_mask_BxP.dtype == bool
    # left-padded prompts, right-padded responses with EOS appended
    np.testing.assert_array_equal(packed.prompt_BxP, [[0, 0, 3, 4], [3, 4, 5, 6]])
    np.testing.assert_array_equal(packed.prompt_mask_BxP, [[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(packed.chosen_BxL, [[5, 1, 0], [7, 8, 1]])
    np.testing.assert_array_equal(packed.rejected_mask_BxL, [[1, 1, 1], [1, 1, 0]])
    for i, ex in enumerate(examples):
        assert unpad(packed.prompt_BxP, packed.prompt_mask_BxP)[i] == char_tokenizer(ex.prompt)
        assert unpad(packed.chosen_BxL, packed.chosen_mask_BxL)[i] == char_tokenizer(
            ex.chosen) + [1]
        assert unpad(packed.rejected_BxL, packed.rejected_mask_BxL)[i] == char_tokenizer(
            ex.rejected) + [1]
    assert list(packed.line_B) == [1, 2] and report.total == 0
    assert set(packed.as_dict()) == {"prompt_BxP", "prompt_mask_BxP", "chosen_BxL",
                                     "chosen_mask_BxL", "rejected_BxL", "rejected_mask_BxL",
                                     "line_B"}


def test_truncation_keeps_prompt_end_and_response_start():
    cfg = TokenizeConfig(max_prompt_len=2, max_response_len=3, eos_id=1, pad_id=0)
    packed, _ = tokenize_preferences(pairs(("abcd", "efgh", "ab")), char_tokenizer, cfg)
    np.testing.assert_array_equal(packed.prompt_BxP, [[VOCAB["c"], VOCAB["d"]]])
    np.testing.assert_array_equal(packed.chosen_BxL, [[7, 8, 9]])         # e f g, no EOS
    np.testing.assert_array_equal(packed.rejected_BxL, [[3, 4, 1]])       # a b <eos>


@pytest.mark.parametrize("row,reason,match", [
    (("abcde", "a", "b"), "too_long", "prompt has 5 tokens.*max_prompt_len=4"),
    (("a", "abc", "b"), "too_long", "'chosen' has 4 tokens including EOS.*max_response_len=3"),
    ((" ", "a", "b"), "empty_prompt", "empty after tokenisation"),
    (("a", "b", "  "), "empty_response", "'rejected' is empty"),
])
def test_pack_errors_name_file_line_and_counts(row, reason, match):
    cfg = TokenizeConfig(4, 3, prompt_truncation="error", response_truncation="error",
                         eos_id=1)
    examples = pairs(("a", "b", "c"), row)
    with pytest.raises(DataError, match=match) as info:
        tokenize_preferences(examples, char_tokenizer, cfg)
    assert (info.value.path, info.value.line, info.value.reason) == ("f.jsonl", 2, reason)
    packed, report = tokenize_preferences(examples, char_tokenizer, cfg, skip_bad=True)
    assert len(packed) == 1 and report.counts == {reason: 1}


def test_identical_after_truncation_is_an_error():
    cfg = TokenizeConfig(4, 2, eos_id=1)
    with pytest.raises(DataError, match="identical after tokenisation") as info:
        tokenize_preferences(pairs(("a", "abc", "abd")), char_tokenizer, cfg)
    assert info.value.reason == "identical_responses"


def test_tokenise_reports_keep_only_the_records_packed():
    """A record dropped by tokenisation (identical after the cut, an empty prompt) is not kept:
    `kept` is the number of rows packed, and read = kept + skipped."""
    cfg = TokenizeConfig(4, 2, eos_id=1)
    packed, report = tokenize_preferences(pairs(("a", "c", "d"), ("b", "abc", "abd"),
                                                ("e", "f", "g")), char_tokenizer, cfg,
                                          skip_bad=True)
    assert len(packed) == 2 and list(packed.line_B) == [1, 3]
    assert report.kept == 2 and report.counts == {"identical_responses": 1}
    assert report.as_dict()["read"] == 3
    prompts = [PromptExample(i, text, "p.jsonl", n + 1) for n, (i, text) in
               enumerate([("x", "ab"), ("y", " "), ("z", "c")])]
    packed, report = tokenize_prompts(prompts, char_tokenizer, cfg, skip_bad=True)
    assert packed.prompt_ids == ("x", "z") and report.kept == 2
    assert report.counts == {"empty_prompt": 1}


def test_skip_reports_of_files_side_by_side_add_up():
    """`plus` (the files of one split) keeps the records of both; `merge` (two stages) only
    those of the second."""
    a = SkipReport({"bad_json": 1}, kept=3, truncated={"prompt": 1})
    b = SkipReport({"bad_json": 2, "empty_prompt": 1}, kept=4, truncated={"prompt": 2})
    both = a.plus(b)
    assert both.kept == 7 and both.counts == {"bad_json": 3, "empty_prompt": 1}
    assert both.truncated == {"prompt": 3} and both.as_dict()["read"] == 11


def test_tokenize_prompts_and_no_eos():
    cfg = TokenizeConfig(3, 2, append_eos=False, pad_id=2)
    examples = [PromptExample("x", "ab", "p.jsonl", 1), PromptExample("y", "gh ab", "p.jsonl", 4)]
    packed, _ = tokenize_prompts(examples, char_tokenizer, cfg)
    np.testing.assert_array_equal(packed.prompt_BxP, [[2, 3, 4], [10, 3, 4]])
    np.testing.assert_array_equal(packed.prompt_mask_BxP, [[0, 1, 1], [1, 1, 1]])
    assert packed.prompt_ids == ("x", "y") and list(packed.line_B) == [1, 4]


def test_hf_tokenizer_without_special_tokens(tmp_path):
    import tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, "[PAD]": 3, "hello": 4, "world": 5, "cat": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    assert tok.encode("hello cat").ids == [1, 4, 6]     # the BOS the packer must not get
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                            pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for t in (hf, tok):
        assert as_encoder(t)("hello world cat") == [4, 5, 6]
    cfg = TokenizeConfig(3, 3, eos_id=hf.eos_token_id, pad_id=hf.pad_token_id)
    packed, _ = tokenize_preferences(pairs(("hello", "world", "cat dog")), hf, cfg)
    np.testing.assert_array_equal(packed.prompt_BxP, [[3, 3, 4]])
    np.testing.assert_array_equal(packed.rejected_BxL, [[6, 0, 2]])


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_prompt_len=0, max_response_len=2, eos_id=1), "max_prompt_len"),
    (dict(max_prompt_len=2, max_response_len=1.5, eos_id=1), "max_response_len"),
    (dict(max_prompt_len=2, max_response_len=2, prompt_truncation="right", eos_id=1),
     "prompt_truncation"),
    (dict(max_prompt_len=2, max_response_len=2, response_truncation="left", eos_id=1),
     "response_truncation"),
    (dict(max_prompt_len=2, max_response_len=2), "eos_id"),
    (dict(max_prompt_len=2, max_response_len=2, eos_id=1, pad_id=-1), "pad_id"),
])
def test_tokenize_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"TokenizeConfig.{field}"):
        TokenizeConfig(**kwargs)


def test_bad_tokenizer_output_is_a_type_error():
    with pytest.raises(TypeError, match="flat list of integer ids"):
        as_encoder(lambda s: [[1, 2]])("ab")
    with pytest.raises(TypeError, match="encode"):
        as_encoder(42)


def test_skip_reports_of_two_stages_add_up():
    # Reading kept 10 of 12 records, tokenising kept 9 of those 10: 9 survive, 3 were dropped.
    read = SkipReport({"bad_json": 2}, kept=10)
    tokenised = SkipReport({"prompt_too_long": 1}, kept=9)
    both = read.merge(tokenised)
    assert both.kept == 9 and both.counts == {"bad_json": 2, "prompt_too_long": 1}
    assert both.total + both.kept == 12


# ---------------------------------------------------------------- encodings (review 2)
def test_lone_surrogate_escape_is_a_counted_bad_encoding(tmp_path):
    # "\ud83d" alone is half of an emoji's surrogate pair: json.loads accepts it, but no
    # tokenizer can encode it. The whole pair "\ud83d\ude00" is one valid character.
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "fine \\ud83d\\ude00", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "cut emoji \\ud83d", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "q", "chosen": "a", "rejected": "b", "meta": [{"x": "\\udc00"}]}\n'
                    '{"prompt": "last", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'prompt' is not valid Unicode") as e:
        read_preferences(path)
    assert e.value.reason == "bad_encoding"
    examples, report = read_preferences(path, skip_bad=True)
    assert [ex.line for ex in examples] == [1, 4] and examples[0].prompt == "fine \U0001F600"
    assert report.counts == {"bad_encoding": 2} and "field 'meta[0].x'" in report.examples[1][3]
    packed, tok_report = tokenize_preferences(examples, lambda s: list(s.encode("utf-8")),
                                              TokenizeConfig(16, 4, eos_id=1), skip_bad=True)
    assert len(packed) == 2 and tok_report.total == 0


def test_tokenize_counts_text_that_is_not_unicode():
    # Examples built in code, not read from a file, can hold a lone surrogate too.
    cfg = TokenizeConfig(8, 4, eos_id=1)
    examples = pairs(("a", "b", "c"), ("a", "half \ud83d", "c"))
    with pytest.raises(DataError, match=r"f\.jsonl:2: chosen is not valid Unicode") as info:
        tokenize_preferences(examples, lambda s: list(s.encode("utf-8")), cfg)
    assert info.value.reason == "bad_encoding"
    packed, report = tokenize_preferences(examples, lambda s: list(s.encode("utf-8")), cfg,
                                          skip_bad=True)
    assert list(packed.line_B) == [1] and report.counts == {"bad_encoding": 1}
    prompts = [PromptExample("x", "ok", "p.jsonl", 1), PromptExample("y", "\udc00", "p.jsonl", 2)]
    packed, report = tokenize_prompts(prompts, lambda s: list(s.encode("utf-8")), cfg,
                                      skip_bad=True)
    assert packed.prompt_ids == ("x",) and report.counts == {"bad_encoding": 1}


@pytest.mark.parametrize("gz", [False, True])
def test_utf8_byte_order_mark_is_not_a_bad_record(tmp_path, gz):
    data = "\ufeff" + json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n"
    path = tmp_path / ("bom.jsonl.gz" if gz else "bom.jsonl")
    if gz:
        path.write_bytes(gzip.compress(data.encode("utf-8")))
    else:
        path.write_text(data, encoding="utf-8")
    examples, report = read_preferences(path)
    assert [ex.line for ex in examples] == [1, 2] and report.total == 0
    assert examples[0].prompt == PAIR["prompt"]
    prompts, _ = read_prompts(write_lines(tmp_path / "p.jsonl", ["\ufeff" + json.dumps(
        {"prompt": "hi", "id": "a"})]))
    assert [(p.prompt_id, p.prompt) for p in prompts] == [("a", "hi")]


def test_hh_dialogues_that_differ_before_the_last_turn_are_refused(tmp_path):
    # The two transcripts share only the first exchange: splitting at the last shared
    # Assistant marker would train on responses holding whole Human turns.
    rows = [HH[0],
            {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: follow-up one\n\nAssistant: X",
             "rejected": "\n\nHuman: q\n\nAssistant: a\n\nHuman: other question\n\nAssistant: Y"},
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected":
             "\n\nHuman: q\n\nAssistant: b\n\nHuman: more?\n\nAssistant: c"},
            HH[1]]
    path = write_lines(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=r"hh\.jsonl:2: 'chosen' and 'rejected' differ before "
                                        r"their last Assistant turn") as info:
        read_preferences(path, format="hh")
    assert info.value.reason == "mismatched_prefix"
    examples, report = read_preferences(path, skip_bad=True)
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == HH_EXPECTED
    assert report.counts == {"mismatched_prefix": 2} and "'rejected' has a" in report.examples[1][3]


def test_hh_transcripts_ending_in_a_human_turn_are_refused(tmp_path):
    """With both prompts equal, a transcript whose last turn is a Human one was kept with that
    turn inside its "response" ('hello there\\n\\nHuman: thanks, bye'): the reward model learnt
    to prefer responses holding a Human turn. Refused, and counted under skip_bad."""
    rows = [HH[0],
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: thanks, bye",
             "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: q\n\nAssistant: a1\n\nHuman: ok",
             "rejected": "\n\nHuman: q\n\nAssistant: a2\n\nHuman: ok"},
            HH[1]]
    path = write_lines(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=r"hh\.jsonl:2: 'chosen' ends with a '\\n\\nHuman:' "
                                        r"turn after its last Assistant turn") as info:
        read_preferences(path, format="hh")
    assert info.value.reason == "human_turn_in_response"
    examples, report = read_preferences(path, skip_bad=True)
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == HH_EXPECTED
    assert report.counts == {"human_turn_in_response": 2}
