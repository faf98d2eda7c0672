"""Hybrid semantic IDs: the collaborative vectors against twins written from their definition
(co-occurrence counts, positive PMI, SVD), and through the real tokenize stage on local Ray and
faiss: codes of the joint vectors, cold items through the text map, --add and the catalogue's
encoder, and no validation or test item entering the fit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.catalogue import ItemEncoder
from rpg_dist.config import config_from_dict, save_run_config
from rpg_dist.data import dataset, importers, synth
from rpg_dist.errors import ConfigError
from rpg_dist.tokenizer import collaborative, embed, opq, stage
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

DIM = 32
TOKENIZE = {"n_digit": 8, "shard_size": 64, "opq_niter": 2, "concurrency": 2, "num_cpus_per_actor": 0.5,
            "embeddings": "items", "collaborative_weight": 0.5, "collaborative_dim": 8}


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def with_vectors(raw):
    emb = vectors(raw.items.num_rows)
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), DIM)
    return dataclasses.replace(raw, items=raw.items.append_column("embedding", column))


def write_dataset(raw, out) -> str:
    importers.write(raw, str(out), source="synth")
    return str(out)


def make_cfg(dataset_uri: str, run_dir: str, **tokenize):
    return config_from_dict({"dataset": dataset_uri, "run_dir": run_dir, "seed": 1, "ray": {"num_cpus": 2},
                             "model": {"max_seq_len": 8}, "tokenize": {**TOKENIZE, **tokenize}})


def counts_twin(sequences: list[list[int]], item_ids: np.ndarray, window: int) -> np.ndarray:
    """Dense counts from the definition: every pair at most ``window`` apart in s[:-2], both ways."""
    row = {int(i): r for r, i in enumerate(item_ids)}
    counts = np.zeros((len(item_ids), len(item_ids)))
    for s in sequences:
        train = s[:-2]
        for i in range(len(train)):
            for j in range(i + 1, min(i + window + 1, len(train))):
                counts[row[train[i]], row[train[j]]] += 1
                counts[row[train[j]], row[train[i]]] += 1
    return counts


def vectors_twin(counts: np.ndarray, dim: int) -> np.ndarray:
    """PPMI with the context distribution ^0.75, dense SVD, U sqrt(S), unit rows."""
    total = counts.sum(1)
    context = total ** 0.75 / (total ** 0.75).sum()
    with np.errstate(divide="ignore"):
        pmi = np.log((counts / total.sum()) / ((total / total.sum())[:, None] * context[None, :]))
    u, s, _ = np.linalg.svd(np.maximum(pmi, 0), full_matrices=False)
    v = u[:, :dim] * np.sqrt(s[:dim])
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def raw():
    return with_vectors(synth.generate(n_items=400, n_users=800, seed=4, mean_length=7.0))


def test_counts_and_vectors_match_twins_from_the_definition(raw, tmp_path):
    uri = write_dataset(raw, tmp_path / "ds")
    sequences = dataset.read_sequences(uri).column("item_ids").to_pylist()
    item_ids = stage.training_item_ids(uri, None, max_len=8)
    got = collaborative.cooccurrence(dataset.sequences_uri(uri), None, 8, 3, item_ids).toarray()
    expected = counts_twin(sequences, item_ids, 3)
    np.testing.assert_array_equal(got, expected)
    assert got.sum() > 1000
    warm = np.flatnonzero(expected.sum(1) > 0)
    counts = expected[np.ix_(warm, warm)]
    fitted = collaborative.factorize(collaborative.cooccurrence(dataset.sequences_uri(uri), None, 8, 3,
                                                                item_ids[warm]), 8, seed=0)
    twin = vectors_twin(counts, 8)
    # Signs and bases of equal singular values are arbitrary: compare the cosines between items.
    np.testing.assert_allclose(fitted @ fitted.T, twin @ twin.T, atol=1e-3)


def test_joint_vectors_follow_the_definition():
    rng = np.random.default_rng(0)
    model = collaborative.CollaborativeModel(item_ids=np.array([3, 7, 9]), vectors=np.eye(4, dtype=np.float32)[:3],
                                             projection=rng.standard_normal((6, 4)), weight=0.3)
    text = rng.standard_normal((4, 6)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    ids = np.array([9, 5, 3, 11])  # 5 and 11 are cold
    got = collaborative.joint(model, ids, text)
    for row, item in enumerate(ids):
        if item in (3, 7, 9):
            collab = model.vectors[[3, 7, 9].index(item)]
        else:
            collab = text[row] @ model.projection
            collab = collab / np.linalg.norm(collab)
        np.testing.assert_allclose(got[row], np.concatenate([np.sqrt(0.7) * text[row], np.sqrt(0.3) * collab]),
                                   rtol=1e-5, atol=1e-6)
        assert abs(np.linalg.norm(got[row]) - 1) < 1e-5
    only = collaborative.joint(dataclasses.replace(model, weight=1.0), ids, text)
    np.testing.assert_allclose(only, got[:, 6:] / np.sqrt(0.3), atol=1e-6)


def test_weight_outside_zero_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"collaborative_weight: 1.5 must be in \[0, 1\]"):
        make_cfg("ds", "run", collaborative_weight=1.5)


def retarget(raw, seed: int):
    """The same sequences with other validation and test targets (their last two items)."""
    rng = np.random.default_rng(seed)
    ids = raw.items.column("item_id").to_numpy()
    rows = [s[:-2] + rng.choice(ids, 2).tolist() for s in raw.sequences.column("item_ids").to_pylist()]
    column = pa.array(rows, raw.sequences.schema.field("item_ids").type)
    return dataclasses.replace(raw, sequences=raw.sequences.set_column(1, "item_ids", column))


@pytest.mark.slow
def test_hybrid_tokenize_codes_cold_items_add_and_no_target_leakage(raw, tmp_path, ray_local):
    uri = write_dataset(raw, tmp_path / "ds")
    cfg = make_cfg(uri, str(tmp_path / "run"))
    stats = stage.tokenize(cfg)
    paths = RunPaths(cfg.run_dir)
    meta = io.read_json(paths.opq_meta)
    link = meta["collaborative"]
    model = collaborative.read_model(paths.collaborative, link["digest"])
    assert meta["dim"] == DIM and meta["index_dim"] == DIM + 8 and link["weight"] == 0.5
    # Every item's codes are the index's codes of its joint vector; cold items (never in a
    # training part) go through the text map.
    ids, text = embed.read_embeddings(paths.embeddings)
    index = opq.read_index(paths.opq_index, meta["index_digest"])
    sem = load_semantic_ids(paths.semantic_ids)
    np.testing.assert_array_equal(sem.codes[sem.index.rows(ids)],
                                  opq.brute_force_codes(index, collaborative.joint(model, ids, text)))
    assert 0 < len(np.setdiff1d(ids, model.item_ids)) and stats["n_items"] == len(ids)

    # New items are cold: tokenize --add and the catalogue's encoder code them alike.
    new_ids, new_vectors = np.array([5001, 5002, 5003]), vectors(3, seed=9)
    new = tmp_path / "new.parquet"
    column = pa.FixedSizeListArray.from_arrays(pa.array(new_vectors.reshape(-1), pa.float32()), DIM)
    pq.write_table(pa.table({"item_id": pa.array(new_ids, pa.int64()), "text": ["a", "b", "c"],
                             "embedding": column}), new)
    stage.tokenize(cfg, add=str(new))
    grown = load_semantic_ids(paths.semantic_ids)
    unit = new_vectors / np.linalg.norm(new_vectors, axis=1, keepdims=True)
    expected = opq.brute_force_codes(index, collaborative.joint(model, new_ids, unit))
    np.testing.assert_array_equal(grown.codes[grown.index.rows(new_ids)], expected)
    save_run_config(cfg)  # what the catalogue reads, as `rpg-dist run` leaves it
    np.testing.assert_array_equal(ItemEncoder(cfg.run_dir).codes(new_ids, vectors=new_vectors), expected)

    # Other validation and test targets (each user's last two items): the same collaborative model
    # and the same codes for every item.
    other = make_cfg(write_dataset(retarget(raw, 1), tmp_path / "retargeted"), str(tmp_path / "run-retargeted"))
    stage.tokenize(other)
    other_paths = RunPaths(other.run_dir)
    assert io.read_bytes(other_paths.collaborative) == io.read_bytes(paths.collaborative)
    np.testing.assert_array_equal(load_semantic_ids(other_paths.semantic_ids).codes, sem.codes)
    # The control: one training item changed gives another model, so the comparison can fail.
    sequences = raw.sequences.column("item_ids").to_pylist()
    sequences[0] = [sequences[1][0]] + sequences[0][1:]
    changed = write_dataset(dataclasses.replace(raw, sequences=raw.sequences.set_column(
        1, "item_ids", pa.array(sequences, raw.sequences.schema.field("item_ids").type))), tmp_path / "changed")
    t = cfg.tokenize
    parts = [u for u in io.list_files(paths.embeddings, ".parquet") if "/part-add-" not in u]  # the fit's
    refit = collaborative.fit(parts, changed, None, max_len=8,
                              window=t.collaborative_window, dim=t.collaborative_dim, weight=t.collaborative_weight,
                              seed=cfg.seed)
    assert collaborative.to_bytes(refit) != io.read_bytes(paths.collaborative)
    same = collaborative.fit(parts, uri, None, max_len=8,
                             window=t.collaborative_window, dim=t.collaborative_dim, weight=t.collaborative_weight,
                             seed=cfg.seed)
    assert collaborative.to_bytes(same) == io.read_bytes(paths.collaborative)
