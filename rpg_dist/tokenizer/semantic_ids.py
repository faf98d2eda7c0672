"""The semantic-ID table: ``item_id int64, codes fixed_size_list<int16>[m]`` (values 0..255)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rpg_dist import io
from rpg_dist.data.items import ItemIndex
from rpg_dist.errors import DataError, StageError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig


@dataclass
class SemanticIds:
    """Codes of every item, rows in ascending ``item_id`` order (the dense item index)."""

    index: ItemIndex
    codes: np.ndarray  # (n_items, m) int16 in [0, codebook_size)

    @property
    def n_digit(self) -> int:
        return self.codes.shape[1]


def to_table(item_ids: np.ndarray, codes: np.ndarray) -> pa.Table:
    """Arrow table of ``item_id`` and ``codes`` (fixed_size_list<int16>[m])."""
    codes = np.ascontiguousarray(codes, dtype=np.int16)
    flat = pa.array(codes.reshape(-1), pa.int16())
    return pa.table(
        {
            "item_id": pa.array(np.asarray(item_ids, np.int64), pa.int64()),
            "codes": pa.FixedSizeListArray.from_arrays(flat, codes.shape[1]),
        }
    )


def write_semantic_ids(uri: str, item_ids: np.ndarray, codes: np.ndarray, storage: StorageConfig | None = None) -> None:
    io.write_parquet(to_table(item_ids, codes), uri, storage)


def require_semantic_ids(uri: str, storage: StorageConfig | None = None) -> None:
    """Raise StageError unless the tokenize stage has written ``uri`` (a cheap check for stages that
    would otherwise start heavy machinery first)."""
    if not io.exists(uri, storage):
        raise StageError(f"{uri}: no semantic IDs; run `rpg-dist tokenize` first")


def load_semantic_ids(uri: str, storage: StorageConfig | None = None) -> SemanticIds:
    """Read the table, sorted by ``item_id``.

    Raises:
        StageError: the tokenize stage has not written it yet.
        DataError: codes are out of range or the table is malformed.
    """
    require_semantic_ids(uri, storage)
    table = io.read_parquet(uri, storage, ["item_id", "codes"])
    codes_type = table.schema.field("codes").type
    if not pa.types.is_fixed_size_list(codes_type):
        raise DataError(f"{uri}: field 'codes' has type {codes_type}, expected fixed_size_list<int16>[m]")
    item_ids = np.array(table.column("item_id").to_numpy())  # a copy: the table's memory goes back below
    codes = np.empty((len(item_ids), codes_type.list_size), np.int16)
    at = 0
    for chunk in table.column("codes").chunks:  # chunk by chunk: no whole-column copy besides ``codes``
        codes[at : at + len(chunk)] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), -1)
        at += len(chunk)
    del table
    # Arrow's allocator keeps freed pages for reuse: ~2 GB after reading 10M items' codes, held by
    # every stage that loads them (the graph build's driver, all build long).
    pa.default_memory_pool().release_unused()
    if codes.size and (codes.min() < 0 or codes.max() > 255):
        row = int(np.flatnonzero((codes < 0).any(1) | (codes > 255).any(1))[0])
        raise DataError(f"{uri}: row {row} (item_id {int(item_ids[row])}): field 'codes' is outside 0..255")
    if len(item_ids) > 1 and (item_ids[1:] < item_ids[:-1]).any():
        codes = codes[np.argsort(item_ids, kind="stable")]
    return SemanticIds(index=ItemIndex(item_ids), codes=codes)
