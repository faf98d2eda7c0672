"""Balanced graph partitions that keep most edges inside a partition.

1. Balanced k-means of the reduced item vectors (faiss k-means, then a capacity-constrained
   assignment), so similar items -- which are each other's neighbours -- share a partition.
2. A few rounds of balanced label propagation on the built graph: each item prefers the partition
   holding most of its neighbours (ties stay put), under the same capacity.

Capacity is ceil(N / P) items per partition. Every step is vectorised over items.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def balanced_assign(preference: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each item to one partition, at most ``capacity`` items each, favouring high preference.

    Proposal rounds: every unassigned item proposes to its best partition with room left; each
    partition accepts its strongest proposals up to its remaining room. Each round fills at least
    one partition or assigns everyone, so there are at most P rounds.

    Args:
        preference: (N, P) scores, higher is better.
        capacity: items per partition (capacity * P >= N).

    Returns:
        (N,) int32 partition of each item.
    """
    n_items, n_parts = preference.shape
    if capacity * n_parts < n_items:
        raise ValueError(f"capacity {capacity} x {n_parts} partitions < {n_items} items")
    assign = np.full(n_items, -1, np.int32)
    room = np.full(n_parts, capacity, np.int64)
    pending = np.arange(n_items)
    while len(pending):
        masked = np.where(room[None, :] > 0, preference[pending], -np.inf)
        choice = masked.argmax(axis=1)
        strength = masked[np.arange(len(pending)), choice]
        # Within each chosen partition, strongest proposals first (ties: lower item row first).
        order = np.lexsort((pending, -strength, choice))
        choice_sorted = choice[order]
        first = np.searchsorted(choice_sorted, choice_sorted, side="left")
        rank = np.arange(len(order)) - first
        accepted = order[rank < room[choice_sorted]]
        assign[pending[accepted]] = choice[accepted]
        room -= np.bincount(choice[accepted], minlength=n_parts)
        pending = pending[assign[pending] < 0]
    return assign


def kmeans_partition(vectors: np.ndarray, n_parts: int, seed: int, niter: int = 20) -> np.ndarray:
    """Balanced k-means partition of (N, D) vectors into ``n_parts``: (N,) int32."""
    import faiss

    n_items = vectors.shape[0]
    if n_parts == 1:
        return np.zeros(n_items, np.int32)
    kmeans = faiss.Kmeans(vectors.shape[1], n_parts, niter=niter, seed=seed, spherical=False,
                          max_points_per_centroid=max(256, 200_000 // n_parts))
    kmeans.train(np.ascontiguousarray(vectors, np.float32))
    # -||x - c||^2 up to a per-item constant: 2 x.c - ||c||^2.
    centroids = kmeans.centroids
    preference = 2 * vectors @ centroids.T - (centroids**2).sum(axis=1)[None, :]
    return balanced_assign(preference, -(-n_items // n_parts))


def refine_partition(partition: np.ndarray, neighbors: np.ndarray, n_parts: int, rounds: int = 3) -> np.ndarray:
    """Balanced label propagation: move items towards the partition of most of their neighbours.

    Args:
        partition: (N,) current partition.
        neighbors: (N, k) neighbour rows, -1 padded.
        n_parts: P.
        rounds: propagation rounds (each O(N x k)).
    """
    return refine_with_counts(partition, lambda owner: neighbor_counts(owner, neighbors, n_parts), rounds)[0]


def refine_with_counts(partition: np.ndarray, counts_of: Callable[[np.ndarray], np.ndarray],
                       rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """``refine_partition`` with the lists behind ``counts_of(partition) -> (N, P)`` neighbour counts
    (a streamed build reads them from its part files, one part at a time).

    Each round moves items to their preferred partitions under capacity ceil(N / P), and is kept
    only if fewer edges cross partitions afterwards.

    Returns:
        The (N,) partition and its (N, P) neighbour counts.
    """
    n_items = len(partition)
    counts = counts_of(partition)
    capacity = -(-n_items // counts.shape[1])
    for _ in range(rounds):
        preference = counts.copy()
        # Half a neighbour of stickiness: ties keep the current partition, so nothing oscillates.
        preference[np.arange(n_items), partition] += 0.5
        updated = balanced_assign(preference, capacity)
        if (updated == partition).all():
            break
        updated_counts = counts_of(updated)
        if crossing_edges(updated, updated_counts) >= crossing_edges(partition, counts):
            break
        partition, counts = updated, updated_counts
    return partition, counts


def crossing_edges(partition: np.ndarray, counts: np.ndarray) -> int:
    """Edges between partitions, from (N, P) neighbour counts under ``partition``."""
    inside = counts[np.arange(len(partition)), partition].sum(dtype=np.float64)
    return int(counts.sum(dtype=np.float64) - inside)


def neighbor_counts(partition: np.ndarray, neighbors: np.ndarray, n_parts: int, chunk: int = 65_536) -> np.ndarray:
    """(n, P) float32: how many of each list's neighbours lie in each partition (chunked over lists).

    Args:
        partition: (N,) partition of every item.
        neighbors: (n, k) neighbour rows, -1 padded: the whole graph's lists or some of them.
    """
    counts = np.zeros((len(neighbors), n_parts), np.float32)
    for lo in range(0, len(neighbors), chunk):
        block = neighbors[lo : lo + chunk]  # (c, k)
        valid = block >= 0
        local = np.broadcast_to(np.arange(len(block))[:, None], block.shape)[valid]
        flat = np.bincount(local * n_parts + partition[block[valid]], minlength=len(block) * n_parts)
        counts[lo : lo + len(block)] = flat.reshape(len(block), n_parts)
    return counts


def cross_fraction(partition: np.ndarray, neighbors: np.ndarray, chunk: int = 65_536) -> float:
    """Fraction of (valid) edges whose endpoints lie in different partitions."""
    crossing = total = 0
    for lo in range(0, len(partition), chunk):
        block = neighbors[lo : lo + chunk]
        valid = block >= 0
        source = np.broadcast_to(partition[lo : lo + len(block), None], block.shape)[valid]
        crossing += int((source != partition[block[valid]]).sum())
        total += int(valid.sum())
    return crossing / total if total else 0.0
