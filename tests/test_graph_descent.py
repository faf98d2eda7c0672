"""Neighbour descent (graph/descent.py) against twins written from NN-descent's definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rpg_dist.graph.builder import build_item_graph
from rpg_dist.graph.config import GraphConfig
from rpg_dist.graph.descent import DescentParams, descent_neighbors
from rpg_dist.graph.exact import exact_neighbors
from rpg_dist.graph.similarity import digit_similarity_tables
from rpg_dist.testing.codes import clustered_codes, random_token_table
from twins import dense_neighbors, dense_sums


def _ranked(sums: np.ndarray, row: int, items) -> list[tuple[float, int]]:
    """(S, item) pairs of ``row``'s list in the order every ranked list uses: S down, then item up."""
    return sorted(((float(sums[row, i]), int(i)) for i in items), key=lambda t: (-t[0], t[1]))


def _join_violations(sums: np.ndarray, neighbors: np.ndarray) -> list[tuple[int, int, int]]:
    """NN-descent's fixed point, from its definition (Dong et al., WWW'11): for every item x, any two
    items p, q of B(x) = N(x) u R(x) (x's neighbours and the items holding x) were compared, so q is
    in N(p) or ranks no better than N(p)'s worst. Returns the (x, p, q) where that fails."""
    lists = [set(int(v) for v in row if v >= 0) for row in neighbors]
    reverse = [set() for _ in lists]
    for y, row in enumerate(lists):
        for x in row:
            reverse[x].add(y)
    bad = []
    for x in range(len(lists)):
        members = sorted(lists[x] | reverse[x])
        for p in members:
            worst = _ranked(sums, p, lists[p])[-1]
            for q in members:
                if q != p and q not in lists[p] and (-sums[p, q], q) < (-worst[0], worst[1]):
                    bad.append((x, p, q))
    return bad


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist())]))


def test_descent_reaches_nn_descents_fixed_point_and_orders_lists_exactly():
    codes = clustered_codes(300, 8, n_clusters=10, keep=0.6, seed=1)
    table = random_token_table(8, 256, 16, seed=1)
    tables = digit_similarity_tables(table)
    # Candidates never sampled (300 >= any item's offers) and no early stop: the full algorithm.
    params = DescentParams(max_candidates=300, max_iters=60, delta=0.0, init_per_digit=1)
    result = descent_neighbors(tables, codes, 12, params, seed=0, threads=2)
    assert result.iterations[-1]["changed"] == 0 and len(result.iterations) < 61
    sums = dense_sums(tables, codes).numpy()
    found = result.neighbors
    assert (found >= 0).all() and not (found == np.arange(300)[:, None]).any()
    for row in range(300):
        assert len(set(found[row].tolist())) == 12
        # Every pair was scored exactly: a list is in exact mode's order (ties by the lower row).
        assert [i for _, i in _ranked(sums, row, found[row])] == found[row].tolist()
    assert _join_violations(sums, found) == []
    assert _recall(found, dense_neighbors(tables, codes, 12)) >= 0.97


def test_the_fixed_point_check_finds_a_list_that_misses_a_better_item():
    """The twin above can fail: a list with its best item swapped out breaks the fixed point."""
    codes = clustered_codes(200, 6, n_clusters=5, keep=0.7, seed=2)
    tables = digit_similarity_tables(random_token_table(6, 256, 16, seed=2))
    exact = dense_neighbors(tables, codes, 8)
    sums = dense_sums(tables, codes).numpy()
    assert _join_violations(sums, exact) == []
    broken = exact.copy()
    best, far = int(exact[0, 0]), int(np.argmin(sums[0]))
    broken[0, 0] = far  # item 0 loses its best neighbour for its least similar item
    assert any(p == 0 and q == best for _, p, q in _join_violations(sums, broken))


def test_descent_does_not_depend_on_threads_or_runs():
    codes = clustered_codes(2000, 16, n_clusters=30, keep=0.5, seed=3)
    tables = digit_similarity_tables(random_token_table(16, 256, 16, seed=3))
    params = DescentParams(max_candidates=12, max_iters=4, join_block=300)  # sampled candidates, several blocks
    one = descent_neighbors(tables, codes, 20, params, seed=5, threads=1)
    three = descent_neighbors(tables, codes, 20, params, seed=5, threads=3)
    again = descent_neighbors(tables, codes, 20, params, seed=5, threads=3)
    assert np.array_equal(one.neighbors, three.neighbors) and np.array_equal(three.neighbors, again.neighbors)
    assert [h["changed"] for h in one.iterations] == [h["changed"] for h in three.iterations]
    other = descent_neighbors(tables, codes, 20, params, seed=6, threads=1)
    assert not np.array_equal(one.neighbors, other.neighbors)


def test_descent_on_tiny_catalogues_fills_what_exists():
    tables = digit_similarity_tables(random_token_table(4, 256, 8, seed=4))
    codes = clustered_codes(6, 4, n_clusters=2, keep=0.5, seed=4)
    result = descent_neighbors(tables, codes, 10, DescentParams(), seed=0, threads=2)
    assert result.neighbors.shape == (6, 10)
    assert np.array_equal(result.neighbors, dense_neighbors(tables, codes, 10))  # 5 found, then -1
    single = descent_neighbors(tables, codes[:1], 10, DescentParams(), seed=0, threads=2)
    assert (single.neighbors == -1).all()


def test_descent_build_reports_recall_and_iterations():
    codes = clustered_codes(3000, 16, n_clusters=40, keep=0.6, seed=5)
    table = random_token_table(16, 256, 24, seed=5)
    cfg = GraphConfig(mode="approx", approx_method="descent", n_edges=25, recall_sample=200, n_partitions=2,
                      local_max_items=10**9)
    built = build_item_graph(table, codes, cfg, seed=0)
    exact = dense_neighbors(digit_similarity_tables(table), codes, 25)
    recall = _recall(built.neighbors, exact)
    assert recall >= 0.95
    assert built.stats["recall@25"] == pytest.approx(recall, abs=0.05)
    assert built.info["approx_method"] == "descent" and 1 <= built.info["descent_iterations"] <= cfg.descent_iters
    assert len(built.info["descent_changed"]) == built.info["descent_iterations"] + 1


@pytest.mark.data
def test_descent_recall_on_real_beauty_codes(beauty_slice):
    """A 3,000-item slice of Beauty tokenized as configs/beauty.yaml does (PCA, OPQ32), the model's init table."""
    from rpg_dist.tokenizer import opq
    from rpg_dist.tokenizer.config import TokenizeConfig

    _, vectors, _ = beauty_slice
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = opq.train_index(x, TokenizeConfig(n_digit=32, pca_dim=128, opq_niter=8), seed=0,
                            threads=torch.get_num_threads())
    codes = torch.from_numpy(opq.encode(index, x))
    table = torch.randn(32, 256, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    tables = digit_similarity_tables(table)
    exact = exact_neighbors(tables, codes, torch.arange(len(codes)), 50).numpy()
    found = descent_neighbors(tables, codes, 50, DescentParams(max_candidates=32), seed=0, threads=2).neighbors
    assert _recall(found, exact) >= 0.9  # 0.93 measured: real codes are hard for descent (BENCHMARKS.md)
