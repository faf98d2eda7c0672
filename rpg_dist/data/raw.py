"""``RawDataset``: what every importer (and the synthetic generator) hands to ``importers.write``."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass
class RawDataset:
    """Item and sequence tables plus where their rows came from (for error messages)."""

    items: pa.Table
    sequences: pa.Table
    items_origin: str
    sequences_origin: str
    # Row number of the first table row in its file (1 for line-numbered text files).
    first_row: int = 1
