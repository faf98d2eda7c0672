"""Bring your own embeddings: precomputed item vectors instead of the text encoder.

``tokenize.embeddings`` names the source: ``items`` (an ``embedding`` column of the dataset's items
table) or the URI of a parquet file or folder of ``item_id, embedding`` rows. Either way the vectors
go through the same shards as encoded text (one committed, resumable part per shard, L2-normalised),
so OPQ training, encoding, ``--add`` and resume do not know where they came from.

Checks, each an error naming the file, the field and the row: an ``embedding`` column that is not a
list of floats, a row whose length differs from the first row's, nulls, NaN/inf, all-zero vectors;
for a separate file also item ids that repeat, that the dataset does not have, or dataset items
without a vector. The id checks stream the ``item_id`` column only (8 bytes per item).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rpg_dist import io
from rpg_dist.data import dataset
from rpg_dist.data.items import ItemIndex, iter_item_ids, repeats
from rpg_dist.errors import DataError
from rpg_dist.tokenizer import shards
from rpg_dist.tokenizer.embed import embedding_table, normalize_checked

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

ITEMS_COLUMN = "items"
FIELD = "embedding"


def source_uri(embeddings: str, dataset_uri: str) -> str:
    """The parquet file(s) whose rows the shards cover: the items table or the separate file."""
    return dataset.items_uri(dataset_uri) if embeddings == ITEMS_COLUMN else embeddings


def identity(embeddings: str) -> dict[str, str]:
    """What the vectors are, for fingerprints and ``opq.json`` (in place of an encoder's identity)."""
    return {"encoder": f"precomputed:{embeddings}", "dtype": "float32"}


def expected_dim(source: str, storage: StorageConfig | None) -> int:
    """D: the fixed list size, or the first row's length; every file must agree.

    Raises:
        DataError: a file lacks ``embedding``/``item_id``, has the wrong types, or another D.
    """
    dim = None
    for file_uri in io.parquet_files(source, storage):
        schema = io.parquet_schema(file_uri, storage)
        for name in ("item_id", FIELD):
            if name not in schema.names:
                raise DataError(f"{file_uri}: missing column '{name}' (columns: {schema.names})")
        if not pa.types.is_integer(schema.field("item_id").type):
            raise DataError(f"{file_uri}: field 'item_id' has type {schema.field('item_id').type}, expected int64")
        type_ = schema.field(FIELD).type
        if not _is_float_list(type_):
            raise DataError(f"{file_uri}: field '{FIELD}' has type {type_}, expected a list of floats")
        file_dim = type_.list_size if pa.types.is_fixed_size_list(type_) else _first_length(file_uri, storage)
        if dim is None:
            dim = file_dim
        elif file_dim is not None and file_dim != dim:
            raise DataError(f"{file_uri}: field '{FIELD}' has {file_dim} dimensions, the first file {dim}")
    if not dim:
        raise DataError(f"{source}: field '{FIELD}' holds no vectors")
    return dim


def check_ids(source: str, dataset_uri: str, storage: StorageConfig | None) -> None:
    """A separate file must hold each dataset item exactly once, and nothing else.

    Raises:
        DataError: naming the row of a repeated or unknown id, or the first item without a vector.
    """
    index = ItemIndex(dataset.read_items(dataset_uri, storage, ["item_id"]).column("item_id").to_numpy())
    seen = np.zeros(len(index), bool)
    for file_uri, first_row, ids in iter_item_ids(source, storage):
        pos, known = index.find(ids)
        unknown = np.flatnonzero(~known)
        if len(unknown):
            row = int(unknown[0])
            raise DataError(f"{file_uri}: row {first_row + row}: field 'item_id' {int(ids[row])} is not an item "
                            f"of the dataset {dataset_uri}")
        repeated = np.flatnonzero(seen[pos] | repeats(pos))
        if len(repeated):
            row = int(repeated[0])
            raise DataError(f"{file_uri}: row {first_row + row}: field 'item_id' {int(ids[row])} has a second embedding")
        seen[pos] = True
    if not seen.all():
        missing = index.ids(np.flatnonzero(~seen))
        raise DataError(f"{source}: no '{FIELD}' for {len(missing)} item(s) of the dataset {dataset_uri}, "
                        f"e.g. item_id {int(missing[0])}")


class ShardImporter(shards.ShardWorker):
    """Ray Data callable class: validates, normalises and commits one shard of precomputed vectors."""

    def __init__(self, *, dim: int, out_dir: str, manifest_dir: str, fingerprint: str,
                 identity: dict[str, str], storage: StorageConfig | None) -> None:
        self.dim = dim
        self.out_dir, self.manifest_dir = out_dir, manifest_dir
        self.fingerprint, self.identity, self.storage = fingerprint, identity, storage

    def run(self, shard: shards.Shard) -> dict[str, Any]:
        start = time.perf_counter()
        item_ids, emb = read_shard_vectors(shard, self.dim, self.storage)
        emb = normalize_checked(emb, item_ids, shard.file, shard.first_row)
        part = io.join(self.out_dir, shards.part_name(shard.key))
        io.write_parquet(embedding_table(item_ids, emb), part, self.storage)
        return shards.write_manifest(
            self.manifest_dir, shard.key, self.fingerprint, self.storage, part, kind="import", encoder=self.identity,
            n_items=len(item_ids), dim=self.dim, seconds=time.perf_counter() - start,
            source={"file": shard.file, "row_group": shard.row_group, "offset": shard.offset, "length": shard.length},
        )


def read_shard_vectors(shard: shards.Shard, dim: int, storage: StorageConfig | None) -> tuple[np.ndarray, np.ndarray]:
    """``(item_ids (n,), vectors (n, dim) float32)`` of one shard's rows.

    Raises:
        DataError: a null id or vector, or a vector whose length is not ``dim`` (file, field, row).
    """
    table = shards.read_shard(shard, ["item_id", FIELD], storage)
    ids, vectors = table.column("item_id"), table.column(FIELD).combine_chunks()
    for name, column in (("item_id", ids), (FIELD, vectors)):
        if column.null_count:
            row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{shard.file}: row {shard.first_row + row}: field '{name}' is null")
    lengths = pc.list_value_length(vectors).to_numpy()
    if len(lengths) and (lengths != dim).any():
        row = int(np.flatnonzero(lengths != dim)[0])
        raise DataError(f"{shard.file}: row {shard.first_row + row} (item_id {ids[row].as_py()}): field '{FIELD}' "
                        f"has {lengths[row]} dimensions, expected {dim}")
    flat = pc.list_flatten(vectors)
    if flat.null_count:
        row = int(pc.list_parent_indices(vectors).to_numpy()[np.flatnonzero(pc.is_null(flat).to_numpy())[0]])
        raise DataError(f"{shard.file}: row {shard.first_row + row}: field '{FIELD}' holds a null")
    emb = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(table), dim)
    return ids.to_numpy().astype(np.int64), emb


def _is_float_list(type_: pa.DataType) -> bool:
    is_list = pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)
    return is_list and pa.types.is_floating(type_.value_type)


def _first_length(uri: str, storage: StorageConfig | None) -> int | None:
    for _, batch in io.iter_parquet(uri, storage, [FIELD], batch_size=1024):
        lengths = pc.list_value_length(batch.column(0)).drop_null().to_numpy()
        if len(lengths):
            return int(lengths[0])
    return None
