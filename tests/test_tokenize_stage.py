"""The tokenize stage end to end on a real local Ray, the real bundled encoder and real faiss:
outputs vs the brute-force twin, determinism, resume, a killed actor, --add, bad input, S3."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict
from rpg_dist.data import dataset
from rpg_dist.errors import ConfigError, DataError, StageError
from rpg_dist.tokenizer import embed, opq, shards, stage
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids, to_table

pytestmark = pytest.mark.slow

# Small but real: 600 synthetic items in shards of 64, OPQ16 with few iterations, the encoder in
# bf16 where the CPU has it natively, else fp32 (encoder_dtype auto).
TOKENIZE = {"n_digit": 16, "shard_size": 64, "opq_niter": 4, "encoder_dtype": "auto",
            "concurrency": 2, "num_cpus_per_actor": 0.5}


def make_cfg(dataset_uri: str, run_dir: str, storage: dict | None = None, **tokenize):
    return config_from_dict({"dataset": dataset_uri, "run_dir": run_dir, "seed": 3, "ray": {"num_cpus": 2},
                             "storage": storage or {}, "tokenize": {**TOKENIZE, **tokenize}})


def all_item_ids(dataset_uri: str) -> np.ndarray:
    return np.sort(dataset.read_items(dataset_uri, columns=["item_id"]).column("item_id").to_numpy())


def read_all_embeddings(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    parts = io.list_files(RunPaths(run_dir).embeddings, ".parquet")
    pairs = [embed.read_embeddings(p) for p in parts]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


@pytest.fixture(scope="module")
def tokenized(synth_dataset, tmp_path_factory):
    """One complete run shared by the read-only checks below; yields ``(cfg, stats)``."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace="rpg-dist-tests", log_to_driver=False)
    cfg = make_cfg(synth_dataset, str(tmp_path_factory.mktemp("tok") / "run"))
    return cfg, stage.tokenize(cfg)


def test_outputs_match_the_dataset_and_the_brute_force_twin(tokenized, synth_dataset):
    cfg, stats = tokenized
    paths = RunPaths(cfg.run_dir)
    ids = all_item_ids(synth_dataset)
    sem = load_semantic_ids(paths.semantic_ids)
    np.testing.assert_array_equal(sem.index.item_ids, ids)
    assert sem.codes.shape == (len(ids), 16) and sem.codes.min() >= 0 and sem.codes.max() <= 255
    emb_ids, emb = read_all_embeddings(cfg.run_dir)
    np.testing.assert_array_equal(np.sort(emb_ids), ids)  # every item exactly once
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    index = opq.read_index(paths.opq_index, io.read_json(paths.opq_meta)["index_digest"])
    twin = opq.brute_force_codes(index, emb)
    np.testing.assert_array_equal(sem.codes[sem.index.rows(emb_ids)], twin)
    assert stats["n_items"] == len(ids) and stats["n_digit"] == 16 and stats["codebook_size"] == 256
    assert stats == io.read_json(paths.tokenizer_stats)
    assert len(stats["digit_entropy_bits"]) == 16 and stats["usage_min_mean_max"][2] <= 256
    # OPQ saw exactly the training-sequence items (fewer than the catalogue: held-out-only items).
    # Workers ran with the tokenize worker environment (sleeping, not spinning, OpenMP threads).
    manifests = shards.read_manifests(paths.embedding_manifests) + shards.read_manifests(paths.code_manifests)
    assert {m["omp_wait_policy"] for m in manifests} == {"PASSIVE"}
    n_train = len(stage.training_item_ids(synth_dataset, None, cfg.model.max_seq_len))
    assert stats["opq"]["n_sample"] == n_train < len(ids)
    # "auto" was decided once, on the driver, and the shards and the index record what it chose.
    chosen = embed.resolve_dtype("auto", use_gpu=False)
    assert chosen == ("bfloat16" if embed.native_bf16() else "float32")
    assert stats["opq"]["encoder"] == {"encoder": "bundled", "dtype": chosen}


def test_same_data_config_and_seed_give_identical_codes(tokenized, tmp_path):
    cfg, _ = tokenized
    again = make_cfg(cfg.dataset, str(tmp_path / "again"))
    stage.tokenize(again)
    first, second = RunPaths(cfg.run_dir), RunPaths(again.run_dir)
    np.testing.assert_array_equal(load_semantic_ids(first.semantic_ids).codes,
                                  load_semantic_ids(second.semantic_ids).codes)
    assert io.read_bytes(first.opq_index) == io.read_bytes(second.opq_index)


def test_resume_skips_complete_shards(tokenized, tmp_path):
    cfg, stats = tokenized
    run_dir = str(tmp_path / "resumed")
    shutil.copytree(cfg.run_dir, run_dir)
    paths = RunPaths(run_dir)
    manifests = io.list_files(paths.embedding_manifests, ".json")
    # Interrupted run: two shards never committed (one part file written, one not even that).
    for uri in manifests[3:5]:
        io.remove(uri)
    io.remove(io.join(paths.embeddings, shards.part_name("000004")))
    leftover = os.path.join(run_dir, "embeddings", ".tmp-0123456789ab-part-000004.parquet")
    open(leftover, "wb").close()  # what a worker killed mid-write leaves behind
    untouched = io.join(paths.embeddings, shards.part_name("000000"))
    mtime = os.stat(untouched).st_mtime_ns
    resumed = stage.tokenize(make_cfg(cfg.dataset, run_dir))
    timings = resumed["timings"]
    assert (timings["embed_shards_run"], timings["embed_shards_skipped"]) == (2, stats["n_shards"] - 2)
    assert timings["opq_reused"] is True and timings["encode_shards_run"] == 0
    assert os.stat(untouched).st_mtime_ns == mtime and not os.path.exists(leftover)
    np.testing.assert_array_equal(load_semantic_ids(paths.semantic_ids).codes,
                                  load_semantic_ids(RunPaths(cfg.run_dir).semantic_ids).codes)


def test_a_truncated_or_missing_committed_part_is_redone_on_resume(tokenized, tmp_path):
    """A committed shard whose part file was truncated (embedding) or deleted (codes) after its
    manifest: resume checks each part's size against its manifest and redoes exactly those."""
    cfg, stats = tokenized
    run_dir = str(tmp_path / "damaged")
    shutil.copytree(cfg.run_dir, run_dir)
    paths = RunPaths(run_dir)
    truncated = os.path.join(run_dir, "embeddings", shards.part_name("000002"))
    with open(truncated, "r+b") as handle:
        handle.truncate(os.path.getsize(truncated) // 2)
    io.remove(io.join(paths.codes, shards.part_name("000005")))
    resumed = stage.tokenize(make_cfg(cfg.dataset, run_dir))
    timings = resumed["timings"]
    assert (timings["embed_shards_run"], timings["embed_shards_skipped"]) == (1, stats["n_shards"] - 1)
    # Only the deleted codes part is encoded again: the re-embedded shard has the same inputs and
    # encoder (the same fingerprint), so its committed codes still hold.
    assert timings["encode_shards_run"] == 1
    np.testing.assert_array_equal(load_semantic_ids(paths.semantic_ids).codes,
                                  load_semantic_ids(RunPaths(cfg.run_dir).semantic_ids).codes)


def test_killed_actor_redoes_its_work_and_every_item_is_written_once(synth_dataset, tmp_path, ray_local):
    """An actor dies by SIGKILL right after committing its first shard (an armed crash point, no
    race): the stage still finishes, every shard is committed once (the victim's redone) and every
    item written once."""
    from rpg_dist import failpoints

    cfg = make_cfg(synth_dataset, str(tmp_path / "run"), shard_size=24, embed_batch_size=8)
    manifest_dir = RunPaths(cfg.run_dir).embedding_manifests
    n_shards = len(shards.plan_shards(dataset.items_uri(synth_dataset), 24, None))
    failpoints.arm("shard-committed")
    stats = stage.tokenize(cfg)
    victims = failpoints.fired("shard-committed")
    assert len(victims) == 1 and n_shards > 2
    manifests = shards.read_manifests(manifest_dir)
    assert len(manifests) == n_shards
    # The victim's task never returned, so Ray ran it again on a live actor, which rewrote that
    # shard's part and manifest in place: every manifest is a live actor's.
    assert victims[0] not in {m["pid"] for m in manifests}
    ids, _ = read_all_embeddings(cfg.run_dir)
    np.testing.assert_array_equal(np.sort(ids), all_item_ids(synth_dataset))  # unique and complete
    assert stats["n_items"] == len(ids)


def new_items(path, ids, texts) -> str:
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "text": texts}), path)
    return str(path)


def test_add_appends_new_items_without_retraining(tokenized, tmp_path):
    cfg, stats = tokenized
    run_dir = str(tmp_path / "grown")
    shutil.copytree(cfg.run_dir, run_dir)
    paths = RunPaths(run_dir)
    before = load_semantic_ids(paths.semantic_ids)
    index_bytes, meta = io.read_bytes(paths.opq_index), io.read_json(paths.opq_meta)
    texts = [f"deluxe waterproof travel tent number {i} by Zenora" for i in range(70)]
    uri = new_items(tmp_path / "new.parquet", np.arange(70) + 10_000, texts)
    grown = stage.tokenize(make_cfg(cfg.dataset, run_dir), add=uri)
    after = load_semantic_ids(paths.semantic_ids)
    assert len(after.index) == len(before.index) + 70 == grown["n_items"]
    np.testing.assert_array_equal(after.codes[after.index.rows(before.index.item_ids)], before.codes)
    assert io.read_bytes(paths.opq_index) == index_bytes and io.read_json(paths.opq_meta) == meta
    assert grown["timings"]["embed_items"] == 70 and grown["added_from"] == uri
    new_keys = [k for k in shards.committed(paths.embedding_manifests, None) if k.startswith("add-")]
    assert len(new_keys) == 2  # 70 items in shards of 64
    ids, emb = embed.read_embeddings(io.join(paths.embeddings, shards.part_name(new_keys[0])))
    np.testing.assert_array_equal(after.codes[after.index.rows(ids)],
                                  opq.brute_force_codes(opq.read_index(paths.opq_index, io.read_json(paths.opq_meta)["index_digest"]), emb))
    # The same batch again is a no-op; an id that already has codes is an error naming file and row.
    assert stage.tokenize(make_cfg(cfg.dataset, run_dir), add=uri)["timings"]["embed_items"] == 0
    clash = new_items(tmp_path / "clash.parquet", [20_000, int(before.index.item_ids[5])], ["a", "b"])
    with pytest.raises(DataError, match=r"clash.parquet: row 1: field 'item_id' .* already has a semantic ID"):
        stage.tokenize(make_cfg(cfg.dataset, run_dir), add=clash)
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"item_id": [40_000], "title": ["x"]}), no_text)
    with pytest.raises(DataError, match=r"no_text.parquet: field 'text' is missing or not a string"):
        stage.tokenize(make_cfg(cfg.dataset, run_dir), add=str(no_text))


def test_add_before_a_full_run_is_a_stage_error(synth_dataset, tmp_path):
    uri = new_items(tmp_path / "new.parquet", [1], ["x"])
    with pytest.raises(StageError, match="run `rpg-dist tokenize` without --add first"):
        stage.tokenize(make_cfg(synth_dataset, str(tmp_path / "empty")), add=uri)


def test_empty_text_in_new_items_names_file_row_and_item(tokenized, tmp_path):
    cfg, _ = tokenized
    run_dir = str(tmp_path / "bad")
    shutil.copytree(cfg.run_dir, run_dir)
    uri = new_items(tmp_path / "bad.parquet", [30_001, 30_002, 30_003], ["fine", "", "also fine"])
    with pytest.raises(DataError, match=r"bad.parquet: row 1 \(item_id 30002\): field 'text' is empty"):
        stage.tokenize(make_cfg(cfg.dataset, run_dir), add=uri)
    assert len(load_semantic_ids(RunPaths(run_dir).semantic_ids).index) == 600  # nothing committed


@pytest.fixture(scope="module")
def projected_encoder(tmp_path_factory):
    """Build real sentence-transformers model directories: the bundled encoder + a Dense layer."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    def build(name: str, out_dim: int, fill: float) -> str:
        base = SentenceTransformer(str(embed.resolve_encoder("bundled")), device="cpu")
        dense = models.Dense(384, out_dim, activation_function=torch.nn.Identity())
        torch.nn.init.constant_(dense.linear.weight, fill)
        torch.nn.init.zeros_(dense.linear.bias)
        path = str(tmp_path_factory.mktemp(name))
        SentenceTransformer(modules=[base[0], base[1], dense], device="cpu").save(path)
        return path

    return build


def test_zero_embeddings_are_an_error_naming_the_item(synth_dataset, tmp_path, projected_encoder, ray_local):
    model = projected_encoder("zero", 64, 0.0)  # every embedding is all zeros
    cfg = make_cfg(synth_dataset, str(tmp_path / "run"), encoder=model, concurrency=1)
    with pytest.raises(DataError, match=r"items/part-00000.parquet: row \d+ \(item_id \d+\): field "
                                        r"'embedding' is all zeros"):
        stage.tokenize(cfg)


def test_dimension_not_divisible_by_n_digit_is_a_config_error(synth_dataset, tmp_path, projected_encoder,
                                                              ray_local):
    model = projected_encoder("d100", 100, 0.01)
    cfg = make_cfg(synth_dataset, str(tmp_path / "run"), encoder=model, n_digit=8, concurrency=1)
    with pytest.raises(ConfigError, match=r"tokenize.n_digit: the embedding dimension 100 is not divisible"):
        stage.tokenize(cfg)


def test_missing_encoder_fails_before_any_work(synth_dataset, tmp_path):
    cfg = make_cfg(synth_dataset, str(tmp_path / "run"), encoder=str(tmp_path / "no-model"))
    with pytest.raises(ConfigError, match="tokenize.encoder: .*no-model.* never downloaded"):
        stage.tokenize(cfg)
    assert not os.path.exists(tmp_path / "run")


def test_s3_dataset_and_run_dir(synth_dataset, s3_bucket, ray_local):
    endpoint, bucket = s3_bucket
    storage = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "region": "us-east-1"}
    s3_storage = make_cfg("s3://x/d", "s3://x/r", storage).storage
    fs, _ = io.filesystem(f"s3://{bucket}/", s3_storage)
    fs.put(synth_dataset, f"{bucket}/dataset", recursive=True)
    cfg = make_cfg(f"s3://{bucket}/dataset", f"s3://{bucket}/run", storage, shard_size=200, concurrency=1,
                   opq_niter=2)
    stats = stage.tokenize(cfg)
    sem = load_semantic_ids(RunPaths(cfg.run_dir).semantic_ids, cfg.storage)
    assert len(sem.index) == stats["n_items"] == 600
    assert len(shards.shard_node_ids(cfg.run_dir, cfg.storage, kind="embed")) == 3


def test_semantic_ids_load_sorted_by_item_id_across_row_groups_and_name_a_bad_row(tmp_path):
    rng = np.random.default_rng(0)
    item_ids = rng.permutation(np.arange(100, 150))  # not in id order, as a merge of shards may write them
    codes = rng.integers(0, 256, (50, 6)).astype(np.int16)
    uri = str(tmp_path / "semantic_ids.parquet")
    pq.write_table(to_table(item_ids, codes), uri, row_group_size=7)  # several chunks when read
    loaded = load_semantic_ids(uri)
    order = np.argsort(item_ids)
    assert np.array_equal(loaded.index.item_ids, item_ids[order]) and np.array_equal(loaded.codes, codes[order])
    codes[30, 4] = 256
    pq.write_table(to_table(item_ids, codes), uri, row_group_size=7)
    with pytest.raises(DataError, match=f"row 30 \\(item_id {item_ids[30]}\\): field 'codes' is outside 0..255"):
        load_semantic_ids(uri)
