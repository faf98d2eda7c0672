"""Approximate kNN for large catalogues: a faiss index over reduced item vectors, then an exact rerank.

The concatenated item vectors x_a = [e_0[a_0] | ... | e_{m-1}[a_{m-1}]] (normalised token vectors;
m*d = 14,336 dims at m=32, d=448) never exist for the whole catalogue: that is 57 GB at 1M items.
Instead a linear reduction W (m*d -> D, the top right-singular vectors of a sample of x) is folded
into per-digit tables P_k = e_k W_k of shape (V, D), so y_a = W^T x_a = sum_k P_k[a_k] costs m
lookups of D floats per item. faiss (any factory string: IVF, HNSW, IVF-PQ, ...) searches y for
``n_candidates`` per item, and the candidates are reranked with the exact table sums, so returned
neighbours are ordered exactly like exact mode's (only recall is approximate).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rpg_dist.decode.topk import MIN_KEY, ranking_keys
from rpg_dist.graph.exact import keys_to_rows
from rpg_dist.graph.similarity import pair_sums


class ItemReducer:
    """Linear reduction of concatenated item vectors to ``dim`` dims via per-digit lookup tables.

    Args:
        token_embeddings: (m, V, d) token table.
        codes: (N, m) item codes; a sample of them fits W.
        dim: D, output dimensions (<= m*d).
        sample_size: items whose concatenated vectors are materialised to fit W (sample x m*d floats).
        seed: sample seed.
    """

    def __init__(self, token_embeddings: torch.Tensor, codes: torch.Tensor, dim: int, sample_size: int, seed: int) -> None:
        normed = F.normalize(token_embeddings.detach().float(), dim=-1)  # (m, V, d)
        n_digit, _, width = normed.shape
        gen = torch.Generator().manual_seed(seed)
        sample = torch.randperm(codes.shape[0], generator=gen)[:sample_size]
        digits = torch.arange(n_digit)
        x = normed[digits, codes[sample].long()].reshape(len(sample), n_digit * width)  # (S, m*d)
        dim = min(dim, x.shape[0], x.shape[1])
        # Uncentred: inner products (not covariances) are what the index must preserve.
        _, _, basis = torch.svd_lowrank(x, q=dim, niter=4)  # (m*d, D)
        self.tables = torch.bmm(normed, basis.reshape(n_digit, width, dim))  # (m, V, D)
        self.dim = dim

    def project(self, codes: torch.Tensor) -> np.ndarray:
        """(n, m) codes -> (n, D) float32 reduced vectors (C-contiguous, for faiss)."""
        codes = codes.long()
        out = self.tables[0].index_select(0, codes[:, 0])
        for k in range(1, codes.shape[1]):
            out += self.tables[k].index_select(0, codes[:, k])
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def build_index(reducer: ItemReducer, codes: torch.Tensor, factory: str, params: str, train_size: int, seed: int):
    """A trained faiss index (inner product) over every item's reduced vector, rows as ids."""
    import faiss

    index = faiss.index_factory(reducer.dim, factory, faiss.METRIC_INNER_PRODUCT)
    gen = torch.Generator().manual_seed(seed)
    train = torch.randperm(codes.shape[0], generator=gen)[:train_size]
    index.train(reducer.project(codes[train]))
    for lo in range(0, codes.shape[0], 65_536):
        index.add(reducer.project(codes[lo : lo + 65_536]))
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def approx_neighbors(
    index,
    reducer: ItemReducer,
    tables: torch.Tensor,
    codes_t: torch.Tensor,
    query_rows: torch.Tensor,
    n_edges: int,
    n_candidates: int,
) -> torch.Tensor:
    """Neighbours of ``query_rows`` from the index's candidates, reranked by exact similarity.

    Returns:
        (Q, n_edges) int64 rows, best first, -1 padded when fewer valid candidates came back.
    """
    query_rows = query_rows.long()
    query_codes = codes_t[:, query_rows].t().long()  # (Q, m)
    # +1: the query itself is usually its own first hit.
    _, found = index.search(reducer.project(query_codes), min(n_candidates + 1, index.ntotal))
    candidates = torch.from_numpy(found).long()  # (Q, C), -1 where the index ran out
    valid = (candidates >= 0) & (candidates != query_rows.unsqueeze(1))
    candidates = torch.where(valid, candidates, query_rows.unsqueeze(1))
    keys = ranking_keys(pair_sums(tables, query_codes, codes_t, candidates), candidates)
    keys.masked_fill_(~valid, MIN_KEY)
    top = torch.topk(keys, min(n_edges, keys.shape[1]), dim=1).values
    return keys_to_rows(top, n_edges)
