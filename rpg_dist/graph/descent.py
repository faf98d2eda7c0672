"""Approximate kNN by neighbour descent (NN-descent: Dong, Moses & Li, WWW'11), every pair scored exactly.

Why: on real codes the true neighbours share few digits and cluster nowhere (token_blocks.py), so
the candidates that hold them had to come from whole token blocks, about N^2 / 8 pairs at m = 32:
hours at 1M items, days at 10M. Neighbour descent needs no clusters, only that a neighbour of a
neighbour tends to be a neighbour, which holds here because RPG's similarity is an inner product on
a sphere: S(a, b) = <z_a, z_b> with |z|^2 = m, so |z_a - z_b|^2 = 2m - 2 S(a, b) is a (squared)
metric. Its cost is about N x iterations x (pairs per local join), linear in N.

State: each item's list of the K best items found so far, a min-heap of ranking keys
(decode/topk.py: score, then row; the root is the worst kept) plus a "new" flag per entry.
An iteration:

1. Candidates. Each item x gets up to ``max_candidates`` new and as many old ones: items of x's
   list (forward) and items whose lists hold x (reverse), sampled where more are offered. A new
   entry sampled from x's own list turns old.
2. Local join. For every x, every pair (p, q) of new(x) x new(x) and new(x) x old(x) is scored
   exactly and offered to p's and q's lists (pairs of two old entries were joined before).
3. Stop when fewer than ``delta`` x N x K list entries changed (or after ``max_iters``).

Lists start from items sharing a token with the item at each digit (the blocks of token_blocks.py,
sampled), where true neighbours are more frequent than at random, plus random items.

Determinism: every sampled choice is a hash of (seed, iteration, rows), each list is written by one
thread only, and the local join's offers are applied in a fixed order. The lists do not depend on
the number of threads, and scores are the similarity kernels' float32 sums (digits in order), so a
found neighbour has exactly the key exact mode gives it.

Memory: N x K x 9 bytes for the lists and flags, N x 2 x max_candidates x 4 for the candidates,
one block of local-join offers; 10M items x 100 edges: ~12 GB.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from rpg_dist.decode.blocktopk import _key, _key_row
from rpg_dist.decode.topk import MIN_KEY

log = logging.getLogger(__name__)

# Entry flags. SAMPLED: new, and just taken as a new candidate; it still counts as new while other
# threads place their offers, and turns OLD once they are done (so no thread reads a flag that
# another is changing).
_OLD, _NEW, _SAMPLED = np.uint8(0), np.uint8(1), np.uint8(2)


@dataclass(frozen=True, kw_only=True)
class DescentParams:
    """Knobs of one descent (GraphConfig's descent_* fields)."""

    max_candidates: int = 32  # new (and old) candidates per item and iteration
    max_iters: int = 12
    delta: float = 0.001  # stop when fewer than delta x N x K entries changed
    init_per_digit: int = 4  # shared-token items sampled per digit for the starting lists
    join_block: int = 4096  # items whose local joins are offered together


@dataclass
class DescentResult:
    neighbors: np.ndarray  # (N, K) int32 rows, best first, -1 padded
    iterations: list[dict]  # per iteration: changed entries, seconds


def descent_neighbors(tables: torch.Tensor, codes: torch.Tensor, n_edges: int, params: DescentParams, seed: int,
                      threads: int) -> DescentResult:
    """The ``n_edges`` nearest items of every item, by neighbour descent.

    Args:
        tables: (m, V, V) symmetric digit cosine tables (similarity.digit_similarity_tables).
        codes: (N, m) item codes.
        n_edges: K, neighbours per item (at most N - 1 are found).
        params: candidate, iteration and block sizes.
        seed: seeds every sampled choice.
        threads: threads of the kernels.

    Returns:
        Lists ordered as ``exact_neighbors`` orders them (descending similarity, then ascending row).
    """
    n_items = codes.shape[0]
    k = min(n_edges, max(n_items - 1, 0))
    tab = np.ascontiguousarray(tables.numpy(), np.float32)
    cod = np.ascontiguousarray(codes.numpy().astype(np.uint8 if tables.shape[1] <= 256 else np.int16))
    keys = np.full((n_items, max(k, 1)), MIN_KEY, np.int64)  # (N, K) min-heaps of keys
    flags = np.zeros((n_items, max(k, 1)), np.uint8)
    pool = _Pool(threads)
    history = []
    if k == 0:
        return DescentResult(np.full((n_items, n_edges), -1, np.int32), history)
    clock = time.perf_counter()
    order, offsets = _token_blocks(cod, tab.shape[1])
    pool.map_rows(n_items, lambda lo, hi: _init_lists(tab, cod, order, offsets, params.init_per_digit, seed,
                                                      keys, flags, lo, hi))
    del order, offsets
    history.append({"iteration": 0, "changed": int(n_items * k), "seconds": time.perf_counter() - clock})
    for iteration in range(1, params.max_iters + 1):
        clock = time.perf_counter()
        new, old = _candidates(keys, flags, params.max_candidates, seed, iteration, pool)
        changed = _join_all(tab, cod, new, old, keys, flags, params.join_block, pool)
        del new, old
        history.append({"iteration": iteration, "changed": changed, "seconds": time.perf_counter() - clock})
        log.info("graph descent: iteration %d, %d list entries changed (%.4f of N x K), %.1f s", iteration, changed,
                 changed / (n_items * k), history[-1]["seconds"])
        if changed <= params.delta * n_items * k:
            break
    neighbors = np.full((n_items, n_edges), -1, np.int32)
    pool.map_rows(n_items, lambda lo, hi: _sorted_rows(keys, neighbors, lo, hi))
    return DescentResult(neighbors, history)


class _Pool:
    """Row ranges on a thread pool; the kernels release the GIL."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)

    def map_rows(self, n_rows: int, fn) -> list:
        bounds = np.linspace(0, n_rows, self.threads + 1).astype(np.int64).tolist()
        if self.threads == 1:
            return [fn(0, n_rows)]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(lambda i: fn(bounds[i], bounds[i + 1]), range(self.threads)))


def _token_blocks(codes: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(m, N) int32 rows sorted by their token at each digit, and (m, V + 1) block offsets."""
    n_digit = codes.shape[1]
    order = np.empty((n_digit, codes.shape[0]), np.int32)
    offsets = np.empty((n_digit, vocab + 1), np.int64)
    for digit in range(n_digit):
        column = codes[:, digit]
        order[digit] = np.argsort(column, kind="stable")
        offsets[digit] = np.concatenate([[0], np.cumsum(np.bincount(column, minlength=vocab))])
    return order, offsets


def _candidates(keys, flags, max_candidates: int, seed: int, iteration: int, pool: _Pool):
    """(N, C) int32 new and old candidates of every item, -1 padded (step 1 of the module docstring)."""
    n_items = keys.shape[0]
    offered = np.zeros((2, n_items), np.int32)  # [old, new] offers per item
    pool.map_rows(n_items, lambda lo, hi: _count_offers(keys, flags, offered, lo, hi))
    cands = np.full((2, n_items, max_candidates), -1, np.int32)
    filled = np.zeros((2, n_items), np.int32)
    pool.map_rows(n_items, lambda lo, hi: _place_offers(keys, flags, offered, cands, filled, seed, iteration, lo, hi))
    pool.map_rows(n_items, lambda lo, hi: _retire_sampled(flags, lo, hi))
    return cands[1], cands[0]


def _join_all(tables, codes, new, old, keys, flags, block: int, pool: _Pool) -> int:
    """Local joins of every item, block by block; returns the list entries changed."""
    n_items, n_cand = new.shape
    worst = np.ascontiguousarray(keys[:, 0])  # (N,) each list's root
    cap = 2 * (n_cand * (n_cand - 1) // 2 + n_cand * n_cand)  # offers of one item's join, at most
    block = min(block, n_items)
    targets = np.empty((block, cap), np.int32)
    offer_keys = np.empty((block, cap), np.int64)
    counts = np.zeros(block, np.int64)
    changed = 0
    for lo in range(0, n_items, block):
        hi = min(lo + block, n_items)
        pool.map_rows(hi - lo, lambda a, b: _join(tables, codes, new, old, worst, lo + a, lo + b, lo, targets,
                                                  offer_keys, counts))
        changed += sum(pool.map_rows(n_items, lambda a, b: _apply(keys, flags, worst, targets, offer_keys, counts,
                                                                  hi - lo, a, b)))
    return changed


# ---- kernels --------------------------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@njit(inline="always")
def _mix(x):
    """splitmix64's finaliser: a well-spread uint64 of a uint64."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@njit(inline="always")
def _hash(seed, a, b, c):
    return _mix(_mix(_mix(np.uint64(seed) ^ np.uint64(a)) ^ np.uint64(b)) ^ np.uint64(c))


@njit(inline="always")
def _pair_sum(tables, codes, p, q):
    """S(p, q) = sum_k T_k[p_k, q_k], digits in order in float32 (as similarity.block_sums).

    Call it with p fixed over many q: p's m table rows (m KB) then stay in L1, where a lookup at a
    random (row, column) of the 8 MB of tables would miss to L3 (~50 ns a pair against ~5).
    """
    total = np.float32(0.0)
    for digit in range(codes.shape[1]):
        total += tables[digit, codes[p, digit], codes[q, digit]]
    return total


@njit(inline="always")
def _push(heap, heap_flags, key):
    """Offer ``key`` to a min-heap of keys (root = worst); returns 1 when it entered (flagged new)."""
    if key <= heap[0]:
        return 0
    # The same item is already kept (an item's key to a given row never changes). No early exit:
    # the loop compiles to vector compares, ~8x faster than a branch per entry.
    seen = False
    for i in range(len(heap)):
        seen |= heap[i] == key
    if seen:
        return 0
    n, i = len(heap), 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= key:
            break
        heap[i], heap_flags[i] = heap[child], heap_flags[child]
        i = child
    heap[i], heap_flags[i] = key, _NEW
    return 1


@njit(nogil=True, cache=True, boundscheck=False)
def _init_lists(tables, codes, order, offsets, per_digit, seed, keys, flags, lo, hi):
    n_items, n_digit = codes.shape
    for a in range(lo, hi):
        heap, heap_flags = keys[a], flags[a]
        for digit in range(n_digit):
            start = offsets[digit, codes[a, digit]]
            size = offsets[digit, codes[a, digit] + 1] - start
            for j in range(per_digit if size > 1 else 0):
                c = order[digit, start + np.int64(_hash(seed, a, digit, j) % np.uint64(size))]
                if c != a:
                    _push(heap, heap_flags, _key(_pair_sum(tables, codes, a, c), c))
        for j in range(2 * heap.shape[0]):
            c = np.int64(_hash(seed, a, n_digit, j) % np.uint64(n_items))
            if c != a:
                _push(heap, heap_flags, _key(_pair_sum(tables, codes, a, c), c))


@njit(nogil=True, cache=True, boundscheck=False)
def _count_offers(keys, flags, offered, lo, hi):
    # Every entry (i -> j) offers j to i (forward) and i to j (reverse); this thread counts the
    # offers to items in [lo, hi), so no two threads write one counter.
    n_items, k = keys.shape
    for i in range(n_items):
        for s in range(k):
            if keys[i, s] == MIN_KEY:
                continue
            f = min(flags[i, s], _NEW)
            j = _key_row(keys[i, s])
            if lo <= i < hi:
                offered[f, i] += 1
            if lo <= j < hi:
                offered[f, j] += 1


@njit(inline="always")
def _accept(seed, iteration, x, y, n_offered, n_cand):
    # Probability n_cand / n_offered, from a hash of (x, y): the same draw whatever the thread.
    if n_offered <= n_cand:
        return True
    draw = _hash(seed, iteration, x, y) >> np.uint64(32)
    return draw * np.uint64(n_offered) < np.uint64(n_cand) << np.uint64(32)


@njit(inline="always")
def _add_once(row, n, item):
    """Append ``item`` to ``row[:n]`` unless there (mutual neighbours offer each other twice:
    forward and reverse); returns 1 when appended."""
    seen = False
    for i in range(n):
        seen |= row[i] == item
    if seen:
        return 0
    row[n] = item
    return 1


@njit(nogil=True, cache=True, boundscheck=False)
def _place_offers(keys, flags, offered, cands, filled, seed, iteration, lo, hi):
    n_items, k = keys.shape
    n_cand = cands.shape[2]
    for i in range(n_items):
        for s in range(k):
            if keys[i, s] == MIN_KEY:
                continue
            f = min(flags[i, s], _NEW)
            j = _key_row(keys[i, s])
            if lo <= i < hi and filled[f, i] < n_cand and _accept(seed, iteration, i, j, offered[f, i], n_cand):
                filled[f, i] += _add_once(cands[f, i], filled[f, i], j)
                if f == _NEW:
                    flags[i, s] = _SAMPLED  # joined as new once: old from the next iteration
            if lo <= j < hi and filled[f, j] < n_cand and _accept(seed, iteration, j, i, offered[f, j], n_cand):
                filled[f, j] += _add_once(cands[f, j], filled[f, j], i)


@njit(nogil=True, cache=True, boundscheck=False)
def _retire_sampled(flags, lo, hi):
    for i in range(lo, hi):
        for s in range(flags.shape[1]):
            if flags[i, s] == _SAMPLED:
                flags[i, s] = _OLD


@njit(inline="always")
def _append_old(members, n_new, old_row):
    """members[n_new:] := the old candidates not already among the new ones; returns the count."""
    n_all = n_new
    for j in range(len(old_row)):
        item = old_row[j]
        if item < 0:
            break
        seen = False
        for i in range(n_new):
            seen |= members[i] == item
        if not seen:
            members[n_all] = item
            n_all += 1
    return n_all


@njit(nogil=True, cache=True, boundscheck=False)
def _join(tables, codes, new, old, worst, lo, hi, base, targets, offer_keys, counts):
    # Offers only where they beat the target's current worst (read, not written, in this phase).
    # The join's members (<= 2C rows), their codes and worst keys are gathered first: the pair loop
    # then touches only them and the tables, never the (N, K) lists (a cache miss per pair). For
    # each p the sums with all later members run digit by digit, one accumulator per member: every
    # pair still adds its digits in order (bit-identical S), but the adds of different pairs
    # overlap instead of waiting on one chain of m float adds (~4x faster).
    n_cand, n_digit = new.shape[1], codes.shape[1]
    members = np.empty(2 * n_cand, np.int64)
    member_codes = np.empty((n_digit, 2 * n_cand), codes.dtype)  # digit-major: the inner loop's reads
    member_worst = np.empty(2 * n_cand, np.int64)
    sums = np.empty(2 * n_cand, np.float32)
    for y in range(lo, hi):
        n_new = 0
        while n_new < n_cand and new[y, n_new] >= 0:
            members[n_new] = new[y, n_new]
            n_new += 1
        n_all = _append_old(members, n_new, old[y])
        for i in range(n_all):
            member_worst[i] = worst[members[i]]
            for digit in range(n_digit):
                member_codes[digit, i] = codes[members[i], digit]
        out, n = y - base, 0
        for i in range(n_new):
            p = members[i]
            sums[i + 1 : n_all] = 0.0
            for digit in range(n_digit):
                row = tables[digit, member_codes[digit, i]]  # (V,) T_k[p_k, :]
                for j in range(i + 1, n_all):
                    sums[j] += row[member_codes[digit, j]]
            for j in range(i + 1, n_all):
                q = members[j]
                if q == p:
                    continue
                key = _key(sums[j], q)
                if key > member_worst[i]:
                    targets[out, n], offer_keys[out, n] = p, key
                    n += 1
                key = _key(sums[j], p)
                if key > member_worst[j]:
                    targets[out, n], offer_keys[out, n] = q, key
                    n += 1
        counts[out] = n


@njit(nogil=True, cache=True, boundscheck=False)
def _apply(keys, flags, worst, targets, offer_keys, counts, n_joined, lo, hi):
    # Each thread owns the lists of [lo, hi) and applies their offers in join order.
    changed = 0
    for y in range(n_joined):
        for n in range(counts[y]):
            p = targets[y, n]
            if lo <= p < hi and _push(keys[p], flags[p], offer_keys[y, n]):
                changed += 1
                worst[p] = keys[p, 0]
    return changed


@njit(nogil=True, cache=True, boundscheck=False)
def _sorted_rows(keys, neighbors, lo, hi):
    k = keys.shape[1]
    for a in range(lo, hi):
        row = np.sort(keys[a])  # ascending: best last
        for s in range(min(k, neighbors.shape[1])):
            key = row[k - 1 - s]
            neighbors[a, s] = -1 if key == MIN_KEY else _key_row(key)
