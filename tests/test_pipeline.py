"""`rpg-dist run` end to end on a tiny synthetic catalogue: every stage, skipping, --force, serving, S3."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import StorageConfig, config_from_dict, load_config
from rpg_dist.errors import DataError, StageError
from rpg_dist.pipeline import format_metrics, run_pipeline
from rpg_dist.recommend import Recommender, parse_history

from helpers import tiny_config

RPG = str(Path(sys.executable).parent / "rpg-dist")


def _write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _run_ids(run_dir: str, storage=None) -> dict[str, str]:
    paths = RunPaths(run_dir)
    return {s: io.read_json(paths.stage_manifest(s), storage)["run_id"]
            for s in ("tokenize", "train", "build-graph", "evaluate")}


def own_copy(tiny_run, tmp_path, overrides=()):
    """The shared run copied to this test's folder, and its config pointed there: a test that
    re-runs stages changes only its copy, so the tests do not depend on their order."""
    config, run_dir, _ = tiny_run
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    return load_config(config, [f"run_dir={copy}", *overrides]), copy


def test_run_writes_every_artefact_and_the_metrics_table(tiny_run):
    config, run_dir, out = tiny_run
    paths = RunPaths(run_dir)
    for uri in (paths.semantic_ids, paths.opq_index, paths.tokenizer_stats, paths.model_weights,
                paths.model_config, paths.graph_manifest, paths.metrics, io.join(run_dir, "config.yaml")):
        assert io.exists(uri), uri
    metrics = io.read_json(paths.metrics)
    for split in ("val", "test"):
        assert {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "n_visited_items"} <= set(metrics[split])
        assert 0 < metrics[split]["n_visited_items"] < 800  # decoding did not score the whole catalogue
    assert {"recall@10", "ndcg@10"} <= set(metrics["test_full_ranking"]) and "ndcg@10" in metrics["popularity"]
    assert set(metrics["pipeline"]["stage_wall_s"]) == {"prepare", "tokenize", "train", "build-graph", "evaluate"}
    # Banners for every stage and the metrics table at the end.
    for stage in ("prepare", "tokenize", "train", "build-graph", "evaluate"):
        assert f"] {stage}:" in out.stderr
    assert format_metrics(metrics).splitlines()[0].startswith("split") and "test_full_ranking" in out.stdout
    assert f"run directory: {run_dir}" in out.stdout


def test_rerun_skips_complete_stages_and_config_changes_redo_downstream(tiny_run, tmp_path):
    cfg, run_dir = own_copy(tiny_run, tmp_path)
    before = _run_ids(run_dir)
    run_pipeline(cfg)
    assert _run_ids(run_dir) == before  # nothing recomputed
    run_pipeline(load_config(tiny_run[0], [f"run_dir={run_dir}", "decode.steps=3"]))
    after = _run_ids(run_dir)
    assert {s for s in before if before[s] != after[s]} == {"evaluate"}
    assert io.read_json(RunPaths(run_dir).metrics)["decode"]["steps"] == 3


def test_force_redoes_a_stage_and_everything_after_it(tiny_run, tmp_path):
    cfg, run_dir = own_copy(tiny_run, tmp_path)
    before = _run_ids(run_dir)
    run_pipeline(cfg, force=["build-graph"])
    after = _run_ids(run_dir)
    assert {s for s in before if before[s] != after[s]} == {"build-graph", "evaluate"}


def test_recommend_api_and_cli(tiny_run):
    _, run_dir, _ = tiny_run
    recommender = Recommender.load(run_dir, method="graph")
    graph = recommender.recommend([[5, 17, 300], [44]], k=5)
    full = recommender.recommend([[5, 17, 300], [44]], k=5, full_ranking=True)
    assert [len(r) for r in graph] == [5, 5] and [len(r) for r in full] == [5, 5]
    for recs in graph + full:
        scores = [r.score for r in recs]
        assert scores == sorted(scores, reverse=True) and all(r.title for r in recs)
    # Graph decoding can only find items as good as full ranking's best.
    assert graph[0][0].score <= full[0][0].score + 1e-5
    assert [[r.item_id for r in recs] for recs in graph] != [[r.item_id for r in recs] for recs in full]
    # decode.method=auto: full ranking up to full_ranking_max_items (800 here), graph decoding above.
    auto = Recommender.load(run_dir)
    assert auto.decoding == "full_ranking" and recommender.decoding == "graph"
    assert auto.recommend([[5, 17, 300], [44]], k=5) == full
    auto.decode_cfg = dataclasses.replace(auto.decode_cfg, full_ranking_max_items=799)
    assert auto.decoding == "graph" and auto.recommend([[5, 17, 300], [44]], k=5) == graph
    with pytest.raises(DataError, match="history: item_id 999999 is unknown"):
        recommender.recommend([[5, 999999]])
    with pytest.raises(DataError, match="history: 99999999999999999999 is not an item id"):
        recommender.recommend([[5, 99999999999999999999]])
    for k in (-3, 0, 801, 2.5):
        with pytest.raises(DataError, match=f"k: {k} must be a whole number from 1 to the catalogue's 800 items"):
            recommender.recommend([[5, 17]], k=k)
    # Random starts are drawn per batch: the CLI's one-history batch is compared with the same batch here.
    for method, want in (("graph", recommender.recommend([[5, 17, 300]], k=3)[0]),
                         ("full", recommender.recommend([[5, 17, 300]], k=3, full_ranking=True)[0])):
        out = subprocess.run([RPG, "recommend", "--run", run_dir, "--history", "5,17,300", "--k", "3", "--method",
                              method], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "history: 5,17,300" and len(lines) == 5
        assert [int(line.split()[1]) for line in lines[2:5]] == [r.item_id for r in want], (method, lines)
    bad = subprocess.run([RPG, "recommend", "--run", run_dir, "--history", "5,999999"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "item_id 999999 is unknown" in bad.stderr


def test_parse_history_and_missing_run(tmp_path):
    assert parse_history("12, 55,901") == [12, 55, 901]
    with pytest.raises(DataError, match="expected comma-separated item ids"):
        parse_history("12,x")
    with pytest.raises(StageError, match="no config.yaml"):
        Recommender.load(str(tmp_path))


def test_stage_before_its_input_is_a_clear_error(tmp_path):
    cfg = config_from_dict(tiny_config(str(tmp_path / "ds"), str(tmp_path / "run")))
    from rpg_dist.train.stage import train

    with pytest.raises(StageError, match="run `rpg-dist tokenize` first"):
        train(cfg)


def test_pipeline_on_s3(s3_bucket, tmp_path, ray_local):
    """Dataset and run directory both on a real S3 server: prepare -> ... -> evaluate, then a rerun."""
    endpoint, bucket = s3_bucket
    storage = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "region": "us-east-1"}
    cfg = config_from_dict(tiny_config(f"s3://{bucket}/datasets/tiny", f"s3://{bucket}/runs/tiny",
                                       storage=storage, train={"epochs": 1}))
    metrics = run_pipeline(cfg)
    assert metrics["test"]["n_visited_items"] > 0
    s3 = StorageConfig(**storage)
    paths = RunPaths(cfg.run_dir)
    for uri in (paths.semantic_ids, paths.model_weights, paths.graph_manifest, paths.metrics):
        assert io.exists(uri, s3), uri
    before = _run_ids(cfg.run_dir, s3)
    run_pipeline(cfg)
    assert _run_ids(cfg.run_dir, s3) == before
    served = Recommender.load(cfg.run_dir, s3).recommend([[1, 2, 3]], k=3)
    assert len(served[0]) == 3
    # The recorded config never holds the credentials.
    assert "testing" not in io.read_text(io.join(cfg.run_dir, "config.yaml"), s3)


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    from rpg_dist.errors import StorageError

    storage = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    cfg = config_from_dict(tiny_config("s3://no-such-bucket/ds", "s3://no-such-bucket/run", storage=storage))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        run_pipeline(cfg)


def _test_queries(run_dir: str, dataset: str):
    """The trained tiny model, its codes, and the test split's (B, m, V) log-probs and target rows."""
    from rpg_dist.data.dataset import read_sequences
    from rpg_dist.data.splits import leave_one_out
    from rpg_dist.evaluation.stage import to_queries
    from rpg_dist.model.export import load_model
    from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

    model = load_model(run_dir)
    index = load_semantic_ids(RunPaths(run_dir).semantic_ids).index
    split = leave_one_out(read_sequences(dataset), max_len=model.cfg.max_seq_len)
    queries = to_queries(split.test, index, "test")
    with torch.no_grad():
        log_probs = torch.cat([model.next_token_log_probs(items, lengths).float()
                               for items, lengths, _ in queries.batches(256)])
    return model, index, log_probs, queries.targets


def _ndcg_at_10(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per query: 1 / log2(2 + position of the target) when it is in the top 10, else 0."""
    hit = ranked[:, :10] == targets[:, None]
    return np.where(hit.any(1), 1.0 / np.log2(2 + hit.argmax(1)), 0.0)


def test_graph_decoder_is_the_papers_walk_given_its_graph_and_starts(tiny_run):
    """Fed the reference's own graph (self-edges) and the same start items, our vectorised decoder
    keeps exactly the beams and visit counts of the reference's per-query loop
    (tests/twins.paper_graph_decode), on a trained model. (Its starts drawn with replacement are
    compared in the test below: ours are distinct.)"""
    from rpg_dist.decode.graph_decode import GraphDecoder, random_start_items
    from twins import paper_adjacency, paper_graph_decode

    config, run_dir, _ = tiny_run
    cfg = load_config(config)
    model, index, log_probs, _ = _test_queries(run_dir, cfg.dataset)
    codes = model.item_codes.cpu()
    adjacency = paper_adjacency(model.token_embeddings.detach(), codes, cfg.graph.n_edges)
    # Self-similarity is the maximum: each item heads its own list, or an item with its very codes does.
    assert (adjacency == torch.arange(len(index))[:, None]).any(1).float().mean() > 0.9
    b, q = cfg.decode.num_beams, cfg.decode.steps
    start = random_start_items(len(log_probs), len(index), b, torch.Generator().manual_seed(3))
    beams, visited = paper_graph_decode(log_probs, codes, adjacency, start, q)
    ours = GraphDecoder(codes, adjacency, b, q).decode(log_probs, start)
    # Items with identical codes tie exactly; the reference breaks ties as torch.topk does, we by
    # row. So: the same beam scores everywhere, the same items wherever no tie crosses the cut.
    paper_scores = torch.stack([log_probs[torch.arange(len(beams))[:, None], k, codes[torch.tensor(beams), k].long()]
                                for k in range(codes.shape[1])]).mean(0)  # (B, b)
    torch.testing.assert_close(ours.scores, paper_scores.sort(dim=1, descending=True).values)
    same = [sorted(o) == sorted(p) for o, p in zip(ours.items.tolist(), beams)]
    assert np.mean(same) > 0.98
    assert ours.n_visited.tolist() == visited


def test_our_decoding_matches_the_papers_quality_within_noise(tiny_run):
    """Our decoding (graph without self-edges plus the beam, distinct random starts) against the
    reference's (self-edges, starts drawn with replacement) on the trained tiny run: the paired
    per-user NDCG@10 difference is within 4 standard errors of 0, and both are far above chance."""
    from rpg_dist.decode.graph_decode import GraphDecoder, random_start_items
    from rpg_dist.graph.store import load_graph
    from twins import paper_adjacency, paper_graph_decode

    config, run_dir, _ = tiny_run
    cfg = load_config(config)
    model, index, log_probs, targets = _test_queries(run_dir, cfg.dataset)
    codes = model.item_codes.cpu()
    b, q, n = cfg.decode.num_beams, cfg.decode.steps, len(index)
    generator = torch.Generator().manual_seed(cfg.decode.seed)
    neighbors = torch.from_numpy(load_graph(run_dir, index).neighbors)
    ours = GraphDecoder(codes, neighbors, b, q).decode(log_probs, random_start_items(len(targets), n, b, generator))
    # The reference counts the self-edge among its n_edges: one more gives both n_edges others.
    adjacency = paper_adjacency(model.token_embeddings.detach(), codes, cfg.graph.n_edges + 1)
    paper_start = torch.randint(0, n, (len(targets), b), generator=generator)
    paper_beams, _ = paper_graph_decode(log_probs, codes, adjacency, paper_start, q)
    ndcg_ours = _ndcg_at_10(ours.items.numpy(), targets)
    ndcg_paper = _ndcg_at_10(np.array(paper_beams), targets)
    diff = ndcg_ours - ndcg_paper
    assert abs(diff.mean()) <= 4 * diff.std(ddof=1) / np.sqrt(len(diff)) + 1e-9
    # Both learned something: NDCG@10 of a random top 10 is sum_i 1/log2(i + 2) / n_items.
    chance = (1 / np.log2(np.arange(10) + 2)).sum() / n
    assert ndcg_ours.mean() > 4 * chance and ndcg_paper.mean() > 4 * chance


def _flip_bytes(path: Path, offset_fraction: float = 0.5, size: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at : at + size] = bytes(255 - b for b in data[at : at + size])
    path.write_bytes(bytes(data))


def test_altered_artefacts_are_refused_where_they_are_read(tiny_run, tmp_path):
    from rpg_dist.catalogue import ItemEncoder

    _, run_dir = own_copy(tiny_run, tmp_path)
    paths = RunPaths(run_dir)
    _flip_bytes(Path(paths.model_weights))
    with pytest.raises(StageError, match="model.safetensors: content differs from the digest"):
        Recommender.load(run_dir)
    out = subprocess.run([RPG, "recommend", "--run", run_dir, "--history", "5,17"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "altered or truncated" in out.stderr and "Traceback" not in out.stderr
    _flip_bytes(Path(paths.opq_index), 0.7, 64)
    with pytest.raises(StageError, match="opq.faissindex: content differs"):
        ItemEncoder(run_dir)  # faiss never parses the altered bytes
    part = sorted(Path(paths.graph).glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-100])
    from rpg_dist.graph.store import load_graph
    from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

    with pytest.raises(StageError, match=f"{part.name}: content differs"):
        load_graph(run_dir, load_semantic_ids(paths.semantic_ids).index)


def test_build_graph_refuses_altered_weights_and_an_unreadable_header_is_a_clear_error(tiny_run, tmp_path):
    from rpg_dist.graph.stage import load_token_embeddings

    _, run_dir = own_copy(tiny_run, tmp_path)
    paths = RunPaths(run_dir)
    _flip_bytes(Path(paths.model_weights))
    with pytest.raises(StageError, match="model.safetensors: content differs from the digest"):
        load_token_embeddings(run_dir)
    # An export from before weight digests: nothing to check against, but a broken header is still
    # one line naming the file (was safetensors' own exception).
    config = io.read_json(paths.model_config)
    del config["weights_sha256"]
    io.write_json(paths.model_config, config)
    Path(paths.model_weights).write_bytes(b"\xff" * 64)
    with pytest.raises(StageError, match="model.safetensors: not a readable safetensors file"):
        load_token_embeddings(run_dir)
    out = subprocess.run([RPG, "recommend", "--run", run_dir, "--history", "5,17"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "not a readable safetensors file" in out.stderr and "Traceback" not in out.stderr


def test_run_redoes_a_stage_whose_outputs_changed(tiny_run, tmp_path):
    cfg, run_dir = own_copy(tiny_run, tmp_path)
    before = _run_ids(run_dir)
    part = sorted(Path(RunPaths(run_dir).graph).glob("part-*.parquet"))[-1]
    part.unlink()  # a deleted graph part: build-graph (and evaluate after it) must run again
    run_pipeline(cfg)
    after = _run_ids(run_dir)
    assert {s for s in before if before[s] != after[s]} == {"build-graph", "evaluate"}
    _flip_bytes(Path(RunPaths(run_dir).model_weights))  # altered weights: train and everything after
    run_pipeline(cfg)
    again = _run_ids(run_dir)
    assert {s for s in after if after[s] != again[s]} == {"train", "build-graph", "evaluate"}
    run_pipeline(cfg)
    assert _run_ids(run_dir) == again  # and now everything is current again


def test_a_reimported_dataset_with_new_texts_redoes_the_stages(tiny_run, tmp_path):
    from rpg_dist.data import dataset
    from rpg_dist.data.dataset import DatasetWriter

    config, _, _ = tiny_run
    shared_dataset = load_config(config).dataset
    copy = str(tmp_path / "dataset")
    shutil.copytree(shared_dataset, copy)
    # train.resume=false: checkpoints of the old semantic IDs cannot be resumed (train refuses them)
    cfg, run_dir = own_copy(tiny_run, tmp_path, [f"dataset={copy}", "train.resume=false"])
    before = _run_ids(run_dir)
    run_pipeline(cfg)
    assert _run_ids(run_dir) == before  # the same content elsewhere: nothing to redo
    items = dataset.read_items(copy, columns=None)
    texts = items.column("text").to_pylist()
    texts[0] = texts[0] + " Now in a refill pack."
    sequences = dataset.read_sequences(copy)
    with DatasetWriter(copy, source="synth", overwrite=True) as writer:
        writer.add_items(items.set_column(items.schema.get_field_index("text"), "text", pa.array(texts)), origin="items")
        writer.add_sequences(sequences, origin="sequences")
        info = writer.commit()
    assert (info.n_items, info.n_users) == (800, 600)  # the same counts
    run_pipeline(cfg)
    after = _run_ids(run_dir)
    assert all(before[s] != after[s] for s in before)
