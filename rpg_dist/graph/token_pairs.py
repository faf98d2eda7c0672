"""Approximate kNN for large catalogues: every pair of items sharing at least r tokens, scored once.

Why: on real codes an item's nearest items are spread over the catalogue but share tokens with it,
and the more items there are, the more tokens its nearest ones share. On a realistic 1M-item
catalogue the 100 nearest share a median of 8 (first) to 3 (hundredth) of the item's 32 tokens;
98.9 % share at least 3, while a random item shares 3 with probability C(32, 3) / 256^3 (~300
items of the million). Token blocks (token_blocks.py) score every pair sharing one token, about
N^2 / 8 pairs; here only the pairs sharing ``r`` tokens are scored, ~N^2 C(m, r) / V^r.

Visiting them: for each tuple of w digits (w = 2, or 3 when r >= 3 and the catalogue is large:
``bucket_width``), items are bucketed by their tokens there (a counting sort on one V^w key). Inside a bucket every pair is compared token by
token (four 64-bit words per 32 digits, no table lookups: ~12 ns a pair), and scored exactly
(``similarity``'s float32 sum, digits in order) only when it shares at least ``r`` digits and the
bucket's digits are its w lowest shared ones, so each pair is scored once whatever the number of
buckets it meets in. The score is offered to both items' running top-k lists. Neighbour order and
ties are exact mode's; the items missed are exactly those sharing fewer than ``r`` tokens with the
item. For uniform tokens buckets of 3 digits hold N / 2^24 items (0.6 at 10M, against 150 for 2
digits), so the pairs compared are about those sharing 3 tokens rather than 2, for 4,960 counting
sorts instead of 496; real catalogues are clustered and their buckets larger (BENCHMARKS.md).

``r`` comes from the data: the builder computes exact lists for its recall sample first and takes
the largest ``r`` whose pairs hold ``target_recall`` of those lists' entries (``choose_shared``).

Determinism and threads: buckets are cut into chunks; inside a chunk the threads score disjoint
buckets into per-bucket slots, then each thread applies the offers to the lists of its own rows,
in bucket order. The lists do not depend on the number of threads.

Memory: the (N, k) int64 lists (8 bytes per edge: 8 GB at 10M items x 100 edges), one bucket order
(N int32) and one chunk of offers. The lists live in this process: unlike token blocks this build
is neither spread over Ray actors nor streamed.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from rpg_dist.decode.blocktopk import _key, _key_row
from rpg_dist.decode.topk import MIN_KEY

log = logging.getLogger(__name__)

# Pairs visited per chunk; offers are held for one chunk (at most 2 per scored pair, 12 bytes each).
CHUNK_PAIRS = 1 << 22


def sharing_fraction(codes: np.ndarray, rows: np.ndarray, lists: np.ndarray, min_shared: int) -> float:
    """Share of the entries of ``lists`` (the neighbours of ``rows``, -1 padded) that have at least
    ``min_shared`` tokens in common with their row: the recall token pairs can reach on them."""
    valid = lists >= 0
    shared = (codes[np.where(valid, lists, 0)] == codes[rows][:, None, :]).sum(axis=2)  # (S, k)
    return float((shared[valid] >= min_shared).mean()) if valid.any() else 1.0


def choose_shared(codes: np.ndarray, rows: np.ndarray, exact_lists: np.ndarray, target_recall: float) -> int:
    """The largest r whose pairs (sharing >= r tokens) hold ``target_recall`` of the exact lists'
    entries of ``rows``; 0 when even r = 2 holds fewer (the catalogue is too sparse for this method)."""
    best = 0
    for r in range(2, codes.shape[1] + 1):
        if sharing_fraction(codes, rows, exact_lists, r) < target_recall:
            break
        best = r
    return best


def token_pair_neighbors(tables: torch.Tensor, codes: torch.Tensor, n_edges: int, min_shared: int, threads: int,
                         chunk_pairs: int = CHUNK_PAIRS, width: int | None = None) -> tuple[np.ndarray, dict]:
    """The best ``n_edges`` items of every item among those sharing ``min_shared`` tokens with it.

    Args:
        tables: (m, V, V) symmetric digit cosine tables (``similarity.digit_similarity_tables``).
        codes: (N, m) item codes.
        n_edges: neighbours per item.
        min_shared: r >= 2, tokens a pair must share to be scored.
        threads: threads of the kernels.
        chunk_pairs: pairs visited between two rounds of list updates (bounds the offer buffer).
        width: digits per bucket key (2, or 3 when min_shared >= 3); default ``bucket_width``.

    Returns:
        (N, n_edges) int32 rows, best first, -1 padded (where fewer items share r tokens); and
        counts: pairs visited, pairs scored, offers made, list entries changed, bucket width.
    """
    n_items, n_digit = codes.shape
    vocab = tables.shape[1]
    if min_shared < 2 or vocab > 256 or n_digit > 64:
        raise ValueError(f"token pairs need r >= 2 (got {min_shared}), one-byte tokens (V <= 256, got {vocab}) "
                         f"and at most 64 digits (got {n_digit})")
    tab = np.ascontiguousarray(tables.numpy(), np.float32).reshape(-1)  # flat: (k * V + a) * V + b
    cod = np.ascontiguousarray(codes.numpy().astype(np.uint8))
    words = _token_words(cod)  # (N, W) uint64: 8 tokens per word, compared bytewise
    heaps = np.full((n_items, max(n_edges, 1)), MIN_KEY, np.int64)  # (N, k) min-heaps: root = worst
    worst = np.full(n_items, MIN_KEY, np.int64)  # (N,) each heap's root, read while scoring
    width = width or bucket_width(n_items, n_digit, min_shared)
    if not 2 <= width <= min(3, min_shared):
        raise ValueError(f"width={width}: buckets of 2 digits, or 3 when pairs share 3 or more")
    totals = {"visited": 0, "scored": 0, "offers": 0, "changed": 0, "width": width}
    with _Pool(threads) as pool:
        neighbors = _build(tab, vocab, cod, words, heaps, worst, width, min_shared, chunk_pairs, pool, totals)
    return neighbors, totals


def _build(tab, vocab, cod, words, heaps, worst, width, min_shared, chunk_pairs, pool, totals) -> np.ndarray:
    """Every tuple of ``width`` digits in turn, then the lists sorted best first."""
    n_items, n_digit = cod.shape
    clock = time.perf_counter()
    tuples = list(itertools.combinations(range(n_digit), width))
    log.info("graph token pairs: %d items, r %d, buckets of %d digits (%d tuples), %d threads", n_items, min_shared,
             width, len(tuples), pool.threads)
    for done, digits in enumerate(tuples, 1):
        order, begins, sizes = _buckets(cod, digits)
        for lo, hi in _chunks(sizes, chunk_pairs):
            _visit_chunk(tab, vocab, cod, words, order, begins[lo:hi], sizes[lo:hi], digits, min_shared, heaps, worst,
                         pool, totals)
        if done * 10 // len(tuples) > (done - 1) * 10 // len(tuples):
            log.info("graph token pairs: %d/%d digit %s, %d pairs visited, %d scored, %.0f s", done, len(tuples),
                     "triples" if width == 3 else "pairs", totals["visited"], totals["scored"],
                     time.perf_counter() - clock)
    neighbors = np.full(heaps.shape, -1, np.int32)
    pool.map_rows(n_items, lambda lo, hi: _sorted_rows(heaps, neighbors, lo, hi))
    return neighbors


def bucket_width(n_items: int, n_digit: int, min_shared: int) -> int:
    """Digits per bucket key, 2 or 3 (at most r), whichever costs less by a rough model of this CPU:
    per tuple of w digits, a counting sort over V^w keys (~3 ns a key) and N items (~10 ns an item),
    then the pairs of its buckets, N^2 / (2 V^w) for uniform tokens, compared at ~12 ns. At 32 digits
    3 wins from ~3M items (1M: 2 digits ~50 s, 3 digits ~300 s; 10M: ~4,500 s against ~900 s)."""
    def cost(width: int) -> float:
        keys = 256.0**width
        return math.comb(n_digit, width) * (3 * keys + 10 * n_items + 12 * n_items**2 / (2 * keys))

    return 3 if min_shared >= 3 and cost(3) < cost(2) else 2


class _Pool:
    """Row ranges on a thread pool; the kernels release the GIL."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.executor = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown()

    def map_rows(self, n_rows: int, fn) -> list:
        """``fn(lo, hi)`` over ``threads`` equal row ranges."""
        return self.map_ranges(np.linspace(0, n_rows, self.threads + 1).astype(np.int64).tolist(), fn)

    def map_ranges(self, bounds: list[int], fn) -> list:
        """``fn(bounds[i], bounds[i + 1])`` for each i, one per thread."""
        if self.executor is None:
            return [fn(bounds[0], bounds[-1])]
        return list(self.executor.map(lambda i: fn(bounds[i], bounds[i + 1]), range(len(bounds) - 1)))


def _token_words(codes: np.ndarray) -> np.ndarray:
    """(N, ceil(m / 8)) uint64: digit d's token is byte d % 8 of word d // 8 (zero padding beyond m)."""
    n_items, n_digit = codes.shape
    padded = np.zeros((n_items, -(-n_digit // 8) * 8), np.uint8)
    padded[:, :n_digit] = codes
    return padded.view(np.uint64).copy()


def _buckets(codes: np.ndarray, digits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items ordered by their tokens at ``digits`` (a stable counting sort over V^w keys: a comparison
    sort of 10M keys per tuple of digits would dominate), and the buckets holding >= 2 items:
    (N,) int32 order, (B,) int64 first positions, (B,) int64 sizes."""
    key = np.zeros(len(codes), np.int64)
    for digit in digits:
        key = (key << 8) | codes[:, digit]
    counts = np.bincount(key, minlength=1 << (8 * len(digits)))
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    order = np.empty(len(key), np.int32)
    _scatter(key, starts, order)
    shared = np.flatnonzero(counts >= 2)
    return order, starts[shared], counts[shared]


def _chunks(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive bucket ranges [lo, hi) of at most ``budget`` pairs each (a larger bucket alone)."""
    pairs = np.cumsum(sizes * (sizes - 1) // 2)
    bounds, lo = [], 0
    while lo < len(sizes):
        base = pairs[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(pairs, base + budget, side="right")), lo + 1)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _visit_chunk(tab, vocab, cod, words, order, begins, sizes, digits, min_shared, heaps, worst, pool: _Pool,
                 totals) -> None:
    """Visit every pair of the chunk's buckets, then apply the offers to the lists (two phases)."""
    slots = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes * (sizes - 1), out=slots[1:])  # two offers per pair at most
    if slots[-1] == 0:
        return
    targets = np.empty(slots[-1], np.int32)
    keys = np.empty(slots[-1], np.int64)
    counts = np.zeros(len(sizes), np.int64)
    # The bucket's digits must be the pair's lowest shared ones: all of them shared (true in the
    # bucket) and no other below the last.
    below = (1 << digits[-1]) - 1
    required = sum(1 << d for d in digits[:-1])
    scored = pool.map_ranges(_balanced(slots, pool.threads), lambda lo, hi: _visit_buckets(
        tab, vocab, cod, words, order, begins, sizes, slots, np.uint64(below), np.uint64(required), min_shared,
        worst, targets, keys, counts, lo, hi))
    totals["visited"] += int(slots[-1] // 2)
    totals["scored"] += sum(scored)
    totals["offers"] += int(counts.sum())
    totals["changed"] += sum(pool.map_rows(len(worst), lambda lo, hi: _apply(heaps, worst, targets, keys, slots,
                                                                             counts, lo, hi)))


def _balanced(slots: np.ndarray, parts: int) -> list[int]:
    """Bucket boundaries splitting the chunk's pairs into ``parts`` nearly equal shares."""
    cuts = np.searchsorted(slots, np.linspace(0, slots[-1], parts + 1)[1:-1])
    return [0, *np.minimum(cuts, len(slots) - 1).tolist(), len(slots) - 1]


# ---- kernels --------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, boundscheck=False)
def _scatter(key, starts, order):
    """order[starts[key[i]] + (earlier items with that key)] = i: a stable counting sort."""
    fill = starts[:-1].copy()
    for i in range(len(key)):
        order[fill[key[i]]] = i
        fill[key[i]] += 1

_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_GATHER = np.uint64(0x0102040810204080)  # moves bit 8j of each byte j to bit 56 + j


@njit(inline="always")
def _equal_bytes(a, b):
    """8-bit mask of the bytes of two uint64 words that are equal (bit j: byte j)."""
    x = a ^ b
    nonzero = ((x & _LOW7) + _LOW7) | x  # high bit of each byte set where the byte is not zero
    zero = ~nonzero & _HIGH
    return ((zero >> np.uint64(7)) * _GATHER) >> np.uint64(56)


@njit(inline="always")
def _shared_mask(words, p, q):
    """Bit d set where items p and q have the same token at digit d."""
    mask = np.uint64(0)
    for w in range(words.shape[1]):
        mask |= _equal_bytes(words[p, w], words[q, w]) << np.uint64(8 * w)
    return mask


_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_BYTES = np.uint64(0x0101010101010101)


@njit(inline="always")
def _popcount(x):
    """Set bits of a uint64, branch-free (a loop per bit mispredicts on every pair)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _BYTES) >> np.uint64(56))


@njit(nogil=True, cache=True, boundscheck=False)
def _visit_buckets(tables, vocab, codes, words, order, begins, sizes, slots, below, required, min_shared, worst,
                   targets, keys, counts, lo, hi):
    # A pair is scored here only if the bucket's digits are its lowest shared ones (``required`` and
    # ``below``: no other shared digit under the bucket's last), so each pair is scored in exactly
    # one bucket. Padding bytes beyond m are equal in every word: masked out. Members' words are
    # gathered first so that the comparisons read a few KB, not N rows; a pair that passes costs m
    # lookups at random places of the 8 MB of tables (~100-300 ns here), a comparison ~12 ns.
    n_digit, n_words = codes.shape[1], words.shape[1]
    digits = (np.uint64(1) << np.uint64(n_digit)) - np.uint64(1) if n_digit < 64 else ~np.uint64(0)
    cap = 0
    for b in range(lo, hi):
        cap = max(cap, sizes[b])
    member_words = np.empty((cap, n_words), np.uint64)
    passes = np.empty(cap, np.int64)
    base = np.empty(n_digit, np.int64)
    scored = 0
    for b in range(lo, hi):
        begin, size = begins[b], sizes[b]
        out, n = slots[b], 0
        for i in range(size):
            for w in range(n_words):
                member_words[i, w] = words[order[begin + i], w]
        for i in range(size - 1):
            n_pass = 0  # the comparisons alone first (a tight loop), then the few pairs that pass
            for j in range(i + 1, size):
                mask = _shared_mask(member_words, i, j) & digits
                passes[n_pass] = j
                n_pass += (mask & below) == required and _popcount(mask) >= min_shared
            if n_pass == 0:
                continue
            p = np.int64(order[begin + i])
            for digit in range(n_digit):  # row T_k[p_k, :] of each digit in the flat tables
                base[digit] = (digit * vocab + np.int64(codes[p, digit])) * vocab
            for t in range(n_pass):
                q = np.int64(order[begin + passes[t]])
                total = np.float32(0.0)
                for digit in range(n_digit):  # digits in order: exact mode's float32 sum
                    total += tables[base[digit] + np.int64(codes[q, digit])]
                key = _key(total, q)
                if key > worst[p]:
                    targets[out + n], keys[out + n] = p, key
                    n += 1
                key = _key(total, p)
                if key > worst[q]:
                    targets[out + n], keys[out + n] = q, key
                    n += 1
            scored += n_pass
        counts[b] = n
    return scored


@njit(inline="always")
def _push(heap, key):
    """Offer ``key`` to a min-heap of keys (root = worst); returns 1 when it entered."""
    if key <= heap[0]:
        return 0
    # Already kept (an item's key to a given row never changes)? No early exit: vector compares.
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
        heap[i] = heap[child]
        i = child
    heap[i] = key
    return 1


@njit(nogil=True, cache=True, boundscheck=False)
def _apply(heaps, worst, targets, keys, slots, counts, lo, hi):
    # Each thread owns the lists of rows [lo, hi) and applies their offers in bucket order.
    changed = 0
    for b in range(len(counts)):
        for n in range(slots[b], slots[b] + counts[b]):
            p = targets[n]
            if lo <= p < hi and _push(heaps[p], keys[n]):
                changed += 1
                worst[p] = heaps[p, 0]
    return changed


@njit(nogil=True, cache=True, boundscheck=False)
def _sorted_rows(heaps, neighbors, lo, hi):
    k = heaps.shape[1]
    for a in range(lo, hi):
        row = np.sort(heaps[a])  # ascending: best last
        for s in range(min(k, neighbors.shape[1])):
            key = row[k - 1 - s]
            neighbors[a, s] = -1 if key == MIN_KEY else _key_row(key)
