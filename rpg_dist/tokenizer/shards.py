"""Shards: the unit of work, commit, resume and retry of the tokenize stage.

A shard is a fixed slice of input rows (one row group range of one parquet file), planned on the
driver from parquet footers only, so a rerun plans the same shards. A worker writes the shard's part
file atomically, then its manifest ``part-KEY.FINGERPRINT.json``; the manifest is the commit marker.
Its name carries the fingerprint of everything the part depends on, so one listing tells which shards
are complete and current, without reading a file per shard (thousands of shards on S3).

Ray Data runs the shards: ``from_items(shard descriptors)`` -> ``map_batches(callable class,
batch_size=1, ActorPoolStrategy)``. Ray Data restarts dead actors and retries their shards
(``max_restarts=-1``, ``max_task_retries=-1``); since a retry rewrites the same part name with the
same content, every item ends up in exactly one committed part. Workers return errors as rows
instead of raising, because Ray wraps exceptions into types that lose our error class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import resource
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rpg_dist import errors, failpoints, io
from rpg_dist.artifacts import RunPaths

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".json"
# Worker environment, set before any library loads: OpenMP threads that sleep at barriers instead of
# spinning. Spinning collapses when cores are oversubscribed (2 faiss threads training PQ on a busy
# 2-core box: 65 s spinning vs 8 s passive), and a shared cluster node often is.
_OMP = "OMP_WAIT_POLICY"
_ERRORS = {cls.__name__: cls for cls in (errors.ConfigError, errors.DataError, errors.StorageError, errors.StageError)}


@dataclass(kw_only=True)
class Shard:
    """Rows ``offset .. offset+length`` of row group ``row_group`` of parquet ``file``."""

    key: str  # part name stem: "000012" for the dataset, "add-<digest>-000003" for --add batches
    file: str
    row_group: int
    offset: int
    length: int
    first_row: int  # row of the shard's first item within ``file`` (for error messages)


@dataclass(kw_only=True)
class PoolSpec:
    """Resources of one Ray Data actor pool."""

    concurrency: int
    num_cpus: float
    num_gpus: float = 0.0
    # Wait this long for every actor to be up before dispatching: all nodes share the work (the
    # first actor would otherwise take every shard of a short run), and a pool the cluster cannot
    # fit fails with a clear timeout instead of crawling on one actor.
    start_timeout_s: int = 600


def read_shard(shard: Shard, columns: list[str], storage: StorageConfig | None) -> pa.Table:
    """The shard's rows of ``columns``: its row group read on this thread (``io.open_parquet``), sliced."""
    fs, path = io.filesystem(shard.file, storage)
    with fs.open(path, "rb") as handle:
        group = io.open_parquet(handle).read_row_group(shard.row_group, columns=columns,
                                                       use_threads=io.PYTHON_FILE_THREADS)
    return group.slice(shard.offset, shard.length)


def plan_shards(uri: str, shard_size: int, storage: StorageConfig | None, prefix: str = "") -> list[Shard]:
    """Split every parquet file under ``uri`` into shards of at most ``shard_size`` rows.

    Shards never straddle a row group, so a worker reads one row group (bounded memory).
    """
    shards: list[Shard] = []
    for file_uri in io.parquet_files(uri, storage):
        meta = _parquet_metadata(file_uri, storage)
        first_row = 0
        for group in range(meta.num_row_groups):
            n_rows = meta.row_group(group).num_rows
            for offset in range(0, n_rows, shard_size):
                length = min(shard_size, n_rows - offset)
                key = f"{prefix}{len(shards):06d}"
                shards.append(Shard(key=key, file=file_uri, row_group=group, offset=offset,
                                    length=length, first_row=first_row + offset))
            first_row += n_rows
    return shards


def input_fingerprint(uri: str, storage: StorageConfig | None) -> str:
    """Digest of the input files' names, sizes and row counts (changes when the data does)."""
    parts = []
    for file_uri in io.parquet_files(uri, storage):
        fs, path = io.filesystem(file_uri, storage)
        parts.append([posixpath.basename(path), fs.size(path), _parquet_metadata(file_uri, storage).num_rows])
    return digest(parts)


def digest(*parts: Any) -> str:
    """Short stable hex digest of plain values (fingerprints embedded in file names)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def part_name(key: str) -> str:
    return f"part-{key}.parquet"


def manifest_name(key: str, fingerprint: str) -> str:
    return f"part-{key}.{fingerprint}{MANIFEST_SUFFIX}"


def committed(manifest_dir: str, storage: StorageConfig | None) -> dict[str, list[str]]:
    """``{key: [fingerprint, ...]}`` of every manifest under ``manifest_dir`` (one listing)."""
    found: dict[str, list[str]] = {}
    for uri in io.list_files(manifest_dir, MANIFEST_SUFFIX, storage):
        name = posixpath.basename(uri)[len("part-"):-len(MANIFEST_SUFFIX)]
        key, _, fingerprint = name.rpartition(".")
        found.setdefault(key, []).append(fingerprint)
    return found


def drop_stale(manifest_dir: str, fingerprints: dict[str, str], storage: StorageConfig | None,
               owned: Callable[[str], bool] = lambda key: True, part_dir: str | None = None) -> list[str]:
    """Delete manifests of ``owned`` keys whose fingerprint is not ``fingerprints[key]``, or (with
    ``part_dir``) whose part file is missing or not the size its manifest recorded.

    Their shards are then redone (or, for keys no longer planned, forgotten). Returns the keys that
    are complete and current.
    """
    done = []
    for key, found in committed(manifest_dir, storage).items():
        if not owned(key):
            continue
        for fingerprint in found:
            uri = io.join(manifest_dir, manifest_name(key, fingerprint))
            if fingerprints.get(key) == fingerprint and (part_dir is None or _part_intact(uri, part_dir, storage)):
                done.append(key)
            else:
                io.remove(uri, storage)
    return sorted(done)


def _part_intact(manifest_uri: str, part_dir: str, storage: StorageConfig | None) -> bool:
    """The shard's part file has the size recorded at commit (a truncated or rewritten part fails)."""
    manifest = io.read_json(manifest_uri, storage)
    if "part_bytes" not in manifest:  # committed before sizes were recorded
        return True
    part = io.join(part_dir, manifest["part"])
    try:
        size = io.size(part, storage)
    except FileNotFoundError:
        size = None
    if size != manifest["part_bytes"]:
        log.warning("%s: %s bytes, its manifest recorded %d: the shard is redone", part,
                    "missing" if size is None else size, manifest["part_bytes"])
        return False
    return True


def write_manifest(manifest_dir: str, key: str, fingerprint: str, storage: StorageConfig | None,
                   part_uri: str | None = None, **fields: Any) -> dict[str, Any]:
    """Commit a shard: its manifest records where and how it was produced, and the size of its part
    file (``part_uri``, already committed), which resume checks."""
    if part_uri is not None:
        fields = {"part": posixpath.basename(part_uri), "part_bytes": io.size(part_uri, storage), **fields}
    manifest = {
        "key": key,
        "fingerprint": fingerprint,
        "node_id": _node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        # ru_maxrss is in KiB on Linux: the process's peak so far, i.e. the worker's high-water mark.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "omp_wait_policy": os.environ.get(_OMP),
        **fields,
    }
    io.write_json(io.join(manifest_dir, manifest_name(key, fingerprint)), manifest, storage)
    return manifest


def read_manifests(manifest_dir: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Every shard manifest under ``manifest_dir``, in key order."""
    return [io.read_json(uri, storage) for uri in io.list_files(manifest_dir, MANIFEST_SUFFIX, storage)]


def shard_node_ids(run_dir: str, storage: StorageConfig | None = None, kind: str | None = None) -> list[str]:
    """Ray node id that produced each committed shard of a run (one entry per shard manifest).

    Args:
        kind: "embed" (text embedding shards), "encode" (OPQ encoding shards) or None for both.
    """
    paths = RunPaths(run_dir)
    dirs = {"embed": [paths.embedding_manifests], "encode": [paths.code_manifests]}
    chosen = dirs[kind] if kind else dirs["embed"] + dirs["encode"]
    return [m["node_id"] for d in chosen for m in read_manifests(d, storage)]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, Any]:
    """``runtime_env`` for tokenize workers (its env_vars merge with the job's own)."""
    return {"env_vars": {_OMP: os.environ.get(_OMP, "PASSIVE"), **(extra or {})}}


def run_shards(tasks: list[dict[str, Any]], worker_cls: type, worker_kwargs: dict[str, Any],
               pool: PoolSpec, what: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``worker_cls(**worker_kwargs)`` over shard descriptors on a Ray Data actor pool.

    Returns the manifests of the shards run, in completion order.

    Raises:
        DataError / ConfigError / StageError: re-raised from the first shard that reported one.
    """
    import ray

    if not tasks:
        return []
    with _data_context(enable_progress_bars=False, wait_for_min_actors_s=pool.start_timeout_s):
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            worker_cls,
            fn_constructor_kwargs=worker_kwargs,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(pool.concurrency, len(tasks))),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            runtime_env=worker_env(env),
            # Ray Data places pool actors with its default "SPREAD" strategy: every node of a cluster
            # works, and one node's death loses the least.
        )
        return _collect(ds, len(tasks), what)


def _collect(ds, n_tasks: int, what: str) -> list[dict[str, Any]]:
    """Manifests of the finished shards; the first error row is raised as its own error class."""
    manifests = []
    start = time.perf_counter()
    for row in _iter_rows(ds):
        if row["error_type"]:
            raise _ERRORS.get(row["error_type"], errors.StageError)(row["error"])
        manifests.append(json.loads(row["manifest"]))
        failpoints.reach("shard-collected")
        if len(manifests) % max(1, n_tasks // 10) == 0 or len(manifests) == n_tasks:
            log.info("%s: %d/%d shards, %.1f s", what, len(manifests), n_tasks, time.perf_counter() - start)
    return manifests


@contextlib.contextmanager
def _data_context(**values: Any) -> Iterator[None]:
    """Set Ray Data context fields for this stage only (the context is process-global)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in values}
    for name, value in values.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


def _iter_rows(ds) -> Iterator[dict[str, Any]]:
    # Stopping the iteration early (on an error row) shuts the actor pool down.
    yield from ds.iter_rows()


class ShardWorker:
    """Base of the Ray Data callable classes: one shard descriptor in, its manifest (or error) out.

    Subclasses implement ``run(shard) -> manifest``.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shard = shard_from_row(batch, Shard)
        try:
            manifest = self.run(shard)
        except errors.RpgDistError as err:
            return result_row(error=err)
        failpoints.reach("shard-committed")
        return result_row(manifest=manifest)

    def run(self, shard: Shard) -> dict[str, Any]:
        raise NotImplementedError


def result_row(manifest: dict[str, Any] | None = None, error: errors.RpgDistError | None = None) -> dict[str, np.ndarray]:
    """The one-row batch a worker returns: the shard's manifest, or the error it hit."""
    return {
        "manifest": np.array([json.dumps(manifest) if manifest else ""], dtype=object),
        "error_type": np.array([type(error).__name__ if error else ""], dtype=object),
        "error": np.array([str(error) if error else ""], dtype=object),
    }


def shard_from_row(batch: dict[str, np.ndarray], cls: type) -> Any:
    """Rebuild the dataclass ``cls`` from a one-row numpy batch of its fields."""
    values = {f.name: batch[f.name][0] for f in dataclasses.fields(cls)}
    return cls(**{k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()})


def _parquet_metadata(uri: str, storage: StorageConfig | None) -> pq.FileMetaData:
    fs, path = io.filesystem(uri, storage)
    with fs.open(path, "rb") as handle:
        try:
            return io.open_parquet(handle).metadata
        except Exception as err:  # pyarrow raises several types for a corrupt footer
            raise errors.DataError(f"{uri}: unreadable parquet: {err}") from None


def _node_id() -> str:
    from rpg_dist.raycluster import node_id

    return node_id()
