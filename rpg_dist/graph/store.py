"""The graph on storage: ``RUN_DIR/graph/part-PPPPP-CCCCC-TAG.parquet`` + ``manifest.json`` (+ ``stats.json``).

Each part holds rows of one partition: ``item_id`` int64, ``neighbors`` list<int64> (item ids, most
similar first), ``partition`` int32. ``manifest.json`` is the commit marker and lists each
partition's parts (a shard reads only its own). A build writes its parts under names carrying its
own TAG beside the current graph's, then replaces the manifest (one atomic write), then removes
every part the new manifest does not list: a crash at any point leaves the previous graph or the new
one, never a mix, and never loses the previous graph before the new one is complete.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rpg_dist import failpoints, io
from rpg_dist.artifacts import RunPaths, read_versioned_json
from rpg_dist.data.items import ItemIndex
from rpg_dist.errors import DataError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

FORMAT_VERSION = 1
ROWS_PER_FILE = 262_144


@dataclass
class ItemGraph:
    """Neighbour lists over dense item rows (the ``ItemIndex`` of the semantic IDs)."""

    rows: np.ndarray  # (n,) int64 dense rows these lists belong to (all items, or one partition's)
    neighbors: np.ndarray  # (n, k) int32 neighbour rows, best first, -1 padded
    partition: np.ndarray  # (n,) int32


def write_graph(
    run_dir: str,
    index: ItemIndex,
    neighbors: np.ndarray,
    partition: np.ndarray,
    manifest: dict[str, Any],
    stats: dict[str, Any],
    storage: StorageConfig | None = None,
) -> dict[str, Any]:
    """Write an in-memory graph: every partition's parts, then commit (``commit_graph``)."""
    tag = new_build_tag()
    graph_dir = RunPaths(run_dir).graph
    order = np.argsort(partition, kind="stable")  # rows grouped by partition, ascending inside each
    bounds = np.concatenate([[0], np.cumsum(np.bincount(partition))]) if len(partition) else np.zeros(1, np.int64)
    files: dict[str, list[str]] = {}
    digests: dict[str, str] = {}  # sha256 of each part: loading refuses an altered or truncated one
    for part in range(len(bounds) - 1):
        rows = order[bounds[part] : bounds[part + 1]]
        files[str(part)] = []
        for chunk, lo in enumerate(range(0, len(rows), ROWS_PER_FILE)):
            name = part_name(part, chunk, tag)
            chunk_rows = rows[lo : lo + ROWS_PER_FILE]
            digests[name] = write_part(graph_dir, name, index.item_ids, chunk_rows, neighbors[chunk_rows], part, storage)
            files[str(part)].append(name)
    return commit_graph(run_dir, manifest, stats, files, digests, storage)


def new_build_tag() -> str:
    """A fresh tag for one build's part names (they never collide with the current graph's)."""
    return uuid.uuid4().hex[:12]


def part_name(part: int, chunk: int, tag: str, task: int | None = None) -> str:
    """``part-PPPPP-CCCCC-TAG.parquet``: chunk C of partition P of build TAG; a streamed build's
    workers write ``part-PPPPP-TTTTT-CCCCC-TAG.parquet``, chunk C of their task T's rows."""
    if task is not None:
        return f"part-{part:05d}-{task:05d}-{chunk:05d}-{tag}.parquet"
    return f"part-{part:05d}-{chunk:05d}-{tag}.parquet"


def write_part(graph_dir: str, name: str, item_ids: np.ndarray, rows: np.ndarray, lists: np.ndarray, part: int,
               storage: StorageConfig | None = None) -> str:
    """One part file (temporary name, then committed): ``rows``' (r, k) neighbour ``lists`` of
    partition ``part``, rows and neighbours as item ids (``item_ids`` by dense row); returns its sha256."""
    digest = io.write_parquet(_table(item_ids, rows, lists, part), io.join(graph_dir, name), storage,
                              row_group_size=65_536)
    failpoints.reach("graph-part-written")
    return digest


def commit_graph(run_dir: str, manifest: dict[str, Any], stats: dict[str, Any], files: dict[str, list[str]],
                 digests: dict[str, str], storage: StorageConfig | None = None) -> dict[str, Any]:
    """Make parts already written the graph: ``manifest.json`` (the commit), ``stats.json``, then
    remove every part the manifest does not list (the previous graph's, a crashed build's)."""
    paths = RunPaths(run_dir)
    io.remove(paths.graph_stats, storage)  # never the previous graph's stats beside the new manifest
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files, "digests": digests}
    io.write_json(paths.graph_manifest, manifest, storage)
    io.write_json(paths.graph_stats, stats, storage)
    listed = {name for names in files.values() for name in names}
    for uri in io.list_files(paths.graph, ".parquet", storage):
        if uri.rsplit("/", 1)[-1] not in listed:
            io.remove(uri, storage)
    return manifest


def _table(item_ids: np.ndarray, rows: np.ndarray, lists: np.ndarray, part: int) -> pa.Table:
    valid = lists >= 0  # (r, k)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    values = item_ids[lists[valid]]  # row-major: each list keeps its order
    neighbors = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))
    return pa.table({
        "item_id": pa.array(item_ids[rows], pa.int64()),
        "neighbors": neighbors.cast(pa.list_(pa.int64())),
        "partition": pa.array(np.full(len(rows), part, np.int32)),
    })


def read_manifest(run_dir: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """``manifest.json`` of a complete graph.

    Raises:
        StageError: no (complete) graph under ``run_dir``.
    """
    return read_versioned_json(RunPaths(run_dir).graph_manifest, FORMAT_VERSION,
                               "no graph; run `rpg-dist build-graph` first", storage)


def load_graph(
    run_dir: str, index: ItemIndex, storage: StorageConfig | None = None, partition: int | None = None
) -> ItemGraph:
    """Read the whole graph (rows = 0..N-1 in order) or only ``partition``'s items.

    Raises:
        StageError: no graph.
        DataError: a file names an unknown item, a self-edge or a repeated neighbour (file, field, row).
    """
    manifest = read_manifest(run_dir, storage)
    names = manifest["files"].get(str(partition), []) if partition is not None else [
        name for part in sorted(manifest["files"], key=int) for name in manifest["files"][part]
    ]
    width = int(manifest["n_edges"])
    digests = manifest.get("digests", {})  # absent in graphs built before digests were recorded
    parts = [read_part(io.join(RunPaths(run_dir).graph, name), digests.get(name), index, width, storage)
             for name in names]
    rows = np.concatenate([p.rows for p in parts]) if parts else np.empty(0, np.int64)
    neighbors = np.concatenate([p.neighbors for p in parts]) if parts else np.empty((0, width), np.int32)
    part_of = np.concatenate([p.partition for p in parts]) if parts else np.empty(0, np.int32)
    order = np.argsort(rows, kind="stable")
    graph = ItemGraph(rows=rows[order], neighbors=neighbors[order], partition=part_of[order])
    if partition is None and not np.array_equal(graph.rows, np.arange(len(index))):
        raise DataError(f"{RunPaths(run_dir).graph}: the graph covers {len(rows)} rows, not the {len(index)} items")
    return graph


def load_partitions(run_dir: str, index: ItemIndex, storage: StorageConfig | None = None) -> np.ndarray:
    """(N,) int32 partition of every item, from the parts' ``item_id`` column only (what a sharded
    decoder's coordinator holds; the lists' bytes are not read here, and each shard checks its own
    parts' digests as it loads them).

    Raises:
        StageError: no graph.
        DataError: a file names an unknown item, or the parts do not cover the catalogue once.
    """
    manifest = read_manifest(run_dir, storage)
    partition = np.full(len(index), -1, np.int32)
    for part, names in manifest["files"].items():
        for name in names:
            uri = io.join(RunPaths(run_dir).graph, name)
            table = io.read_parquet(uri, storage, ["item_id"])
            partition[index.rows(table.column("item_id").to_numpy(), what=f"{uri}: field 'item_id'")] = int(part)
    if (partition < 0).any():
        raise DataError(f"{RunPaths(run_dir).graph}: {int((partition < 0).sum())} items are in no partition")
    return partition


def read_part(uri: str, digest: str | None, index: ItemIndex, width: int, storage: StorageConfig | None) -> ItemGraph:
    """One part file's rows, (r, width) neighbour rows and partition, checked against ``digest``."""
    table = io.read_parquet_verified(uri, digest, "rebuild it with `rpg-dist build-graph`", storage,
                                     ["item_id", "neighbors", "partition"])
    rows = index.rows(table.column("item_id").to_numpy(), what=f"{uri}: field 'item_id'")
    lists = table.column("neighbors").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
    if len(lengths) and lengths.max() > width:
        bad = int(np.argmax(lengths > width))
        raise DataError(f"{uri}: row {bad}: field 'neighbors' holds {lengths[bad]} items, more than n_edges={width}")
    flat = index.rows(pc.list_flatten(lists).to_numpy(), what=f"{uri}: field 'neighbors'")
    neighbors = np.full((len(rows), width), -1, np.int32)
    mask = np.arange(width)[None, :] < lengths[:, None]
    neighbors[mask] = flat
    _check_lists(uri, rows, neighbors)
    return ItemGraph(rows=rows, neighbors=neighbors, partition=table.column("partition").to_numpy().astype(np.int32))


def _check_lists(uri: str, rows: np.ndarray, neighbors: np.ndarray) -> None:
    """Reject self-edges and repeated neighbours: decoding relies on distinct lists."""
    self_edge = (neighbors == rows[:, None]).any(axis=1)
    ordered = np.sort(neighbors, axis=1)
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1)
    bad = np.flatnonzero(self_edge | repeated)
    if len(bad):
        row = int(bad[0])
        what = "lists the item itself" if self_edge[row] else "repeats an item"
        raise DataError(f"{uri}: row {row}: field 'neighbors' {what}")
