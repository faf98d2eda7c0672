"""Approximate kNN for large catalogues: every pair of items sharing at least r tokens, scored once.

Why: on real codes an item's nearest items are spread over the catalogue but share tokens with it,
and the more items there are, the more tokens its nearest ones share. On a realistic 1M-item
catalogue the 100 nearest share a median of 8 (first) to 3 (hundredth) of the item's 32 tokens;
98.9 % share at least 3, while a random item shares 3 with probability C(32, 3) / 256^3 (~300
items of the million). Token blocks (token_blocks.py) score every pair sharing one token, about
N^2 / 8 pairs; here only the pairs sharing ``r`` tokens are scored, ~N^2 C(m, r) / V^r.

Visiting them: for each tuple of w digits (w = 2, or 3 when r >= 3 and the catalogue is large:
``bucket_width``) the items are bucketed by their tokens there: per digit pair a counting sort over
2^16 keys copies the codes into pair order, and each pair bucket, in cache, is split by every third
digit in turn. Inside a bucket every pair is compared token by token (four 64-bit words per 32
digits, no table lookups, vectorised over a member's later members: ~2 ns a pair in large buckets),
and scored exactly (``similarity``'s float32 sum, digits in order) only when it shares at least
``r`` digits and the bucket's digits are its w lowest shared ones, so each pair is scored once
whatever the number of buckets it meets in. The score is offered to both items' running top-k
lists. Neighbour order and ties are exact mode's; the items missed are exactly those sharing fewer
than ``r`` tokens with the item. A pair sharing s tokens is compared in C(s, w) buckets: on
clustered catalogues most comparisons are of near-duplicates, ~2.7e11 at 10M realistic items
(BENCHMARKS.md), while the pairs scored are those sharing r tokens.

``r`` comes from the data: the builder computes exact lists for its recall sample first and takes
the largest ``r`` whose pairs hold ``target_recall`` of those lists' entries (``choose_shared``).

Determinism and threads: the threads visit disjoint pair buckets and append their offers to their
own stretch of one buffer; when a stretch could overflow, each thread applies the round's offers to
the lists of its own rows. A list keeps the best distinct keys offered to it, whatever their order,
so the lists do not depend on the number of threads or rounds.

Memory: the (N, k) int64 lists (8 bytes per edge: 8 GB at 10M items x 100 edges, handed back block
by block as the (N, k) int32 result is written: 14.2 GiB peak for the 10M build), one pair-sorted
copy of the codes (N x 32 bytes) and the offer buffer (12 bytes an offer, at least the largest pair
bucket's s (s - 1) per thread). The lists live in the building process; a streamed build splits
the rows into shares (``PairShare``, one per Ray actor) that keep only their own rows' lists and run
in lockstep, digit pair by digit pair (``lockstep``). Every share sorts the whole catalogue's codes
per digit pair; a pair is compared and scored by one share only, the owner of its end that comes
first in the pair order, and the offer to the other end travels to that end's share with the next
digit pair (filtered by the roots that share last reported). So the shares compare and score the
single-process build's pairs between them, once each, and end with its lists.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from rpg_dist.decode.blocktopk import _key, _key_row
from rpg_dist.decode.topk import MIN_KEY

log = logging.getLogger(__name__)

# Pairs per round and thread: offers (at most 2 per pair, 12 bytes each) are buffered for one round.
CHUNK_PAIRS = 1 << 22
# Digit pairs a share of a streamed build may run ahead of the others (``lockstep``).
LOCKSTEP_LAG = 4


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
        chunk_pairs: pairs a thread visits between two rounds of list updates (bounds the offer buffer).
        width: digits per bucket key (2, or 3 when min_shared >= 3); default ``bucket_width``.

    Returns:
        (N, n_edges) int32 rows, best first, -1 padded (where fewer items share r tokens); and
        counts: pairs visited, pairs scored, offers made, list entries changed, bucket width, and the
        seconds spent sorting items by digit pairs and visiting their buckets.
    """
    (_, neighbors, counts), = token_pair_shares(tables, codes, n_edges, min_shared, threads, None, chunk_pairs, width)
    return neighbors, counts


def token_pair_shares(tables: torch.Tensor, codes: torch.Tensor, n_edges: int, min_shared: int, threads: int,
                      owner: np.ndarray | None = None, chunk_pairs: int = CHUNK_PAIRS,
                      width: int | None = None, lag: int = LOCKSTEP_LAG) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """``token_pair_neighbors`` as shares of the rows (``owner``: (N,) share of each row; default one
    share of all), run in this process in ``lockstep`` the way a streamed build's actors run them.
    Returns each share's (sorted rows, their lists, its counts)."""
    n_shares = 1 if owner is None else int(owner.max()) + 1
    shares = [new_share(tables, codes, n_edges, min_shared, threads, owner, s, chunk_pairs, width)
              for s in range(n_shares)]
    try:
        return lockstep(n_shares, shares[0].digit_pairs,
                        lambda s, first, second, inbox: shares[s].step(first, second, inbox),
                        lambda s, inbox: shares[s].finish(inbox), lag)
    finally:
        for share in shares:
            share.pool.close()


def lockstep(n_shares: int, digit_pairs: list[tuple[int, int]], step, finish, lag: int = LOCKSTEP_LAG) -> list:
    """Drive shares digit pair by digit pair. ``step(s, first, second, inbox)`` returns share s's
    (roots of its rows, outbox to share 0, ..., outbox to share n - 1); share s's inbox at a pair is
    the others' outputs of ``lag`` pairs before (roots o, outbox o -> s for each other share o in
    order), and ``finish(s, inbox)`` takes those of the last ``lag`` pairs, oldest first. Works on
    values, or on Ray object refs: a step then runs once its inputs exist, so a share runs up to
    ``lag`` pairs ahead of the others (what one pair costs differs between shares)."""
    pending: collections.deque = collections.deque()  # outputs not taken yet, oldest first
    for first, second in digit_pairs:
        taken = pending.popleft() if len(pending) == lag else None
        pending.append([step(s, first, second, _inbox(taken, s)) for s in range(n_shares)])
    return [finish(s, [x for outputs in pending for x in _inbox(outputs, s)]) for s in range(n_shares)]


def _inbox(last: list | None, share: int) -> list:
    if last is None:
        return []
    return [x for other, out in enumerate(last) if other != share for x in (out[0], out[1 + share])]


def digit_pairs(n_digit: int, width: int) -> list[tuple[int, int]]:
    """The digit pairs a build sorts by, in order (with buckets of 3 digits, those with a later digit)."""
    return [(a, b) for a, b in itertools.combinations(range(n_digit), 2) if width == 2 or b < n_digit - 1]


@dataclass
class PairShare:
    """One share of a token-pairs build: the lists of its rows, filled digit pair by digit pair.

    Shares split the pairs: a pair is compared and scored by the share owning the end that comes first
    in the digit pair's order (the same order in every share), which offers the score to both ends.
    An offer to another share's row leaves in ``step``'s outbox when it beats the root that share last
    reported; roots only rise, so a stale root never drops an offer the list would take, and each
    list ends as the best distinct keys offered to it: the single-share lists, whatever the shares.
    """

    tab: np.ndarray  # (m V V,) float32 tables, flat: (k * V + a) * V + b
    vocab: int
    cod: np.ndarray  # (N, 8W) uint8 padded codes (``_padded_codes``)
    n_digit: int
    min_shared: int
    chunk_pairs: int
    digit_pairs: list[tuple[int, int]]
    width: int
    owner: np.ndarray  # (N,) int32 share of each row
    share: int
    share_rows: list[np.ndarray]  # sorted rows of each share
    heaps: _Lists  # (L, k) heaps of this share's rows
    roots: np.ndarray  # (L,) int64 this share's list roots (the worst key each list holds)
    others_roots: np.ndarray  # (N,) int64 other shares' rows' roots as last reported (empty: one share)
    # (N,) int32 list of each row, -(row + 1) for rows of other shares: offers carry it, so applying
    # one never looks a row's list up (at 10M items a random read of an 80 MB map per offer).
    slot: np.ndarray
    pool: _Pool
    totals: dict
    tuples_done: int = 0

    @property
    def rows(self) -> np.ndarray:
        return self.share_rows[self.share]

    def run_pair(self, first: int, second: int, outgoing: list | None = None) -> int:
        """Sort by one digit pair and visit its buckets; offers to other shares' rows are appended to
        ``outgoing`` as (targets, keys). Returns the tuples run."""
        before = self.tuples_done
        self.tuples_done += _run_pair(self, first, second, outgoing)
        n_tuples = math.comb(self.n_digit, self.width)
        if self.tuples_done * 10 // n_tuples > before * 10 // n_tuples:
            log.info("graph token pairs (share %d): %d/%d digit %s, %d pairs visited, %d scored, %.0f s", self.share,
                     self.tuples_done, n_tuples, "triples" if self.width == 3 else "pairs", self.totals["visited"],
                     self.totals["scored"], self.totals["sort_s"] + self.totals["visit_s"])
        return self.tuples_done - before

    def step(self, first: int, second: int, inbox: list) -> tuple:
        """``lockstep``'s step: take the inbox, run the pair; returns (this share's roots, an outbox
        (int32 targets, int64 keys) per share)."""
        self.receive(inbox)
        outgoing: list = []
        self.run_pair(first, second, outgoing)
        return (self.roots.copy(), *self._outboxes(outgoing))

    def receive(self, inbox: list) -> None:
        """Other shares' roots and their offers to this share's rows (``lockstep``'s inbox)."""
        others = [o for o in range(len(self.share_rows)) if o != self.share]  # repeated per pair taken
        for other, roots, (targets, keys) in zip(itertools.cycle(others), inbox[0::2], inbox[1::2]):
            self.others_roots[self.share_rows[other]] = roots
            if len(targets):
                lists = self.slot[targets]  # offers name rows; applied to lists
                starts, ends = np.zeros(1, np.int64), np.array([len(targets)], np.int64)
                self.totals["changed"] += sum(self.pool.map_rows(len(self.roots), lambda lo, hi: _apply(
                    self.heaps.keys, self.roots, lists, keys, starts, ends, lo, hi)))
                self.totals["received"] += len(targets)

    def finish(self, inbox: list) -> tuple[np.ndarray, np.ndarray, dict]:
        """The last inbox taken; returns (rows, (L, k) int32 lists best first, -1 padded, counts)."""
        self.receive(inbox)
        neighbors = self.heaps.release_sorted(self.pool)
        self.pool.close()
        return self.rows, neighbors, self.totals

    def _outboxes(self, outgoing: list) -> list[tuple[np.ndarray, np.ndarray]]:
        targets = np.concatenate([t for t, _ in outgoing]) if outgoing else np.empty(0, np.int32)
        keys = np.concatenate([k for _, k in outgoing]) if outgoing else np.empty(0, np.int64)
        dest = self.owner[targets]
        order = np.argsort(dest, kind="stable")
        bounds = np.searchsorted(dest[order], np.arange(len(self.share_rows) + 1))
        self.totals["sent"] += len(targets)
        return [(targets[order[a:b]], keys[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def new_share(tables: torch.Tensor, codes: torch.Tensor, n_edges: int, min_shared: int, threads: int,
              owner: np.ndarray | None = None, share: int = 0, chunk_pairs: int = CHUNK_PAIRS,
              width: int | None = None) -> PairShare:
    """Share ``share`` of a build whose rows are split by ``owner`` ((N,) share of each row; default
    one share of all rows), empty lists. Arguments as ``token_pair_neighbors``."""
    n_items, n_digit = codes.shape
    vocab = tables.shape[1]
    if min_shared < 2 or vocab > 256 or n_digit > 64:
        raise ValueError(f"token pairs need r >= 2 (got {min_shared}), one-byte tokens (V <= 256, got {vocab}) "
                         f"and at most 64 digits (got {n_digit})")
    width = width or bucket_width(n_items, n_digit, min_shared)
    if not 2 <= width <= min(3, min_shared):
        raise ValueError(f"width={width}: buckets of 2 digits, or 3 when pairs share 3 or more")
    if owner is None:
        owner = np.zeros(n_items, np.int32)
    share_rows = [np.flatnonzero(owner == s) for s in range(int(owner.max(initial=0)) + 1)]
    rows = share_rows[share]
    log.info("graph token pairs: share %d of %d, %d of %d items, r %d, buckets of %d digits (%d tuples), %d threads",
             share, len(share_rows), len(rows), n_items, min_shared, width, math.comb(n_digit, width), max(threads, 1))
    slot = np.arange(n_items, dtype=np.int32)
    others_roots = np.empty(0, np.int64)
    if len(share_rows) > 1:
        slot = -slot - 1
        slot[rows] = np.arange(len(rows))
        others_roots = np.full(n_items, MIN_KEY, np.int64)
    return PairShare(tab=np.ascontiguousarray(tables.numpy(), np.float32).reshape(-1), vocab=vocab,
                     cod=_padded_codes(np.asarray(codes)), n_digit=n_digit, min_shared=min_shared,
                     chunk_pairs=chunk_pairs, digit_pairs=digit_pairs(n_digit, width), width=width,
                     owner=np.asarray(owner, np.int32), share=share, share_rows=share_rows,
                     heaps=_Lists(len(rows), max(n_edges, 1)), roots=np.full(len(rows), MIN_KEY, np.int64),
                     others_roots=others_roots, slot=slot, pool=_Pool(threads), totals=new_counts(width))


def new_counts(width: int) -> dict:
    """The kernel's counts, zero: pairs visited and scored, offers (of them sent to and received from
    other shares), list entries changed, seconds sorting and visiting (``_run_pair`` adds to them),
    and the bucket width."""
    return {"visited": 0, "scored": 0, "offers": 0, "sent": 0, "received": 0, "changed": 0, "width": width,
            "sort_s": 0.0, "visit_s": 0.0}


class _Lists:
    """The (N, k) int64 min-heaps of keys (root = worst) in anonymous memory, so that the pages of
    rows already turned into neighbour rows can be handed back: the heaps (8 GB at 10M x 100) and
    the (N, k) int32 result (4 GB) are never both whole."""

    def __init__(self, n_items: int, k: int) -> None:
        self.memory = mmap.mmap(-1, max(n_items * k * 8, 1))
        self.keys = np.frombuffer(self.memory, np.int64, n_items * k).reshape(n_items, k)
        self.keys.fill(MIN_KEY)

    def release_sorted(self, pool: _Pool, block_rows: int = 1 << 18) -> np.ndarray:
        """(N, k) int32 rows, best first, -1 padded; the heaps' memory is returned block by block."""
        n_items, k = self.keys.shape
        neighbors = np.empty((n_items, k), np.int32)
        released = 0
        for lo in range(0, n_items, block_rows):
            hi = min(lo + block_rows, n_items)
            bounds = np.linspace(lo, hi, pool.threads + 1).astype(np.int64).tolist()
            pool.map_ranges(bounds, lambda a, b: _sorted_rows(self.keys, neighbors, a, b))
            end = hi * k * 8 // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages of sorted rows only
            if end > released:
                self.memory.madvise(mmap.MADV_DONTNEED, released, end - released)
                released = end
        self.keys = None  # the mapping closes with its last view
        return neighbors


def _run_pair(share: PairShare, first: int, second: int, outgoing: list | None) -> int:
    """One digit pair: sort the items by its tokens, then visit its buckets (split by each later digit
    when the share's width is 3). Adds the sort's and the visit's seconds to the share's totals;
    returns the tuples run.

    Per digit pair the items are sorted by their two tokens (a counting sort over 2^16 keys) and their
    codes, roots and ownership copied in that order. A bucket of 3 digits is a subset of one pair
    bucket, so each pair bucket is taken once, in cache, and split by every third digit in turn:
    buckets never read rows at random (a random row costs ~100 ns here; at 10M items, gathering
    buckets' members that way cost more than comparing them, and a counting sort over a triple's 2^24
    keys 0.6 s per triple). The copied roots go stale while the pair runs: they only let through
    offers that the lists then reject.
    """
    clock = time.perf_counter()
    pairs = _PairOrder(*_pair_sort(share.cod, share.slot, share.roots, share.others_roots, first, second))
    thirds = np.arange(second + 1, share.n_digit) if share.width == 3 else np.array([-1])
    masks = np.stack([_digit_masks((first, second) if t < 0 else (first, second, int(t)), pairs.words.shape[1],
                                   share.n_digit) for t in thirds])  # (T, 3, W)
    sorted_at = time.perf_counter()
    _visit_pair(share, pairs, thirds, masks, outgoing)
    share.totals["sort_s"] += sorted_at - clock
    share.totals["visit_s"] += time.perf_counter() - sorted_at
    return len(thirds)


class _PairOrder:
    """The items sorted by their tokens at a digit pair, with copies of their codes, list roots and
    ownership in that order, and the pair buckets (runs of >= 2 items)."""

    def __init__(self, rows: np.ndarray, codes: np.ndarray, slots: np.ndarray, worst: np.ndarray,
                 begins: np.ndarray, sizes: np.ndarray) -> None:
        self.rows = rows  # (N,) int32 item rows in pair order
        self.codes = codes  # (N, 8W) uint8 their codes
        self.words = codes.view(np.uint64)  # (N, W) the same, 8 tokens per word
        self.slots = slots  # (N,) int32 their lists (negative: another share's row)
        self.worst = worst  # (N,) int64 their list roots when sorted
        self.begins, self.sizes = begins, sizes  # (P,) int64 the pair buckets


def bucket_width(n_items: int, n_digit: int, min_shared: int) -> int:
    """Digits per bucket key, 2 or 3 (at most r), whichever costs less by a rough model of this CPU
    for uniform tokens: per digit pair a sort that copies the codes (~40 ns an item), per third digit
    a split of every pair bucket (~9 ns an item), and the pairs of the buckets, N^2 / (2 V^w),
    compared at ~9 ns. At 32 digits 3 wins from ~1.5M items (1M: 2 digits ~54 s, 3 digits ~66 s;
    10M: ~3,400 s against ~380 s; clustered catalogues compare more pairs in either)."""
    def cost(width: int) -> float:
        pairs = math.comb(n_digit, 2) * 40 * n_items
        if width == 2:
            return pairs + math.comb(n_digit, 2) * 9 * n_items**2 / (2 * 256.0**2)
        return pairs + math.comb(n_digit, 3) * (9 * n_items + 9 * n_items**2 / (2 * 256.0**3))

    return 3 if min_shared >= 3 and cost(3) < cost(2) else 2


class _Pool:
    """Row ranges on a thread pool; the kernels release the GIL."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.executor = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def close(self) -> None:
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


def _padded_codes(codes: np.ndarray) -> np.ndarray:
    """(N, 32 ceil(m / 32)) uint8 codes, zero padded to groups of four 64-bit words (the comparison
    kernel's unit; digit d: byte d % 8 of word d // 8)."""
    n_items, n_digit = codes.shape
    padded = np.zeros((n_items, -(-n_digit // 32) * 32), np.uint8)
    padded[:, :n_digit] = codes
    return padded


def _visit_pair(share: PairShare, pairs: _PairOrder, thirds, masks, outgoing: list | None) -> None:
    """Visit every bucket of one digit pair (its pair buckets split by each third digit), in rounds:
    the threads visit disjoint pair buckets and append offers to their own stretch of one buffer until
    it could overflow, then each thread applies the round's offers to the lists of its own rows, and
    the offers to other shares' rows go to ``outgoing``."""
    pool, totals, sizes = share.pool, share.totals, pairs.sizes
    # One (pair bucket, third digit) must fit a stretch: all its members in one bucket offer s (s - 1).
    capacity = max(2 * share.chunk_pairs, int((sizes * (sizes - 1)).max(initial=0)))
    targets = np.empty(capacity * pool.threads, np.int32)
    keys = np.empty(capacity * pool.threads, np.int64)
    work = np.cumsum(sizes.astype(np.float64) ** 2)
    cuts = np.searchsorted(work, np.linspace(0, work[-1] if len(work) else 0, pool.threads + 1)[1:-1])
    bounds = [0, *cuts.tolist(), len(sizes)]
    state = [(bounds[t], 0) for t in range(pool.threads)]  # each thread's next (pair bucket, third)
    while any(state[t][0] < bounds[t + 1] for t in range(pool.threads)):
        results = pool.map_ranges(list(range(pool.threads + 1)), lambda t, _: _visit_segments(
            share.tab, share.vocab, share.n_digit, pairs.rows, pairs.codes, pairs.words, pairs.slots, pairs.worst,
            pairs.begins, sizes, thirds, masks, share.min_shared, targets, keys, t * capacity, capacity, state[t][0],
            state[t][1], bounds[t + 1], len(share.others_roots) > 0))
        state = [(int(r[0]), int(r[1])) for r in results]
        starts = np.arange(pool.threads, dtype=np.int64) * capacity
        ends = starts + np.array([r[2] for r in results], np.int64)
        totals["visited"] += sum(int(r[4]) for r in results)
        totals["scored"] += sum(int(r[3]) for r in results)
        totals["offers"] += int((ends - starts).sum())
        totals["changed"] += sum(pool.map_rows(len(share.roots), lambda lo, hi: _apply(
            share.heaps.keys, share.roots, targets, keys, starts, ends, lo, hi)))
        if outgoing is not None and len(share.others_roots):
            for a, b in zip(starts.tolist(), ends.tolist()):
                away = targets[a:b] < 0  # -(row + 1): offers to other shares' rows
                outgoing.append((-1 - targets[a:b][away], keys[a:b][away]))


def _digit_masks(digits: tuple[int, ...], n_words: int, n_digit: int) -> np.ndarray:
    """(3, W) uint64 masks on the high bit of each byte (digit) of each word of tokens: the real digits
    (padding bytes beyond m are equal in every item), ``below`` (the digits under the bucket's last
    one) and ``required`` (the bucket's other digits). A pair belongs to this bucket when its shared
    digits masked by ``below`` are exactly ``required`` (the bucket's digits are its lowest shared
    ones), so each pair is scored in exactly one bucket."""
    masks = np.zeros((3, n_words * 8), np.uint8)
    masks[0, :n_digit] = 0x80
    masks[1, : digits[-1]] = 0x80
    masks[2, list(digits[:-1])] = 0x80
    return masks.view(np.uint64).copy()


# ---- kernels --------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, boundscheck=False)
def _pair_sort(codes, slot, roots, others_roots, first, second):
    """A stable counting sort of the items on their tokens at (first, second) (2^16 keys), copying their
    codes, lists (``slot``) and list roots into that order as it goes (reads in row order, writes
    scattered): the rows, codes, lists, roots, and the (P,) first positions and sizes of the runs
    of >= 2 equal keys."""
    n_items, width = codes.shape
    counts = np.zeros(1 << 16, np.int64)
    for i in range(n_items):
        counts[(np.int64(codes[i, first]) << 8) | codes[i, second]] += 1
    starts = np.zeros((1 << 16) + 1, np.int64)
    for key in range(1 << 16):
        starts[key + 1] = starts[key] + counts[key]
    fill = starts[: 1 << 16].copy()
    rows = np.empty(n_items, np.int32)
    sorted_codes = np.empty((n_items, width), np.uint8)
    sorted_slot = np.empty(n_items, np.int32)
    sorted_worst = np.empty(n_items, np.int64)
    for i in range(n_items):
        key = (np.int64(codes[i, first]) << 8) | codes[i, second]
        at = fill[key]
        fill[key] += 1
        rows[at] = i
        s = slot[i]
        sorted_slot[at] = s
        sorted_worst[at] = roots[s] if s >= 0 else others_roots[i]
        for c in range(width):
            sorted_codes[at, c] = codes[i, c]
    n_runs = 0
    for key in range(1 << 16):
        n_runs += counts[key] >= 2
    begins = np.empty(n_runs, np.int64)
    sizes = np.empty(n_runs, np.int64)
    n_runs = 0
    for key in range(1 << 16):
        if counts[key] >= 2:
            begins[n_runs], sizes[n_runs] = starts[key], counts[key]
            n_runs += 1
    return rows, sorted_codes, sorted_slot, sorted_worst, begins, sizes


_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_BYTES = np.uint64(0x0101010101010101)
_SEVEN = np.uint64(7)


@njit(inline="always")
def _equal_high(x):
    """The high bit of each zero byte of ``x`` (of each equal token, for x = a ^ b)."""
    return ~(((x & _LOW7) + _LOW7) | x) & np.uint64(0x8080808080808080)


# Buckets up to this size compare their pairs directly; larger ones gather their members' words
# first and compare vectorised over later members (per-member setup would dominate small buckets).
_SMALL_BUCKET = 12
# Pairs that pass are scored in blocks of this many, digit by digit.
_SCORE_BLOCK = 1024


@njit(inline="always")
def _pair_test(words, masks, p, q, min_shared):
    """True when the items at positions p, q share >= min_shared tokens and the bucket's digits are
    their lowest shared ones (scalar form of the vectorised comparison)."""
    count, bad = np.uint64(0), np.uint64(0)
    for w in range(words.shape[1]):
        equal = _equal_high(words[p, w] ^ words[q, w]) & masks[0, w]
        count += equal >> _SEVEN
        bad |= (equal & masks[1, w]) ^ masks[2, w]
    return bad == 0 and np.int64((count * _BYTES) >> np.uint64(56)) >= min_shared


@njit(nogil=True, cache=True, boundscheck=False)
def _visit_segments(tables, vocab, n_digit, rows, codes, words, slots, worst, seg_begins, seg_sizes, thirds, masks,
                    min_shared, targets, keys, first_slot, capacity, seg, third_index, seg_end, some_rows):
    # Pair buckets [seg, seg_end), from the given third digit on; stops before a (pair bucket, third)
    # whose pairs could overflow the thread's stretch of the offer buffer. Returns the next (pair
    # bucket, third index), offers written, pairs scored and pairs visited. ``some_rows``: this share
    # owns some rows only (``slots`` >= 0): buckets without one of them are skipped, and of a pair with one
    # end owned here only, the pair is compared here when that end comes first in pair order (the
    # other share takes the rest).
    #
    # Inside a bucket: a byte's high bit marks an equal token; its count and the bucket test decide
    # (small buckets pair by pair; larger ones with their members' words gathered digit-major and
    # compared over all later members at once, straight-line uint64 work the compiler vectorises).
    # The pairs that pass are queued (across buckets) and scored in blocks digit by digit, so that each digit's
    # (V, V) table (256 KB) stays in cache for the block instead of m tables read at random per pair.
    n_words = words.shape[1]
    cap = 1
    for p in range(seg, seg_end):
        cap = max(cap, seg_sizes[p])
    member = np.empty(cap, np.int64)  # positions of the bucket's items, grouped by third token
    order = np.empty(cap, np.int64)  # with some rows kept: the bucket's positions, kept ones first
    member_words = np.empty((n_words, cap), np.uint64)
    shared = np.empty(cap, np.uint64)
    wrong = np.empty(cap, np.uint64)
    group_of = np.full(256, -1, np.int64)  # token -> its group in the current bucket, -1: none yet
    tokens = np.empty(256, np.int64)
    begins = np.empty(256, np.int64)
    counts = np.empty(256, np.int64)
    cursor = np.empty(256, np.int64)
    queue = np.empty((2, _SCORE_BLOCK), np.int64)  # positions p, q of each pair to score
    block_codes = np.empty((2, _SCORE_BLOCK, n_digit), np.uint8)  # pair-major: digit-major rows alias in L1
    totals = np.empty(_SCORE_BLOCK, np.float32)
    out, queued, scored, visited = first_slot, 0, 0, 0
    ordered = -1  # the pair bucket whose positions ``order`` holds, kept ones first
    while seg < seg_end:
        lo, size = seg_begins[seg], seg_sizes[seg]
        if some_rows and ordered != seg:
            # Once per pair bucket, not per third digit: its positions, kept ones first; a bucket
            # without a kept list is left at once.
            if _kept_first(slots, lo, size, order) == 0:
                seg, third_index = seg + 1, 0
                continue
            ordered = seg
        third = thirds[third_index]
        # Group the pair bucket's items by their token at the third digit (a counting sort over the
        # tokens present only: most buckets hold a few items, for which passes over all 256 tokens
        # are pure overhead). Group k: member[begins[k]:] holds counts[k] items; no third digit: one
        # group. With some rows kept, a group's kept members come first, then the others, each in
        # pair order (from ``order``).
        n_groups = 0
        if third < 0:
            for i in range(size):
                member[i] = order[i] if some_rows else lo + i
            begins[0], counts[0], n_groups = 0, size, 1
        else:
            for i in range(lo, lo + size):
                t = np.int64(codes[i, third])
                if group_of[t] < 0:
                    group_of[t], tokens[n_groups], counts[n_groups] = n_groups, t, 0
                    n_groups += 1
                counts[group_of[t]] += 1
            start = 0
            for k in range(n_groups):
                begins[k], cursor[k] = start, start
                start += counts[k]
            for n in range(size):
                i = order[n] if some_rows else lo + n
                k = group_of[np.int64(codes[i, third])]
                member[cursor[k]] = i
                cursor[k] += 1
            for k in range(n_groups):
                group_of[tokens[k]] = -1
        n_pairs = 0
        for k in range(n_groups):
            n_pairs += counts[k] * (counts[k] - 1) // 2
        if out - first_slot + 2 * (queued + n_pairs) > capacity:
            break  # the caller applies the offers and calls again from here
        for k in range(n_groups):
            begin, g = begins[k], counts[k]
            if g < 2:
                continue
            kept = g
            if some_rows:
                kept = 0
                while kept < g and slots[member[begin + kept]] >= 0:
                    kept += 1
                if kept == 0:
                    continue
            # Kept member i pairs with the kept members after it and with the others that come after
            # it in pair order: those from ``later`` on (it only rises with i). All kept (one share,
            # always): the members after i, one span, and the last member starts no pair.
            masks_t = masks[third_index]
            later = kept
            n_starts, n_spans = (kept, 2) if kept < g else (g - 1, 1)
            small = g <= _SMALL_BUCKET
            if not small:
                for i in range(g):
                    for w in range(n_words):
                        member_words[w, i] = words[member[begin + i], w]
            for i in range(n_starts):
                p = member[begin + i]
                while later < g and member[begin + later] < p:
                    later += 1
                visited += kept - 1 - i + g - later
                for span in range(n_spans):
                    j_lo, j_hi = (i + 1, kept) if span == 0 else (later, g)
                    if small:
                        for j in range(j_lo, j_hi):
                            q = member[begin + j]
                            if _pair_test(words, masks_t, p, q, min_shared):
                                queued, scored, out = _enqueue(p, q, queue, queued, scored, out, tables, vocab,
                                                               n_digit, rows, codes, slots, worst, block_codes, totals,
                                                               targets, keys)
                        continue
                    for h in range(0, n_words, 4):  # 4 words (32 digits) at a time, unrolled
                        a0, a1 = member_words[h, i], member_words[h + 1, i]
                        a2, a3 = member_words[h + 2, i], member_words[h + 3, i]
                        w0, w1, w2, w3 = member_words[h], member_words[h + 1], member_words[h + 2], member_words[h + 3]
                        for j in range(j_lo, j_hi):
                            e0 = _equal_high(w0[j] ^ a0) & masks_t[0, h]
                            e1 = _equal_high(w1[j] ^ a1) & masks_t[0, h + 1]
                            e2 = _equal_high(w2[j] ^ a2) & masks_t[0, h + 2]
                            e3 = _equal_high(w3[j] ^ a3) & masks_t[0, h + 3]
                            count = (e0 >> _SEVEN) + (e1 >> _SEVEN) + (e2 >> _SEVEN) + (e3 >> _SEVEN)  # per byte
                            bad = (((e0 & masks_t[1, h]) ^ masks_t[2, h]) | ((e1 & masks_t[1, h + 1]) ^ masks_t[2, h + 1])
                                   | ((e2 & masks_t[1, h + 2]) ^ masks_t[2, h + 2])
                                   | ((e3 & masks_t[1, h + 3]) ^ masks_t[2, h + 3]))
                            if h == 0:
                                shared[j], wrong[j] = count, bad
                            else:
                                shared[j] += count
                                wrong[j] |= bad
                    for j in range(j_lo, j_hi):
                        if (wrong[j] == 0) & (np.int64((shared[j] * _BYTES) >> np.uint64(56)) >= min_shared):
                            queued, scored, out = _enqueue(p, member[begin + j], queue, queued, scored, out, tables,
                                                           vocab, n_digit, rows, codes, slots, worst, block_codes,
                                                           totals, targets, keys)
        third_index += 1
        if third_index == len(thirds):
            seg, third_index = seg + 1, 0
    out = _score_queue(tables, vocab, n_digit, rows, codes, slots, worst, queue, queued, block_codes, totals,
                       targets, keys, out)
    return seg, third_index, out - first_slot, scored + queued, visited


@njit(inline="always")
def _kept_first(slots, lo, size, out):
    """Positions lo..lo+size into ``out``, those whose list is kept first (each part in order);
    returns how many are kept."""
    n = 0
    for i in range(lo, lo + size):
        if slots[i] >= 0:
            out[n] = i
            n += 1
    kept = n
    for i in range(lo, lo + size):
        if slots[i] < 0:
            out[n] = i
            n += 1
    return kept


@njit(inline="always")
def _enqueue(p, q, queue, queued, scored, out, tables, vocab, n_digit, rows, codes, slots, worst, block_codes, totals,
             targets, keys):
    """Queue the pair at positions (p, q); a full queue is scored. Returns (queued, scored, out)."""
    queue[0, queued], queue[1, queued] = p, q
    queued += 1
    if queued == _SCORE_BLOCK:
        out = _score_queue(tables, vocab, n_digit, rows, codes, slots, worst, queue, queued, block_codes, totals,
                           targets, keys, out)
        scored += queued
        queued = 0
    return queued, scored, out


@njit(nogil=True, cache=True, boundscheck=False)
def _score_queue(tables, vocab, n_digit, rows, codes, slots, worst, queue, queued, block_codes, totals, targets, keys,
                 out):
    """Score the queued pairs (digits in order: exact mode's float32 sum) and append the offers that
    beat a list's root from ``out``, each to its list (``slots``: negative for another share's row);
    returns the next free slot."""
    for t in range(queued):
        p, q = queue[0, t], queue[1, t]
        for d in range(n_digit):
            block_codes[0, t, d] = codes[p, d]
            block_codes[1, t, d] = codes[q, d]
        totals[t] = np.float32(0.0)
    for d in range(n_digit):
        table = tables[d * vocab * vocab : (d + 1) * vocab * vocab]
        for t in range(queued):
            totals[t] += table[np.int64(block_codes[0, t, d]) * vocab + np.int64(block_codes[1, t, d])]
    for t in range(queued):
        p, q = queue[0, t], queue[1, t]
        key = _key(totals[t], np.int64(rows[q]))
        if key > worst[p]:
            targets[out], keys[out] = slots[p], key
            out += 1
        key = _key(totals[t], np.int64(rows[p]))
        if key > worst[q]:
            targets[out], keys[out] = slots[q], key
            out += 1
    return out


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
def _apply(heaps, roots, targets, keys, starts, ends, lo, hi):
    # Each thread owns lists [lo, hi) and applies their offers (the lists keep the best distinct keys
    # offered, whatever their order: they do not depend on the thread count). Offers to rows of
    # other shares (negative targets) are left to them.
    changed = 0
    for r in range(len(starts)):
        for n in range(starts[r], ends[r]):
            h = targets[n]
            if lo <= h < hi:
                if _push(heaps[h], keys[n]):
                    changed += 1
                    roots[h] = heaps[h, 0]
    return changed


@njit(nogil=True, cache=True, boundscheck=False)
def _sorted_rows(heaps, neighbors, lo, hi):
    k = heaps.shape[1]
    for a in range(lo, hi):
        row = np.sort(heaps[a])  # ascending: best last
        for s in range(min(k, neighbors.shape[1])):
            key = row[k - 1 - s]
            neighbors[a, s] = -1 if key == MIN_KEY else _key_row(key)
