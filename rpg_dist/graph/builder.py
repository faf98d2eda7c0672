"""The distributed graph builder: Ray actors compute neighbour lists block by block.

The driver splits item rows into blocks of ``block_size``; an ``ActorPool`` of ``GraphWorker``
actors (each holding the (m, V, V) digit tables and the (m, N) int16 codes, ~64 bytes per item,
plus in approximate mode a copy of the faiss index) returns each block's (block, k) neighbour rows.
The driver then partitions the graph and measures the approximate mode's recall on a sample.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rpg_dist.graph.approx import ItemReducer, approx_neighbors, build_index
from rpg_dist.graph.config import GraphConfig
from rpg_dist.graph.exact import exact_neighbors
from rpg_dist.graph.partition import cross_fraction, kmeans_partition, refine_partition
from rpg_dist.graph.similarity import digit_similarity_tables

log = logging.getLogger(__name__)


@dataclass
class BuiltGraph:
    """Neighbour lists (dense rows) and partitions, plus what the manifest and stats report."""

    neighbors: np.ndarray  # (N, k) int32 rows, best first, -1 padded
    partition: np.ndarray  # (N,) int32
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class GraphWorker:
    """Ray actor: neighbour lists for blocks of item rows (exact, or faiss candidates + exact rerank)."""

    def __init__(self, tables: np.ndarray, codes_t: np.ndarray, n_edges: int, item_chunk: int,
                 threads: int, approx: dict[str, Any] | None = None) -> None:
        torch.set_num_threads(threads)
        self.tables = torch.from_numpy(np.array(tables))  # (m, V, V), writable copy
        self.codes_t = torch.from_numpy(np.array(codes_t))  # (m, N) int16
        self.n_edges = n_edges
        self.item_chunk = item_chunk
        self.approx = None
        if approx is not None:
            import faiss

            faiss.omp_set_num_threads(threads)
            self.index = faiss.deserialize_index(approx["index"])
            self.reducer = approx["reducer"]
            self.n_candidates = approx["n_candidates"]
            self.approx = True

    def block(self, lo: int, hi: int) -> tuple[int, np.ndarray]:
        """Neighbours of rows [lo, hi) in this worker's mode: (lo, (hi-lo, k) int32)."""
        rows = torch.arange(lo, hi)
        if self.approx:
            found = approx_neighbors(self.index, self.reducer, self.tables, self.codes_t, rows,
                                     self.n_edges, self.n_candidates)
        else:
            found = exact_neighbors(self.tables, self.codes_t, rows, self.n_edges, self.item_chunk)
        return lo, found.to(torch.int32).numpy()

    def exact(self, rows: np.ndarray) -> np.ndarray:
        """Exact neighbours of arbitrary rows (the recall check): (len(rows), k) int32."""
        found = exact_neighbors(self.tables, self.codes_t, torch.from_numpy(rows), self.n_edges, self.item_chunk)
        return found.to(torch.int32).numpy()


def build_item_graph(token_embeddings: torch.Tensor, codes: torch.Tensor, cfg: GraphConfig, seed: int = 0) -> BuiltGraph:
    """Build, partition and (approximate mode) recall-check the kNN graph. Needs Ray initialised.

    Args:
        token_embeddings: (m, V, d) trained token table.
        codes: (N, m) item codes (dense rows).
        cfg: the graph config.
        seed: seeds the reduction sample, index training, k-means and the recall sample.
    """
    n_items = codes.shape[0]
    n_edges = min(cfg.n_edges, max(n_items - 1, 1))
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    tables = digit_similarity_tables(token_embeddings)  # (m, V, V)
    codes_t = codes.t().to(torch.int16).contiguous()  # (m, N)
    approx = None
    if cfg.mode == "approx":
        approx = _approx_payload(token_embeddings, codes, cfg, n_edges, seed)
        timings["approx_index_s"] = time.perf_counter() - clock
    workers = _start_workers(tables, codes_t, n_edges, cfg, approx)
    clock = time.perf_counter()
    neighbors = _run_blocks(workers, n_items, n_edges, cfg.block_size)
    timings["neighbors_s"] = time.perf_counter() - clock
    stats = {}
    if cfg.mode == "approx" and cfg.recall_sample:
        clock = time.perf_counter()
        stats = _recall(workers, neighbors, cfg.recall_sample, seed)
        timings["recall_s"] = time.perf_counter() - clock
    _stop_workers(workers)
    clock = time.perf_counter()
    partition, method = _partition(token_embeddings, codes, neighbors, cfg, seed)
    timings["partition_s"] = time.perf_counter() - clock
    info = {
        "n_items": n_items,
        "n_edges": n_edges,
        "mode": cfg.mode,
        "n_partitions": int(partition.max()) + 1 if n_items else 0,
        "partition_method": method,
        "partition_sizes": np.bincount(partition, minlength=cfg.n_partitions).tolist(),
        "cross_partition_edge_fraction": cross_fraction(partition, neighbors),
        "timings_s": timings,
    }
    return BuiltGraph(neighbors=neighbors, partition=partition, info=info, stats=stats)


def _approx_payload(token_embeddings, codes, cfg: GraphConfig, n_edges: int, seed: int) -> dict[str, Any]:
    """Fit the reduction and the faiss index once, in the driver; workers get serialised copies."""
    import faiss

    reducer = ItemReducer(token_embeddings, codes, cfg.approx_dim, cfg.approx_fit_sample, seed)
    train_size = min(cfg.approx_train_size, codes.shape[0])
    index = build_index(reducer, codes, cfg.approx_index, cfg.approx_params, train_size, seed)
    blob = faiss.serialize_index(index)  # uint8 numpy array: no pickle of faiss objects
    del index
    return {"index": blob, "reducer": reducer, "n_candidates": max(cfg.approx_candidates, n_edges)}


def _start_workers(tables, codes_t, n_edges: int, cfg: GraphConfig, approx) -> list:
    import ray

    remote = ray.remote(GraphWorker).options(num_cpus=cfg.num_cpus_per_actor)
    tables_ref, codes_ref = ray.put(tables.numpy()), ray.put(codes_t.numpy())
    approx_ref = ray.put(approx) if approx is not None else None
    return [
        remote.remote(tables_ref, codes_ref, n_edges, cfg.item_chunk, cfg.threads_per_actor, approx_ref)
        for _ in range(cfg.num_actors)
    ]


def _run_blocks(workers: list, n_items: int, n_edges: int, block_size: int) -> np.ndarray:
    """Every block once, on whichever worker is free; results land in one (N, k) int32 array."""
    from ray.util import ActorPool

    neighbors = np.empty((n_items, n_edges), np.int32)
    blocks = [(lo, min(lo + block_size, n_items)) for lo in range(0, n_items, block_size)]
    pool = ActorPool(workers)
    done = 0
    for lo, rows in pool.map_unordered(lambda worker, b: worker.block.remote(*b), blocks):
        neighbors[lo : lo + len(rows)] = rows
        done += 1
        if done % max(1, len(blocks) // 10) == 0:
            log.info("graph: %d/%d blocks", done, len(blocks))
    return neighbors


def _recall(workers: list, neighbors: np.ndarray, sample_size: int, seed: int) -> dict[str, Any]:
    """Recall of the approximate lists against exact ones on a random sample of items."""
    import ray

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(neighbors), min(sample_size, len(neighbors)), replace=False))
    parts = np.array_split(sample, len(workers))
    exact = np.concatenate(ray.get([w.exact.remote(p) for w, p in zip(workers, parts) if len(p)]))
    approx = neighbors[sample]
    hits = (approx[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    per_item = hits.any(axis=1).sum(axis=1) / np.maximum((exact >= 0).sum(axis=1), 1)
    return {
        "recall_sample": int(len(sample)),
        f"recall@{neighbors.shape[1]}": float(per_item.mean()),
        "recall_min": float(per_item.min()),
        "recall_p10": float(np.quantile(per_item, 0.1)),
        "top1_agreement": float((approx[:, 0] == exact[:, 0]).mean()),
    }


def _stop_workers(workers: list) -> None:
    import ray

    for worker in workers:
        ray.kill(worker)


def _partition(token_embeddings, codes, neighbors: np.ndarray, cfg: GraphConfig, seed: int) -> tuple[np.ndarray, str]:
    n_parts = min(cfg.n_partitions, codes.shape[0])
    reducer = ItemReducer(token_embeddings, codes, cfg.partition_dim, min(cfg.approx_fit_sample, 4096), seed)
    vectors = np.concatenate([reducer.project(codes[lo : lo + 65_536]) for lo in range(0, codes.shape[0], 65_536)])
    partition = kmeans_partition(vectors, n_parts, seed)
    method = f"balanced k-means (faiss, {n_parts} centroids) of {reducer.dim}-d reduced item vectors"
    if cfg.refine_rounds and n_parts > 1:
        partition = refine_partition(partition, neighbors, n_parts, cfg.refine_rounds)
        method += f", then up to {cfg.refine_rounds} rounds of balanced label propagation on the graph"
    return partition, method
