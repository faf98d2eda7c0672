"""Item-item similarity of RPG's decoding graph, as sums of per-digit table lookups.

sim(a, b) = mean_k (1 + cos(e_k[a_k], e_k[b_k])) / 2 = 1/2 + S(a, b) / (2m), with
S(a, b) = sum_k T_k[a_k, b_k] and T_k = the (V, V) cosine table of digit k's token embeddings.
Neighbour order only depends on S, so everything ranks by S.

Why lookups and not the concatenated-vector inner product: S(a, b) is also <x_a, x_b> with x_a the
concatenation of the m normalised token vectors (m*d = 14,336 dims at m=32, d=448), i.e. ~28,700
FLOP per pair. The table form costs m lookups and adds per pair. Laid out for a block of Q query
items as one (m*V, Q) table whose row k*V + j holds T_k[a_k, j] for every query a, the sums of C
items are ``F.embedding_bag`` over their m offset codes: each lookup reads Q contiguous floats, so
the kernel (FBGEMM's) runs at ~1 ns per pair on one core of this CPU, against ~22 ns for per-digit
``index_select`` gathers (the reference code's formulation) and ~400 ns for an fp32 GEMM in the
concatenated space (``benchmarks/bench_graph.py --formulations`` prints all three). It adds digits in order
0..m-1 in float32, so blockwise, reranked and dense computations give bit-identical S and
identical neighbour lists.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit



def digit_similarity_tables(token_embeddings: torch.Tensor) -> torch.Tensor:
    """Per-digit cosine tables: (m, V, d) token embeddings -> (m, V, V) float32, exactly symmetric.

    A GEMM need not give T[a, b] and T[b, a] the same rounding; the upper triangle is mirrored so
    that S(a, b) == S(b, a) bit for bit: ``query_tables`` reads T_k[j, a_k] for T_k[a_k, j], and
    an item's lists and scores must not depend on which side of a pair it is.
    """
    normed = F.normalize(token_embeddings.detach().to(torch.float32), dim=-1)
    full = torch.bmm(normed, normed.transpose(1, 2))
    upper = torch.triu(full)
    return (upper + torch.triu(full, diagonal=1).transpose(1, 2)).contiguous()


def query_tables(tables: torch.Tensor, query_codes: torch.Tensor) -> torch.Tensor:
    """(m*V, Q) float32: row k*V + j holds T_k[a_k, j] = T_k[j, a_k] for each query item a (codes (Q, m))."""
    return torch.from_numpy(_query_tables(tables.numpy(), query_codes.numpy().astype(np.int64)))


@njit(nogil=True, cache=True, boundscheck=False)
def _query_tables(tables, query_codes):
    # Row j of T_k (1 KB, in L1) gathered at the queries' tokens: contiguous writes of Q floats;
    # twice as fast as a torch gather + transpose (the tables are symmetric).
    n_digit, vocab, _ = tables.shape
    n_queries = query_codes.shape[0]
    out = np.empty((n_digit * vocab, n_queries), np.float32)
    for k in range(n_digit):
        for j in range(vocab):
            row, dst = tables[k, j], out[k * vocab + j]
            for q in range(n_queries):
                dst[q] = row[query_codes[q, k]]
    return out


def block_sums(luts: torch.Tensor, item_offset_codes: torch.Tensor) -> torch.Tensor:
    """S of C items against the Q queries of ``luts`` (m*V, Q): (C, Q) float32, digits in order."""
    return F.embedding_bag(item_offset_codes, luts, mode="sum")


def pair_sums(tables: torch.Tensor, query_codes: torch.Tensor, codes: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """S for a different candidate list per query (the faiss-index rerank).

    Args:
        tables: (m, V, V) digit cosine tables.
        query_codes: (Q, m) int64 codes of the queries.
        codes: (N, m) codes of all items (any integer dtype).
        candidates: (Q, C) int64 candidate rows per query.

    Returns:
        (Q, C) float32 sums, bit-identical to ``block_sums`` for the same pairs.
    """
    n_digit, vocab = tables.shape[0], tables.shape[1]
    flat = tables.reshape(n_digit, vocab * vocab)  # (m, V*V): row a_k of T_k starts at a_k * V
    cand = codes[candidates].long()  # (Q, C, m)
    total = flat[0][query_codes[:, :1] * vocab + cand[..., 0]]
    for k in range(1, n_digit):
        total += flat[k][query_codes[:, k : k + 1] * vocab + cand[..., k]]
    return total
