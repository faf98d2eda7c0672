"""Importers behind ``rpg-dist prepare``: raw public formats -> the dataset format.

- ``s3rec``: ``sequences.txt`` (``user item item ...``) + ``items.jsonl`` (S3-Rec / P5 / RPG split).
- ``amazon2014``: raw ``reviews_<Category>_5.json.gz`` + ``meta_<Category>.json.gz`` (McAuley et al.).
  Meta lines are Python literals: parsed with ``ast.literal_eval``, never ``eval``.
- ``interactions``: a CSV/parquet of (user, item, timestamp) plus an items table, streamed in bounded
  memory (``interactions.py``); it commits through ``DatasetWriter`` itself.

Each importer returns ``(items, sequences, origins)``; ``write`` validates and commits them through
``DatasetWriter`` so that every error names the input file and row.
"""

from __future__ import annotations

import ast
import gzip
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rpg_dist import io
from rpg_dist.data import text as item_text
from rpg_dist.data import synth
from rpg_dist.data.dataset import DatasetInfo, DatasetWriter
from rpg_dist.data.raw import RawDataset
from rpg_dist.errors import DataError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig
    from rpg_dist.data.config import PrepareConfig

# The paper's item text fields, in its order (RPG's AmazonReviews2014._extract_meta_sentences).
AMAZON_TEXT_FIELDS = ("title", "price", "brand", "feature", "categories", "description")


def prepare(cfg: PrepareConfig, out: str, storage: StorageConfig | None = None, overwrite: bool = False) -> DatasetInfo:
    """Import ``cfg.input`` in ``cfg.format`` and commit the dataset at ``out``."""
    if cfg.format == "synth":
        raw = synth.generate(n_items=cfg.n_items, n_users=cfg.n_users, seed=0)
    elif cfg.format == "s3rec":
        raw = read_s3rec(cfg.input, storage)
    elif cfg.format == "amazon2014":
        raw = read_amazon2014(cfg.input, cfg.category, storage)
    else:
        from rpg_dist.data.interactions import import_interactions

        return import_interactions(cfg.input, cfg.items, cfg.columns, out, storage, overwrite=overwrite)
    return write(raw, out, source=cfg.format, storage=storage, overwrite=overwrite)


def write(raw: RawDataset, out: str, *, source: str, storage: StorageConfig | None = None, overwrite: bool = False) -> DatasetInfo:
    """Validate ``raw`` and commit it at ``out`` (nothing is written at ``out`` on error)."""
    with DatasetWriter(out, source=source, storage=storage, overwrite=overwrite) as writer:
        writer.add_items(raw.items, origin=raw.items_origin, first_row=raw.first_row)
        writer.add_sequences(raw.sequences, origin=raw.sequences_origin, first_row=raw.first_row)
        return writer.commit()


# --- s3rec -----------------------------------------------------------------------------------------


def read_s3rec(folder: str, storage: StorageConfig | None = None) -> RawDataset:
    """Read ``sequences.txt`` and ``items.jsonl``; item text = title. brand. categories."""
    items_uri = io.join(folder, "items.jsonl")
    seq_uri = io.join(folder, "sequences.txt")
    records = _json_lines(_read_required(items_uri, storage), items_uri)
    for line_no, record in enumerate(records, start=1):
        if "item_id" not in record:
            raise DataError(f"{items_uri}: line {line_no}: missing field 'item_id'")
    ids = [r["item_id"] for r in records]
    _check_text_fields(records, ("title", "brand", "categories"), items_uri)
    texts = [item_text.item_text(r.get(f) for f in ("title", "brand", "categories")) for r in records]
    items = pa.table(
        {
            "item_id": _int_column(ids, items_uri, "item_id"),
            "text": pa.array(texts, pa.string()),
            "title": pa.array([_opt_str(r.get("title")) for r in records], pa.string()),
            "brand": pa.array([_opt_str(r.get("brand")) for r in records], pa.string()),
            "asin": pa.array([_opt_str(r.get("asin")) for r in records], pa.string()),
        }
    )
    users, sequences = _id_lines(io.decode_text(_read_required(seq_uri, storage), seq_uri), seq_uri)
    return RawDataset(
        items=items,
        sequences=pa.table({"user_id": pa.array(users, pa.int64()), "item_ids": sequences}),
        items_origin=items_uri,
        sequences_origin=seq_uri,
    )


def _id_lines(text: str, origin: str) -> tuple[np.ndarray, pa.ListArray]:
    """Parse ``user item item ...`` lines into user ids and item-id lists (one split over the file)."""
    lines = [line for line in text.splitlines()]
    if not text.strip():
        raise DataError(f"{origin}: the file holds no sequences (expected lines of 'user_id item_id [item_id ...]')")
    counts = np.fromiter((len(line.split()) for line in lines), np.int64, len(lines))
    if len(lines) and (counts < 2).any():
        row = int(np.flatnonzero(counts < 2)[0])
        raise DataError(f"{origin}: line {row + 1}: expected 'user_id item_id [item_id ...]', got {lines[row]!r}")
    try:
        tokens = np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        for line_no, line in enumerate(lines, start=1):
            for field_no, token in enumerate(line.split()):
                if not token.lstrip("-").isdigit() or not -(2**63) <= int(token) < 2**63:
                    what = "user_id" if field_no == 0 else "item_ids"
                    raise DataError(f"{origin}: line {line_no}: field '{what}' has value {token!r}, "
                                    "not an integer within int64")
        raise
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    users = tokens[starts]
    is_item = np.ones(len(tokens), bool)
    is_item[starts] = False
    offsets = np.concatenate([[0], np.cumsum(counts - 1)])
    return users, pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(tokens[is_item]))


# --- amazon2014 ------------------------------------------------------------------------------------


def read_amazon2014(folder: str, category: str, storage: StorageConfig | None = None) -> RawDataset:
    """Read the raw 2014 Amazon review + metadata dumps of one category.

    Users are grouped by ``reviewerID`` and their reviews stable-sorted by ``unixReviewTime``. Ids are
    dense from 1 in order of first appearance; the raw ASIN and reviewer ID stay as columns.
    """
    reviews_uri = io.join(folder, f"reviews_{category}_5.json.gz")
    meta_uri = io.join(folder, f"meta_{category}.json.gz")
    reviews = _literal_lines(_gunzip(_read_required(reviews_uri, storage), reviews_uri), reviews_uri)
    for line_no, review in enumerate(reviews, start=1):
        for field in ("reviewerID", "asin", "unixReviewTime"):
            if field not in review:
                raise DataError(f"{reviews_uri}: line {line_no}: missing field '{field}'")
        if not isinstance(review["unixReviewTime"], int):
            raise DataError(f"{reviews_uri}: line {line_no}: field 'unixReviewTime' is not an integer")
    table = pa.table(
        {
            "user": pa.array([r["reviewerID"] for r in reviews], pa.string()),
            "item": pa.array([r["asin"] for r in reviews], pa.string()),
            "timestamp": pa.array([r["unixReviewTime"] for r in reviews], pa.int64()),
        }
    )
    user_ids, item_codes, asins, sequences = _group_sequences(table, "user", "item", "timestamp")
    meta: dict[str, tuple[int, dict[str, Any]]] = {}
    meta_text = _gunzip(_read_required(meta_uri, storage), meta_uri)
    for line_no, record in enumerate(_literal_lines(meta_text, meta_uri), start=1):
        if "asin" not in record:
            raise DataError(f"{meta_uri}: line {line_no}: missing field 'asin'")
        meta[record["asin"]] = (line_no, record)
    texts = []
    for asin in asins:
        if asin not in meta:
            raise DataError(f"{meta_uri}: no metadata for item asin {asin!r} (reviewed in {reviews_uri})")
        line_no, record = meta[asin]
        _check_text_fields([record], AMAZON_TEXT_FIELDS, meta_uri, first_line=line_no)
        texts.append(item_text.item_text(record.get(f) for f in AMAZON_TEXT_FIELDS))
        if not texts[-1]:
            raise DataError(f"{meta_uri}: line {line_no} (asin {asin!r}): fields {list(AMAZON_TEXT_FIELDS)} are all empty")
    items = pa.table(
        {
            "item_id": pa.array(np.arange(1, len(asins) + 1), pa.int64()),
            "text": pa.array(texts, pa.string()),
            "asin": pa.array(asins, pa.string()),
            "title": pa.array([_opt_str(meta[a][1].get("title")) for a in asins], pa.string()),
        }
    )
    sequences = pa.table(
        {
            "user_id": pa.array(np.arange(1, len(user_ids) + 1), pa.int64()),
            "item_ids": sequences,
            "reviewer_id": pa.array(user_ids.astype(str), pa.string()),
        }
    )
    return RawDataset(items=items, sequences=sequences, items_origin=meta_uri, sequences_origin=reviews_uri)


def _literal_lines(text: str, origin: str) -> list[dict[str, Any]]:
    """One record per line: JSON, or a Python literal (the 2014 dumps) via ``ast.literal_eval``."""
    records = []
    for line_no, line in enumerate(text.rstrip().split("\n"), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            try:
                record = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"{origin}: line {line_no}: not a JSON object or Python literal") from None
        if not isinstance(record, dict):
            raise DataError(f"{origin}: line {line_no}: expected an object, got {type(record).__name__}")
        records.append(record)
    return records


# --- shared helpers --------------------------------------------------------------------------------


def _group_sequences(table: pa.Table, user: str, item: str, timestamp: str, origin: str = "") -> tuple[np.ndarray, np.ndarray, list, pa.ListArray]:
    """Group rows by user (order of first appearance) with items stable-sorted by timestamp.

    Returns (user keys, dense item codes, item keys in code order (1-based codes), item-id lists).
    For string items the lists hold dense codes 1..n in order of first appearance; integer items
    keep their values.
    """
    for name in (user, item, timestamp):
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{origin or 'interactions'}: row {row}: field '{name}' is null")
    users = table.column(user).to_numpy(zero_copy_only=False)
    items = table.column(item).to_numpy(zero_copy_only=False)
    times = table.column(timestamp).to_numpy(zero_copy_only=False)
    user_keys, user_first, user_code = np.unique(users, return_index=True, return_inverse=True)
    # Rank users by first appearance so output order follows the input file.
    rank = np.empty(len(user_keys), np.int64)
    rank[np.argsort(user_first, kind="stable")] = np.arange(len(user_keys))
    user_rank = rank[user_code]
    order = np.lexsort((np.arange(len(users)), times, user_rank))
    if items.dtype.kind in "iu":
        item_values, item_keys = items.astype(np.int64), []
    else:
        keys, first, code = np.unique(items, return_index=True, return_inverse=True)
        appearance = np.argsort(first, kind="stable")
        remap = np.empty(len(keys), np.int64)
        remap[appearance] = np.arange(1, len(keys) + 1)
        item_values, item_keys = remap[code], list(keys[appearance])
    counts = np.bincount(user_rank, minlength=len(user_keys))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(item_values[order], pa.int64()))
    ordered_users = user_keys[np.argsort(rank)]
    return ordered_users, item_values, item_keys, lists


def _read_required(uri: str, storage: StorageConfig | None) -> bytes:
    try:
        return io.read_bytes(uri, storage)
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None


def _gunzip(data: bytes, origin: str) -> str:
    try:
        return gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{origin}: not a readable gzip text file: {err}") from None


def _json_lines(data: bytes, origin: str) -> list[dict[str, Any]]:
    """One JSON object per line; record i is line i + 1 (blank lines only at the end)."""
    records = []
    for line_no, line in enumerate(io.decode_text(data, origin).rstrip().split("\n"), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{origin}: line {line_no}: invalid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{origin}: line {line_no}: expected a JSON object")
        records.append(record)
    return records


def _int_column(values: list[Any], origin: str, field: str) -> pa.Array:
    for line_no, value in enumerate(values, start=1):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{origin}: line {line_no}: field '{field}' must be an integer, got {value!r}")
    return pa.array(values, pa.int64())


def _check_text_fields(records: list[dict[str, Any]], fields, origin: str, first_line: int = 1) -> None:
    """DataError naming the line and field of the first value that is not text (item_text.problem)."""
    for line_no, record in enumerate(records, start=first_line):
        for field in fields:
            reason = item_text.problem(record.get(field))
            if reason:
                raise DataError(f"{origin}: line {line_no}: field '{field}' {reason}")


def _opt_str(value: Any) -> str | None:
    return None if value is None else item_text.clean(value) or None
