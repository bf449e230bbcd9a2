"""The calibration pass: K base-policy samples per prompt, scored, into a reference table.

InfAlign Algorithm 1, step 1 (spec 1.5): before any RL, draw K responses z_1..z_K ~ pi_ref(.|x)
for every training prompt x and keep their sorted rewards r(x, z_k); the RL step then calibrates
a policy sample's reward as its win rate against them (`calibration.calibrate`, Eq. 12).

    run_calibration(fns, params, prompt_BxP, prompt_mask_BxP, prompt_ids, reward_fn=... | judge=...,
                    k=..., batch_prompts=..., sampling=..., seed=..., base_model_id=...,
                    reward_model_id=...) -> ReferenceTable

How the samples are drawn. Prompts go through in batches of `batch_prompts` rows (the last batch
is padded by repeating its last prompt, so one compiled shape serves every batch; padded rows are
never scored). Each batch is prefilled once (one jitted prefill, its KV cache reused by every
chunk) and then decoded in chunks of `sampling.n` continuations per prompt until K are drawn
(the last chunk's surplus is dropped). Chunk c of batch b uses the key
`chunk_key(seed, b, c) = fold_in(fold_in(key(seed), b), c)`, so the table is a pure function of
(seed, batch_prompts, sampling config, K, params) -- not of how often the pass was interrupted.

Invalid samples. With `require_eos=True` a sample that did not emit `sampling.eos_id` within
`max_new_tokens` is truncated and masked out of the table (`valid_BxK`); prompts left with fewer
than `min_count` valid samples fail (or are dropped with `on_empty="drop"`). The default is
`require_eos=False`: the RL step (`rl.rl_step`) scores every rollout, truncated or not, so the
reference must come from the same budget-truncated pi_ref for C to be uniform under pi_ref. Use
True only where truncated answers are discarded downstream as well.

Devices and processes. A batch's prompt rows are split over the process's local devices (the
most of them that divide `batch_prompts`; pi_ref is copied to each), which draw the samples one
device would. Each process (on a pod) draws the prompt batches b with b % process_count ==
process_index on its own devices, with the same keys, and the processes then exchange their rows
(`distributed.stack_from_processes`): every process returns the table one process would have
built, at 1/process_count of the sampling each. Every process must call `run_calibration` with
the same arguments. Each keeps its own partial file (`<partial_path>` with
`.process<i>of<n>` before the extension).

Resuming. With `partial_path`, the rewards and validity of every finished chunk are written there
atomically (one small `.npz`) after each chunk, together with a fingerprint of the settings; a
re-run with the same settings skips the finished chunks (same keys, so the same table results),
a re-run with other settings fails naming what differs. The file is removed once the table is
built (and saved to `out_path`, if given). With it, a SIGTERM to a one-process pass (a
scheduler's preemption) ends the pass after the chunk it is in, once that chunk is written, with
`preemption.Preempted` (exit status 143); the same call resumes it. On several processes JAX's
preemption service catches the SIGTERM (to any of them) and picks a chunk of a round where
every process stops, each with its chunks written; a process ahead of the others sets it, and
the others draw on to it (one with no batch left in the last round is ahead by that round).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import zipfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.decoding import sampling
from infalign_jax.core.calibration import (ReferenceTable, build_reference_table,
                                           check_table_arguments)
from infalign_jax.core.types import RewardFn
from infalign_jax.decoding.sampling import SamplingConfig
from infalign_jax.core.types import DecoderFns
from infalign_jax.infra.files import write_npz
from infalign_jax.infra.metrics_io import duration
from infalign_jax.infra import distributed, preemption, validate as check

Params = Any


def chunk_key(seed: int, batch_index: int, chunk_index: int) -> jax.Array:
    """The sampling key of chunk `chunk_index` of prompt batch `batch_index`."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), batch_index), chunk_index)


def ended_with_eos(tokens_RxL: np.ndarray, mask_RxL: np.ndarray, eos_id: int) -> np.ndarray:
    """True where a response emitted EOS inside its budget (the sampler keeps EOS in the mask)."""
    return np.any((np.asarray(tokens_RxL) == eos_id) & np.asarray(mask_RxL, bool), axis=-1)


@functools.lru_cache(maxsize=8)
def _jitted(fns: DecoderFns, max_len: int, cfg: SamplingConfig) -> tuple[Callable, Callable]:
    """(prefill, decode_chunk), jitted once per decoder, length and sampling config."""
    prefill = jax.jit(lambda p, t, m: fns.prefill(p, t, m, max_len))

    @jax.jit
    def decode_chunk(p, t, m, logits_BxV, cache, key):
        # sampling.sample with the prefill already done: the batch's cache serves every chunk.
        cached = fns._replace(prefill=lambda *_: (logits_BxV, cache))
        return sampling.sample(cached, p, t, m, key, cfg)

    return prefill, decode_chunk


def _row_placement(devices: list[Any], batch_prompts: int, params: Params
                   ) -> tuple[jax.sharding.Sharding, Params]:
    """(the sharding of a batch's prompt rows, pi_ref's parameters placed for it): rows split
    over the most of `devices` whose count divides `batch_prompts`, pi_ref replicated on them
    (one device: its own placement, nothing copied)."""
    if not devices:
        raise ValueError("local_devices must name at least one device")
    g = max(d for d in range(1, len(devices) + 1) if batch_prompts % d == 0)
    if g == 1:
        return jax.sharding.SingleDeviceSharding(devices[0]), jax.device_put(params, devices[0])
    mesh = jax.sharding.Mesh(np.asarray(devices[:g]), ("rows",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    return rows, jax.device_put(params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))


def _combine(rewards_XxK: np.ndarray, valid_XxK: np.ndarray, done_BxC: np.ndarray,
             mine_B: np.ndarray, batch_prompts: int, count: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The whole table's rows from every process's share: prompt batch b from process
    b % count. Refuses a share with unfinished chunks (a process that left the loop early)."""
    if not done_BxC[mine_B].all():
        raise RuntimeError("calibration: this process left chunks of its batches undrawn")
    got = distributed.stack_from_processes({"rewards": rewards_XxK, "valid": valid_XxK,
                                            "done": done_BxC})
    if got["rewards"].shape[0] != count:
        raise ValueError(f"calibration: process_count={count}, but {got['rewards'].shape[0]} "
                         f"processes took part")
    owner_X = np.arange(rewards_XxK.shape[0]) // batch_prompts % count
    rows = np.arange(rewards_XxK.shape[0])
    owner_B = np.arange(done_BxC.shape[0]) % count
    if not all(got["done"][owner_B[b], b].all() for b in range(done_BxC.shape[0])):
        raise RuntimeError("calibration: a process returned its share with chunks undrawn")
    return got["rewards"][owner_X, rows], got["valid"][owner_X, rows]


def _load_partial(path: str, fingerprint: dict[str, Any], shape: tuple[int, int, int, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rewards, valid, done) of an earlier interrupted pass with the same settings, or None."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            found = json.loads(str(data["fingerprint"]))
            rewards, valid, done = data["rewards_XxK"], data["valid_XxK"], data["done_BxC"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"calibration partial file {path} is unreadable ({e}); delete it to "
                         f"start the pass over") from e
    if found != fingerprint:
        keys = sorted(k for k in set(found) | set(fingerprint)
                      if found.get(k) != fingerprint.get(k))
        diff = ", ".join(f"{k}: file {found.get(k)!r} vs now {fingerprint.get(k)!r}" for k in keys)
        raise ValueError(f"calibration partial file {path} belongs to a pass with other settings "
                         f"({diff}); delete it or restore those settings")
    if rewards.shape != shape[:2] or valid.shape != shape[:2] or done.shape != shape[2:]:
        raise ValueError(f"calibration partial file {path} has inconsistent shapes "
                         f"({rewards.shape}, {valid.shape}, {done.shape}); delete it")
    return rewards, valid.astype(bool), done.astype(bool)


def _fingerprint(prompt_ids: Sequence[Any], prompt_BxP: np.ndarray, prompt_mask_BxP: np.ndarray,
                 k: int, batch_prompts: int, cfg: SamplingConfig, seed: int, require_eos: bool,
                 base_model_id: str, reward_model_id: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    for a in (np.asarray(prompt_BxP, np.int32), np.asarray(prompt_mask_BxP, bool)):
        digest.update(a.tobytes())
    digest.update(json.dumps([str(i) for i in prompt_ids]).encode())
    return {"prompts_sha256": digest.hexdigest(), "k": int(k), "batch_prompts": int(batch_prompts),
            "sampling": dataclasses.asdict(cfg), "seed": int(seed),
            "require_eos": bool(require_eos),
            "base_model_id": base_model_id, "reward_model_id": reward_model_id}


def _checked_inputs(fns: DecoderFns, params: Any, prompt_BxP: np.ndarray,
                    prompt_mask_BxP: np.ndarray, ids: list, k: int, batch_prompts: int,
                    reward_fn: RewardFn | None, judge: Any, detokenize: Callable | None,
                    prompts_text: Sequence[str] | None, require_eos: bool,
                    sampling_cfg: SamplingConfig, table_args: dict[str, Any]) -> RewardFn:
    """Refuses inconsistent arguments before anything is drawn (the jitted sampler sees traced
    prompts, so its own padding and vocabulary checks cannot); returns the reward function (a
    judge's, wrapped)."""
    if prompt_BxP.ndim != 2 or prompt_mask_BxP.shape != prompt_BxP.shape or \
            len(ids) != prompt_BxP.shape[0]:
        raise ValueError(f"prompts {prompt_BxP.shape}, mask {prompt_mask_BxP.shape} and "
                         f"{len(ids)} prompt_ids must agree on [B, P]")
    check.int_arg("k", k)
    check.int_arg("batch_prompts", batch_prompts)
    check_table_arguments(ids, k=k, **table_args)
    sampling.check_inputs(fns, prompt_BxP, prompt_mask_BxP, sampling_cfg, "run_calibration")
    length = prompt_BxP.shape[1] + sampling_cfg.max_new_tokens
    vocab = jax.eval_shape(lambda p, t, m: fns.prefill(p, t, m, length)[0], params,
                           prompt_BxP[:1], prompt_mask_BxP[:1]).shape[-1]
    sampling.check_vocab(sampling_cfg, vocab, prompt_BxP, prompt_mask_BxP, "run_calibration")
    if (reward_fn is None) == (judge is None):
        raise ValueError("pass exactly one of reward_fn or judge (with detokenize, prompts_text)")
    if require_eos and sampling_cfg.eos_id is None:
        raise ValueError("require_eos=True needs sampling_cfg.eos_id")
    if judge is None:
        return reward_fn
    if detokenize is None or prompts_text is None:
        raise ValueError("a judge needs detokenize and prompts_text (one text per prompt)")
    if len(prompts_text) != prompt_BxP.shape[0]:
        raise ValueError(f"prompts_text has {len(prompts_text)} texts for "
                         f"{prompt_BxP.shape[0]} prompts: one text per prompt")
    from infalign_jax.rewards.judges import text_reward_fn
    return text_reward_fn(judge, detokenize, prompts_text)


def _score_chunk(out: Any, real: np.ndarray, width: int, reward_fn: RewardFn, reward_params: Any,
                 cfg: SamplingConfig, require_eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, valid), each [len(real), width], of one sampled chunk of the real prompts."""
    resp_RxL = out.tokens_BxNxL[: len(real), :width].reshape(-1, cfg.max_new_tokens)
    rmask_RxL = out.mask_BxNxL[: len(real), :width].reshape(-1, cfg.max_new_tokens)
    idx_R = np.repeat(real, width).astype(np.int32)
    scores_R = np.asarray(reward_fn(reward_params, jnp.asarray(idx_R), jnp.asarray(resp_RxL),
                                    jnp.asarray(rmask_RxL)), np.float32)
    if scores_R.shape != idx_R.shape:
        raise ValueError(f"reward_fn returned shape {scores_R.shape} for {idx_R.size} responses")
    ok_R = ended_with_eos(resp_RxL, rmask_RxL, cfg.eos_id) if require_eos else \
        np.ones(idx_R.shape, bool)
    return scores_R.reshape(len(real), width), ok_R.reshape(len(real), width)


def run_calibration(fns: DecoderFns, params: Params, prompt_BxP: Any, prompt_mask_BxP: Any,
                    prompt_ids: Sequence[Any], reward_fn: RewardFn | None = None, *,
                    reward_params: Any = None, judge: Any = None,
                    detokenize: Callable[[np.ndarray], str] | None = None,
                    prompts_text: Sequence[str] | None = None, k: int, batch_prompts: int,
                    sampling_cfg: SamplingConfig, seed: int, base_model_id: str,
                    reward_model_id: str, require_eos: bool = False, min_count: int = 1,
                    on_empty: str = "raise", partial_path: str | None = None,
                    out_path: str | None = None,
                    progress: Callable[[str], None] | None = print,
                    process_index: int | None = None,
                    process_count: int | None = None,
                    local_devices: Sequence[Any] | None = None) -> ReferenceTable:
    """Reference table of K pi_ref samples per prompt (InfAlign Algorithm 1, step 1).

    Args:
      fns, params: the base policy pi_ref (`models.decoder_fns(cfg)` and its parameters).
      prompt_BxP, prompt_mask_BxP: all B prompts, left-padded, in the order of `prompt_ids`.
      reward_fn: `reward_fn(reward_params, prompt_idx_R, response_RxL, mask_RxL) -> rewards_R`,
        the RL step's reward (prompt_idx_R indexes the B prompts). Or, instead, `judge` +
        `detokenize` + `prompts_text`, turned into one by `judges.text_reward_fn`.
      k: samples per prompt; batch_prompts: prompts per sampler call; sampling_cfg.n: samples per
        prompt per call (the chunk); its other fields set budget, temperature, EOS and pad ids.
      require_eos / min_count / on_empty: invalid-sample masking (module docstring).
      partial_path: side file that makes the pass resumable; out_path: save the table there.
      progress: called with one line after every chunk (prompts done, samples/s, ETA); None: quiet.
      process_index / process_count: this process and how many share the pass (default JAX's);
        each draws its share of the prompt batches (module docstring).
      local_devices: the devices a batch's rows are split over (default this process's
        `jax.local_devices()`; pi_ref is copied to each). The most of them that divide
        `batch_prompts` are used, so the table does not depend on how many there are.

    One function on purpose: the loops over prompt batches and sample chunks, the resume
    bookkeeping (`done_BxC`, the partial file) and the progress line share every index.
    """
    say = progress or (lambda _: None)
    prompt_BxP = np.asarray(prompt_BxP, np.int32)
    prompt_mask_BxP = np.asarray(prompt_mask_BxP, bool)
    ids = list(prompt_ids)
    num = prompt_BxP.shape[0]
    reward_fn = _checked_inputs(fns, params, prompt_BxP, prompt_mask_BxP, ids, k, batch_prompts,
                                reward_fn, judge, detokenize, prompts_text, require_eos,
                                sampling_cfg, dict(base_model_id=base_model_id,
                                                   reward_model_id=reward_model_id,
                                                   min_count=min_count, on_empty=on_empty))

    cfg, chunk = sampling_cfg, sampling_cfg.n
    batch_prompts = min(batch_prompts, num)
    num_batches, num_chunks = math.ceil(num / batch_prompts), math.ceil(k / chunk)
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, process_count={count})")
    mine_B = np.arange(num_batches) % count == index
    if count > 1 and partial_path:
        stem, ext = os.path.splitext(partial_path)
        partial_path = f"{stem}.process{index}of{count}{ext}"
    fingerprint = _fingerprint(ids, prompt_BxP, prompt_mask_BxP, k, batch_prompts, cfg, seed,
                               require_eos, base_model_id, reward_model_id)
    shape = (num, k, num_batches, num_chunks)
    resumed = _load_partial(partial_path, fingerprint, shape) if partial_path else None
    if resumed is None:
        rewards_XxK, valid_XxK = np.zeros((num, k), np.float32), np.zeros((num, k), bool)
        done_BxC = np.zeros((num_batches, num_chunks), bool)
    else:
        rewards_XxK, valid_XxK, done_BxC = resumed
        say(f"calibration: resuming from {partial_path} ({int(done_BxC.sum())}/"
            f"{done_BxC.size} chunks done)")

    prefill, decode_chunk = _jitted(fns, prompt_BxP.shape[1] + cfg.max_new_tokens, cfg)
    devices = list(jax.local_devices() if local_devices is None else local_devices)
    place, params = _row_placement(devices, batch_prompts, params)
    if len(devices) > 1:
        say(f"calibration: each batch of {batch_prompts} prompts split over "
            f"{place.num_devices} of {len(devices)} local devices")

    def samples_in(b: int, c: int) -> int:
        return min(batch_prompts, num - b * batch_prompts) * (min((c + 1) * chunk, k) - c * chunk)

    total = sum(samples_in(b, c) for b, c in zip(*np.nonzero(~done_BxC & mine_B[:, None])))
    mine = sum(min(batch_prompts, num - i * batch_prompts) for i in np.flatnonzero(mine_B))
    whose = f" (process {index}'s share)" if count > 1 else ""
    start, drawn = time.perf_counter(), 0
    # A SIGTERM (a scheduler's preemption) ends the pass after the chunk it is in, once that
    # chunk is in the partial file; without one there is nothing to keep, and it acts at once.
    # On several processes JAX's service holds SIGTERM and picks the chunk all stop after: each
    # process goes through the same rounds (process i draws batch round * count + i of each),
    # giving the service a count at every chunk of every round, its own batch or none.
    noted = preemption.sigterm_noted() if partial_path else contextlib.nullcontext(lambda: False)
    rounds, origin = math.ceil(num_batches / count), preemption.counts_given()
    with noted as sigterm:
        for r in range(rounds):
            b = r * count + index
            todo = b < num_batches and not done_BxC[b].all()
            if todo:
                rows = np.minimum(np.arange(b * batch_prompts, (b + 1) * batch_prompts), num - 1)
                real = rows[: min(batch_prompts, num - b * batch_prompts)]
                tokens, mask = jax.device_put((prompt_BxP[rows], prompt_mask_BxP[rows]), place)
                logits_BxV, cache = prefill(params, tokens, mask)
            for c in range(num_chunks):
                if todo and not done_BxC[b, c]:
                    out = jax.device_get(decode_chunk(params, tokens, mask, logits_BxV, cache,
                                                      chunk_key(seed, b, c)))
                    lo, hi = c * chunk, min((c + 1) * chunk, k)
                    scores, ok = _score_chunk(out, real, hi - lo, reward_fn, reward_params, cfg,
                                              require_eos)
                    rewards_XxK[real, lo:hi], valid_XxK[real, lo:hi] = scores, ok
                    done_BxC[b, c] = True
                    if partial_path:
                        write_npz(partial_path, rewards_XxK=rewards_XxK, valid_XxK=valid_XxK,
                                  done_BxC=done_BxC,
                                  fingerprint=np.asarray(json.dumps(fingerprint)))
                    drawn += samples_in(b, c)
                    elapsed = time.perf_counter() - start
                    prompts_done = sum(min(batch_prompts, num - i * batch_prompts)
                                       for i in range(num_batches)
                                       if done_BxC[i].all() and mine_B[i])
                    say(f"calibration: prompts {prompts_done}/{mine}{whose} (batch {b + 1}/"
                        f"{num_batches}, chunk {c + 1}/{num_chunks}), {drawn / elapsed:.1f} "
                        f"samples/s, elapsed {duration(elapsed)}, ETA "
                        f"{duration((total - drawn) * elapsed / drawn)}")
                    stop = sigterm()   # the last chunk too: a rerun then builds the table at once
                else:
                    stop = False
                step = r * num_chunks + c + 1
                if partial_path and count > 1 and preemption.reached_sync_point(origin + step):
                    say(f"SIGTERM: calibration stopped after round {r + 1}/{rounds}, chunk "
                        f"{c + 1}/{num_chunks}, where every process stops ({int(done_BxC.sum())}"
                        f"/{int(done_BxC[mine_B].size)} of this process's chunks), saved in "
                        f"{partial_path}; the same command resumes it")
                    raise preemption.Preempted(None)
                if stop:
                    say(f"SIGTERM: calibration stopped after batch {b + 1}, chunk {c + 1} "
                        f"({int(done_BxC.sum())}/{done_BxC.size} chunks), saved in "
                        f"{partial_path}; the same command resumes it")
                    raise preemption.Preempted(None)

    if count > 1:
        rewards_XxK, valid_XxK = _combine(rewards_XxK, valid_XxK, done_BxC, mine_B,
                                          batch_prompts, count)
    seconds = time.perf_counter() - start
    table = build_reference_table(ids, rewards_XxK, valid_XxK, base_model_id=base_model_id,
                                  reward_model_id=reward_model_id, min_count=min_count,
                                  on_empty=on_empty)
    table = dataclasses.replace(table, created=dict(
        table.created, seed=int(seed), batch_prompts=int(batch_prompts), chunk=int(chunk),
        max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
        require_eos=bool(require_eos), num_invalid=int((~valid_XxK).sum()),
        seconds=round(seconds, 3), processes=count))
    if out_path:   # one writer; every process returns the same table once it is written
        if index == 0:
            table.save(out_path)
        if count > 1:
            distributed.barrier(distributed.numbered("calibration_table_saved"))
    if partial_path and os.path.exists(partial_path):
        os.remove(partial_path)
    say(f"calibration: done, {num} prompts x K={k} in {duration(seconds)} "
        f"({int((~valid_XxK).sum())} invalid samples masked)")
    return table
