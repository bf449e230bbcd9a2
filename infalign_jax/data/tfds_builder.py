"""Preference pairs as a TFDS dataset in array_record files (the optional `tfds` extra).

    build_tfds(cfg, data_dir)      JSON lines -> read_preferences -> array_record splits
    tfds_source(data_dir, split)   tfds.data_source: random access, no TensorFlow
    load_as_packed(...)            the split as `PackedPairs`, equal to the default path's
    PackedPairsSource              per-row packed dicts for `grain.MapDataset.source`

The records hold text (prompt, chosen, rejected) plus the source file and line, so one build
serves every tokenizer and `load_as_packed` runs the very packer of the default path
(`tokenize_preferences`): a dataset read back from array_record packs to the same arrays as the
JSON lines it came from. Splits keep the order of their files (`disable_shuffling=True`), so
row i of a split is the i-th kept record, as with `read_preferences`.

Writing and `tfds.data_source` need only `tensorflow-datasets` and `array-record`, not
TensorFlow (`as_dataset` would). TFDS is imported inside functions: this module imports without
it, and using it without the extra fails with an ImportError that names the extra.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from infalign_jax.infra import files, provenance
from infalign_jax.data.readers import FORMATS, PreferenceExample, SkipReport, read_preferences
from infalign_jax.data.tokenize import PackedPairs, TokenizeConfig, tokenize_preferences

DATASET_NAME = "infalign_preferences"
VERSION = "1.0.0"   # bump when the features change
TEXT_FIELDS = ("prompt", "chosen", "rejected", "source")
_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_SPLIT_RE = re.compile(r"^\w+$")
_FINGERPRINT = "input sha256: "


def require_tfds() -> Any:
    """The `tensorflow_datasets` module, or an ImportError that says how to install it."""
    try:
        import tensorflow_datasets as tfds
        import array_record  # noqa: F401  (the file format's reader and writer)
    except ImportError as e:
        raise ImportError(
            f"infalign_jax.data.tfds_builder needs the optional 'tfds' extra ({e}); install it "
            "with `pip install 'infalign-jax[tfds]'` (tensorflow-datasets and array-record; "
            "TensorFlow is not needed)") from e
    return tfds


@dataclasses.dataclass(frozen=True)
class TfdsConfig:
    """Which files make which split; `name` is the TFDS builder config (a folder per name)."""

    files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]
    name: str = "default"
    format: str = "auto"
    skip_bad: bool = False

    def __post_init__(self):
        if not isinstance(self.files, Mapping) or not self.files:
            raise ValueError("TfdsConfig.files must be a non-empty mapping split -> file(s), got "
                             f"{self.files!r}")
        normalised = {}
        for split, paths in self.files.items():
            if not isinstance(split, str) or not _SPLIT_RE.match(split):
                raise ValueError(f"TfdsConfig.files: split name {split!r} must be letters, "
                                 "digits and underscores (e.g. 'train')")
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
            if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
                raise ValueError(f"TfdsConfig.files[{split!r}] must be a path or a non-empty "
                                 f"list of paths, got {self.files[split]!r}")
            normalised[split] = tuple(str(p) for p in paths)
        _refuse_repeated_files(normalised, os.path.realpath, "the same file")
        object.__setattr__(self, "files", normalised)
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"TfdsConfig.name must match [a-z0-9_]+, got {self.name!r}")
        if self.format not in FORMATS:
            raise ValueError(f"TfdsConfig.format must be one of {FORMATS}, got {self.format!r}")
        if not isinstance(self.skip_bad, bool):
            raise ValueError(f"TfdsConfig.skip_bad must be a bool, got {self.skip_bad!r}")


def _refuse_repeated_files(files: Mapping[str, Sequence[str]], key: Callable[[str], str],
                           what: str) -> None:
    """A file listed twice in a split would duplicate its rows; one in two splits would put
    training rows in the evaluation split. `key` identifies a file (its real path, or its
    content's digest)."""
    seen: dict[str, tuple[str, str]] = {}
    for split in files:
        for path in files[split]:
            k = key(path)
            if k in seen:
                was_split, was_path = seen[k]
                where = (f"twice in split {split!r}" if was_split == split
                         else f"in splits {was_split!r} and {split!r}")
                raise ValueError(f"TfdsConfig.files: {what} is listed {where} ({was_path!r}, "
                                 f"{path!r}); each file may feed one split once")
            seen[k] = (split, path)


def _fingerprint(cfg: TfdsConfig) -> str:
    """Hash of the reading options and of each input file's bytes, file by file (split, path,
    sha256), so records moved from one file of a split to the next change it too (their source
    and line do); a stale build is refused."""
    h = hashlib.sha256(json.dumps([cfg.format, cfg.skip_bad, cfg.files], sort_keys=True).encode())
    digests = {}
    for split in sorted(cfg.files):
        for path in cfg.files[split]:
            if os.path.isfile(path):   # a missing file fails in read_preferences with its name
                digests[path] = provenance.file_sha256(path)
                h.update(json.dumps([split, path, digests[path]]).encode())
    # two copies of one file under two names (the config refused one name given twice)
    _refuse_repeated_files({split: [p for p in paths if p in digests]
                            for split, paths in cfg.files.items()}, digests.__getitem__,
                           "one content (two copies of a file)")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _builder_class() -> type:
    """Defines (and so registers with TFDS, once per process) the builder class."""
    tfds = require_tfds()

    class InfalignPreferences(tfds.core.GeneratorBasedBuilder):
        """Preference pairs read by `infalign_jax.data.read_preferences`."""

        VERSION = tfds.core.Version(VERSION)

        # Only TFDS's download checksums use the code path, and we download nothing. TFDS
        # 4.9.10 finds it for a class in a package through `importlib_resources`, a package it
        # declares only for Python < 3.9, so the default fails with ModuleNotFoundError.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, cfg: TfdsConfig | None = None, **kwargs):
            self._cfg = cfg
            self.read_reports: dict[str, SkipReport] = {}   # per split, when generated
            if cfg is not None:
                kwargs["config"] = tfds.core.BuilderConfig(
                    name=cfg.name, description=_FINGERPRINT + _fingerprint(cfg))
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=self.builder_config.description if self.builder_config else None,
                features=tfds.features.FeaturesDict(
                    {**{key: tfds.features.Text() for key in TEXT_FIELDS},
                     "line": tfds.features.Scalar(np.int32)}),
                disable_shuffling=True)   # row i of a split = i-th record, as in the files

        def _split_generators(self, dl_manager):
            del dl_manager   # local files only: nothing is downloaded
            if self._cfg is None:
                raise ValueError(f"{DATASET_NAME}: building needs a TfdsConfig naming the files")
            return {split: self._generate_examples(split, paths)
                    for split, paths in self._cfg.files.items()}

        def _generate_examples(self, split, paths):
            key = 0
            for path in paths:
                examples, report = read_preferences(path, self._cfg.format,
                                                    skip_bad=self._cfg.skip_bad)
                if report.total:
                    logging.warning("%s: %s: %s", DATASET_NAME, path, report.summary())
                before = self.read_reports.get(split)
                self.read_reports[split] = report if before is None else before.plus(report)
                for ex in examples:
                    yield key, {"prompt": ex.prompt, "chosen": ex.chosen,
                                "rejected": ex.rejected, "source": ex.source, "line": ex.line}
                    key += 1

    return InfalignPreferences


def dataset_dir(data_dir: str | os.PathLike, name: str = "default") -> Path:
    return Path(data_dir) / DATASET_NAME / name / VERSION


# What reading the files skipped at build time, per split, beside TFDS's dataset_info.json:
# `load_as_packed` reports it with the packer's skips, as the default path does.
READ_REPORT = "read_report.json"


def build_tfds(cfg: TfdsConfig, data_dir: str | os.PathLike) -> Path:
    """Writes every split of `cfg` as array_record under `dataset_dir(data_dir, cfg.name)`.

    Re-running with the same inputs reuses the build; with changed files or options it raises
    rather than serve the old data under the same name.
    """
    require_tfds()
    out = dataset_dir(data_dir, cfg.name)
    info_file = out / "dataset_info.json"
    if info_file.is_file():
        stored = json.loads(info_file.read_text()).get("description", "")
        wanted = _FINGERPRINT + _fingerprint(cfg)
        if stored != wanted:
            raise ValueError(f"{out}: already built from other inputs or options ({stored!r}, "
                             f"now {wanted!r}); use another TfdsConfig.name or delete the folder")
    builder = _builder_class()(cfg=cfg, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(file_format="array_record")
    reports = builder.read_reports   # generated now (a reused build keeps its report) ...
    if not reports and not (out / READ_REPORT).is_file():
        # ... unless the build that finished was killed before writing it: read the same files
        # again (the fingerprint above says they are the ones built from) for what they skip
        reports = {split: _read_report(cfg, paths) for split, paths in cfg.files.items()}
    if reports:
        files.write_json(os.fspath(out / READ_REPORT), {
            split: dataclasses.asdict(report) for split, report in reports.items()},
            sort_keys=True)
    return out


def _read_report(cfg: TfdsConfig, paths: Sequence[str]) -> SkipReport:
    """What reading a split's files skips (`read_preferences`), as a build records it."""
    report = None
    for path in paths:
        got = read_preferences(path, cfg.format, skip_bad=cfg.skip_bad)[1]
        report = got if report is None else report.plus(got)
    return report


def tfds_source(data_dir: str | os.PathLike, split: str, name: str = "default"
                ) -> Sequence[dict[str, Any]]:
    """The split's records through `tfds.data_source` (random access; `len`, `[i]`)."""
    tfds = require_tfds()
    _builder_class()
    if not (dataset_dir(data_dir, name) / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{dataset_dir(data_dir, name)}: no built dataset (expected "
                                f"build_tfds(TfdsConfig(name={name!r}, ...), data_dir) first)")
    return tfds.data_source(f"{DATASET_NAME}/{name}:{VERSION}", split=split,
                            data_dir=os.fspath(data_dir), download=False)


def record_to_example(record: Mapping[str, Any]) -> PreferenceExample:
    """A decoded TFDS record (text as UTF-8 bytes) back to the reader's `PreferenceExample`."""
    text = {key: bytes(record[key]).decode("utf-8") for key in TEXT_FIELDS}
    return PreferenceExample(text["prompt"], text["chosen"], text["rejected"], text["source"],
                             int(record["line"]))


def read_tfds_examples(data_dir: str | os.PathLike, split: str, name: str = "default"
                       ) -> list[PreferenceExample]:
    source = tfds_source(data_dir, split, name)
    return [record_to_example(source[i]) for i in range(len(source))]


def load_as_packed(data_dir: str | os.PathLike, split: str, tokenizer: Any,
                   cfg: TokenizeConfig, name: str = "default", *, skip_bad: bool = False
                   ) -> tuple[PackedPairs, SkipReport]:
    """The whole split packed in memory, for `make_loader` (same result as the default path,
    the report included: the records reading skipped at build time, then the packer's)."""
    path = dataset_dir(data_dir, name) / READ_REPORT
    examples = read_tfds_examples(data_dir, split, name)
    if not path.is_file():
        raise ValueError(f"{path.parent}: built without its {READ_REPORT} (what reading skipped); "
                         f"build it again with build_tfds")
    read = json.loads(path.read_text())[split]
    packed, report = tokenize_preferences(examples, tokenizer, cfg, skip_bad=skip_bad)
    built = SkipReport(**{**read, "examples": [tuple(e) for e in read["examples"]]})
    return packed, built.merge(report)


class PackedPairsSource:
    """Random-access rows of `PackedPairs.as_dict()` packed on read (for data beyond memory).

    Row i equals row i of `load_as_packed(...)`; use with `grain.MapDataset.source(...)`. A pair
    that fails packing raises `DataError` when read (there is no `skip_bad` here: skipping
    would shift the row numbering). Pairs cut at the length limits are counted as they are read:
    `truncated` holds, per part, the distinct rows read so far that were cut (what
    `load_as_packed`'s report counts over the whole split), and `rows_read` how many distinct
    rows that is. Each process (a grain worker) counts the rows it read.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, tokenizer: Any,
                 cfg: TokenizeConfig, name: str = "default"):
        self._source = tfds_source(data_dir, split, name)
        self._tokenizer, self._cfg = tokenizer, cfg
        self._cut: dict[int, tuple[str, ...]] = {}   # row -> parts cut, for every row read

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        packed, report = tokenize_preferences([record_to_example(self._source[i])],
                                              self._tokenizer, self._cfg)
        self._cut[int(i)] = tuple(report.truncated)
        return {key: value[0] for key, value in packed.as_dict().items()}

    @property
    def rows_read(self) -> int:
        return len(self._cut)

    @property
    def truncated(self) -> dict[str, int]:
        return dict(collections.Counter(p for parts in self._cut.values() for p in parts))
