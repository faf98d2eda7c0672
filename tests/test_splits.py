"""Leave-one-out and training windows: the vectorised code against a plain loop of the paper's code."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpg_dist.data import dataset
from rpg_dist.data.items import ItemIndex
from rpg_dist.data.splits import leave_one_out, training_windows
from rpg_dist.errors import DataError


def reference_windows(train_seq: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """The paper's RPGTokenizer.tokenize_function for split 'train': (inputs, labels) per window."""
    n_return = max(len(train_seq) - max_len, 1)
    first = train_seq[: min(len(train_seq), max_len + 1)]
    windows = [(first[:-1], first[1:])]
    for i in range(1, n_return):
        window = train_seq[i : i + max_len + 1]
        windows.append((window[:-1], [window[-1]]))
    return [w for w in windows if w[1]]  # a window without labels trains nothing


def reference_split(seqs: list[list[int]], max_len: int):
    kept = [s for s in seqs if len(s) >= 3]
    train = [s[:-2] for s in kept]
    val = [(s[:-2][-max_len:], s[-2]) for s in kept]
    test = [(s[:-1][-max_len:], s[-1]) for s in kept]
    return train, val, test, len(seqs) - len(kept)


def _as_windows(table: pa.Table) -> list[tuple[list[int], list[int]]]:
    out = []
    for ids, n in zip(table.column("item_ids").to_pylist(), table.column("n_targets").to_pylist()):
        inputs, labels = ids[:-1], ids[1:]
        out.append((inputs, labels[len(labels) - n :]))
    return out


sequences = st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(seqs=sequences, max_len=st.integers(1, 8))
def test_vectorised_split_equals_reference(seqs, max_len):
    table = pa.table({"user_id": pa.array(range(len(seqs)), pa.int64()), "item_ids": pa.array(seqs, pa.list_(pa.int64()))})
    split = leave_one_out(table, max_len)
    train, val, test, dropped = reference_split(seqs, max_len)
    assert split.n_dropped_users == dropped
    assert split.train.to_pylist() == train
    assert split.val.histories.to_pylist() == [h for h, _ in val]
    assert split.val.targets.tolist() == [t for _, t in val]
    assert split.test.histories.to_pylist() == [h for h, _ in test]
    assert split.test.targets.tolist() == [t for _, t in test]
    expected = [w for seq in train for w in reference_windows(seq, max_len)]
    assert _as_windows(training_windows(split.train, max_len)) == expected


def test_sliced_input_arrays(tmp_path):
    seqs = pa.array([[9, 9, 9], [1, 2, 3, 4], [5, 6, 7, 8, 9]], pa.list_(pa.int64())).slice(1)
    table = pa.table({"user_id": pa.array([1, 2], pa.int64()), "item_ids": seqs})
    split = leave_one_out(table, 2)
    assert split.train.to_pylist() == [[1, 2], [5, 6, 7]]
    assert split.test.histories.to_pylist() == [[2, 3], [7, 8]]


def test_beauty_window_counts(beauty_dataset):
    """The figures in STACK-NOTES: 25,745 windows, 297,131 positions, 131,413 labelled positions."""
    split = leave_one_out(dataset.read_sequences(beauty_dataset), max_len=50)
    windows = training_windows(split.train, 50)
    positions = int(pc.sum(pc.list_value_length(windows.column("item_ids"))).as_py()) - windows.num_rows
    assert (windows.num_rows, positions, int(pc.sum(windows.column("n_targets")).as_py())) == (25_745, 297_131, 131_413)
    assert len(split.test.targets) == 22_363 and split.n_dropped_users == 0
    assert max(pc.list_value_length(split.test.histories).to_pylist()) == 50


def test_item_index():
    index = ItemIndex(np.array([30, 10, 20]))
    assert index.rows(np.array([[10, 30], [20, 20]])).tolist() == [[0, 2], [1, 1]]
    assert index.ids(np.array([2, 0])).tolist() == [30, 10]
    with pytest.raises(DataError, match="history: item_id 99 is unknown"):
        index.rows(np.array([10, 99]), what="history")
    with pytest.raises(DataError, match="duplicate item_id 10"):
        ItemIndex(np.array([10, 10]))


def test_windows_stream_through_shuffle_buckets_each_window_once(synth_dataset, tmp_path, monkeypatch):
    """Above WINDOWS_PER_BUCKET the windows go through several seeded shuffle buckets: the same
    windows (each exactly once), another order; batches of users change nothing else."""
    from rpg_dist import io
    from rpg_dist.train import windows

    index = ItemIndex(dataset.read_items(synth_dataset, columns=["item_id"]).column("item_id").to_numpy())

    def build(root: str, **limits) -> tuple[dict, list, list]:
        for name, value in limits.items():
            monkeypatch.setattr(windows, name, value)
        manifest = windows.prepare_windows(str(tmp_path / root), synth_dataset, index, 20, 7, "fp", "ids", val_users=150)
        paths = windows.WindowsPaths(str(tmp_path / root))
        train = io.read_parquet(paths.train)
        rows = [tuple(w) + (n,) for w, n in zip(train.column("items").to_pylist(), train.column("n_targets").to_pylist())]
        val = io.read_parquet(paths.val)
        return manifest, rows, list(zip(val.column("history").to_pylist(), val.column("target").to_pylist()))

    one, rows_one, val_one = build("one")
    many, rows_many, val_many = build("many", WINDOWS_PER_BUCKET=500, USERS_PER_BATCH=37)
    assert sorted(rows_one) == sorted(rows_many) and rows_one != rows_many
    assert val_one == val_many and len(val_one) == 150 == one["n_val"]
    for key in ("n_windows", "n_positions", "n_labels", "n_val", "n_val_users_total"):
        assert one[key] == many[key]
    assert len(io.list_files(windows.WindowsPaths(str(tmp_path / "many")).train, ".parquet")) >= 1
    # A rebuild with the same inputs is identical (seeded buckets and shuffles).
    assert build("again", WINDOWS_PER_BUCKET=500, USERS_PER_BATCH=37)[1] == rows_many
