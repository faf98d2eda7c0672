"""Item scores from per-digit token log-probabilities, and blockwise full ranking.

RPG scores item ``n`` for query ``b`` as ``mean_k log_probs[b, k, codes[n, k]]``: digits are
independent, so an item's log-likelihood is a sum of ``m`` table lookups (no decoding tree).

Every scorer here (all items, per-query candidate lists, flat (query, item) pairs) adds the digits
in the same order, ``((lp_0 + lp_1) + lp_2) + ...``, in float32, then divides by ``m``. A given
(query, item) therefore gets bit-identical scores from full ranking, graph decoding and sharded
decoding, which is what lets their results be compared exactly (ties included).
"""

from __future__ import annotations

import torch

from rpg_dist.decode.topk import key_rows, key_scores, merge_topk, ranking_keys

# Upper bound on scores (B x items) held at once while ranking a block.
_SCORE_BUDGET = 1 << 24


def item_scores(log_probs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Scores of the items with ``codes`` for every query.

    Args:
        log_probs: (B, m, V) log-softmax over each digit's V tokens.
        codes: (N, m) token of each item in each digit, values in [0, V).

    Returns:
        (B, N) mean over digits of the items' token log-probabilities.
    """
    n_digit = log_probs.shape[1]
    codes = codes.long()
    # One (B, N) gather per digit: reads a (B, V) slice that stays in cache; m is small (16-64).
    total = log_probs[:, 0].index_select(1, codes[:, 0])  # (B, N)
    for k in range(1, n_digit):
        total += log_probs[:, k].index_select(1, codes[:, k])
    return total / n_digit


def candidate_scores(log_probs: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Scores of a different candidate list per query.

    Args:
        log_probs: (B, m, V) per-digit log-probabilities.
        codes: (N, m) codes of all items.
        rows: (B, C) item rows to score for each query.

    Returns:
        (B, C) scores, bit-identical to ``item_scores(log_probs, codes)[b, rows[b]]``.
    """
    n_digit = log_probs.shape[1]
    # One gather of each candidate's m codes (a 2*m-byte row, one cache line), kept in their
    # narrow dtype; widened one digit at a time.
    cand_codes = codes[rows]  # (B, C, m)
    total = log_probs[:, 0].gather(1, cand_codes[:, :, 0].long())  # (B, C)
    for k in range(1, n_digit):
        total += log_probs[:, k].gather(1, cand_codes[:, :, k].long())
    return total / n_digit


def pair_scores(log_probs: torch.Tensor, queries: torch.Tensor, pair_codes: torch.Tensor) -> torch.Tensor:
    """Scores of flat (query, item) pairs, e.g. the candidates one graph shard owns.

    Args:
        log_probs: (B, m, V) per-digit log-probabilities.
        queries: (P,) query index of each pair, in [0, B).
        pair_codes: (P, m) codes of each pair's item.

    Returns:
        (P,) scores, bit-identical to ``item_scores`` for the same query and item.
    """
    n_digit, vocab = log_probs.shape[1], log_probs.shape[2]
    flat = log_probs.reshape(-1)  # (B*m*V,)
    base = queries.long() * (n_digit * vocab)  # (P,)
    total = flat[base + pair_codes[:, 0].long()]
    for k in range(1, n_digit):
        total += flat[base + k * vocab + pair_codes[:, k].long()]
    return total / n_digit


def full_ranking_topk(
    log_probs: torch.Tensor, codes: torch.Tensor, k: int, block_size: int = 65_536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items over the whole catalogue, scored block by block (memory O(B x block)).

    Ties are broken towards the lower item row, so results are deterministic.

    Args:
        log_probs: (B, m, V) per-digit log-probabilities.
        codes: (N, m) codes of all items.
        k: items to return (<= N).
        block_size: items scored at once (capped so B x block stays bounded).

    Returns:
        (B, k) item rows and (B, k) scores, best first.
    """
    batch = log_probs.shape[0]
    n_items = codes.shape[0]
    if not 0 < k <= n_items:
        raise ValueError(f"k={k} must lie in [1, {n_items}]")
    block = max(1, min(block_size, _SCORE_BUDGET // max(1, batch)))
    device = log_probs.device
    best = torch.empty(batch, 0, dtype=torch.int64, device=device)
    for start in range(0, n_items, block):
        scores = item_scores(log_probs, codes[start : start + block])  # (B, blk)
        rows = torch.arange(start, start + scores.shape[1], device=device).expand(batch, -1)
        keys = ranking_keys(scores, rows)  # (B, blk)
        top = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
        best = merge_topk(best, top, min(k, best.shape[1] + top.shape[1]))
    return key_rows(best), key_scores(best)


def full_ranking_topk_reference(log_probs: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force twin of ``full_ranking_topk``: every score at once, then a stable sort."""
    scores = item_scores(log_probs, codes)  # (B, N)
    # Stable descending sort keeps the lower row first among equal scores.
    order = torch.sort(scores + 0.0, dim=1, descending=True, stable=True).indices[:, :k]
    return order, scores.gather(1, order)
