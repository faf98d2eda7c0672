"""Stand-ins for tests and benchmarks: semantic IDs without running the tokenize stage.

Training compute does not depend on the code values, so benchmarks can time the Beauty model on
random codes; tests use codes with structure (items sharing a category share digits) so that the
model has something to learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rpg_dist.artifacts import RunPaths
from rpg_dist.data import dataset as ds
from rpg_dist.tokenizer.semantic_ids import write_semantic_ids

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig


def write_random_semantic_ids(
    dataset_uri: str,
    run_dir: str,
    n_digit: int,
    codebook_size: int = 256,
    seed: int = 0,
    storage: StorageConfig | None = None,
) -> np.ndarray:
    """Write uniformly random codes for every item of ``dataset_uri``; returns them (n_items, m)."""
    item_ids = ds.read_items(dataset_uri, storage, ["item_id"]).column("item_id").to_numpy()
    item_ids = np.sort(item_ids)
    codes = np.random.default_rng(seed).integers(0, codebook_size, (len(item_ids), n_digit), dtype=np.int16)
    write_semantic_ids(RunPaths(run_dir).semantic_ids, item_ids, codes, storage)
    return codes
