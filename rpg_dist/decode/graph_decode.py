"""Graph-constrained decoding: walk the item kNN graph instead of scoring every item.

Semantics (the paper's ``graph_propagation``, vectorised over queries):

- the beam starts as ``b`` distinct start items per query, ordered by score;
- each of ``q`` steps takes as candidates the current beam plus every neighbour of every beam item,
  drops duplicates per query, scores them and keeps the top ``b``. The paper's adjacency lists
  include each item as its own top neighbour (its dense similarity matrix has the maximum on the
  diagonal); ours exclude self-edges, so the beam is put into the candidate set explicitly;
- ``n_visited_items`` of a query is the number of distinct items scored: the start items plus every
  neighbour reached in any step;
- order everywhere: descending score, ties by ascending item row (see ``topk.ranking_keys``).

Neighbour lists are dense rows padded with -1. No Python loop runs over queries or items: the only
loop is over the ``q`` steps (and over the m digits inside scoring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rpg_dist.decode.scoring import candidate_scores, item_scores
from rpg_dist.decode.topk import MIN_KEY, key_rows, key_scores, ranking_keys


@dataclass
class DecodeResult:
    """Decoded items per query, best first."""

    items: torch.Tensor  # (B, K) int64 item rows
    scores: torch.Tensor  # (B, K) float32
    n_visited: torch.Tensor  # (B,) int64 distinct items scored per query


def random_start_items(n_queries: int, n_items: int, n_beams: int, generator: torch.Generator) -> torch.Tensor:
    """``n_beams`` distinct uniformly random item rows per query: (n_queries, n_beams) int64.

    Floyd's sampling, vectorised over queries: O(n_queries x n_beams^2), never O(n_items).
    """
    if n_beams > n_items:
        raise ValueError(f"num_beams={n_beams} exceeds the {n_items} items of the catalogue")
    chosen = torch.empty(n_queries, n_beams, dtype=torch.int64)
    for i, upper in enumerate(range(n_items - n_beams, n_items)):
        draw = torch.randint(0, upper + 1, (n_queries,), generator=generator)
        taken = (chosen[:, :i] == draw.unsqueeze(1)).any(dim=1)
        # Floyd: a draw already taken is replaced by `upper`, which no earlier draw could reach.
        chosen[:, i] = torch.where(taken, torch.full_like(draw, upper), draw)
    return chosen


def popular_start_items(popularity: torch.Tensor, n_queries: int, n_beams: int) -> torch.Tensor:
    """The ``n_beams`` most frequent items (ties by lower row) for every query: (n_queries, n_beams)."""
    rows = torch.arange(popularity.shape[0])
    top = torch.topk(ranking_keys(popularity.float(), rows), n_beams).values
    return key_rows(top).unsqueeze(0).expand(n_queries, -1).clone()


class GraphDecoder:
    """Vectorised graph-constrained decoding over an in-memory graph.

    Args:
        codes: (N, m) item codes (int16 is fine).
        neighbors: (N, k) neighbour rows of each item, best first, padded with -1.
        num_beams: b, items kept per query after each step.
        steps: q, expansion steps.
    """

    def __init__(self, codes: torch.Tensor, neighbors: torch.Tensor, num_beams: int, steps: int) -> None:
        if neighbors.shape[0] != codes.shape[0]:
            raise ValueError(f"neighbors has {neighbors.shape[0]} rows but codes {codes.shape[0]}")
        self.codes = codes
        self.neighbors = neighbors
        self.num_beams = num_beams
        self.steps = steps

    def decode(self, log_probs: torch.Tensor, start: torch.Tensor, top_k: int | None = None) -> DecodeResult:
        """Decode a batch.

        Args:
            log_probs: (B, m, V) per-digit log-probabilities.
            start: (B, b) distinct start item rows per query.
            top_k: items to return (<= b; default b).

        Returns:
            ``DecodeResult`` with (B, top_k) items and scores.
        """
        top_k = self.num_beams if top_k is None else top_k
        if start.shape[1] != self.num_beams or top_k > self.num_beams:
            raise ValueError(f"start must be (B, {self.num_beams}) and top_k <= {self.num_beams}")
        beam_keys = self._top_beams(log_probs, start)  # (B, b)
        visited = [start]
        for _ in range(self.steps):
            beam = key_rows(beam_keys)  # (B, b)
            candidates = self._expand(beam)  # (B, b + b*k)
            visited.append(candidates)
            beam_keys = self._top_beams(log_probs, candidates)
        top = beam_keys[:, :top_k]
        return DecodeResult(key_rows(top), key_scores(top), count_distinct(torch.cat(visited, dim=1)))

    def _expand(self, beam: torch.Tensor) -> torch.Tensor:
        """The beam plus all its neighbours: (B, b) -> (B, b + b*k), duplicates not yet removed."""
        neighbors = self.neighbors[beam].long()  # (B, b, k)
        # Padding (-1) becomes the beam item itself: a duplicate that the top-b step drops.
        neighbors = torch.where(neighbors < 0, beam.unsqueeze(2), neighbors)
        return torch.cat([beam, neighbors.flatten(1)], dim=1)

    def _top_beams(self, log_probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Keys of the top-b distinct candidates per query, best first: (B, C) -> (B, b)."""
        keys = ranking_keys(candidate_scores(log_probs, self.codes, candidates), candidates)  # (B, C)
        # Equal keys = same item (and so same score): after a sort they are adjacent.
        keys = torch.sort(keys, dim=1, descending=True).values
        duplicate = keys[:, 1:] == keys[:, :-1]
        keys[:, 1:].masked_fill_(duplicate, MIN_KEY)
        return torch.topk(keys, self.num_beams, dim=1, sorted=True).values


def count_distinct(rows: torch.Tensor) -> torch.Tensor:
    """Distinct values per row of a (B, L) integer tensor: (B,) int64."""
    ordered = torch.sort(rows, dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)


def graph_decode_reference(
    log_probs: torch.Tensor,
    codes: torch.Tensor,
    neighbors: list[list[int]],
    start: list[list[int]],
    num_beams: int,
    steps: int,
) -> tuple[list[list[int]], list[int]]:
    """Brute-force twin: plain loops over queries with Python sets (the paper's code, one query at a time).

    Returns:
        The final beam of every query (item rows, best first) and the number of distinct items
        scored per query.
    """
    scores = item_scores(log_probs, codes) + 0.0  # (B, N): same float32 values as the fast path
    beams, visited_counts = [], []
    for query, start_items in enumerate(start):
        row_scores = scores[query].tolist()

        def rank(items: set[int]) -> list[int]:
            return sorted(items, key=lambda item: (-row_scores[item], item))[:num_beams]

        visited = set(start_items)
        beam = rank(set(start_items))
        for _ in range(steps):
            candidates = set(beam)
            for item in beam:
                candidates.update(n for n in neighbors[item] if n >= 0)
            visited |= candidates
            beam = rank(candidates)
        beams.append(beam)
        visited_counts.append(len(visited))
    return beams, visited_counts
