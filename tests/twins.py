"""Brute-force twins of the fast paths, for the tests only: whole matrices, plain sorts, loops."""

from __future__ import annotations

import numpy as np
import torch


def dense_sums(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The full (N, N) matrix of S(a, b) = sum_k T_k[a_k, b_k] (small catalogues only).

    Digits are added in order 0..m-1 in float32, as the kernels do, so ties are exact ties.
    """
    codes = codes.long()
    total = tables[0][codes[:, 0]][:, codes[:, 0]]
    for k in range(1, tables.shape[0]):
        total += tables[k][codes[:, k]][:, codes[:, k]]
    return total


def dense_neighbors(tables: torch.Tensor, codes: torch.Tensor, n_edges: int) -> np.ndarray:
    """The dense similarity, then a stable argsort per row, self excluded.

    Returns:
        (N, n_edges) int64 rows (-1 padded), order: descending similarity, then ascending row.
    """
    sums = dense_sums(tables, codes).numpy().astype(np.float64)  # exact float32 values
    n_items = sums.shape[0]
    np.fill_diagonal(sums, -np.inf)
    order = np.argsort(-sums, axis=1, kind="stable")[:, : min(n_edges, n_items - 1)]
    out = np.full((n_items, n_edges), -1, np.int64)
    out[:, : order.shape[1]] = order
    return out


def full_ranking_reference(log_probs: torch.Tensor, codes: torch.Tensor, k: int, counts=None, weight: float = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item scored by a loop over digits (mean of its tokens' log-probabilities), plus
    ``weight * log(1 + counts[n])`` when ``counts`` (N,) training occurrences are given (the
    popularity prior, rounded to float32 once), then a stable descending sort: the lower row first
    among equal scores."""
    total = log_probs[:, 0][:, codes[:, 0].long()]  # (B, N)
    for d in range(1, codes.shape[1]):
        total = total + log_probs[:, d][:, codes[:, d].long()]
    scores = total / codes.shape[1]
    if counts is not None:
        prior = [np.float32(weight * np.log1p(float(max(c, 0)))) for c in list(counts)]
        scores = scores + torch.tensor(prior, dtype=torch.float32)
    order = torch.sort(scores + 0.0, dim=1, descending=True, stable=True).indices[:, :k]
    return order, scores.gather(1, order)


# ---- the paper's graph decoding, written from the reference code's `graph_propagation` ----------


def paper_adjacency(token_embeddings: torch.Tensor, codes: torch.Tensor, n_edges: int) -> torch.Tensor:
    """The reference's graph: the dense (N, N) matrix of mean_k (1 + cos(e_k[a_k], e_k[b_k])) / 2,
    then ``topk(n_edges)`` per row, so each item is its own first neighbour (self-similarity is the
    maximum). token_embeddings: (m, V, d); codes: (N, m). Returns (N, n_edges) int64."""
    table = torch.nn.functional.normalize(token_embeddings.float(), dim=-1)
    sims = 0.5 * (torch.bmm(table, table.transpose(1, 2)) + 1.0)  # (m, V, V)
    codes = codes.long()
    total = torch.zeros(codes.shape[0], codes.shape[0])
    for k in range(codes.shape[1]):
        total += sims[k].index_select(0, codes[:, k]).index_select(1, codes[:, k])
    return torch.topk(total / codes.shape[1], k=n_edges, dim=-1).indices


def paper_graph_decode(log_probs: torch.Tensor, codes: torch.Tensor, adjacency: torch.Tensor,
                       start: torch.Tensor, steps: int) -> tuple[list[list[int]], list[int]]:
    """The reference's loop: the beam is ``start`` (drawn with replacement, unsorted); each step the
    candidates are the distinct neighbours of the beam (the beam itself only through self-edges),
    scored as the mean over digits of log-probabilities, and the top b kept. Visited: the start
    items plus every neighbour reached.

    Returns the final beams (rows, best first) and the visited counts per query.
    """
    num_beams, codes = start.shape[1], codes.long()
    beams, visited_counts = [], []
    for query in range(start.shape[0]):
        beam, visited = start[query], set(start[query].tolist())
        for _ in range(steps):
            candidates = torch.unique(adjacency[beam].reshape(-1))
            visited.update(candidates.tolist())
            digits = log_probs[query]  # (m, V)
            scores = torch.stack([digits[k, codes[candidates, k]] for k in range(codes.shape[1])]).mean(0)
            beam = candidates[torch.topk(scores, num_beams).indices]
        beams.append(beam.tolist())
        visited_counts.append(len(visited))
    return beams, visited_counts


def graph_decode_reference(
    log_probs: torch.Tensor,
    codes: torch.Tensor,
    neighbors: list[list[int]],
    start: list[list[int]],
    num_beams: int,
    steps: int,
    prior: list[float] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Brute-force twin: plain loops over queries and items with Python sets and dicts; ``prior``
    (one float32 value per item) is added to each item's mean log-probability.

    Scores are computed item by item with numpy float32 scalars, adding the digits in the same
    order as the vectorised scorers, so they are bit-identical to them whenever dividing by ``m``
    is exact (m a power of two, as in every test and config).

    Returns:
        The final beam of every query (item rows, best first) and the number of distinct items
        scored per query.
    """
    table = log_probs.to(torch.float32).numpy()  # (B, m, V)
    item_codes = codes.numpy()  # rows read one item at a time: no O(N) conversion per call
    n_digit = np.float32(table.shape[1])
    beams, visited_counts = [], []
    for query, start_items in enumerate(start):
        digits = table[query]  # (m, V)
        cache: dict[int, float] = {}

        def score(item: int) -> float:
            if item not in cache:
                total = np.float32(0.0)
                for k, token in enumerate(item_codes[item].tolist()):
                    total = np.float32(total + digits[k, token])
                mean = np.float32(total / n_digit)
                cache[item] = float(mean if prior is None else np.float32(mean + np.float32(prior[item]))) + 0.0
            return cache[item]

        def rank(items: set[int]) -> list[int]:
            return sorted(items, key=lambda item: (-score(item), item))[:num_beams]

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
