"""``rpg-dist build-graph``: token embeddings + semantic IDs -> partitioned kNN graph under RUN_DIR/graph/."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from rpg_dist import configlib, io
from rpg_dist.artifacts import RunPaths
from rpg_dist.errors import StageError
from rpg_dist.graph.builder import build_item_graph, stream_item_graph
from rpg_dist.graph.store import commit_graph, write_graph
from rpg_dist.raycluster import init_ray
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

if TYPE_CHECKING:
    from rpg_dist.config import Config, StorageConfig

log = logging.getLogger(__name__)

SIMILARITY = "sim(a,b) = mean_k (1 + cos(e_k[a_k], e_k[b_k])) / 2, as sums of per-digit (V, V) cosine-table lookups"


def load_token_embeddings(run_dir: str, storage: StorageConfig | None = None) -> torch.Tensor:
    """The (m, V, d) ``token_embeddings`` tensor of the exported model (read without building it).

    Raises:
        StageError: no exported model, weights altered since export, or no ``token_embeddings`` in them.
    """
    from rpg_dist.model.export import read_weights

    uri = RunPaths(run_dir).model_weights
    if not io.exists(uri, storage):
        raise StageError(f"{uri}: no trained model; run `rpg-dist train` first")
    tensors = read_weights(RunPaths(run_dir).model, storage)
    if "token_embeddings" not in tensors or tensors["token_embeddings"].dim() != 3:
        raise StageError(f"{uri}: no (m, V, d) tensor named 'token_embeddings'")
    return tensors["token_embeddings"]


def build_graph(cfg: Config, token_embeddings: torch.Tensor | None = None) -> dict[str, Any]:
    """Build, partition and write the item graph; returns the manifest.

    Args:
        cfg: the run config (``graph`` section, ``run_dir``, ``storage``, ``ray``, ``seed``).
        token_embeddings: (m, V, d) table to use instead of the exported model's.

    Raises:
        StageError: semantic IDs or the model are missing, or their digit counts disagree.
    """
    started = time.perf_counter()
    paths = RunPaths(cfg.run_dir)
    semantic_ids = load_semantic_ids(paths.semantic_ids, cfg.storage)
    if token_embeddings is None:
        token_embeddings = load_token_embeddings(cfg.run_dir, cfg.storage)
    codes = torch.from_numpy(semantic_ids.codes)  # (N, m) int16
    if token_embeddings.shape[0] != codes.shape[1] or int(codes.max()) >= token_embeddings.shape[1]:
        raise StageError(
            f"{paths.model_weights}: token_embeddings {tuple(token_embeddings.shape)} do not match the "
            f"{codes.shape[1]}-digit codes of {paths.semantic_ids}"
        )
    # Streamed: on Ray actors, which write the parts themselves (never the whole graph in one process).
    # Token pairs only when asked (graph.stream_token_pairs): by default their lists are this
    # process's state (graph/token_pairs.py).
    token_pairs = cfg.graph.resolved_mode(codes.shape[0]) == "approx" and cfg.graph.approx_method == "token_pairs"
    streamed = (codes.shape[0] > max(cfg.graph.local_max_items, cfg.graph.stream_min_items)
                and (cfg.graph.stream_token_pairs or not token_pairs))
    if codes.shape[0] > cfg.graph.local_max_items:
        init_ray(cfg.ray)
    log.info("graph: %d items, mode %s, %d edges", codes.shape[0], cfg.graph.resolved_mode(codes.shape[0]),
             cfg.graph.n_edges)
    if streamed:
        built = stream_item_graph(token_embeddings, codes, cfg.graph, paths.graph, semantic_ids.index.item_ids,
                                  cfg.storage, seed=cfg.seed)
    else:
        built = build_item_graph(token_embeddings, codes, cfg.graph, seed=cfg.seed)
    write_started = time.perf_counter()
    manifest = {
        **built.info,
        "similarity": SIMILARITY,
        "n_digit": int(codes.shape[1]),
        "seed": cfg.seed,
        "config": configlib.to_dict(cfg.graph),
        "fingerprint": configlib.fingerprint(cfg.graph),
    }
    stats = {"mode": built.info["mode"], **built.stats}
    manifest["timings_s"]["total_s"] = time.perf_counter() - started
    if streamed:
        manifest = commit_graph(cfg.run_dir, manifest, stats, built.files, built.digests, cfg.storage)
    else:
        manifest = write_graph(cfg.run_dir, semantic_ids.index, built.neighbors, built.partition, manifest, stats,
                               cfg.storage)
    log.info("graph: committed in %.1fs, cross-partition edges %.3f",
             time.perf_counter() - write_started, manifest["cross_partition_edge_fraction"])
    return manifest
