"""OPQ semantic IDs with faiss: ``[PCAW{p},]OPQ{m},IVF1,PQ{m}x8`` (inner product), train and encode.

The code of an item is the PQ code of its embedding after the linear transforms (optional whitened
PCA, the OPQ rotation) minus the single IVF centroid: digit k is the nearest of 256 centroids of
codebook k to sub-vector k. ``sa_encode`` computes it in faiss; ``brute_force_codes`` is the numpy
twin the tests hold it to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rpg_dist import io
from rpg_dist.data.items import sorted_lookup
from rpg_dist.errors import DataError, RpgDistError
from rpg_dist.tokenizer import collaborative, shards
from rpg_dist.tokenizer.embed import read_embeddings

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig
    from rpg_dist.tokenizer.config import TokenizeConfig

log = logging.getLogger(__name__)


def factory_string(cfg: TokenizeConfig) -> str:
    pca = f"PCAW{cfg.pca_dim}," if cfg.pca_dim else ""
    return f"{pca}OPQ{cfg.n_digit},IVF1,PQ{cfg.n_digit}x8"


def build_index(dim: int, cfg: TokenizeConfig, seed: int):
    """An untrained index, seeded from ``seed`` wherever faiss lets us."""
    import faiss

    index = faiss.index_factory(dim, factory_string(cfg), faiss.METRIC_INNER_PRODUCT)
    opq = faiss.downcast_VectorTransform(index.chain.at(index.chain.size() - 1))
    opq.niter = cfg.opq_niter
    # faiss starts OPQ from a rotation drawn with a fixed seed (1234); start from ours instead.
    d = opq.d_in
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation, np.float32).ravel(), opq.A)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    # Polysemous training only permutes centroid ids for Hamming search, which RPG never does; it
    # costs ~10x the PQ training itself.
    ivf.do_polysemous_training = False
    return index


def train_index(x: np.ndarray, cfg: TokenizeConfig, seed: int, threads: int):
    """Train on ``x`` (n, D) float32 rows sorted by item id; faiss-gpu when a GPU is usable."""
    import faiss

    if len(x) < cfg.codebook_size:
        raise DataError(
            f"OPQ training needs at least {cfg.codebook_size} training items (one per centroid), got "
            f"{len(x)}: the dataset's training sequences hold too few distinct items"
        )
    faiss.omp_set_num_threads(threads)
    index = build_index(x.shape[1], cfg, seed)
    if cfg.pca_dim:
        # PCA on its own (smaller, seeded) subsample; IndexPreTransform.train then skips it.
        n_pca = min(len(x), cfg.pca_sample_size)
        rows = np.sort(np.random.default_rng(seed).choice(len(x), size=n_pca, replace=False))
        index.chain.at(0).train(np.ascontiguousarray(x[rows]))
    if gpu_available():
        _train_on_gpu(index, x)
    else:
        with blas_assignment():
            index.train(x)
    return index


@contextlib.contextmanager
def blas_assignment() -> Iterator[None]:
    """Assign k-means points to centroids through faiss's BLAS formulation at every size.

    faiss picks its exact L2 search by size: below n * dsub = 128,000 (``distance_compute_blas_threshold``)
    a call per (point, centroid) pair, above it GEMM blocks (|x|^2 + |c|^2 - 2 x.c). The same OPQ
    training switches between the two with the catalogue: a 12k-item catalogue at dsub 4 (PCA 128,
    32 digits) gets the per-pair calls, 8x slower (42 s of OPQ training against 5 s here), where 200k
    sampled items or dsub 12 already get GEMMs. One formulation at every size; the two round
    differently, so near-tied assignments can flip (same algorithm and iterations, same
    reconstruction error: tests/test_tokenize.py). Deliberate difference from the reference code,
    which keeps faiss's default.
    """
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


def gpu_available() -> bool:
    """faiss was built with GPU support and sees a device (never true with faiss-cpu)."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _train_on_gpu(index, x: np.ndarray) -> None:  # pragma: no cover - needs faiss-gpu and a GPU
    """Run the k-means assignment steps (IVF, OPQ's PQ, the final PQ) on GPU 0.

    The transforms' SVDs stay on the CPU; the assignment indexes are not serialised.
    """
    import faiss

    res = faiss.StandardGpuResources()
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    opq = faiss.downcast_VectorTransform(index.chain.at(index.chain.size() - 1))
    dsub = ivf.pq.dsub
    keep = [faiss.GpuIndexFlatL2(res, dsub), faiss.GpuIndexFlatL2(res, dsub), faiss.GpuIndexFlatL2(res, ivf.d)]
    opq_pq = faiss.ProductQuantizer(opq.d_out, opq.M, 8)
    opq_pq.cp.seed = ivf.pq.cp.seed
    opq_pq.assign_index, ivf.pq.assign_index, ivf.clustering_index = keep
    opq.pq = opq_pq
    try:
        index.train(x)
    finally:
        opq.pq, ivf.pq.assign_index, ivf.clustering_index = None, None, None
    del keep, opq_pq


def encode(index, x: np.ndarray) -> np.ndarray:
    """(n, D) float32 -> (n, m) int16 codes in 0..255 via ``sa_encode``.

    With one IVF list the coarse code is 0 bytes, so ``sa_encode`` returns exactly the m PQ bytes.
    """
    codes = index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))  # (n, m) uint8
    return codes.astype(np.int16)


def brute_force_codes(index, x: np.ndarray) -> np.ndarray:
    """Numpy twin of ``encode``: transforms -> minus the IVF centroid -> nearest centroid per digit.

    Allocates (n, m, 256, D/m): for tests on small ``x`` only.
    """
    import faiss

    y = np.asarray(x, np.float64)
    for i in range(index.chain.size()):
        transform = faiss.downcast_VectorTransform(index.chain.at(i))
        a = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
        y = y @ a.T  # (n, d_out)
        if transform.have_bias:
            y = y + faiss.vector_to_array(transform.b)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    residual = y - ivf.quantizer.reconstruct(0)  # (n, d)
    m, dsub = ivf.pq.M, ivf.pq.dsub
    centroids = faiss.vector_to_array(ivf.pq.centroids).reshape(m, ivf.pq.ksub, dsub)  # (m, 256, d/m)
    sub = residual.reshape(len(residual), m, 1, dsub)  # (n, m, 1, d/m)
    return ((sub - centroids[None]) ** 2).sum(-1).argmin(-1).astype(np.int16)  # (n, m)


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def read_index(uri: str, digest: str, storage: StorageConfig | None = None):
    """The trained index at ``uri``, deserialised only if its bytes have ``digest`` (opq.json's
    ``index_digest``): faiss parses whatever it is given, so nothing unverified reaches it."""
    return deserialize(io.read_verified(uri, digest, "re-run `rpg-dist tokenize` to retrain it", storage))


def gather_sample(part_uris: list[str], sample_ids: np.ndarray, storage: StorageConfig | None) -> np.ndarray:
    """Embeddings of ``sample_ids`` (sorted int64) streamed from the parts: (n_sample, D), id order.

    Holds one part plus the sample at a time. Raises DataError naming a sample id never found.
    """
    ids_found, rows = [], []
    for uri in part_uris:
        item_ids, emb = read_embeddings(uri, storage)
        hit = sorted_lookup(sample_ids, item_ids)[1]
        ids_found.append(item_ids[hit])
        rows.append(emb[hit])
    ids = np.concatenate(ids_found) if ids_found else np.empty(0, np.int64)
    order = np.argsort(ids, kind="stable")
    missing = np.setdiff1d(sample_ids, ids)
    if len(missing):
        raise DataError(f"embeddings: no embedding for training item_id {int(missing[0])} "
                        f"({len(missing)} missing); the embedding stage is incomplete")
    return np.ascontiguousarray(np.concatenate(rows)[order])


@dataclass
class TrainResult:
    index_bytes: bytes
    n_sample: int
    dim: int
    seconds: float
    gather_seconds: float
    node_id: str
    threads: int
    used_gpu: bool


def train_remote(part_uris: list[str], sample_ids: np.ndarray, cfg: TokenizeConfig, seed: int, threads: int,
                 storage: StorageConfig | None, collab: tuple[str, str] | None = None) -> TrainResult | RpgDistError:
    """Body of the single OPQ training task: gather the sample, train, return the serialised index.

    ``collab``: (uri, digest) of the hybrid IDs' collaborative model; the index is then trained on
    the joint vectors."""
    try:
        start = time.perf_counter()
        x = gather_sample(part_uris, sample_ids, storage)
        if collab:
            x = collaborative.joint(collaborative.read_model(*collab, storage), sample_ids, x)
        gathered = time.perf_counter()
        threads = threads or os.cpu_count() or 1
        index = train_index(x, cfg, seed, threads)
        return TrainResult(index_bytes=serialize(index), n_sample=len(x), dim=x.shape[1],
                           seconds=time.perf_counter() - gathered, gather_seconds=gathered - start,
                           node_id=shards._node_id(), threads=threads, used_gpu=gpu_available())
    except RpgDistError as err:
        # Returned, not raised: Ray wraps raised exceptions into types that lose the class.
        return err


class ShardEncoder:
    """Ray Data callable class: loads the trained index once, encodes and commits one shard per call."""

    def __init__(self, *, index_uri: str, index_digest: str, threads: int, out_dir: str, manifest_dir: str,
                 storage: StorageConfig | None, collab: tuple[str, str] | None = None) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)
        self.index = read_index(index_uri, index_digest, storage)
        # Hybrid IDs: (uri, digest) of the collaborative model the index was trained with.
        self.collab = collaborative.read_model(*collab, storage) if collab else None
        self.out_dir, self.manifest_dir, self.storage = out_dir, manifest_dir, storage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key, part, fingerprint = (str(batch[name][0]) for name in ("key", "part", "fingerprint"))
        try:
            return shards.result_row(manifest=self.encode_part(key, part, fingerprint))
        except RpgDistError as err:
            return shards.result_row(error=err)

    def encode_part(self, key: str, part: str, fingerprint: str) -> dict[str, Any]:
        from rpg_dist.tokenizer.semantic_ids import to_table

        start = time.perf_counter()
        item_ids, emb = read_embeddings(part, self.storage)  # (n,), (n, D)
        if self.collab is not None:
            emb = collaborative.joint(self.collab, item_ids, emb)  # (n, D + c)
        codes = encode(self.index, emb)  # (n, m)
        out = io.join(self.out_dir, shards.part_name(key))
        io.write_parquet(to_table(item_ids, codes), out, self.storage)
        return shards.write_manifest(self.manifest_dir, key, fingerprint, self.storage, out, kind="encode",
                                     n_items=len(item_ids), seconds=time.perf_counter() - start,
                                     source={"embeddings": part})
