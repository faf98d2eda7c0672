"""Exact kNN over the similarity of ``similarity.py``: blockwise, with a running top-k.

A block of Q query items is scored against the catalogue (or a candidate set) in item chunks of C;
``RunningTopK`` keeps each query's k best. Memory is O(Q x (C + k)), never O(N^2). Neighbour order
is descending similarity, ties by ascending item row; an item is never its own neighbour.
"""

from __future__ import annotations

import torch

from rpg_dist.decode.blocktopk import MIN_KEY, RunningTopK
from rpg_dist.decode.topk import key_rows
from rpg_dist.decode.scoring import offset_codes
from rpg_dist.graph.similarity import block_sums, query_tables

# Items scored per chunk: Q x C float32 sums stay around 4 MB for Q = 64.
DEFAULT_CHUNK = 16_384
# Queries scored together: their (m*V, Q) lookup table (2 MB at m = 32, Q = 64) stays in cache,
# where each of an item's m lookups reads Q contiguous floats.
QUERY_BLOCK = 64


def exact_neighbors(
    tables: torch.Tensor,
    codes: torch.Tensor,
    query_rows: torch.Tensor,
    n_edges: int,
    chunk: int = DEFAULT_CHUNK,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``n_edges`` neighbours of ``query_rows`` among all items (or among ``candidates``).

    Args:
        tables: (m, V, V) digit cosine tables.
        codes: (N, m) item codes, item-major (any integer dtype).
        query_rows: (Q,) int64 rows of the query items.
        n_edges: neighbours per item.
        chunk: items scored per step.
        candidates: (C,) distinct int64 rows to search instead of the whole catalogue.

    Returns:
        (Q, n_edges) int64 neighbour rows, best first; -1 where fewer than n_edges others exist.
        Keys carry the rows, so the result does not depend on chunking or candidate order.
    """
    query_rows = query_rows.long()
    n_search = codes.shape[0] if candidates is None else len(candidates)
    found = []
    for q_lo in range(0, len(query_rows), QUERY_BLOCK):
        block = query_rows[q_lo : q_lo + QUERY_BLOCK]
        luts = query_tables(tables, codes[block])  # (m*V, Q)
        top = RunningTopK(block.numpy(), n_edges)
        for lo in range(0, n_search, chunk):
            rows = torch.arange(lo, min(lo + chunk, n_search)) if candidates is None else candidates[lo : lo + chunk].long()
            sums = block_sums(luts, offset_codes(codes[rows], tables.shape[1]))  # (c, Q)
            top.add(sums.numpy(), rows.numpy())
        found.append(keys_to_rows(torch.from_numpy(top.keys()), n_edges))
    return torch.cat(found) if found else torch.empty(0, n_edges, dtype=torch.int64)


def keys_to_rows(keys: torch.Tensor, n_edges: int) -> torch.Tensor:
    """(Q, <=k) keys -> (Q, k) rows with -1 for masked keys and missing columns."""
    rows = torch.where(keys == MIN_KEY, torch.full_like(keys, -1), key_rows(keys))
    if rows.shape[1] < n_edges:
        rows = torch.cat([rows, rows.new_full((rows.shape[0], n_edges - rows.shape[1]), -1)], dim=1)
    return rows
