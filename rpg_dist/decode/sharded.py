"""Sharded graph decoding: one Ray actor (or Serve deployment) per graph partition, a coordinator
driving the steps.

Each ``GraphShard`` holds only its partition's items: their rows, adjacency lists and codes (memory
O(partition)). For a batch the coordinator broadcasts the (B, m, V) log-probs once, then per step:

1. **expand**: each shard receives the beam items it owns (as (query, item) pairs), looks up their
   neighbours, keeps the ones it owns as candidates and returns the others (cross-shard pairs);
2. **score**: each shard receives the cross-shard pairs it owns, scores all its candidates
   (deduplicated per query), and returns its top-b keys per query;
3. the coordinator merges the P x b keys per query into the new beam.

Items live in exactly one shard, so the union of the shards' candidates is exactly the single-process
candidate set, and scores are bit-identical (same digit order): results equal ``GraphDecoder``'s.
The start items are scored in a first score-only round. ``step_stats`` reports, per step, the
messages (requests and replies carrying data), their bytes and the cross-shard candidate pairs.
A shard keeps each batch's state under the batch's id, so several coordinators (service replicas)
can decode through the same shards at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rpg_dist.decode.graph_decode import DecodeResult
from rpg_dist.decode.scoring import pair_scores
from rpg_dist.decode.topk import MIN_KEY, key_rows, key_scores, ranking_keys

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig


# Batches a shard keeps state for at once: a coordinator that died mid-batch never ends its batch,
# so the oldest open batch is dropped past this many (a live batch lasts one decode).
MAX_OPEN_BATCHES = 64


@dataclass
class _Batch:
    log_probs: torch.Tensor  # (B, m, V)
    num_beams: int
    pending: list[torch.Tensor] = field(default_factory=list)  # packed query * N + item candidates of this step
    visited: list[torch.Tensor] = field(default_factory=list)


class GraphShard:
    """One partition's adjacency lists and codes; expands and scores (query, item) pairs.

    A Ray actor (``ShardedGraphDecoder.from_arrays`` / ``from_run``) or a Ray Serve deployment
    (``rpg-dist serve`` with ``graph=sharded``). Its state is kept per batch id, so coordinators
    decoding different batches at once share a shard.

    Args:
        n_items: N, the catalogue size (for packing (query, item) pairs into one int64).

    Fill it with ``set_items`` (arrays) or ``load_partition`` (its own files from the run).
    """

    def __init__(self, n_items: int) -> None:
        torch.set_num_threads(1)
        self.n_items = n_items
        self.rows = torch.empty(0, dtype=torch.int64)
        self.neighbors = torch.empty(0, 0, dtype=torch.int32)
        self.codes = torch.empty(0, 0, dtype=torch.int16)
        self.prior: torch.Tensor | None = None  # (n_p,) float32 item prior of these rows, or None
        self.batches: dict[str, _Batch] = {}

    def set_items(self, rows: np.ndarray, neighbors: np.ndarray, codes: np.ndarray) -> int:
        """Hold these items: (n_p,) sorted global rows, (n_p, k) neighbour rows, (n_p, m) codes."""
        self.rows = torch.from_numpy(np.array(rows, np.int64))
        self.neighbors = torch.from_numpy(np.array(neighbors, np.int32))
        self.codes = torch.from_numpy(np.array(codes, np.int16))
        return len(self.rows)

    def set_prior(self, prior: np.ndarray | None) -> int:
        """Add ``prior`` (n_p,) float32, one value per held row in row order, to every score (None: no prior)."""
        if prior is not None and len(prior) != len(self.rows):
            raise ValueError(f"prior has {len(prior)} values for the shard's {len(self.rows)} items")
        self.prior = None if prior is None else torch.from_numpy(np.array(prior, np.float32))
        return len(self.rows)

    def load_partition(self, run_dir: str, partition: int, storage: StorageConfig | None = None,
                       with_prior: bool = False) -> int:
        """Read only this partition's graph parts (and its items' codes) from the run; ``with_prior``:
        also the run's item prior (decode.popularity_weight), from its training sequences."""
        from rpg_dist.artifacts import RunPaths
        from rpg_dist.graph.store import load_graph
        from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

        semantic_ids = load_semantic_ids(RunPaths(run_dir).semantic_ids, storage)
        graph = load_graph(run_dir, semantic_ids.index, storage, partition=partition)
        size = self.set_items(graph.rows, graph.neighbors, semantic_ids.codes[graph.rows])
        if with_prior:
            from rpg_dist.config import read_run_config
            from rpg_dist.evaluation.stage import run_item_prior

            prior = run_item_prior(read_run_config(run_dir, storage), semantic_ids.index)
            self.set_prior(None if prior is None else prior[graph.rows].numpy())
        return size

    def size(self) -> int:
        return len(self.rows)

    def begin(self, batch: str, log_probs: np.ndarray, num_beams: int) -> None:
        """Start batch ``batch``: keep its (B, m, V) log-probs; b beams per query."""
        while len(self.batches) >= MAX_OPEN_BATCHES:
            self.batches.pop(next(iter(self.batches)))
        self.batches[batch] = _Batch(torch.from_numpy(np.array(log_probs, np.float32)), num_beams)

    def expand(self, batch: str, queries: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frontier pairs this shard owns -> their neighbours; returns the pairs owned elsewhere."""
        state = self._batch(batch)
        queries, items = _tensor(queries).long(), _tensor(items).long()
        neighbors = self.neighbors[self._local(items)].long()  # (F, k)
        pair_queries = queries.unsqueeze(1).expand_as(neighbors)
        valid = neighbors >= 0
        neighbors, pair_queries = neighbors[valid], pair_queries[valid]
        owned = self._owns(neighbors)
        state.pending += [queries * self.n_items + items, pair_queries[owned] * self.n_items + neighbors[owned]]
        return pair_queries[~owned].numpy(), neighbors[~owned].numpy()

    def score(self, batch: str, queries: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Add routed pairs, score every distinct candidate, return (B, b) top keys per query."""
        state = self._batch(batch)
        packed = _tensor(queries).long() * self.n_items + _tensor(items).long()
        # Distinct (query, item) pairs, sorted: grouped by query.
        packed = torch.unique(torch.cat([*state.pending, packed]))
        state.pending = []
        state.visited.append(packed)
        pair_queries, pair_items = packed // self.n_items, packed % self.n_items
        local = self._local(pair_items)
        scores = pair_scores(state.log_probs, pair_queries, self.codes[local],
                             None if self.prior is None else self.prior[local])
        return _top_per_query(ranking_keys(scores, pair_items), pair_queries,
                              state.log_probs.shape[0], state.num_beams).numpy()

    def finish(self, batch: str) -> np.ndarray:
        """End the batch: (B,) distinct items this shard scored per query over it."""
        state = self.batches.pop(batch, None)
        if state is None:
            raise KeyError(f"batch {batch} is not open on this shard (dropped, or the shard restarted)")
        size = state.log_probs.shape[0]
        if not state.visited:
            return np.zeros(size, np.int64)
        packed = torch.unique(torch.cat(state.visited))
        return torch.bincount(packed // self.n_items, minlength=size).numpy()

    def list_heads(self, items: np.ndarray, width: int) -> np.ndarray:
        """(n, min(width, k)) first neighbours of these owned items' lists (-1 padded)."""
        return self.neighbors[self._local(_tensor(items).long())][:, :width].long().numpy()

    def _batch(self, batch: str) -> _Batch:
        if batch not in self.batches:
            raise KeyError(f"batch {batch} is not open on this shard (dropped, or the shard restarted)")
        return self.batches[batch]

    def _local(self, items: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.rows, items)

    def _owns(self, items: torch.Tensor) -> torch.Tensor:
        local = self._local(items).clamp(max=max(len(self.rows) - 1, 0))
        return self.rows[local] == items if len(self.rows) else torch.zeros_like(items, dtype=torch.bool)


def _top_per_query(keys: torch.Tensor, queries: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """Best ``k`` keys of each query from flat pairs grouped by query (``queries`` ascending).

    The pairs are laid out as a (B, longest group) matrix padded with MIN_KEY, then one top-k per
    row: O(pairs) work, no sort of the pairs.

    Returns:
        (B, k) keys, best first, MIN_KEY padded.
    """
    counts = torch.bincount(queries, minlength=batch)  # (B,)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(queries)) - first[queries]  # position inside its query's group
    width = max(int(counts.max()) if len(queries) else 0, k)
    grid = torch.full((batch, width), MIN_KEY, dtype=torch.int64)
    grid[queries, rank] = keys
    return torch.topk(grid, k, dim=1, sorted=True).values


def send_prior(shards: list, partition: np.ndarray, prior: torch.Tensor | None) -> None:
    """Give Ray actor shard p the prior of partition p's rows (ascending, as the shard holds them)."""
    import ray

    if prior is not None:
        values = prior.to(torch.float32).numpy()
        ray.get([s.set_prior.remote(values[partition == p]) for p, s in enumerate(shards)])


class ShardedGraphDecoder:
    """Coordinator of one ``GraphShard`` per partition; same results as ``GraphDecoder``.

    Args:
        shards: Ray actor handles or Ray Serve deployment handles, shard p owning the items of
            partition p.
        partition: (N,) int32 owner of every item (the only O(N) state here: 4 bytes per item).
        num_beams: b.
        steps: q.
    """

    def __init__(self, shards: list, partition: np.ndarray, num_beams: int, steps: int) -> None:
        self.shards = shards
        self.partition = torch.from_numpy(np.asarray(partition, np.int64))
        self.num_beams = num_beams
        self.steps = steps
        self.step_stats: list[dict[str, Any]] = []

    @classmethod
    def from_arrays(cls, codes, neighbors, partition, num_beams: int, steps: int, num_cpus: float = 0.5,
                    prior: torch.Tensor | None = None):
        """Shards built from in-memory arrays (tests, benchmarks): each gets only its rows (and their
        ``prior`` values, (N,) or None)."""
        import ray

        partition = np.asarray(partition)
        shards, loads = [], []
        for part in range(int(partition.max()) + 1):
            rows = np.flatnonzero(partition == part)
            shard = ray.remote(GraphShard).options(num_cpus=num_cpus).remote(len(partition))
            loads.append(shard.set_items.remote(rows, np.asarray(neighbors)[rows], np.asarray(codes)[rows]))
            shards.append(shard)
        ray.get(loads)
        send_prior(shards, partition, prior)
        return cls(shards, partition, num_beams, steps)

    @classmethod
    def from_run(cls, run_dir: str, partition: np.ndarray, num_beams: int, steps: int,
                 storage: StorageConfig | None = None, num_cpus: float = 0.5, prior: torch.Tensor | None = None):
        """Shards that each read their own partition's files from ``run_dir``.

        Args:
            partition: (N,) owner of every item (``graph.store.load_partitions``).
            prior: (N,) item prior (``scoring.popularity_prior``) or None; each shard gets its rows'.
        """
        import ray

        partition = np.asarray(partition)
        remote = ray.remote(GraphShard).options(num_cpus=num_cpus)
        shards = [remote.remote(len(partition)) for _ in range(int(partition.max()) + 1)]
        ray.get([s.load_partition.remote(run_dir, p, storage) for p, s in enumerate(shards)])
        send_prior(shards, partition, prior)
        return cls(shards, partition, num_beams, steps)

    def close(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard)

    def decode(self, log_probs: torch.Tensor, start: torch.Tensor, top_k: int | None = None) -> DecodeResult:
        """Decode a batch across the shards; see ``GraphDecoder.decode`` for the arguments."""
        top_k = self.num_beams if top_k is None else top_k
        batch, tag = log_probs.shape[0], uuid.uuid4().hex
        lp = log_probs.to(torch.float32).numpy()
        _gather([s.begin.remote(tag, lp, self.num_beams) for s in self.shards])
        self.step_stats = [{"step": 0, "messages": len(self.shards), "bytes": lp.nbytes * len(self.shards)}]
        queries = torch.arange(batch).repeat_interleave(start.shape[1])
        beam_keys = self._score_round(tag, self._route(queries, start.reshape(-1).long()), self.step_stats[0])
        for step in range(1, self.steps + 1):
            stats = {"step": step, "messages": 0, "bytes": 0}
            beam = key_rows(beam_keys)
            remote = self._expand_round(tag, self._route(torch.arange(batch).repeat_interleave(self.num_beams),
                                                         beam.reshape(-1)), stats)
            beam_keys = self._score_round(tag, self._route(*remote), stats)
            self.step_stats.append(stats)
        visited = sum(_gather([s.finish.remote(tag) for s in self.shards]))
        top = beam_keys[:, :top_k]
        return DecodeResult(key_rows(top), key_scores(top), torch.from_numpy(np.asarray(visited, np.int64)))

    def list_heads(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """(n, min(width, k)) first entries of the lists of ``rows`` (-1 padded), from their shards."""
        routed = self._route(torch.arange(len(rows)), rows.long())
        replies = _gather([s.list_heads.remote(i, width) for s, (_, i) in zip(self.shards, routed)])
        out = torch.full((len(rows), replies[0].shape[1]), -1, dtype=torch.int64)
        for (positions, _), reply in zip(routed, replies):
            out[_tensor(positions)] = _tensor(reply)
        return out

    def _route(self, queries: torch.Tensor, items: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Split (query, item) pairs by the item's owner: one (queries, items) pair of arrays per shard."""
        owner = self.partition[items]
        return [(queries[owner == p].numpy(), items[owner == p].numpy()) for p in range(len(self.shards))]

    def _expand_round(self, tag: str, routed, stats: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        replies = _gather([s.expand.remote(tag, q, i) for s, (q, i) in zip(self.shards, routed)])
        _count(stats, routed, replies)
        stats["cross_shard_pairs"] = int(sum(len(q) for q, _ in replies))
        queries = _tensor(np.concatenate([q for q, _ in replies]))
        items = _tensor(np.concatenate([i for _, i in replies]))
        return queries, items

    def _score_round(self, tag: str, routed, stats: dict[str, Any]) -> torch.Tensor:
        replies = _gather([s.score.remote(tag, q, i) for s, (q, i) in zip(self.shards, routed)])
        _count(stats, routed, replies)
        keys = _tensor(np.concatenate(replies, axis=1))  # (B, P*b)
        return torch.topk(keys, self.num_beams, dim=1, sorted=True).values


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor of its own: arrays that came through Ray's object store are read-only."""
    return torch.from_numpy(np.array(array))


def _gather(calls: list) -> list:
    """The results of calls on Ray actors (ObjectRefs) or on Serve deployments (DeploymentResponses)."""
    import ray

    if all(isinstance(call, ray.ObjectRef) for call in calls):
        return ray.get(calls)
    return [call.result() for call in calls]


def _count(stats: dict[str, Any], requests, replies) -> None:
    """Requests and replies that carry data, and their payload bytes."""
    for (queries, items), reply in zip(requests, replies):
        sent = queries.nbytes + items.nbytes
        received = sum(a.nbytes for a in reply) if isinstance(reply, tuple) else reply.nbytes
        stats["messages"] = stats.get("messages", 0) + (sent > 0) + (received > 0)
        stats["bytes"] = stats.get("bytes", 0) + sent + received
