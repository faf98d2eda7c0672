"""Inserting and withdrawing items in a built graph, against the dense definition of the paper."""

from __future__ import annotations

import torch

from rpg_dist.graph.exact import exact_neighbors
from rpg_dist.graph.similarity import digit_similarity_tables
from rpg_dist.graph.update import insert_items, remove_items
from rpg_dist.testing.codes import random_token_table

N_ITEMS, N_DIGIT, VOCAB, N_EDGES = 300, 6, 16, 10


def _catalogue(seed: int):
    token_embeddings = random_token_table(N_DIGIT, VOCAB, 8, seed)  # (m, V, d)
    codes = torch.randint(0, VOCAB, (N_ITEMS, N_DIGIT), generator=torch.Generator().manual_seed(seed))
    return token_embeddings, codes.to(torch.int16)


def dense_similarity(token_embeddings: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N, N) mean over digits of (1 + cos(e_k[a_k], e_k[b_k])) / 2, straight from the paper."""
    table = torch.nn.functional.normalize(token_embeddings.double(), dim=-1)
    vectors = table[torch.arange(codes.shape[1]), codes.long()]  # (N, m, d)
    cosines = torch.einsum("amd,bmd->abm", vectors, vectors)
    return ((1 + cosines) / 2).mean(dim=2)


def assert_top_lists(neighbors: torch.Tensor, sims: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor) -> None:
    """Each list of ``rows``: allowed items other than itself, best first, none left out that is
    better than its worst entry (within float rounding), full when enough items are allowed."""
    for row in rows.tolist():
        chosen = [n for n in neighbors[row].tolist() if n >= 0]
        offered = allowed.clone()
        offered[row] = False
        assert len(chosen) == min(neighbors.shape[1], int(offered.sum()))
        assert all(offered[n] for n in chosen) and len(set(chosen)) == len(chosen)
        scores = sims[row, chosen]
        assert (scores[1:] <= scores[:-1] + 1e-9).all()
        rest = offered.clone()
        rest[chosen] = False
        if rest.any():
            assert sims[row][rest].max() <= scores[-1] + 1e-6


def test_inserted_items_get_the_lists_a_rebuild_gives():
    token_embeddings, codes = _catalogue(0)
    tables = digit_similarity_tables(token_embeddings)
    new_rows = torch.randperm(N_ITEMS, generator=torch.Generator().manual_seed(1))[:40].sort().values
    base = torch.ones(N_ITEMS, dtype=torch.bool)
    base[new_rows] = False
    # The graph before: exact among the base items; the new rows' lists are garbage on purpose.
    before = torch.full((N_ITEMS, N_EDGES), 7)
    before[base] = exact_neighbors(tables, codes, torch.nonzero(base).squeeze(1), N_EDGES,
                                   candidates=torch.nonzero(base).squeeze(1))
    allowed = torch.ones(N_ITEMS, dtype=torch.bool)
    after = insert_items(tables, codes, before, new_rows, allowed, chunk=64)
    assert torch.equal(after, exact_neighbors(tables, codes, torch.arange(N_ITEMS), N_EDGES))
    assert_top_lists(after, dense_similarity(token_embeddings, codes), allowed, torch.arange(N_ITEMS))
    assert (after[base] != before[base]).any(dim=1).sum() > 0  # reverse edges were added


def test_withdrawn_items_leave_every_list_and_lists_stay_full():
    token_embeddings, codes = _catalogue(2)
    tables = digit_similarity_tables(token_embeddings)
    graph = exact_neighbors(tables, codes, torch.arange(N_ITEMS), N_EDGES)
    removed = torch.unique(graph[:5].reshape(-1))[:25]  # items that sit in lists, so lists change
    allowed = torch.ones(N_ITEMS, dtype=torch.bool)
    allowed[removed] = False
    after = remove_items(tables, codes, graph, removed, allowed)
    assert (after[removed] == -1).all()
    assert not torch.isin(after, removed).any()
    kept = torch.nonzero(allowed).squeeze(1)
    assert_top_lists(after, dense_similarity(token_embeddings, codes), allowed, kept)
    assert torch.equal(after[kept], exact_neighbors(tables, codes, kept, N_EDGES, candidates=kept))


def test_insert_after_withdraw_never_links_withdrawn_items():
    token_embeddings, codes = _catalogue(3)
    tables = digit_similarity_tables(token_embeddings)
    new_rows, removed = torch.tensor([10, 11, 299]), torch.tensor([3, 50, 51, 200])
    allowed = torch.ones(N_ITEMS, dtype=torch.bool)
    allowed[new_rows] = False  # not in the catalogue yet
    present = torch.nonzero(allowed).squeeze(1)
    graph = torch.full((N_ITEMS, N_EDGES), -1)
    graph[present] = exact_neighbors(tables, codes, present, N_EDGES, candidates=present)
    allowed[removed] = False
    graph = remove_items(tables, codes, graph, removed, allowed)
    allowed[new_rows] = True
    graph = insert_items(tables, codes, graph, new_rows, allowed)
    assert not torch.isin(graph, removed).any()
    assert_top_lists(graph, dense_similarity(token_embeddings, codes), allowed, torch.nonzero(allowed).squeeze(1))
