"""Dense item indices: every tensor in the system is indexed 0..n_items-1 by sorted item_id."""

from __future__ import annotations

import numpy as np

from rpg_dist.errors import DataError


class ItemIndex:
    """Maps arbitrary int64 ``item_id`` values to dense rows ``0..n-1`` (in ascending id order)."""

    def __init__(self, item_ids: np.ndarray) -> None:
        ids = np.asarray(item_ids, dtype=np.int64)
        self.item_ids = np.sort(ids)
        if len(self.item_ids) > 1 and (np.diff(self.item_ids) == 0).any():
            dup = self.item_ids[1:][np.diff(self.item_ids) == 0][0]
            raise DataError(f"duplicate item_id {int(dup)}")

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray, what: str = "item_ids") -> np.ndarray:
        """Dense rows of ``item_ids`` (any shape).

        Raises:
            DataError: an id is unknown; the message names ``what`` and the first unknown id.
        """
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(self.item_ids) == 0:
            if ids.size:
                raise DataError(f"{what}: item_id {int(ids.flat[0])} is unknown (no items)")
            return ids.copy()
        pos = np.clip(np.searchsorted(self.item_ids, ids), 0, len(self.item_ids) - 1)
        unknown = self.item_ids[pos] != ids
        if unknown.any():
            raise DataError(f"{what}: item_id {int(ids[unknown].flat[0])} is unknown")
        return pos

    def ids(self, rows: np.ndarray) -> np.ndarray:
        """Item ids of dense ``rows`` (any shape)."""
        return self.item_ids[np.asarray(rows)]
