"""Transition prior (not in the paper): the last item's training successors added to RPG's score.

score(j | history) = rpg(j) + w * log(1 + count(last -> j)), with ``count`` the times j directly
followed the history's last item in the training part of the sequences, kept for the last item's
``max_successors`` most frequent successors (ties by lower row) and 0 for every other item.

RPG scores every item through its codes, so it generalises across similar items but blurs the
exact item-to-item memory that a transition table keeps (on Beauty the table alone, 0.0428 test
NDCG@10, is level with the trained model, 0.0423); the two are complementary (BENCHMARKS.md).

Only the successors' scores move, and only upwards, so the top-k of the sum lies in the union of
the model's own top-k and the successors: ``rerank`` takes any decoder's ranked list (full
ranking: exact; graph decoding: its beams) and never scores the catalogue again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from rpg_dist.decode.scoring import candidate_scores
from rpg_dist.decode.topk import MIN_KEY, key_rows, key_scores, ranking_keys


@dataclass
class Transitions:
    """Each item's kept training successors, CSR over dense rows, most frequent first."""

    indptr: np.ndarray  # (N + 1,) int64
    successors: np.ndarray  # (nnz,) int64 item rows
    bonus: np.ndarray  # (nnz,) float32 log(1 + count)

    def of(self, last: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) successor rows (-1 padded) and (B, S) bonuses of the items ``last`` (B,)."""
        starts, ends = self.indptr[last], self.indptr[last + 1]
        lengths = ends - starts
        width = int(lengths.max()) if len(last) else 0
        slot = np.arange(width)[None, :]  # (1, S)
        valid = slot < lengths[:, None]  # (B, S)
        flat = np.where(valid, starts[:, None] + slot, 0)
        rows = np.where(valid, self.successors[flat] if len(self.successors) else 0, -1)
        bonus = np.where(valid, self.bonus[flat] if len(self.bonus) else 0, 0).astype(np.float32)
        return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(bonus)

    def moved(self, old_rows: np.ndarray, n: int) -> Transitions:
        """The same transitions after the catalogue's rows moved (``old_rows[i]``: item i's new row)
        and grew to ``n`` rows; new items have no successors."""
        lengths = np.zeros(n, np.int64)
        lengths[old_rows] = np.diff(self.indptr)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        # Old rows keep their relative order (rows are dealt by item id), so ties stay by lower row.
        order = np.argsort(old_rows, kind="stable")  # the old items in new row order
        take = _segment_positions(self.indptr, order)
        return Transitions(indptr, old_rows[self.successors[take]], self.bonus[take])


def _segment_positions(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions of the CSR segments of ``rows``, concatenated in that order (vectorised)."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + np.arange(int(lengths.sum())) - offsets


def last_items(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) the last item of each right-padded (B, T) history of ``lengths`` (B,)."""
    return items.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)


def count_transitions(train: pa.ListArray, rows: np.ndarray, n_items: int, max_successors: int) -> Transitions:
    """Transitions of the training sequences ``train`` (lists of item ids) whose flattened items
    map to dense ``rows``. Memory is O(training interactions), never O(N^2)."""
    offsets = train.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    rows = np.asarray(rows, np.int64)
    inner = np.ones(len(rows), bool)  # position i starts a pair (i, i + 1) inside one sequence
    inner[np.maximum(offsets[1:] - 1, 0)[np.diff(offsets) > 0]] = False
    src = rows[:-1][inner[:-1]] if len(rows) else rows
    dst = rows[1:][inner[:-1]] if len(rows) else rows
    pairs, counts = np.unique(src * n_items + dst, return_counts=True)
    src, dst = pairs // n_items, pairs % n_items
    order = np.lexsort((dst, -counts, src))  # by source, most frequent first, ties by lower row
    src, dst, counts = src[order], dst[order], counts[order]
    starts = np.searchsorted(src, src, side="left")
    keep = np.arange(len(src)) - starts < max_successors
    src, dst, counts = src[keep], dst[keep], counts[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n_items))]).astype(np.int64)
    return Transitions(indptr, dst, np.log1p(counts).astype(np.float32))


@torch.no_grad()
def rerank(log_probs: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
           last: torch.Tensor, transitions: Transitions, weight: float, k: int,
           banned: torch.Tensor | None = None, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` by RPG score plus the transition prior, from a decoder's ranked list.

    Args:
        log_probs: (B, m, V) per-digit log-probabilities (the scores' source).
        codes: (N, m) item codes.
        rows, scores: (B, K) a decoder's items (-1 padded) and their scores, K >= k, with ``prior``
            (N,) added (the item prior the decoder used, or None).
        last: (B,) each history's last item row.
        banned: (N,) bool, items never to return (withdrawn).

    Returns:
        (B, k) rows (-1 where fewer items exist) and their scores, best first, ties by lower row.
    """
    succ, bonus = (t.to(rows.device) for t in transitions.of(last.cpu().numpy()))  # (B, S): CSR on the host
    succ_scores = candidate_scores(log_probs, codes, succ.clamp(min=0), prior=prior) + weight * bonus  # (B, S)
    succ_keys = torch.where(succ >= 0, ranking_keys(succ_scores, succ.clamp(min=0)), MIN_KEY)
    if banned is not None:
        succ_keys = torch.where(banned[succ.clamp(min=0)], MIN_KEY, succ_keys)
    # A decoded item that is also a successor is kept once: in its successor slot, with the prior.
    twice = (rows.unsqueeze(2) == succ.unsqueeze(1)).any(dim=2)  # (B, K)
    keys = torch.where((rows >= 0) & ~twice, ranking_keys(scores, rows.clamp(min=0)), MIN_KEY)
    keys = torch.cat([keys, succ_keys], dim=1)
    top = torch.topk(keys, min(k, keys.shape[1]), dim=1).values  # (B, k)
    empty = top == MIN_KEY
    return (torch.where(empty, -1, key_rows(top)),
            torch.where(empty, float("-inf"), key_scores(top)))
