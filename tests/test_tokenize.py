"""Tokenizer parts without Ray: OPQ code extraction vs its numpy twin, collision counting vs its exact
twin, shard planning, the training-item set, and the errors users see."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpg_dist import io
from rpg_dist.data import importers, synth
from rpg_dist.data.splits import leave_one_out
from rpg_dist.errors import ConfigError, DataError
from rpg_dist.tokenizer import embed, opq, shards, stage
from rpg_dist.tokenizer.config import TokenizeConfig
from rpg_dist.tokenizer.stats import CodeStats, code_hashes, count_colliding, count_colliding_exact


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) unit vectors around 12 random directions: structured like text embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim))
    x = centres[rng.integers(0, 12, n)] + 0.4 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("n_digit", "pca_dim", "seed"), [(8, 0, 0), (16, 0, 1), (8, 32, 2)])
def test_sa_encode_equals_brute_force_twin(n_digit, pca_dim, seed):
    x = clustered(1500, 64, seed)
    cfg = TokenizeConfig(n_digit=n_digit, pca_dim=pca_dim, opq_niter=3)
    index = opq.train_index(x, cfg, seed=seed, threads=1)
    codes = opq.encode(index, x)
    assert codes.shape == (1500, n_digit) and codes.dtype == np.int16
    assert codes.min() >= 0 and codes.max() <= 255
    np.testing.assert_array_equal(codes, opq.brute_force_codes(index, x))
    # Not a degenerate index: every digit uses many of its 256 tokens.
    assert min(len(np.unique(codes[:, k])) for k in range(n_digit)) > 64


def test_twin_sees_a_wrong_centroid():
    """The twin is sensitive: shifting one PQ centroid changes the twin's codes for the items on it."""
    import faiss

    x = clustered(600, 32, 3)
    index = opq.train_index(x, TokenizeConfig(n_digit=8, opq_niter=2), seed=3, threads=1)
    codes = opq.encode(index, x)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    centroids = faiss.vector_to_array(ivf.pq.centroids)
    target = int(codes[0, 0])
    centroids[target * ivf.pq.dsub:(target + 1) * ivf.pq.dsub] += 100.0  # digit 0, token `target`
    faiss.copy_array_to_vector(centroids, ivf.pq.centroids)
    assert not np.array_equal(opq.brute_force_codes(index, x), codes)


@pytest.mark.parametrize(("n_digit", "pca_dim"), [(8, 0), (16, 32)])
def test_blas_assignment_trains_as_well_as_faiss_per_pair_search(n_digit, pca_dim):
    """Training assigns k-means points through GEMMs at every size (opq.blas_assignment); faiss's
    default at this size calls its per-pair search. Same algorithm: the reconstruction error of the
    whole index (transforms, OPQ, PQ) must match, and faiss's global setting is left as it was."""
    import faiss

    x = clustered(3000, 64, 11)
    cfg = TokenizeConfig(n_digit=n_digit, pca_dim=pca_dim, opq_niter=6)
    before = faiss.cvar.distance_compute_blas_threshold
    assert 3000 * 64 // n_digit < before  # this size takes faiss's per-pair search by default
    fast = opq.train_index(x, cfg, seed=0, threads=1)
    assert faiss.cvar.distance_compute_blas_threshold == before
    default = opq.build_index(x.shape[1], cfg, seed=0)
    if pca_dim:
        rows = np.sort(np.random.default_rng(0).choice(len(x), size=min(len(x), cfg.pca_sample_size), replace=False))
        default.chain.at(0).train(np.ascontiguousarray(x[rows]))
    default.train(x)

    def error(index):  # in the space after PCA (shared by both), where OPQ's rotation is orthonormal
        projected = x
        for i in range(index.chain.size()):
            projected = index.chain.at(i).apply(projected)
        decoded = faiss.downcast_index(index.index).sa_decode(index.sa_encode(x))
        return float(((decoded - projected) ** 2).sum(1).mean())

    assert abs(error(fast) / error(default) - 1) < 0.02


def test_train_is_seeded():
    x = clustered(800, 32, 4)
    cfg = TokenizeConfig(n_digit=8, opq_niter=2)
    same = [opq.serialize(opq.train_index(x, cfg, seed=7, threads=1)) for _ in range(2)]
    other = opq.serialize(opq.train_index(x, cfg, seed=8, threads=1))
    assert same[0] == same[1]
    assert other != same[0]


def test_too_few_training_items_is_a_clear_error():
    with pytest.raises(DataError, match="at least 256 training items.*got 100"):
        opq.train_index(clustered(100, 32, 0), TokenizeConfig(n_digit=8), seed=0, threads=1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.sampled_from([8, 16, 32, 64]), st.integers(0, 2**31 - 1), st.integers(2, 256))
def test_collision_count_matches_exact_twin(n, m, seed, n_tokens):
    # Few distinct tokens -> many collisions; many -> few. Planted duplicates of random rows.
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_tokens, (n, m)).astype(np.int16)
    dup = rng.integers(0, n, n // 4)
    codes[rng.integers(0, n, len(dup))] = codes[dup]
    assert count_colliding(code_hashes(codes)) == count_colliding_exact(codes)


def test_code_stats_usage_entropy_and_collisions():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (1000, 4)).astype(np.int16)
    codes[:, 1] = 7  # one token only: usage 1, entropy 0
    codes[:, 2] = np.arange(1000) % 4  # four equal tokens: 2 bits
    codes[10] = codes[11]
    stats = CodeStats(4, 256)
    for chunk in np.array_split(codes, 3):
        stats.add(chunk)
    out = stats.summary()
    assert out["n_items"] == 1000
    assert out["digit_usage"][1:3] == [1, 4]
    assert out["digit_entropy_bits"][1:3] == pytest.approx([0.0, 2.0])
    assert out["n_colliding_items"] == count_colliding_exact(codes) >= 2
    assert out["n_distinct_codes"] == len(np.unique(codes, axis=0))


def test_normalize_checked_names_the_bad_item():
    emb = np.ones((4, 3), np.float32)
    ids = np.array([10, 11, 12, 13])
    out = embed.normalize_checked(emb, ids, "items/part-0.parquet", first_row=100)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    emb[2, 1] = np.nan
    with pytest.raises(DataError, match=r"items/part-0.parquet: row 102 \(item_id 12\): field 'embedding' is NaN"):
        embed.normalize_checked(emb, ids, "items/part-0.parquet", first_row=100)
    emb[2, 1] = 1.0
    emb[3] = 0.0
    with pytest.raises(DataError, match=r"row 103 \(item_id 13\): field 'embedding' is all zeros"):
        embed.normalize_checked(emb, ids, "items/part-0.parquet", first_row=100)


@pytest.mark.parametrize("encoder", ["/nonexistent/model", "sentence-transformers/all-MiniLM-L6-v2",
                                     "s3://bucket/model"])
def test_missing_encoder_is_a_config_error_not_a_download(encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative hub-style name must not resolve to some local folder
    with pytest.raises(ConfigError, match="tokenize.encoder"):
        embed.resolve_encoder(encoder)


def test_bundled_encoder_resolves_offline():
    assert (embed.resolve_encoder("bundled") / "modules.json").is_file()


def test_plan_shards_covers_every_row_once_within_row_groups(tmp_path):
    folder = tmp_path / "items"
    folder.mkdir()
    for f, n in enumerate([250, 90]):
        ids = np.arange(n) + 1000 * f
        pq.write_table(pa.table({"item_id": ids, "text": [f"t{i}" for i in ids]}),
                       folder / f"part-{f:05d}.parquet", row_group_size=100)
    plan = shards.plan_shards(str(folder), 64, None)
    assert [s.length for s in plan] == [64, 36, 64, 36, 50, 64, 26]
    assert [s.key for s in plan] == [f"{i:06d}" for i in range(7)]
    got = np.concatenate([embed.read_shard_items(s, None)[0] for s in plan])
    np.testing.assert_array_equal(got, np.concatenate([np.arange(250), np.arange(90) + 1000]))
    assert plan[4].first_row == 200 and plan[4].row_group == 2
    assert shards.input_fingerprint(str(folder), None) == shards.input_fingerprint(str(folder), None)


def test_empty_text_names_file_row_and_item(tmp_path):
    uri = str(tmp_path / "new.parquet")
    pq.write_table(pa.table({"item_id": [5, 6, 7], "text": ["a", "  ", "c"]}), uri)
    shard = shards.plan_shards(uri, 10, None)[0]
    with pytest.raises(DataError, match=r"new.parquet: row 1 \(item_id 6\): field 'text' is empty"):
        embed.read_shard_items(shard, None)


def test_training_items_exclude_validation_and_test_only_items(tmp_path):
    raw = synth.generate(n_items=300, n_users=200, seed=1)
    uri = str(tmp_path / "ds")
    importers.write(raw, uri, source="synth")
    got = stage.training_item_ids(uri, None, max_len=50)
    split = leave_one_out(raw.sequences, 50)
    want = np.unique(split.train.flatten().to_numpy())
    np.testing.assert_array_equal(got, want)
    held_out = np.union1d(split.val.targets, split.test.targets)
    assert len(np.setdiff1d(held_out, want)) > 0  # some items appear only as held-out targets
    sample = stage.training_sample(uri, None, 50, cap=100, seed=0)
    assert len(sample) == 100 and np.isin(sample, want).all()
    np.testing.assert_array_equal(sample, stage.training_sample(uri, None, 50, cap=100, seed=0))


def test_gather_sample_streams_parts_in_id_order(tmp_path):
    rng = np.random.default_rng(0)
    parts = []
    for p in range(3):
        ids = rng.permutation(np.arange(p * 50, p * 50 + 50))
        uri = str(tmp_path / f"part-{p}.parquet")
        io.write_parquet(embed.embedding_table(ids, ids[:, None] * np.ones((1, 4), np.float32)), uri)
        parts.append(uri)
    sample = np.array([3, 60, 61, 149])
    x = opq.gather_sample(parts, sample, None)
    np.testing.assert_array_equal(x[:, 0], sample)
    with pytest.raises(DataError, match="no embedding for training item_id 999"):
        opq.gather_sample(parts, np.array([3, 999]), None)


def test_config_rules_name_the_field():
    with pytest.raises(ConfigError, match="opq_sample_size"):
        TokenizeConfig(opq_sample_size=10)
    with pytest.raises(ConfigError, match="num_cpus_per_actor"):
        TokenizeConfig(num_cpus_per_actor=0)
    assert TokenizeConfig(num_cpus_per_actor=0.5).actor_threads() == 1
    assert TokenizeConfig(num_cpus_per_actor=3).actor_threads() == 3
    with pytest.raises(ConfigError, match="tokenize.n_digit: the embedding dimension 100"):
        stage._check_dim(100, TokenizeConfig(n_digit=8))
    stage._check_dim(384, TokenizeConfig(n_digit=64))



def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not opq.gpu_available(), reason="needs faiss-gpu and a CUDA device")
def test_gpu_training_codes_equal_the_brute_force_twin():
    x = clustered(20_000, 64, 5)
    index = opq.train_index(x, TokenizeConfig(n_digit=16, opq_niter=3), seed=5, threads=4)
    np.testing.assert_array_equal(opq.encode(index, x[:2000]), opq.brute_force_codes(index, x[:2000]))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_gpu_embeddings_match_cpu():
    texts = ["waterproof mascara, black", "stainless steel frying pan 28 cm", "dog leash"]
    on_cpu = embed.embed_texts(embed.load_encoder("bundled", "float32", "cpu", 2), texts, 8)
    on_gpu = embed.embed_texts(embed.load_encoder("bundled", "float32", "cuda", 2), texts, 8)
    cos = (on_cpu * on_gpu).sum(1) / np.linalg.norm(on_cpu, axis=1) / np.linalg.norm(on_gpu, axis=1)
    assert cos.min() > 0.999
