"""RunningTopK against a plain sort of every ranking key (ties, self-exclusion, chunking, small k)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpg_dist.decode.blocktopk import MIN_KEY, RunningTopK
from rpg_dist.decode.topk import ranking_keys


def sorted_keys_twin(scores: np.ndarray, rows: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    """Every (query, item) key, the query's own item dropped, sorted descending, first k (MIN_KEY padded)."""
    out = np.full((len(query_rows), k), MIN_KEY, np.int64)
    for q, own in enumerate(query_rows.tolist()):
        keys = sorted((int(ranking_keys(torch.tensor(s), torch.tensor(r))) for s, r in zip(scores[:, q].tolist(), rows.tolist())
                       if r != own), reverse=True)[:k]
        out[q, : len(keys)] = keys
    return out


@settings(max_examples=150, deadline=None)
@given(n_items=st.integers(1, 600), n_queries=st.integers(1, 6), k=st.integers(1, 60), levels=st.integers(1, 40),
       step=st.integers(1, 700), spill=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_running_topk_equals_a_sort_of_every_key(n_items, n_queries, k, levels, step, spill, seed):
    rng = np.random.default_rng(seed)
    # Few distinct values: many exact ties, broken by the lower row.
    scores = (rng.integers(0, levels, (n_items, n_queries)) - levels / 2).astype(np.float32) * 0.25
    rows = rng.permutation(10 * n_items)[:n_items].astype(np.int64)
    query_rows = rng.choice(np.concatenate([rows, [-1]]), n_queries).astype(np.int64)
    top = RunningTopK(query_rows, k, spill=spill)
    for lo in range(0, n_items, step):
        top.add(scores[lo : lo + step].copy(), rows[lo : lo + step])
    assert np.array_equal(top.keys(), sorted_keys_twin(scores, rows, query_rows, k))


def test_large_blocks_use_the_group_floor_and_stay_exact():
    """Enough items for the coarse-maxima floor (>= 2k groups) and for spills past the buffer."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((20_000, 3)).astype(np.float32)
    scores[::7] = 2.5  # a block of tied high scores larger than the spill buffer
    rows = np.arange(20_000, dtype=np.int64)
    top = RunningTopK(np.array([5, 14, -1]), 50, spill=2)
    for lo in range(0, 20_000, 8192):
        top.add(scores[lo : lo + 8192].copy(), rows[lo : lo + 8192])
    assert np.array_equal(top.keys(), sorted_keys_twin(scores, rows, np.array([5, 14, -1]), 50))


@settings(max_examples=100, deadline=None)
@given(n_items=st.integers(1, 300), n_queries=st.integers(1, 5), k=st.integers(1, 40), n_blocks=st.integers(1, 6),
       spill=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_distinct_mode_keeps_each_item_once_across_overlapping_blocks(n_items, n_queries, k, n_blocks, spill, seed):
    """Blocks offer overlapping item sets to subsets of the queries (as token blocks do)."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, 30, (n_items, n_queries)) * 0.5).astype(np.float32)  # one score per pair
    rows = rng.permutation(5 * n_items)[:n_items].astype(np.int64)
    query_rows = rng.choice(rows, n_queries).astype(np.int64)
    top = RunningTopK(query_rows, k, spill=spill, distinct=True)
    seen = np.zeros((n_items, n_queries), bool)
    for _ in range(n_blocks):
        items = np.sort(rng.choice(n_items, int(rng.integers(1, n_items + 1)), replace=False))
        queries = np.sort(rng.choice(n_queries, int(rng.integers(1, n_queries + 1)), replace=False))
        top.add(scores[np.ix_(items, queries)].copy(), rows[items], queries)
        seen[np.ix_(items, queries)] = True
    for q in range(n_queries):
        offered = np.flatnonzero(seen[:, q])
        expected = sorted_keys_twin(scores[offered][:, [q]], rows[offered], query_rows[[q]], k)
        assert np.array_equal(top.keys()[q], expected[0])
