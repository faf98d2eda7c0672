"""The graph builder: neighbour lists block by block, in this process or on Ray actors.

Item rows are split into blocks of ``block_size`` (or, in approximate mode, groups of whole IVF
lists). Catalogues up to ``local_max_items`` run on a thread pool in this process (the kernels
release the GIL); larger ones on an ``ActorPool`` of ``GraphWorker`` actors, each holding the
(m, V, V) digit tables and the (N, m) int16 codes (~64 bytes per item), plus in approximate mode a
copy of the faiss index. Both paths run the same ``GraphWorker`` methods, so they return the same
lists. The driver then partitions the graph and measures the approximate mode's recall on a sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rpg_dist.graph.approx import ItemReducer, approx_neighbors, build_index, ivf_list_neighbors, plan_ivf
from rpg_dist.graph.config import GraphConfig
from rpg_dist.graph.exact import exact_neighbors
from rpg_dist.graph.partition import cross_fraction, kmeans_partition, refine_partition
from rpg_dist.graph.similarity import digit_similarity_tables
from rpg_dist.graph.token_blocks import default_groups, pairs_per_item, plan_token_blocks, token_block_neighbors

log = logging.getLogger(__name__)

# token_blocks tasks hold up to this many blocks of block_size query rows (64 x 1024 = 65,536 at the
# defaults: ~256 queries per token group of 256, so each group's block is shared by 4 sub-blocks of 64).
TOKEN_TASK_BLOCKS = 64
TASKS_PER_WORKER = 4


@dataclass
class BuiltGraph:
    """Neighbour lists (dense rows) and partitions, plus what the manifest and stats report."""

    neighbors: np.ndarray  # (N, k) int32 rows, best first, -1 padded
    partition: np.ndarray  # (N,) int32
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class GraphWorker:
    """Neighbour lists for blocks of items, exact or approximate (a Ray actor, or in-process).

    ``approx`` holds the approximate method's shared state: ``{"method": "faiss_index", "index":
    serialised faiss index, "reducer", "n_candidates"}`` or ``{"method": "ivf_blocks", "plan"}``.
    """

    def __init__(self, tables: np.ndarray, codes: np.ndarray, n_edges: int, item_chunk: int,
                 query_block: int, threads: int, approx: dict[str, Any] | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.tables = torch.from_numpy(np.array(tables))  # (m, V, V), writable copy
        self.codes = torch.from_numpy(np.array(codes))  # (N, m) int16
        self.n_edges = n_edges
        self.item_chunk = item_chunk
        self.query_block = query_block
        self.approx = approx or {}
        if self.approx.get("method") == "faiss_index":
            import faiss

            faiss.omp_set_num_threads(threads)
            self.index = faiss.deserialize_index(self.approx["index"])

    def token_rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """token_blocks: neighbours of rows [lo, hi) over their shared-token blocks."""
        rows = np.arange(lo, hi)
        found = token_block_neighbors(self.tables, self.codes, self.approx["blocks"], rows, self.n_edges)
        return rows, found.to(torch.int32).numpy()

    def block(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of rows [lo, hi): (rows, (hi-lo, k) int32), exact or via the faiss index."""
        rows = torch.arange(lo, hi)
        if self.approx.get("method") == "faiss_index":
            found = approx_neighbors(self.index, self.approx["reducer"], self.tables, self.codes, rows,
                                     self.n_edges, self.approx["n_candidates"])
        else:
            found = exact_neighbors(self.tables, self.codes, rows, self.n_edges, self.item_chunk)
        return rows.numpy(), found.to(torch.int32).numpy()

    def lists(self, list_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """ivf_blocks: neighbours of the items of these lists: (rows, (len(rows), k) int32)."""
        plan = self.approx["plan"]
        found = [ivf_list_neighbors(self.tables, self.codes, plan, l, self.n_edges, self.item_chunk,
                                    self.query_block) for l in list_ids]
        rows = np.concatenate([r for r, _ in found])
        return rows, torch.cat([n for _, n in found]).to(torch.int32).numpy()

    def exact(self, rows: np.ndarray) -> np.ndarray:
        """Exact neighbours of arbitrary rows (the recall check): (len(rows), k) int32."""
        found = exact_neighbors(self.tables, self.codes, torch.from_numpy(rows), self.n_edges, self.item_chunk)
        return found.to(torch.int32).numpy()


def build_item_graph(token_embeddings: torch.Tensor, codes: torch.Tensor, cfg: GraphConfig, seed: int = 0) -> BuiltGraph:
    """Build, partition and (approximate mode) recall-check the kNN graph.

    Ray must be initialised when the catalogue exceeds ``cfg.local_max_items``.

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
    codes16 = codes.to(torch.int16).contiguous()  # (N, m)
    approx = None
    approx_info = {}
    mode = cfg.resolved_mode(n_items)
    if mode == "approx":
        approx = _approx_payload(token_embeddings, codes, cfg, n_edges, seed)
        timings["approx_index_s"] = time.perf_counter() - clock
        approx_info = _describe(approx, cfg)
    local = n_items <= cfg.local_max_items
    workers = _LocalWorkers(tables, codes16, n_edges, cfg, approx) if local else _RayWorkers(tables, codes16, n_edges, cfg, approx)
    try:
        clock = time.perf_counter()
        tasks = _tasks(n_items, cfg.block_size, approx, cfg.num_actors if not local else workers.threads)
        neighbors = _collect(workers.run(tasks), n_items, n_edges)
        timings["neighbors_s"] = time.perf_counter() - clock
        stats = {}
        if mode == "approx" and cfg.recall_sample:
            clock = time.perf_counter()
            stats = _recall(workers, neighbors, cfg.recall_sample, seed)
            timings["recall_s"] = time.perf_counter() - clock
    finally:
        workers.close()
    clock = time.perf_counter()
    partition, method = _partition(token_embeddings, codes, neighbors, cfg, seed)
    timings["partition_s"] = time.perf_counter() - clock
    info = {
        "n_items": n_items,
        "n_edges": n_edges,
        "mode": mode,
        "workers": "in-process threads" if local else f"{cfg.num_actors} Ray actors",
        "n_partitions": int(partition.max()) + 1 if n_items else 0,
        "partition_method": method,
        "partition_sizes": np.bincount(partition, minlength=cfg.n_partitions).tolist(),
        "cross_partition_edge_fraction": cross_fraction(partition, neighbors),
        **approx_info,
        "timings_s": timings,
    }
    return BuiltGraph(neighbors=neighbors, partition=partition, info=info, stats=stats)


def _approx_payload(token_embeddings, codes, cfg: GraphConfig, n_edges: int, seed: int) -> dict[str, Any]:
    """Plan the blocks, or fit the reduction and the lists or index, once in the driver; workers get copies."""
    import faiss

    if cfg.approx_method == "token_blocks":
        n_digits = cfg.approx_digits or codes.shape[1]
        groups = cfg.approx_token_groups or default_groups(codes.shape[0], n_digits, token_embeddings.shape[1], n_edges)
        blocks = plan_token_blocks(token_embeddings, codes, n_digits, groups, seed)
        return {"method": "token_blocks", "blocks": blocks}

    reducer = ItemReducer(token_embeddings, codes, cfg.approx_dim, cfg.approx_fit_sample, seed, cfg.approx_projection)
    train_size = min(cfg.approx_train_size, codes.shape[0])
    if cfg.approx_method == "ivf_blocks":
        nlist = cfg.approx_nlist or max(1, codes.shape[0] // 256)
        plan = plan_ivf(reducer.project_all(codes), nlist, cfg.approx_nprobe, seed, train_size)
        return {"method": "ivf_blocks", "plan": plan}
    index = build_index(reducer, codes, cfg.approx_index, cfg.approx_params, train_size, seed)
    blob = faiss.serialize_index(index)  # uint8 numpy array: no pickle of faiss objects
    del index
    return {"method": "faiss_index", "index": blob, "reducer": reducer,
            "n_candidates": max(cfg.approx_candidates, n_edges)}


def _describe(approx: dict[str, Any], cfg: GraphConfig) -> dict[str, Any]:
    """What the manifest says about the approximate method actually used."""
    if approx["method"] == "token_blocks":
        blocks = approx["blocks"]
        return {"approx_method": "token_blocks", "approx_digits": int(len(blocks.digits)),
                "approx_token_groups": int(blocks.offsets.shape[1] - 1),
                "candidates_per_item_mean": pairs_per_item(blocks)}
    out = {"approx_method": approx["method"], "approx_projection": cfg.approx_projection, "approx_dim": cfg.approx_dim}
    if approx["method"] == "ivf_blocks":
        plan = approx["plan"]
        sizes = np.diff(plan.offsets)
        out.update(approx_nlist=int(len(sizes)), approx_nprobe=int(plan.probes.shape[1]),
                   candidates_per_item_mean=float((sizes * sizes[plan.probes].sum(axis=1)).sum() / max(sizes.sum(), 1)))
    else:
        out.update(approx_index=cfg.approx_index, approx_params=cfg.approx_params,
                   candidates_per_item_mean=float(approx["n_candidates"]))
    return out


class _LocalWorkers:
    """One ``GraphWorker`` in this process; tasks on a thread pool, each op single-threaded."""

    def __init__(self, tables, codes, n_edges: int, cfg: GraphConfig, approx) -> None:
        self.threads = cfg.local_threads or torch.get_num_threads()
        self.worker = GraphWorker(tables.numpy(), codes.numpy(), n_edges, cfg.item_chunk, cfg.block_size, 0, approx)

    def run(self, tasks: list[tuple[str, tuple]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                yield from pool.map(lambda t: getattr(self.worker, t[0])(*t[1]), tasks)
        finally:
            torch.set_num_threads(saved)

    def exact(self, rows: np.ndarray) -> np.ndarray:
        parts = np.array_split(rows, self.threads)
        return np.concatenate(list(self.run([("exact", (p,)) for p in parts if len(p)])))

    def close(self) -> None:
        pass


class _RayWorkers:
    """``GraphWorker`` actors behind an ``ActorPool``; shared inputs go to the object store once."""

    def __init__(self, tables, codes, n_edges: int, cfg: GraphConfig, approx) -> None:
        import ray

        remote = ray.remote(GraphWorker).options(num_cpus=cfg.num_cpus_per_actor)
        tables_ref, codes_ref = ray.put(tables.numpy()), ray.put(codes.numpy())
        approx_ref = ray.put(approx) if approx is not None else None
        self.actors = [
            remote.remote(tables_ref, codes_ref, n_edges, cfg.item_chunk, cfg.block_size, cfg.threads_per_actor, approx_ref)
            for _ in range(cfg.num_actors)
        ]

    def run(self, tasks: list[tuple[str, tuple]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from ray.util import ActorPool

        yield from ActorPool(self.actors).map_unordered(lambda actor, t: getattr(actor, t[0]).remote(*t[1]), tasks)

    def exact(self, rows: np.ndarray) -> np.ndarray:
        import ray

        parts = np.array_split(rows, len(self.actors))
        return np.concatenate(ray.get([a.exact.remote(p) for a, p in zip(self.actors, parts) if len(p)]))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def _tasks(n_items: int, block_size: int, approx, workers: int) -> list[tuple[str, tuple]]:
    """(method name, arguments) per task: row ranges, or groups of whole IVF lists of ~block_size items."""
    if approx is not None and approx["method"] == "token_blocks":
        # Large tasks, so that each token group holds many of a task's queries (they share the
        # group's block), but at least TASKS_PER_WORKER per worker to keep the workers balanced.
        size = int(np.clip(-(-n_items // (TASKS_PER_WORKER * workers)), block_size, block_size * TOKEN_TASK_BLOCKS))
        return [("token_rows", (lo, min(lo + size, n_items))) for lo in range(0, n_items, size)]
    if approx is None or approx["method"] == "faiss_index":
        return [("block", (lo, min(lo + block_size, n_items))) for lo in range(0, n_items, block_size)]
    sizes = np.diff(approx["plan"].offsets)
    tasks, group, filled = [], [], 0
    for list_id, size in enumerate(sizes.tolist()):
        group.append(list_id)
        filled += size
        if filled >= block_size:
            tasks.append(("lists", (group,)))
            group, filled = [], 0
    if group:
        tasks.append(("lists", (group,)))
    return tasks


def _collect(results: Iterator[tuple[np.ndarray, np.ndarray]], n_items: int, n_edges: int) -> np.ndarray:
    """Every task's (rows, lists) into one (N, k) int32 array, logging progress."""
    neighbors = np.full((n_items, n_edges), -1, np.int32)
    done = 0
    for rows, found in results:
        neighbors[rows] = found
        done += len(rows)
        if done * 10 // n_items > (done - len(rows)) * 10 // n_items:
            log.info("graph: %d/%d items", done, n_items)
    return neighbors


def _recall(workers, neighbors: np.ndarray, sample_size: int, seed: int) -> dict[str, Any]:
    """Recall of the approximate lists against exact ones on a random sample of items."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(neighbors), min(sample_size, len(neighbors)), replace=False))
    exact = workers.exact(sample)
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
