"""Changing a built graph without rebuilding it: items inserted, items withdrawn.

Both keep the rule of the exact graph (similarity.py's S, descending, ties by ascending row, no
self-edges), restricted to the items still offered (``allowed``):

- an inserted item's list is its exact top-k among the allowed items (``exact_neighbors``, the
  function exact mode builds with), and it enters the list of every existing item it beats the
  worst entry of (or whose list is not full): on an exact graph every list then equals what a full
  exact rebuild gives;
- a withdrawn item leaves every list; the lists it was in are recomputed exactly (they would
  otherwise be one short), and its own list is emptied. It is never a neighbour again.

Cost: an insertion of A items scores them against all N items (A x N sums of m lookups); a
withdrawal scans the catalogue once per list it was in. Memory: O(chunk x A), never O(N^2).
"""

from __future__ import annotations

import torch

from rpg_dist.decode.scoring import offset_codes
from rpg_dist.decode.topk import MIN_KEY, key_rows, ranking_keys
from rpg_dist.graph.exact import DEFAULT_CHUNK, exact_neighbors
from rpg_dist.graph.similarity import block_sums, pair_sums, query_tables


def insert_items(tables: torch.Tensor, codes: torch.Tensor, neighbors: torch.Tensor, new_rows: torch.Tensor,
                 allowed: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The graph with ``new_rows`` inserted.

    Args:
        tables: (m, V, V) digit cosine tables of the trained token table.
        codes: (N, m) codes of every item, the new ones included.
        neighbors: (N, k) lists (-1 padded); the new rows' lists are ignored.
        new_rows: (A,) int64 rows of the inserted items.
        allowed: (N,) bool, items that may be neighbours (not withdrawn), the new ones included.

    Returns:
        (N, k) int64 lists.
    """
    neighbors = neighbors.clone().long()
    n_edges = neighbors.shape[1]
    candidates = torch.nonzero(allowed).squeeze(1)
    neighbors[new_rows] = exact_neighbors(tables, codes, new_rows, n_edges, candidates=candidates)
    existing = allowed.clone()
    existing[new_rows] = False
    worst = _worst_keys(tables, codes, neighbors)  # (N,)
    luts = query_tables(tables, codes[new_rows])  # (m*V, A)
    pairs = []  # (item row, new row) where the new item enters the item's list
    for lo in range(0, codes.shape[0], chunk):
        rows = torch.arange(lo, min(lo + chunk, codes.shape[0]))
        sums = block_sums(luts, offset_codes(codes[rows], tables.shape[1]))  # (c, A)
        keys = ranking_keys(sums, new_rows.unsqueeze(0).expand_as(sums))
        beats = (keys > worst[rows].unsqueeze(1)) & existing[rows].unsqueeze(1)
        hit_rows, hit_new = torch.nonzero(beats, as_tuple=True)
        pairs.append(torch.stack([rows[hit_rows], new_rows[hit_new]], dim=1))
    pairs = torch.cat(pairs)
    if len(pairs):
        neighbors = _merge_into_lists(tables, codes, neighbors, pairs)
    return neighbors


def remove_items(tables: torch.Tensor, codes: torch.Tensor, neighbors: torch.Tensor, removed_rows: torch.Tensor,
                 allowed: torch.Tensor) -> torch.Tensor:
    """The graph without ``removed_rows``: out of every list (recomputed exactly), their own lists emptied.

    Args:
        allowed: (N,) bool, items that may still be neighbours (``removed_rows`` already False).
    """
    neighbors = neighbors.clone().long()
    gone = torch.zeros(codes.shape[0], dtype=torch.bool)
    gone[removed_rows] = True
    neighbors[removed_rows] = -1
    touched = (gone[neighbors.clamp(min=0)] & (neighbors >= 0)).any(dim=1)
    affected = torch.nonzero(touched & allowed).squeeze(1)
    if len(affected):
        candidates = torch.nonzero(allowed).squeeze(1)
        neighbors[affected] = exact_neighbors(tables, codes, affected, neighbors.shape[1], candidates=candidates)
    return neighbors


def _worst_keys(tables: torch.Tensor, codes: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """(N,) ranking key of each list's last entry; MIN_KEY for a list with room left (-1 entries)."""
    last = neighbors[:, -1]
    full = last >= 0
    rows = torch.nonzero(full).squeeze(1)
    keys = torch.full((codes.shape[0],), MIN_KEY, dtype=torch.int64)
    if len(rows):
        sums = pair_sums(tables, codes[rows].long(), codes, last[rows].unsqueeze(1)).squeeze(1)  # (F,)
        keys[rows] = ranking_keys(sums, last[rows])
    return keys


def _merge_into_lists(tables, codes, neighbors: torch.Tensor, pairs: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Each list in ``pairs[:, 0]`` re-ranked over its entries plus its new items ``pairs[:, 1]``."""
    order = torch.argsort(pairs[:, 0], stable=True)
    pairs = pairs[order]
    lists, counts = torch.unique_consecutive(pairs[:, 0], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    n_edges = neighbors.shape[1]
    for lo in range(0, len(lists), block):
        rows, n_new, first = lists[lo : lo + block], counts[lo : lo + block], starts[lo : lo + block]
        width = int(n_new.max())
        slot = torch.arange(width).unsqueeze(0)
        taken = slot < n_new.unsqueeze(1)
        extra = torch.where(taken, pairs[(first.unsqueeze(1) + slot).clamp(max=len(pairs) - 1), 1], -1)
        candidates = torch.cat([neighbors[rows], extra], dim=1)  # (L, k + width)
        sums = pair_sums(tables, codes[rows].long(), codes, candidates.clamp(min=0))
        keys = torch.where(candidates >= 0, ranking_keys(sums, candidates.clamp(min=0)), MIN_KEY)
        top = torch.topk(keys, n_edges, dim=1, sorted=True).values
        neighbors[rows] = torch.where(top == MIN_KEY, -1, key_rows(top))
    return neighbors
