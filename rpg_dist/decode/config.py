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
    # How `recommend` and `serve` answer (evaluate reports both): graph decoding, full ranking (every
    # item scored: the exact top-k of the model's score), or auto: full ranking up to
    # full_ranking_max_items, graph decoding above. Why a size: full ranking is a blocked scan of m
    # lookups per item (linear in items), graph decoding costs what it visits (~b x k x q items).
    # Measured on 2 cores (BENCHMARKS.md, issue 18 table; b 20, k 200, q 3, random graphs above
    # Beauty): full ranking against graph decoding 28,324 vs 10,134 q/s at 12,101 items, 3,630 vs
    # 4,177 at 100k, 1,685 vs 2,045 at 300k, 482 vs 2,646 at 1M. Between 100k and 300k the two cost
    # about the same, and full ranking is exact: it keeps that range.
    method: Literal["auto", "graph", "full"] = "auto"
    full_ranking_max_items: int = 200_000
    # Transition prior (not in the paper; decode/transitions.py): w in score + w * log(1 + count of
    # last item -> item in the training sequences), over the last item's max_successors most
    # frequent successors. 0 is the paper's score. Choose w on validation
    # (benchmarks/transition_weight.py): on Beauty 1.5-2 lifts test NDCG@10 by 23-25 %.
    transition_weight: float = 0.0
    max_successors: int = 100
    # Popularity prior (not in the paper; decode/scoring.py popularity_prior): w in score + w * log(1 +
    # the item's occurrences in the training sequences), added to every item's score by full ranking
    # and graph decoding alike. RPG scores an item only through its codes, so it cannot tell a
    # bestseller from a rarely bought item with similar codes. 0 is the paper's score; choose w on
    # validation (benchmarks/transition_weight.py --prior popularity): BENCHMARKS.md "Popularity prior".
    popularity_weight: float = 0.0

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
        if self.full_ranking_max_items < 0:
            raise ConfigError("full_ranking_max_items: must be >= 0")
        if not 0 <= self.transition_weight < float("inf"):
            raise ConfigError(f"transition_weight: must be a finite number >= 0, got {self.transition_weight}")
        if not 0 <= self.popularity_weight < float("inf"):
            raise ConfigError(f"popularity_weight: must be a finite number >= 0, got {self.popularity_weight}")
        if self.max_successors < 1:
            raise ConfigError("max_successors: must be >= 1")

    def resolved_method(self, n_items: int) -> str:
        """"graph" or "full" for a catalogue of ``n_items`` ("auto" decides by full_ranking_max_items)."""
        if self.method != "auto":
            return self.method
        return "full" if n_items <= self.full_ranking_max_items else "graph"
