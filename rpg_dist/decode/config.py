"""Config of graph-constrained decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rpg_dist.errors import ConfigError


@dataclass(kw_only=True)
class DecodeConfig:
    # b: items kept per query after each step.
    num_beams: int = 20
    # q: expansion steps over the graph.
    steps: int = 3
    # How the b start items are chosen: uniformly at random (the paper), the most popular items, or
    # from the user's history: its items, then the graph neighbours of its last items, then popular
    # ones (not in the paper; for large catalogues, where random starts are far from any target).
    start: Literal["random", "popular", "history"] = "random"
    seed: int = 0
    batch_size: int = 256
    # Decode through one Ray actor per graph partition instead of in this process.
    sharded: bool = False
    # Ray CPUs per shard actor (fractional: shards plus the driver never deadlock a small Ray).
    num_cpus_per_shard: float = 0.5
    # Queries decoded together inside a batch (keeps the per-step tensors in cache).
    chunk_size: int = 16

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ConfigError("num_beams: must be >= 1")
        if self.steps < 0:
            raise ConfigError("steps: must be >= 0")
        if self.batch_size < 1:
            raise ConfigError("batch_size: must be >= 1")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size: must be >= 1")
        if self.num_cpus_per_shard <= 0:
            raise ConfigError("num_cpus_per_shard: must be > 0")
