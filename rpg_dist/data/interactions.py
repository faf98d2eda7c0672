"""The generic ``interactions`` importer, streaming: bounded memory for any number of interactions.

Input: a (user, item, timestamp) table plus an items table, CSV or parquet, column names configurable.
Memory is O(items + users + one partition of interactions), never O(interactions):

1. Items, twice in batches: the raw ids (string ids get dense ids 1..n in sorted order, kept as
   ``raw_id``), then the rows with their text, written as they are read.
2. Interactions in batches: each row's item mapped to its dense id (an unknown item is an error naming
   the row), then the row appended to one of P spill files (Arrow IPC streams on local disk) chosen by
   a hash of its user,
   so every user's rows land in one file (P = rows / ``rows_per_partition``).
3. Per spill file: its users' rows stable-sorted by (timestamp, input row) into sequences. Integer user
   ids are kept; string ids get dense ids 1..n in order of first appearance in the input (kept as
   ``raw_user_id``), which needs one more pass over the spilled sequences.

Users come out partition by partition (with P = 1, in order of first appearance, as before).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numba import njit

from rpg_dist import io
from rpg_dist.data import text as item_text
from rpg_dist.data.dataset import DatasetInfo, DatasetWriter
from rpg_dist.errors import DataError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig
    from rpg_dist.data.config import InteractionsColumns

BATCH_ROWS = 1 << 18
ROWS_PER_PARTITION = 1 << 23  # ~8M interactions per spill file: ~0.5 GB while it is sorted


def import_interactions(interactions_uri: str, items_uri: str, columns: InteractionsColumns, out: str,
                        storage: StorageConfig | None = None, overwrite: bool = False,
                        rows_per_partition: int = ROWS_PER_PARTITION) -> DatasetInfo:
    """Stream both tables into a dataset at ``out`` (nothing is visible there on error)."""
    with DatasetWriter(out, source="interactions", storage=storage, overwrite=overwrite) as writer:
        item_keys = _write_items(items_uri, columns, writer, storage)
        with tempfile.TemporaryDirectory(prefix="rpg-interactions-") as spill:
            n_parts = max(1, -(-_count_rows(interactions_uri, storage) // rows_per_partition))
            string_users = _spill(interactions_uri, columns, item_keys, spill, n_parts, storage)
            _write_sequences(spill, n_parts, string_users, writer, interactions_uri)
        return writer.commit()


# --- items -----------------------------------------------------------------------------------------


def _write_items(uri: str, columns: InteractionsColumns, writer: DatasetWriter, storage) -> pa.Array:
    """Stage every item (dense ids, text, raw_id); returns the raw ids in dense-id order."""
    raw = pa.concat_arrays([b.column(0) for b, _ in _batches(uri, [columns.item_id], storage)])
    if raw.null_count:
        row = int(np.flatnonzero(pc.is_null(raw).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{uri}: row {row}: field '{columns.item_id}' is null")
    integer = pa.types.is_integer(raw.type)
    keys = _cast(raw, pa.int64() if integer else pa.string(), uri, columns.item_id, 0)
    ordered = pc.take(keys, pc.sort_indices(keys))
    if len(ordered) > 1:
        repeats = pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False)
        if repeats.any():
            raise DataError(f"{uri}: duplicate {columns.item_id} {ordered[int(np.flatnonzero(repeats)[0])].as_py()!r}")
    sorted_keys = keys if integer else ordered  # string ids: dense id = sorted rank + 1
    for batch, first_row in _batches(uri, [columns.item_id, *columns.text], storage):
        for i, name in enumerate(columns.text):
            _check_text_column(batch.column(i + 1), uri, name, first_row)
        batch_keys = _cast(batch.column(0), pa.int64() if integer else pa.string(), uri, columns.item_id, first_row)
        ids = batch_keys if integer else pc.add(pc.index_in(batch_keys, value_set=sorted_keys), 1)
        texts = [item_text.item_text(values) for values in zip(*(batch.column(i + 1).to_pylist()
                                                                for i in range(len(columns.text))))]
        table = pa.table({"item_id": pc.cast(ids, pa.int64()), "text": pa.array(texts, pa.string())})
        if not integer:
            table = table.append_column("raw_id", batch_keys)
        writer.add_items(table, origin=uri, first_row=first_row)
    return sorted_keys


def _check_text_column(values: pa.Array, uri: str, field: str, first_row: int) -> None:
    """DataError naming the row of the first value that is not UTF-8 text or holds control characters."""
    kind = values.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):  # Arrow's CSV reader: not UTF-8
        for row, value in enumerate(values.to_pylist()):
            if value is not None:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{uri}: row {first_row + row}: field '{field}' is not UTF-8 (byte "
                                    f"{value[err.start]:#04x} at position {err.start}); re-encode the file as UTF-8") from None
        return
    if pa.types.is_struct(kind) or pa.types.is_map(kind):
        raise DataError(f"{uri}: field '{field}' holds {kind} values, not text")
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        bad = pc.fill_null(pc.match_substring_regex(values, item_text.CONTROL_PATTERN), False).to_numpy(zero_copy_only=False)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{uri}: row {first_row + row}: field '{field}' {item_text.problem(values[row].as_py())}")


# --- interactions -> spill files by user ----------------------------------------------------------


def _spill(uri: str, columns: InteractionsColumns, item_keys: pa.Array, spill: str, n_parts: int, storage) -> bool:
    """Pass 2: map items, check fields, append rows to per-user-hash parquet files. True for string users."""
    # Arrow IPC streams: each write goes straight to disk (a parquet writer per file would hold
    # column buffers for all P files at once).
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    files = []
    string_users = False
    try:
        for batch, first_row in _batches(uri, [columns.user, columns.item, columns.timestamp], storage):
            user, item, time = (batch.column(i) for i in range(3))
            for name, column in ((columns.user, user), (columns.item, item), (columns.timestamp, time)):
                _check_present(column, uri, name, first_row)
            _check_timestamps(time, uri, columns.timestamp, first_row)
            dense = _dense_items(item, item_keys, uri, columns.item, first_row)
            string_users = not pa.types.is_integer(user.type)
            user = _cast(user, pa.string() if string_users else pa.int64(), uri, columns.user, first_row)
            part = _partition_of(user, n_parts)
            rows = pa.array(np.arange(first_row, first_row + len(batch), dtype=np.int64))
            time = pc.cast(time, pa.int64()) if pa.types.is_timestamp(time.type) else time
            table = pa.table({"user": user, "item": dense, "time": time, "row": rows})
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(n_parts + 1))
            for p in np.flatnonzero(np.diff(bounds)).tolist():
                chunk = table.take(pa.array(order[bounds[p] : bounds[p + 1]]))
                if p not in writers:
                    files.append(pa.OSFile(f"{spill}/part-{p:05d}.arrow", "wb"))
                    writers[p] = pa.ipc.new_stream(files[-1], chunk.schema)
                writers[p].write_table(chunk)
            pa.default_memory_pool().release_unused()  # freed batch buffers back to the OS
    finally:
        for w in writers.values():
            w.close()
        for f in files:
            f.close()
    return string_users


def _check_present(column: pa.Array, uri: str, name: str, first_row: int) -> None:
    if column.null_count:
        row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{uri}: row {first_row + row}: field '{name}' is null")


def _check_timestamps(column: pa.Array, uri: str, name: str, first_row: int) -> None:
    """Numbers only; NaN/inf would silently reorder a user's sequence (and change its test target)."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_timestamp(column.type)):
        raise DataError(f"{uri}: field '{name}' has type {column.type}, expected numbers or timestamps")
    if pa.types.is_floating(column.type):
        bad = np.flatnonzero(~np.isfinite(column.to_numpy(zero_copy_only=False)))
        if len(bad):
            raise DataError(f"{uri}: row {first_row + int(bad[0])}: field '{name}' is {column[int(bad[0])].as_py()}, "
                            "not a finite time")


def _dense_items(item: pa.Array, item_keys: pa.Array, uri: str, name: str, first_row: int) -> pa.Array:
    integer = pa.types.is_integer(item_keys.type)
    lookup = pc.index_in(_cast(item, item_keys.type, uri, name, first_row), value_set=item_keys)
    if lookup.null_count:
        row = int(np.flatnonzero(pc.is_null(lookup).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{uri}: row {first_row + row}: field '{name}' value {item[row].as_py()!r} "
                        "is not in the items table")
    return pc.cast(item, pa.int64()) if integer else pc.cast(pc.add(lookup, 1), pa.int64())


def _cast(values: pa.Array, kind: pa.DataType, uri: str, name: str, first_row: int) -> pa.Array:
    """``values`` as ``kind``; a DataError naming the row of the first value that does not convert
    (an unsigned id beyond int64, text or a fraction where the ids are integers)."""
    try:
        return pc.cast(values, kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    wanted = "an integer within int64" if pa.types.is_integer(kind) else str(kind)
    for row, value in enumerate(values.to_pylist()):  # only on the error path
        try:
            pa.array([value], values.type).cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
            raise DataError(f"{uri}: row {first_row + row}: field '{name}' value {value!r} is not {wanted}") from None
    raise DataError(f"{uri}: field '{name}' has type {values.type}, which cannot be read as {wanted}")


def _partition_of(user: pa.Array, n_parts: int) -> np.ndarray:
    """(n,) spill file of each row: a hash of its user, the same in every batch."""
    if n_parts == 1:
        return np.zeros(len(user), np.int64)
    if pa.types.is_integer(user.type):
        keys = user.to_numpy().astype(np.uint64)
    else:
        array = user.combine_chunks() if isinstance(user, pa.ChunkedArray) else user
        array = pc.cast(array, pa.large_string())
        offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
        keys = _fnv1a(offsets, np.frombuffer(array.buffers()[2], np.uint8))
    mixed = (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (mixed % np.uint64(n_parts)).astype(np.int64)


@njit(cache=True, nogil=True)
def _fnv1a(offsets, data):
    """64-bit FNV-1a of each string data[offsets[i]:offsets[i+1]]."""
    out = np.empty(len(offsets) - 1, np.uint64)
    for i in range(len(offsets) - 1):
        h = np.uint64(0xCBF29CE484222325)
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
        out[i] = h
    return out


# --- spill files -> sequences ----------------------------------------------------------------------


def _write_sequences(spill: str, n_parts: int, string_users: bool, writer: DatasetWriter, origin: str) -> None:
    """Pass 3 (and 4 for string users): each spill file's users into time-ordered sequences."""
    parts = [p for p in range(n_parts) if io.exists(f"{spill}/part-{p:05d}.arrow")]
    grouped = [f"{spill}/seq-{p:05d}.parquet" for p in parts]
    for part, path in zip(parts, grouped):
        with pa.memory_map(f"{spill}/part-{part:05d}.arrow") as source:
            pq.write_table(_group(pa.ipc.open_stream(source).read_all()), path)
    if string_users:
        # Dense user ids in order of first appearance over the whole input: rank of the first row.
        firsts = np.sort(np.concatenate([pq.read_table(p, columns=["first_row"]).column(0).to_numpy() for p in grouped]))
    for path in grouped:
        table = pq.read_table(path)
        if string_users:
            ids = np.searchsorted(firsts, table.column("first_row").to_numpy()) + 1
            out = pa.table({"user_id": pa.array(ids, pa.int64()), "item_ids": table.column("item_ids"),
                            "raw_user_id": table.column("user")})
        else:
            out = pa.table({"user_id": table.column("user"), "item_ids": table.column("item_ids")})
        writer.add_sequences(out, origin=origin)


def _group(table: pa.Table) -> pa.Table:
    """One spill file's rows -> (user, first_row, item_ids) with items stable-sorted by (time, row)."""
    users = table.column("user").combine_chunks()
    codes = pc.dictionary_encode(users).indices.to_numpy() if not pa.types.is_integer(users.type) else None
    if codes is None:
        _, codes = np.unique(users.to_numpy(), return_inverse=True)
    rows, times = table.column("row").to_numpy(), table.column("time").to_numpy()
    first = np.full(codes.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, codes, rows)
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # users by first appearance
    order = np.lexsort((rows, times, rank[codes]))
    counts = np.bincount(rank[codes], minlength=len(first))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    by_rank = np.argsort(rank)  # user code of each rank
    head = offsets[:-1]
    return pa.table({
        "user": pc.take(users, pa.array(order[head])),
        "first_row": pa.array(first[by_rank], pa.int64()),
        "item_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                             pc.take(table.column("item").combine_chunks(), pa.array(order))),
    })


# --- reading ---------------------------------------------------------------------------------------


def _batches(uri: str, columns: list[str], storage) -> Iterator[tuple[pa.RecordBatch, int]]:
    """``(batch of the named columns, its first row)`` over a CSV or parquet file, streamed."""
    row = 0
    try:
        for batch in _raw_batches(uri, columns, storage):
            yield batch, row
            row += len(batch)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{uri}: unreadable table: {err}") from None


def _raw_batches(uri: str, columns: list[str], storage) -> Iterator[pa.RecordBatch]:
    fs, path = io.filesystem(uri, storage)
    if not fs.exists(path):
        raise DataError(f"{uri}: file not found")
    with fs.open(path, "rb") as handle:
        if uri.endswith(".parquet"):
            with io.open_parquet(handle) as reader:
                _require(reader.schema_arrow.names, columns, uri)
                yield from reader.iter_batches(batch_size=BATCH_ROWS, columns=columns,
                                               use_threads=io.PYTHON_FILE_THREADS)
            return
        reader = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=64 << 20))
        _require(reader.schema.names, columns, uri)
        for batch in reader:
            yield pa.RecordBatch.from_arrays([batch.column(c) for c in columns], names=columns)


def _require(names: list[str], columns: list[str], uri: str) -> None:
    for name in columns:
        if name not in names:
            raise DataError(f"{uri}: missing column '{name}' (columns: {names})")


def _count_rows(uri: str, storage) -> int:
    """Rows of a parquet file (its footer), or an estimate for CSV (file size / 32 bytes)."""
    fs, path = io.filesystem(uri, storage)
    if not fs.exists(path):
        raise DataError(f"{uri}: file not found")
    if uri.endswith(".parquet"):
        with fs.open(path, "rb") as handle:
            try:
                return io.open_parquet(handle).metadata.num_rows
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{uri}: unreadable table: {err}") from None
    return max(1, fs.size(path) // 32)
