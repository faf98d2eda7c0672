"""Item-item similarity of RPG's decoding graph, as sums of per-digit table lookups.

sim(a, b) = mean_k (1 + cos(e_k[a_k], e_k[b_k])) / 2 = 1/2 + S(a, b) / (2m), with
S(a, b) = sum_k T_k[a_k, b_k] and T_k = the (V, V) cosine table of digit k's token embeddings.
Neighbour order only depends on S, so everything ranks by S.

Why lookups and not the concatenated-vector inner product: S(a, b) is also <x_a, x_b> with x_a the
concatenation of the m normalised token vectors (m*d = 14,336 dims at m=32, d=448), i.e. ~28,700
FLOP per pair (16,400 after factoring each T_k, rank <= 256). The table form costs m = 32 lookups
and adds per pair, which on this CPU runs at ~0.3-1.3e9 lookups/s (~1-4e7 pairs/s) against
~2.7e6 pairs/s for the fp32 GEMM and ~7e6 for bf16 (benchmarks/bench_graph.py prints both). The
tables also make every sum exact and order-fixed: digits are added in order 0..m-1 in float32, so
blockwise, reranked and dense computations give bit-identical S and identical neighbour lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def digit_similarity_tables(token_embeddings: torch.Tensor) -> torch.Tensor:
    """Per-digit cosine tables: (m, V, d) token embeddings -> (m, V, V) float32."""
    normed = F.normalize(token_embeddings.detach().to(torch.float32), dim=-1)
    return torch.bmm(normed, normed.transpose(1, 2)).contiguous()


def to_similarity(sums: torch.Tensor, n_digit: int) -> torch.Tensor:
    """The paper's sim in [0, 1] from cosine sums S."""
    return 0.5 + sums / (2 * n_digit)


def block_sums(tables: torch.Tensor, query_codes: torch.Tensor, item_codes_t: torch.Tensor) -> torch.Tensor:
    """S for every (query, item) pair of a block.

    Args:
        tables: (m, V, V) digit cosine tables.
        query_codes: (Q, m) int64 codes of the query items.
        item_codes_t: (m, C) int64 codes of the block's items, digit-major.

    Returns:
        (Q, C) float32 cosine sums, digits added in order 0..m-1.
    """
    # Per digit: the queries' (Q, V) table rows, then the items' columns; the (Q, V) slab is
    # small enough (Q x 1 KB) to stay in cache while (Q, C) columns are gathered from it.
    total = tables[0].index_select(0, query_codes[:, 0]).index_select(1, item_codes_t[0])
    for k in range(1, tables.shape[0]):
        total += tables[k].index_select(0, query_codes[:, k]).index_select(1, item_codes_t[k])
    return total


def pair_sums(tables: torch.Tensor, query_codes: torch.Tensor, codes_t: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """S for a different candidate list per query (approximate-mode rerank).

    Args:
        tables: (m, V, V) digit cosine tables.
        query_codes: (Q, m) int64 codes of the queries.
        codes_t: (m, N) codes of all items, digit-major (any integer dtype).
        candidates: (Q, C) int64 candidate rows per query.

    Returns:
        (Q, C) float32 sums, bit-identical to ``block_sums`` for the same pairs.
    """
    n_digit, vocab = tables.shape[0], tables.shape[1]
    flat = tables.reshape(n_digit, vocab * vocab)  # (m, V*V): row a_k of T_k starts at a_k * V
    total = flat[0][query_codes[:, :1] * vocab + codes_t[0][candidates]]
    for k in range(1, n_digit):
        total += flat[k][query_codes[:, k : k + 1] * vocab + codes_t[k][candidates]]
    return total


def dense_sums_reference(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Brute-force twin: the full (N, N) matrix of S (small catalogues only)."""
    codes = codes.long()
    total = tables[0][codes[:, 0]][:, codes[:, 0]]
    for k in range(1, tables.shape[0]):
        total += tables[k][codes[:, k]][:, codes[:, k]]
    return total
