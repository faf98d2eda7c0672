"""Dense item indices: every tensor in the system is indexed 0..n_items-1 by sorted item_id."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from rpg_dist import io
from rpg_dist.errors import DataError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig


class ItemIndex:
    """Maps arbitrary int64 ``item_id`` values to dense rows ``0..n-1`` (in ascending id order)."""

    def __init__(self, item_ids: np.ndarray) -> None:
        ids = np.asarray(item_ids, dtype=np.int64)
        self.item_ids = np.sort(ids)
        if len(self.item_ids) > 1 and (np.diff(self.item_ids) == 0).any():
            dup = self.item_ids[1:][np.diff(self.item_ids) == 0][0]
            raise DataError(f"duplicate item_id {int(dup)}")
        # Consecutive ids (1..N, as `prepare` and `synth` write them): a row is id - first, found
        # without a search. A binary search over 10M ids costs ~1 us a lookup; a 10M-item graph's
        # 1e9 neighbour ids took ~10 minutes per partition to load that way.
        n = len(self.item_ids)
        self.first = int(self.item_ids[0]) if n and int(self.item_ids[-1]) - int(self.item_ids[0]) == n - 1 else None

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray, what: str = "item_ids") -> np.ndarray:
        """Dense rows of ``item_ids`` (any shape).

        Raises:
            DataError: an id is unknown; the message names ``what`` and the first unknown id.
        """
        ids = as_item_ids(item_ids, what)
        pos, known = self.find(ids)
        if not known.all():
            suffix = " (no items)" if len(self.item_ids) == 0 else ""
            raise DataError(f"{what}: item_id {int(ids[~known].flat[0])} is unknown{suffix}")
        return pos

    def find(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, known)`` of ``item_ids`` (any shape): rows are meaningful where ``known``."""
        values = np.asarray(item_ids, dtype=np.int64)
        if self.first is None:
            return sorted_lookup(self.item_ids, values)
        rows = values - self.first  # ids far outside the range may wrap: they fail the test either way
        known = (rows >= 0) & (rows < len(self.item_ids)) & (values >= self.first)
        return np.where(known, rows, 0), known

    def ids(self, rows: np.ndarray) -> np.ndarray:
        """Item ids of dense ``rows`` (any shape)."""
        return self.item_ids[np.asarray(rows)]


def as_item_ids(values, what: str = "item_ids") -> np.ndarray:
    """``values`` as int64 item ids; DataError naming ``what`` for a value that is not one."""
    try:
        return np.asarray(values, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        flat = np.asarray(values, dtype=object).ravel()
        bad = next((v for v in flat if not isinstance(v, (int, np.integer)) or not -2**63 <= v < 2**63), flat[0])
        raise DataError(f"{what}: {bad!r} is not an item id (a 64-bit integer)") from None


def sorted_lookup(sorted_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, known)`` of ``values`` (any shape) in ascending ``sorted_ids``; positions are
    meaningful where ``known``. The one membership lookup (ItemIndex uses it too)."""
    if len(sorted_ids) == 0:
        return np.zeros(values.shape, np.int64), np.zeros(values.shape, bool)
    pos = np.clip(np.searchsorted(sorted_ids, values), 0, len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == values


def repeats(values: np.ndarray) -> np.ndarray:
    """Mask of the entries of 1-D ``values`` equal to an earlier entry."""
    _, first = np.unique(values, return_index=True)
    mask = np.ones(len(values), bool)
    mask[first] = False
    return mask


def iter_item_ids(uri: str, storage: StorageConfig | None = None,
                  column: str = "item_id") -> Iterator[tuple[str, int, np.ndarray]]:
    """``(file, first row, ids)`` batches of one integer column of a parquet file or folder.

    Raises:
        DataError: a null id, naming the file, the field and the row.
    """
    row, current = 0, None
    for file_uri, batch in io.iter_parquet(uri, storage, [column]):
        if file_uri != current:
            row, current = 0, file_uri
        values = batch.column(0)
        if values.null_count:
            null_row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{file_uri}: row {row + null_row}: field '{column}' is null")
        ids = values.to_numpy().astype(np.int64)
        yield file_uri, row, ids
        row += len(ids)
