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


def full_ranking_reference(log_probs: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item scored by a loop over digits (mean of its tokens' log-probabilities), then a stable
    descending sort: the lower row first among equal scores."""
    total = log_probs[:, 0][:, codes[:, 0].long()]  # (B, N)
    for d in range(1, codes.shape[1]):
        total = total + log_probs[:, d][:, codes[:, d].long()]
    scores = total / codes.shape[1]
    order = torch.sort(scores + 0.0, dim=1, descending=True, stable=True).indices[:, :k]
    return order, scores.gather(1, order)
