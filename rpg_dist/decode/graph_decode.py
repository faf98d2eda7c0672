"""Graph-constrained decoding: walk the item kNN graph instead of scoring every item.

Semantics (the paper's ``graph_propagation``, vectorised over queries):

- the beam starts as ``b`` start items per query, ordered by score. Random starts are distinct
  (``random_start_items``); the paper's code draws them with replacement (``torch.randint``), which
  can spend beams on repeats. tests/test_pipeline.py holds the two within noise of each other;
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

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from rpg_dist.decode import beam_kernel
from rpg_dist.decode.scoring import candidate_scores
from rpg_dist.decode.topk import MIN_KEY, key_rows, key_scores, ranking_keys


# Above this many items codes are kept item-major (see GraphDecoder.__init__).
ROW_MAJOR_ABOVE = 131_072


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


def history_start_items(items: torch.Tensor, lengths: torch.Tensor, neighbors: torch.Tensor,
                        fallback: torch.Tensor, n_beams: int, n_recent: int = 3) -> torch.Tensor:
    """Beams seeded where the user is: the history (most recent first), then the graph neighbours of
    its ``n_recent`` last items (best first), then ``fallback`` items; the first ``n_beams`` distinct.

    A deviation from the paper (random starts), for large catalogues: b random items of millions are
    nowhere near a user's next item, and q expansion steps cannot walk there (BENCHMARKS.md).

    Args:
        items: (B, T) history item rows, right-padded with -1; lengths (B,).
        neighbors: (N, k) graph lists (-1 padded), or a ``ShardedGraphDecoder`` (its shards hold them).
        fallback: (F,) distinct rows (e.g. the most popular items), F >= n_beams.

    Returns:
        (B, n_beams) distinct int64 rows per query.
    """
    batch, width = items.shape
    position = torch.arange(width).unsqueeze(0)
    # Newest first: column j holds the item j steps back (-1 past the history's start).
    back = lengths.unsqueeze(1) - 1 - position  # (B, T)
    recent = torch.where(back >= 0, items.gather(1, back.clamp(min=0)), torch.full_like(items, -1))
    last = recent[:, :n_recent]  # (B, r)
    # Only each list's first n_beams can be needed: n_beams distinct items suffice.
    near = list_heads(neighbors, last.clamp(min=0).reshape(-1), n_beams).reshape(batch, last.shape[1], -1)
    near = torch.where((last >= 0).unsqueeze(2), near, -1).reshape(batch, -1)  # (B, r * b)
    pool = torch.cat([recent, near, fallback.long().unsqueeze(0).expand(batch, -1)], dim=1)  # (B, L)
    return first_distinct(pool, n_beams)


def list_heads(neighbors, rows: torch.Tensor, width: int) -> torch.Tensor:
    """(n, min(width, k)) int64 first entries of the lists of ``rows`` (-1 padded), from the (N, k)
    lists or from the shards of a ``ShardedGraphDecoder``."""
    if isinstance(neighbors, torch.Tensor):
        return neighbors[rows][:, :width].long()
    return neighbors.list_heads(rows, width)


def start_items(decode, items: torch.Tensor, lengths: torch.Tensor, neighbors, counts: torch.Tensor,
                n_items: int, generator: torch.Generator) -> torch.Tensor:
    """(B, b) start rows for ``decode.start`` (a DecodeConfig): random (the paper), popular, or
    history-seeded with the most frequent training items (``counts``, (N,)) as the fallback;
    ``neighbors`` as ``history_start_items`` takes them."""
    if decode.start == "popular":
        return popular_start_items(counts, len(lengths), decode.num_beams)
    if decode.start == "history":
        fallback = popular_start_items(counts, 1, min(2 * decode.num_beams, n_items))[0]
        return history_start_items(items, lengths, neighbors, fallback, decode.num_beams)
    return random_start_items(len(lengths), n_items, decode.num_beams, generator)


def first_distinct(pool: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` distinct non-negative values of each row of ``pool`` (B, L), in order."""
    order = torch.sort(pool, dim=1, stable=True).indices  # equal values: earliest position first
    ordered = pool.gather(1, order)
    repeat = torch.zeros_like(pool, dtype=torch.bool)
    repeat.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])
    valid = (pool >= 0) & ~repeat
    rank = torch.where(valid, torch.arange(pool.shape[1]).unsqueeze(0), pool.shape[1])
    chosen = torch.topk(rank, n, dim=1, largest=False, sorted=True).values  # positions, in order
    if (chosen >= pool.shape[1]).any():
        raise ValueError(f"fewer than {n} distinct start items in a row")
    return pool.gather(1, chosen)


class GraphDecoder:
    """Graph-constrained decoding over an in-memory graph.

    Queries are processed in chunks of ``chunk_size``; ``threads`` chunks run at once on a thread
    pool. Two formulations, with bit-identical results:

    - ``kernel="numba"`` (CPU tensors, the default there): ``beam_kernel`` decodes a chunk in one
      compiled pass, each (query, item) scored once, candidates streamed through a top-b (it
      releases the GIL);
    - ``kernel="torch"`` (any device, the default off CPU): every operation batched over a chunk's
      queries and candidates, (chunk, b + b*k) tensors (~500 KB at chunk 16, b 20, k 200), torch's
      intra-op parallelism set to 1 meanwhile (large multi-threaded ops were measured to slow down
      10-30x when other processes share the cores).

    Args:
        codes: (N, m) item codes (int16 is fine).
        neighbors: (N, k) neighbour rows of each item, best first, padded with -1; distinct within
            a row (``load_graph`` checks this; the top-b shortlist relies on it).
        num_beams: b, items kept per query after each step.
        steps: q, expansion steps.
        chunk_size: queries decoded together.
        threads: chunks decoded concurrently (default: torch's intra-op thread count).
        kernel: "auto" (numba on CPU, else torch), "numba" or "torch".
        prior: (N,) float32 added to every item's score (``scoring.popularity_prior``), or None.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        neighbors: torch.Tensor,
        num_beams: int,
        steps: int,
        chunk_size: int = 16,
        threads: int | None = None,
        kernel: str = "auto",
        prior: torch.Tensor | None = None,
    ) -> None:
        if neighbors.shape[0] != codes.shape[0]:
            raise ValueError(f"neighbors has {neighbors.shape[0]} rows but codes {codes.shape[0]}")
        if kernel not in ("auto", "numba", "torch"):
            raise ValueError(f"kernel={kernel!r}: expected 'auto', 'numba' or 'torch'")
        self.n_items = codes.shape[0]
        self.kernel = kernel if kernel != "auto" else ("numba" if codes.device.type == "cpu" else "torch")
        # Small catalogues (torch kernel): digit-major codes, so digit k's lookups hit one (N,) int16
        # column that stays in cache (24 KB for Beauty). Large ones and the numba kernel: item-major
        # rows, so a candidate's m codes cost one memory access (a 64-byte line at m = 32).
        self.row_major = self.kernel == "numba" or codes.shape[0] > ROW_MAJOR_ABOVE
        codes = codes.to(torch.int16)
        self.codes = codes.contiguous() if self.row_major else codes.t().contiguous()  # (N, m) or (m, N)
        self.neighbors = neighbors
        if prior is not None and prior.shape != (codes.shape[0],):
            raise ValueError(f"prior has shape {tuple(prior.shape)}, expected ({codes.shape[0]},)")
        self.prior = None if prior is None else prior.to(device=codes.device, dtype=torch.float32)
        if self.kernel == "numba":
            self._np_codes = self.codes.numpy()
            self._np_neighbors = np.ascontiguousarray(neighbors.numpy(), dtype=np.int32)
            self._np_prior = np.empty(0, np.float32) if prior is None else self.prior.contiguous().numpy()
            self._workspaces: queue.SimpleQueue = queue.SimpleQueue()  # one per running chunk, reused
        self.num_beams = num_beams
        self.steps = steps
        self.chunk_size = chunk_size
        self.threads = threads or torch.get_num_threads()
        # An item occurs at most b+1 times among the candidates (once in the beam, once per beam
        # item's list), so the top b*(b+1) keys always hold the b best distinct items.
        self._shortlist = num_beams * (num_beams + 1)

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
        flat = log_probs.reshape(log_probs.shape[0], -1)  # (B, m*V)
        bounds = [(lo, lo + self.chunk_size) for lo in range(0, start.shape[0], self.chunk_size)]

        decode_chunk = self._kernel_chunk if self.kernel == "numba" else self._decode_chunk
        if self.kernel == "numba":
            flat = flat.detach().to(torch.float32).contiguous()

        def run(bound: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            return decode_chunk(flat[bound[0] : bound[1]], start[bound[0] : bound[1]].long())

        if self.threads > 1 and len(bounds) > 1:
            # Parallel over chunks, not inside ops: every op runs single-threaded on its pool thread.
            saved = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(self.threads) as pool:
                    chunks = list(pool.map(run, bounds))
            finally:
                torch.set_num_threads(saved)
        else:
            chunks = [run(b) for b in bounds]
        top = torch.cat([keys[:, :top_k] for keys, _ in chunks])
        return DecodeResult(key_rows(top), key_scores(top), torch.cat([visited for _, visited in chunks]))

    def _kernel_chunk(self, log_probs: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_decode_chunk`` through ``beam_kernel``: same inputs, same (bit-identical) outputs."""
        try:
            workspace = self._workspaces.get_nowait()
        except queue.Empty:
            workspace = beam_kernel.Workspace(self.n_items)
        try:
            keys, visited = beam_kernel.decode_chunk(log_probs.numpy(), self._np_codes, self._np_neighbors,
                                                     start.contiguous().numpy(), self.steps, workspace,
                                                     self._np_prior)
        finally:
            self._workspaces.put(workspace)
        return torch.from_numpy(keys), torch.from_numpy(visited)

    def _decode_chunk(self, log_probs: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, m*V) log-probs and (c, b) start rows -> (c, b) beam keys and (c,) visited counts."""
        expected = self.num_beams * (1 + self.steps * (1 + self.neighbors.shape[1]))
        visited = _VisitedCounter(start.shape[0], self.n_items, expected)
        visited.add(start)
        beam_keys = self._top_beams(log_probs, start, valid=None)
        for _ in range(self.steps):
            beam = key_rows(beam_keys)  # (c, b)
            candidates, valid = self._expand(beam)  # (c, b + b*k)
            visited.add(candidates)
            beam_keys = self._top_beams(log_probs, candidates, valid)
        return beam_keys, visited.counts()

    def _expand(self, beam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The beam plus all its neighbours: (c, b) -> (c, b + b*k) rows and a validity mask."""
        c, b = beam.shape
        neighbors = self.neighbors.index_select(0, beam.reshape(-1)).long().view(c, -1)  # (c, b*k)
        valid = neighbors >= 0
        # Padding points at the chunk's first beam item (a duplicate); its key is masked anyway.
        neighbors = torch.where(valid, neighbors, beam[:, :1])
        ones = torch.ones(c, b, dtype=torch.bool)
        return torch.cat([beam, neighbors], dim=1), torch.cat([ones, valid], dim=1)

    def _top_beams(self, log_probs: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Keys of the top-b distinct candidates per query, best first: (c, C) -> (c, b)."""
        keys = ranking_keys(self._scores(log_probs, candidates), candidates)  # (c, C)
        if valid is not None:
            keys.masked_fill_(~valid, MIN_KEY)
        # Equal keys = same item: within the sorted shortlist they are adjacent.
        keys = torch.topk(keys, min(self._shortlist, keys.shape[1]), dim=1, sorted=True).values
        duplicate = keys[:, 1:] == keys[:, :-1]
        keys[:, 1:].masked_fill_(duplicate, MIN_KEY)
        return torch.topk(keys, self.num_beams, dim=1, sorted=True).values

    def _scores(self, log_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(c, m*V) log-probs, (c, C) rows -> (c, C) scores (scoring.candidate_scores)."""
        n_digit = self.codes.shape[1] if self.row_major else self.codes.shape[0]
        return candidate_scores(log_probs.view(rows.shape[0], n_digit, -1), self.codes, rows, self.row_major,
                                self.prior)


class _VisitedCounter:
    """Distinct items seen per query: a (c, N) bitmap for small catalogues, else kept rows + one sort."""

    def __init__(self, n_queries: int, n_items: int, expected: int) -> None:
        # A bitmap costs O(N) per query, the sort O(L log L) for L rows seen: bitmap only when N ~ L.
        self.bitmap = None
        if n_items <= 4 * expected:
            self.bitmap = torch.zeros(n_queries, n_items, dtype=torch.bool)
        self.parts: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor) -> None:
        if self.bitmap is not None:
            self.bitmap.scatter_(1, rows, True)
        else:
            self.parts.append(rows)

    def counts(self) -> torch.Tensor:
        if self.bitmap is not None:
            return torch.count_nonzero(self.bitmap, dim=1)
        return count_distinct(torch.cat(self.parts, dim=1))


def count_distinct(rows: torch.Tensor) -> torch.Tensor:
    """Distinct values per row of a (B, L) integer tensor: (B,) int64."""
    ordered = torch.sort(rows, dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)
