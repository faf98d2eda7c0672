"""Training windows and validation examples as parquet, each rank reading only its shard.

Layout under ``RUN_DIR/windows/``::

    train/part-*.parquet   items list<int32> (dense item rows, <= max_seq_len + 1), n_targets int32
    val/part-*.parquet     history list<int32> (<= max_seq_len rows), target int32
    manifest.json          what the windows were built from (commit marker, written last)

Windows are stored in one seeded random order, so any contiguous or strided subset is a random
sample. A rank's shard under torchrun / local is every ``world``-th block of ``micro_batch`` rows
(block b goes to rank b % world): with shuffling off, global step s then holds exactly rows
[s * batch, (s + 1) * batch), the same windows as a one-process run's step s.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rpg_dist import io
from rpg_dist.data import dataset as ds
from rpg_dist.data.items import ItemIndex
from rpg_dist.data.splits import MIN_SEQUENCE_LENGTH, leave_one_out, training_windows
from rpg_dist.errors import DataError
from rpg_dist.model.rpg import PAD, right_pad

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROWS_PER_FILE = 1_000_000
# Streaming limits: users read per batch, and interactions per shuffle bucket (above it, windows are
# shuffled through several buckets; below it, exactly as one in-memory permutation).
USERS_PER_BATCH = 262_144
WINDOWS_PER_BUCKET = 8_000_000
LIST_INT32 = pa.list_(pa.int32())


@dataclass(frozen=True)
class WindowsPaths:
    root: str

    @property
    def train(self) -> str:
        return io.join(self.root, "train")

    @property
    def val(self) -> str:
        return io.join(self.root, "val")

    @property
    def manifest(self) -> str:
        return io.join(self.root, "manifest.json")


def prepare_windows(
    root: str,
    dataset_uri: str,
    index: ItemIndex,
    max_seq_len: int,
    seed: int,
    tokenizer_fingerprint: str,
    semantic_ids_uri: str,
    storage: StorageConfig | None = None,
    val_users: int = 0,
) -> dict[str, Any]:
    """Write training windows and validation examples unless an identical build exists.

    ``val_users`` > 0 keeps a seeded sample of that many validation users (in their order), so a
    validation pass costs O(val_users x items) whatever the number of users.

    Returns:
        The manifest: source identity plus ``n_windows``, ``n_positions``, ``n_labels``, ``n_val``.
    """
    paths = WindowsPaths(root)
    info = ds.read_info(dataset_uri, storage)
    identity = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset_uri,
        "dataset_info": info.__dict__,
        "max_seq_len": max_seq_len,
        "seed": seed,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "val_users": val_users,
    }
    if io.exists(paths.manifest, storage):
        manifest = io.read_json(paths.manifest, storage)
        if {k: manifest.get(k) for k in identity} == identity:
            return manifest
        log.info("windows under %s are stale; rebuilding", root)
    io.remove(paths.manifest, storage)  # uncommit first: a crash below leaves "no windows"
    for folder in (paths.train, paths.val):
        io.remove(folder, storage)
    counts = _write_tables(paths, dataset_uri, index, max_seq_len, seed, val_users, semantic_ids_uri, storage)
    manifest = {**identity, **counts}
    io.write_json(paths.manifest, manifest, storage)
    log.info("wrote %d training windows and %d validation examples to %s", counts["n_windows"], counts["n_val"], root)
    return manifest


def _write_tables(paths: WindowsPaths, dataset_uri: str, index: ItemIndex, max_seq_len: int, seed: int,
                  val_users: int, semantic_ids_uri: str, storage: StorageConfig | None) -> dict[str, int]:
    """Stream the sequences batch by batch into shuffled training windows and validation examples.

    Memory is one batch of users plus one shuffle bucket. Windows go to buckets chosen uniformly at
    random, each bucket is shuffled and written in turn: a uniformly random order overall. With one
    bucket (datasets up to ``WINDOWS_PER_BUCKET``) it is exactly ``permutation(seed)`` of all windows.
    """
    uri = ds.sequences_uri(dataset_uri)
    n_eligible = sum(int((_lengths(b.column(0)) >= MIN_SEQUENCE_LENGTH).sum())
                     for _, b in io.iter_parquet(uri, storage, ["item_ids"]))
    chosen = None
    if 0 < val_users < n_eligible:
        chosen = np.sort(np.random.default_rng(seed).choice(n_eligible, val_users, replace=False))
    n_interactions = ds.read_info(dataset_uri, storage).n_interactions
    n_buckets = max(1, -(-n_interactions // WINDOWS_PER_BUCKET))
    bucket_rng = np.random.default_rng([seed, 1])
    counts = {"n_windows": 0, "n_positions": 0, "n_labels": 0, "n_val": 0, "n_val_users_total": n_eligible}
    val_part, row, eligible_before = 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="rpg-windows-") as spill, _Buckets(spill, n_buckets) as buckets:
        for _, batch in io.iter_parquet(uri, storage, ["user_id", "item_ids"], batch_size=USERS_PER_BATCH):
            sequences = pa.Table.from_batches([batch])
            _check_covered(sequences, index, dataset_uri, semantic_ids_uri, first_row=row)
            splits = leave_one_out(sequences, max_seq_len)
            windows = training_windows(splits.train, max_seq_len)
            buckets.add(windows, bucket_rng.integers(0, n_buckets, len(windows)) if n_buckets > 1 else None)
            keep = _chosen_in_batch(chosen, eligible_before, len(splits.val.targets))
            val = _val_table(splits.val, keep, index, dataset_uri)
            if len(val) or val_part == 0:
                io.write_parquet(val, io.join(paths.val, f"part-{val_part:05d}.parquet"), storage, row_group_size=65_536)
                val_part += 1
            counts["n_val"] += len(val)
            eligible_before += len(splits.val.targets)
            row += len(sequences)
        part = 0
        for b, windows in enumerate(buckets.read()):
            rng = np.random.default_rng(seed if n_buckets == 1 else [seed, 2, b])
            train = _train_table(windows.take(rng.permutation(len(windows))), index, dataset_uri)
            for start in range(0, max(len(train), 1 if part == 0 else 0), ROWS_PER_FILE):
                io.write_parquet(train.slice(start, ROWS_PER_FILE), io.join(paths.train, f"part-{part:05d}.parquet"),
                                 storage, row_group_size=65_536)
                part += 1
            lengths = _lengths(train.column("items"))
            counts["n_windows"] += len(train)
            counts["n_positions"] += int((lengths - 1).sum())
            counts["n_labels"] += int(train.column("n_targets").to_numpy().sum())
    return counts


class _Buckets:
    """Shuffle buckets: windows appended to one of ``n`` Arrow IPC files on local disk, read back in turn."""

    def __init__(self, folder: str, n: int) -> None:
        self.paths = [f"{folder}/bucket-{b:05d}.arrow" for b in range(n)]
        self._sinks: dict[int, tuple[pa.OSFile, pa.ipc.RecordBatchStreamWriter]] = {}
        self._schema = None

    def __enter__(self) -> _Buckets:
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def add(self, windows: pa.Table, bucket: np.ndarray | None) -> None:
        self._schema = windows.schema
        if bucket is None:
            self._write(0, windows)
            return
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(len(self.paths) + 1))
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            self._write(b, windows.take(pa.array(order[bounds[b] : bounds[b + 1]])))

    def read(self) -> Iterator[pa.Table]:
        self._close()
        for path in self.paths:
            if os.path.exists(path):
                with pa.memory_map(path) as source:
                    yield pa.ipc.open_stream(source).read_all()
            elif self._schema is not None and path == self.paths[0]:
                yield self._schema.empty_table()

    def _write(self, b: int, table: pa.Table) -> None:
        if b not in self._sinks:
            sink = pa.OSFile(self.paths[b], "wb")
            self._sinks[b] = (sink, pa.ipc.new_stream(sink, table.schema))
        self._sinks[b][1].write_table(table)

    def _close(self) -> None:
        for sink, writer in self._sinks.values():
            writer.close()
            sink.close()
        self._sinks = {}


def _lengths(lists) -> np.ndarray:
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    return np.diff(lists.offsets.to_numpy())


def _chosen_in_batch(chosen: np.ndarray | None, before: int, n: int) -> np.ndarray | None:
    """Positions (within this batch's eligible users) of the sampled validation users; None = all."""
    if chosen is None:
        return None
    lo, hi = np.searchsorted(chosen, [before, before + n])
    return chosen[lo:hi] - before


def _train_table(windows: pa.Table, index: ItemIndex, dataset_uri: str) -> pa.Table:
    return pa.table({
        "items": _dense_lists(windows.column("item_ids"), index, "item_ids", dataset_uri),
        "n_targets": windows.column("n_targets"),
    })


def _val_table(val, keep: np.ndarray | None, index: ItemIndex, dataset_uri: str) -> pa.Table:
    histories, targets = val.histories, val.targets
    if keep is not None:
        histories, targets = histories.take(pa.array(keep)), targets[keep]
    return pa.table({
        "history": _dense_lists(histories, index, "validation history", dataset_uri),
        "target": pa.array(index.rows(targets, "validation target").astype(np.int32)),
    })


def _check_covered(sequences: pa.Table, index: ItemIndex, dataset_uri: str, semantic_ids_uri: str,
                   first_row: int = 0) -> None:
    """Every item in the sequences needs a semantic ID; name the first one without.

    Raises:
        DataError: naming the sequences row, user and item, and the semantic-ID file.
    """
    lists = sequences.column("item_ids").combine_chunks()
    values = pc.list_flatten(lists).to_numpy()
    unknown = np.flatnonzero(~index.find(values)[1])
    if len(unknown):
        row = int(pc.list_parent_indices(lists).to_numpy()[unknown[0]])
        raise DataError(
            f"{ds.sequences_uri(dataset_uri)}: row {first_row + row} (user {sequences.column('user_id')[row].as_py()}): "
            f"field 'item_ids' holds item_id {int(values[unknown[0]])}, which has no semantic ID in "
            f"{semantic_ids_uri}; rerun `rpg-dist tokenize` for this dataset"
        )


def _dense_lists(lists: pa.Array | pa.ChunkedArray, index: ItemIndex, what: str, origin: str) -> pa.Array:
    """list<int64> of item ids -> list<int32> of dense rows (one vectorised lookup)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.flatten().to_numpy()
    rows = index.rows(values, f"{origin}: {what}").astype(np.int32)
    base = offsets - offsets[0]
    return pa.ListArray.from_arrays(pa.array(base.astype(np.int32)), pa.array(rows, pa.int32()))


# ---- reading a rank's shard ------------------------------------------------------------------


def read_rows(uri: str, rows: np.ndarray, storage: StorageConfig | None = None) -> pa.Table:
    """Rows ``rows`` (global indices, any order, no repeats) of a parquet folder, in that order.

    Streamed file by file: memory holds the selected rows plus one record batch.
    """
    wanted = np.sort(rows)
    kept, seen = [], 0
    for _, batch in io.iter_parquet(uri, storage):
        lo, hi = np.searchsorted(wanted, [seen, seen + batch.num_rows])
        if hi > lo:
            kept.append(pa.Table.from_batches([batch]).take(pa.array(wanted[lo:hi] - seen)))
        seen += batch.num_rows
    if len(wanted) and wanted[-1] >= seen:
        raise ValueError(f"{uri}: row {int(wanted[-1])} asked for, but the folder has {seen} rows")
    table = pa.concat_tables(kept).combine_chunks() if kept else None
    # table holds the rows sorted; position of rows[j] in that order is rank[j].
    rank = np.empty(len(rows), np.int64)
    rank[np.argsort(rows, kind="stable")] = np.arange(len(rows))
    return table.take(pa.array(rank)) if table is not None else table


def read_range_shard(uri: str, rank: int, world: int, storage: StorageConfig | None = None) -> pa.Table:
    """Rows ``[rank * n / world, (rank + 1) * n / world)`` of a parquet folder, streamed."""
    files = io.parquet_files(uri, storage)
    total = sum(_num_rows(f, storage) for f in files)
    lo, hi = rank * total // world, (rank + 1) * total // world
    kept, seen = [], 0
    for _, batch in io.iter_parquet(uri, storage):
        a, b = max(lo - seen, 0), min(hi - seen, batch.num_rows)
        if a < b:
            kept.append(pa.Table.from_batches([batch.slice(a, b - a)]))
        seen += batch.num_rows
    return pa.concat_tables(kept).combine_chunks() if kept else None


def _num_rows(uri: str, storage: StorageConfig | None) -> int:
    fs, path = io.filesystem(uri, storage)
    with fs.open(path, "rb") as handle:
        return io.open_parquet(handle).metadata.num_rows


def micro_batches_per_epoch(n_rows: int, world: int, micro: int, accum: int) -> int:
    """Micro-batches every rank runs per epoch: equal on all ranks, a multiple of ``accum``.

    An epoch's ``ceil(n_rows / micro)`` micro-batches are dealt to the ranks round-robin
    (`EpochBatches`); ranks stop at the shortest share.
    """
    micro_steps = -(-n_rows // micro) // world
    return micro_steps - micro_steps % accum


# ---- batches -----------------------------------------------------------------------------------


def collate_windows(table: pa.Table) -> dict[str, torch.Tensor]:
    """Windows -> model inputs, vectorised over the batch.

    A window of L items gives L - 1 inputs; its last ``n_targets`` input positions are labelled with
    the following item.

    Returns:
        items (B, T) and targets (B, T) int64 with PAD, lengths (B,), T = longest window - 1.
    """
    lists = table.column("items").combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.flatten().to_numpy().astype(np.int64)
    n_inputs = np.diff(offsets) - 1  # (B,)
    n_targets = table.column("n_targets").to_numpy().astype(np.int64)
    batch, width = len(n_inputs), int(n_inputs.max())
    row = np.repeat(np.arange(batch), n_inputs)  # (P,)
    pos = np.arange(len(row)) - np.repeat(np.cumsum(n_inputs) - n_inputs, n_inputs)  # (P,)
    src = offsets[:-1][row] + pos  # flat index of each input
    items = np.full((batch, width), PAD, np.int64)
    items[row, pos] = values[src]
    targets = np.full((batch, width), PAD, np.int64)
    labelled = pos >= (n_inputs - n_targets)[row]
    targets[row[labelled], pos[labelled]] = values[src[labelled] + 1]
    return {
        "items": torch.from_numpy(items),
        "lengths": torch.from_numpy(n_inputs),
        "targets": torch.from_numpy(targets),
    }


def collate_histories(table: pa.Table) -> dict[str, torch.Tensor]:
    """Validation examples -> items (B, T) with PAD, lengths (B,), target (B,)."""
    lists = table.column("history").combine_chunks()
    lengths = np.diff(lists.offsets.to_numpy().astype(np.int64))
    items = right_pad(lists.flatten().to_numpy(), lengths)
    return {
        "items": torch.from_numpy(items),
        "lengths": torch.from_numpy(lengths),
        "target": torch.from_numpy(table.column("target").to_numpy().astype(np.int64)),
    }


class EpochBatches:
    """One rank's micro-batches: every epoch a new order of all the windows, the same under every
    launcher.

    Epoch ``e`` permutes all ``n_rows`` windows with a generator seeded by (seed, e), cuts the order
    into micro-batches of ``micro`` and deals them round-robin: rank ``r`` runs micro-batches
    ``r, r + world, ...``, so global step ``s`` holds the order's positions
    ``[s * micro * world * accum, (s + 1) * ...)`` whatever the launcher, and the ranks together see
    each window once per epoch (bar the tail cut so that all ranks run ``n_micro``). The rank reads
    its share of the epoch again each epoch: memory is that share, never the whole table.
    """

    def __init__(self, uri: str, storage: StorageConfig | None, n_rows: int, micro: int, n_micro: int,
                 seed: int, rank: int, world: int, shuffle: bool) -> None:
        self.uri, self.storage, self.n_rows = uri, storage, n_rows
        self.micro, self.n_micro = micro, n_micro
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Global row indices this rank trains on in ``epoch``, in order: (<= n_micro * micro,)."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_rows) if self.shuffle
                 else np.arange(self.n_rows))
        batches = self.rank + self.world * np.arange(self.n_micro)  # (n_micro,) global micro-batch ids
        positions = (batches[:, None] * self.micro + np.arange(self.micro)).ravel()
        return order[positions[positions < self.n_rows]]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The ``n_micro`` micro-batches of ``epoch``, starting after the first ``skip``."""
        table = read_rows(self.uri, self.epoch_rows(epoch), self.storage)
        for i in range(skip, self.n_micro):
            yield collate_windows(table.slice(i * self.micro, self.micro))


def history_batches(table: pa.Table | None, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Validation examples in fixed order, ``batch_size`` at a time."""
    if table is None:
        return
    for start in range(0, len(table), batch_size):
        yield collate_histories(table.slice(start, batch_size))
