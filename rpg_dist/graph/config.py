"""Config of the item kNN graph builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rpg_dist.errors import ConfigError


@dataclass(kw_only=True)
class GraphConfig:
    # exact: blockwise brute force with a streaming top-k; approx: a faiss index over item vectors.
    mode: Literal["exact", "approx"] = "exact"
    n_edges: int = 200
    # Query items per block; memory per actor is O(block_size x max(n_edges, item chunk)).
    block_size: int = 2048
    num_actors: int = 2
    num_cpus_per_actor: float = 0.5
    # faiss index factory string for approx mode (inner product over concatenated token vectors).
    approx_index: str = "IVF1024,Flat"
    approx_nprobe: int = 32
    # Items whose approximate neighbour lists are checked against exact ones (recall in stats.json).
    recall_sample: int = 1000
    n_partitions: int = 2

    def __post_init__(self) -> None:
        for name in ("n_edges", "block_size", "num_actors", "n_partitions", "approx_nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.recall_sample < 0:
            raise ConfigError("recall_sample: must be >= 0")
