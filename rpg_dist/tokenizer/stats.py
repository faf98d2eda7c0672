"""Statistics of a semantic-ID table, computed shard by shard (no all-codes matrix on the driver).

Collisions are counted on two independent 64-bit polynomial hashes of each full code, i.e. 16 bytes
per item instead of m bytes; ``count_colliding_exact`` is the brute-force twin.
"""

from __future__ import annotations

import numpy as np

# Odd 64-bit multipliers of the two hashes (any odd constants work; these are from splitmix64).
_MULTIPLIERS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9))


class CodeStats:
    """Accumulates per-digit token counts and full-code hashes over shards of codes."""

    def __init__(self, n_digit: int, codebook_size: int) -> None:
        self.n_digit, self.codebook_size = n_digit, codebook_size
        self.counts = np.zeros((n_digit, codebook_size), np.int64)  # (m, 256) token usage
        self._hashes: list[np.ndarray] = []

    def add(self, codes: np.ndarray) -> None:
        """Add a shard's (n, m) codes."""
        offsets = np.arange(self.n_digit, dtype=np.int64) * self.codebook_size  # (m,)
        flat = (codes.astype(np.int64) + offsets).ravel()
        self.counts += np.bincount(flat, minlength=self.n_digit * self.codebook_size).reshape(self.counts.shape)
        self._hashes.append(code_hashes(codes))

    def summary(self) -> dict:
        """m, codebook size, n_items, colliding items, per-digit usage and entropy (bits)."""
        n_items = int(self.counts[0].sum()) if self.n_digit else 0
        hashes = np.concatenate(self._hashes) if self._hashes else np.empty((0, 2), np.uint64)
        colliding = count_colliding(hashes)
        p = self.counts / max(n_items, 1)
        entropy = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=1)  # (m,)
        usage = (self.counts > 0).sum(axis=1)  # (m,)
        return {
            "n_digit": self.n_digit,
            "codebook_size": self.codebook_size,
            "n_items": n_items,
            "n_colliding_items": colliding,
            "collision_rate": colliding / max(n_items, 1),
            "n_distinct_codes": n_items - colliding + _n_collision_groups(hashes),
            "digit_usage": usage.tolist(),
            "digit_entropy_bits": np.round(entropy, 4).tolist(),
            "usage_min_mean_max": [int(usage.min()), float(usage.mean()), int(usage.max())],
            "entropy_min_mean_max": [float(entropy.min()), float(entropy.mean()), float(entropy.max())],
            "max_entropy_bits": float(np.log2(self.codebook_size)),
        }


def code_hashes(codes: np.ndarray) -> np.ndarray:
    """(n, m) codes -> (n, 2) uint64: two polynomial hashes of each row (a loop over digits only)."""
    x = codes.astype(np.uint64) + np.uint64(1)  # +1 so a leading 0 digit still changes the hash
    out = np.zeros((len(codes), 2), np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2^64 on purpose
        for k in range(codes.shape[1]):
            for j, mult in enumerate(_MULTIPLIERS):
                out[:, j] = out[:, j] * mult + x[:, k]
    return out


def count_colliding(hashes: np.ndarray) -> int:
    """Items whose full code (here: hash pair) is shared with at least one other item."""
    if len(hashes) == 0:
        return 0
    _, inverse, counts = np.unique(_as_rows(hashes), return_inverse=True, return_counts=True)
    return int((counts[inverse.ravel()] > 1).sum())


def count_colliding_exact(codes: np.ndarray) -> int:
    """Brute-force twin of the hash-based count: unique rows of the full (n, m) code matrix."""
    if len(codes) == 0:
        return 0
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return int((counts[inverse.ravel()] > 1).sum())


def _n_collision_groups(hashes: np.ndarray) -> int:
    if len(hashes) == 0:
        return 0
    _, counts = np.unique(_as_rows(hashes), return_counts=True)
    return int((counts > 1).sum())


def _as_rows(hashes: np.ndarray) -> np.ndarray:
    """View (n, 2) uint64 as n structured scalars so np.unique compares whole rows (fast path)."""
    return np.ascontiguousarray(hashes).view([("h0", np.uint64), ("h1", np.uint64)]).ravel()
