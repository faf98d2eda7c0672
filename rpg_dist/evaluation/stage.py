"""``rpg-dist evaluate``: leave-one-out Recall/NDCG@k with graph decoding and full ranking.

Writes (merged into) ``RUN_DIR/metrics.json``::

    {"val": {...}, "test": {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "n_visited_items", ...},
     "val_full_ranking": {...}, "test_full_ranking": {...}, "popularity": {...}, "timings_s": {...},
     "decode": {...}}

Graph decoding starts from ``decode.num_beams`` items per query drawn from a generator seeded with
``decode.seed`` (or the most popular training items), walks ``decode.steps`` steps and ranks the
final beam; full ranking scores every item in blocks of ``eval.item_block_size``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from rpg_dist import configlib, failpoints, io
from rpg_dist.artifacts import RunPaths
from rpg_dist.data.dataset import read_sequences
from rpg_dist.data.items import ItemIndex
from rpg_dist.data.splits import EvalExamples, leave_one_out
from rpg_dist.decode.graph_decode import GraphDecoder, popular_start_items, start_items
from rpg_dist.decode.scoring import full_ranking_topk, popularity_prior
from rpg_dist.decode.transitions import Transitions, count_transitions, last_items, rerank
from rpg_dist.errors import ConfigError
from rpg_dist.evaluation.metrics import ranking_metrics
from rpg_dist.model.rpg import right_pad

if TYPE_CHECKING:
    from rpg_dist.config import Config

log = logging.getLogger(__name__)


@dataclass
class Queries:
    """Evaluation queries as dense rows: right-padded histories, lengths and targets."""

    histories: pa.ListArray  # item rows, one list per query
    targets: np.ndarray  # (n,) int64 rows

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """(items (B, T) right-padded with -1, lengths (B,), targets (B,)) in query order."""
        for lo in range(0, len(self.targets), batch_size):
            chunk = self.histories.slice(lo, batch_size)
            lengths = np.diff(chunk.offsets.to_numpy().astype(np.int64))
            items = right_pad(chunk.flatten().to_numpy(), lengths)
            yield torch.from_numpy(items), torch.from_numpy(lengths), self.targets[lo : lo + batch_size]


def to_queries(examples: EvalExamples, index: ItemIndex, what: str) -> Queries:
    """Map the examples' item ids to dense rows (unknown ids are a DataError naming ``what``)."""
    histories = examples.histories
    rows = index.rows(histories.flatten().to_numpy(), what=f"{what} histories")
    offsets = histories.offsets.to_numpy() - histories.offsets.to_numpy()[0]
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(rows, pa.int64()))
    return Queries(histories=lists, targets=index.rows(examples.targets, what=f"{what} targets"))


def sample_examples(examples: EvalExamples, max_users: int, seed: int) -> EvalExamples:
    """A seeded sample of ``max_users`` users (in their order); all of them when 0 or fewer exist."""
    if not 0 < max_users < len(examples.targets):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples.targets), max_users, replace=False))
    return EvalExamples(user_ids=examples.user_ids[keep], histories=examples.histories.take(pa.array(keep)),
                        targets=examples.targets[keep])


def popularity(train: pa.ListArray, index: ItemIndex) -> torch.Tensor:
    """(N,) int64 occurrences of each item in the training sequences."""
    rows = index.rows(train.flatten().to_numpy(), what="training sequences")
    return torch.from_numpy(np.bincount(rows, minlength=len(index)).astype(np.int64))


def run_item_prior(cfg: Config, index: ItemIndex) -> torch.Tensor | None:
    """(N,) the run's popularity prior (decode.popularity_weight) from its training sequences, or None
    when the weight is 0 (nothing read)."""
    if not cfg.decode.popularity_weight:
        return None
    split = leave_one_out(read_sequences(cfg.dataset, cfg.storage), max_len=cfg.model.max_seq_len)
    return popularity_prior(popularity(split.train, index), cfg.decode.popularity_weight)


def training_transitions(cfg: Config, train: pa.ListArray, index: ItemIndex) -> Transitions | None:
    """The transition prior's counts from the training sequences (None when decode.transition_weight is 0)."""
    if not cfg.decode.transition_weight:
        return None
    rows = index.rows(train.flatten().to_numpy(), what="training sequences")
    return count_transitions(train, rows, len(index), cfg.decode.max_successors)


def evaluate(cfg: Config) -> dict[str, Any]:
    """Evaluate the run's model on val and test; merge the metrics into ``metrics.json`` and return them."""
    from rpg_dist.model.export import load_model

    paths = RunPaths(cfg.run_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    model = load_model(cfg.run_dir, cfg.storage)
    codes = model.item_codes.cpu()  # (N, m)
    index = _item_index(cfg)  # the same ItemIndex load_model checked the codes against
    split = leave_one_out(read_sequences(cfg.dataset, cfg.storage), max_len=cfg.model.max_seq_len)
    counts = popularity(split.train, index)
    prior = training_transitions(cfg, split.train, index)
    item_prior = popularity_prior(counts, cfg.decode.popularity_weight)  # (N,) or None
    timings["load_s"] = time.perf_counter() - clock
    decoder, close, neighbors = _decoder(cfg, codes, index, item_prior, timings)
    metrics: dict[str, Any] = {}
    try:
        for name, examples in (("val", split.val), ("test", split.test)):
            queries = to_queries(sample_examples(examples, cfg.eval.max_users, cfg.seed), index, name)
            graph, full = _evaluate_split(cfg, model, codes, (decoder, neighbors), (counts, prior, item_prior),
                                          queries, name, timings)
            metrics[name] = graph
            if full is not None:
                metrics[f"{name}_full_ranking"] = full
            failpoints.reach("split-evaluated")
    finally:
        close()
    # The same most-frequent training items (ties by lower row) for every test query.
    top = popular_start_items(counts, len(split.test.targets), max(cfg.eval.ks)).numpy()
    metrics["popularity"] = ranking_metrics(top, index.rows(split.test.targets), cfg.eval.ks)
    metrics["timings_s"] = timings
    metrics["decode"] = {**configlib.to_dict(cfg.decode), "n_items": len(index),
                         "n_val": min(len(split.val.targets), cfg.eval.max_users or len(split.val.targets)),
                         "n_test": min(len(split.test.targets), cfg.eval.max_users or len(split.test.targets))}
    _merge_write(paths.metrics, metrics, cfg)
    return metrics


def _item_index(cfg: Config) -> ItemIndex:
    from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

    return load_semantic_ids(RunPaths(cfg.run_dir).semantic_ids, cfg.storage).index


def _decoder(cfg: Config, codes: torch.Tensor, index: ItemIndex, item_prior: torch.Tensor | None,
             timings: dict[str, float]):
    """The graph decoder, its close function, and what start items read lists from: the (N, k) lists
    in process, or the decoder itself when sharded over Ray actors (this process then holds only
    the (N,) partition map)."""
    from rpg_dist.graph.store import load_graph, load_partitions

    if cfg.decode.num_beams > codes.shape[0]:
        raise ConfigError(f"decode.num_beams: {cfg.decode.num_beams} exceeds the {codes.shape[0]} items")
    clock = time.perf_counter()
    if cfg.decode.sharded:
        from rpg_dist.decode.sharded import ShardedGraphDecoder
        from rpg_dist.raycluster import init_ray

        init_ray(cfg.ray)
        decoder = ShardedGraphDecoder.from_run(cfg.run_dir, load_partitions(cfg.run_dir, index, cfg.storage),
                                               cfg.decode.num_beams, cfg.decode.steps, cfg.storage,
                                               cfg.decode.num_cpus_per_shard, item_prior)
        timings["graph_load_s"] = time.perf_counter() - clock
        return decoder, decoder.close, decoder
    neighbors = torch.from_numpy(load_graph(cfg.run_dir, index, cfg.storage).neighbors)
    decoder = GraphDecoder(codes, neighbors, cfg.decode.num_beams, cfg.decode.steps, cfg.decode.chunk_size,
                           prior=item_prior)
    timings["graph_load_s"] = time.perf_counter() - clock
    return decoder, lambda: None, neighbors


@torch.no_grad()
def _evaluate_split(cfg: Config, model, codes, graph_decoder, training, queries: Queries, name: str, timings):
    """Graph-decoding metrics (with n_visited_items) and full-ranking metrics of one split.

    ``training``: (popularity (N,), the transition prior or None, the item prior (N,) or None)."""
    decoder, neighbors = graph_decoder
    counts, prior, item_prior = training
    ks, top_k = cfg.eval.ks, max(cfg.eval.ks)
    generator = torch.Generator().manual_seed(cfg.decode.seed)
    graph_ranked, full_ranked, visited = [], [], []
    spent = {"model": 0.0, "graph": 0.0, "full": 0.0}
    traffic: list[dict[str, int]] = []
    for items, lengths, _ in queries.batches(cfg.eval.batch_size):
        clock = time.perf_counter()
        log_probs = model.next_token_log_probs(items, lengths).float()  # (B, m, V)
        spent["model"] += time.perf_counter() - clock
        clock = time.perf_counter()
        start = start_items(cfg.decode, items, lengths, neighbors, counts, codes.shape[0], generator)
        result = decoder.decode(log_probs, start, top_k)
        _add_step_stats(traffic, getattr(decoder, "step_stats", []))
        graph_ranked.append(_with_prior(cfg, (prior, item_prior), log_probs, codes, result.items, result.scores,
                                        items, lengths))
        visited.append(result.n_visited.numpy() + _n_successors(prior, items, lengths))
        spent["graph"] += time.perf_counter() - clock
        if cfg.eval.full_ranking:
            clock = time.perf_counter()
            rows, scores = full_ranking_topk(log_probs, codes, top_k, cfg.eval.item_block_size, item_prior)
            full_ranked.append(_with_prior(cfg, (prior, item_prior), log_probs, codes, rows, scores, items, lengths))
            spent["full"] += time.perf_counter() - clock
    graph = ranking_metrics(np.concatenate(graph_ranked), queries.targets, ks)
    graph["n_visited_items"] = float(np.concatenate(visited).mean())
    graph["queries_per_s"] = len(queries.targets) / max(spent["graph"], 1e-9)
    if traffic:
        graph["sharded_step_stats"] = traffic  # per step, summed over batches
    timings.update({f"{name}_model_s": spent["model"], f"{name}_graph_decode_s": spent["graph"]})
    log.info("%s: graph decoding %s", name, _fmt(graph))
    full = None
    if cfg.eval.full_ranking:
        full = ranking_metrics(np.concatenate(full_ranked), queries.targets, ks)
        full["queries_per_s"] = len(queries.targets) / max(spent["full"], 1e-9)
        timings[f"{name}_full_ranking_s"] = spent["full"]
        log.info("%s: full ranking %s", name, _fmt(full))
    return graph, full


def _with_prior(cfg: Config, priors, log_probs, codes, rows, scores, items, lengths) -> np.ndarray:
    """(B, K) ranked rows, reranked with the transition prior when there is one. ``priors``: (the
    transition prior or None, the item prior the decoder added or None)."""
    prior, item_prior = priors
    if prior is not None:
        last = last_items(items, lengths)  # (B,)
        rows, _ = rerank(log_probs, codes, rows, scores, last, prior, cfg.decode.transition_weight, rows.shape[1],
                         prior=item_prior)
    return rows.numpy()


def _n_successors(prior: Transitions | None, items, lengths) -> np.ndarray:
    """(B,) items the prior scores beyond the decoder's (an upper bound: some were visited already)."""
    if prior is None:
        return np.zeros(len(lengths), np.int64)
    last = last_items(items, lengths).numpy()
    return np.diff(prior.indptr)[last]


def _add_step_stats(total: list[dict[str, int]], batch: list[dict[str, int]]) -> None:
    """Accumulate a sharded decoder's per-step messages, bytes and cross-shard pairs over batches."""
    for step, stats in enumerate(batch):
        if step == len(total):
            total.append({"step": step})
        for key, value in stats.items():
            if key != "step":
                total[step][key] = total[step].get(key, 0) + value


def _merge_write(uri: str, metrics: dict[str, Any], cfg: Config) -> None:
    """Update ``metrics.json`` with our keys, keeping what other stages wrote there."""
    merged = io.read_json(uri, cfg.storage) if io.exists(uri, cfg.storage) else {}
    merged.update(metrics)
    io.write_json(uri, merged, cfg.storage)


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float))
