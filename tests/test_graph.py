"""Graph builder: exact blockwise kNN vs the dense twin, approximate recall, partitions, storage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rpg_dist import failpoints, io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict
from rpg_dist.data.items import ItemIndex
from rpg_dist.errors import ConfigError, DataError, StageError
from rpg_dist.graph import builder as graph_builder
from rpg_dist.graph.builder import build_item_graph, stream_item_graph
from rpg_dist.graph.config import GraphConfig
from rpg_dist.graph.exact import exact_neighbors
from rpg_dist.graph.partition import balanced_assign, cross_fraction, neighbor_counts, refine_partition
from rpg_dist.decode.scoring import offset_codes
from rpg_dist.graph.similarity import block_sums, digit_similarity_tables, pair_sums, query_tables
from rpg_dist.graph.stage import build_graph
from rpg_dist.graph.store import commit_graph, load_graph, read_manifest
from rpg_dist.testing.codes import clustered_codes, random_token_table
from rpg_dist.graph.token_blocks import plan_token_blocks, token_block_neighbors
from rpg_dist.graph import token_pairs
from rpg_dist.graph.token_pairs import choose_shared, sharing_fraction, token_pair_neighbors, token_pair_shares
from rpg_dist.tokenizer.semantic_ids import write_semantic_ids
from twins import dense_neighbors, dense_sums


def _tied_catalogue(n_items: int, n_digit: int, seed: int):
    """Few distinct tokens and duplicated token vectors: many exactly equal similarities."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n_digit, 3, 8, generator=gen)
    table = base[:, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])]  # (m, 8, 8): tokens 0/3/6 identical...
    codes = torch.randint(0, 8, (n_items, n_digit), generator=gen, dtype=torch.int16)
    return table, codes


def test_similarity_matches_paper_definition():
    table = random_token_table(4, 16, 10, seed=0)
    codes = torch.randint(0, 16, (30, 4), dtype=torch.int16)
    sims = 0.5 + dense_sums(digit_similarity_tables(table), codes) / (2 * 4)
    e = torch.nn.functional.normalize(table.double(), dim=-1)
    a, b = 3, 17
    expected = np.mean([(1 + float(e[k, codes[a, k].long()] @ e[k, codes[b, k].long()])) / 2 for k in range(4)])
    assert sims[a, b].item() == pytest.approx(expected, abs=1e-6)
    assert sims[a, a].item() == pytest.approx(1.0, abs=1e-6)
    # Bit-symmetric (query_tables reads T_k[j, a_k] for T_k[a_k, j]), also for a wide GEMM.
    wide = digit_similarity_tables(random_token_table(4, 256, 448, seed=1))
    assert torch.equal(wide, wide.transpose(1, 2))


def test_block_and_pair_sums_are_bit_identical_to_dense():
    table, codes = _tied_catalogue(120, 6, seed=1)
    tables = digit_similarity_tables(table)
    dense = dense_sums(tables, codes)
    queries = torch.tensor([0, 5, 119])
    block = block_sums(query_tables(tables, codes[queries]), offset_codes(codes[40:90], 8))  # (items, queries)
    assert torch.equal(block.t(), dense[queries][:, 40:90])
    cand = torch.randint(0, 120, (3, 11))
    pairs = pair_sums(tables, codes[queries].long(), codes, cand)
    assert torch.equal(pairs, dense[queries.unsqueeze(1), cand])


@pytest.mark.parametrize("chunk", [1, 7, 50, 4096])
@pytest.mark.parametrize("n_edges", [1, 9, 199])
def test_exact_blockwise_equals_dense_twin(chunk, n_edges):
    table, codes = _tied_catalogue(150, 5, seed=2)
    tables = digit_similarity_tables(table)
    got = exact_neighbors(tables, codes, torch.arange(150), n_edges, chunk)
    expected = dense_neighbors(tables, codes, n_edges)
    assert np.array_equal(got.numpy(), expected)
    assert not (got == torch.arange(150).unsqueeze(1)).any()  # never its own neighbour
    if n_edges == 199:
        assert (got[:, 149:] == -1).all() and (got[:, :149] >= 0).all()


def test_balanced_assign_respects_capacity_and_preferences():
    rng = np.random.default_rng(0)
    preference = rng.standard_normal((1001, 4))
    assign = balanced_assign(preference, capacity=251)
    assert np.bincount(assign, minlength=4).max() <= 251 and (assign >= 0).all()
    # Unconstrained capacity: everyone gets their favourite.
    assert np.array_equal(balanced_assign(preference, capacity=1001), preference.argmax(axis=1))
    # All prefer partition 0 with capacity 2: the two strongest get it.
    prefs = np.array([[5.0, 0.0], [9.0, 0.0], [7.0, 0.0], [1.0, 0.0]])
    assert balanced_assign(prefs, capacity=2).tolist() == [1, 0, 0, 1]


def test_neighbor_counts_and_cross_fraction_by_hand():
    partition = np.array([0, 0, 1, 1])
    neighbors = np.array([[1, 2], [0, -1], [3, 0], [2, 1]])
    counts = neighbor_counts(partition, neighbors, 2, chunk=3)
    assert counts.tolist() == [[1, 1], [1, 0], [1, 1], [1, 1]]
    assert cross_fraction(partition, neighbors, chunk=2) == pytest.approx(3 / 7)


def test_label_propagation_follows_its_definition():
    """refine_partition against rounds written out with loops (balanced_assign is tested above)."""
    rng = np.random.default_rng(5)
    n_items, n_parts = 90, 3
    neighbors = np.array([rng.choice(np.delete(np.arange(n_items), i), 6, replace=False) for i in range(n_items)])
    neighbors[rng.random(neighbors.shape) < 0.2] = -1
    start = rng.permutation(np.arange(n_items) % n_parts).astype(np.int32)

    def crossing(partition) -> int:
        return sum(partition[i] != partition[j] for i in range(n_items) for j in neighbors[i] if j >= 0)

    want = start
    for _ in range(3):
        preference = np.zeros((n_items, n_parts))
        for i in range(n_items):
            for j in neighbors[i]:
                if j >= 0:
                    preference[i, want[j]] += 1
            preference[i, want[i]] += 0.5  # ties keep the current partition
        moved = balanced_assign(preference, capacity=30)
        if (moved == want).all() or crossing(moved) >= crossing(want):
            break
        want = moved
    got = refine_partition(start, neighbors, n_parts, rounds=3)
    assert np.array_equal(got, want) and crossing(got) < crossing(start)


@pytest.mark.parametrize("where", ["ray", "local"])
def test_exact_build_equals_twin_and_partitions_keep_edges_inside(where, request):
    if where == "ray":
        request.getfixturevalue("ray_local")
    codes = clustered_codes(1200, 8, n_clusters=12, keep=0.8, seed=3)
    table = random_token_table(8, 256, 16, seed=3)
    cfg = GraphConfig(n_edges=20, block_size=200, item_chunk=500, n_partitions=3,
                      local_max_items=0 if where == "ray" else 10**9)
    built = build_item_graph(table, codes, cfg, seed=0)
    assert built.info["workers"] == ("2 Ray actors" if where == "ray" else "in-process threads")
    expected = dense_neighbors(digit_similarity_tables(table), codes, 20)
    assert np.array_equal(built.neighbors, expected)
    sizes = np.bincount(built.partition, minlength=3)
    assert sizes.max() <= 400 and sizes.sum() == 1200
    assert built.info["cross_partition_edge_fraction"] == pytest.approx(cross_fraction(built.partition, expected))
    # Random balanced partitions would cut ~2/3 of the edges.
    assert built.info["cross_partition_edge_fraction"] < 0.2


@pytest.mark.parametrize(("method", "where"), [("ivf_blocks", "ray"), ("ivf_blocks", "local"), ("faiss_index", "local")])
def test_approx_build_recall(method, where, request):
    if where == "ray":
        request.getfixturevalue("ray_local")
    codes = clustered_codes(4000, 16, n_clusters=40, keep=0.7, seed=4)
    table = random_token_table(16, 256, 24, seed=4)
    cfg = GraphConfig(mode="approx", approx_method=method, n_edges=30, block_size=1000,
                      local_max_items=0 if where == "ray" else 10**9,
                      approx_nlist=32, approx_nprobe=4, approx_index="IVF16,Flat", approx_params="nprobe=4",
                      approx_dim=64, approx_candidates=200, recall_sample=300, n_partitions=2)
    built = build_item_graph(table, codes, cfg, seed=0)
    exact = dense_neighbors(digit_similarity_tables(table), codes, 30)
    recall = np.mean([len(set(a) & set(b)) / 30 for a, b in zip(built.neighbors.tolist(), exact.tolist())])
    assert recall >= 0.9
    assert built.stats["recall@30"] == pytest.approx(recall, abs=0.05)
    assert built.info["approx_method"] == method and built.info["candidates_per_item_mean"] < 4000
    assert not (built.neighbors == np.arange(4000)[:, None]).any()
    # Candidates are scored exactly: where the sets agree, the order is exact mode's (ties included).
    same = [i for i in range(4000) if set(built.neighbors[i]) == set(exact[i])]
    assert len(same) > 100 and all((built.neighbors[i] == exact[i]).all() for i in same)


def test_ivf_blocks_with_every_list_probed_is_exact():
    codes = clustered_codes(900, 8, n_clusters=9, keep=0.6, seed=8)
    table = random_token_table(8, 256, 16, seed=8)
    cfg = GraphConfig(mode="approx", approx_method="ivf_blocks", n_edges=15, approx_nlist=6, approx_nprobe=6, block_size=100,
                      item_chunk=128, recall_sample=50)
    built = build_item_graph(table, codes, cfg, seed=0)
    assert np.array_equal(built.neighbors, dense_neighbors(digit_similarity_tables(table), codes, 15))
    assert built.stats["recall@15"] == 1.0 and built.info["approx_nlist"] == 6


def _tiny_run(tmp_root: str, n_items: int = 300, n_digit: int = 8):
    codes = clustered_codes(n_items, n_digit, n_clusters=6, keep=0.8, seed=5).numpy()
    item_ids = np.arange(n_items, dtype=np.int64) * 7 + 100  # sparse ids: rows != ids
    write_semantic_ids(RunPaths(tmp_root).semantic_ids, item_ids, codes)
    return item_ids, codes


def test_build_graph_stage_writes_and_loads(tmp_path, ray_local):
    run_dir = str(tmp_path / "run")
    item_ids, codes = _tiny_run(run_dir)
    cfg = config_from_dict({"dataset": "unused", "run_dir": run_dir,
                            "graph": {"n_edges": 12, "n_partitions": 2, "block_size": 64}})
    table = random_token_table(8, 256, 16, seed=5)
    manifest = build_graph(cfg, token_embeddings=table)
    assert manifest["n_items"] == 300 and manifest["n_edges"] == 12 and manifest["mode"] == "exact"
    assert set(manifest["files"]) == {"0", "1"}
    assert 0 <= manifest["cross_partition_edge_fraction"] < 0.5
    assert read_manifest(run_dir)["partition_method"].startswith("balanced k-means")
    index = ItemIndex(item_ids)
    graph = load_graph(run_dir, index)
    expected = dense_neighbors(digit_similarity_tables(table), torch.from_numpy(codes), 12)
    assert np.array_equal(graph.neighbors, expected)
    shard = load_graph(run_dir, index, partition=1)
    assert (shard.partition == 1).all() and np.array_equal(shard.neighbors, expected[shard.rows])
    table_on_disk = io.read_parquet(io.join(RunPaths(run_dir).graph, manifest["files"]["0"][0]))
    assert table_on_disk.schema.field("neighbors").type == pa.list_(pa.int64())
    assert set(table_on_disk.column("item_id").to_numpy()) <= set(item_ids)


@pytest.mark.parametrize("mode,method", [("exact", "token_blocks"), ("approx", "token_blocks"),
                                         ("approx", "token_pairs")])
def test_streamed_build_writes_what_the_in_memory_build_computes(mode, method, tmp_path, monkeypatch):
    """Workers write their tasks' parts; the driver never holds the lists, and loads back the same graph
    (token pairs: each worker keeps the lists of its share of the rows only)."""
    monkeypatch.setattr(graph_builder, "ROWS_PER_FILE", 40)
    run_dir = str(tmp_path / "run")
    item_ids, codes = _tiny_run(run_dir, n_items=500)
    table = random_token_table(8, 256, 16, seed=9)
    cfg = GraphConfig(mode=mode, n_edges=15, block_size=64, n_partitions=3, approx_method=method,
                      approx_token_groups=64, approx_shared_digits=2, recall_sample=100, local_max_items=10**9,
                      local_threads=2)  # token pairs: two shares
    streamed = stream_item_graph(table, torch.from_numpy(codes), cfg, RunPaths(run_dir).graph, item_ids, seed=0)
    if method == "token_pairs":
        assert streamed.info["approx_method"] == "token_pairs" and streamed.info["pairs_scored"] > 0
    commit_graph(run_dir, {"n_edges": 15, **streamed.info}, streamed.stats, streamed.files, streamed.digests)
    graph = load_graph(run_dir, ItemIndex(item_ids))
    in_memory = build_item_graph(table, torch.from_numpy(codes), cfg, seed=0)
    assert np.array_equal(graph.neighbors, in_memory.neighbors)
    if method == "token_pairs":  # the shares compare and score the in-memory build's pairs, each once
        for name in ("pairs_visited", "pairs_scored", "candidates_per_item_mean"):
            assert streamed.info[name] == in_memory.info[name]
        assert streamed.info["offers_between_shares"] > 0
    if mode == "exact":
        assert np.array_equal(graph.neighbors, dense_neighbors(digit_similarity_tables(table), torch.from_numpy(codes), 15))
    else:
        assert streamed.stats["recall@15"] == in_memory.stats["recall@15"] and streamed.stats["recall@15"] > 0.5
    # k-means partitions of the codes, then label propagation over the parts read back one at a time:
    # the partitions the in-memory build refines on the whole lists.
    assert "over the written parts" in streamed.info["partition_method"]
    assert np.array_equal(graph.partition, in_memory.partition)
    assert streamed.info["cross_partition_edge_fraction"] == in_memory.info["cross_partition_edge_fraction"]
    unrefined = stream_item_graph(table, torch.from_numpy(codes), dataclasses.replace(cfg, refine_rounds=0),
                                  str(tmp_path / "unrefined"), item_ids, seed=0)
    assert unrefined.info["cross_partition_edge_fraction"] > streamed.info["cross_partition_edge_fraction"]
    assert np.bincount(graph.partition).max() <= 167 and set(streamed.files) == {"0", "1", "2"}
    for part, names in streamed.files.items():
        assert (load_graph(run_dir, ItemIndex(item_ids), partition=int(part)).partition == int(part)).all() and names
    assert streamed.info["cross_partition_edge_fraction"] == pytest.approx(cross_fraction(graph.partition, graph.neighbors))
    degree = (graph.neighbors >= 0).sum(axis=1)
    assert streamed.stats["degree_min"] == degree.min() and streamed.stats["degree_mean"] == pytest.approx(degree.mean())
    # Files of at most ROWS_PER_FILE rows, the workers' and the rewritten alike: a task of millions of
    # rows is never converted at once.
    for built, folder in ((streamed, RunPaths(run_dir).graph), (unrefined, str(tmp_path / "unrefined"))):
        sizes = [pq.read_metadata(f"{folder}/{name}").num_rows for names in built.files.values() for name in names]
        assert max(sizes) <= 40 and sum(sizes) == 500


def test_build_graph_stage_streams_on_ray_actors_and_a_dead_worker_keeps_the_graph(tmp_path, ray_local):
    run_dir = str(tmp_path / "run")
    item_ids, codes = _tiny_run(run_dir, n_items=400)
    table = random_token_table(8, 256, 16, seed=10)
    index = ItemIndex(item_ids)
    config = {"dataset": "unused", "run_dir": run_dir,
              "graph": {"n_edges": 10, "n_partitions": 2, "block_size": 64, "local_max_items": 0,
                        "stream_min_items": 0}}
    first = build_graph(config_from_dict(config), token_embeddings=table)
    assert first["workers"] == "2 Ray actors" and "streamed build" in first["partition_method"]
    before = load_graph(run_dir, index)
    assert np.array_equal(before.neighbors, dense_neighbors(digit_similarity_tables(table), torch.from_numpy(codes), 10))
    # A rebuild whose worker dies after writing its first part: the driver fails, the graph is the old one.
    config["graph"]["n_edges"] = 12
    failpoints.arm("graph-part-written")
    with pytest.raises(Exception, match="(?i)actor"):
        build_graph(config_from_dict(config), token_embeddings=table)
    assert failpoints.fired("graph-part-written")
    assert read_manifest(run_dir) == first
    assert np.array_equal(load_graph(run_dir, index).neighbors, before.neighbors)
    # The next build commits and sweeps every part it does not list (the old graph's, the dead build's).
    second = build_graph(config_from_dict(config), token_embeddings=table)
    listed = {name for names in second["files"].values() for name in names}
    on_disk = {uri.rsplit("/", 1)[-1] for uri in io.list_files(RunPaths(run_dir).graph, ".parquet")}
    assert on_disk == listed and load_graph(run_dir, index).neighbors.shape == (400, 12)


def test_token_pairs_stream_on_ray_actors_each_keeping_its_share(tmp_path, ray_local):
    run_dir = str(tmp_path / "run")
    item_ids, codes = _tiny_run(run_dir, n_items=600, n_digit=12)
    codes = torch.from_numpy(codes)
    table = random_token_table(12, 256, 16, seed=4)
    graph = {"mode": "approx", "approx_method": "token_pairs", "n_edges": 10, "n_partitions": 2, "recall_sample": 100,
             "local_max_items": 0, "stream_min_items": 0, "stream_token_pairs": True}
    manifest = build_graph(config_from_dict({"dataset": "unused", "run_dir": run_dir, "graph": graph}),
                           token_embeddings=table)
    assert manifest["workers"] == "2 Ray actors" and "streamed build" in manifest["partition_method"]
    assert manifest["approx_method"] == "token_pairs" and "approx_fallback_from" not in manifest
    r = manifest["approx_shared_digits"]
    in_memory = build_item_graph(table, codes, GraphConfig(**{**graph, "approx_shared_digits": r,
                                                              "local_max_items": 10**9}), seed=0)
    assert np.array_equal(load_graph(run_dir, ItemIndex(item_ids)).neighbors, in_memory.neighbors)
    for name in ("rows_completed_exactly", "pairs_visited", "pairs_scored"):
        assert manifest[name] == in_memory.info[name]


def test_build_graph_on_s3(s3_bucket, ray_local):
    endpoint, bucket = s3_bucket
    run_dir = f"s3://{bucket}/run"
    storage = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    cfg = config_from_dict({"dataset": "unused", "run_dir": run_dir, "storage": storage,
                            "graph": {"n_edges": 5, "n_partitions": 2}})
    codes = clustered_codes(80, 4, n_clusters=4, keep=0.8, seed=6).numpy()
    write_semantic_ids(RunPaths(run_dir).semantic_ids, np.arange(80), codes, cfg.storage)
    build_graph(cfg, token_embeddings=random_token_table(4, 256, 8, seed=6))
    graph = load_graph(run_dir, ItemIndex(np.arange(80)), cfg.storage)
    assert graph.neighbors.shape == (80, 5) and (graph.neighbors >= 0).all()


def test_build_graph_without_model_is_a_clear_error(tmp_path):
    run_dir = str(tmp_path / "run")
    _tiny_run(run_dir, n_items=20)
    cfg = config_from_dict({"dataset": "unused", "run_dir": run_dir})
    with pytest.raises(StageError, match="model.safetensors: no trained model"):
        build_graph(cfg)


def test_load_graph_rejects_bad_parts(tmp_path, ray_local):
    run_dir = str(tmp_path / "run")
    item_ids, _ = _tiny_run(run_dir, n_items=40)
    cfg = config_from_dict({"dataset": "unused", "run_dir": run_dir, "graph": {"n_edges": 4, "n_partitions": 1}})
    manifest = build_graph(cfg, token_embeddings=random_token_table(8, 256, 8, seed=7))
    part = io.join(RunPaths(run_dir).graph, manifest["files"]["0"][0])
    table = io.read_parquet(part)
    lists = table.column("neighbors").to_pylist()
    for bad, message in ((999_999, "field 'neighbors': item_id 999999 is unknown"),
                         (int(item_ids[3]), "row 3: field 'neighbors' lists the item itself")):
        broken = [list(x) for x in lists]
        broken[3][0] = bad
        io.write_parquet(table.set_column(1, "neighbors", pa.array(broken, pa.list_(pa.int64()))), part)
        # A part written that way (its digest recorded): the content checks, not the digest, refuse it.
        recorded = io.read_json(RunPaths(run_dir).graph_manifest)
        recorded["digests"][manifest["files"]["0"][0]] = io.file_sha256(part)
        io.write_json(RunPaths(run_dir).graph_manifest, recorded)
        with pytest.raises(DataError, match=message):
            load_graph(run_dir, ItemIndex(item_ids))


def _shared_token_twin(tables, codes, digits, token_group, n_edges):
    """From the definition: each item's best items among those sharing a token group at a used digit."""
    sums = dense_sums(tables, codes).numpy().astype(np.float64)
    groups = np.stack([token_group[i][codes[:, d].long().numpy()] for i, d in enumerate(digits)], axis=1)
    shares = (groups[:, None, :] == groups[None, :, :]).any(-1)  # (N, N)
    sums[~shares] = -np.inf
    np.fill_diagonal(sums, -np.inf)
    order = np.argsort(-sums, axis=1, kind="stable")
    out = np.full((len(codes), n_edges), -1, np.int64)
    for i in range(len(codes)):
        valid = order[i][np.isfinite(sums[i, order[i]])][:n_edges]
        out[i, : len(valid)] = valid
    return out


@pytest.mark.parametrize(("n_digits", "n_groups"), [(0, 256), (3, 256), (0, 4)])
def test_token_blocks_equal_the_shared_token_twin(n_digits, n_groups):
    table, codes = _tied_catalogue(400, 6, seed=9)
    table = torch.cat([table, torch.randn(6, 248, 8)], dim=1)  # V = 256, tokens 0..7 used
    tables = digit_similarity_tables(table)
    blocks = plan_token_blocks(table, codes, n_digits, n_groups, seed=0)
    assert len(blocks.digits) == (n_digits or 6)
    rows = np.arange(400)
    got = np.concatenate([token_block_neighbors(tables, codes, blocks, rows[lo : lo + 150], 25).numpy()
                          for lo in range(0, 400, 150)])
    assert np.array_equal(got, _shared_token_twin(tables, codes, blocks.digits, blocks.token_group, 25))


@pytest.mark.data
def test_token_blocks_recall_on_real_beauty_codes(beauty_slice):
    """A 3,000-item slice of Beauty, tokenized as configs/beauty.yaml does (PCA, OPQ32)."""
    from rpg_dist.tokenizer import opq
    from rpg_dist.tokenizer.config import TokenizeConfig

    _, vectors, _ = beauty_slice
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = opq.train_index(x, TokenizeConfig(n_digit=32, pca_dim=128, opq_niter=8), seed=0, threads=torch.get_num_threads())
    codes = torch.from_numpy(opq.encode(index, x))
    table = torch.randn(32, 256, 64, generator=torch.Generator().manual_seed(0)) * 0.02  # the model's init
    tables = digit_similarity_tables(table)
    exact = exact_neighbors(tables, codes, torch.arange(len(codes)), 100).numpy()
    recall = {}
    for groups in (256, 64, 16):
        blocks = plan_token_blocks(table, codes, 0, groups, seed=0)
        approx = token_block_neighbors(tables, codes, blocks, np.arange(len(codes)), 100).numpy()
        recall[groups] = np.mean([len(set(a) & set(e)) / 100 for a, e in zip(approx, exact)])
    # A 3,000-item catalogue is sparse (neighbours share few digits), so it takes coarse token groups;
    # recall rises as the groups coarsen.
    assert recall[16] >= 0.95 and recall[16] > recall[64] > recall[256]
    # At the same budget (1/8 of the catalogue per item, as exact-token blocks over 32 digits), the
    # gaussian-projection IVF (the old default) finds far fewer true neighbours on these codes.
    cfg = GraphConfig(mode="approx", approx_method="ivf_blocks", n_edges=100, approx_nlist=48, approx_nprobe=6,
                      local_max_items=10**9, recall_sample=0)
    ivf = build_item_graph(table, codes, cfg, seed=0)
    assert ivf.info["candidates_per_item_mean"] < len(codes) / 6
    ivf_recall = np.mean([len(set(a) & set(e)) / 100 for a, e in zip(ivf.neighbors, exact)])
    assert ivf_recall < recall[256] - 0.3


def _sharing_twin(tables, codes, min_shared, n_edges):
    """From the definition: each item's best items among those sharing >= min_shared tokens with it."""
    sums = dense_sums(tables, codes).numpy().astype(np.float64)
    c = codes.numpy()
    shared = (c[:, None, :] == c[None, :, :]).sum(-1)  # (N, N) tokens in common
    sums[shared < min_shared] = -np.inf
    np.fill_diagonal(sums, -np.inf)
    out = np.full((len(c), n_edges), -1, np.int64)
    for i in range(len(c)):
        order = np.argsort(-sums[i], kind="stable")
        found = order[np.isfinite(sums[i, order])][:n_edges]
        out[i, : len(found)] = found
    n_pairs = int(((shared >= min_shared).sum() - len(c)) // 2)
    return out, n_pairs


# 13 digits: a partly filled 64-bit word of tokens; 40: two groups of four words (beyond 32 digits).
@pytest.mark.parametrize("n_digit", [6, 13, 40])
@pytest.mark.parametrize("min_shared", [2, 3, 4])
def test_token_pairs_equal_the_sharing_twin_and_score_each_pair_once(n_digit, min_shared):
    codes = clustered_codes(700, n_digit, n_clusters=8, keep=0.5, seed=11)
    tables = digit_similarity_tables(random_token_table(n_digit, 256, 16, seed=11))
    want, n_pairs = _sharing_twin(tables, codes, min_shared, 15)
    assert n_pairs > 0
    # One round per digit pair / many (tiny offer buffers: visits resume mid-pair), one or several
    # threads; buckets of 2 digits, and of 3 where r >= 3.
    runs = [(1, 1 << 22, 2), (3, 40, 2)] + [(2, 1 << 22, 3), (3, 40, 3)] * (min_shared >= 3)
    visited = {}
    for threads, chunk, width in runs:
        got, counts = token_pair_neighbors(tables, codes, 15, min_shared, threads, chunk, width=width)
        assert np.array_equal(got, want) and counts["width"] == width
        assert counts["scored"] == n_pairs  # a pair meets in every bucket of its shared digits: scored once
        visited[width] = counts["visited"]
    # A streamed build's shares (a block, a scattered set, the rest): each keeps its rows' lists, the
    # same lists; between them they compare and score the pairs of one build, each pair once, the
    # offers to the other end of a pair crossing shares sent to its share.
    owner = np.full(700, 2, np.int32)
    owner[100:400] = 0
    owner[np.arange(0, 700, 7)] = 1
    for run, (threads, chunk, width) in enumerate(runs):
        # Offers taken the next digit pair, or three pairs later (a share running ahead).
        shares = token_pair_shares(tables, codes, 15, min_shared, threads, owner, chunk, width=width, lag=1 + 2 * (run % 2))
        for share, (rows, got, counts) in enumerate(shares):
            assert np.array_equal(rows, np.flatnonzero(owner == share)) and np.array_equal(got, want[rows])
            assert 0 < counts["scored"] < n_pairs
        totals = {name: sum(counts[name] for _, _, counts in shares) for name in ("scored", "visited", "sent", "received")}
        assert totals["scored"] == n_pairs and totals["visited"] == visited[width]
        assert totals["sent"] == totals["received"] > 0


@pytest.mark.parametrize("min_shared", [2, 3])
def test_token_pairs_compare_small_and_large_buckets_alike(min_shared):
    """Buckets of exactly _SMALL_BUCKET items (compared pair by pair) and of one more (compared
    vectorised), each holding pairs that share only the bucket's digits, pairs that share more, and
    pairs whose lowest shared digits are elsewhere (to be left to that bucket)."""
    rng = np.random.default_rng(3)
    small = token_pairs._SMALL_BUCKET
    groups = []
    for g, size in enumerate((small, small + 1)):
        codes = rng.integers(20, 256, (size, 6))  # digits 0, 1, 4, 5: rarely shared by chance
        codes[:, 2:4] = 10 + g  # the bucket: digits (2, 3) shared by the whole group
        codes[: size // 2, 0] = 5 + g  # half also share digit 0: their lowest pair is (0, 2)
        codes[:, 4] = rng.integers(0, 3, size)  # a third shared token for some pairs
        groups.append(codes)
    codes = torch.from_numpy(np.concatenate([*groups, rng.integers(20, 256, (40, 6))]).astype(np.int16))
    tables = digit_similarity_tables(random_token_table(6, 256, 16, seed=3))
    want, n_pairs = _sharing_twin(tables, codes, min_shared, 8)
    got, counts = token_pair_neighbors(tables, codes, 8, min_shared, threads=1, width=2)
    assert np.array_equal(got, want)
    assert counts["scored"] == n_pairs and n_pairs >= small * (small - 1) // 2 // (min_shared - 1)


def test_token_pairs_build_chooses_the_shared_tokens_and_fills_every_list():
    codes = clustered_codes(3000, 16, n_clusters=40, keep=0.6, seed=5)
    table = random_token_table(16, 256, 24, seed=5)
    cfg = GraphConfig(mode="approx", approx_method="token_pairs", n_edges=25, recall_sample=300, local_max_items=0)
    built = build_item_graph(table, codes, cfg, seed=0)
    tables = digit_similarity_tables(table)
    exact = dense_neighbors(tables, codes, 25)
    info = built.info
    assert info["approx_method"] == "token_pairs" and info["workers"] == "in-process threads"
    # The largest r whose pairs hold 98 % of the sample's exact lists, and not one more.
    rows = np.sort(np.random.default_rng(0).choice(3000, 300, replace=False))
    r = info["approx_shared_digits"]
    assert r >= 2 and sharing_fraction(codes.numpy(), rows, exact[rows], r) >= 0.98
    assert sharing_fraction(codes.numpy(), rows, exact[rows], r + 1) < 0.98
    assert choose_shared(codes.numpy(), rows, exact[rows], 0.98) == r
    # Isolated items (fewer than 25 others share r tokens) get their exact lists: every list is full.
    assert info["rows_completed_exactly"] > 0 and built.stats["degree_min"] == 25
    twin, _ = _sharing_twin(tables, codes, r, 25)
    short = (twin >= 0).sum(axis=1) < 25
    assert np.array_equal(built.neighbors[short], exact[short]) and np.array_equal(built.neighbors[~short], twin[~short])
    recall = np.mean([len(set(a) & set(b)) / 25 for a, b in zip(built.neighbors.tolist(), exact.tolist())])
    assert recall >= 0.98 and built.stats["recall@25"] == pytest.approx(recall, abs=0.02)


def test_token_pairs_fall_back_to_token_blocks_where_neighbours_share_one_token():
    codes = torch.randint(0, 256, (1500, 16), dtype=torch.int16, generator=torch.Generator().manual_seed(3))
    table = random_token_table(16, 256, 24, seed=3)
    cfg = GraphConfig(mode="approx", approx_method="token_pairs", n_edges=20, recall_sample=200,
                      local_max_items=10**9)
    built = build_item_graph(table, codes, cfg, seed=0)
    assert built.info["approx_method"] == "token_blocks" and built.info["approx_fallback_from"] == "token_pairs"
    blocks = build_item_graph(table, codes, dataclasses.replace(cfg, approx_method="token_blocks"), seed=0)
    assert np.array_equal(built.neighbors, blocks.neighbors) and built.stats == blocks.stats
    # Without a recall sample the shared tokens still come from 200 sampled items' exact lists.
    unsampled = build_item_graph(table, codes, dataclasses.replace(cfg, recall_sample=0), seed=0)
    assert unsampled.info["approx_method"] == "token_blocks" and "recall@20" not in unsampled.stats
    with pytest.raises(ConfigError, match="approx_shared_digits: 1 must be 0"):
        GraphConfig(approx_shared_digits=1)
