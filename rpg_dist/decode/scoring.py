"""Item scores from per-digit token log-probabilities: the one scorer every caller uses.

RPG scores item ``n`` for query ``b`` as ``mean_k log_probs[b, k, codes[n, k]]``: digits are
independent, so an item's log-likelihood is a sum of ``m`` table lookups (no decoding tree), like
a PQ asymmetric distance. Laid out as one (m*V, B) table per batch of queries, the sums of C items
are ``F.embedding_bag`` over their m offset codes (the graph kernel, ``graph.similarity``): each
lookup reads B contiguous floats, ~1 ns per (query, item) pair on one core of this CPU.

Every scorer here (blocks of items, per-query candidate lists, flat (query, item) pairs) adds the
digits in the same order, ``((lp_0 + lp_1) + lp_2) + ...``, in float32, then divides by ``m``. A given
(query, item) therefore gets bit-identical scores from full ranking, validation ranks, graph decoding
and sharded decoding, which is what lets their results be compared exactly (ties included).

An optional item prior (N,) float32 (``popularity_prior``; not in the paper) is added to that mean,
in float32, by every scorer alike: ``score = mean_k lp[k, code_k] + prior[n]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from rpg_dist.decode.blocktopk import RunningTopK
from rpg_dist.decode.topk import key_rows, key_scores, ranking_keys

# Queries per lookup table: (m*V, 64) float32 is 2 MB at m = 32, V = 256 and stays in cache.
QUERY_BLOCK = 64
# Upper bound on scores (items x queries) held at once.
_SCORE_BUDGET = 1 << 22


def offset_codes(codes: torch.Tensor, vocab: int) -> torch.Tensor:
    """(C, m) codes -> (C, m) int32 rows of a stacked (m*V, .) table: digit k's token j is k*V + j."""
    n_digit = codes.shape[1]
    return codes.to(torch.int32) + torch.arange(0, n_digit * vocab, vocab, dtype=torch.int32, device=codes.device)


def lookup_tables(log_probs: torch.Tensor) -> torch.Tensor:
    """(B, m, V) log-probabilities -> (m*V, B) float32 lookup table, one column per query."""
    return log_probs.reshape(log_probs.shape[0], -1).t().contiguous().float()


def popularity_prior(counts: torch.Tensor, weight: float) -> torch.Tensor | None:
    """(N,) float32 ``weight * log(1 + count)`` of each item's training occurrences (negative counts,
    e.g. withdrawn items, count as 0), or None when ``weight`` is 0: the paper's score.

    RPG scores an item only through its codes, so two items with the same codes, or items of one
    neighbourhood, score alike however often each was chosen; the prior adds what codes cannot hold.
    """
    if not weight:
        return None
    return (weight * torch.log1p(counts.clamp(min=0).double())).float()


def block_scores(tables: torch.Tensor, item_offsets: torch.Tensor, n_digit: int,
                 prior: torch.Tensor | None = None) -> torch.Tensor:
    """(C, B) scores of C items (offset codes (C, m), their (C,) ``prior``) for the queries of
    ``tables`` (m*V, B)."""
    scores = F.embedding_bag(item_offsets, tables, mode="sum") / n_digit
    return scores if prior is None else scores.add_(prior.unsqueeze(1))


def score_blocks(log_probs: torch.Tensor, codes: torch.Tensor, block_size: int, prior: torch.Tensor | None = None
                 ) -> Iterator[tuple[slice, int, torch.Tensor]]:
    """Every (query block, item block) of scores: ``(query slice, first item row, (C, q) scores)``.

    Memory is O(block x QUERY_BLOCK); item offsets are converted once per item block.
    """
    batch, n_digit, vocab = log_probs.shape
    block = max(1, min(block_size, _SCORE_BUDGET // QUERY_BLOCK))
    tables = [lookup_tables(log_probs[lo : lo + QUERY_BLOCK]) for lo in range(0, batch, QUERY_BLOCK)]
    prior = None if prior is None else prior.to(device=log_probs.device, dtype=torch.float32)
    for start in range(0, codes.shape[0], block):
        offsets = offset_codes(codes[start : start + block], vocab)
        block_prior = None if prior is None else prior[start : start + block]
        for i, table in enumerate(tables):
            lo = i * QUERY_BLOCK
            yield slice(lo, lo + table.shape[1]), start, block_scores(table, offsets, n_digit, block_prior)


def item_scores(log_probs: torch.Tensor, codes: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) scores of every item with ``codes`` (N, m) for every query (small catalogues)."""
    out = torch.empty(log_probs.shape[0], codes.shape[0], device=log_probs.device)
    for queries, start, scores in score_blocks(log_probs, codes, codes.shape[0], prior):
        out[queries, start : start + scores.shape[0]] = scores.t()
    return out


def candidate_scores(log_probs: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, row_major: bool = True,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """(c, C) scores of a candidate list ``rows`` (c, C) per query; log_probs (c, m, V); ``prior``
    (N,) or None.

    codes: (N, m) item-major (``row_major``: a candidate's m codes in one memory access, large
    catalogues) or (m, N) digit-major (digit k's lookups hit one (N,) column that stays in cache,
    small ones). Per digit: the candidates' codes, then a gather from each query's (V,) log-prob
    row; every temporary is (c, C) or (c*C, m), small enough to stay in cache.
    """
    n_digit = log_probs.shape[1]
    flat = rows.reshape(-1)
    if row_major:
        cand = codes.index_select(0, flat)  # (c*C, m): one row per candidate
        columns = (cand[:, k] for k in range(n_digit))
    else:
        columns = (codes[k].index_select(0, flat) for k in range(n_digit))
    total = None
    for k, column in enumerate(columns):
        values = log_probs[:, k].gather(1, column.reshape(rows.shape).long())  # (c, C)
        total = values if total is None else total.add_(values)
    total = total / n_digit
    return total if prior is None else total.add_(prior[rows])


def pair_scores(log_probs: torch.Tensor, queries: torch.Tensor, pair_codes: torch.Tensor,
                pair_prior: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) scores of flat (query, item) pairs: query index (P,) in [0, B), item codes (P, m), the
    items' prior (P,) or None."""
    n_digit, vocab = log_probs.shape[1], log_probs.shape[2]
    flat = log_probs.reshape(-1)  # (B*m*V,)
    base = queries.long() * (n_digit * vocab)  # (P,)
    total = flat[base + pair_codes[:, 0].long()]
    for k in range(1, n_digit):
        total += flat[base + k * vocab + pair_codes[:, k].long()]
    total = total / n_digit
    return total if pair_prior is None else total.add_(pair_prior)


def full_ranking_topk(log_probs: torch.Tensor, codes: torch.Tensor, k: int, block_size: int = 65_536,
                      prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items over the whole catalogue, best first, ties by the lower item row; ``prior``
    (N,) is added to every item's score (``popularity_prior``).

    Returns:
        (B, k) item rows and (B, k) scores.
    """
    batch, n_items = log_probs.shape[0], codes.shape[0]
    if not 0 < k <= n_items:
        raise ValueError(f"k={k} must lie in [1, {n_items}]")
    if log_probs.device.type != "cpu":
        return _full_ranking_topk_torch(log_probs, codes, k, block_size, prior)
    top = RunningTopK(np.full(batch, -1, np.int64), k)
    for queries, start, scores in score_blocks(log_probs, codes, block_size, prior):
        positions = np.arange(queries.start, queries.stop)
        top.add(scores.numpy(), np.arange(start, start + scores.shape[0]), positions)
    keys = torch.from_numpy(top.keys())
    return key_rows(keys), key_scores(keys)


def _full_ranking_topk_torch(log_probs, codes, k, block_size, prior):
    """Accelerators: the same blocks, selected with torch.topk on packed keys (no host copies)."""
    batch = log_probs.shape[0]
    best = torch.full((batch, 0), 0, dtype=torch.int64, device=log_probs.device)
    parts: list[list[torch.Tensor]] = [[] for _ in range(0, batch, QUERY_BLOCK)]
    for queries, start, scores in score_blocks(log_probs, codes, block_size, prior):
        rows = torch.arange(start, start + scores.shape[0], device=scores.device).expand(scores.shape[1], -1)
        keys = ranking_keys(scores.t(), rows)
        parts[queries.start // QUERY_BLOCK].append(torch.topk(keys, min(k, keys.shape[1]), dim=1).values)
    merged = [torch.topk(torch.cat(p, dim=1), k, dim=1).values for p in parts]
    best = torch.cat(merged) if merged else best
    return key_rows(best), key_scores(best)


def target_ranks(log_probs: torch.Tensor, codes: torch.Tensor, targets: torch.Tensor, block_size: int = 65_536
                 ) -> torch.Tensor:
    """0-based rank of each query's target among all items, in full ranking's order.

    rank = items scoring higher + lower-row items scoring the same. No top-k is formed: memory is
    one (block, 64) score block, whatever the catalogue.
    """
    target_score = scores_of(log_probs, codes[targets])  # same kernel as the blocks below
    ranks = torch.zeros(len(targets), dtype=torch.long, device=log_probs.device)
    for queries, start, scores in score_blocks(log_probs, codes, block_size):
        rows = torch.arange(start, start + scores.shape[0], device=scores.device)[:, None]  # (C, 1)
        own, mine = target_score[queries][None, :], targets[queries][None, :]
        ranks[queries] += ((scores > own) | ((scores == own) & (rows < mine))).sum(0)
    return ranks


def scores_of(log_probs: torch.Tensor, item_codes: torch.Tensor) -> torch.Tensor:
    """(B,) score of one item per query (codes (B, m)), by the block kernel (bit-identical)."""
    vocab, n_digit = log_probs.shape[2], log_probs.shape[1]
    out = torch.empty(log_probs.shape[0], device=log_probs.device)
    for lo in range(0, log_probs.shape[0], QUERY_BLOCK):
        table = lookup_tables(log_probs[lo : lo + QUERY_BLOCK])
        scores = block_scores(table, offset_codes(item_codes[lo : lo + QUERY_BLOCK], vocab), n_digit)  # (q, q)
        out[lo : lo + table.shape[1]] = scores.diagonal()
    return out
