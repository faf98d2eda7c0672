"""Deterministic top-k: one int64 key per (score, row) whose descending order is the ranking.

Every ranked list in rpg-dist (graph neighbours, decoded beams, full ranking) orders items by
**descending score, then ascending row**. Packing both into one int64 makes that order a plain
``topk``/``sort`` over keys (no stable sort needed), makes equal keys mean "same item, same score"
(which is how decoding drops duplicate candidates), and lets brute-force twins agree exactly.

Key layout: the high 32 bits are the float32 score mapped to an order-preserving int32, the low 32
bits are ``2**32 - 1 - row`` (so a lower row wins a tie). Rows must lie in [0, 2**32 - 1).
"""

from __future__ import annotations

import torch

# Smaller than any real key: used to mask out duplicates and padding before a top-k.
MIN_KEY = torch.iinfo(torch.int64).min
_LOW = 0xFFFFFFFF


def ranking_keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keys for ``scores`` (float32, any shape) of items ``rows`` (same shape, integer).

    Descending key order = descending score, ties by ascending row. ``-inf`` sorts below every finite
    score; ``-0.0`` and ``0.0`` are the same score.
    """
    # + 0.0 turns -0.0 into +0.0 so equal floats get equal keys.
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    # IEEE floats order like sign-magnitude ints: flip the magnitude bits of negatives.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits << 32) | (_LOW - rows.to(torch.int64))


def key_rows(keys: torch.Tensor) -> torch.Tensor:
    """Item rows packed in ``keys`` (int64)."""
    return _LOW - (keys & _LOW)


def key_scores(keys: torch.Tensor) -> torch.Tensor:
    """float32 scores packed in ``keys``."""
    bits = keys >> 32
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int32).view(torch.float32)


def merge_topk(keys_a: torch.Tensor, keys_b: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` keys per row of ``cat([keys_a, keys_b], 1)``, best first (rows padded with MIN_KEY)."""
    keys = torch.cat([keys_a, keys_b], dim=1)
    if keys.shape[1] < k:
        pad = keys.new_full((keys.shape[0], k - keys.shape[1]), MIN_KEY)
        keys = torch.cat([keys, pad], dim=1)
    return torch.topk(keys, k, dim=1, sorted=True).values
