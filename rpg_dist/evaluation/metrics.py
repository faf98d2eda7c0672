"""Leave-one-out ranking metrics from ranked item lists."""

from __future__ import annotations

import numpy as np


def ranking_metrics(ranked: np.ndarray, targets: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Recall@k and NDCG@k with one held-out target per query.

    Args:
        ranked: (n, K) item rows, best first (K >= max(ks)).
        targets: (n,) the held-out item row of each query.
        ks: cut-offs.

    Returns:
        ``{"recall@k": ..., "ndcg@k": ...}`` averaged over queries; with one relevant item the ideal
        DCG is 1, so NDCG@k = 1 / log2(rank + 2) when the target is at 0-based ``rank`` < k, else 0.
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.shape[0] != targets.shape[0]:
        raise ValueError(f"ranked has {ranked.shape[0]} rows, targets {targets.shape[0]}")
    if ranked.shape[1] < max(ks):
        raise ValueError(f"ranked lists hold {ranked.shape[1]} items, fewer than k={max(ks)}")
    hit = ranked == targets[:, None]  # (n, K)
    # 0-based position of the target, or K when it is absent.
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), ranked.shape[1])
    out: dict[str, float] = {}
    for k in ks:
        inside = rank < k
        out[f"recall@{k}"] = float(inside.mean()) if len(rank) else 0.0
        gain = np.where(inside, 1.0 / np.log2(rank + 2.0), 0.0)
        out[f"ndcg@{k}"] = float(gain.mean()) if len(rank) else 0.0
    return out
