"""Approximate kNN from reduced item vectors (exact scores): for codes that cluster cleanly.

On real semantic IDs these find ~40 % of the true neighbours (their neighbours share few digits and
are spread over the catalogue: see token_blocks.py, the default approximate method); they remain for
catalogues whose codes cluster, such as the synthetic taxonomy, where they are much faster.

The concatenated item vectors x_a = [e_0[a_0] | ... | e_{m-1}[a_{m-1}]] (normalised token vectors;
m*d = 14,336 dims at m=32, d=448) never exist for the whole catalogue: that is 57 GB at 1M items.
Instead a linear map W (m*d -> D) is folded into per-digit tables P_k = e_k W_k of shape (V, D), so
y_a = W^T x_a = sum_k P_k[a_k] costs m lookups of D floats per item. W is a Gaussian random
projection (Johnson-Lindenstrauss: every inner product kept to +-|x||y|/sqrt(D), whatever the
catalogue's structure) or the top right-singular vectors of a sample (PCA: better when a few
directions dominate, as with smooth trained tables; it fails when thousands of item groups each
need their own direction).

Two ways to get candidates, both scored with the exact table sums (so neighbour order and ties are
exactly exact mode's; only recall is approximate):

- ``ivf_blocks``: faiss k-means splits items into ``nlist`` lists; the items of a list
  are scored, as one dense block, against every item of the ``nprobe`` lists nearest to their
  list's centroid. Blocks run at the table kernel's full speed and need no per-query heap.
- ``faiss_index``: any faiss index (factory string: IVF, HNSW, IVF-PQ, ...) over y returns
  ``n_candidates`` per item, which are reranked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rpg_dist.decode.topk import MIN_KEY, ranking_keys
from rpg_dist.graph.exact import exact_neighbors, keys_to_rows
from rpg_dist.graph.similarity import pair_sums


class ItemReducer:
    """Linear reduction of concatenated item vectors to ``dim`` dims via per-digit lookup tables.

    Args:
        token_embeddings: (m, V, d) token table.
        codes: (N, m) item codes; PCA fits W on a sample of them.
        dim: D, output dimensions (<= m*d).
        sample_size: PCA only: items whose concatenated vectors are materialised (sample x m*d floats).
        seed: seeds the projection or the sample.
        projection: "gaussian" (random, structure-agnostic) or "pca".
    """

    def __init__(self, token_embeddings: torch.Tensor, codes: torch.Tensor, dim: int, sample_size: int,
                 seed: int, projection: str = "gaussian") -> None:
        normed = F.normalize(token_embeddings.detach().float(), dim=-1)  # (m, V, d)
        n_digit, _, width = normed.shape
        gen = torch.Generator().manual_seed(seed)
        if projection == "gaussian":
            dim = min(dim, n_digit * width)
            basis = torch.randn(n_digit * width, dim, generator=gen) / dim**0.5  # (m*d, D)
        elif projection == "pca":
            sample = torch.randperm(codes.shape[0], generator=gen)[:sample_size]
            x = normed[torch.arange(n_digit), codes[sample].long()].reshape(len(sample), n_digit * width)
            dim = min(dim, x.shape[0], x.shape[1])
            # Uncentred: inner products (not covariances) are what the index must preserve.
            basis = torch.svd_lowrank(x, q=dim, niter=4)[2]  # (m*d, D)
        else:
            raise ValueError(f"projection {projection!r} is not 'gaussian' or 'pca'")
        self.tables = torch.bmm(normed, basis.reshape(n_digit, width, dim))  # (m, V, D)
        self.dim = dim

    def project(self, codes: torch.Tensor) -> np.ndarray:
        """(n, m) codes -> (n, D) float32 reduced vectors (C-contiguous, for faiss)."""
        codes = codes.long()
        out = self.tables[0].index_select(0, codes[:, 0])
        for k in range(1, codes.shape[1]):
            out += self.tables[k].index_select(0, codes[:, k])
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def project_all(self, codes: torch.Tensor, chunk: int = 65_536) -> np.ndarray:
        """Every item's reduced vector, (N, D) float32, projected chunk by chunk into one array (a list
        of chunks concatenated would hold the vectors twice: 5 GB at 10M items x 64 dims)."""
        vectors = np.empty((codes.shape[0], self.dim), np.float32)
        for lo in range(0, codes.shape[0], chunk):
            vectors[lo : lo + chunk] = self.project(codes[lo : lo + chunk])
        return vectors


@dataclass
class IvfPlan:
    """Items grouped into lists, and the lists each list's items search."""

    order: np.ndarray  # (N,) int64 item rows, grouped by list
    offsets: np.ndarray  # (nlist + 1,) list l holds order[offsets[l]:offsets[l+1]]
    probes: np.ndarray  # (nlist, nprobe) lists searched by list l's items (l among them)

    def members(self, lists: np.ndarray) -> np.ndarray:
        """Rows of the items in ``lists`` (concatenated)."""
        return np.concatenate([self.order[self.offsets[l] : self.offsets[l + 1]] for l in lists])


def plan_ivf(vectors: np.ndarray, nlist: int, nprobe: int, seed: int, train_size: int) -> IvfPlan:
    """faiss k-means lists over the reduced vectors and each list's ``nprobe`` nearest lists."""
    import faiss

    n_items, dim = vectors.shape
    nlist = max(1, min(nlist, n_items))
    kmeans = faiss.Kmeans(dim, nlist, niter=10, seed=seed, max_points_per_centroid=max(1, train_size // nlist))
    kmeans.train(vectors)
    _, assign = kmeans.index.search(vectors, 1)  # (N, 1) nearest centroid (L2)
    _, probes = kmeans.index.search(kmeans.centroids, min(nprobe, nlist))  # (nlist, nprobe)
    # A list always searches itself (its centroid is its own nearest, barring exact ties).
    own = np.arange(nlist)
    missing = ~(probes == own[:, None]).any(axis=1)
    probes[missing, -1] = own[missing]
    order = np.argsort(assign[:, 0], kind="stable").astype(np.int64)
    offsets = np.searchsorted(assign[order, 0], np.arange(nlist + 1)).astype(np.int64)
    return IvfPlan(order=order, offsets=offsets, probes=probes.astype(np.int64))


def ivf_list_neighbors(tables: torch.Tensor, codes: torch.Tensor, plan: IvfPlan, list_id: int,
                       n_edges: int, chunk: int, query_block: int) -> tuple[np.ndarray, torch.Tensor]:
    """Exact top-k of list ``list_id``'s items among the items of its probed lists.

    Returns:
        The list's item rows (L,) and their (L, n_edges) neighbour rows.
    """
    queries = plan.order[plan.offsets[list_id] : plan.offsets[list_id + 1]]
    candidates = torch.from_numpy(plan.members(plan.probes[list_id]))
    found = [
        exact_neighbors(tables, codes, torch.from_numpy(queries[lo : lo + query_block]), n_edges, chunk, candidates)
        for lo in range(0, len(queries), query_block)
    ]
    return queries, torch.cat(found) if found else torch.empty(0, n_edges, dtype=torch.int64)


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
    codes: torch.Tensor,
    query_rows: torch.Tensor,
    n_edges: int,
    n_candidates: int,
) -> torch.Tensor:
    """Neighbours of ``query_rows`` from the index's candidates, reranked by exact similarity.

    Returns:
        (Q, n_edges) int64 rows, best first, -1 padded when fewer valid candidates came back.
    """
    query_rows = query_rows.long()
    query_codes = codes[query_rows].long()  # (Q, m)
    # +1: the query itself is usually its own first hit.
    _, found = index.search(reducer.project(query_codes), min(n_candidates + 1, index.ntotal))
    candidates = torch.from_numpy(found).long()  # (Q, C), -1 where the index ran out
    valid = (candidates >= 0) & (candidates != query_rows.unsqueeze(1))
    candidates = torch.where(valid, candidates, query_rows.unsqueeze(1))
    keys = ranking_keys(pair_sums(tables, query_codes, codes, candidates), candidates)
    keys.masked_fill_(~valid, MIN_KEY)
    top = torch.topk(keys, min(n_edges, keys.shape[1]), dim=1).values
    return keys_to_rows(top, n_edges)
