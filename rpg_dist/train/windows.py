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
from rpg_dist.data.splits import leave_one_out, training_windows
from rpg_dist.errors import DataError
from rpg_dist.model.rpg import PAD

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROWS_PER_FILE = 1_000_000
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
    sequences = ds.read_sequences(dataset_uri, storage)
    _check_covered(sequences, index, dataset_uri, semantic_ids_uri)
    train, val = _build_tables(sequences, index, max_seq_len, seed, dataset_uri)
    n_val_users = len(val)
    if 0 < val_users < len(val):
        val = val.take(np.sort(np.random.default_rng(seed).choice(len(val), val_users, replace=False)))
    io.remove(paths.manifest, storage)  # uncommit first: a crash below leaves "no windows"
    for folder, table in ((paths.train, train), (paths.val, val)):
        io.remove(folder, storage)
        for part, start in enumerate(range(0, max(len(table), 1), ROWS_PER_FILE)):
            uri = io.join(folder, f"part-{part:05d}.parquet")
            io.write_parquet(table.slice(start, ROWS_PER_FILE), uri, storage, row_group_size=65_536)
    lengths = np.diff(train.column("items").combine_chunks().offsets.to_numpy())
    manifest = {
        **identity,
        "n_windows": len(train),
        "n_positions": int((lengths - 1).sum()),
        "n_labels": int(train.column("n_targets").to_numpy().sum()),
        "n_val": len(val),
        "n_val_users_total": n_val_users,
    }
    io.write_json(paths.manifest, manifest, storage)
    log.info("wrote %d training windows and %d validation examples to %s", len(train), len(val), root)
    return manifest


def _build_tables(sequences: pa.Table, index: ItemIndex, max_seq_len: int, seed: int,
                  dataset_uri: str) -> tuple[pa.Table, pa.Table]:
    """Training windows in one seeded random order, and validation examples, as dense item rows."""
    splits = leave_one_out(sequences, max_seq_len)
    windows = training_windows(splits.train, max_seq_len)
    windows = windows.take(np.random.default_rng(seed).permutation(len(windows)))
    train = pa.table({
        "items": _dense_lists(windows.column("item_ids"), index, "item_ids", dataset_uri),
        "n_targets": windows.column("n_targets"),
    })
    val = pa.table({
        "history": _dense_lists(splits.val.histories, index, "validation history", dataset_uri),
        "target": pa.array(index.rows(splits.val.targets, "validation target").astype(np.int32)),
    })
    return train, val


def _check_covered(sequences: pa.Table, index: ItemIndex, dataset_uri: str, semantic_ids_uri: str) -> None:
    """Every item in the sequences needs a semantic ID; name the first one without.

    Raises:
        DataError: naming the sequences row, user and item, and the semantic-ID file.
    """
    lists = sequences.column("item_ids").combine_chunks()
    values = pc.list_flatten(lists).to_numpy()
    known = index.item_ids
    pos = np.clip(np.searchsorted(known, values), 0, max(len(known) - 1, 0))
    unknown = np.flatnonzero(known[pos] != values) if len(known) else np.arange(len(values))
    if len(unknown):
        row = int(pc.list_parent_indices(lists).to_numpy()[unknown[0]])
        raise DataError(
            f"{ds.sequences_uri(dataset_uri)}: row {row} (user {sequences.column('user_id')[row].as_py()}): "
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


def read_block_shard(uri: str, rank: int, world: int, block: int, storage: StorageConfig | None = None) -> pa.Table:
    """Rows of blocks ``rank, rank + world, ...`` (``block`` rows each), streamed file by file.

    Memory holds the shard plus one record batch, never the whole table.
    """
    kept, seen = [], 0
    for _, batch in io.iter_parquet(uri, storage):
        rows = seen + np.arange(batch.num_rows)
        mask = (rows // block) % world == rank
        if mask.any():
            kept.append(pa.Table.from_batches([batch]).filter(pa.array(mask)))
        seen += batch.num_rows
    if not kept:
        raise ValueError(f"{uri}: no rows for rank {rank} of {world} (only {seen} rows)")
    return pa.concat_tables(kept).combine_chunks()


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
    import pyarrow.parquet as pq

    fs, path = io.filesystem(uri, storage)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def micro_batches_per_epoch(n_rows: int, world: int, micro: int, accum: int, launcher: str) -> int:
    """Micro-batches every rank runs per epoch: equal on all ranks, a multiple of ``accum``.

    torchrun/local shards are blocks of ``micro`` rows dealt round-robin; Ray Data's equal split
    gives each rank ``n_rows // world`` rows. Ranks stop at the shortest shard.
    """
    if launcher == "ray":
        per_rank = np.full(world, n_rows // world)
    else:
        n_blocks = -(-n_rows // micro)
        sizes = np.full(n_blocks, micro)
        sizes[-1] = n_rows - (n_blocks - 1) * micro
        per_rank = np.bincount(np.arange(n_blocks) % world, weights=sizes, minlength=world)
    micro_steps = int(min(-(-per_rank // micro)))
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
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.flatten().to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(row)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    items = np.full((len(lengths), int(lengths.max())), PAD, np.int64)
    items[row, pos] = values
    return {
        "items": torch.from_numpy(items),
        "lengths": torch.from_numpy(lengths),
        "target": torch.from_numpy(table.column("target").to_numpy().astype(np.int64)),
    }


class ShardBatches:
    """Epoch-seeded micro-batches over one rank's in-memory shard (torchrun / local launchers)."""

    def __init__(self, shard: pa.Table, micro: int, n_micro: int, seed: int, rank: int, shuffle: bool) -> None:
        self.shard, self.micro, self.n_micro = shard, micro, n_micro
        self.seed, self.rank, self.shuffle = seed, rank, shuffle

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The ``n_micro`` micro-batches of ``epoch``, starting after the first ``skip``."""
        n = len(self.shard)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(n)
        else:
            order = np.arange(n)
        for i in range(skip, self.n_micro):
            rows = order[i * self.micro : (i + 1) * self.micro]
            yield collate_windows(self.shard.take(pa.array(rows)))


def history_batches(table: pa.Table | None, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Validation examples in fixed order, ``batch_size`` at a time."""
    if table is None:
        return
    for start in range(0, len(table), batch_size):
        yield collate_histories(table.slice(start, batch_size))
