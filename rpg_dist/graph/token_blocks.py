"""Approximate kNN for real semantic IDs: exact scores inside shared-token blocks.

Why not a vector index: on real codes RPG's similarity is dominated by shared digits, and those
are spread across the whole catalogue. Measured on Beauty (12k items, table after 12 epochs) the
true 200 nearest items of an item share a median of 1 of its 32 digits, and k-means lists in the
similarity's own space hold them no better than random lists (recall = fraction probed); on a 1M
realistic catalogue (``synth --like``) half of them are not among the 20,000 nearest text vectors,
while 97.7 % share at least 2 digits with the item. So candidates come from the codes themselves.

For each digit k (all m, or ``n_digits`` of them), items are grouped by their token's group at k
(the token itself, or one of ``n_groups`` groups of similar tokens: k-means of the digit's trained
token vectors). Every item is scored exactly against every item of each of its blocks, with the
block kernel (``similarity.block_sums``: queries of a block share the candidates), and the best
``n_edges`` distinct items over its blocks are kept. Pairs sharing s digits are scored s times;
``RunningTopK(distinct=True)`` keeps them once. Cost: sum over used digits of sum_g n_g^2 pairs,
about n_digits / n_groups x N^2 (N^2 / 8 at m = 32 with exact tokens); memory per task is its
query rows' top-k lists plus one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rpg_dist.decode.blocktopk import RunningTopK
from rpg_dist.graph.exact import QUERY_BLOCK, keys_to_rows
from rpg_dist.decode.scoring import offset_codes
from rpg_dist.graph.similarity import block_sums, query_tables


@dataclass
class TokenBlocks:
    """Items grouped by token group, for each digit used."""

    digits: np.ndarray  # (m',) digits used
    token_group: np.ndarray  # (m', V) int64 group of each token at each used digit
    order: np.ndarray  # (m', N) int32 item rows, sorted by their group at that digit
    offsets: np.ndarray  # (m', G + 1) int64: group g of digit i holds order[i, offsets[i, g]:offsets[i, g+1]]

    def block(self, i: int, group: int) -> np.ndarray:
        """Rows of the items in ``group`` at the i-th used digit."""
        return self.order[i, self.offsets[i, group] : self.offsets[i, group + 1]]


def plan_token_blocks(token_embeddings: torch.Tensor, codes: torch.Tensor, n_digits: int, n_groups: int,
                      seed: int) -> TokenBlocks:
    """Choose the digits (a seeded subset when ``n_digits`` < m) and group each digit's tokens.

    Args:
        token_embeddings: (m, V, d) trained token table.
        codes: (N, m) item codes.
        n_digits: digits used (0: all).
        n_groups: token groups per digit (V: each token its own group; see ``default_groups``).
    """
    n_digit, vocab, _ = token_embeddings.shape
    used = n_digit if not n_digits else min(n_digits, n_digit)
    digits = np.sort(np.random.default_rng(seed).permutation(n_digit)[:used]) if used < n_digit else np.arange(n_digit)
    groups = min(n_groups, vocab)
    token_group = np.stack([_group_tokens(token_embeddings[k], groups, seed + int(k)) for k in digits])
    item_groups = token_group[np.arange(used)[:, None], codes[:, digits].long().t().numpy()]  # (m', N)
    order = np.argsort(item_groups, axis=1, kind="stable")
    ordered = np.take_along_axis(item_groups, order, axis=1)
    offsets = np.stack([np.searchsorted(g, np.arange(groups + 1)) for g in ordered]).astype(np.int64)
    order = order.astype(np.int32)
    return TokenBlocks(digits=digits, token_group=token_group, order=order, offsets=offsets)


# Candidates (with repeats) each item should be offered, in multiples of n_edges, when the number
# of token groups is left to the builder: recall@200 on realistic catalogues was 0.97-0.99 at
# 30-60x and 0.88 at 7.5x (BENCHMARKS.md).
CANDIDATES_PER_EDGE = 30


def default_groups(n_items: int, n_digits: int, vocab: int, n_edges: int) -> int:
    """The most token groups (a power of two <= V) that offer each item >= 30 x n_edges candidates.

    An item meets about n_digits x n_items / groups others in its blocks.
    """
    groups = vocab
    while groups > 2 and n_digits * n_items / groups < CANDIDATES_PER_EDGE * n_edges:
        groups //= 2
    return groups


def _group_tokens(tokens: torch.Tensor, n_groups: int, seed: int) -> np.ndarray:
    """(V,) group of each token: itself when n_groups == V, else spherical k-means of the vectors."""
    vocab = tokens.shape[0]
    if n_groups >= vocab:
        return np.arange(vocab, dtype=np.int64)
    import faiss

    x = np.ascontiguousarray(F.normalize(tokens.detach().float(), dim=-1).numpy())
    kmeans = faiss.Kmeans(x.shape[1], n_groups, niter=20, seed=seed, spherical=True, min_points_per_centroid=1)
    kmeans.train(x)
    return kmeans.index.search(x, 1)[1][:, 0].astype(np.int64)


def token_block_neighbors(tables: torch.Tensor, codes: torch.Tensor, blocks: TokenBlocks, query_rows: np.ndarray,
                          n_edges: int) -> torch.Tensor:
    """The best ``n_edges`` distinct items of ``query_rows`` over their blocks, scored exactly.

    Returns:
        (Q, n_edges) int64 rows, best first, -1 padded; ties and order as ``exact_neighbors``.
    """
    query_rows = np.asarray(query_rows, np.int64)
    top = RunningTopK(query_rows, n_edges, distinct=True)
    vocab = tables.shape[1]
    for i, digit in enumerate(blocks.digits.tolist()):
        groups = blocks.token_group[i][codes[torch.from_numpy(query_rows), digit].long().numpy()]  # (Q,)
        by_group = np.argsort(groups, kind="stable")
        bounds = np.flatnonzero(np.diff(groups[by_group])) + 1
        for positions in np.split(by_group, bounds):
            if not len(positions):
                continue
            candidates = blocks.block(i, int(groups[positions[0]]))
            item_codes = offset_codes(codes[torch.from_numpy(candidates.astype(np.int64))], vocab)  # (C, m)
            for lo in range(0, len(positions), QUERY_BLOCK):
                sub = positions[lo : lo + QUERY_BLOCK]
                luts = query_tables(tables, codes[torch.from_numpy(query_rows[sub])])  # (m*V, q)
                top.add(block_sums(luts, item_codes).numpy(), candidates, sub)
    return keys_to_rows(torch.from_numpy(top.keys()), n_edges)


def pairs_per_item(blocks: TokenBlocks) -> float:
    """Mean candidates scored per item (with repeats): sum over digits and groups of n_g^2, over N."""
    sizes = np.diff(blocks.offsets, axis=1).astype(np.float64)
    return float((sizes**2).sum() / max(blocks.order.shape[1], 1))
