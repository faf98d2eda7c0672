"""Config of the item kNN graph builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rpg_dist.errors import ConfigError


@dataclass(kw_only=True)
class GraphConfig:
    # exact: every pair, blockwise with a running top-k (O(N^2) pairs at ~1-2.5 ns each);
    # approx: candidates from approx_method, scored exactly; auto: exact up to exact_max_items.
    mode: Literal["auto", "exact", "approx"] = "auto"
    exact_max_items: int = 200_000
    n_edges: int = 200
    # Query items per task sent to a worker (ivf_blocks: items of whole lists, about this many);
    # memory per worker is O(64 x item_chunk + block_size x n_edges).
    block_size: int = 1024
    # Items scored per merge step inside a block.
    item_chunk: int = 16_384
    # Catalogues up to this size are built on a thread pool in this process (no actors to start,
    # nothing to ship: 12k items take well under a second), partitions refined on the whole graph;
    # larger ones on Ray actors.
    local_max_items: int = 200_000
    # Above this size the Ray actors write their own parts as they finish: build-graph never holds
    # the (N, n_edges) lists in one process; label propagation then reads the parts back one at a
    # time (1 + rounds passes) and rewrites them, giving the in-memory build's partitions (without
    # it, at 1M realistic items 45 % of edges crossed partitions against 2.3 %: BENCHMARKS.md).
    # Below it the lists come back to this process: at 1M they are 0.4 GB beside the actors' 4 GB,
    # so streaming would only add the passes.
    stream_min_items: int = 4_000_000
    # Threads of the in-process build (0: torch's intra-op thread count).
    local_threads: int = 0
    num_actors: int = 2
    # Fractional CPUs so that actors plus the driver can never deadlock a 2-core Ray.
    num_cpus_per_actor: float = 0.5
    # torch/faiss threads per actor (the cores it may really use).
    threads_per_actor: int = 1
    # How approximate mode finds candidates, all scored exactly. token_pairs (graph/token_pairs.py):
    # the pairs of items sharing at least approx_shared_digits tokens, each scored once, in this
    # process on local_threads threads (the lists are held here, 8 bytes per edge: 8 GB at 10M x
    # 100); 1M realistic items in 166-523 s (r 3 or 2) at recall 0.989-0.9998, 10M in 39 min (r 4,
    # approx_target_recall 0.95: recall 0.955), against 746 s at 1M for
    # token_blocks (BENCHMARKS.md). token_blocks (graph/token_blocks.py), for a cluster whose driver is small:
    # every item against the items sharing a token (group) with it at some digit -- holds on real
    # codes, whose neighbours share few digits and cluster nowhere. ivf_blocks / faiss_index
    # (graph/approx.py): k-means lists or any faiss index over reduced item vectors -- fast, but only
    # for codes that cluster cleanly (synthetic taxonomies); on real codes their recall is ~0.4.
    approx_method: Literal["token_pairs", "token_blocks", "ivf_blocks", "faiss_index"] = "token_pairs"
    # token_pairs above stream_min_items: build on the Ray actors too, each keeping the lists of its
    # share of the partitions only and writing their parts (never the whole graph in one process).
    # The actors step through the digit pairs together, each sorting the whole catalogue's codes per
    # digit pair (N x 32 bytes, every actor) and scoring its part of the pairs, sending the other
    # end's offers to its share (token_pairs.lockstep). Off: the lists are built in this process (on
    # one box faster and smaller: 177 against 239 s at 1M; 14 GiB peak at 10M x 100).
    stream_token_pairs: bool = False
    # token_pairs: tokens a pair must share to be scored (>= 2), or 0: the largest number that the
    # exact lists of the recall sample (computed first; 200 items when recall_sample is 0) share
    # with their items in at least approx_target_recall of their entries; below 2 the build falls
    # back to token_blocks.
    approx_shared_digits: int = 0
    approx_target_recall: float = 0.98
    # token_blocks: digits whose blocks are used (0: all m) and token groups per digit (256: exact
    # tokens; fewer groups of similar tokens also reach neighbours that share no token; 0: the
    # most groups, a power of two <= 256, that still offer each item >= 30 x n_edges candidates:
    # 64 for Beauty, 256 from ~100k items). Cost is about approx_digits / groups x N^2 pairs.
    approx_digits: int = 0
    approx_token_groups: int = 0
    # Reduction of the concatenated item vectors: gaussian (random projection) or pca (of a sample).
    approx_projection: Literal["gaussian", "pca"] = "gaussian"
    # D of the reduced item vectors (the full m*d vectors never exist).
    approx_dim: int = 64
    # ivf_blocks: k-means lists (0: n_items // 256) and lists searched per list.
    approx_nlist: int = 0
    approx_nprobe: int = 16
    # faiss_index: index factory string over the reduced vectors (inner product), search-time
    # ParameterSpace string (e.g. "nprobe=32", "efSearch=256") and candidates reranked per item.
    approx_index: str = "IVF1024,Flat"
    approx_params: str = "nprobe=32"
    approx_candidates: int = 800
    # pca: items whose concatenated vectors are materialised to fit the reduction (x m*d floats).
    approx_fit_sample: int = 4096
    # Items the k-means / the faiss index is trained on.
    approx_train_size: int = 262_144
    # Items whose approximate neighbour lists are checked against exact ones (recall in stats.json).
    recall_sample: int = 1000
    n_partitions: int = 2
    # Reduced dims used by the balanced k-means that seeds the partitions.
    partition_dim: int = 32
    # Balanced label-propagation rounds on the built graph (0: k-means partitions only).
    refine_rounds: int = 3

    def __post_init__(self) -> None:
        for name in ("n_edges", "block_size", "item_chunk", "num_actors", "threads_per_actor",
                     "n_partitions", "approx_dim", "approx_nprobe", "approx_fit_sample", "approx_train_size",
                     "partition_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError("num_cpus_per_actor: must be > 0")
        if self.approx_shared_digits == 1 or self.approx_shared_digits < 0:
            raise ConfigError(f"approx_shared_digits: {self.approx_shared_digits} must be 0 (from the recall sample) "
                              "or >= 2")
        if not 0 < self.approx_target_recall <= 1:
            raise ConfigError(f"approx_target_recall: {self.approx_target_recall} must lie in (0, 1]")
        if self.approx_candidates < self.n_edges:
            raise ConfigError(
                f"approx_candidates: {self.approx_candidates} is below n_edges ({self.n_edges}); "
                "the rerank needs at least n_edges candidates"
            )
        for name in ("recall_sample", "refine_rounds", "approx_nlist", "local_max_items", "local_threads",
                     "exact_max_items", "approx_digits", "approx_token_groups", "stream_min_items"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")

    def resolved_mode(self, n_items: int) -> str:
        """"exact" or "approx" for a catalogue of ``n_items`` ("auto" decides by exact_max_items)."""
        if self.mode != "auto":
            return self.mode
        return "exact" if n_items <= self.exact_max_items else "approx"
