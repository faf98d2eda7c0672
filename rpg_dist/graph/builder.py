"""The graph builder: neighbour lists block by block, in this process or on Ray actors.

Item rows are split into blocks of ``block_size`` (or, in approximate mode, groups of whole IVF
lists). Catalogues up to ``local_max_items`` run on a thread pool in this process (the kernels
release the GIL); larger ones on an ``ActorPool`` of ``GraphWorker`` actors, each holding the
(m, V, V) digit tables and the (N, m) int16 codes (~64 bytes per item), plus in approximate mode a
copy of the faiss index. Both paths run the same ``GraphWorker`` methods, so they return the same
lists.

``build_item_graph`` returns the lists to this process, then partitions the graph (balanced k-means,
refined by label propagation on the lists). ``stream_item_graph`` (the stage, for catalogues above
``stream_min_items``) partitions first from the codes alone, and every worker writes
the parts of its own tasks as they finish (``PartWriter``): no process ever holds the whole graph,
only the driver's (N,) partition array and each task's lists. Its label propagation then reads the
written parts back one at a time (the (N, P) neighbour counts are the largest state) and rewrites
them by the refined partition before the commit: the partitions the in-memory build gives. Both
measure the approximate mode's recall on a sample of items.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rpg_dist.graph.approx import ItemReducer, approx_neighbors, build_index, ivf_list_neighbors, plan_ivf
from rpg_dist.graph.config import GraphConfig
from rpg_dist.graph.exact import exact_neighbors
from rpg_dist import io
from rpg_dist.data.items import ItemIndex
from rpg_dist.graph.partition import (
    cross_fraction, crossing_edges, kmeans_partition, neighbor_counts, refine_partition, refine_with_counts,
)
from rpg_dist.graph.store import ROWS_PER_FILE, new_build_tag, part_name, read_part, write_part
from rpg_dist.graph.similarity import digit_similarity_tables
from rpg_dist.graph.token_blocks import default_groups, pairs_per_item, plan_token_blocks, token_block_neighbors
from rpg_dist.graph.token_pairs import (
    PairShare, choose_shared, lockstep, new_share, sharing_fraction, token_pair_neighbors,
)

log = logging.getLogger(__name__)

# token_blocks tasks hold up to this many blocks of block_size query rows (64 x 1024 = 65,536 at the
# defaults: ~256 queries per token group of 256, so each group's block is shared by 4 sub-blocks of 64).
TOKEN_TASK_BLOCKS = 64
TASKS_PER_WORKER = 4
# token_pairs without a recall sample still needs exact lists to choose the shared tokens from.
SHARED_SAMPLE = 200


@dataclass
class BuiltGraph:
    """Neighbour lists (dense rows) and partitions, plus what the manifest and stats report."""

    neighbors: np.ndarray  # (N, k) int32 rows, best first, -1 padded
    partition: np.ndarray  # (N,) int32
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamedGraph:
    """What ``stream_item_graph`` wrote: the parts of each partition, their digests, manifest info and stats."""

    files: dict[str, list[str]]
    digests: dict[str, str]
    info: dict[str, Any]
    stats: dict[str, Any]


class PartWriter:
    """Worker side of a streamed build: a task's lists become one part file per partition among its rows.

    Args:
        graph_dir: the run's graph folder.
        item_ids: (N,) int64 item id of each dense row.
        partition: (N,) int32 partition of each row, fixed before any list is computed.
        sample: sorted rows whose lists are sent back for the recall check.
    """

    def __init__(self, graph_dir: str, item_ids: np.ndarray, partition: np.ndarray, sample: np.ndarray,
                 storage: Any = None) -> None:
        self.graph_dir, self.storage, self.tag = graph_dir, storage, new_build_tag()
        self.item_ids, self.partition, self.sample = item_ids, partition, sample

    def write(self, task: int, rows: np.ndarray, lists: np.ndarray) -> dict[str, Any]:
        """Write the (r, k) ``lists`` of ``rows`` as parts of their partitions, in files of up to
        ROWS_PER_FILE rows (so a task of millions of rows never converts them all at once); returns
        what the driver merges."""
        owner = self.partition[rows]
        report: dict[str, Any] = {"files": {}, "digests": {}, "rows": len(rows), "degree_min": 0, "degree_sum": 0,
                                  "cross_edges": 0}
        lows = []
        for part in np.unique(owner).tolist():
            mine = np.flatnonzero(owner == part)
            for chunk, lo in enumerate(range(0, len(mine), ROWS_PER_FILE)):
                at = mine[lo : lo + ROWS_PER_FILE]
                chunk_lists = lists[at]  # (c, k)
                name = part_name(part, chunk, self.tag, task)
                report["digests"][name] = write_part(self.graph_dir, name, self.item_ids, rows[at], chunk_lists, part,
                                                     self.storage)
                report["files"].setdefault(part, []).append(name)
                valid = chunk_lists >= 0
                degree = valid.sum(axis=1)
                lows.append(int(degree.min()))
                report["degree_sum"] += int(degree.sum())
                report["cross_edges"] += int((self.partition[chunk_lists[valid]] != part).sum())
        report["degree_min"] = min(lows, default=0)
        sampled = np.isin(rows, self.sample)
        report["sample_rows"], report["sample_lists"] = rows[sampled], lists[sampled]
        return report


class GraphWorker:
    """Neighbour lists for blocks of items, exact or approximate (a Ray actor, or in-process).

    ``approx`` holds the approximate method's shared state: ``{"method": "faiss_index", "index":
    serialised faiss index, "reducer", "n_candidates"}`` or ``{"method": "ivf_blocks", "plan"}``.
    """

    def __init__(self, tables: np.ndarray, codes: np.ndarray, n_edges: int, item_chunk: int,
                 query_block: int, threads: int, approx: dict[str, Any] | None = None,
                 writer: PartWriter | None = None) -> None:
        if not logging.getLogger().handlers:
            # A Ray actor's root logger has no handler: the kernels' progress lines (INFO) would be
            # dropped. stderr, which Ray forwards to the driver.
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if threads:
            torch.set_num_threads(threads)
        self.tables = torch.from_numpy(np.array(tables))  # (m, V, V), writable copy
        with warnings.catch_warnings():
            # Ray hands an actor the object store's read-only pages: only read here, so not copied
            # (at 10M items a copy is 640 MB per actor).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.codes = torch.from_numpy(codes)  # (N, m) int16
        self.n_edges = n_edges
        self.item_chunk = item_chunk
        self.query_block = query_block
        self.approx = approx or {}
        self.writer = writer
        self.threads = threads
        self.shares: dict[int, PairShare] = {}  # token pairs, streamed: the shares this worker holds
        if self.approx.get("method") == "faiss_index":
            import faiss

            faiss.omp_set_num_threads(threads)
            self.index = faiss.deserialize_index(self.approx["index"])

    def stream(self, method: str, args: tuple, task: int) -> dict[str, Any]:
        """Run ``method(*args)`` and write its lists as this task's parts (``PartWriter.write``)."""
        rows, lists, *counts = getattr(self, method)(*args)
        return {**self.writer.write(task, rows, lists), "counts": counts[0] if counts else {}}

    def start_share(self, owner: np.ndarray, share: int, min_shared: int) -> list[tuple[int, int]]:
        """token_pairs, streamed: hold share ``share`` of the rows (``owner``: (N,) share of each row),
        empty lists; returns the digit pairs to step through (``token_pairs.lockstep``)."""
        self.shares[share] = new_share(self.tables, self.codes, self.n_edges, min_shared,
                                       self.threads or torch.get_num_threads(), np.asarray(owner), share)
        return self.shares[share].digit_pairs

    def share_step(self, share: int, first: int, second: int, *inbox) -> tuple:
        """One digit pair of a share (``PairShare.step``): (its roots, an outbox per share)."""
        return self.shares[share].step(first, second, list(inbox))

    def finish_share(self, share: int, *inbox) -> dict[str, Any]:
        """A share's last inbox taken; rows with fewer partners than n_edges get their exact lists, and
        the share's lists are written as its parts (task = share). Returns the writer's report."""
        rows, found, counts = self.shares.pop(share).finish(list(inbox))
        completed = _complete_short_lists(found, rows, self.exact)
        return {**self.writer.write(share, rows, found), "counts": {**counts, "rows_completed_exactly": completed}}

    def token_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """token_blocks: neighbours of ``rows`` over their shared-token blocks."""
        rows = np.asarray(rows, np.int64)
        found = token_block_neighbors(self.tables, self.codes, self.approx["blocks"], rows, self.n_edges)
        return rows, found.to(torch.int32).numpy()

    def block(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of ``rows``: (rows, (len(rows), k) int32), exact or via the faiss index."""
        rows = torch.from_numpy(np.asarray(rows, np.int64))
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
        rows = torch.from_numpy(np.array(rows, np.int64))  # a copy: Ray hands actors read-only arrays
        found = exact_neighbors(self.tables, self.codes, rows, self.n_edges, self.item_chunk)
        return found.to(torch.int32).numpy()


@dataclass
class _Setup:
    """What both builds share: the tables, the codes, the resolved mode and the approximate method."""

    tables: torch.Tensor  # (m, V, V)
    codes16: torch.Tensor  # (N, m) int16
    n_edges: int
    mode: str
    approx: dict[str, Any] | None
    info: dict[str, Any]
    timings: dict[str, float]
    local: bool


def _setup(token_embeddings: torch.Tensor, codes: torch.Tensor, cfg: GraphConfig, seed: int,
           streamed: bool = False) -> _Setup:
    n_items = codes.shape[0]
    clock = time.perf_counter()
    tables = digit_similarity_tables(token_embeddings)  # (m, V, V)
    mode = cfg.resolved_mode(n_items)
    n_edges = min(cfg.n_edges, max(n_items - 1, 1))
    approx, info, timings = None, {}, {}
    if mode == "approx":
        approx = _approx_payload(token_embeddings, codes, cfg, n_edges, seed)
        timings["approx_index_s"] = time.perf_counter() - clock
        info = _describe(approx, cfg)
    # token_pairs builds in this process (its lists are its state) unless streamed; so does the
    # exact recall sample.
    local = n_items <= cfg.local_max_items or (is_token_pairs(approx) and not streamed)
    return _Setup(tables, codes.to(torch.int16).contiguous(), n_edges, mode, approx, info, timings, local)


def _workers(setup: _Setup, cfg: GraphConfig, writer: PartWriter | None = None):
    cls = _LocalWorkers if setup.local else _RayWorkers
    return cls(setup.tables, setup.codes16, setup.n_edges, cfg, setup.approx, writer)


def _info(setup: _Setup, cfg: GraphConfig, partition: np.ndarray, method: str, cross: float) -> dict[str, Any]:
    n_items = len(partition)
    return {
        "n_items": n_items,
        "n_edges": setup.n_edges,
        "mode": setup.mode,
        "workers": "in-process threads" if setup.local else f"{cfg.num_actors} Ray actors",
        "n_partitions": int(partition.max()) + 1 if n_items else 0,
        "partition_method": method,
        "partition_sizes": np.bincount(partition, minlength=cfg.n_partitions).tolist(),
        "cross_partition_edge_fraction": cross,
        **setup.info,
        "timings_s": setup.timings,
    }


def build_item_graph(token_embeddings: torch.Tensor, codes: torch.Tensor, cfg: GraphConfig, seed: int = 0) -> BuiltGraph:
    """Build, partition and (approximate mode) recall-check the kNN graph, lists returned in memory.

    Ray must be initialised when the catalogue exceeds ``cfg.local_max_items``.

    Args:
        token_embeddings: (m, V, d) trained token table.
        codes: (N, m) item codes (dense rows).
        cfg: the graph config.
        seed: seeds the reduction sample, index training, k-means and the recall sample.
    """
    n_items = codes.shape[0]
    setup = _setup(token_embeddings, codes, cfg, seed)
    workers = _workers(setup, cfg)
    try:
        neighbors, stats = None, {}
        sample = _recall_sample(n_items, cfg.recall_sample, seed) if setup.mode == "approx" and cfg.recall_sample else None
        exact_sample = None
        if is_token_pairs(setup.approx):
            # The sample's exact lists come first: they choose how many tokens a pair must share.
            chooser, exact_chooser, exact_sample = _chooser_lists(workers, sample, n_items, seed, setup.timings)
            neighbors = _token_pairs(setup, cfg, token_embeddings, codes, chooser, exact_chooser, workers, seed)
            if neighbors is None:  # fell back to token blocks, whose workers hold the blocks
                workers.close()
                workers = _workers(setup, cfg)
        if neighbors is None:
            clock = time.perf_counter()
            tasks = _tasks(np.arange(n_items), cfg.block_size, setup.approx, workers.count)
            neighbors = _collect(workers.run(tasks), n_items, setup.n_edges)
            setup.timings["neighbors_s"] = time.perf_counter() - clock
        if sample is not None:
            if exact_sample is None:
                exact_sample = _exact_sample(workers, sample, setup.timings)
            stats = _recall_stats(neighbors[sample], exact_sample)
    finally:
        workers.close()
    clock = time.perf_counter()
    partition, method = _partition(token_embeddings, codes, neighbors, cfg, seed)
    setup.timings["partition_s"] = time.perf_counter() - clock
    info = _info(setup, cfg, partition, method, cross_fraction(partition, neighbors))
    degree = (neighbors >= 0).sum(axis=1)
    stats.update(degree_min=int(degree.min()) if n_items else 0, degree_mean=float(degree.mean()) if n_items else 0.0)
    return BuiltGraph(neighbors=neighbors, partition=partition, info=info, stats=stats)


def is_token_pairs(approx: dict[str, Any] | None) -> bool:
    """Whether the approximate method is token pairs (built in this process unless streamed)."""
    return approx is not None and approx["method"] == "token_pairs"


def _exact_sample(workers, sample: np.ndarray | None, timings: dict[str, float]) -> np.ndarray | None:
    """Exact lists of the recall sample (None without one)."""
    if sample is None:
        return None
    clock = time.perf_counter()
    exact = workers.exact(sample)
    timings["recall_s"] = time.perf_counter() - clock
    return exact


def _token_pairs(setup: _Setup, cfg: GraphConfig, token_embeddings, codes, sample, exact_sample, workers,
                 seed: int) -> np.ndarray | None:
    """Token-pair lists, with the shared tokens given or chosen from the sample; None when even
    two shared tokens hold too little of the sample's lists (then ``setup`` holds a token-blocks plan).

    Items that share the tokens with fewer than n_edges others (isolated ones) get exact lists, so
    every list is full and graph decoding can leave every item."""
    shared = _shared_tokens(setup, cfg, token_embeddings, codes, sample, exact_sample, seed)
    if shared < 2:
        return None
    clock = time.perf_counter()
    threads = cfg.local_threads or torch.get_num_threads()
    neighbors, counts = token_pair_neighbors(setup.tables, setup.codes16, setup.n_edges, shared, threads)
    completed = _complete_short_lists(neighbors, np.arange(len(neighbors)), workers.exact)
    setup.timings["neighbors_s"] = time.perf_counter() - clock
    _token_pair_info(setup, {**counts, "rows_completed_exactly": completed}, len(codes), threads)
    return neighbors


def _complete_short_lists(lists: np.ndarray, rows: np.ndarray, exact) -> int:
    """Token pairs: the lists of ``rows`` (-1 padded, (r, k)) holding fewer than k items (isolated
    items) replaced in place by ``exact(rows)``, so graph decoding can leave every item; returns how many."""
    short = np.flatnonzero((lists >= 0).sum(axis=1) < lists.shape[1])
    if len(short):
        lists[short] = exact(rows[short])
    return len(short)


def _shared_tokens(setup: _Setup, cfg: GraphConfig, token_embeddings, codes, sample, exact_sample, seed: int) -> int:
    """r for token pairs, given or chosen from the sample's exact lists (recorded in ``setup.info``);
    below 2 ``setup`` is switched to a token-blocks plan (its workers must be made anew)."""
    codes_np = codes.numpy()
    shared = cfg.approx_shared_digits or choose_shared(codes_np, sample, exact_sample, cfg.approx_target_recall)
    held = sharing_fraction(codes_np, sample, exact_sample, max(shared, 2)) if sample is not None else None
    if shared < 2:
        log.warning("graph: only %.3f of the sampled neighbours share 2 tokens with their item (target %.2f): "
                    "token_blocks instead of token_pairs", held, cfg.approx_target_recall)
        blocks = dataclasses.replace(cfg, approx_method="token_blocks")
        setup.approx = _approx_payload(token_embeddings, codes, blocks, setup.n_edges, seed)
        setup.info = {**_describe(setup.approx, blocks), "approx_fallback_from": "token_pairs"}
        setup.local = len(codes_np) <= cfg.local_max_items
        return shared
    log.info("graph: token pairs sharing >= %d tokens (%s of the recall sample's exact lists share as many)",
             shared, "n/a" if held is None else f"{held:.4f}")
    setup.info.update(approx_shared_digits=shared, shared_digits_from="config" if cfg.approx_shared_digits else
                      f"recall sample (target {cfg.approx_target_recall})", sample_entries_sharing=held)
    return shared


def _token_pair_info(setup: _Setup, counts: dict[str, Any], n_items: int, threads: int) -> None:
    """The kernel's counts (summed over a streamed build's tasks) into the graph's info."""
    setup.info.update(pairs_visited=counts["visited"], pairs_scored=counts["scored"],
                      candidates_per_item_mean=2 * counts["scored"] / max(n_items, 1), threads=threads,
                      bucket_digits=counts["width"], pair_sort_s=round(counts["sort_s"], 2),
                      pair_visit_s=round(counts["visit_s"], 2),
                      rows_completed_exactly=int(counts["rows_completed_exactly"]))


def stream_item_graph(token_embeddings: torch.Tensor, codes: torch.Tensor, cfg: GraphConfig, graph_dir: str,
                      item_ids: np.ndarray, storage: Any = None, seed: int = 0) -> StreamedGraph:
    """Partition, then build with every worker writing its tasks' parts under ``graph_dir`` as they finish.

    Commit the result with ``store.commit_graph``; until then the run's current graph is untouched.
    Memory here: the (N,) partition and the recall sample's lists; never the (N, k) lists.

    Args:
        item_ids: (N,) int64 item id of each dense row (part files hold ids, not rows).
        Others as ``build_item_graph``.
    """
    n_items = codes.shape[0]
    setup = _setup(token_embeddings, codes, cfg, seed, streamed=True)
    clock = time.perf_counter()
    partition, method = _partition(token_embeddings, codes, None, cfg, seed)
    setup.timings["partition_s"] = time.perf_counter() - clock
    sample = _recall_sample(n_items, cfg.recall_sample, seed) if setup.mode == "approx" else np.empty(0, np.int64)
    item_ids = np.asarray(item_ids, np.int64)
    writer = PartWriter(graph_dir, item_ids, partition, sample, storage)
    workers = _workers(setup, cfg, writer)
    try:
        shared, exact_sample = 0, None
        if is_token_pairs(setup.approx):
            shared, exact_sample = _streamed_shared_tokens(setup, cfg, token_embeddings, codes, sample, workers, seed)
            if shared < 2:  # token blocks instead: new workers hold its plan
                workers.close()
                workers = _workers(setup, cfg, writer)
        merged = _stream_lists(setup, cfg, workers, partition, shared)
        stats = _streamed_recall(setup, sample, merged, exact_sample, workers)
    finally:
        workers.close()
    files, digests, cross_edges = merged["files"], merged["digests"], merged["cross_edges"]
    if cfg.refine_rounds and n_items and partition.max() > 0:
        clock = time.perf_counter()
        parts = _WrittenParts(graph_dir, [name for names in files.values() for name in names], digests,
                              ItemIndex(item_ids), setup.n_edges, storage)
        partition, files, digests, cross_edges = _refine_written(parts, partition, files, digests, cross_edges,
                                                                 cfg.refine_rounds)
        method += (f", then up to {cfg.refine_rounds} rounds of balanced label propagation over the written "
                   "parts (streamed build)")
        setup.timings["refine_s"] = time.perf_counter() - clock
    info = _info(setup, cfg, partition, method, cross_edges / max(merged["degree_sum"], 1))
    stats.update(degree_min=merged["degree_min"], degree_mean=merged["degree_sum"] / max(n_items, 1))
    return StreamedGraph(files=files, digests=digests, info=info, stats=stats)


def _chooser_lists(workers, sample: np.ndarray | None, n_items: int, seed: int, timings: dict[str, float]):
    """Token pairs: the rows whose exact lists choose r (the recall sample, or SHARED_SAMPLE rows
    without one) and those lists; returns (rows, their exact lists, the recall sample's exact lists
    or None without a sample)."""
    has_sample = sample is not None and len(sample) > 0
    chooser = sample if has_sample else _recall_sample(n_items, SHARED_SAMPLE, seed)
    exact_chooser = _exact_sample(workers, chooser, timings)
    return chooser, exact_chooser, exact_chooser if has_sample else None


def _streamed_shared_tokens(setup: _Setup, cfg: GraphConfig, token_embeddings, codes, sample: np.ndarray, workers,
                            seed: int) -> tuple[int, np.ndarray | None]:
    """Token pairs, streamed: r chosen as ``_chooser_lists`` says; returns r and the recall sample's
    exact lists (None without one)."""
    chooser, exact_chooser, exact_sample = _chooser_lists(workers, sample, codes.shape[0], seed, setup.timings)
    return _shared_tokens(setup, cfg, token_embeddings, codes, chooser, exact_chooser, seed), exact_sample


def _stream_lists(setup: _Setup, cfg: GraphConfig, workers, partition: np.ndarray, shared: int) -> dict[str, Any]:
    """Every worker's tasks run, each writing its parts; returns ``_merge_reports`` of them.

    Token pairs: one share of the rows per worker (whole partitions where it can), run in lockstep
    (``token_pairs.lockstep``); other methods the usual tasks."""
    clock = time.perf_counter()
    # Rows grouped by partition, so a task's rows mostly fall in one partition.
    order = np.argsort(partition, kind="stable")
    if is_token_pairs(setup.approx):
        owner = np.empty(len(partition), np.int32)
        for share, rows in enumerate(np.array_split(order, workers.count)):
            owner[rows] = share
        merged = _merge_reports(workers.token_pair_shares(owner, shared), len(partition))
    else:
        tasks = _tasks(order, cfg.block_size, setup.approx, workers.count)
        streamed = [("stream", (name, args, task)) for task, (name, args) in enumerate(tasks)]
        merged = _merge_reports(workers.run(streamed), len(partition))
    setup.timings["neighbors_s"] = time.perf_counter() - clock
    if is_token_pairs(setup.approx):
        _token_pair_info(setup, merged["counts"], len(partition), cfg.threads_per_actor if not setup.local else 1)
        setup.info.update(offers_between_shares=merged["counts"]["sent"])
    return merged


def _streamed_recall(setup: _Setup, sample: np.ndarray, merged: dict[str, Any], exact_sample: np.ndarray | None,
                     workers) -> dict[str, Any]:
    """Recall of the sampled rows' written lists against their exact lists ({} without a sample)."""
    if not len(sample):
        return {}
    clock = time.perf_counter()
    found = np.full((len(sample), setup.n_edges), -1, np.int32)
    found[np.searchsorted(sample, merged["sample_rows"])] = merged["sample_lists"]
    stats = _recall_stats(found, exact_sample if exact_sample is not None else workers.exact(sample))
    setup.timings["recall_s"] = time.perf_counter() - clock
    return stats


def _refine_written(parts: _WrittenParts, partition: np.ndarray, files: dict[str, list[str]],
                    digests: dict[str, str], cross_edges: int, rounds: int):
    """Label propagation over the written parts; when it moves rows, the parts are rewritten under the
    refined partition. Returns (partition, files, digests, cross_edges)."""
    n_parts = int(partition.max()) + 1
    refined, counts = refine_with_counts(partition, lambda owner: parts.neighbor_counts(owner, n_parts), rounds)
    if np.array_equal(refined, partition):
        return partition, files, digests, cross_edges
    files, digests = parts.rewrite(refined)
    return refined, files, digests, crossing_edges(refined, counts)


@dataclass
class _WrittenParts:
    """A streamed build's part files (not committed yet), read back one at a time: memory one part."""

    graph_dir: str
    names: list[str]
    digests: dict[str, str]
    index: ItemIndex
    n_edges: int
    storage: Any

    def lists(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(name, (r,) rows, (r, k) neighbour rows) of each part."""
        for name in self.names:
            part = read_part(io.join(self.graph_dir, name), self.digests[name], self.index, self.n_edges, self.storage)
            yield name, part.rows, part.neighbors

    def neighbor_counts(self, partition: np.ndarray, n_parts: int) -> np.ndarray:
        """(N, P) float32 neighbours of each item in each partition, one pass over the parts."""
        counts = np.zeros((len(partition), n_parts), np.float32)
        for _, rows, lists in self.lists():
            counts[rows] = neighbor_counts(partition, lists, n_parts)
        return counts

    def rewrite(self, partition: np.ndarray) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Every row into parts of its ``partition`` (a new build tag; files of up to ROWS_PER_FILE
        rows, so memory is at most P such files); each old part removed once read. Returns the new
        (files, digests)."""
        tag, files, digests = new_build_tag(), {}, {}
        pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

        def flush(part: int, last: bool = False) -> None:
            # Whole files of ROWS_PER_FILE rows; the rest waits for more rows unless ``last``.
            rows, lists = (np.concatenate(a) for a in zip(*pending.pop(part)))
            for lo in range(0, len(rows), ROWS_PER_FILE):
                if len(rows) - lo < ROWS_PER_FILE and not last:
                    pending[part] = [(rows[lo:], lists[lo:])]
                    break
                name = part_name(part, len(files.setdefault(str(part), [])), tag)
                digests[name] = write_part(self.graph_dir, name, self.index.item_ids, rows[lo : lo + ROWS_PER_FILE],
                                           lists[lo : lo + ROWS_PER_FILE], part, self.storage)
                files[str(part)].append(name)

        for name, rows, lists in self.lists():
            owner = partition[rows]
            for part in np.unique(owner).tolist():
                pending.setdefault(part, []).append((rows[owner == part], lists[owner == part]))
                if sum(len(r) for r, _ in pending[part]) >= ROWS_PER_FILE:
                    flush(part)
            io.remove(io.join(self.graph_dir, name), self.storage)  # this build's: never committed
        for part in sorted(pending):
            flush(part, last=True)
        return {p: files[p] for p in sorted(files, key=int)}, digests


def _merge_reports(reports: Iterator[dict[str, Any]], n_items: int) -> dict[str, Any]:
    """Every task's ``PartWriter.write`` report into the manifest's files and the graph's counts."""
    files: dict[str, list[str]] = {}
    merged: dict[str, Any] = {"digests": {}, "degree_min": None, "degree_sum": 0, "cross_edges": 0, "counts": {}}
    sample_rows, sample_lists, done = [], [], 0
    for report in reports:
        for part, names in report["files"].items():
            files.setdefault(str(part), []).extend(names)
        merged["digests"].update(report["digests"])
        if report["rows"]:
            low = report["degree_min"]
            merged["degree_min"] = low if merged["degree_min"] is None else min(merged["degree_min"], low)
        merged["degree_sum"] += report["degree_sum"]
        merged["cross_edges"] += report["cross_edges"]
        for name, value in report.get("counts", {}).items():  # token pairs: the kernel's, summed over tasks
            merged["counts"][name] = value if name == "width" else merged["counts"].get(name, 0) + value
        sample_rows.append(report["sample_rows"])
        sample_lists.append(report["sample_lists"])
        done += report["rows"]
        if done * 10 // n_items > (done - report["rows"]) * 10 // n_items:
            log.info("graph: %d/%d items written", done, n_items)
    merged["files"] = {part: sorted(names) for part, names in sorted(files.items(), key=lambda kv: int(kv[0]))}
    merged["degree_min"] = merged["degree_min"] or 0
    merged["sample_rows"] = np.concatenate(sample_rows) if sample_rows else np.empty(0, np.int64)
    merged["sample_lists"] = np.concatenate(sample_lists) if sample_lists else np.empty((0, 0), np.int32)
    return merged


def _approx_payload(token_embeddings, codes, cfg: GraphConfig, n_edges: int, seed: int) -> dict[str, Any]:
    """Plan the blocks, or fit the reduction and the lists or index, once in the driver; workers get copies."""
    import faiss

    if cfg.approx_method == "token_pairs":
        return {"method": "token_pairs"}  # the shared tokens are chosen once the recall sample is exact
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
    if approx["method"] == "token_pairs":
        return {"approx_method": "token_pairs"}
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

    def __init__(self, tables, codes, n_edges: int, cfg: GraphConfig, approx, writer: PartWriter | None) -> None:
        self.threads = cfg.local_threads or torch.get_num_threads()
        self.count = self.threads  # tasks that run at once
        self.worker = GraphWorker(tables.numpy(), codes.numpy(), n_edges, cfg.item_chunk, cfg.block_size, 0, approx,
                                  writer)

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

    def token_pair_shares(self, owner: np.ndarray, min_shared: int) -> Iterator[dict[str, Any]]:
        """Token pairs, streamed: the shares of ``owner`` in lockstep, one after another on this
        process's threads; each writes its parts. Yields the writer's reports."""
        n_shares = int(owner.max()) + 1
        pairs = [self.worker.start_share(owner, s, min_shared) for s in range(n_shares)][0]
        yield from lockstep(n_shares, pairs, lambda s, first, second, inbox: self.worker.share_step(s, first, second,
                                                                                                     *inbox),
                            lambda s, inbox: self.worker.finish_share(s, *inbox))

    def close(self) -> None:
        pass


class _RayWorkers:
    """``GraphWorker`` actors behind an ``ActorPool``; shared inputs go to the object store once."""

    def __init__(self, tables, codes, n_edges: int, cfg: GraphConfig, approx, writer: PartWriter | None) -> None:
        import ray

        remote = ray.remote(GraphWorker).options(num_cpus=cfg.num_cpus_per_actor)
        tables_ref, codes_ref = ray.put(tables.numpy()), ray.put(codes.numpy())
        approx_ref = ray.put(approx) if approx is not None else None
        writer_ref = ray.put(writer) if writer is not None else None
        self.actors = [
            remote.remote(tables_ref, codes_ref, n_edges, cfg.item_chunk, cfg.block_size, cfg.threads_per_actor,
                          approx_ref, writer_ref)
            for _ in range(cfg.num_actors)
        ]
        self.count = len(self.actors)  # tasks that run at once

    def run(self, tasks: list[tuple[str, tuple]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from ray.util import ActorPool

        yield from ActorPool(self.actors).map_unordered(lambda actor, t: getattr(actor, t[0]).remote(*t[1]), tasks)

    def exact(self, rows: np.ndarray) -> np.ndarray:
        import ray

        parts = np.array_split(rows, len(self.actors))
        return np.concatenate(ray.get([a.exact.remote(p) for a, p in zip(self.actors, parts) if len(p)]))

    def token_pair_shares(self, owner: np.ndarray, min_shared: int) -> Iterator[dict[str, Any]]:
        """Token pairs, streamed: share s of ``owner`` on actor s, in lockstep. Every step is submitted
        at once: Ray runs each when the others' previous outputs exist, and frees those once taken.
        Yields the writer's reports as the shares finish."""
        import ray

        n_shares = len(self.actors)
        owner_ref = ray.put(owner)
        pairs = ray.get([a.start_share.remote(owner_ref, s, min_shared) for s, a in enumerate(self.actors)])[0]
        step = [a.share_step.options(num_returns=n_shares + 1) for a in self.actors]
        finished = lockstep(n_shares, pairs, lambda s, first, second, inbox: step[s].remote(s, first, second, *inbox),
                            lambda s, inbox: self.actors[s].finish_share.remote(s, *inbox))
        while finished:
            done, finished = ray.wait(finished)
            yield ray.get(done[0])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def _tasks(order: np.ndarray, block_size: int, approx, workers: int) -> list[tuple[str, tuple]]:
    """(method name, arguments) per task: consecutive slices of ``order`` (rows), or groups of whole
    IVF lists of ~block_size items."""
    n_items = len(order)
    if approx is not None and approx["method"] == "token_blocks":
        # Large tasks, so that each token group holds many of a task's queries (they share the
        # group's block), but at least TASKS_PER_WORKER per worker to keep the workers balanced.
        size = int(np.clip(-(-n_items // (TASKS_PER_WORKER * workers)), block_size, block_size * TOKEN_TASK_BLOCKS))
        return [("token_rows", (order[lo : lo + size],)) for lo in range(0, n_items, size)]
    if approx is None or approx["method"] == "faiss_index":
        return [("block", (order[lo : lo + block_size],)) for lo in range(0, n_items, block_size)]
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


def _recall_sample(n_items: int, sample_size: int, seed: int) -> np.ndarray:
    """Sorted rows whose approximate lists are checked against exact ones."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_items, min(sample_size, n_items), replace=False))


def _recall_stats(approx: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
    """Recall of (S, k) approximate lists against the exact (S, k) lists of the same items."""
    hits = (approx[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    per_item = hits.any(axis=1).sum(axis=1) / np.maximum((exact >= 0).sum(axis=1), 1)
    return {
        "recall_sample": int(len(approx)),
        f"recall@{approx.shape[1]}": float(per_item.mean()),
        "recall_min": float(per_item.min()),
        "recall_p10": float(np.quantile(per_item, 0.1)),
        "top1_agreement": float((approx[:, 0] == exact[:, 0]).mean()),
    }


def _partition(token_embeddings, codes, neighbors: np.ndarray | None, cfg: GraphConfig, seed: int) -> tuple[np.ndarray, str]:
    """Balanced k-means partitions, refined on the graph when its lists are here (``neighbors``;
    a streamed build refines over its written parts instead)."""
    n_parts = min(cfg.n_partitions, codes.shape[0])
    reducer = ItemReducer(token_embeddings, codes, cfg.partition_dim, min(cfg.approx_fit_sample, 4096), seed)
    partition = kmeans_partition(reducer.project_all(codes), n_parts, seed)
    method = f"balanced k-means (faiss, {n_parts} centroids) of {reducer.dim}-d reduced item vectors"
    if neighbors is not None and cfg.refine_rounds and n_parts > 1:
        partition = refine_partition(partition, neighbors, n_parts, cfg.refine_rounds)
        method += f", then up to {cfg.refine_rounds} rounds of balanced label propagation on the graph"
    return partition, method
