"""Scoring, deterministic top-k and vectorised graph decoding against their brute-force twins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from twins import full_ranking_reference, graph_decode_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from rpg_dist.decode.graph_decode import (
    history_start_items,
    GraphDecoder,
    count_distinct,
    popular_start_items,
    random_start_items,
)
from rpg_dist.decode.scoring import (
    candidate_scores,
    full_ranking_topk,
    item_scores,
    pair_scores,
    popularity_prior,
)
from rpg_dist.decode.topk import key_rows, key_scores, merge_topk, ranking_keys


def _log_probs(batch: int, n_digit: int, vocab: int, seed: int, dyadic: bool = False) -> torch.Tensor:
    """Random per-digit log-probs; ``dyadic`` draws from a coarse grid so ties are frequent."""
    gen = torch.Generator().manual_seed(seed)
    if dyadic:
        return -torch.randint(0, 4, (batch, n_digit, vocab), generator=gen).float() / 4
    return torch.log_softmax(torch.randn(batch, n_digit, vocab, generator=gen) * 3, dim=-1)


def test_ranking_keys_order_is_score_desc_then_row_asc():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (2000,), generator=gen).float() / 2
    scores[:5] = torch.tensor([float("-inf"), -0.0, 0.0, 1e-30, -1e-30])
    rows = torch.randperm(2000, generator=gen)
    keys = ranking_keys(scores, rows)
    got = key_rows(torch.sort(keys, descending=True).values)
    expected = np.lexsort((rows.numpy(), -scores.numpy()))  # last key is primary
    assert torch.equal(got, rows[torch.from_numpy(expected)])
    assert torch.equal(key_scores(keys), scores + 0.0)
    assert torch.equal(key_rows(keys), rows)


def test_merge_topk_pads_short_rows():
    keys = ranking_keys(torch.tensor([[1.0, 2.0]]), torch.tensor([[4, 7]]))
    merged = merge_topk(keys[:, :1], keys[:, 1:], 3)
    assert key_rows(merged[:, :2]).tolist() == [[7, 4]]
    assert merged[0, 2].item() == torch.iinfo(torch.int64).min


def test_item_scores_match_loop_twin():
    log_probs = _log_probs(3, 4, 16, seed=1)
    codes = torch.randint(0, 16, (25, 4), dtype=torch.int16)
    got = item_scores(log_probs, codes)
    lp = log_probs.double().numpy()
    expected = [[np.mean([lp[b, k, int(codes[n, k])] for k in range(4)]) for n in range(25)] for b in range(3)]
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-6)


def test_candidate_and_pair_scores_are_bit_identical_to_item_scores():
    log_probs = _log_probs(5, 8, 32, seed=2)
    codes = torch.randint(0, 32, (300, 8), dtype=torch.int16)
    dense = item_scores(log_probs, codes)  # (B, N)
    rows = torch.randint(0, 300, (5, 77))
    assert torch.equal(candidate_scores(log_probs, codes, rows), dense.gather(1, rows))
    assert torch.equal(candidate_scores(log_probs, codes.t().contiguous(), rows, row_major=False), dense.gather(1, rows))
    queries = torch.randint(0, 5, (123,))
    items = torch.randint(0, 300, (123,))
    assert torch.equal(pair_scores(log_probs, queries, codes[items]), dense[queries, items])
    # With an item prior, every scorer adds it after the mean: still bit-identical.
    prior = popularity_prior(torch.randint(0, 50, (300,)), 0.7)
    dense = item_scores(log_probs, codes, prior)
    assert torch.equal(candidate_scores(log_probs, codes, rows, prior=prior), dense.gather(1, rows))
    assert torch.equal(candidate_scores(log_probs, codes.t().contiguous(), rows, row_major=False, prior=prior),
                       dense.gather(1, rows))
    assert torch.equal(pair_scores(log_probs, queries, codes[items], prior[items]), dense[queries, items])


@pytest.mark.parametrize("dyadic", [True, False])
@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_full_ranking_blockwise_equals_twin(dyadic, block):
    log_probs = _log_probs(6, 4, 8, seed=3, dyadic=dyadic)
    codes = torch.randint(0, 8, (200, 4), dtype=torch.int16)
    rows, scores = full_ranking_topk(log_probs, codes, k=15, block_size=block)
    ref_rows, ref_scores = full_ranking_reference(log_probs, codes, k=15)
    assert torch.equal(rows, ref_rows)
    assert torch.equal(scores, ref_scores)


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_full_ranking_with_the_popularity_prior_equals_twin(block):
    """score + w * log(1 + count): the blocked scan against every item scored from the definition;
    counts of 0 to a few hundred (and -1, a withdrawn item's mark, counted as 0)."""
    log_probs = _log_probs(6, 4, 8, seed=4)
    codes = torch.randint(0, 8, (200, 4), dtype=torch.int16)
    counts = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(4))
    counts[::17] = 0
    counts[5] = -1
    prior = popularity_prior(counts, 0.4)
    rows, scores = full_ranking_topk(log_probs, codes, k=15, block_size=block, prior=prior)
    ref_rows, ref_scores = full_ranking_reference(log_probs, codes, k=15, counts=counts.tolist(), weight=0.4)
    assert torch.equal(rows, ref_rows)
    assert torch.equal(scores, ref_scores)
    plain_rows, _ = full_ranking_topk(log_probs, codes, k=15, block_size=block)
    assert not torch.equal(rows, plain_rows)  # the prior changes the ranking on this data
    assert popularity_prior(counts, 0.0) is None


def test_random_start_items_distinct_seeded_and_uniform():
    starts = random_start_items(4000, 50, 20, torch.Generator().manual_seed(5))
    assert starts.shape == (4000, 20)
    assert int(starts.min()) >= 0 and int(starts.max()) < 50
    assert (count_distinct(starts) == 20).all()
    again = random_start_items(4000, 50, 20, torch.Generator().manual_seed(5))
    assert torch.equal(starts, again)
    # Each item is drawn with probability 20/50 per query: 1600 +- ~31 (std); allow 6 std.
    counts = torch.bincount(starts.flatten(), minlength=50).float()
    assert (counts - 1600).abs().max() < 190
    with pytest.raises(ValueError, match="exceeds"):
        random_start_items(1, 5, 6, torch.Generator())


def test_popular_start_items_ties_by_row():
    popularity = torch.tensor([3, 9, 9, 1, 5])
    assert popular_start_items(popularity, 2, 3).tolist() == [[1, 2, 4], [1, 2, 4]]


def _random_graph(n_items: int, n_edges: int, gen: torch.Generator) -> torch.Tensor:
    """(N, k) distinct neighbour rows without self-edges, some lists cut short with -1 padding."""
    n_edges = min(n_edges, n_items - 1)
    # A random order of the other N-1 items per row (small N only: O(N^2) test data).
    order = torch.argsort(torch.rand(n_items, n_items - 1, generator=gen), dim=1)[:, :n_edges]
    neighbors = order + (order >= torch.arange(n_items).unsqueeze(1)).long()  # skip self
    lengths = torch.randint(0, n_edges + 1, (n_items,), generator=gen)
    neighbors[torch.arange(n_edges).unsqueeze(0) >= lengths.unsqueeze(1)] = -1
    return neighbors


def _check_against_twin(log_probs, codes, neighbors, start, num_beams, steps, top_k, kernel="auto", prior=None):
    result = GraphDecoder(codes, neighbors, num_beams, steps, kernel=kernel, prior=prior).decode(log_probs, start,
                                                                                               top_k)
    beams, visited = graph_decode_reference(
        log_probs, codes, neighbors.tolist(), start.tolist(), num_beams, steps,
        None if prior is None else prior.tolist(),
    )
    assert result.items.tolist() == [beam[:top_k] for beam in beams]
    assert result.n_visited.tolist() == visited
    dense = item_scores(log_probs, codes, prior)
    assert torch.equal(result.scores, dense.gather(1, result.items) + 0.0)
    return result


@settings(max_examples=60, deadline=None)
@given(
    n_items=st.integers(2, 40),
    n_edges=st.integers(1, 6),
    batch=st.integers(1, 5),
    steps=st.integers(0, 4),
    dyadic=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    kernel=st.sampled_from(["numba", "torch"]),
    with_prior=st.booleans(),
    data=st.data(),
)
def test_graph_decode_equals_loop_twin(n_items, n_edges, batch, steps, dyadic, seed, kernel, with_prior, data):
    gen = torch.Generator().manual_seed(seed)
    num_beams = data.draw(st.integers(1, n_items))
    top_k = data.draw(st.integers(1, num_beams))
    n_digit, vocab = 4, 5
    codes = torch.randint(0, vocab, (n_items, n_digit), generator=gen, dtype=torch.int16)
    log_probs = _log_probs(batch, n_digit, vocab, seed, dyadic)
    neighbors = _random_graph(n_items, n_edges, gen)
    start = random_start_items(batch, n_items, num_beams, gen)
    # A prior on the log-probs' grid (dyadic: ties stay frequent) or from counts, as the configs make it.
    counts = torch.randint(0, 4, (n_items,), generator=gen)
    prior = (counts.float() / 4 if dyadic else popularity_prior(counts, 0.3)) if with_prior else None
    _check_against_twin(log_probs, codes, neighbors, start, num_beams, steps, top_k, kernel, prior)


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_graph_decode_larger_graph_equals_twin(kernel):
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 64, (3000, 16), generator=gen, dtype=torch.int16)
    # Distinct per row and never the row itself: row + 1 + (30 distinct offsets in [0, N-2]) mod N,
    # with one random cyclic shift of the offsets per row.
    offsets = torch.randperm(2999, generator=gen)[:30]
    shift = torch.randint(0, 30, (3000, 1), generator=gen)
    offsets = offsets[(torch.arange(30) + shift) % 30]  # (3000, 30)
    neighbors = (torch.arange(3000).unsqueeze(1) + 1 + offsets) % 3000
    log_probs = _log_probs(16, 16, 64, seed=11)
    start = random_start_items(16, 3000, 20, gen)
    plain = _check_against_twin(log_probs, codes, neighbors, start, 20, 3, 10, kernel)
    prior = popularity_prior(torch.randint(0, 1000, (3000,), generator=gen), 0.5)
    with_prior = _check_against_twin(log_probs, codes, neighbors, start, 20, 3, 10, kernel, prior)
    assert not torch.equal(with_prior.items, plain.items)


def test_graph_decode_finds_best_item_reachable_in_one_step():
    # A star: every item links to item 0, which has the best score; one step must find it.
    n_items = 50
    neighbors = torch.zeros(n_items, 1, dtype=torch.long)
    neighbors[0] = 1
    codes = torch.arange(n_items).unsqueeze(1).to(torch.int16)
    log_probs = torch.full((2, 1, n_items), -5.0)
    log_probs[:, 0, 0] = -0.1
    start = torch.tensor([[7, 8], [30, 41]])
    result = GraphDecoder(codes, neighbors, 2, 1).decode(log_probs, start, 1)
    assert result.items[:, 0].tolist() == [0, 0]
    assert result.n_visited.tolist() == [3, 3]


@pytest.mark.parametrize(("kernel", "row_major"), [("torch", False), ("torch", True), ("numba", True)])
@pytest.mark.parametrize("num_beams,n_edges,steps", [(20, 30, 3), (2, 5, 1)])
def test_code_layouts_and_visited_counters_equal_twin(monkeypatch, kernel, row_major, num_beams, n_edges, steps):
    # (2, 5, 1) visits ~14 of 3000 items: the sort-based counter; (20, 30, 3) the bitmap.
    import rpg_dist.decode.graph_decode as graph_decode

    monkeypatch.setattr(graph_decode, "ROW_MAJOR_ABOVE", 0 if row_major else 10**9)
    gen = torch.Generator().manual_seed(12)
    codes = torch.randint(0, 64, (3000, 16), generator=gen, dtype=torch.int16)
    offsets = torch.randperm(2999, generator=gen)[:n_edges]
    neighbors = (torch.arange(3000).unsqueeze(1) + 1 + offsets) % 3000
    log_probs = _log_probs(24, 16, 64, seed=12)
    start = random_start_items(24, 3000, num_beams, gen)
    decoder = GraphDecoder(codes, neighbors, num_beams, steps, chunk_size=5, threads=2, kernel=kernel)
    assert decoder.row_major == row_major
    result = decoder.decode(log_probs, start)
    # Decoding again reuses the kernel's workspaces (stamps, cached scores): the same answer.
    again = decoder.decode(log_probs, start)
    assert torch.equal(again.items, result.items) and torch.equal(again.n_visited, result.n_visited)
    beams, visited = graph_decode_reference(log_probs, codes, neighbors.tolist(), start.tolist(), num_beams, steps)
    assert result.items.tolist() == beams and result.n_visited.tolist() == visited


def test_history_starts_are_the_history_then_its_neighbours_then_fallback():
    neighbors = torch.tensor([[1, 2], [0, 3], [4, -1], [2, 0], [5, 6], [6, 4], [5, 4]])
    items = torch.tensor([[3, 2, -1, -1], [6, 6, 6, -1], [0, -1, -1, -1]])
    lengths = torch.tensor([2, 3, 1])
    fallback = torch.tensor([6, 5, 1, 0])
    got = history_start_items(items, lengths, neighbors, fallback, n_beams=4, n_recent=2)
    # Row 0: newest first (2, 3), then neighbours of 2 (4), of 3 (2 again, 0).
    # Row 1: 6 once, its neighbours (5, 4), then the fallback's first new item (1).
    # Row 2: 0, its neighbours (1, 2), then the fallback (6).
    assert got.tolist() == [[2, 3, 4, 0], [6, 5, 4, 1], [0, 1, 2, 6]]
    with pytest.raises(ValueError, match="fewer than 9 distinct"):
        history_start_items(items, lengths, neighbors, fallback, n_beams=9)


def test_kernel_stamps_restart_before_the_int32_range_runs_out():
    gen = torch.Generator().manual_seed(13)
    codes = torch.randint(0, 64, (500, 8), generator=gen, dtype=torch.int16)
    offsets = torch.randperm(499, generator=gen)[:12]
    neighbors = (torch.arange(500).unsqueeze(1) + 1 + offsets) % 500
    log_probs = _log_probs(6, 8, 64, seed=13)
    start = random_start_items(6, 500, 5, gen)
    decoder = GraphDecoder(codes, neighbors, 5, 2, threads=1, kernel="numba")
    first = decoder.decode(log_probs, start)
    workspace = decoder._workspaces.get()
    workspace.next_stamp = np.iinfo(np.int32).max - 10  # the next chunk needs 6 x 4 stamps: a restart
    decoder._workspaces.put(workspace)
    second = decoder.decode(log_probs, start)
    assert workspace.next_stamp == 1 + 6 * 4
    assert torch.equal(second.items, first.items) and torch.equal(second.n_visited, first.n_visited)
    beams, visited = graph_decode_reference(log_probs, codes, neighbors.tolist(), start.tolist(), 5, 2)
    assert second.items.tolist() == beams and second.n_visited.tolist() == visited
