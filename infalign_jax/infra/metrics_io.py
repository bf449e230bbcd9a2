"""Where training metrics go: JSONL (for scripts), TensorBoard event files, a console progress line.

`MetricsWriter.write(step, scalars)` appends one JSON object per call to `<dir>/metrics.jsonl` and
one TensorBoard scalar per key to `<dir>/tb/`, tagged `train/<key>` (the "eval" stream:
`eval/<key>`); `Progress` prints a bar with rate and ETA. Only the primary process (process 0)
writes, so multi-host runs do not produce N copies.

TensorBoard files are written with the `tensorboard` package's own event writer and protos (no
TensorFlow needed); the tests read them back with TensorBoard's `EventAccumulator`.

On resume a run appends to the same `metrics.jsonl`; rows of steps at or after the resume step that
an interrupted run had already written are dropped first (`truncate_stream`: the JSONL rows with
`truncate_after`, the TensorBoard events with `truncate_events_after`), so the file and the event
files hold each step once and match an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np
from infalign_jax.infra.files import atomic_open


def _is_primary() -> bool:
    return jax.process_index() == 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": JSON has no literal for them
    return value


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics file (skips a torn last line left by a kill)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_after(path: str, step: int) -> int:
    """Drops rows with ``row["step"] >= step`` (and torn lines); returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep, dropped = [], 0
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("step", -1)) >= step:
            dropped += 1
        else:
            keep.append(line if line.endswith("\n") else line + "\n")
    with atomic_open(path) as f:
        f.writelines(keep)
    return dropped


def _event_files(tb_dir: str, name: str) -> list[str]:
    """The event files `MetricsWriter(..., name)` wrote into `tb_dir`, oldest first."""
    if not os.path.isdir(tb_dir):
        return []
    return sorted(os.path.join(tb_dir, f) for f in os.listdir(tb_dir)
                  if f.startswith("events.out.tfevents.") and f.endswith(f".{name}"))


def truncate_events_after(tb_dir: str, name: str, step: int) -> int:
    """Drops the scalar events with ``event.step >= step`` from the event files of stream `name`
    (rewritten atomically; a file left with no scalars is removed); returns how many were dropped.
    A torn last record (a killed writer) is dropped with them."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    dropped = 0
    for path in _event_files(tb_dir, name):
        records = list(RawEventFileLoader(path).Load())
        events = [event_pb2.Event.FromString(r) for r in records]
        keep = [r for r, e in zip(records, events) if not e.HasField("summary") or e.step < step]
        n_dropped = len(records) - len(keep)
        dropped += n_dropped
        if not any(e.HasField("summary") and e.step < step for e in events):
            os.remove(path)
        elif n_dropped:
            with atomic_open(path, "wb") as f:
                writer = RecordWriter(f)
                for record in keep:
                    writer.write(record)
    return dropped


def truncate_stream(directory: str, name: str, step: int) -> None:
    """Drops what stream `name` holds of steps >= `step`: its JSONL rows and its TensorBoard
    events (a resumed run writes them again). Only the primary process, the one that writes."""
    if not _is_primary():
        return
    truncate_after(os.path.join(directory, f"{name}.jsonl"), step)
    truncate_events_after(os.path.join(directory, "tb"), name, step)


# TensorBoard tag prefix of each stream ("train/kl_k1", "eval/exact_kl").
TAG_PREFIX = {"metrics": "train", "eval": "eval"}


class MetricsWriter:
    """Appends scalars per step to ``<directory>/<name>.jsonl`` and TensorBoard ``<directory>/tb``
    (tags ``<prefix>/<key>``, the prefix from `TAG_PREFIX`, else the stream's name)."""

    def __init__(self, directory: str, name: str = "metrics", tensorboard: bool = True):
        self.primary = _is_primary()
        self.prefix = TAG_PREFIX.get(name, name)
        self.path = os.path.join(directory, f"{name}.jsonl")
        self._file: TextIO | None = None
        self._tb = None
        if not self.primary:
            return
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            self._tb = EventFileWriter(os.path.join(directory, "tb"), filename_suffix=f".{name}")

    def write(self, step: int, scalars: Mapping[str, Any], **extra: Any) -> None:
        if not self.primary:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()},
               **{k: _jsonable(v) for k, v in extra.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            values = [summary_pb2.Summary.Value(tag=f"{self.prefix}/{k}", simple_value=float(v))
                      for k, v in scalars.items() if np.ndim(v) == 0]
            self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def duration(seconds: float) -> str:
    """A duration for progress lines: "4m07s", "2h13m" from an hour on, "?" when not finite
    (an ETA before any rate is known)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """A one-line progress report: ``[####......] 40/100 2.1 it/s eta 0m28s | key=val ...``.

    The rate and ETA count from the first report on: the first step pays for compilation (often
    most of a short run), so a rate that included it would be off by orders of magnitude. The
    first report says how long that step took instead.
    """

    def __init__(self, total: int, start: int = 0, width: int = 20,
                 out: Callable[[str], None] | None = None, stream: TextIO | None = None):
        self.total, self.start, self.width = total, start, width
        self.t0 = time.perf_counter()
        self._first: tuple[int, float] | None = None
        stream = stream or sys.stdout
        self.out = out or (lambda s: print(s, file=stream, flush=True))

    def line(self, step: int, scalars: Mapping[str, Any]) -> str:
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        rate = (step - first_step) / (now - first_time) if now > first_time else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        keys = " ".join(f"{k}={float(v):.4g}" for k, v in scalars.items() if np.ndim(v) == 0)
        eta_s = duration(eta)
        speed = f"{rate:.2f} it/s" if rate > 0 else \
            f"{now - self.t0:.1f}s to step {step} (compiling)"
        return f"[{bar}] {step}/{self.total} {speed} eta {eta_s} | {keys}"

    def update(self, step: int, scalars: Mapping[str, Any]) -> None:
        if _is_primary():
            self.out(self.line(step, scalars))
