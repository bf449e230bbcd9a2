"""TFDS builder over array_record: records and packed arrays equal the default reader+packer.

Tests that build or read need the optional `tfds` extra (tensorflow-datasets, array-record) and
are skipped without it; the configuration and missing-extra tests run everywhere.
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from infalign_jax.data import (DataError, LoaderConfig, TokenizeConfig, make_loader,
                               read_preferences, tokenize_preferences)
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.data.tfds_builder import (PackedPairsSource, TfdsConfig, build_tfds,
                                            dataset_dir, load_as_packed, read_tfds_examples,
                                            tfds_source)

needs_tfds = pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None,
                                reason="optional extra: pip install -e '.[tfds]'")
TOK = ByteTokenizer()
# Short limits so that prompts are left-truncated and responses right-truncated.
TCFG = TokenizeConfig(max_prompt_len=24, max_response_len=10, eos_id=TOK.eos_id,
                      pad_id=TOK.pad_id)
JSONL = [
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
    {"prompt": "Ünïcode ✓ and \"quotes\"\nnew line\t tab", "chosen": "ok ✓", "rejected": "nö"},
    {"prompt": "A long prompt " * 5 + "END", "chosen": "a response longer than ten bytes",
     "rejected": "x"},
    {"prompt": "Why?", "chosen": "Because.", "rejected": "Dunno", "extra": [1, 2]},
    {"prompt": "\x00nul byte", "chosen": "yes\x00", "rejected": "no"},
]
HH = [
    {"chosen": "\n\nHuman: hello\n\nAssistant: hi friend",
     "rejected": "\n\nHuman: hello\n\nAssistant: go away"},
    {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
     "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"},
]
TLDR = [
    {"info": {"subreddit": "cats", "title": "My cat", "post": "It sleeps."},
     "summaries": [{"text": " cat sleeps"}, {"text": " dog barks"}], "choice": 1},
    {"info": {"subreddit": "x", "title": "t", "post": "p"},
     "summaries": [{"text": "one"}, {"text": "two"}], "choice": 0},
]


def write_jsonl(path, rows, blank_after=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n\n" if i == blank_after else "\n")   # blank lines shift line numbers
    return path


def assert_packed_equal(a, b):
    assert a.as_dict().keys() == b.as_dict().keys()
    for key, value in a.as_dict().items():
        assert value.dtype == b.as_dict()[key].dtype, key
        np.testing.assert_array_equal(value, b.as_dict()[key], err_msg=key)
    assert a.sources == b.sources


@needs_tfds
@pytest.mark.parametrize("rows", [JSONL, HH, TLDR], ids=["jsonl", "hh", "tldr"])
def test_records_and_packed_arrays_equal_the_default_path(tmp_path, rows):
    path = write_jsonl(tmp_path / "prefs.jsonl", rows, blank_after=0)
    out = build_tfds(TfdsConfig({"train": path}), tmp_path / "tfds")
    assert [p.name for p in out.glob("*array_record*")] == [
        "infalign_preferences-train.array_record-00000-of-00001"]
    examples, _ = read_preferences(path)
    source = tfds_source(tmp_path / "tfds", "train")
    assert len(source) == len(examples) == len(rows)
    for i, ex in enumerate(examples):   # the raw records, checked field by field
        record = source[i]
        for key in ("prompt", "chosen", "rejected", "source"):
            assert record[key] == getattr(ex, key).encode("utf-8")
        assert int(record["line"]) == ex.line
    assert read_tfds_examples(tmp_path / "tfds", "train") == examples
    packed, report = load_as_packed(tmp_path / "tfds", "train", TOK, TCFG)
    expected, _ = tokenize_preferences(examples, TOK, TCFG)
    assert_packed_equal(packed, expected)
    assert report.kept == len(rows) and report.total == 0


@needs_tfds
def test_splits_and_multiple_files_keep_file_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", JSONL[:3])
    b = write_jsonl(tmp_path / "b.jsonl", JSONL[3:])
    c = write_jsonl(tmp_path / "c.jsonl", HH)
    cfg = TfdsConfig({"train": [a, b], "test": c}, name="two_splits", format="auto")
    build_tfds(cfg, tmp_path / "tfds")
    train = read_tfds_examples(tmp_path / "tfds", "train", "two_splits")
    assert train == read_preferences(a)[0] + read_preferences(b)[0]
    assert [ex.line for ex in train] == [1, 2, 3, 1, 2]
    assert read_tfds_examples(tmp_path / "tfds", "test", "two_splits") == read_preferences(c)[0]


@needs_tfds
def test_loader_batches_and_random_access_rows_match(tmp_path):
    import grain

    path = write_jsonl(tmp_path / "p.jsonl", JSONL * 3)   # 15 rows
    build_tfds(TfdsConfig({"train": path}), tmp_path / "tfds")
    default, _ = tokenize_preferences(read_preferences(path)[0], TOK, TCFG)
    from_tfds, _ = load_as_packed(tmp_path / "tfds", "train", TOK, TCFG)
    cfg = LoaderConfig(batch_size=4, seed=5, num_epochs=2)
    batches = list(make_loader(from_tfds, cfg))
    assert len(batches) == 2 * (15 // 4)
    for got, want in zip(batches, make_loader(default, cfg)):
        assert got.keys() == want.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    rows = PackedPairsSource(tmp_path / "tfds", "train", TOK, TCFG)
    assert len(rows) == 15
    dataset = grain.MapDataset.source(rows)
    for i in (0, 2, 7, 14):
        row = dataset[i]
        assert row.keys() == default.as_dict().keys()
        for key, value in default.as_dict().items():
            np.testing.assert_array_equal(row[key], value[i], err_msg=f"row {i} {key}")


@needs_tfds
def test_the_row_source_counts_pairs_cut_at_the_length_limits(tmp_path):
    """PackedPairsSource threw away the packing's report: rows cut at the length limits (a
    42-token response cut to 8, its EOS gone) were counted by load_as_packed only."""
    rows = [{"prompt": "short", "chosen": "good", "rejected": "bad"},
            {"prompt": "x" * 50, "chosen": "y" * 40 + "!", "rejected": "z"},
            {"prompt": "p", "chosen": "c", "rejected": "r" * 30}]
    build_tfds(TfdsConfig({"train": write_jsonl(tmp_path / "p.jsonl", rows)}), tmp_path / "t")
    _, report = load_as_packed(tmp_path / "t", "train", TOK, TCFG)
    source = PackedPairsSource(tmp_path / "t", "train", TOK, TCFG)
    assert source.truncated == {} and source.rows_read == 0
    for i in (1, 1, 0):                      # a row read twice counts once
        source[i]
    assert source.rows_read == 2
    assert source.truncated == {k: 1 for k in ("prompt", "chosen")}
    source[2]
    assert source.truncated == report.truncated and sum(report.truncated.values()) == 3


@needs_tfds
def test_build_and_read_do_not_import_tensorflow(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", JSONL)
    code = (
        "import sys\n"
        "from infalign_jax.data.tfds_builder import TfdsConfig, build_tfds, tfds_source\n"
        f"build_tfds(TfdsConfig({{'train': {str(path)!r}}}), {str(tmp_path / 't')!r})\n"
        f"print(len(tfds_source({str(tmp_path / 't')!r}, 'train')), "
        "'tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[-2:] == ["5", "False"]


@needs_tfds
def test_rebuild_reuses_same_inputs_and_refuses_changed_ones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", JSONL[:2])
    cfg = TfdsConfig({"train": path})
    out = build_tfds(cfg, tmp_path / "tfds")
    assert build_tfds(cfg, tmp_path / "tfds") == out
    write_jsonl(path, JSONL[:3])
    with pytest.raises(ValueError, match="already built from other inputs"):
        build_tfds(cfg, tmp_path / "tfds")
    assert len(tfds_source(tmp_path / "tfds", "train")) == 2   # the old build is untouched
    build_tfds(TfdsConfig({"train": path}, name="v2"), tmp_path / "tfds")
    assert len(tfds_source(tmp_path / "tfds", "train", "v2")) == 3
    # records moved from one file of a split to the next: the same bytes end to end, but other
    # sources and lines (the fingerprint hashed the files' bytes back to back)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, JSONL[:3]), write_jsonl(b, JSONL[3:])
    two = TfdsConfig({"train": [a, b]}, name="moved")
    build_tfds(two, tmp_path / "tfds")
    write_jsonl(a, JSONL[:2]), write_jsonl(b, JSONL[2:])
    with pytest.raises(ValueError, match="already built from other inputs"):
        build_tfds(two, tmp_path / "tfds")


@needs_tfds
def test_bad_records_fail_or_are_skipped_like_the_reader(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl",
                       [JSONL[0], "{not json", {"prompt": "p", "chosen": "same",
                                                "rejected": "same"}, JSONL[1]])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        build_tfds(TfdsConfig({"train": path}), tmp_path / "tfds")
    build_tfds(TfdsConfig({"train": path}, name="skipped", skip_bad=True), tmp_path / "tfds")
    got = read_tfds_examples(tmp_path / "tfds", "train", "skipped")
    examples, read = read_preferences(path, skip_bad=True)
    assert got == examples
    assert [ex.line for ex in got] == [1, 4]
    # the report counts what reading skipped at build time, as the default path's does (it
    # said nothing was skipped); a second file of the split adds its own
    _, packed = tokenize_preferences(examples, TOK, TCFG)
    _, report = load_as_packed(tmp_path / "tfds", "train", TOK, TCFG, "skipped")
    assert report.as_dict() == read.merge(packed).as_dict()
    assert report.total == 2 and report.kept == 2
    more = write_jsonl(tmp_path / "more.jsonl", ["{not json", JSONL[2]])
    build_tfds(TfdsConfig({"train": [path, more]}, name="two", skip_bad=True), tmp_path / "tfds")
    _, report = load_as_packed(tmp_path / "tfds", "train", TOK, TCFG, "two")
    assert report.as_dict()["read"] == 6 and report.kept == 3 and report.total == 3


@needs_tfds
def test_a_build_killed_before_its_read_report_is_mended_by_building_again(tmp_path):
    """TFDS finished, the process died before read_report.json: building again (as the load's
    error says) reused the build and wrote no report, so the load refused every time. The
    report is read again from the same files, with the skips of the first build."""
    from infalign_jax.data.tfds_builder import READ_REPORT
    path = write_jsonl(tmp_path / "bad.jsonl", [JSONL[0], "{not json", JSONL[1]])
    cfg = TfdsConfig({"train": path}, skip_bad=True)
    out = build_tfds(cfg, tmp_path / "tfds")
    whole = json.loads((out / READ_REPORT).read_text())
    (out / READ_REPORT).unlink()
    with pytest.raises(ValueError, match=r"built without its read_report.json"):
        load_as_packed(tmp_path / "tfds", "train", TOK, TCFG)
    build_tfds(cfg, tmp_path / "tfds")
    assert json.loads((out / READ_REPORT).read_text()) == whole
    _, report = load_as_packed(tmp_path / "tfds", "train", TOK, TCFG)
    assert report.total == 1 and report.kept == 2


@needs_tfds
def test_reading_an_unbuilt_dataset_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no built dataset"):
        tfds_source(tmp_path, "train", "nothing_here")
    assert str(dataset_dir(tmp_path, "x")).endswith("infalign_preferences/x/1.0.0")


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="TfdsConfig.files must be a non-empty"):
        TfdsConfig({})
    with pytest.raises(ValueError, match="split name 'tr ain'"):
        TfdsConfig({"tr ain": "a.jsonl"})
    with pytest.raises(ValueError, match=r"TfdsConfig.files\['train'\]"):
        TfdsConfig({"train": []})
    with pytest.raises(ValueError, match="TfdsConfig.name"):
        TfdsConfig({"train": "a.jsonl"}, name="Bad/Name")
    with pytest.raises(ValueError, match="TfdsConfig.format"):
        TfdsConfig({"train": "a.jsonl"}, format="csv")
    with pytest.raises(ValueError, match="TfdsConfig.skip_bad"):
        TfdsConfig({"train": "a.jsonl"}, skip_bad=1)
    assert TfdsConfig({"train": tmp_path / "a.jsonl"}).files == {"train": (str(tmp_path /
                                                                               "a.jsonl"),)}


@needs_tfds
def test_a_file_fed_to_two_splits_or_twice_to_one_is_refused(tmp_path, monkeypatch):
    """One file listed twice in train built 2x its rows (5 distinct of 10); one file in train and
    test put every test row among the training rows; both read as 'kept 10', nothing skipped."""
    a = write_jsonl(tmp_path / "a.jsonl", JSONL)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"the same file is listed twice in split 'train' "
                                         r"\('.*a.jsonl', './a.jsonl'\)"):
        TfdsConfig({"train": [str(a), "./a.jsonl"]})
    with pytest.raises(ValueError, match=r"the same file is listed in splits 'train' and 'test'"):
        TfdsConfig({"train": str(a), "test": "a.jsonl"})
    copy = write_jsonl(tmp_path / "copy.jsonl", JSONL)   # same rows under another name
    with pytest.raises(ValueError, match=r"one content \(two copies of a file\) is listed in "
                                         r"splits 'train' and 'test'"):
        build_tfds(TfdsConfig({"train": str(a), "test": str(copy)}), tmp_path / "data")
    assert not (tmp_path / "data").exists()
    other = write_jsonl(tmp_path / "b.jsonl", HH)
    build_tfds(TfdsConfig({"train": str(a), "test": str(other)}), tmp_path / "data")


def test_without_the_extra_the_error_names_it(tmp_path):
    # sys.modules[name] = None makes `import name` fail, as if the package were not installed.
    code = ("import sys\nsys.modules['tensorflow_datasets'] = None\n"
            "from infalign_jax.data.tfds_builder import TfdsConfig, build_tfds\n"
            f"build_tfds(TfdsConfig({{'train': 'a.jsonl'}}), {str(tmp_path)!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "infalign-jax[tfds]" in out.stderr
