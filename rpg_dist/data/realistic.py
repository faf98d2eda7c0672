"""Realistic synthetic catalogues: item vectors and users fitted on a real run, at any size.

``rpg-dist synth --like RUN_DIR`` fits a ``CatalogueModel`` on the run's item embeddings and its
dataset's training sequences, then draws a catalogue of any size from it. The taxonomy generator
(``synth.py``) makes codes that cluster far more cleanly than real ones; this one reproduces what makes
real semantic IDs hard:

- **Items**: a mixture of K ~ n/4 components (spherical k-means of the real vectors, so thousands for a
  12k catalogue), each a centre plus Gaussian residuals whose shape is the real residuals' covariance
  (top ``RESIDUAL_RANK`` principal directions, the rest isotropic) and whose size is the component's
  own (shrunk towards the global one for components with few members). Draws are L2-normalised like
  encoder output, so near-duplicates, loose groups and isolated items keep their real proportions.
- **Near-duplicates**: real catalogues repeat items (sizes, colours, re-listings: Beauty's nearest
  neighbour has cosine >= 0.9 for 28 % of items, and 0.24 % of its codes collide). A matching
  share of drawn items are copies of another drawn item, at a cosine drawn from the real pairs'.
- **Users**: component-to-component transitions counted on the real training sequences (consecutive
  items), smoothed towards each component's nearest components and the component popularity;
  sequence lengths drawn from the real ones; inside a component an item is drawn by popularity, whose
  skew is the real item-frequency distribution.

Everything is vectorised over items and users (a loop over time steps only); items are produced and
written in chunks, so memory is O(chunk x D + n_users x length).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rpg_dist.errors import DataError

log = logging.getLogger(__name__)

RESIDUAL_RANK = 64
NEAREST_COMPONENTS = 10
# Transition smoothing: pseudo-counts spread over the nearest components, and over all by popularity.
NEAR_MASS, POPULAR_MASS = 1.0, 0.5
SCALE_PRIOR = 1.0  # pseudo-members pulling a component's residual size towards the global one
DUPLICATE_COSINE = 0.9  # nearest-neighbour cosine at or above which two real items count as copies


@dataclass
class CatalogueModel:
    """What ``fit`` learns; ``generate_*`` draw from it."""

    means: np.ndarray  # (K, D) float32 component centres
    scales: np.ndarray  # (K,) float32 residual RMS per component (norm of the residual vector)
    weights: np.ndarray  # (K,) float64 share of items per component
    basis: np.ndarray  # (D, r) float32: unit-RMS residual = basis @ z + floor * z'
    floor: float  # isotropic residual std per dimension beyond the basis
    transitions: tuple[np.ndarray, np.ndarray, np.ndarray]  # CSR (indptr, indices, probabilities) K x K
    jump: np.ndarray  # (K,) chance that a step from a component jumps to a component by popularity
    start: np.ndarray  # (K,) float64 probability of a sequence's first component
    lengths: np.ndarray  # (n_users,) int64 real sequence lengths (resampled)
    popularity: np.ndarray  # (n_items,) float64 real item frequencies (resampled as item weights)
    copy_rate: float  # share of items drawn as a copy of another item
    copy_cosines: np.ndarray  # cosines of real near-duplicate pairs (resampled for the copies)


def fit(embeddings: np.ndarray, item_ids: np.ndarray, train: pa.ListArray, lengths: np.ndarray,
        n_components: int | None = None, seed: int = 0) -> CatalogueModel:
    """Fit the mixture and the transitions.

    Args:
        embeddings: (n, D) item vectors (normalised here).
        item_ids: (n,) their ids.
        train: training sequences (item ids), for transitions and item frequencies.
        lengths: (n_users,) full sequence lengths of the real users.
        n_components: K (default n // 4).
    """
    import faiss

    from rpg_dist.data.items import ItemIndex

    x = np.ascontiguousarray(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), np.float32)
    n_items, dim = x.shape
    k = int(n_components or max(16, n_items // 4))
    if not 2 <= k <= n_items:
        raise DataError(f"n_components: {k} must lie in [2, {n_items}] (the items fitted on)")
    kmeans = faiss.Kmeans(dim, k, niter=20, seed=seed, spherical=True, max_points_per_centroid=n_items)
    kmeans.train(x)
    assign = kmeans.index.search(x, 1)[1][:, 0]
    counts = np.bincount(assign, minlength=k).astype(np.float64)
    means = np.zeros((k, dim), np.float64)
    np.add.at(means, assign, x)
    means /= np.maximum(counts, 1)[:, None]
    residual = x - means[assign]
    # Unbiased per-component residual size (a centre fitted on n points sits closer to them).
    sq = np.bincount(assign, weights=(residual**2).sum(1), minlength=k) * counts / np.maximum(counts - 1, 1)
    total = sq.sum() / max(n_items - k, 1)
    scales = np.sqrt((sq + SCALE_PRIOR * total) / (np.maximum(counts - 1, 0) + SCALE_PRIOR))
    basis, floor = _residual_shape(residual / np.maximum(scales[assign], 1e-6)[:, None], seed)
    index = ItemIndex(item_ids)
    rows = index.rows(np.asarray(item_ids))
    component_of = np.empty(len(index), np.int64)
    component_of[rows] = assign
    trans, jump, start = _transitions(means.astype(np.float32), counts, component_of, index, train)
    popularity = np.bincount(index.rows(train.flatten().to_numpy()), minlength=len(index)).astype(np.float64)
    nearest = _nearest_cosines(x)
    copies = nearest >= DUPLICATE_COSINE  # both items of a pair: one of them is the copy
    return CatalogueModel(means=means.astype(np.float32), scales=scales.astype(np.float32),
                          weights=counts / counts.sum(), basis=basis, floor=floor, transitions=trans,
                          jump=jump, start=start, lengths=np.asarray(lengths, np.int64), popularity=popularity + 1.0,
                          copy_rate=float(copies.sum() / (2 * n_items)),
                          copy_cosines=np.sort(nearest[copies]) if copies.any() else np.ones(1, np.float32))


def _nearest_cosines(x: np.ndarray) -> np.ndarray:
    """(n,) cosine of each unit vector's nearest other vector (exact inner-product search)."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    found, rows = index.search(x, 2)
    # Column 0 is the item itself, except when an identical vector sits at a lower row.
    return np.where(rows[:, 0] == np.arange(len(x)), found[:, 1], found[:, 0]).astype(np.float32)


def _residual_shape(unit: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Top principal directions of unit-size residuals, scaled, plus the leftover isotropic std."""
    n, dim = unit.shape
    rank = min(RESIDUAL_RANK, dim, n)
    cov = unit.T.astype(np.float64) @ unit / max(n, 1)  # (D, D)
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[::-1], vectors[:, ::-1]
    top = np.clip(values[:rank], 0, None)
    floor = float(np.sqrt(max(values[rank:].clip(0).sum() / max(dim - rank, 1), 0.0))) if rank < dim else 0.0
    # Subtract the floor from the top directions so their total variance matches the data.
    basis = vectors[:, :rank] * np.sqrt(np.clip(top - floor**2, 0, None))[None, :]
    return basis.astype(np.float32), floor


def _transitions(means: np.ndarray, counts: np.ndarray, component_of: np.ndarray, index, train: pa.ListArray):
    """Row-stochastic K x K transitions (CSR), per-row popularity-jump chances, first-component odds."""
    k = len(means)
    offsets = train.offsets.to_numpy()
    values = index.rows(train.flatten().to_numpy())
    comp = component_of[values]
    lengths = np.diff(offsets)
    is_next = np.ones(len(values), bool)
    is_next[offsets[:-1][lengths > 0]] = False  # the first item of each sequence has no predecessor
    dst = np.flatnonzero(is_next)
    observed = np.bincount(comp[dst - 1] * k + comp[dst], minlength=k * k) if k * k <= 1 << 27 else None
    pairs = _sparse_counts(comp[dst - 1], comp[dst], k) if observed is None else _dense_to_pairs(observed, k)
    near = _nearest(means, NEAREST_COMPONENTS)  # (K, n)
    popular = counts / counts.sum()
    src = np.concatenate([pairs[0], np.repeat(np.arange(k), near.shape[1])])
    col = np.concatenate([pairs[1], near.reshape(-1)])
    mass = np.concatenate([pairs[2], np.full(near.size, NEAR_MASS / near.shape[1])])
    # Popularity smoothing is applied at draw time (a fraction of steps jumps by popularity), so
    # the CSR rows stay sparse: POPULAR_MASS / (row total + POPULAR_MASS) of each row's mass.
    order = np.lexsort((col, src))
    src, col, mass = src[order], col[order], mass[order]
    keep = np.ones(len(src), bool)
    keep[1:] = (src[1:] != src[:-1]) | (col[1:] != col[:-1])
    group = np.cumsum(keep) - 1
    mass = np.bincount(group, weights=mass)
    src, col = src[keep], col[keep]
    totals = np.bincount(src, weights=mass, minlength=k)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=k))])
    probs = mass / totals[src]
    jump = POPULAR_MASS / (totals + POPULAR_MASS)
    start_counts = np.bincount(comp[offsets[:-1][lengths > 0]], minlength=k) + popular
    return (indptr, col.astype(np.int64), probs), jump, start_counts / start_counts.sum()


def _dense_to_pairs(flat_counts: np.ndarray, k: int):
    nz = np.flatnonzero(flat_counts)
    return nz // k, nz % k, flat_counts[nz].astype(np.float64)


def _sparse_counts(src: np.ndarray, dst: np.ndarray, k: int):
    key, counts = np.unique(src.astype(np.int64) * k + dst, return_counts=True)
    return key // k, key % k, counts.astype(np.float64)


def _nearest(means: np.ndarray, n: int) -> np.ndarray:
    """(K, n) nearest other components by inner product of the centres."""
    import faiss

    n = min(n, len(means) - 1)
    index = faiss.IndexFlatIP(means.shape[1])
    index.add(means)
    _, found = index.search(means, n + 1)
    out = np.empty((len(means), n), np.int64)
    for j in range(n):  # drop each component itself from its own list (n + 1 columns -> n)
        out[:, j] = np.where(found[:, j] == np.arange(len(means)), found[:, n], found[:, j])
    return out


def generate_items(model: CatalogueModel, n_items: int, seed: int, chunk: int = 131_072
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(item_ids, components, vectors (c, D) float32 unit-norm, popularity)`` in chunks; ids 1..n."""
    rng = np.random.default_rng(seed)
    dim, rank = model.basis.shape
    for lo in range(0, n_items, chunk):
        n = min(chunk, n_items - lo)
        comp = rng.choice(len(model.weights), n, p=model.weights)
        shape = rng.standard_normal((n, rank), dtype=np.float32) @ model.basis.T
        shape += model.floor * rng.standard_normal((n, dim), dtype=np.float32)
        x = model.means[comp] + model.scales[comp, None] * shape
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        popularity = rng.choice(model.popularity, n) * rng.lognormal(0.0, 0.25, n)
        _add_copies(model, x, comp, rng)
        yield np.arange(lo + 1, lo + n + 1, dtype=np.int64), comp, x.astype(np.float32), popularity


def _add_copies(model: CatalogueModel, x: np.ndarray, comp: np.ndarray, rng: np.random.Generator) -> None:
    """Turn ~copy_rate of the chunk's rows into noisy copies of other rows (in place)."""
    n, dim = x.shape
    copy = np.flatnonzero(rng.random(n) < model.copy_rate)
    if not len(copy) or n < 2:
        return
    parent = rng.integers(0, n, len(copy))
    cosine = np.clip(rng.choice(model.copy_cosines, len(copy)), 1e-3, 1.0)
    # Isotropic noise of std sigma per dimension moves a unit vector to cosine ~1/sqrt(1 + sigma^2 D).
    sigma = np.sqrt(np.maximum(1.0 / cosine**2 - 1.0, 0.0) / dim).astype(np.float32)
    noisy = x[parent] + sigma[:, None] * rng.standard_normal((len(copy), dim), dtype=np.float32)
    x[copy] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    comp[copy] = comp[parent]


def generate_sequences(model: CatalogueModel, components: np.ndarray, popularity: np.ndarray, n_users: int,
                       seed: int) -> pa.ListArray:
    """Item-id lists (ids = row + 1) for ``n_users`` users walking the component transitions."""
    from rpg_dist.data.synth import GroupSampler

    rng = np.random.default_rng(seed + 1)
    present = np.bincount(components, minlength=len(model.weights)) > 0
    by_component = GroupSampler(components, popularity)
    lengths = rng.choice(model.lengths, n_users)
    steps = np.zeros((n_users, int(lengths.max())), np.int64)
    comp = _draw_present(rng.choice(len(model.start), n_users, p=model.start), present, model, rng)
    item = by_component.sample(comp, rng)
    steps[:, 0] = item
    indptr, indices, probs = model.transitions
    row_cdf = _row_cdfs(indptr, probs)
    for t in range(1, steps.shape[1]):
        popular = rng.random(n_users) < model.jump[comp]
        nxt = _draw_rows(indptr, indices, row_cdf, comp, rng)
        comp = _draw_present(np.where(popular, rng.choice(len(model.weights), n_users, p=model.weights), nxt),
                             present, model, rng)
        previous = item
        item = by_component.sample(comp, rng)
        again = item == previous
        item[again] = by_component.sample(comp[again], rng)  # one redraw: repeats are rare in real data
        steps[:, t] = item
    mask = np.arange(steps.shape[1])[None, :] < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(steps[mask] + 1, pa.int64()))


def _row_cdfs(indptr: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One CDF for all rows: row r's entries cover (r, r + 1] (as ``synth.GroupSampler``)."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    cum = np.cumsum(probs)
    before = np.concatenate([[0.0], cum])[indptr[:-1]]  # mass before each row's first entry
    return rows + (cum - before[rows])


def _draw_rows(indptr, indices, row_cdf, rows: np.ndarray, rng) -> np.ndarray:
    """One entry of each row ``rows[i]`` by its probabilities (vectorised over the rows)."""
    pos = np.searchsorted(row_cdf, rows + (1.0 - rng.random(len(rows))))  # u in (0, 1]
    return indices[np.minimum(pos, len(indices) - 1)]


def _draw_present(comp: np.ndarray, present: np.ndarray, model: CatalogueModel, rng) -> np.ndarray:
    """Replace components that got no items (small catalogues) by popularity draws among those that did."""
    missing = ~present[comp]
    if missing.any():
        weights = np.where(present, model.weights, 0.0)
        comp = comp.copy()
        comp[missing] = rng.choice(len(weights), int(missing.sum()), p=weights / weights.sum())
    return comp


def fit_run(run_dir: str, storage=None, n_components: int | None = None, seed: int = 0) -> CatalogueModel:
    """Fit on a tokenized run: its item embeddings and its dataset's training sequences.

    Raises:
        StageError: ``run_dir`` has no config.yaml or no embeddings.
    """
    from rpg_dist import io
    from rpg_dist.artifacts import RunPaths
    from rpg_dist.config import read_run_config
    from rpg_dist.data.dataset import read_sequences
    from rpg_dist.data.splits import leave_one_out
    from rpg_dist.errors import StageError
    from rpg_dist.tokenizer.embed import read_embeddings

    cfg = read_run_config(run_dir, storage)
    storage = storage or cfg.storage
    if not io.list_files(RunPaths(run_dir).embeddings, ".parquet", storage):
        raise StageError(f"{RunPaths(run_dir).embeddings}: no embeddings; run `rpg-dist tokenize` first")
    item_ids, embeddings = read_embeddings(RunPaths(run_dir).embeddings, storage)
    sequences = read_sequences(cfg.dataset, storage)
    split = leave_one_out(sequences, max_len=cfg.model.max_seq_len)
    lengths = np.diff(sequences.column("item_ids").combine_chunks().offsets.to_numpy())
    return fit(embeddings, item_ids, split.train, lengths, n_components, seed)


def write_catalogue(model: CatalogueModel, n_items: int, n_users: int, out: str, storage=None, seed: int = 0,
                    overwrite: bool = False):
    """Draw ``n_items`` items and ``n_users`` users and commit them as a dataset at ``out``.

    Items carry ``embedding`` (for ``tokenize.embeddings: items``), ``component`` and a placeholder
    ``text``; sequences follow ``generate_sequences``. Returns the ``DatasetInfo``.
    """
    from rpg_dist.data.dataset import DatasetWriter

    if n_items < 1 or n_users < 1:
        raise DataError(f"synth --like: --items ({n_items}) and --users ({n_users}) must be >= 1")
    components, popularity = [], []
    with DatasetWriter(out, source="synth-like", storage=storage, overwrite=overwrite) as writer:
        for ids, comp, vectors, pop in generate_items(model, n_items, seed):
            flat = pa.array(vectors.reshape(-1), pa.float32())
            writer.add_items(pa.table({
                "item_id": pa.array(ids, pa.int64()),
                "text": pa.array([f"synthetic item {i}" for i in ids.tolist()], pa.string()),
                "component": pa.array(comp, pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            }), origin="synth-like:items")
            components.append(comp)
            popularity.append(pop)
        lists = generate_sequences(model, np.concatenate(components), np.concatenate(popularity), n_users, seed)
        writer.add_sequences(pa.table({"user_id": pa.array(np.arange(1, n_users + 1), pa.int64()), "item_ids": lists}),
                             origin="synth-like:sequences")
        return writer.commit()


def catalogue_statistics(embeddings: np.ndarray, codes: np.ndarray, token_embeddings, sample: int = 2000,
                         ranks: tuple[int, ...] = (1, 10, 100), seed: int = 0) -> dict:
    """What ``synth --like`` must reproduce, for comparing a catalogue with the one it was fitted on.

    Args:
        embeddings: (N, D) item vectors.
        codes: (N, m) their semantic IDs.
        token_embeddings: (m, V, d) token table defining the graph similarity.
        sample: query items for the neighbour statistics.

    Returns:
        collision rate, mean per-digit token entropy (bits), the cosine of each sampled item's
        rank-r embedding neighbour and the digits it shares with its rank-r graph neighbour
        (10/50/90th percentiles), and the graph similarity's spread.
    """
    import faiss
    import torch

    from rpg_dist.graph.exact import exact_neighbors
    from rpg_dist.graph.similarity import digit_similarity_tables
    from rpg_dist.tokenizer.stats import CodeStats

    x = np.ascontiguousarray(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), np.float32)
    stats = CodeStats(codes.shape[1], 256)
    stats.add(codes)
    summary = stats.summary()
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    top = max(ranks) + 1
    cosines, _ = index.search(x[queries], top)  # column 0 is the item itself
    tables = digit_similarity_tables(torch.as_tensor(token_embeddings))
    neighbors = exact_neighbors(tables, torch.from_numpy(codes), torch.from_numpy(queries), max(ranks)).numpy()
    shared = (codes[queries][:, None, :] == codes[neighbors]).sum(-1)  # (Q, max rank)
    out = {"n_items": int(len(x)), "collision_rate": summary["collision_rate"],
           "digit_entropy_bits_mean": float(np.mean(summary["digit_entropy_bits"]))}
    for r in ranks:
        out[f"embedding_cosine_rank{r}_p10_p50_p90"] = np.percentile(cosines[:, r], [10, 50, 90]).round(4).tolist()
        out[f"shared_digits_rank{r}_p10_p50_p90"] = np.percentile(shared[:, r - 1], [10, 50, 90]).tolist()
    return out
