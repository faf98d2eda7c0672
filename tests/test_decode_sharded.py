"""Sharded decoding (one real Ray actor per partition) equals single-process decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict
from rpg_dist.decode.graph_decode import GraphDecoder, history_start_items, random_start_items
from rpg_dist.decode.scoring import popularity_prior
from rpg_dist.decode.sharded import MAX_OPEN_BATCHES, GraphShard, ShardedGraphDecoder, _top_per_query
from rpg_dist.decode.topk import MIN_KEY, key_rows, ranking_keys
from rpg_dist.graph.stage import build_graph
from rpg_dist.graph.store import load_graph, load_partitions
from rpg_dist.testing.codes import clustered_codes, random_token_table
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids, write_semantic_ids


def _distinct_graph(n_items: int, n_edges: int, gen: torch.Generator) -> torch.Tensor:
    offsets = torch.randperm(n_items - 1, generator=gen)[:n_edges]
    shift = torch.randint(0, n_edges, (n_items, 1), generator=gen)
    neighbors = (torch.arange(n_items).unsqueeze(1) + 1 + offsets[(torch.arange(n_edges) + shift) % n_edges]) % n_items
    neighbors[torch.rand(n_items, n_edges, generator=gen) < 0.1] = -1  # some padding
    return neighbors


def test_top_per_query_by_hand():
    keys = ranking_keys(torch.tensor([0.1, 0.3, 0.5, 0.9, 0.7]), torch.tensor([12, 14, 10, 11, 13]))
    queries = torch.tensor([0, 0, 1, 1, 1])
    top = _top_per_query(keys, queries, batch=3, k=2)
    assert key_rows(top[:2]).tolist() == [[14, 12], [11, 13]]
    assert (top[2] == MIN_KEY).all()


@pytest.mark.parametrize("n_parts,with_prior", [(1, False), (3, False), (3, True)])
def test_sharded_equals_single_process(ray_local, n_parts, with_prior):
    gen = torch.Generator().manual_seed(n_parts)
    n_items, n_digit, vocab = 2000, 8, 32
    codes = torch.randint(0, vocab, (n_items, n_digit), generator=gen, dtype=torch.int16)
    neighbors = _distinct_graph(n_items, 15, gen)
    partition = torch.randint(0, n_parts, (n_items,), generator=gen).numpy()
    log_probs = torch.log_softmax(torch.randn(12, n_digit, vocab, generator=gen) * 2, dim=-1)
    start = random_start_items(12, n_items, 10, gen)
    # Each shard adds its own rows' prior: the same scores as the single process's (N,) prior.
    prior = popularity_prior(torch.randint(0, 500, (n_items,), generator=gen), 0.5) if with_prior else None
    sharded = ShardedGraphDecoder.from_arrays(codes.numpy(), neighbors.numpy(), partition, 10, steps=3, prior=prior)
    try:
        got = sharded.decode(log_probs, start, top_k=7)
        expected = GraphDecoder(codes, neighbors, 10, steps=3, prior=prior).decode(log_probs, start, top_k=7)
        if with_prior:
            plain = GraphDecoder(codes, neighbors, 10, steps=3).decode(log_probs, start, top_k=7)
            assert not torch.equal(plain.items, expected.items)
        assert torch.equal(got.items, expected.items)
        assert torch.equal(got.scores, expected.scores)
        assert torch.equal(got.n_visited, expected.n_visited)
        assert [s["step"] for s in sharded.step_stats] == [0, 1, 2, 3]
        cross = [s["cross_shard_pairs"] for s in sharded.step_stats[1:]]
        # One shard: nothing crosses. Random 3-way partition: about 2/3 of the edges cross.
        assert all(c == 0 for c in cross) if n_parts == 1 else all(c > 0 for c in cross)
        assert all(s["bytes"] > 0 and s["messages"] > 0 for s in sharded.step_stats)
    finally:
        sharded.close()


def test_sharded_from_run_files_equals_single_process(tmp_path, ray_local):
    run_dir = str(tmp_path / "run")
    codes = clustered_codes(500, 8, n_clusters=10, keep=0.7, seed=9).numpy()
    item_ids = np.arange(500, dtype=np.int64) * 3 + 1
    write_semantic_ids(RunPaths(run_dir).semantic_ids, item_ids, codes)
    cfg = config_from_dict({"dataset": "unused", "run_dir": run_dir, "graph": {"n_edges": 10, "n_partitions": 2}})
    build_graph(cfg, token_embeddings=random_token_table(8, 256, 16, seed=9))
    semantic_ids = load_semantic_ids(RunPaths(run_dir).semantic_ids)
    graph = load_graph(run_dir, semantic_ids.index)
    gen = torch.Generator().manual_seed(9)
    log_probs = torch.log_softmax(torch.randn(20, 8, 256, generator=gen) * 3, dim=-1)
    start = random_start_items(20, 500, 8, gen)
    partition = load_partitions(run_dir, semantic_ids.index)  # the coordinator's map, read without the lists
    np.testing.assert_array_equal(partition, graph.partition)
    sharded = ShardedGraphDecoder.from_run(run_dir, partition, 8, steps=2)
    try:
        got = sharded.decode(log_probs, start)
        # History starts read the lists' heads from the shards: the same starts as from the lists.
        rows = torch.tensor([3, 499, 0, 250, 3])
        assert torch.equal(sharded.list_heads(rows, 4), torch.from_numpy(graph.neighbors)[rows, :4].long())
        items, lengths = torch.tensor([[5, 9, 400], [77, -1, -1]]), torch.tensor([3, 1])
        fallback = torch.arange(100, 140)
        assert torch.equal(history_start_items(items, lengths, sharded, fallback, 8),
                           history_start_items(items, lengths, torch.from_numpy(graph.neighbors), fallback, 8))
    finally:
        sharded.close()
    codes_t = torch.from_numpy(semantic_ids.codes)
    expected = GraphDecoder(codes_t, torch.from_numpy(graph.neighbors), 8, steps=2).decode(log_probs, start)
    assert torch.equal(got.items, expected.items) and torch.equal(got.n_visited, expected.n_visited)
    # Clustered items, k-means partitions: few candidates cross shards.
    crossing = sum(s["cross_shard_pairs"] for s in sharded.step_stats[1:])
    assert crossing < 0.5 * 20 * 8 * 10 * 2


def test_a_shard_keeps_interleaved_batches_apart():
    """Service replicas decode through the same shards at once: a shard's state is per batch id."""
    gen = torch.Generator().manual_seed(4)
    n_items, n_digit, vocab = 300, 4, 16
    codes = torch.randint(0, vocab, (n_items, n_digit), generator=gen, dtype=torch.int16)
    neighbors = _distinct_graph(n_items, 8, gen)

    def shard() -> GraphShard:
        one = GraphShard(n_items)
        one.set_items(np.arange(n_items), neighbors.numpy(), codes.numpy())  # one shard owns every item
        return one

    batches = {name: (torch.log_softmax(torch.randn(3, n_digit, vocab, generator=gen), -1).numpy(),
                      np.repeat(np.arange(3), 5), torch.randint(0, n_items, (15,), generator=gen).numpy())
               for name in ("a", "b")}
    alone = {}
    for name, (log_probs, queries, items) in batches.items():
        single = shard()
        single.begin(name, log_probs, 5)
        crossing = single.expand(name, queries, items)
        alone[name] = (single.score(name, *crossing), single.finish(name))
    shared = shard()
    for name, (log_probs, _, _) in batches.items():
        shared.begin(name, log_probs, 5)
    crossing = {name: shared.expand(name, queries, items) for name, (_, queries, items) in batches.items()}
    scored = {name: shared.score(name, *crossing[name]) for name in ("b", "a")}
    for name in ("a", "b"):
        np.testing.assert_array_equal(scored[name], alone[name][0])
        np.testing.assert_array_equal(shared.finish(name), alone[name][1])
    # A coordinator that never ends its batch cannot grow a shard without bound: the oldest goes.
    for number in range(MAX_OPEN_BATCHES + 1):
        shared.begin(f"open-{number}", batches["a"][0], 5)
    with pytest.raises(KeyError, match="open-0"):
        shared.finish("open-0")
    assert len(shared.batches) == MAX_OPEN_BATCHES
