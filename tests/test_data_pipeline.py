"""Deterministic, resumable, sharded loader."""

import itertools
import json

import numpy as np
import pytest

from infalign_jax.data import (LoaderConfig, batch_indices, epoch_permutation, example_index,
                               global_batch_indices, make_loader)
from infalign_jax.data.pipeline import dropped_per_epoch

N = 23


def arrays(n=N):
    # Each row's contents encode its index, so a batch can be checked against its row indices.
    return {"tokens_NxT": np.arange(n * 3, dtype=np.int32).reshape(n, 3) + 1000,
            "mask_NxT": (np.arange(n * 3).reshape(n, 3) % 2).astype(bool)}


def take(loader, k):
    return list(itertools.islice(loader, k))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_epoch_permutation_is_pure_and_a_permutation():
    p0 = epoch_permutation(7, 0, N)
    np.testing.assert_array_equal(p0, epoch_permutation(7, 0, N))
    perms = [epoch_permutation(7, e, N) for e in range(4)]
    for p in perms:
        assert sorted(p.tolist()) == list(range(N))
    assert len({tuple(p) for p in perms}) == 4                  # every epoch reshuffles
    assert not np.array_equal(p0, epoch_permutation(8, 0, N))   # the seed matters
    assert [example_index(7, 2, i, N) for i in range(N)] == perms[2].tolist()
    with pytest.raises(ValueError, match="position i=23"):
        example_index(7, 0, N, N)


def test_batches_hold_the_rows_they_name():
    loader = make_loader(arrays(), LoaderConfig(batch_size=4, seed=1))
    data = arrays()
    for batch in take(loader, 12):
        rows = batch["example_index_B"]
        assert rows.shape == (4,) and batch["tokens_NxT"].shape == (4, 3)
        np.testing.assert_array_equal(batch["tokens_NxT"], data["tokens_NxT"][rows])
        np.testing.assert_array_equal(batch["mask_NxT"], data["mask_NxT"][rows])


def test_same_seed_same_order_and_epochs_cover_the_data():
    cfg = LoaderConfig(batch_size=5, seed=3, num_epochs=3)
    a = list(make_loader(arrays(), cfg))
    assert_same_batches(a, list(make_loader(arrays(), cfg)))
    assert len(a) == 3 * (N // 5)                               # drop_remainder: 4 per epoch
    epochs = [np.concatenate([b["example_index_B"] for b in a[e * 4:(e + 1) * 4]])
              for e in range(3)]
    for e, rows in enumerate(epochs):
        assert len(set(rows.tolist())) == 20                    # no repeats within an epoch
        np.testing.assert_array_equal(rows, epoch_permutation(3, e, N)[:20])
    other = list(make_loader(arrays(), LoaderConfig(batch_size=5, seed=4, num_epochs=3)))
    assert not np.array_equal(other[0]["example_index_B"], a[0]["example_index_B"])


def test_no_shuffle_and_keep_remainder():
    cfg = LoaderConfig(batch_size=10, seed=0, shuffle=False, drop_remainder=False, num_epochs=2)
    rows = [b["example_index_B"].tolist() for b in make_loader(arrays(), cfg)]
    assert rows == [list(range(10)), list(range(10, 20)), [20, 21, 22]] * 2


@pytest.mark.parametrize("k", [0, 1, 4, 5, 9])
def test_resume_in_new_loader_matches_uninterrupted_run(k):
    cfg = LoaderConfig(batch_size=4, seed=11)   # 5 steps per epoch: k crosses epoch boundaries
    uninterrupted = take(make_loader(arrays(), cfg), k + 7)
    first = make_loader(arrays(), cfg)
    head = take(first, k)
    state = json.loads(json.dumps(first.get_state()))          # through a checkpoint file
    assert (state["epoch"], state["position"]) == divmod(k, 5)
    resumed = make_loader(arrays(), cfg)
    resumed.set_state(state)
    assert_same_batches(head + take(resumed, 7), uninterrupted)


def test_resume_from_epoch_and_position_only():
    cfg = LoaderConfig(batch_size=4, seed=2)
    loader = make_loader(arrays(), cfg)
    loader.set_state({"epoch": 2, "position": 3})
    np.testing.assert_array_equal(next(loader)["example_index_B"],
                                  epoch_permutation(2, 2, N)[12:16])


def test_set_state_refuses_other_data_or_order():
    loader = make_loader(arrays(), LoaderConfig(batch_size=4, seed=2))
    state = loader.get_state()
    with pytest.raises(ValueError, match="seed=2"):
        make_loader(arrays(), LoaderConfig(batch_size=4, seed=3)).set_state(state)
    with pytest.raises(ValueError, match="n=23"):
        make_loader(arrays(22), LoaderConfig(batch_size=4, seed=2)).set_state(state)
    with pytest.raises(ValueError, match="expected 'step'"):
        loader.set_state({"position": 1})


def test_batch_indices_agree_with_iteration():
    cfg = LoaderConfig(batch_size=6, seed=5, num_epochs=4)
    batches = list(make_loader(arrays(), cfg))
    assert len(batches) == 4 * 3
    for step, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["example_index_B"], batch_indices(cfg, N, step))
        epoch, pos = divmod(step, 3)
        expected = [example_index(5, epoch, pos * 6 + j, N) for j in range(6)]
        assert batch_indices(cfg, N, step).tolist() == expected
    with pytest.raises(ValueError, match="step 12 outside"):
        batch_indices(cfg, N, 12)


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(count):
    base = LoaderConfig(batch_size=8, seed=9, num_epochs=2)
    global_batches = [b["example_index_B"] for b in make_loader(arrays(), base)]
    shards = [[b["example_index_B"] for b in make_loader(
        arrays(), LoaderConfig(batch_size=8, seed=9, num_epochs=2, process_index=p,
                               process_count=count))] for p in range(count)]
    for step, global_rows in enumerate(global_batches):
        parts = [shards[p][step] for p in range(count)]
        assert all(len(part) == 8 // count for part in parts)
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == 8                    # disjoint
        assert set(union.tolist()) == set(global_rows.tolist())  # union = global batch
        np.testing.assert_array_equal(union, global_batch_indices(base, N, step))


@pytest.mark.parametrize("kwargs,field", [
    (dict(batch_size=0, seed=0), "batch_size"),
    (dict(batch_size=6, seed=0, process_count=4), "batch_size"),
    (dict(batch_size=4, seed=-1), "seed"),
    (dict(batch_size=4, seed=0, num_epochs=0), "num_epochs"),
    (dict(batch_size=4, seed=0, process_index=2, process_count=2), "process_index"),
    (dict(batch_size=4, seed=0, process_count=0), "process_count"),
    (dict(batch_size=4, seed=0, process_count=2, drop_remainder=False), "drop_remainder"),
    (dict(batch_size=4, seed=0, shuffle=1), "shuffle"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LoaderConfig.{field}"):
        LoaderConfig(**kwargs)


def test_bad_arrays_and_too_small_data():
    cfg = LoaderConfig(batch_size=4, seed=0)
    with pytest.raises(ValueError, match="leading dimension"):
        make_loader({"a": np.zeros(5), "b": np.zeros(6)}, cfg)
    with pytest.raises(ValueError, match="non-empty dict"):
        make_loader({}, cfg)
    with pytest.raises(ValueError, match="fewer than LoaderConfig.batch_size=4"):
        make_loader({"a": np.zeros(3)}, cfg)


def test_file_to_batches_end_to_end(tmp_path):
    from infalign_jax.data import TokenizeConfig, read_preferences, tokenize_preferences
    rows = [{"prompt": "ab" * (i % 3 + 1), "chosen": "c" * (i % 2 + 1), "rejected": "d"}
            for i in range(9)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = read_preferences(path)
    vocab = {"a": 3, "b": 4, "c": 5, "d": 6}
    packed, _ = tokenize_preferences(examples, lambda s: [vocab[ch] for ch in s],
                                     TokenizeConfig(6, 3, eos_id=1))
    loader = make_loader(packed, LoaderConfig(batch_size=4, seed=0, num_epochs=1))
    seen = []
    for batch in loader:
        assert batch["prompt_BxP"].shape == (4, 6) and batch["chosen_BxL"].shape == (4, 3)
        for row, line, mask in zip(batch["example_index_B"], batch["line_B"],
                                   batch["chosen_mask_BxL"]):
            assert line == row + 1                      # rows are the file's lines in order
            assert mask.sum() == len(rows[row]["chosen"]) + 1
        seen += batch["example_index_B"].tolist()
    assert len(seen) == 8 and len(set(seen)) == 8


def test_rows_left_out_by_drop_remainder_are_counted():
    # 23 rows in batches of 5: 4 batches, 3 rows left out of every epoch.
    cfg = LoaderConfig(batch_size=5, seed=3, num_epochs=6)
    loader = make_loader(arrays(), cfg)
    assert loader.dropped_per_epoch == dropped_per_epoch(cfg, N) == 3
    rows = np.stack([b["example_index_B"] for b in loader]).reshape(6, 20)
    for e in range(6):
        assert N - len(set(rows[e].tolist())) == loader.dropped_per_epoch
    # Each epoch's own permutation leaves out other rows, so over epochs every row is seen;
    # unshuffled, the same last rows are left out every time.
    assert len({tuple(sorted(set(range(N)) - set(r.tolist()))) for r in rows}) > 1
    assert set(rows.ravel().tolist()) == set(range(N))
    plain = LoaderConfig(batch_size=5, seed=3, num_epochs=2, shuffle=False)
    seen = np.concatenate([b["example_index_B"] for b in make_loader(arrays(), plain)])
    assert set(range(N)) - set(seen.tolist()) == {20, 21, 22}
    assert dropped_per_epoch(plain, N) == 3
    keep = LoaderConfig(batch_size=5, seed=3, drop_remainder=False)
    assert make_loader(arrays(), keep).dropped_per_epoch == dropped_per_epoch(keep, N) == 0
    assert dropped_per_epoch(LoaderConfig(batch_size=4, seed=0, process_count=2), 24) == 0
