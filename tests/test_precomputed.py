"""Bring-your-own embeddings through the real tokenize stage (local Ray, faiss): both sources, the
vectors that reach OPQ, and every kind of bad input as a clear error naming file, field and row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict
from rpg_dist.data import dataset, importers, synth
from rpg_dist.errors import DataError
from rpg_dist.tokenizer import embed, stage
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

pytestmark = pytest.mark.slow

DIM = 32
TOKENIZE = {"n_digit": 8, "shard_size": 64, "opq_niter": 2, "concurrency": 2, "num_cpus_per_actor": 0.5}


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def vector_column(emb: np.ndarray, fixed: bool = True) -> pa.Array:
    if fixed:
        return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    return pa.array([list(map(float, row)) for row in emb], pa.list_(pa.float64()))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """400 synthetic items (ids 1..400) with an ``embedding`` column in the items table."""
    raw = synth.generate(n_items=400, n_users=800, seed=1)
    raw.items = raw.items.append_column("embedding", vector_column(vectors(400)))
    out = str(tmp_path_factory.mktemp("byo") / "dataset")
    importers.write(raw, out, source="synth")
    return out


def make_cfg(dataset_uri: str, run_dir: str, embeddings: str):
    return config_from_dict({"dataset": dataset_uri, "run_dir": run_dir, "seed": 1, "ray": {"num_cpus": 2},
                             "tokenize": {**TOKENIZE, "embeddings": embeddings}})


def write_vectors(path, ids: np.ndarray, emb: np.ndarray, fixed: bool = True) -> str:
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": vector_column(emb, fixed)}), path)
    return str(path)


def embedded(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    ids, emb = embed.read_embeddings(RunPaths(run_dir).embeddings)
    order = np.argsort(ids)
    return ids[order], emb[order]


def test_items_column_and_separate_file_give_the_same_codes(small_dataset, tmp_path, ray_local):
    """The normalised input vectors reach OPQ unchanged and no encoder runs, from either source."""
    ids = np.arange(1, 401)
    from_items = make_cfg(small_dataset, str(tmp_path / "a"), "items")
    stats = stage.tokenize(from_items)
    # A separate file in another row order, with float64 variable-length lists.
    shuffled = np.random.default_rng(0).permutation(400)
    source = write_vectors(tmp_path / "vectors.parquet", ids[shuffled], vectors(400)[shuffled], fixed=False)
    stage.tokenize(make_cfg(small_dataset, str(tmp_path / "b"), source))
    for run in ("a", "b"):
        got_ids, got = embedded(str(tmp_path / run))
        expected = vectors(400) / np.linalg.norm(vectors(400), axis=1, keepdims=True)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    a = load_semantic_ids(RunPaths(str(tmp_path / "a")).semantic_ids)
    b = load_semantic_ids(RunPaths(str(tmp_path / "b")).semantic_ids)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert stats["opq"]["encoder"] == {"encoder": "precomputed:items", "dtype": "float32"}
    # A rerun finds every shard committed and the index current.
    again = stage.tokenize(from_items)
    assert again["timings"]["embed_shards_run"] == 0 and again["timings"]["opq_reused"]


def test_add_items_with_vectors(small_dataset, tmp_path, ray_local):
    cfg = make_cfg(small_dataset, str(tmp_path / "run"), "items")
    stage.tokenize(cfg)
    new = tmp_path / "new.parquet"
    pq.write_table(pa.table({"item_id": pa.array([1001, 1002], pa.int64()), "text": ["a", "b"],
                             "embedding": vector_column(vectors(2, seed=5))}), new)
    stats = stage.tokenize(cfg, add=str(new))
    assert stats["n_items"] == 402
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"item_id": pa.array([1003], pa.int64()), "text": ["c"],
                             "embedding": vector_column(np.ones((1, 16), np.float32))}), wrong)
    with pytest.raises(DataError, match=r"wrong.parquet: field 'embedding' has 16 dimensions; the OPQ index .* 32"):
        stage.tokenize(cfg, add=str(wrong))


def _bad_file(tmp_path, case: str) -> tuple[str, str]:
    """(source, expected message) for one kind of bad separate file."""
    ids, emb = np.arange(1, 401), vectors(400)
    path = tmp_path / f"{case}.parquet"
    if case == "nan":
        emb[17, 3] = np.nan
        return write_vectors(path, ids, emb), r"nan.parquet: row 17 \(item_id 18\): field 'embedding' is NaN or infinite"
    if case == "zero":
        emb[5] = 0
        return write_vectors(path, ids, emb), r"zero.parquet: row 5 \(item_id 6\): field 'embedding' is all zeros"
    if case == "ragged":
        rows = [list(map(float, r)) for r in emb]
        rows[42] = rows[42][:-1]
        pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": pa.array(rows, pa.list_(pa.float32()))}), path)
        return str(path), r"ragged.parquet: row 42 \(item_id 43\): field 'embedding' has 31 dimensions, expected 32"
    if case == "duplicate":
        ids[100] = ids[99]
        return write_vectors(path, ids, emb), r"duplicate.parquet: row 100: field 'item_id' 100 has a second embedding"
    if case == "unknown":
        ids[7] = 999_999
        return write_vectors(path, ids, emb), r"unknown.parquet: row 7: field 'item_id' 999999 is not an item of the dataset"
    if case == "missing":
        return write_vectors(path, ids[:-3], emb[:-3]), r"missing.parquet: no 'embedding' for 3 item\(s\) .* e.g. item_id 398"
    if case == "strings":
        pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": pa.array(["x"] * 400)}), path)
        return str(path), r"strings.parquet: field 'embedding' has type string, expected a list of floats"
    if case == "no_column":
        pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "vec": vector_column(emb)}), path)
        return str(path), r"no_column.parquet: missing column 'embedding'"
    if case == "null":
        rows = [list(map(float, r)) for r in emb]
        rows[9] = None
        pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": pa.array(rows, pa.list_(pa.float32()))}), path)
        return str(path), r"null.parquet: row 9: field 'embedding' is null"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["nan", "zero", "ragged", "duplicate", "unknown", "missing", "strings", "no_column", "null"])
def test_bad_vectors_are_clear_errors_and_commit_nothing(small_dataset, tmp_path, ray_local, case):
    source, message = _bad_file(tmp_path, case)
    cfg = make_cfg(small_dataset, str(tmp_path / "run"), source)
    with pytest.raises(DataError, match=message):
        stage.tokenize(cfg)
    paths = RunPaths(cfg.run_dir)
    assert not io.exists(paths.semantic_ids) and not io.exists(paths.opq_meta)


def test_items_table_without_vectors_names_the_items_file(synth_dataset, tmp_path, ray_local):
    cfg = make_cfg(synth_dataset, str(tmp_path / "run"), "items")
    with pytest.raises(DataError, match=r"items/part-00000.parquet: missing column 'embedding'"):
        stage.tokenize(cfg)
    assert dataset.read_info(synth_dataset).n_items == 600
