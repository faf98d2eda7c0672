"""Exact kNN over the similarity of ``similarity.py``: blockwise, with a streaming top-k merge.

A block of Q query items is scored against the catalogue in item chunks of C; each chunk's top-k
keys are merged into the running (Q, k) best. Memory is O(Q x (C + k)), never O(N^2). Neighbour
order is descending similarity, ties by ascending item row; an item is never its own neighbour.
"""

from __future__ import annotations

import numpy as np
import torch

from rpg_dist.decode.topk import MIN_KEY, key_rows, merge_topk, ranking_keys
from rpg_dist.graph.similarity import block_sums, dense_sums_reference

# Item chunk scored per step of the merge: Q x C float32 sums stay around 16 MB for Q = 512.
DEFAULT_CHUNK = 8192


def exact_neighbors(
    tables: torch.Tensor,
    codes_t: torch.Tensor,
    query_rows: torch.Tensor,
    n_edges: int,
    chunk: int = DEFAULT_CHUNK,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``n_edges`` neighbours of ``query_rows`` among all items (or among ``candidates``).

    Args:
        tables: (m, V, V) digit cosine tables.
        codes_t: (m, N) item codes, digit-major (any integer dtype).
        query_rows: (Q,) int64 rows of the query items.
        n_edges: neighbours per item.
        chunk: items scored per merge step.
        candidates: (C,) distinct int64 rows to search instead of the whole catalogue.

    Returns:
        (Q, n_edges) int64 neighbour rows, best first; -1 where fewer than n_edges others exist.
        Keys carry the rows, so the result does not depend on chunking or candidate order.
    """
    query_rows = query_rows.long()
    query_codes = codes_t[:, query_rows].t().long()  # (Q, m)
    n_search = codes_t.shape[1] if candidates is None else len(candidates)
    best = torch.empty(len(query_rows), 0, dtype=torch.int64)
    for lo in range(0, n_search, chunk):
        hi = min(lo + chunk, n_search)
        rows = torch.arange(lo, hi) if candidates is None else candidates[lo:hi].long()
        sums = block_sums(tables, query_codes, codes_t[:, rows].long())  # (Q, c)
        keys = ranking_keys(sums, rows.expand_as(sums))
        # An item is not its own neighbour (its similarity to itself is the maximum, 1).
        keys.masked_fill_(query_rows.unsqueeze(1) == rows.unsqueeze(0), MIN_KEY)
        top = torch.topk(keys, min(n_edges, hi - lo), dim=1).values
        best = merge_topk(best, top, min(n_edges, best.shape[1] + top.shape[1]))
    return keys_to_rows(best, n_edges)


def keys_to_rows(keys: torch.Tensor, n_edges: int) -> torch.Tensor:
    """(Q, <=k) keys -> (Q, k) rows with -1 for masked keys and missing columns."""
    rows = torch.where(keys == MIN_KEY, torch.full_like(keys, -1), key_rows(keys))
    if rows.shape[1] < n_edges:
        rows = torch.cat([rows, rows.new_full((rows.shape[0], n_edges - rows.shape[1]), -1)], dim=1)
    return rows


def dense_neighbors_reference(tables: torch.Tensor, codes: torch.Tensor, n_edges: int) -> np.ndarray:
    """Brute-force twin: the dense (N, N) similarity, then a stable argsort per row.

    Returns:
        (N, n_edges) int64 rows (-1 padded), order: descending similarity, then ascending row.
    """
    sums = dense_sums_reference(tables, codes).numpy().astype(np.float64)  # exact float32 values
    n_items = sums.shape[0]
    np.fill_diagonal(sums, -np.inf)
    order = np.argsort(-sums, axis=1, kind="stable")[:, : min(n_edges, n_items - 1)]
    out = np.full((n_items, n_edges), -1, np.int64)
    out[:, : order.shape[1]] = order
    return out
