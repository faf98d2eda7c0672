"""The dataset format every stage reads, and its validating, atomic writer.

A dataset is a folder URI holding::

    items/part-*.parquet      item_id int64, text string, optional raw fields
    sequences/part-*.parquet  user_id int64, item_ids list<int64> (time-ordered)
    dataset.json              format_version, source, n_users, n_items, n_interactions

``dataset.json`` is written last and is the commit marker: a folder without it is not a dataset.
The writer stages parts under a temporary sibling prefix and moves them into place only after every
row validated, so bad input never leaves a half-written dataset behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rpg_dist import failpoints, io
from rpg_dist.data.items import sorted_lookup
from rpg_dist.data.splits import MIN_SEQUENCE_LENGTH
from rpg_dist.errors import DataError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ITEMS = "items"
SEQUENCES = "sequences"
INFO = "dataset.json"
ITEM_ID_TYPE = pa.int64()
SEQUENCE_TYPE = pa.list_(pa.int64())


@dataclass(kw_only=True)
class DatasetInfo:
    format_version: int
    source: str
    n_users: int
    n_items: int
    n_interactions: int
    # sha256 over every items and sequences file (datasets written before it: ""). Part of the
    # prepare stage's identity: a re-import with other texts and the same counts redoes the stages.
    content_sha256: str = ""


def info_uri(uri: str) -> str:
    return io.join(uri, INFO)


def items_uri(uri: str) -> str:
    return io.join(uri, ITEMS)


def sequences_uri(uri: str) -> str:
    return io.join(uri, SEQUENCES)


def content_digest(uris: list[str], storage: StorageConfig | None = None) -> str:
    """sha256 over (name, sha256) of every parquet file under ``uris`` (names relative to each)."""
    digest = hashlib.sha256()
    for uri in uris:
        for file_uri in io.parquet_files(uri, storage):
            digest.update(f"{file_uri[len(uri):]}\0{io.file_sha256(file_uri, storage)}\n".encode())
    return digest.hexdigest()


def read_info(uri: str, storage: StorageConfig | None = None) -> DatasetInfo:
    """Read ``dataset.json``; a folder without it is not a (complete) dataset.

    Raises:
        DataError: no dataset at ``uri``, or a format version this code cannot read.
    """
    path = info_uri(uri)
    if not io.exists(path, storage):
        raise DataError(f"{uri}: not a dataset (no {INFO}); create it with `rpg-dist prepare`")
    raw = io.read_json(path, storage)
    names = {f.name for f in dataclasses.fields(DatasetInfo)}
    required = {f.name for f in dataclasses.fields(DatasetInfo) if f.default is dataclasses.MISSING}
    missing = sorted(required - set(raw))
    if missing:
        raise DataError(f"{path}: missing field(s) {missing}")
    if raw["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {raw['format_version']} is not supported (expected {FORMAT_VERSION})"
        )
    return DatasetInfo(**{k: raw[k] for k in names if k in raw})


def read_items(
    uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The items table (by default ``item_id`` and ``text``)."""
    read_info(uri, storage)
    return io.read_parquet(items_uri(uri), storage, columns or ["item_id", "text"])


def read_sequences(uri: str, storage: StorageConfig | None = None) -> pa.Table:
    """The ``(user_id, item_ids)`` table, one row per user, items in time order."""
    read_info(uri, storage)
    return io.read_parquet(sequences_uri(uri), storage, ["user_id", "item_ids"])


class DatasetWriter:
    """Validate and write a dataset; nothing is visible at ``uri`` until ``commit()``.

    Add every item batch first, then the sequence batches (sequences are checked against the items)::

        with DatasetWriter(uri, source="s3rec", storage=storage) as writer:
            writer.add_items(items_table, origin="items.jsonl", first_row=1)
            writer.add_sequences(seq_table, origin="sequences.txt", first_row=1)
            info = writer.commit()

    ``origin`` and ``first_row`` let every error name the input file and row.
    """

    def __init__(
        self,
        uri: str,
        *,
        source: str,
        storage: StorageConfig | None = None,
        overwrite: bool = False,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.source = source
        self.storage = storage
        if io.is_file(self.uri, storage):
            raise DataError(f"{self.uri}: is a file; a dataset is a folder (choose another --out)")
        if io.exists(info_uri(self.uri), storage) and not overwrite:
            raise DataError(f"{self.uri}: a dataset already exists here; pass --overwrite to replace it")
        self.overwrite = overwrite
        self._staging = io.temporary_name(self.uri)
        self._item_ids: list[np.ndarray] = []
        self._item_origin: list[tuple[str, int]] = []
        self._known: np.ndarray | None = None
        self._user_ids: list[np.ndarray] = []
        self._user_origin: list[tuple[str, int]] = []
        self._n_interactions = 0
        self._longest = 0  # items in the longest sequence
        self._parts = {ITEMS: 0, SEQUENCES: 0}
        self._committed = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._committed:
            self.abort()

    def add_items(self, table: pa.Table, *, origin: str, first_row: int = 0) -> None:
        """Validate and stage a batch of items (``item_id``, ``text``, optional raw columns)."""
        if self._known is not None:
            raise RuntimeError("add_items() after add_sequences()")
        table = _check_items(table, origin, first_row)
        self._item_ids.append(table.column("item_id").to_numpy())
        self._item_origin.append((origin, first_row))
        self._write_part(ITEMS, table)

    def add_sequences(self, table: pa.Table, *, origin: str, first_row: int = 0) -> None:
        """Validate and stage a batch of ``(user_id, item_ids)`` rows against the staged items."""
        if self._known is None:
            self._known = self._finish_items()
        table = _check_sequences(table, self._known, origin, first_row)
        self._user_ids.append(table.column("user_id").to_numpy())
        self._user_origin.append((origin, first_row))
        self._n_interactions += len(pc.list_flatten(table.column("item_ids")))
        lengths = pc.list_value_length(table.column("item_ids"))
        self._longest = max(self._longest, int(pc.max(lengths).as_py() or 0) if len(lengths) else 0)
        self._write_part(SEQUENCES, table)

    def commit(self) -> DatasetInfo:
        """Move the staged parts into place and write ``dataset.json`` last."""
        if self._known is None:
            self._known = self._finish_items()
        user_ids = np.concatenate(self._user_ids) if self._user_ids else np.empty(0, np.int64)
        if len(user_ids) == 0:
            raise DataError(f"{self.uri}: empty dataset: no user sequences")
        _check_unique(user_ids, self._user_origin, [len(u) for u in self._user_ids], "user_id")
        if self._longest < MIN_SEQUENCE_LENGTH:
            raise DataError(f"{self.uri}: no user has {MIN_SEQUENCE_LENGTH} or more items (the longest sequence "
                            f"has {self._longest}): leave-one-out needs a training, a validation and a test item")
        info = DatasetInfo(
            format_version=FORMAT_VERSION,
            source=self.source,
            n_users=int(len(user_ids)),
            n_items=int(len(self._known)),
            n_interactions=int(self._n_interactions),
            content_sha256=content_digest([io.join(self._staging, n) for n in (ITEMS, SEQUENCES)], self.storage),
        )
        if self.overwrite:
            # Uncommit the old dataset first: a crash below leaves "no dataset", never a mix.
            io.remove(info_uri(self.uri), self.storage)
            for name in (ITEMS, SEQUENCES):
                io.remove(io.join(self.uri, name), self.storage)
        for name in (ITEMS, SEQUENCES):
            io.move(io.join(self._staging, name), io.join(self.uri, name), self.storage)
        failpoints.reach("dataset-parts-moved")
        io.write_json(info_uri(self.uri), dataclasses.asdict(info), self.storage)
        io.remove(self._staging, self.storage)
        self._committed = True
        log.info("committed dataset %s: %s", self.uri, info)
        return info

    def abort(self) -> None:
        """Drop everything staged; the target is untouched."""
        io.remove(self._staging, self.storage)

    def _finish_items(self) -> np.ndarray:
        ids = np.concatenate(self._item_ids) if self._item_ids else np.empty(0, np.int64)
        if len(ids) == 0:
            raise DataError(f"{self.uri}: empty dataset: no items")
        _check_unique(ids, self._item_origin, [len(i) for i in self._item_ids], "item_id")
        return np.sort(ids)

    def _write_part(self, name: str, table: pa.Table) -> None:
        part = self._parts[name]
        self._parts[name] += 1
        uri = io.join(self._staging, name, f"part-{part:05d}.parquet")
        io.write_parquet(table, uri, self.storage, row_group_size=65_536)


def _check_items(table: pa.Table, origin: str, first_row: int) -> pa.Table:
    """Cast ``item_id`` to int64 and reject null ids and null/empty text, naming the row."""
    table = _require_column(table, "item_id", ITEM_ID_TYPE, origin, first_row)
    table = _require_column(table, "text", pa.string(), origin, first_row, allow_null=True)
    text = table.column("text")
    empty = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0))
    bad = np.flatnonzero(pc.fill_null(empty, True).to_numpy(zero_copy_only=False))
    if len(bad):
        row = int(bad[0])
        item = table.column("item_id")[row].as_py()
        raise DataError(f"{origin}: row {first_row + row} (item_id {item}): field 'text' is empty or null")
    return table


def _check_sequences(table: pa.Table, known: np.ndarray, origin: str, first_row: int) -> pa.Table:
    """Check user ids, non-empty item lists and that every item exists, naming the row and user."""
    table = _require_column(table, "user_id", ITEM_ID_TYPE, origin, first_row)
    table = _require_column(table, "item_ids", SEQUENCE_TYPE, origin, first_row)
    lists = table.column("item_ids").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
    if (lengths == 0).any():
        row = int(np.flatnonzero(lengths == 0)[0])
        user = table.column("user_id")[row].as_py()
        raise DataError(f"{origin}: row {first_row + row} (user {user}): field 'item_ids' is empty")
    flat = pc.list_flatten(lists)
    if flat.null_count:
        row = int(pc.list_parent_indices(lists).to_numpy()[np.flatnonzero(pc.is_null(flat).to_numpy())[0]])
        user = table.column("user_id")[row].as_py()
        raise DataError(f"{origin}: row {first_row + row} (user {user}): field 'item_ids' holds a null")
    values = flat.to_numpy()
    unknown = np.flatnonzero(~sorted_lookup(known, values)[1])
    if len(unknown):
        row = int(pc.list_parent_indices(lists).to_numpy()[unknown[0]])
        user = table.column("user_id")[row].as_py()
        raise DataError(
            f"{origin}: row {first_row + row} (user {user}): field 'item_ids' references "
            f"item_id {int(values[unknown[0]])}, which is not in the items table"
        )
    return table.set_column(table.schema.get_field_index("item_ids"), "item_ids", lists)


def _require_column(
    table: pa.Table, name: str, type_: pa.DataType, origin: str, first_row: int, allow_null: bool = False
) -> pa.Table:
    """Require column ``name`` of a compatible type (and without nulls); cast it to ``type_``."""
    if name not in table.column_names:
        raise DataError(f"{origin}: missing column '{name}' (columns: {table.column_names})")
    column = table.column(name)
    if not _compatible(column.type, type_):
        raise DataError(f"{origin}: field '{name}' has type {column.type}, expected {type_}")
    if column.null_count and not allow_null:
        row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{origin}: row {first_row + row}: field '{name}' is null")
    if column.type != type_:
        column = pc.cast(column, type_)
    return table.set_column(table.schema.get_field_index(name), name, column)


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Integers of any width for int64, (large_)string for string, lists of integers for lists."""
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_list(expected):
        is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual)
        return is_list and pa.types.is_integer(actual.value_type)
    return actual == expected


def _check_unique(ids: np.ndarray, origins: list[tuple[str, int]], sizes: list[int], field: str) -> None:
    """Raise naming both rows of the first duplicated id (O(n log n), no Python loop per id)."""
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if not len(dup):
        return
    first, second = int(order[dup[0]]), int(order[dup[0] + 1])
    bounds = np.cumsum([0, *sizes])

    def where(i: int) -> str:
        part = int(np.searchsorted(bounds, i, side="right") - 1)
        origin, first_row = origins[part]
        return f"{origin} row {first_row + i - bounds[part]}"

    raise DataError(f"duplicate {field} {int(ids[first])}: {where(first)} and {where(second)}")
