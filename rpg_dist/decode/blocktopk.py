"""Running per-query top-k over blocks of scores, compiled with numba.

Every ranked list in rpg-dist orders items by descending score, ties by ascending row, through the
int64 keys of ``decode.topk.ranking_keys``. ``RunningTopK`` keeps, for Q queries, the k largest
keys seen so far while (C, Q) blocks of scores stream past (C items per block, one column per
query: the layout ``F.embedding_bag`` produces). It returns exactly what a sort of every key would.

Why a kernel: per block, ``torch.topk`` costs ~9 ns per (item, query) pair on this CPU, six times
the lookups that produce the scores. Here most pairs cost two comparisons:

1. the maximum of each group of ``GROUP`` consecutive items, per query (vectorised over queries);
2. a floor per query that no final top-k member can fall below: the larger of the current k-th
   best score and the k-th largest of (coarser) group maxima in this block -- k groups each hold
   an item at or above it, so anything lower is not even in this block's top k;
3. only groups whose maximum reaches the floor are opened; their items at or above it are keyed
   and appended to a per-query buffer that is cut back to the best k by quickselect when full.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from rpg_dist.decode.topk import MIN_KEY

GROUP = 8
_LOW = np.int64(0xFFFFFFFF)


@njit(inline="always")
def _key(score, row):
    """``ranking_keys`` for one float32 score and row (bit-identical)."""
    bits = np.int64(np.float32(score + np.float32(0.0)).view(np.int32))
    if bits < 0:
        bits = bits ^ np.int64(0x7FFFFFFF)
    return (bits << 32) | (_LOW - np.int64(row))


@njit(inline="always")
def _key_score(key):
    bits = key >> 32
    if bits < 0:
        bits = bits ^ np.int64(0x7FFFFFFF)
    return np.int32(bits).view(np.float32)


@njit(nogil=True, cache=True, boundscheck=False)
def _kth_largest(values, n, k):
    """The k-th largest (1-based) of values[:n]; reorders values. Hoare quickselect."""
    lo, hi, target = 0, n - 1, k - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        x, y, z = values[lo], values[mid], values[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return values[target]


@njit(nogil=True, cache=True, boundscheck=False)
def _group_maxima(scores, group):
    """(C, Q) scores -> (ceil(C / group), Q) maxima of consecutive item groups."""
    n_items, n_queries = scores.shape
    n_groups = (n_items + group - 1) // group
    out = np.empty((n_groups, n_queries), np.float32)
    for g in range(n_groups):
        lo = g * group
        out[g] = scores[lo]
        for r in range(lo + 1, min(lo + group, n_items)):
            for q in range(n_queries):
                out[g, q] = max(out[g, q], scores[r, q])
    return out


@njit(nogil=True, cache=True, boundscheck=False)
def _floors(gmax, best, k):
    """Per query: the score no final top-k member can be below (see the module docstring)."""
    n_groups, n_queries = gmax.shape
    floor = np.empty(n_queries, np.float32)
    step = max(1, n_groups // (2 * k))  # about 2k coarse maxima: a cheap quickselect, a tight floor
    n_coarse = (n_groups + step - 1) // step
    coarse = _group_maxima(gmax, step).T.copy() if n_coarse >= k else np.empty((0, 0), np.float32)
    for q in range(n_queries):
        worst = best[q, 0]
        for j in range(1, k):
            worst = min(worst, best[q, j])
        floor[q] = -np.inf if worst == MIN_KEY else _key_score(worst)
        if n_coarse >= k:
            floor[q] = max(floor[q], _kth_largest(coarse[q], n_coarse, k))
    return floor


@njit(nogil=True, cache=True, boundscheck=False)
def _keep_best(keys, n, k):
    """Move the k largest of keys[:n] to keys[:k] (any order); quickselect on int64 keys."""
    lo, hi, target = 0, n - 1, k - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        x, y, z = keys[lo], keys[mid], keys[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break


@njit(nogil=True, cache=True, boundscheck=False)
def _merge(scores, item_rows, query_rows, best, spill):
    """Merge a (C, Q) block into ``best`` (Q, k); ``spill`` is (Q, cap) scratch, cap > k."""
    n_items, n_queries = scores.shape
    k, cap = best.shape[1], spill.shape[1]
    # A query's own item must not count towards any maximum (it would lift the floor above the rest).
    for r in range(n_items):
        for q in range(n_queries):
            if item_rows[r] == query_rows[q]:
                scores[r, q] = -np.inf
    gmax = _group_maxima(scores, GROUP)
    floor = _floors(gmax, best, k)
    fill = np.full(n_queries, k, np.int64)
    spill[:, :k] = best
    for g in range(gmax.shape[0]):
        lo = g * GROUP
        hi = min(lo + GROUP, n_items)
        for q in range(n_queries):
            if gmax[g, q] < floor[q]:
                continue
            for r in range(lo, hi):
                score = scores[r, q]
                if score < floor[q] or score == -np.inf:
                    continue
                n = fill[q]
                spill[q, n] = _key(score, item_rows[r])
                n += 1
                if n == cap:
                    _keep_best(spill[q], n, k)
                    worst = spill[q, 0]
                    for j in range(1, k):
                        worst = min(worst, spill[q, j])
                    floor[q] = max(floor[q], _key_score(worst))
                    n = k
                fill[q] = n
    for q in range(n_queries):
        if fill[q] > k:
            _keep_best(spill[q], fill[q], k)
        best[q] = spill[q, :k]


class RunningTopK:
    """The k best (score, item row) keys per query over streamed (C, Q) score blocks.

    Args:
        query_rows: (Q,) int64 item row of each query (its own item is never kept), or -1 for none.
        k: entries kept per query.
        spill: per-query buffer in multiples of k before a cut back to k (>= 2).
    """

    def __init__(self, query_rows: np.ndarray, k: int, spill: int = 4) -> None:
        self.query_rows = np.ascontiguousarray(query_rows, np.int64)
        self.best = np.full((len(self.query_rows), k), MIN_KEY, np.int64)
        self._spill = np.empty((len(self.query_rows), max(2, spill) * k + 1), np.int64)

    def add(self, scores: np.ndarray, item_rows: np.ndarray) -> None:
        """Offer a block: scores (C, Q) float32 of items ``item_rows`` (C,) for every query.

        ``scores`` is overwritten (-inf at each query's own item); -inf scores are never kept.
        """
        if len(item_rows):
            _merge(np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(item_rows, np.int64),
                   self.query_rows, self.best, self._spill)

    def keys(self) -> np.ndarray:
        """(Q, k) int64 keys, best first; ``MIN_KEY`` where fewer than k items were offered."""
        return np.sort(self.best, axis=1)[:, ::-1].copy()
