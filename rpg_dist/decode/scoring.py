"""Item scores from per-digit token log-probabilities, and blockwise full ranking.

RPG scores item ``n`` for query ``b`` as ``mean_k log_probs[b, k, codes[n, k]]``: digits are
independent, so an item's log-likelihood is a sum of ``m`` table lookups (no decoding tree).
"""

from __future__ import annotations

import torch

# Upper bound on gathered elements (B x items x m) held at once while scoring a block.
_GATHER_BUDGET = 1 << 25


def item_scores(log_probs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Scores of the items with ``codes`` for every query.

    Args:
        log_probs: (B, m, V) log-softmax over each digit's V tokens.
        codes: (N, m) token of each item in each digit, values in [0, V).

    Returns:
        (B, N) mean over digits of the items' token log-probabilities.
    """
    batch, n_digit, vocab = log_probs.shape
    # Flat index of (digit k, token codes[n, k]) into the (B, m*V) table.
    flat = codes.long() + torch.arange(n_digit, device=codes.device) * vocab  # (N, m)
    gathered = log_probs.reshape(batch, n_digit * vocab)[:, flat.reshape(-1)]  # (B, N*m)
    return gathered.view(batch, -1, n_digit).mean(dim=-1)


def full_ranking_topk(
    log_probs: torch.Tensor, codes: torch.Tensor, k: int, block_size: int = 65_536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items over the whole catalogue, scored block by block (memory O(B x block)).

    Ties are broken towards the lower item row, so results are deterministic.

    Args:
        log_probs: (B, m, V) per-digit log-probabilities.
        codes: (N, m) codes of all items.
        k: items to return (<= N).
        block_size: items scored at once (capped so B x block x m stays bounded).

    Returns:
        (B, k) item rows and (B, k) scores, best first.
    """
    batch, n_digit, _ = log_probs.shape
    block = max(1, min(block_size, _GATHER_BUDGET // max(1, batch * n_digit)))
    best_scores = log_probs.new_empty(batch, 0)
    best_rows = torch.empty(batch, 0, dtype=torch.long, device=log_probs.device)
    for start in range(0, codes.shape[0], block):
        scores = item_scores(log_probs, codes[start : start + block])  # (B, blk)
        rows = torch.arange(start, start + scores.shape[1], device=log_probs.device).expand(batch, -1)
        # Earlier (lower-row) candidates come first, and the stable sort keeps them first on ties.
        cand_scores = torch.cat([best_scores, scores], dim=1)
        cand_rows = torch.cat([best_rows, rows], dim=1)
        order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores = cand_scores.gather(1, order)
        best_rows = cand_rows.gather(1, order)
    return best_rows, best_scores
