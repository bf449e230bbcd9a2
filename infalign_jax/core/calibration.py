"""Empirical reward calibration against base-policy samples (InfAlign section 1.5, Eq. 12).

The calibrated reward of a response y to prompt x is its win rate against the base policy,

    C(x, y) = P_{z ~ pi_ref(.|x)}[r(x, z) < r(x, y)] + 1/2 P_{z ~ pi_ref(.|x)}[r(x, z) = r(x, y)],

estimated from K offline base-policy rollouts z_1..z_K per prompt (spec section 0 and 1.5):

    C_hat(x, y) = (#{k : r_k < r} + 1/2 #{k : r_k = r}) / K                         (Eq. 12)
    C_smooth(x, y) = (#{k : r_k < r} + 1/2 #{k : r_k = r} + 1) / (K + 1) = (K C_hat + 1) / (K + 1)
    C_centred(x, y) = (K C_hat + 1/2) / (K + 1)

C_smooth (`smoothing="add_one"`) is never 0 (the log transform needs that). Without ties it is
vBoN's estimator (#{r_k < r} + 1) / (K + 1), the spec's smoothing (section 1.5). With ties it
keeps Eq. 12's half count, a deviation from the spec's literal formula: with #{r_k < r} alone, a
response tied with every reference scores 1 / (K + 1), as one below them all, so a binary reward
(all references 1, responses [0, 0, 1, 1]) gave every response the same C_smooth and RLOO
advantages of 0.

C_centred (`smoothing="centred"`) is never 0 or 1 and, like C_hat, reverses under reversing the
reward's order (C_centred(-r) = 1 - C_centred(r)); it is for transforms that diverge at both ends
(logit, probit). Its values are evenly spaced, 1 / (2 (K + 1)) a half rank, ends included: on
C_hat itself the clip into [1e-6, 1 - 1e-6] put logit(1) at 13.8 against 3.4 for the next value
at K = 16, so beating all K references outweighed every other rank step together.

This module holds two things:

  * `calibrate`, the pure array kernel. A batch of B prompts carries a *padded* table
    `ref_sorted_BxK`: row b holds that prompt's K_b valid reference rewards sorted ascending in its
    first K_b columns (`ref_count_B[b] = K_b`); whatever sits after them (e.g. +inf) never counts.
    Two implementations give identical integer counts: "search" (binary search with
    `jnp.searchsorted`, O(M log K) per prompt) and "compare" (one fused broadcast compare against
    every reference reward, O(M K), fastest for small K). Both count 2 * numerator =
    #{ref < r} + #{ref <= r} in integers, so ties are exact and the only rounding is the final
    division. No `jit` inside: callers jit, vmap and shard it over the prompt axis.
  * `ReferenceTable`, the host-side (numpy) store of those sorted rewards with the identity of the
    base and reward models that produced them, built from the sampler's [B, K] reward array and
    validity mask, saved atomically as a single `.npz` with a JSON metadata string, and checked on
    load, so a table can never silently calibrate rewards from another reward model.

Non-finite values. The checked host-side entry points (`build_reference_table`,
`calibrate_with_table`) reject NaN and +-inf with a ValueError naming the argument and prompt.
Inside the jitted kernel, where raising is impossible, NaN propagates instead of producing a
plausible number: a NaN reward gives C = NaN, a NaN anywhere in a row's valid part gives NaN for
the whole row, and a prompt with K_b = 0 gives NaN (never the uninformative 1/2). +-inf rewards are
ordered normally (+inf beats every finite reference reward).

Precision: rewards and table are compared in their common floating dtype (float32 unless x64 is
on); tables are stored as float32. Rounding is monotone, so it can merge near-ties into ties
but never reverses an order.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import zipfile
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from infalign_jax.infra import validate as check
from infalign_jax.infra.files import atomic_open

Array = jax.Array

TABLE_VERSION = 1
METHODS = ("auto", "search", "compare")
# "auto" uses the O(M K) compare-all kernel up to this K and binary search above it. Measured
# jitted on the 2-core CPU here (best of 5): B=4096, M=8: compare 95-280 us vs search 420-1300 us
# for K = 2..32, even at K = 64 (1.9 ms), search 9x faster at K = 256. Small batches (B=64,
# M=16) are dominated by ~40 us dispatch, where both are within 2x up to K = 64.
COMPARE_MAX_K = 32


class ReferenceTableError(ValueError):
    """A reference table is inconsistent, mismatched, corrupt or lacks a prompt."""


# ------------------------------------------------------------------------------------- kernel
def _counts_compare(r_M: Array, ref_K: Array, valid_K: Array) -> tuple[Array, Array]:
    """(#{ref < r}, #{ref <= r}) over the valid entries, comparing against all of them."""
    lt_M = ((ref_K[None, :] < r_M[:, None]) & valid_K[None, :]).sum(-1, dtype=jnp.int32)
    le_M = ((ref_K[None, :] <= r_M[:, None]) & valid_K[None, :]).sum(-1, dtype=jnp.int32)
    return lt_M, le_M


def _counts_search(r_M: Array, ref_K: Array, valid_K: Array | None) -> tuple[Array, Array]:
    """The same counts by binary search. Padding becomes +inf so the row stays sorted, and the
    clamp to K_b drops the padding that r = +inf would otherwise count as ties. `valid_K=None`
    (every entry valid) skips that pass over the table: 40% of the kernel's time on CPU."""
    if valid_K is None:
        left_M = jnp.searchsorted(ref_K, r_M, side="left", method="scan").astype(jnp.int32)
        right_M = jnp.searchsorted(ref_K, r_M, side="right", method="scan").astype(jnp.int32)
        return left_M, right_M
    ref_K = jnp.where(valid_K, ref_K, jnp.inf)
    count = valid_K.sum(dtype=jnp.int32)
    left_M = jnp.searchsorted(ref_K, r_M, side="left", method="scan").astype(jnp.int32)
    right_M = jnp.searchsorted(ref_K, r_M, side="right", method="scan").astype(jnp.int32)
    return jnp.minimum(left_M, count), jnp.minimum(right_M, count)


SMOOTHINGS = ("none", "add_one", "centred")


def _check_smoothing(smoothing: str) -> str:
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    return smoothing


def _calibrate_row(r_M: Array, ref_K: Array, count: Array, smoothing: str, method: str,
                   full: bool = False) -> Array:
    valid_K = jnp.arange(ref_K.shape[0]) < count
    if method == "compare":
        lt_M, le_M = _counts_compare(r_M, ref_K, valid_K)
    else:
        lt_M, le_M = _counts_search(r_M, ref_K, None if full else valid_K)
    count_f = count.astype(jnp.float32)
    if smoothing != "none":
        # (#{<} + #{=} / 2 + a) / (K + 1) with a = 1 (add_one) or 1/2 (centred), as
        # (lt + le + 2a) / (2 (K + 1)): exact in integers.
        c_M = (lt_M + le_M + (2 if smoothing == "add_one" else 1)).astype(jnp.float32) / (
            2.0 * (count_f + 1.0))
    else:
        # lt + le = 2 #{<} + #{=}: exact in integers, one rounding in the division.
        c_M = (lt_M + le_M).astype(jnp.float32) / (2.0 * count_f)
    bad_row = jnp.any(jnp.isnan(ref_K) & valid_K) | (count <= 0)
    return jnp.where(jnp.isnan(r_M) | bad_row, jnp.nan, c_M)


def calibrate(rewards_BxM: Array, ref_sorted_BxK: Array, ref_count_B: Array | None = None, *,
              smoothing: str = "none", method: str = "auto") -> Array:
    """Empirical calibrated reward C_hat (InfAlign Eq. 12, spec section 1.5), per prompt.

        C[b, m] = (#{k < K_b : ref[b, k] < r[b, m]} + 1/2 #{k < K_b : ref[b, k] = r[b, m]}) / K_b
        add_one: (#{k < K_b : ref[b, k] < r[b, m]} + 1/2 #{... = r[b, m]} + 1) / (K_b + 1)
        centred: (#{k < K_b : ref[b, k] < r[b, m]} + 1/2 #{... = r[b, m]} + 1/2) / (K_b + 1)

    Args:
      rewards_BxM: M rewards to calibrate for each of B prompts.
      ref_sorted_BxK: row b holds prompt b's reference rewards sorted ascending in its first K_b
        entries; later entries are padding and never count (any value, NaN included).
      ref_count_B: K_b per prompt (int); None means every row is fully valid (K_b = K). Values
        outside [0, K] are an error for concrete input (numpy or jax) and are clipped when
        traced.
      smoothing: "none" (C_hat); "add_one", (K C_hat + 1) / (K + 1), never 0 (for the log
        transform), vBoN's (#{ref < r} + 1) / (K + 1) where r ties no reference; "centred",
        (K C_hat + 1/2) / (K + 1), never 0 or 1 (logit, probit; see the module docstring).
      method: "search" (O(M log K)), "compare" (O(M K), fast for small K) or "auto"
        (compare when K <= COMPARE_MAX_K).

    Returns:
      float32 [B, M] in [0, 1]; NaN where the reward, the row's valid part or K_b = 0 is bad
      (see the module docstring).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_smoothing(smoothing)
    rewards_BxM = jnp.asarray(rewards_BxM)
    ref_sorted_BxK = jnp.asarray(ref_sorted_BxK)
    chex.assert_rank(rewards_BxM, 2, custom_message="rewards_BxM", exception_type=ValueError)
    chex.assert_rank(ref_sorted_BxK, 2, custom_message="ref_sorted_BxK", exception_type=ValueError)
    b, k = ref_sorted_BxK.shape
    if rewards_BxM.shape[0] != b:
        raise ValueError(f"rewards_BxM has {rewards_BxM.shape[0]} prompts but ref_sorted_BxK has "
                         f"{b}: both need the prompt axis B first")
    if k == 0:
        raise ValueError("ref_sorted_BxK has no columns (K = 0)")
    full = ref_count_B is None  # static: every row holds K valid entries
    if full:
        count_B = jnp.full((b,), k, jnp.int32)
    else:
        if isinstance(ref_count_B, (np.ndarray, list, tuple)) or (
                isinstance(ref_count_B, jax.Array)
                and not isinstance(ref_count_B, jax.core.Tracer)):
            host = np.asarray(ref_count_B)
            if host.shape == (b,) and (np.any(host < 0) or np.any(host > k)):
                raise ValueError(f"ref_count_B must lie in [0, K={k}], got min {host.min()} "
                                 f"max {host.max()}")
        count_B = jnp.asarray(ref_count_B)
        if not jnp.issubdtype(count_B.dtype, jnp.integer):
            raise ValueError(f"ref_count_B must hold integer counts, got dtype {count_B.dtype}")
        chex.assert_shape(count_B, (b,), custom_message="ref_count_B", exception_type=ValueError)
        count_B = jnp.clip(count_B.astype(jnp.int32), 0, k)
    dtype = jnp.promote_types(jnp.result_type(rewards_BxM, ref_sorted_BxK), jnp.float32)
    if method == "auto":
        method = "compare" if k <= COMPARE_MAX_K else "search"
    row = lambda r_M, ref_K, c: _calibrate_row(r_M, ref_K, c, smoothing, method, full)
    return jax.vmap(row)(rewards_BxM.astype(dtype), ref_sorted_BxK.astype(dtype), count_B)


# ------------------------------------------------------------------------- reference tables
def _ids_array(prompt_ids: Sequence[Any], name: str = "prompt_ids") -> np.ndarray:
    """1-D numpy array of string or integer ids, all of one kind (no silent int -> str)."""
    items = list(prompt_ids)
    ids = np.asarray(items)
    if ids.dtype.kind == "U" and not all(isinstance(i, str) for i in items):
        raise ValueError(f"{name} mixes strings and non-strings: use one kind of id")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of strings or ints, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "Uiu":
        raise ValueError(f"{name} must be all strings or all ints, got dtype {ids.dtype}")
    if ids.dtype.kind == "u":
        ids = ids.astype(np.int64)
    return ids


def _refuse_duplicate_ids(ids: np.ndarray) -> None:
    uniq, n = np.unique(ids, return_counts=True)
    if (n > 1).any():
        raise ReferenceTableError(f"duplicate prompt ids: {_preview(uniq[n > 1].tolist())}")


def _preview(ids: Sequence[Any], limit: int = 20) -> str:
    ids = list(ids)
    more = f" ... and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in ids[:limit]) + more


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceTable:
    """Sorted base-policy rewards per prompt, with the identity of the models behind them.

    Attributes:
      prompt_ids: [B] string or int ids (unique).
      sorted_rewards_BxK: float32 [B, K]; row b sorted ascending in its first counts_B[b]
        entries, padded with +inf after them.
      counts_B: int32 [B], the number of valid reference rewards K_b >= 1 per prompt.
      base_model_id / reward_model_id: what sampled the references and what scored them; loading
        checks them so a table is never used with another reward model.
      version: file-format version (TABLE_VERSION).
      created: JSON-able provenance (UTC time, sample counts, min_count, ...).
      dropped_prompt_ids: prompts removed at build time for too few valid samples.
    """

    prompt_ids: np.ndarray
    sorted_rewards_BxK: np.ndarray
    counts_B: np.ndarray
    base_model_id: str
    reward_model_id: str
    version: int = TABLE_VERSION
    created: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dropped_prompt_ids: tuple[Any, ...] = ()
    _index: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        ids = _ids_array(self.prompt_ids)
        rewards = np.asarray(self.sorted_rewards_BxK, np.float32)
        counts = np.asarray(self.counts_B, np.int32)
        if rewards.ndim != 2 or rewards.shape[0] != ids.shape[0] or counts.shape != ids.shape:
            raise ReferenceTableError(
                f"table shapes disagree: prompt_ids {ids.shape}, sorted_rewards_BxK "
                f"{rewards.shape}, counts_B {counts.shape}")
        if np.any(counts < 1) or np.any(counts > rewards.shape[1]):
            raise ReferenceTableError(f"counts_B must lie in [1, K={rewards.shape[1]}]")
        # The search kernel relies on each row's valid part being finite and sorted.
        valid = np.arange(rewards.shape[1]) < counts[:, None]
        unsorted = np.any(valid[:, 1:] & (rewards[:, 1:] < rewards[:, :-1]), axis=1)
        bad = np.any(valid & ~np.isfinite(rewards), axis=1) | unsorted
        if np.any(bad):
            raise ReferenceTableError(
                f"sorted_rewards_BxK rows must be finite and ascending in their valid part; "
                f"bad prompts: {_preview(ids[bad].tolist())}")
        _refuse_duplicate_ids(ids)
        index = {key: i for i, key in enumerate(ids.tolist())}
        for name, value in (("prompt_ids", ids), ("sorted_rewards_BxK", rewards),
                            ("counts_B", counts), ("_index", index),
                            ("dropped_prompt_ids", tuple(self.dropped_prompt_ids)),
                            ("created", dict(self.created))):
            object.__setattr__(self, name, value)

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_ids.shape[0])

    def lookup(self, prompt_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Rows (sorted_BxK, counts_B) for a batch of prompt ids; missing ids are listed."""
        keys = _ids_array(prompt_ids).tolist()
        missing = [key for key in keys if key not in self._index]
        if missing:
            dropped = set(self.dropped_prompt_ids) & set(missing)
            note = (f" ({_preview(sorted(dropped))} were dropped at build time for too few valid "
                    f"samples)") if dropped else ""
            raise ReferenceTableError(
                f"{len(missing)} prompt id(s) not in the reference table "
                f"(reward model {self.reward_model_id!r}): {_preview(missing)}{note}")
        rows = np.fromiter((self._index[key] for key in keys), np.int64, len(keys))
        return self.sorted_rewards_BxK[rows], self.counts_B[rows]

    def metadata(self) -> dict[str, Any]:
        ids = self.dropped_prompt_ids
        return {"version": self.version, "base_model_id": self.base_model_id,
                "reward_model_id": self.reward_model_id, "created": self.created,
                "dropped_prompt_ids": [i if isinstance(i, str) else int(i) for i in ids]}

    def save(self, path: str) -> str:
        """Writes one `.npz` (arrays + a JSON metadata string) atomically; returns the path."""
        buffer = io.BytesIO()
        np.savez(buffer, prompt_ids=self.prompt_ids, sorted_rewards_BxK=self.sorted_rewards_BxK,
                 counts_B=self.counts_B, metadata=np.asarray(json.dumps(self.metadata())))
        with atomic_open(path, "wb") as f:  # readers see the old file or the complete new one
            f.write(buffer.getvalue())
        return path


def check_table_arguments(prompt_ids: Sequence[Any], *, base_model_id: str,
                          reward_model_id: str, min_count: int = 1, on_empty: str = "raise",
                          k: int | None = None) -> np.ndarray:
    """The checks of `build_reference_table`'s arguments other than the rewards (the ids as an
    array): a pass that draws the rewards first (`rl.calibration_pass`) runs them before it
    samples anything. With `k`, min_count may not exceed it."""
    if on_empty not in ("raise", "drop"):
        raise ValueError(f"on_empty must be 'raise' or 'drop', got {on_empty!r}")
    check.int_arg("min_count", min_count)
    if k is not None and min_count > k:
        raise ValueError(f"min_count={min_count} exceeds k={k}, the samples drawn per prompt: "
                         f"every prompt would be short")
    for name, value in (("base_model_id", base_model_id), ("reward_model_id", reward_model_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    ids = _ids_array(prompt_ids)
    if ids.shape[0] == 0:
        raise ValueError("prompt_ids is empty: a reference table needs at least one prompt")
    _refuse_duplicate_ids(ids)
    return ids


def build_reference_table(prompt_ids: Sequence[Any], rewards_BxK: Any, valid_BxK: Any = None, *,
                          base_model_id: str, reward_model_id: str, min_count: int = 1,
                          on_empty: str = "raise") -> ReferenceTable:
    """Sorted, padded reference table from base-policy rewards (InfAlign Algorithm 1, step 1).

    Args:
      prompt_ids: [B] unique string or int ids.
      rewards_BxK: rewards of K base-policy samples per prompt (values under invalid samples are
        ignored, even NaN).
      valid_BxK: True where the sample is usable (e.g. it ended with EOS); None means all.
      base_model_id / reward_model_id: recorded and checked on load.
      min_count: prompts with fewer valid samples are an error (on_empty="raise", listing them)
        or removed (on_empty="drop", listed in `table.dropped_prompt_ids`). They are never kept
        with an uninformative calibration.
    """
    ids = check_table_arguments(prompt_ids, base_model_id=base_model_id,
                                reward_model_id=reward_model_id, min_count=min_count,
                                on_empty=on_empty)
    rewards = np.asarray(rewards_BxK, np.float64)
    if rewards.ndim != 2 or rewards.shape[0] != ids.shape[0]:
        raise ValueError(f"rewards_BxK must be [B={ids.shape[0]}, K], got shape {rewards.shape}")
    valid = np.ones(rewards.shape, bool) if valid_BxK is None else np.asarray(valid_BxK)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid_BxK shape {valid.shape} != rewards_BxK shape {rewards.shape}")
    valid = valid.astype(bool)
    bad_rows = np.any(valid & ~np.isfinite(rewards), axis=1)
    if np.any(bad_rows):
        raise ValueError(f"rewards_BxK has non-finite (NaN or inf) rewards in valid samples of "
                         f"prompt(s) {_preview(ids[bad_rows].tolist())}")
    counts = valid.sum(axis=1)
    short = counts < int(min_count)
    dropped: list[Any] = []
    if np.any(short):
        short_ids = ids[short].tolist()
        if on_empty == "raise":
            raise ReferenceTableError(
                f"{len(short_ids)} prompt(s) have fewer than min_count={min_count} valid "
                f"reference samples: {_preview(short_ids)} (pass on_empty='drop' to drop them)")
        dropped = short_ids
        ids, rewards, valid, counts = ids[~short], rewards[~short], valid[~short], counts[~short]
        if ids.size == 0:
            raise ReferenceTableError("every prompt was dropped: no valid reference samples")
    # Invalid samples become +inf so one sort puts the valid ones first, ascending.
    sorted_rewards = np.sort(np.where(valid, rewards, np.inf), axis=1)[:, :int(counts.max())]
    created = {"utc": _utc_now(), "num_samples_per_prompt": int(rewards.shape[1]),
               "min_count": int(min_count), "min_valid": int(counts.min()),
               "max_valid": int(counts.max()), "num_dropped": len(dropped)}
    return ReferenceTable(ids, sorted_rewards.astype(np.float32), counts.astype(np.int32),
                          base_model_id=base_model_id, reward_model_id=reward_model_id,
                          created=created, dropped_prompt_ids=tuple(dropped))


def load_reference_table(path: str, *, expected_reward_model_id: str | None = None,
                         expected_base_model_id: str | None = None) -> ReferenceTable:
    """Loads a table saved by `ReferenceTable.save`, checking version and model identity."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference table file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("prompt_ids", "sorted_rewards_BxK", "counts_B")}
            metadata = json.loads(str(data["metadata"]))
        version = metadata["version"]
        base_id, reward_id = metadata["base_model_id"], metadata["reward_model_id"]
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
        raise ReferenceTableError(f"corrupt or unreadable reference table file {path}: {e}") from e
    if version != TABLE_VERSION:
        raise ReferenceTableError(f"reference table {path} has version {version}, this code reads "
                                  f"version {TABLE_VERSION}; rebuild the table")
    for what, expected, found in (("reward", expected_reward_model_id, reward_id),
                                  ("base", expected_base_model_id, base_id)):
        if expected is not None and expected != found:
            raise ReferenceTableError(
                f"reference table {path} was built for {what} model {found!r}, but {what} model "
                f"{expected!r} was expected (ids hold the model's name, a digest of its "
                f"parameters and the settings that change its output); use another work dir, "
                f"or delete the table to rebuild it")
    try:
        return ReferenceTable(arrays["prompt_ids"], arrays["sorted_rewards_BxK"],
                              arrays["counts_B"], base_model_id=base_id, reward_model_id=reward_id,
                              version=version, created=metadata.get("created", {}),
                              dropped_prompt_ids=tuple(metadata.get("dropped_prompt_ids", ())))
    except ValueError as e:
        raise ReferenceTableError(f"inconsistent reference table file {path}: {e}") from e


def calibrate_with_table(table: ReferenceTable, prompt_ids: Sequence[Any], rewards_BxM: Any,
                         smoothing: str = "none", method: str = "auto") -> Array:
    """Checked host-side entry point: validates inputs, gathers the rows, runs `calibrate`."""
    rewards = np.asarray(rewards_BxM)
    if rewards.ndim != 2:
        raise ValueError(f"rewards_BxM must be 2-D [B, M], got shape {rewards.shape}")
    if rewards.dtype.kind not in "fiu":
        raise ValueError(f"rewards_BxM must be numeric, got dtype {rewards.dtype}")
    ids = _ids_array(prompt_ids)
    if ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"prompt_ids has {ids.shape[0]} ids but rewards_BxM has "
                         f"{rewards.shape[0]} rows")
    bad = ~np.all(np.isfinite(rewards), axis=1)
    if np.any(bad):
        raise ValueError(f"rewards_BxM has non-finite (NaN or inf) values for prompt(s) "
                         f"{_preview(ids[bad].tolist())}")
    ref_BxK, counts_B = table.lookup(ids)
    # Round rewards exactly as the stored table was rounded, so equal rewards stay ties.
    rewards = rewards.astype(ref_BxK.dtype)
    return calibrate(rewards, ref_BxK, counts_B, smoothing=smoothing, method=method)
