"""Atomic file writes: readers see the old file or the complete new one, never a torn one.

Every output a run may be killed while writing (manifests, summaries, reference tables, metrics
rewritten on resume, data files, evaluations, reports and plots, exported checkpoints) goes
through `atomic_path`. A run refused at start-up leaves no empty directory behind
(`no_empty_dirs_left`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`,
    on an exception it is removed and `path` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it 0600)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[Any]:
    """`open(path, mode)` ("w" or "wb") whose content appears at `path` only when complete.
    Text is UTF-8 with "\n" written as is (newline="", as the csv module asks for)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with open(tmp, mode, **text) as f:
            yield f


@contextlib.contextmanager
def atomic_files_into(directory: str) -> Iterator[str]:
    """Yields an empty temporary directory beside `directory` for a writer that names its own
    files (e.g. a tokenizer's `save_pretrained`); on success each file written there is fsynced
    and renamed into `directory` (subdirectories kept), so each file there is whole: the old one
    or the complete new one. On an exception nothing is moved. The temporary is removed."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".tmp-")
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        for root, _, names in os.walk(tmp):
            target = os.path.join(directory, os.path.relpath(root, tmp))
            os.makedirs(target, exist_ok=True)
            for name in names:
                os.replace(os.path.join(root, name), os.path.join(target, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> str:
    """`json.dump(obj)` to `path` atomically (indent=2 unless given); returns the path."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_open(path) as f:
        json.dump(obj, f, **dump_kwargs)
    return path


def write_npz(path: str, **arrays: Any) -> str:
    """`np.savez(path, **arrays)` atomically; `path` must end in ".npz" (which np.savez would
    otherwise append). Returns the path."""
    if not path.endswith(".npz"):
        raise ValueError(f"write_npz: the path must end in '.npz', got {path!r}")
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def save_figure(fig: Any, path: str, **savefig_kwargs: Any) -> str:
    """A matplotlib figure's `fig.savefig` to `path` atomically (the format from its extension);
    returns the path. The caller closes the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return path


@contextlib.contextmanager
def no_empty_dirs_left(path: str) -> Iterator[None]:
    """On an exception inside, removes the directories under and including `path` that did not
    exist on entry and are empty (e.g. the work dir of a run refused at start-up), then re-raises.
    Nothing that existed before is touched, and no file is deleted."""
    if "://" in os.fspath(path):   # object stores have no empty directories to leave
        yield
        return
    path = os.path.abspath(path)
    created, parent = [], path
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        yield
    except BaseException:
        if created:
            for root, _, _ in sorted(os.walk(created[0]), key=lambda w: -len(w[0])):
                _rmdir_if_empty(root)
            for directory in created[1:]:
                _rmdir_if_empty(directory)
        raise


def _rmdir_if_empty(directory: str) -> None:
    try:
        os.rmdir(directory)   # fails on a directory that holds anything
    except OSError:
        pass
