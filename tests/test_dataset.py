"""The dataset writer: validation errors name file, field and row; nothing half-written is left."""

from __future__ import annotations

import os

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg_dist import io
from rpg_dist.config import StorageConfig
from rpg_dist.data import dataset
from rpg_dist.data.dataset import DatasetWriter
from rpg_dist.data.items import ItemIndex, sorted_lookup
from rpg_dist.errors import DataError, StorageError


def _items(ids=(1, 2, 3), texts=("a red lipstick", "a blue pen", "a dog bed")):
    return pa.table({"item_id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())})


def _seqs(users=(10, 11), lists=((1, 2, 3), (3, 2, 1, 2))):
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_ids": pa.array(lists, pa.list_(pa.int64()))})


def _write(uri, items, seqs, **kwargs):
    with DatasetWriter(uri, source="test", **kwargs) as writer:
        writer.add_items(items, origin="items.parquet")
        writer.add_sequences(seqs, origin="seqs.parquet")
        return writer.commit()


def _listing(path):
    return sorted(os.listdir(path)) if os.path.exists(path) else []


def test_roundtrip_and_info(tmp_path):
    uri = str(tmp_path / "ds")
    info = _write(uri, _items(), _seqs())
    assert (info.n_users, info.n_items, info.n_interactions) == (2, 3, 7)
    assert dataset.read_info(uri) == info
    assert dataset.read_items(uri).column("item_id").to_pylist() == [1, 2, 3]
    assert dataset.read_sequences(uri).column("item_ids").to_pylist() == [[1, 2, 3], [3, 2, 1, 2]]
    assert _listing(tmp_path) == ["ds"]  # the staging prefix is gone


def test_content_digest_follows_the_content_not_the_counts(tmp_path):
    first = _write(str(tmp_path / "a"), _items(), _seqs())
    again = _write(str(tmp_path / "b"), _items(), _seqs())
    other_text = _write(str(tmp_path / "c"), _items(texts=("a red lipstick", "a blue pen", "a cat bed")), _seqs())
    other_order = _write(str(tmp_path / "d"), _items(), _seqs(lists=((1, 2, 3), (3, 2, 2, 1))))
    assert len(first.content_sha256) == 64 and first.content_sha256 == again.content_sha256
    assert len({first.content_sha256, other_text.content_sha256, other_order.content_sha256}) == 3
    assert (first.n_items, first.n_interactions) == (other_text.n_items, other_text.n_interactions)
    # A dataset written before digests were recorded still reads (no identity from content then).
    legacy = io.read_json(str(tmp_path / "a" / "dataset.json"))
    del legacy["content_sha256"]
    io.write_json(str(tmp_path / "a" / "dataset.json"), legacy)
    assert dataset.read_info(str(tmp_path / "a")).content_sha256 == ""


def test_a_dataset_where_no_user_has_three_items_is_refused_at_prepare(tmp_path):
    uri = str(tmp_path / "ds")
    with pytest.raises(DataError, match="no user has 3 or more items"):
        _write(uri, _items(), _seqs(lists=((1, 2), (3,))))
    assert _listing(tmp_path) == []  # nothing written, staging gone
    assert _write(uri, _items(), _seqs(lists=((1, 2), (3, 2, 1)))).n_users == 2  # one is enough


def test_narrow_integer_ids_are_widened(tmp_path):
    items = pa.table({"item_id": pa.array([1, 2, 3], pa.int32()), "text": ["a", "b", "c"]})
    _write(str(tmp_path / "ds"), items, _seqs())
    assert dataset.read_items(str(tmp_path / "ds")).schema.field("item_id").type == pa.int64()


@pytest.mark.parametrize(
    ("items", "seqs", "message"),
    [
        (_items().drop_columns(["text"]), _seqs(), "items.parquet: missing column 'text'"),
        (pa.table({"item_id": ["1", "2", "3"], "text": ["a", "b", "c"]}), _seqs(),
         "items.parquet: field 'item_id' has type string, expected int64"),
        (pa.table({"item_id": [1, 2, 3], "text": [1, 2, 3]}), _seqs(),
         "items.parquet: field 'text' has type int64, expected string"),
        (_items(ids=(1, 2, 2)), _seqs(), "duplicate item_id 2: items.parquet row 1 and items.parquet row 2"),
        (_items(texts=("ok", "  ", "ok")), _seqs(), "items.parquet: row 1 (item_id 2): field 'text' is empty or null"),
        (_items(texts=("ok", None, "ok")), _seqs(), "items.parquet: row 1 (item_id 2): field 'text' is empty or null"),
        (pa.table({"item_id": pa.array([1, None, 3], pa.int64()), "text": ["a", "b", "c"]}), _seqs(),
         "items.parquet: row 1: field 'item_id' is null"),
        (_items(), _seqs(lists=((1, 2, 3), (3, 99))),
         "seqs.parquet: row 1 (user 11): field 'item_ids' references item_id 99, which is not in the items table"),
        (_items(), _seqs(lists=((1, 2), ())), "seqs.parquet: row 1 (user 11): field 'item_ids' is empty"),
        (_items(), _seqs(users=(7, 7)), "duplicate user_id 7: seqs.parquet row 0 and seqs.parquet row 1"),
        (_items(), _seqs().drop_columns(["user_id"]), "seqs.parquet: missing column 'user_id'"),
        (_items(), pa.table({"user_id": [1, 2], "item_ids": [["1"], ["2"]]}),
         "seqs.parquet: field 'item_ids' has type list<item: string>, expected list<item: int64>"),
        (_items(), _seqs(users=(), lists=()), "empty dataset: no user sequences"),
        (_items(ids=(), texts=()), _seqs(), "empty dataset: no items"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, items, seqs, message):
    uri = str(tmp_path / "ds")
    with pytest.raises(DataError) as err:
        _write(uri, items, seqs)
    assert message in str(err.value)
    assert _listing(tmp_path) == []  # no dataset, no staging leftovers


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri, _items(), _seqs())
    with pytest.raises(DataError, match="a dataset already exists here; pass --overwrite"):
        DatasetWriter(uri, source="test")
    # A failed overwrite leaves the old dataset whole.
    with pytest.raises(DataError):
        _write(uri, _items(ids=(1, 1, 2)), _seqs(), overwrite=True)
    assert dataset.read_info(uri).n_items == 3
    _write(uri, _items(ids=(1, 2, 3, 4), texts=("a", "b", "c", "d")), _seqs(), overwrite=True)
    assert dataset.read_info(uri).n_items == 4
    assert len(io.list_files(dataset.items_uri(uri), ".parquet")) == 1


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset .*rpg-dist prepare"):
        dataset.read_info(str(tmp_path))


def test_truncated_part_file_is_named(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri, _items(), _seqs())
    part = tmp_path / "ds" / "items" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(DataError, match=r"items/part-00000.parquet: unreadable parquet"):
        dataset.read_items(uri)


def test_dataset_on_s3(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(endpoint_url=endpoint)
    uri = f"s3://{bucket}/datasets/tiny"
    info = _write(uri, _items(), _seqs(), storage=storage)
    assert dataset.read_info(uri, storage) == info
    assert dataset.read_sequences(uri, storage).num_rows == 2
    fs, path = io.filesystem(f"s3://{bucket}/datasets", storage)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(path)) == ["tiny"]  # staging removed


def test_dataset_on_s3_wrong_credentials(s3_secured):
    endpoint, bucket, key, _ = s3_secured
    storage = StorageConfig(endpoint_url=endpoint, key=key, secret="wrong")
    with pytest.raises(StorageError, match="access denied"):
        _write(f"s3://{bucket}/ds", _items(), _seqs(), storage=storage)


def test_parquet_parts_are_plain_parquet(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri, _items(), _seqs())
    table = pq.read_table(str(tmp_path / "ds" / "sequences"))
    assert table.schema.field("item_ids").type == pa.list_(pa.int64())


@pytest.mark.parametrize("first", [1, 0, -5, 2**62])
def test_consecutive_ids_are_found_without_a_search_as_by_the_sorted_lookup(first):
    """ItemIndex's arithmetic path for consecutive ids against the plain binary search over the ids."""
    ids = first + np.random.default_rng(0).permutation(1000)
    index = ItemIndex(ids)
    assert index.first == first
    queries = np.concatenate([np.arange(first - 50, first + 1050), [-2**63, 2**63 - 1, first - 2**62, 0, -1]])
    rows, known = index.find(queries.reshape(-1, 5))
    want_rows, want_known = sorted_lookup(np.sort(ids), queries)
    assert np.array_equal(known.ravel(), want_known) and known.sum() >= 1000
    assert np.array_equal(rows.ravel()[want_known], want_rows[want_known])
    assert ItemIndex(np.array([3, 4, 6])).first is None  # a gap: the binary search
