"""Running per-query top-k over blocks of scores, compiled with numba.

Every ranked list in rpg-dist orders items by descending score, ties by ascending row, through the
int64 keys of ``decode.topk.ranking_keys``. ``RunningTopK`` keeps, for Q queries, the k largest
keys seen so far while (C, Q) blocks of scores stream past (C items per block, one column per
query: the layout ``F.embedding_bag`` produces). It returns exactly what a sort of every key would.

Why a kernel: per block, ``torch.topk`` costs ~9 ns per (item, query) pair on this CPU, six times
the lookups that produce the scores. Here most pairs cost two comparisons:

1. the maximum of each group of ``GROUP`` consecutive items, per query (vectorised over queries);
2. a floor per query that no final top-k member can fall below: the current k-th best score, or,
   while fewer than k are kept, the k-th largest of (coarser) group maxima in this block -- k groups
   each hold an item at or above it, so anything lower is not even in this block's top k;
3. only groups whose maximum reaches the floor are opened; their items at or above it are keyed
   and buffered per query; a full buffer (and, at the end of a block, any non-empty one) is sorted
   and merged into the query's list, which is kept sorted (dropping repeats when items may repeat).
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
def _key_row(key):
    """The item row packed in a key (``topk.key_rows`` for one key)."""
    return _LOW - (key & _LOW)


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
def _floors(gmax, best, slots, k):
    """Per query: the score no final top-k member can be below (see the module docstring)."""
    n_groups, n_queries = gmax.shape
    floor = np.empty(n_queries, np.float32)
    step = max(1, n_groups // (2 * k))  # about 2k coarse maxima: a cheap quickselect, a tight floor
    n_coarse = (n_groups + step - 1) // step
    coarse = _group_maxima(gmax, step).T.copy() if n_coarse >= k else np.empty((0, 0), np.float32)
    for q in range(n_queries):
        worst = best[slots[q], k - 1]  # rows are kept sorted, best first
        floor[q] = -np.inf if worst == MIN_KEY else _key_score(worst)
        # Only while the query's list is not full: afterwards its k-th best, the k-th of everything
        # offered so far, is a tighter floor than a single block's coarse maxima give.
        if worst == MIN_KEY and n_coarse >= k:
            floor[q] = max(floor[q], _kth_largest(coarse[q], n_coarse, k))
    return floor


@njit(nogil=True, cache=True, boundscheck=False)
def _absorb(best_row, spill_row, n, scratch, distinct):
    """best_row (sorted descending, MIN_KEY padded) := the k best of itself and spill_row[:n].

    One in-place sort of the n new keys, then a linear merge (dropping repeats when ``distinct``).
    Returns the new k-th key (MIN_KEY while fewer than k are kept).
    """
    k = len(best_row)
    spill_row[:n].sort()  # ascending: read from the end
    i, j, kept = 0, n - 1, 0
    while kept < k and (i < k or j >= 0):
        if j < 0 or (i < k and best_row[i] >= spill_row[j]):
            key = best_row[i]
            i += 1
        else:
            key = spill_row[j]
            j -= 1
        if key == MIN_KEY:
            break
        if distinct and kept and key == scratch[kept - 1]:
            continue
        scratch[kept] = key
        kept += 1
    best_row[:kept] = scratch[:kept]
    best_row[kept:] = MIN_KEY
    return best_row[k - 1]


@njit(nogil=True, cache=True, boundscheck=False)
def _exclude_self(scores, item_rows, query_rows):
    """-inf where a query meets its own item: a binary search per query when rows are sorted."""
    n_items, n_queries = scores.shape
    ascending = True
    for r in range(1, n_items):
        if item_rows[r] <= item_rows[r - 1]:
            ascending = False
            break
    for q in range(n_queries):
        if ascending:
            r = np.searchsorted(item_rows, query_rows[q])
            if r < n_items and item_rows[r] == query_rows[q]:
                scores[r, q] = -np.inf
        else:
            for r in range(n_items):
                if item_rows[r] == query_rows[q]:
                    scores[r, q] = -np.inf


@njit(nogil=True, cache=True, boundscheck=False)
def _merge(scores, item_rows, query_rows, slots, best, spill, distinct):
    """Merge a (C, Q) block into the rows ``slots`` of ``best``; ``spill`` is (>= Q, cap) scratch."""
    n_items, n_queries = scores.shape
    k, cap = best.shape[1], spill.shape[1]
    # A query's own item must not count towards any maximum (it would lift the floor above the rest).
    _exclude_self(scores, item_rows, query_rows)
    gmax = _group_maxima(scores, GROUP)
    floor = _floors(gmax, best, slots, k)
    # Only keys that beat the floor are buffered; a query's list is touched only if some did.
    fill = np.zeros(n_queries, np.int64)
    scratch = np.empty(k, np.int64)
    for g in range(gmax.shape[0]):
        lo = g * GROUP
        hi = min(lo + GROUP, n_items)
        for q in range(n_queries):
            if gmax[g, q] < floor[q]:
                continue
            if fill[q] + GROUP > cap:
                worst = _absorb(best[slots[q]], spill[q], fill[q], scratch, distinct)
                fill[q] = 0
                if worst != MIN_KEY:
                    floor[q] = max(floor[q], _key_score(worst))
            # Branch-free: every item of the group is written, the slot advances only for those
            # at or above the floor (-inf, the query itself, never is: the floor is finite or -inf).
            n, threshold = fill[q], floor[q]
            for r in range(lo, hi):
                score = scores[r, q]
                spill[q, n] = _key(score, item_rows[r])
                n += (score >= threshold) & (score != -np.inf)
            fill[q] = n
    for q in range(n_queries):
        if fill[q]:
            _absorb(best[slots[q]], spill[q], fill[q], scratch, distinct)


class RunningTopK:
    """The k best (score, item row) keys per query over streamed (C, Q) score blocks.

    Args:
        query_rows: (Q,) int64 item row of each query (its own item is never kept), or -1 for none.
        k: entries kept per query.
        spill: keys buffered per query, in multiples of k, before they are merged into its list.
        distinct: the same item may be offered more than once (several blocks): keep it once.
    """

    def __init__(self, query_rows: np.ndarray, k: int, spill: int = 4, distinct: bool = False) -> None:
        self.query_rows = np.ascontiguousarray(query_rows, np.int64)
        self.best = np.full((len(self.query_rows), k), MIN_KEY, np.int64)
        self.distinct = distinct
        self._cap = max(1, spill) * k + GROUP
        self._spill = np.empty((0, self._cap), np.int64)

    def add(self, scores: np.ndarray, item_rows: np.ndarray, queries: np.ndarray | None = None) -> None:
        """Offer a block: scores (C, q) float32 of items ``item_rows`` (C,) for queries ``queries``.

        Args:
            queries: (q,) positions among this accumulator's queries (default: all of them).

        ``scores`` is overwritten (-inf at each query's own item); -inf scores are never kept.
        """
        slots = np.arange(len(self.query_rows)) if queries is None else np.ascontiguousarray(queries, np.int64)
        if not len(item_rows) or not len(slots):
            return
        if len(self._spill) < len(slots):
            self._spill = np.empty((len(slots), self._cap), np.int64)
        _merge(np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(item_rows, np.int64),
               self.query_rows[slots], slots, self.best, self._spill, self.distinct)

    def keys(self) -> np.ndarray:
        """(Q, k) int64 keys, best first; ``MIN_KEY`` where fewer than k items were offered."""
        return self.best.copy()
