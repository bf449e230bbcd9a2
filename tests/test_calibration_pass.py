"""The calibration pass against hand sampling with the same keys, masking, progress, resume."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infalign_jax.infra import preemption
from infalign_jax.rl import calibration_pass as cp
from infalign_jax import models
from infalign_jax.decoding import sampling
from infalign_jax.core.calibration import load_reference_table

CFG = models.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                         head_dim=8, d_ff=32, max_len=32)
PARAMS = models.init_params(CFG, jax.random.key(0))
FNS = models.decoder_fns(CFG)
# Three prompts of different lengths, left-padded with 0.
PROMPTS = np.array([[0, 0, 1, 2], [0, 3, 4, 1], [2, 2, 6, 7]], np.int32)
MASK = PROMPTS != 0
MASK[2] = True
IDS = ["a", "b", "c"]
TOKEN, EOS = 3, 5


def count_reward(reward_params, idx_R, resp_RxL, mask_RxL):
    del reward_params, idx_R
    return jnp.sum((resp_RxL == TOKEN) & mask_RxL, axis=-1).astype(jnp.float32)


def _hand(k, batch_prompts, scfg, seed):
    """(rewards_XxK, ended_XxK) drawn with plain `sampling.sample` (its own prefill) and numpy."""
    num = PROMPTS.shape[0]
    rewards = np.zeros((num, k))
    ended = np.zeros((num, k), bool)
    for b in range(-(-num // batch_prompts)):
        rows = np.minimum(np.arange(b * batch_prompts, (b + 1) * batch_prompts), num - 1)
        real = rows[: min(batch_prompts, num - b * batch_prompts)]
        for c in range(-(-k // scfg.n)):
            out = sampling.sample(FNS, PARAMS, jnp.asarray(PROMPTS[rows]), jnp.asarray(MASK[rows]),
                                  cp.chunk_key(seed, b, c), scfg)
            tok = np.asarray(out.tokens_BxNxL)[: len(real)]
            msk = np.asarray(out.mask_BxNxL)[: len(real)]
            lo, hi = c * scfg.n, min((c + 1) * scfg.n, k)
            for j in range(lo, hi):
                for r, p in enumerate(real):
                    seq = tok[r, j - lo][msk[r, j - lo]].tolist()
                    rewards[p, j] = seq.count(TOKEN)
                    ended[p, j] = EOS in seq
    return rewards, ended


def _run(**kw):
    args = dict(k=7, batch_prompts=2, seed=3, base_model_id="tiny-base",
                reward_model_id="count-3", progress=None,
                sampling_cfg=sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=EOS, pad_id=0))
    args.update(kw)
    return cp.run_calibration(FNS, PARAMS, PROMPTS, MASK, IDS, **args)


def test_table_equals_hand_sampling_with_same_keys(tmp_path):
    path = str(tmp_path / "table.npz")
    table = _run(reward_fn=count_reward, out_path=path)
    rewards, _ = _hand(7, 2, sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=EOS), 3)
    np.testing.assert_array_equal(table.sorted_rewards_BxK, np.sort(rewards, axis=1))
    np.testing.assert_array_equal(table.counts_B, [7, 7, 7])
    assert list(table.prompt_ids) == IDS
    assert rewards.std() > 0  # the reward is not trivially constant
    loaded = load_reference_table(path, expected_reward_model_id="count-3",
                                  expected_base_model_id="tiny-base")
    np.testing.assert_array_equal(loaded.sorted_rewards_BxK, table.sorted_rewards_BxK)
    assert loaded.created["seed"] == 3 and loaded.created["num_invalid"] == 0


def test_each_sample_is_scored_with_its_own_prompt_index():
    """The reward function gets each sample's own prompt index (a prompt-aware reward: the
    count plus 10 x the index), in batches of 2 prompts x chunks of 3 samples; and the chunk
    keys are the documented fold_in(fold_in(key(seed), batch), chunk)."""
    def indexed_reward(reward_params, idx_R, resp_RxL, mask_RxL):
        return count_reward(reward_params, idx_R, resp_RxL, mask_RxL) + 10.0 * idx_R

    table = _run(reward_fn=indexed_reward)
    rewards, _ = _hand(7, 2, sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=EOS), 3)
    want = np.sort(rewards + 10.0 * np.arange(3)[:, None], axis=1)
    np.testing.assert_array_equal(table.sorted_rewards_BxK, want)
    for b, c in ((0, 1), (1, 0), (1, 2)):
        want_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), b), c)
        np.testing.assert_array_equal(jax.random.key_data(cp.chunk_key(3, b, c)),
                                      jax.random.key_data(want_key))


def test_judge_path_matches_reward_fn():
    # A text judge (text length) through detokenize gives the hand count of non-pad characters.
    detok = lambda ids: "".join("x" if int(t) == TOKEN else "" for t in ids)
    judge = lambda prompts, responses: np.array([len(r) for r in responses], np.float32)
    table = _run(judge=judge, detokenize=detok, prompts_text=["p0", "p1", "p2"])
    rewards, _ = _hand(7, 2, sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=EOS), 3)
    np.testing.assert_array_equal(table.sorted_rewards_BxK, np.sort(rewards, axis=1))
    # one text per prompt, refused before anything is drawn (2 texts: a callback error after
    # the first batch was drawn and scored; 4 texts were accepted)
    for texts in (["p0", "p1"], ["p0", "p1", "p2", "p3"]):
        with pytest.raises(ValueError, match=f"prompts_text has {len(texts)} texts for 3"):
            _run(judge=judge, detokenize=detok, prompts_text=texts)


def test_invalid_samples_without_eos_are_masked():
    table = _run(reward_fn=count_reward, k=8, require_eos=True, on_empty="drop")
    rewards, ended = _hand(8, 2, sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=EOS), 3)
    assert 0 < ended.sum() < ended.size  # both kinds occur, so masking is exercised
    keep = ended.any(axis=1)
    assert list(table.prompt_ids) == [i for i, k in zip(IDS, keep) if k]
    np.testing.assert_array_equal(table.counts_B, ended.sum(axis=1)[keep])
    for row, p in enumerate(np.flatnonzero(keep)):
        want = np.sort(rewards[p][ended[p]])
        np.testing.assert_array_equal(table.sorted_rewards_BxK[row, : len(want)], want)
        assert np.all(np.isinf(table.sorted_rewards_BxK[row, len(want):]))
    assert table.created["num_invalid"] == int((~ended).sum())


def test_progress_lines():
    lines = []
    _run(reward_fn=count_reward, progress=lines.append)
    chunk_lines = [s for s in lines if "samples/s" in s]
    assert len(chunk_lines) == 2 * 3  # 2 prompt batches x ceil(7 / 3) chunks
    assert "prompts 0/3" in chunk_lines[0] and "prompts 2/3" in chunk_lines[2]
    assert "prompts 3/3" in chunk_lines[-1] and "ETA 0m00s" in chunk_lines[-1]
    assert all("ETA" in s for s in chunk_lines) and "done" in lines[-1]


def test_resume_reuses_finished_chunks(tmp_path):
    partial = str(tmp_path / "table.partial.npz")
    calls = []

    def dies_after_two(rp, idx, resp, mask):
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the third chunk
        calls.append(idx)
        return count_reward(rp, idx, resp, mask)

    with pytest.raises(KeyboardInterrupt):
        _run(reward_fn=dies_after_two, partial_path=partial)
    assert os.path.exists(partial)

    scored = []

    def counting(rp, idx, resp, mask):
        scored.append(np.asarray(idx))
        return count_reward(rp, idx, resp, mask)

    lines = []
    resumed = _run(reward_fn=counting, partial_path=partial, progress=lines.append)
    assert len(scored) == 6 - 2 and "resuming" in lines[0] and "2/6 chunks done" in lines[0]
    assert not os.path.exists(partial)
    fresh = _run(reward_fn=count_reward)
    np.testing.assert_array_equal(resumed.sorted_rewards_BxK, fresh.sorted_rewards_BxK)

    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        _run(reward_fn=dies_after_two, partial_path=partial)
    with pytest.raises(ValueError, match=r"other settings \(seed: file 3 vs now 4\)"):
        _run(reward_fn=count_reward, partial_path=partial, seed=4)


def test_a_sigterm_stops_the_pass_after_its_chunk_and_the_same_call_resumes(tmp_path):
    """A scheduler's SIGTERM during the pass (one process, with a partial file) lets the chunk it
    came in finish and be written, then ends the pass with Preempted (exit status 143) instead of
    killing it mid-chunk; the same call resumes from there and builds the uninterrupted table.
    Without a partial file there is nothing to keep, and SIGTERM keeps its default action."""
    partial = str(tmp_path / "table.partial.npz")
    calls = []

    def signalled_in_the_second_chunk(rp, idx, resp, mask):
        calls.append(idx)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return count_reward(rp, idx, resp, mask)

    lines = []
    with pytest.raises(preemption.Preempted) as stopped:
        _run(reward_fn=signalled_in_the_second_chunk, partial_path=partial,
             progress=lines.append)
    assert stopped.value.code == 143 and stopped.value.step is None
    assert len(calls) == 2 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert lines[-1].startswith("SIGTERM: calibration stopped after batch 1, chunk 2 (2/6 chunks)")
    with np.load(partial) as kept:
        assert kept["done_BxC"].tolist() == [[True, True, False], [False, False, False]]

    scored = []

    def counting(rp, idx, resp, mask):
        scored.append(idx)
        return count_reward(rp, idx, resp, mask)

    resumed = _run(reward_fn=counting, partial_path=partial)
    assert len(scored) == 6 - 2 and not os.path.exists(partial)
    np.testing.assert_array_equal(resumed.sorted_rewards_BxK,
                                  _run(reward_fn=count_reward).sorted_rewards_BxK)

    # in the last chunk: stopped all the same; the rerun draws nothing and builds the table
    calls.clear()

    def signalled_in_the_last_chunk(rp, idx, resp, mask):
        calls.append(idx)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return count_reward(rp, idx, resp, mask)

    with pytest.raises(preemption.Preempted):
        _run(reward_fn=signalled_in_the_last_chunk, partial_path=partial)
    scored.clear()
    again = _run(reward_fn=counting, partial_path=partial)
    assert scored == [] and not os.path.exists(partial)
    np.testing.assert_array_equal(again.sorted_rewards_BxK, resumed.sorted_rewards_BxK)

    # no partial file: the default action (the handler is not installed during the pass)
    seen = []

    def handler_during_the_pass(rp, idx, resp, mask):
        seen.append(signal.getsignal(signal.SIGTERM))
        return count_reward(rp, idx, resp, mask)

    _run(reward_fn=handler_during_the_pass, partial_path=partial)
    _run(reward_fn=handler_during_the_pass)
    assert seen[0] not in (signal.SIG_DFL, None) and set(seen[6:]) == {signal.SIG_DFL}


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="exactly one of reward_fn or judge"):
        _run()
    with pytest.raises(ValueError, match="k must be a positive integer"):
        _run(reward_fn=count_reward, k=0)
    with pytest.raises(ValueError, match="require_eos=True needs sampling_cfg.eos_id"):
        _run(reward_fn=count_reward, require_eos=True,
             sampling_cfg=sampling.SamplingConfig(n=2, max_new_tokens=4))
    with pytest.raises(ValueError, match="a judge needs detokenize"):
        _run(judge=lambda p, r: np.zeros(len(r)))


def test_bad_prompts_and_table_arguments_are_refused_before_any_sample():
    """The jitted sampler sees traced prompts, so its padding and vocabulary checks passed:
    right-padded prompts and ids outside the vocabulary were drawn from (pi_ref conditioned on
    a pad position or a clamped id). Duplicate ids, an empty model id and min_count > k were
    refused only after every sample was drawn and scored."""
    calls = []

    def counted(*args):
        calls.append(1)
        return count_reward(*args)

    right = np.array([[1, 2, 0, 0], [3, 4, 1, 0], [2, 2, 6, 7]], np.int32)
    oov = PROMPTS.copy()
    oov[0, 3] = 99
    for kw, match in (
            (dict(prompts=right, mask=right != 0), r"run_calibration: prompt_mask_BxP rows "
                                                   r"\[0, 1\] are not left-padded"),
            (dict(prompts=oov), r"run_calibration: prompt_BxP holds token ids outside the "
                                r"decoder's vocabulary \[0, 8\): \[99\]"),
            (dict(ids=["a", "b", "a"]), r"duplicate prompt ids: 'a'"),
            (dict(reward_model_id=""), r"reward_model_id must be a non-empty string"),
            (dict(min_count=8), r"min_count=8 exceeds k=7"),
            (dict(min_count=1.5), r"min_count must be a positive integer"),
            (dict(on_empty="keep"), r"on_empty must be 'raise' or 'drop'")):
        prompts, mask = kw.pop("prompts", PROMPTS), kw.pop("mask", MASK)
        ids = kw.pop("ids", IDS)
        args = dict(k=7, batch_prompts=2, seed=3, base_model_id="tiny-base",
                    reward_model_id="count-3", progress=None, reward_fn=counted,
                    sampling_cfg=sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=EOS))
        with pytest.raises(ValueError, match=match):
            cp.run_calibration(FNS, PARAMS, prompts, mask, ids, **{**args, **kw})
    assert not calls


def test_rows_split_over_local_devices_give_the_one_device_table():
    """A batch's prompts split over the local devices (the most that divide the batch: 3 of 4
    for 3 prompts) draw the very samples one device draws."""
    one = _run(reward_fn=count_reward, batch_prompts=3, local_devices=jax.devices()[:1])
    lines = []
    split = _run(reward_fn=count_reward, batch_prompts=3, local_devices=jax.devices()[:4],
                 progress=lines.append)
    assert "each batch of 3 prompts split over 3 of 4 local devices" in lines[0]
    np.testing.assert_array_equal(split.sorted_rewards_BxK, one.sorted_rewards_BxK)
    rewards, _ = _hand(7, 3, sampling.SamplingConfig(n=3, max_new_tokens=6, eos_id=EOS), 3)
    np.testing.assert_array_equal(split.sorted_rewards_BxK, np.sort(rewards, axis=1))
    with pytest.raises(ValueError, match="local_devices must name at least one device"):
        _run(reward_fn=count_reward, local_devices=[])


def test_on_several_processes_every_chunk_of_every_round_gives_the_service_a_count(
        tmp_path, monkeypatch):
    """On several processes JAX's preemption service picks the count where all stop, so each
    process must give it the same counts: one per chunk of every round, drawn, resumed or with
    no batch (process 1 of 2 draws batch 1 of 3, then nothing in round 2). The pass stops after
    the chunk whose count the service picked, with that chunk written; the counts rise from
    those given before, and a finished pass gives all 6."""
    asked, stop_at = [], []
    monkeypatch.setattr(preemption, "_ask_service",
                        lambda count: asked.append(count) or count in stop_at)
    partial = str(tmp_path / "table.partial.npz")
    kept = str(tmp_path / "table.partial.process1of2.npz")
    scored = []

    def counting(rp, idx, resp, mask):
        scored.append(np.asarray(idx).tolist())
        return count_reward(rp, idx, resp, mask)

    def run(lines):
        return _run(reward_fn=counting, batch_prompts=1, partial_path=partial,
                    progress=lines.append, process_index=1, process_count=2)

    origin, lines = preemption.counts_given(), []
    stop_at.append(origin + 2)
    with pytest.raises(preemption.Preempted):
        run(lines)
    assert asked == [origin + 1, origin + 2] and scored == [[1, 1, 1]] * 2
    assert lines[-1].startswith("SIGTERM: calibration stopped after round 1/2, chunk 2/3, where "
                                "every process stops (2/3 of this process's chunks), saved in")
    with np.load(kept) as got:
        assert got["done_BxC"].tolist() == [[False] * 3, [True, True, False], [False] * 3]

    origin, lines = preemption.counts_given(), []
    assert origin == stop_at[-1]
    asked.clear(), scored.clear(), stop_at.append(origin + 5)   # round 2, no batch of its own
    with pytest.raises(preemption.Preempted):
        run(lines)
    assert asked == [origin + c for c in range(1, 6)] and scored == [[1]]   # K = 7: 3 + 3 + 1
    assert lines[-1].startswith("SIGTERM: calibration stopped after round 2/2, chunk 2/3, where "
                                "every process stops (3/3 of this process's chunks)")

    origin = preemption.counts_given()
    asked.clear(), scored.clear()
    with pytest.raises(ValueError, match="process_count=2, but 1 processes took part"):
        run([])   # the rows are exchanged after the rounds; one process cannot make them up
    assert asked == [origin + c for c in range(1, 7)] and scored == []
    assert preemption.counts_given() == origin + 6

    # one process: the service is never asked (SIGTERM is this process's own)
    asked.clear()
    _run(reward_fn=count_reward, partial_path=partial)
    assert asked == []


def test_on_several_processes_without_a_partial_file_the_service_is_never_asked(monkeypatch):
    """Without a partial file there is nothing to stop at (no chunk is kept): the pass gives
    JAX's service no counts, so the training steps' counts start where they would have."""
    asked = []
    monkeypatch.setattr(preemption, "_ask_service", lambda count: asked.append(count) or True)
    given = preemption.counts_given()
    with pytest.raises(ValueError, match="process_count=2, but 1 processes took part"):
        _run(reward_fn=count_reward, batch_prompts=1, process_index=1, process_count=2)
    assert asked == [] and preemption.counts_given() == given
