"""Run manifests: what is needed to reproduce the numbers next to which they are written.

Every run writes `manifest.json` beside its outputs: the resolved config, seeds, package
versions, the environment variables that change XLA's numbers, devices, git revision and dirty
state (all of the run's start), start/end time (the first start of a resumed run, and each
resume's time and step), what it started from, and hashes of the input files (reference tables,
checkpoints) it used.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from infalign_jax.infra.files import write_json

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml-collections",
            "transformers", "numpy", "infalign-jax")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# Where a run's code comes from: an untracked source file there is code the revision lacks.
SOURCE_DIRS = ("infalign_jax", "experiments", "configs")


def git_state(path: str | None = None) -> dict[str, Any]:
    """Git revision and dirty flag of the repository holding `path` (None outside git): dirty
    when a tracked file changed or an untracked, not ignored .py file sits in SOURCE_DIRS
    (listed, up to 20, in `untracked_sources`; the revision lacks them)."""
    cwd = path or os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        rev = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no") != ""
        listed = git("ls-files", "--others", "--exclude-standard", "--full-name", "--",
                     *(f":(top){d}" for d in SOURCE_DIRS))
        untracked = [f for f in listed.splitlines() if f.endswith(".py")]
        state = {"revision": rev, "dirty": changed or bool(untracked)}
        if untracked:
            state["untracked_sources"] = untracked[:20]
        return state
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def code_state() -> dict[str, Any]:
    """{"git": `git_state()`, "packages": `package_versions()`}: the code a run runs. A run takes
    it when it starts and passes it to `build_manifest(code=...)`; read when a manifest is written
    at the end, a commit, checkout or install made while the run went on was recorded as the code
    that ran."""
    return {"git": git_state(), "packages": package_versions()}


def numeric_environment() -> dict[str, str]:
    """The environment variables that change what XLA compiles or how JAX computes (XLA_FLAGS,
    JAX_ENABLE_X64, JAX_DEFAULT_MATMUL_PRECISION, ...): under other values the same config and
    code give other numbers (bitwise), and no config key holds them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("XLA_", "JAX_"))}


def device_info() -> dict[str, Any]:
    import jax  # imported lazily: manifests are also written by numpy-only tools
    devices = jax.devices()
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return {"backend": jax.default_backend(), "process_count": jax.process_count(),
            "process_index": jax.process_index(), "device_count": len(devices),
            "local_device_count": jax.local_device_count(), "kinds": kinds}


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def params_digest(params: Any, skip: Callable[[tuple[Any, ...]], bool] | None = None) -> str:
    """sha256 (hex) of a parameter tree's content: each leaf's key path, dtype, shape and bytes,
    in tree order, leaving out the leaves whose key path `skip` accepts. Identifies a model by
    what it computes, not by where its files lie (two `export/hf` folders differ)."""
    import jax  # the manifest's other helpers need no JAX
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if skip is not None and skip(path):
            continue
        leaf = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).reshape(-1).view(np.uint8))
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """`value` (a ConfigDict, mapping, sequence or scalar) as JSON data; other objects as repr."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (np.generic, np.ndarray)) and value.dtype.kind in "biuf":
        return jsonable(value.tolist())   # numbers, not "np.int64(64)"
    return repr(value)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def build_manifest(config: Any = None, *, seeds: Mapping[str, int] | None = None,
                   inputs: Mapping[str, str] | None = None, mesh: Any = None,
                   started: str | None = None, extra: Mapping[str, Any] | None = None,
                   with_devices: bool = True, resumes: Sequence[Mapping[str, Any]] | None = None,
                   init_from: Mapping[str, Any] | None = None,
                   started_with: Mapping[str, Any] | None = None, finished: bool = True,
                   code: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest dict (`finished`: the time now, or None for a run's manifest written at its
    start, so that a killed run's does not say it finished). `inputs` maps a role (e.g.
    "reference_table") to a file path, hashed.
    `resumes`: [{time, step, git, packages}] of each resume of the run (`started` is its first
    start); `started_with`: the git state and packages of its first start (with `resumes`; the
    top-level "git" and "packages" are this process's); `init_from`: the checkpoint whose
    parameters it started from. `code`: the run's `code_state()` taken at its start (default: now,
    which is right only for a manifest written at the start)."""
    code = code_state() if code is None else code
    manifest = {
        "config": jsonable(config),
        "seeds": jsonable(dict(seeds or {})),
        "packages": code["packages"],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git": code["git"],
        "environment": numeric_environment(),
        "argv": list(sys.argv),
        "started": started,
        "finished": now() if finished else None,
        "inputs": {role: {"path": os.path.abspath(p), "sha256": file_sha256(p)}
                   for role, p in (inputs or {}).items() if os.path.isfile(p)},
    }
    if with_devices:
        manifest["devices"] = device_info()
    if mesh is not None:
        manifest["mesh"] = {str(k): int(v) for k, v in dict(mesh.shape).items()}
    if resumes is not None:
        manifest["resumes"] = jsonable(list(resumes))
        manifest["started_with"] = jsonable(dict(started_with or {
            "git": manifest["git"], "packages": manifest["packages"]}))
    if init_from:
        manifest["init_from"] = jsonable(dict(init_from))
    if extra:
        manifest["extra"] = jsonable(dict(extra))
    return manifest


def write_manifest(out_dir: str, config: Any = None, **kwargs: Any) -> str:
    """Writes `out_dir/manifest.json` atomically and returns its path."""
    return write_json(os.path.join(out_dir, "manifest.json"), build_manifest(config, **kwargs),
                      sort_keys=True)
