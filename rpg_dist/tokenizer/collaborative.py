"""Hybrid semantic IDs (beyond the paper): each item's text embedding joined with a collaborative one.

The paper tokenizes text alone. Here an item's vector can also carry what the training sequences say
about it: ``joint = [sqrt(1 - w) * text, sqrt(w) * collaborative]`` (both parts unit norm, so the
joint vector is too; ``w`` is ``tokenize.collaborative_weight``, 1 drops the text part), then
PCA/OPQ exactly as for text.

Collaborative vectors are the truncated SVD ``U_k sqrt(S_k)`` (L2-normalised rows) of the positive
pointwise mutual information of item co-occurrence within ``window`` positions in the leave-one-out
**training part** of each sequence (s[:-2]; the factorisation skip-gram with negative sampling
approximates, Levy & Goldberg 2014), with the context distribution smoothed by ^0.75. Validation and
test targets never enter. Items with no training co-occurrence ("cold": new items, items seen only
as targets) get ``normalize(text @ P)``, P a ridge map from text to the collaborative space fitted
on the warm items, so every item, and every item added later, still tokenizes.

The fitted model is one safetensors file (item ids, vectors, the map; no pickle), committed by its
``collaborative.json`` with its digest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from rpg_dist import io
from rpg_dist.data.items import sorted_lookup
from rpg_dist.data.splits import leave_one_out
from rpg_dist.errors import DataError, RpgDistError, StageError
from rpg_dist.tokenizer.embed import read_embeddings

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

# In the model's fingerprint: a change to the fit refits every hybrid run's model.
VERSION = 1
# Context-distribution smoothing of the PMI (Levy, Goldberg & Dagan 2015).
CONTEXT_POWER = 0.75
# Ridge strength of the text -> collaborative map, relative to the mean diagonal of X^T X.
RIDGE = 1e-2
# Collapse the (key, count) pairs of co-occurrence into one sorted array above this many pairs.
COLLAPSE_PAIRS = 1 << 24


@dataclass(frozen=True)
class CollaborativeModel:
    """``item_ids`` (n,) sorted int64, ``vectors`` (n, c) unit rows, ``projection`` (D, c), ``weight``."""

    item_ids: np.ndarray
    vectors: np.ndarray
    projection: np.ndarray
    weight: float


def joint_dim(text_dim: int, collaborative_dim: int, weight: float) -> int:
    """Width of the joint vector: the text part is dropped at weight 1."""
    return collaborative_dim + (text_dim if weight < 1 else 0)


def joint(model: CollaborativeModel, item_ids: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(n,) ids and (n, D) unit text vectors -> (n, joint_dim) unit joint vectors (float32)."""
    found, hit = sorted_lookup(model.item_ids, item_ids)
    collab = np.empty((len(item_ids), model.vectors.shape[1]), np.float32)  # (n, c)
    collab[hit] = model.vectors[found[hit]]
    cold = ~hit
    if cold.any():
        collab[cold] = _unit(text[cold].astype(np.float64) @ model.projection)
    parts = [np.sqrt(model.weight) * collab]
    if model.weight < 1:
        parts.insert(0, np.sqrt(1 - model.weight) * text)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def cooccurrence(sequences_uri: str, storage: StorageConfig | None, max_len: int, window: int,
                 item_ids: np.ndarray) -> sp.csr_matrix:
    """(n, n) symmetric counts of items within ``window`` positions in the training parts.

    ``item_ids`` (n,) sorted: the rows. Streams the sequences batch by batch; memory is the distinct
    pairs seen (at most interactions x 2 x window), never n^2.
    """
    n = len(item_ids)
    keys, counts = np.empty(0, np.int64), np.empty(0, np.int64)
    pending: list[np.ndarray] = []
    for _, batch in io.iter_parquet(sequences_uri, storage, ["user_id", "item_ids"]):
        train = leave_one_out(pa.Table.from_batches([batch]), max_len).train
        rows = sorted_lookup(item_ids, train.flatten().to_numpy())[0]  # (P,) every item is a row
        lengths = np.diff(train.offsets.to_numpy())
        user = np.repeat(np.arange(len(lengths)), lengths)  # (P,) which sequence each position is in
        for offset in range(1, window + 1):
            same = np.flatnonzero(user[offset:] == user[:-offset])  # pairs inside one sequence
            a, b = rows[same], rows[same + offset]
            pending += [a * n + b, b * n + a]
        if sum(len(p) for p in pending) > COLLAPSE_PAIRS:
            keys, counts = _collapse(keys, counts, pending)
            pending = []
    keys, counts = _collapse(keys, counts, pending)
    return sp.csr_matrix((counts.astype(np.float64), (keys // n, keys % n)), shape=(n, n))


def _collapse(keys: np.ndarray, counts: np.ndarray, pending: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge new pair keys into the sorted (keys, counts) totals."""
    new, new_counts = np.unique(np.concatenate(pending) if pending else np.empty(0, np.int64), return_counts=True)
    merged = np.concatenate([keys, new])
    total, inverse = np.unique(merged, return_inverse=True)
    return total, np.bincount(inverse, weights=np.concatenate([counts, new_counts]), minlength=len(total)).astype(np.int64)


def ppmi(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Positive PMI of a symmetric count matrix, context distribution smoothed by ^0.75."""
    counts = counts.tocoo()
    row_total = np.asarray(counts.sum(axis=1)).ravel()
    context = row_total ** CONTEXT_POWER
    pmi = np.log(counts.data * context.sum() / (row_total[counts.row] * context[counts.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (counts.row[keep], counts.col[keep])), shape=counts.shape)


def randomized_svd(matrix: sp.csr_matrix, k: int, seed: int, n_iter: int = 10,
                   oversample: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(U (n, k), S (k,))`` of a sparse matrix (Halko, Martinsson & Tropp 2011: a seeded
    Gaussian sketch, ``n_iter`` re-orthonormalised power iterations). Memory O(nnz + n (k + 32)).
    PPMI spectra decay slowly: at 6 iterations and 16 extra columns the item cosines of a 360-item
    fit were 0.016 off the dense SVD's, at 10 and 32 below 1e-4 (tests/test_collaborative.py)."""
    width = min(k + oversample, min(matrix.shape))
    sketch = np.random.default_rng(seed).standard_normal((matrix.shape[1], width))
    basis = np.linalg.qr(matrix @ sketch)[0]  # (n, width)
    for _ in range(n_iter):
        basis = np.linalg.qr(matrix @ np.linalg.qr(matrix.T @ basis)[0])[0]
    small = (matrix.T @ basis).T  # (width, n) = basis^T A
    u, s, _ = np.linalg.svd(small, full_matrices=False)
    return basis @ u[:, :k], s[:k]


def factorize(counts: sp.csr_matrix, dim: int, seed: int) -> np.ndarray:
    """(n, dim) unit collaborative vectors ``U sqrt(S)`` of the PPMI of ``counts``."""
    if counts.shape[0] <= dim:
        raise DataError(f"tokenize.collaborative_dim: {dim} needs more than {dim} items with training "
                        f"co-occurrence; the training sequences have {counts.shape[0]}")
    u, s = randomized_svd(ppmi(counts), dim, seed)
    vectors = u * np.sqrt(s)
    # A sign per column fixed by the data (the largest entry positive): the same fit on any machine.
    vectors *= np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(dim)])
    return _unit(vectors)


def fit_projection(part_uris: list[str], item_ids: np.ndarray, vectors: np.ndarray,
                   storage: StorageConfig | None) -> np.ndarray:
    """(D, c) ridge map from unit text vectors to ``vectors``, accumulated part by part (memory D^2)."""
    gram, cross = None, None
    for uri in part_uris:
        ids, text = read_embeddings(uri, storage)
        found, hit = sorted_lookup(item_ids, ids)
        x = text[hit].astype(np.float64)  # (h, D)
        if gram is None:
            gram, cross = np.zeros((x.shape[1], x.shape[1])), np.zeros((x.shape[1], vectors.shape[1]))
        gram += x.T @ x
        cross += x.T @ vectors[found[hit]]
    ridge = RIDGE * max(np.trace(gram) / len(gram), 1e-12)
    return np.linalg.solve(gram + ridge * np.eye(len(gram)), cross)


def fit(part_uris: list[str], dataset_uri: str, storage: StorageConfig | None, *, max_len: int,
        window: int, dim: int, weight: float, seed: int) -> CollaborativeModel:
    """Fit on the dataset's training parts (s[:-2]) and the text embeddings in ``part_uris``."""
    from rpg_dist.data.dataset import sequences_uri
    from rpg_dist.tokenizer.stage import training_item_ids

    candidates = training_item_ids(dataset_uri, storage, max_len)
    counts = cooccurrence(sequences_uri(dataset_uri), storage, max_len, window, candidates)
    warm = np.flatnonzero(counts.getnnz(axis=1) > 0)  # items alone in their training parts stay cold
    counts = counts[warm][:, warm]
    vectors = factorize(counts, dim, seed)
    item_ids = candidates[warm]
    return CollaborativeModel(item_ids=item_ids, vectors=vectors,
                              projection=fit_projection(part_uris, item_ids, vectors, storage), weight=weight)


def to_bytes(model: CollaborativeModel) -> bytes:
    from safetensors.numpy import save

    return save({"item_ids": model.item_ids, "vectors": model.vectors, "projection": model.projection,
                 "weight": np.array([model.weight])})


def read_model(uri: str, digest: str, storage: StorageConfig | None = None) -> CollaborativeModel:
    """The committed model at ``uri``, parsed only if its bytes have ``digest`` (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    data = io.read_verified(uri, digest, "re-run `rpg-dist tokenize` to refit it", storage)
    try:
        t = load(data)
        return CollaborativeModel(item_ids=t["item_ids"], vectors=t["vectors"], projection=t["projection"],
                                  weight=float(t["weight"][0]))
    except (SafetensorError, KeyError) as err:
        raise StageError(f"{uri}: not a collaborative model ({err}); re-run `rpg-dist tokenize`") from None


@dataclass
class FitResult:
    model_bytes: bytes
    n_warm: int
    seconds: float


def fit_remote(part_uris: list[str], dataset_uri: str, storage: StorageConfig | None, max_len: int, window: int,
               dim: int, weight: float, seed: int) -> FitResult | RpgDistError:
    """Body of the single fitting task; errors are returned (Ray would lose their class)."""
    try:
        start = time.perf_counter()
        model = fit(part_uris, dataset_uri, storage, max_len=max_len, window=window, dim=dim, weight=weight,
                    seed=seed)
        return FitResult(model_bytes=to_bytes(model), n_warm=len(model.item_ids),
                         seconds=time.perf_counter() - start)
    except RpgDistError as err:
        return err
