"""Importers behind `rpg-dist prepare`, on the real Beauty files and on small files in each raw format."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg_dist.data import dataset
from rpg_dist.data.config import InteractionsColumns, PrepareConfig
from rpg_dist.data.importers import prepare
from rpg_dist.errors import DataError


def test_s3rec_beauty_counts(beauty_dataset):
    info = dataset.read_info(beauty_dataset)
    assert (info.n_users, info.n_items, info.n_interactions) == (22_363, 12_101, 198_502)
    items = dataset.read_items(beauty_dataset)
    first = items.slice(0, 1).to_pylist()[0]
    assert first == {
        "item_id": 1,
        "text": "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce. OPI. Beauty, Makeup, Nails, Nail Polish.",
    }


def test_s3rec_sequences_keep_file_order(beauty_dataset, beauty_raw):
    seqs = dataset.read_sequences(beauty_dataset)
    lines = (beauty_raw / "sequences.txt").read_text().splitlines()
    for row in (0, 1, 777, len(lines) - 1):
        tokens = [int(t) for t in lines[row].split()]
        assert seqs.slice(row, 1).to_pylist()[0] == {"user_id": tokens[0], "item_ids": tokens[1:]}


def _s3rec(tmp_path, items_lines, seq_lines):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "items.jsonl").write_text("\n".join(items_lines) + "\n")
    (folder / "sequences.txt").write_text("\n".join(seq_lines) + "\n")
    return PrepareConfig(format="s3rec", input=str(folder))


GOOD_ITEMS = [
    json.dumps({"item_id": 1, "title": "Red &amp; Bold Lipstick", "brand": "Acme", "categories": [["Beauty", "Makeup"]]}),
    json.dumps({"item_id": 2, "title": "Blue Pen", "brand": "Unknown", "categories": [["Office"]]}),
    json.dumps({"item_id": 3, "title": "Dog Bed", "brand": "Paws", "categories": [["Pets", "Dogs"]]}),
]


def test_s3rec_text_and_placeholders(tmp_path):
    out = str(tmp_path / "ds")
    prepare(_s3rec(tmp_path, GOOD_ITEMS, ["1 1 2 3", "2 3 2 1"]), out)
    texts = dataset.read_items(out).column("text").to_pylist()
    assert texts[0] == "Red & Bold Lipstick. Acme. Beauty, Makeup."
    assert texts[1] == "Blue Pen. Office."  # brand "Unknown" carries nothing


@pytest.mark.parametrize(
    ("items", "seqs", "message"),
    [
        (GOOD_ITEMS[:2] + ["{not json"], ["1 1 2"], "items.jsonl: line 3: invalid JSON"),
        (GOOD_ITEMS + [json.dumps({"title": "x"})], ["1 1 2"], "items.jsonl: line 4: missing field 'item_id'"),
        (GOOD_ITEMS + [json.dumps({"item_id": "4", "title": "x"})], ["1 1 2"], "items.jsonl: line 4: field 'item_id' must be an integer"),
        (GOOD_ITEMS + [json.dumps({"item_id": 3, "title": "again"})], ["1 1 2"], "duplicate item_id 3:"),
        (GOOD_ITEMS + [json.dumps({"item_id": 4, "title": " ", "categories": []})], ["1 1 2"],
         "items.jsonl: row 4 (item_id 4): field 'text' is empty or null"),
        (GOOD_ITEMS + [json.dumps({"item_id": 4, "title": {"en": "x"}})], ["1 1 2"],
         "items.jsonl: line 4: field 'title' is dict"),
        (GOOD_ITEMS + [json.dumps({"item_id": 4, "title": "ok", "brand": "Ac\u0000me"})], ["1 1 2"],
         "items.jsonl: line 4: field 'brand' holds the control character"),
        (GOOD_ITEMS + [json.dumps({"item_id": 4, "title": "ok", "categories": [["Beauty", "Nails\u001b"]]})],
         ["1 1 2"], "items.jsonl: line 4: field 'categories' holds the control character"),
        (GOOD_ITEMS, ["1 1 2", "2 3 x"], "sequences.txt: line 2: field 'item_ids' has value 'x', not an integer"),
        (GOOD_ITEMS, ["1 1 2", "2 3 9223372036854775808"],
         "sequences.txt: line 2: field 'item_ids' has value '9223372036854775808', not an integer within int64"),
        (GOOD_ITEMS, [], "sequences.txt: the file holds no sequences"),
        (GOOD_ITEMS, ["1 1 2", "7"], "sequences.txt: line 2: expected 'user_id item_id [item_id ...]'"),
        (GOOD_ITEMS, ["1 1 2", "2 3 42"], "sequences.txt: row 2 (user 2): field 'item_ids' references item_id 42"),
    ],
)
def test_s3rec_bad_input(tmp_path, items, seqs, message):
    out = tmp_path / "ds"
    with pytest.raises(DataError) as err:
        prepare(_s3rec(tmp_path, items, seqs), str(out))
    assert message in str(err.value)
    assert not out.exists()


def test_s3rec_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    cfg = _s3rec(tmp_path, GOOD_ITEMS, ["1 1 2"])
    for name, data in (("sequences.txt", b"1 1 2\n2 3 \xff\n"), ("items.jsonl", GOOD_ITEMS[0].encode() + b"\n\xe9\n")):
        original = (tmp_path / "raw" / name).read_bytes()
        (tmp_path / "raw" / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: line 2 \(byte \d+\) is not UTF-8 text"):
            prepare(cfg, str(tmp_path / "ds"))
        (tmp_path / "raw" / name).write_bytes(original)
    assert not (tmp_path / "ds").exists()


def test_s3rec_missing_file(tmp_path):
    with pytest.raises(DataError, match="sequences.txt: file not found"):
        (tmp_path / "raw").mkdir()
        (tmp_path / "raw" / "items.jsonl").write_text(GOOD_ITEMS[0] + "\n")
        prepare(PrepareConfig(format="s3rec", input=str(tmp_path / "raw")), str(tmp_path / "ds"))


# --- amazon2014 raw dumps: reviews are JSON lines, metadata lines are Python literals ---------------


def _amazon(tmp_path, reviews, metas, category="Toy"):
    folder = tmp_path / "amazon"
    folder.mkdir(exist_ok=True)
    with gzip.open(folder / f"reviews_{category}_5.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    with gzip.open(folder / f"meta_{category}.json.gz", "wt") as f:
        f.write("\n".join(repr(m) for m in metas) + "\n")
    return PrepareConfig(format="amazon2014", input=str(folder), category=category)


REVIEWS = [
    {"reviewerID": "U2", "asin": "B", "unixReviewTime": 300, "overall": 5.0},
    {"reviewerID": "U1", "asin": "A", "unixReviewTime": 200},
    {"reviewerID": "U1", "asin": "C", "unixReviewTime": 100},
    {"reviewerID": "U2", "asin": "A", "unixReviewTime": 100},
    {"reviewerID": "U1", "asin": "B", "unixReviewTime": 200},  # ties keep file order
    {"reviewerID": "U2", "asin": "C", "unixReviewTime": 500},
]
METAS = [
    {"asin": "A", "title": "Alpha Cream", "price": 9.99, "brand": "Acme", "categories": [["Beauty", "Skin Care"]],
     "description": "Rich <b>cream</b>.", "related": {"also_bought": ["B"]}},
    {"asin": "B", "title": "Beta Gel", "categories": [["Beauty"]]},
    {"asin": "C", "description": "Just a description", "salesRank": {"Beauty": 5}},
    {"asin": "Z", "title": "never reviewed"},
]


def test_amazon2014_grouping_order_and_text(tmp_path):
    out = str(tmp_path / "ds")
    info = prepare(_amazon(tmp_path, REVIEWS, METAS), out)
    assert (info.n_users, info.n_items, info.n_interactions) == (2, 3, 6)
    seqs = dataset.read_sequences(out).to_pylist()
    items = dataset.read_items(out, columns=["item_id", "asin", "text"]).to_pylist()
    asin = {r["item_id"]: r["asin"] for r in items}
    # U2 appears first in the file; each user's reviews are stable-sorted by time.
    assert [[asin[i] for i in s["item_ids"]] for s in seqs] == [["A", "B", "C"], ["C", "A", "B"]]
    text = {r["asin"]: r["text"] for r in items}
    assert text["A"] == "Alpha Cream. 9.99. Acme. Beauty, Skin Care. Rich cream."
    assert text["C"] == "Just a description."


@pytest.mark.parametrize(
    ("reviews", "metas", "message"),
    [
        (REVIEWS[:2] + [{"reviewerID": "U3", "asin": "A"}], METAS, "reviews_Toy_5.json.gz: line 3: missing field 'unixReviewTime'"),
        (REVIEWS, METAS[:2], "meta_Toy.json.gz: no metadata for item asin 'C'"),
        (REVIEWS, METAS[:2] + [{"asin": "C", "title": "unknown"}], "meta_Toy.json.gz: line 3 (asin 'C'): fields"),
    ],
)
def test_amazon2014_bad_input(tmp_path, reviews, metas, message):
    with pytest.raises(DataError) as err:
        prepare(_amazon(tmp_path, reviews, metas), str(tmp_path / "ds"))
    assert message in str(err.value)
    assert not (tmp_path / "ds").exists()


def test_amazon2014_refuses_code_in_literals(tmp_path):
    cfg = _amazon(tmp_path, REVIEWS, METAS)
    meta = tmp_path / "amazon" / "meta_Toy.json.gz"
    with gzip.open(meta, "wt") as f:
        f.write("{'asin': 'A', 'title': __import__('os').getcwd()}\n")
    with pytest.raises(DataError, match="meta_Toy.json.gz: line 1: not a JSON object or Python literal"):
        prepare(cfg, str(tmp_path / "ds"))


def test_amazon2014_truncated_gzip(tmp_path):
    cfg = _amazon(tmp_path, REVIEWS, METAS)
    path = tmp_path / "amazon" / "reviews_Toy_5.json.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="reviews_Toy_5.json.gz: not a readable gzip text file"):
        prepare(cfg, str(tmp_path / "ds"))


# --- generic interactions -----------------------------------------------------------------------


def _interactions(tmp_path, events: pa.Table, items: pa.Table, fmt: str = "csv", **columns):
    import pyarrow.csv as pacsv

    path_events, path_items = tmp_path / f"events.{fmt}", tmp_path / f"items.{fmt}"
    for table, path in ((events, path_events), (items, path_items)):
        if fmt == "csv":
            pacsv.write_csv(table, path)
        else:
            pq.write_table(table, path)
    cols = InteractionsColumns(**columns) if columns else InteractionsColumns(user="u", item="i", timestamp="t", item_id="sku", text=["name", "kind"])
    return PrepareConfig(format="interactions", input=str(path_events), items=str(path_items), columns=cols)


EVENTS = pa.table({"u": ["bob", "amy", "bob", "amy", "bob", "amy"], "i": ["s2", "s1", "s1", "s3", "s3", "s2"], "t": [5, 1, 2, 9, 7, 3]})
ITEMS = pa.table({"sku": ["s1", "s2", "s3"], "name": ["Shampoo", "Conditioner", "Brush"], "kind": ["hair", "hair", "tool"]})


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_interactions_string_ids(tmp_path, fmt):
    out = str(tmp_path / "ds")
    info = prepare(_interactions(tmp_path, EVENTS, ITEMS, fmt), out)
    assert (info.n_users, info.n_items, info.n_interactions) == (2, 3, 6)
    items = dataset.read_items(out, columns=["item_id", "text", "raw_id"]).to_pylist()
    sku = {r["item_id"]: r["raw_id"] for r in items}
    assert items[0]["text"] == "Shampoo. hair."
    seqs = dataset.read_sequences(out).column("item_ids").to_pylist()
    # bob (first in the file): s1@2, s2@5, s3@7; amy: s1@1, s2@3, s3@9.
    assert [[sku[i] for i in s] for s in seqs] == [["s1", "s2", "s3"], ["s1", "s2", "s3"]]


def test_interactions_integer_ids_are_kept(tmp_path):
    events = pa.table({"user_id": [7, 7, 7, 9], "item_id": [30, 10, 20, 10], "timestamp": [3, 1, 2, 1]})
    items = pa.table({"item_id": [10, 20, 30], "title": ["a", "b", "c"]})
    out = str(tmp_path / "ds")
    prepare(_interactions(tmp_path, events, items, "parquet", user="user_id", item="item_id", timestamp="timestamp", item_id="item_id", text=["title"]), out)
    assert dataset.read_sequences(out).to_pylist() == [{"user_id": 7, "item_ids": [10, 20, 30]}, {"user_id": 9, "item_ids": [10]}]


def test_interactions_bad_input(tmp_path):
    unknown = EVENTS.set_column(1, "i", pa.array(["s2", "s1", "s9", "s3", "s3", "s2"]))
    with pytest.raises(DataError, match=r"events.csv: row 2: field 'i' value 's9' is not in the items table"):
        prepare(_interactions(tmp_path, unknown, ITEMS), str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"events.csv: missing column 't'"):
        prepare(_interactions(tmp_path, EVENTS.drop_columns(["t"]), ITEMS), str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"items.csv: duplicate sku 's1'"):
        dup = pa.table({"sku": ["s1", "s1", "s3"], "name": ["a", "b", "c"], "kind": ["x", "y", "z"]})
        prepare(_interactions(tmp_path, EVENTS, dup), str(tmp_path / "ds"))
    cfg = _interactions(tmp_path, EVENTS, ITEMS, "parquet")
    (tmp_path / "events.parquet").write_bytes((tmp_path / "events.parquet").read_bytes()[:64])
    with pytest.raises(DataError, match=r"events.parquet: unreadable table"):
        prepare(cfg, str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(("events", "items", "message"), [
    # an unsigned id beyond int64 in the events, in the items table, as a user
    ({"user_id": [7, 7, 7], "item_id": pa.array([10, 2**64 - 1, 30], pa.uint64()), "timestamp": [1, 2, 3]}, None,
     r"events.parquet: row 1: field 'item_id' value 18446744073709551615 is not an integer within int64"),
    (None, {"item_id": pa.array([10, 20, 2**63], pa.uint64()), "title": ["a", "b", "c"]},
     r"items.parquet: row 2: field 'item_id' value 9223372036854775808 is not an integer within int64"),
    ({"user_id": pa.array([2**64 - 1] * 3, pa.uint64()), "item_id": [10, 20, 30], "timestamp": [1, 2, 3]}, None,
     r"events.parquet: row 0: field 'user_id' value 18446744073709551615 is not an integer"),
    # text ids, or fractions, where the items table's ids are integers
    ({"user_id": [7, 7, 7], "item_id": ["10", "x", "30"], "timestamp": [1, 2, 3]}, None,
     r"events.parquet: row 1: field 'item_id' value 'x' is not an integer within int64"),
    ({"user_id": [7, 7, 7], "item_id": [10.0, 20.5, 30.0], "timestamp": [1, 2, 3]}, None,
     r"events.parquet: row 1: field 'item_id' value 20.5 is not an integer within int64"),
])
def test_interactions_ids_of_the_wrong_type_name_the_row(tmp_path, events, items, message):
    good_events = {"user_id": [7, 7, 7], "item_id": [10, 20, 30], "timestamp": [1, 2, 3]}
    good_items = {"item_id": [10, 20, 30], "title": ["a", "b", "c"]}
    cfg = _interactions(tmp_path, pa.table(events or good_events), pa.table(items or good_items), "parquet",
                        user="user_id", item="item_id", timestamp="timestamp", item_id="item_id", text=["title"])
    with pytest.raises(DataError, match=message):
        prepare(cfg, str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()


def test_interactions_text_that_is_not_text(tmp_path):
    """A Latin-1 byte (Arrow reads the column as binary) or a control character is an error naming
    the file, field and row, not item text (was: every text a Python bytes literal, "b'OPI Red'.")."""
    events = tmp_path / "events.csv"
    events.write_text("u,i,t\nbob,s1,1\nbob,s2,2\nbob,s3,3\n")
    cols = InteractionsColumns(user="u", item="i", timestamp="t", item_id="sku", text=["name"])
    for body, message in ((b"sku,name\ns1,OPI Red\ns2,Caf\xe9 cream\ns3,Pen\n",
                           r"items.csv: row 1: field 'name' is not UTF-8 \(byte 0xe9 at position 3\)"),
                          (b"sku,name\ns1,OPI Red\ns2,cream\ns3,P\x00en\n",
                           r"items.csv: row 2: field 'name' holds the control character '\\x00' at position 1")):
        (tmp_path / "items.csv").write_bytes(body)
        cfg = PrepareConfig(format="interactions", input=str(events), items=str(tmp_path / "items.csv"), columns=cols)
        with pytest.raises(DataError, match=message):
            prepare(cfg, str(tmp_path / "ds"))
        assert not (tmp_path / "ds").exists()


def test_users_with_short_sequences_survive_import(tmp_path):
    """The importer keeps every user; the leave-one-out split drops (and counts) the short ones."""
    from rpg_dist.data.splits import leave_one_out

    out = str(tmp_path / "ds")
    prepare(_s3rec(tmp_path, GOOD_ITEMS, ["1 1 2 3", "2 3", "3 1 2"]), out)
    split = leave_one_out(dataset.read_sequences(out), max_len=50)
    assert split.n_dropped_users == 2
    assert np.array_equal(split.user_ids, [1])
