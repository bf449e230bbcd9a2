"""Deterministic, resumable, multi-process batching of packed arrays, on grain's MapDataset.

Every batch is a pure function of (seed, epoch, position in epoch): epoch e visits the rows in
the order `epoch_permutation(seed, e, n)`, and global step s is batch `s % steps_per_epoch` of
epoch `s // steps_per_epoch`. Hence
* resuming needs only the step counter (`Loader.get_state()`), not the iterator's history;
* the trainer can compute the rows of any step without iterating (`batch_indices`);
* with P processes, process p takes the p-th contiguous 1/P slice of every global batch, so the
  shards are disjoint, their union is the global batch, and the global batch does not depend on
  P (a run may resume on a different number of processes).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Mapping

import grain
import numpy as np
from infalign_jax.infra import validate as check


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """`batch_size` is the GLOBAL batch; each process gets batch_size / process_count rows."""

    batch_size: int
    seed: int
    shuffle: bool = True
    drop_remainder: bool = True
    num_epochs: int | None = None   # None: repeat forever
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        check.ints(self, ("batch_size", "process_count"))
        check.ints(self, ("seed",), low=0)
        check.bools(self, ("shuffle", "drop_remainder"))
        check.ints(self, ("num_epochs",), optional=True)      # None: infinite
        if not (check.is_int(self.process_index) and 0 <= self.process_index < self.process_count):
            check.fail(self, "process_index", f"an integer in [0, process_count={self.process_count})")
        if self.batch_size % self.process_count:
            check.fail(self, "batch_size", f"divisible by process_count={self.process_count}")
        # A short last batch cannot be split into equal per-process shards, and JAX needs equal
        # shards to assemble a global array.
        if not (self.drop_remainder or self.process_count == 1):
            check.fail(self, "drop_remainder", "True when process_count > 1")


@functools.lru_cache(maxsize=8)
def _cached_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.setflags(write=False)   # shared by the cache: nobody may shuffle it in place
    return perm


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits rows 0..n-1 (a pure function of its arguments)."""
    if seed < 0 or epoch < 0 or n < 1:
        raise ValueError(f"epoch_permutation needs seed >= 0, epoch >= 0, n >= 1; got "
                         f"seed={seed}, epoch={epoch}, n={n}")
    return _cached_permutation(int(seed), int(epoch), int(n))


def example_index(seed: int, epoch: int, i: int, n: int) -> int:
    """Row visited at position i of epoch `epoch`."""
    if not 0 <= i < n:
        raise ValueError(f"example_index: position i={i} outside [0, n={n})")
    return int(epoch_permutation(seed, epoch, n)[i])


def steps_per_epoch(cfg: LoaderConfig, n: int) -> int:
    if cfg.drop_remainder and n < cfg.batch_size:
        raise ValueError(f"dataset has {n} rows, fewer than LoaderConfig.batch_size="
                         f"{cfg.batch_size} with drop_remainder=True: no batch can be formed")
    return n // cfg.batch_size if cfg.drop_remainder else -(-n // cfg.batch_size)


def dropped_per_epoch(cfg: LoaderConfig, n: int) -> int:
    """Rows of `n` that no batch of an epoch holds: the `n % batch_size` left over with
    drop_remainder=True, else 0. Shuffled, each epoch leaves out other rows (its own random
    permutation's tail), so over many epochs every row is almost surely seen but none is
    promised; unshuffled, the same last rows are left out every epoch and never seen."""
    steps_per_epoch(cfg, n)   # refuses n < batch_size as the loader does
    return n % cfg.batch_size if cfg.drop_remainder else 0


def global_batch_indices(cfg: LoaderConfig, n: int, step: int) -> np.ndarray:
    """Rows of the global batch (all processes) at global step `step`."""
    spe = steps_per_epoch(cfg, n)
    if step < 0 or cfg.num_epochs is not None and step >= spe * cfg.num_epochs:
        raise ValueError(f"step {step} outside [0, {spe} steps/epoch x num_epochs="
                         f"{cfg.num_epochs})")
    epoch, pos = divmod(int(step), spe)
    order = epoch_permutation(cfg.seed, epoch, n) if cfg.shuffle else np.arange(n)
    return np.asarray(order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size], np.int64)


def batch_indices(cfg: LoaderConfig, n: int, step: int) -> np.ndarray:
    """Rows this process (cfg.process_index) loads at global step `step`."""
    rows = global_batch_indices(cfg, n, step)
    local = len(rows) // cfg.process_count
    return rows[cfg.process_index * local:(cfg.process_index + 1) * local]


def _check_arrays(arrays: Any) -> dict[str, np.ndarray]:
    if hasattr(arrays, "as_dict"):
        arrays = arrays.as_dict()
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError("make_loader: arrays must be a non-empty dict of numpy arrays (or a "
                         f"PackedPairs/PackedPrompts), got {type(arrays).__name__}")
    out = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in out.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise ValueError(f"make_loader: arrays must share their leading dimension, got {lengths}")
    if "example_index_B" in out:
        raise ValueError("make_loader: key 'example_index_B' is reserved for the row indices")
    return out


class Loader:
    """Iterator of dict batches; state is the global step, so resume is exact and cheap.

    Built on grain: a `MapDataset` over global step numbers mapped to batches, read through
    grain's `DatasetIterator` (no reader threads: gathering rows from memory is cheap and
    threads would only compete for this machine's cores).

    `dropped_per_epoch`: rows no batch of an epoch holds (`n % batch_size` with drop_remainder;
    see `dropped_per_epoch()`), to be reported by whoever trains on the batches.
    """

    def __init__(self, arrays: Any, cfg: LoaderConfig):
        self._arrays, self.cfg = _check_arrays(arrays), cfg
        self.n = next(iter(self._arrays.values())).shape[0]
        self.steps_per_epoch = steps_per_epoch(cfg, self.n)
        self.dropped_per_epoch = dropped_per_epoch(cfg, self.n)
        self.num_steps = (sys.maxsize if cfg.num_epochs is None
                          else self.steps_per_epoch * cfg.num_epochs)
        self._start(0)

    def _batch(self, step: int) -> dict[str, np.ndarray]:
        rows = batch_indices(self.cfg, self.n, step)
        batch = {k: v[rows] for k, v in self._arrays.items()}
        batch["example_index_B"] = rows
        return batch

    def _start(self, step: int) -> None:
        self._step = step
        ds = grain.MapDataset.range(step, self.num_steps).map(self._batch)
        self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                             prefetch_buffer_size=0)))

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)   # StopIteration after the last epoch
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next global step (and its epoch/position)."""
        epoch, position = divmod(self._step, self.steps_per_epoch)
        return {"step": self._step, "epoch": epoch, "position": position, "seed": self.cfg.seed,
                "n": self.n, "batch_size": self.cfg.batch_size, "shuffle": self.cfg.shuffle}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `get_state()` dict, refusing one taken over different data/order."""
        for key in ("seed", "n", "batch_size", "shuffle"):
            mine = self.n if key == "n" else getattr(self.cfg, key)
            if key in state and state[key] != mine:
                raise ValueError(f"Loader.set_state: state has {key}={state[key]!r} but this "
                                 f"loader has {key}={mine!r}; resuming would change the order")
        if "step" in state:
            step = int(state["step"])
            if "epoch" in state and "position" in state and divmod(
                    step, self.steps_per_epoch) != (state["epoch"], state["position"]):
                raise ValueError(f"Loader.set_state: step {step} disagrees with epoch="
                                 f"{state['epoch']}, position={state['position']}")
        elif "epoch" in state and "position" in state:
            step = int(state["epoch"]) * self.steps_per_epoch + int(state["position"])
        else:
            raise ValueError(f"Loader.set_state: expected 'step' or 'epoch'+'position', got "
                             f"keys {sorted(state)}")
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"Loader.set_state: step {step} outside [0, {self.num_steps}]")
        self._start(step)


def make_loader(arrays: Any, cfg: LoaderConfig) -> Loader:
    """Batches of `arrays` (dict of equal-length arrays, or PackedPairs/PackedPrompts)."""
    return Loader(arrays, cfg)
