"""Catalogue changes without retraining: new items encoded with the trained tokenizer, items withdrawn.

An RPG item is its semantic ID, so a new item needs no new parameters: its text (or vector) goes
through the run's encoder, PCA and OPQ (``ItemEncoder``), its graph list is its exact top-k and it
enters the lists it beats (graph/update.py). Changes are kept as a log under ``RUN_DIR/catalogue/``::

    changes/000001.parquet   one change: kind ("add" | "withdraw"), item_id, codes, title
    current.json             {"version": N, "graph": the build-graph run it applies to, ...}

A change is written under its number first, then ``current.json`` is replaced atomically: a crash
in between leaves version N-1 current (the next change overwrites the orphan). Loading replays
changes 1..N on the built graph; codes are stored, never re-encoded, so the replay is exact and a
restarted service serves the same catalogue. A rebuilt graph starts a fresh log (the old one no
longer applies: loading refuses it, naming both graph runs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import torch

from rpg_dist import failpoints, io, runlock
from rpg_dist.artifacts import RunPaths
from rpg_dist.data.items import repeats
from rpg_dist.errors import DataError, StageError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig
    from rpg_dist.recommend import Recommender

FOLDER = "catalogue"


@dataclass
class Change:
    """One catalogue change: items added (with their codes and titles) or withdrawn."""

    kind: str  # "add" | "withdraw"
    item_ids: np.ndarray  # (n,) int64
    codes: np.ndarray | None = None  # (n, m) int16 for "add"
    titles: list[str] | None = None


class ItemEncoder:
    """The run's trained tokenizer for new items: text (or a vector) -> m codes, as tokenize does."""

    def __init__(self, run_dir: str, storage: StorageConfig | None = None) -> None:
        from rpg_dist.config import read_run_config
        from rpg_dist.tokenizer import collaborative, opq

        cfg = read_run_config(run_dir, storage)
        self.tokenize, self.storage = cfg.tokenize, storage or cfg.storage
        meta = io.read_json(RunPaths(run_dir).opq_meta, self.storage)
        self.index = opq.read_index(RunPaths(run_dir).opq_index, meta["index_digest"], self.storage)
        self.dim = int(meta["dim"])
        # Hybrid IDs: new items have no training co-occurrence, so their collaborative part is the
        # text map's, as for any cold item at tokenize time.
        link = meta.get("collaborative")
        self.collab = (collaborative.read_model(RunPaths(run_dir).collaborative, link["digest"], self.storage)
                       if link else None)
        # The dtype the catalogue was embedded with (an "auto" setting resolved then, recorded here).
        self.dtype = meta.get("encoder", {}).get("dtype", self.tokenize.encoder_dtype)
        self._encoder = None

    @property
    def needs_vectors(self) -> bool:
        """The run was tokenized from precomputed vectors: new items need one too."""
        return bool(self.tokenize.embeddings)

    def codes(self, item_ids: np.ndarray, texts: list[str] | None = None, vectors: np.ndarray | None = None,
              origin: str = "items") -> np.ndarray:
        """(n, m) int16 codes; ``vectors`` (n, dim) when ``needs_vectors``, else ``texts``.

        Raises:
            DataError: a vector of the wrong size, NaN/inf or all zeros (naming ``origin`` and the row).
        """
        from rpg_dist.tokenizer import collaborative, embed, opq

        if self.needs_vectors:
            if vectors is None or vectors.ndim != 2 or vectors.shape[1] != self.dim:
                got = "none" if vectors is None else f"{vectors.shape[-1]} dimensions"
                raise DataError(f"{origin}: field 'embedding' must hold {self.dim} floats (this run was "
                                f"tokenized from precomputed vectors); got {got}")
            raw = vectors.astype(np.float32)
        else:
            if self._encoder is None:
                self._encoder = embed.load_encoder(self.tokenize.encoder, self.dtype, "cpu",
                                                   max(1, os.cpu_count() or 1))
            raw = embed.embed_texts(self._encoder, list(texts or []), self.tokenize.embed_batch_size)
        vectors = embed.normalize_checked(raw, item_ids, origin, 0)  # (n, D)
        if self.collab is not None:
            vectors = collaborative.joint(self.collab, item_ids, vectors)  # (n, D + c)
        return opq.encode(self.index, vectors)


def current(run_dir: str, storage: StorageConfig | None = None) -> dict:
    """``current.json``, or version 0 when the catalogue never changed."""
    uri = io.join(run_dir, FOLDER, "current.json")
    return io.read_json(uri, storage) if io.exists(uri, storage) else {"version": 0}


def graph_version(run_dir: str, storage: StorageConfig | None = None) -> str | None:
    """The build-graph run the log applies to (None without a graph)."""
    manifest = RunPaths(run_dir).stage_manifest("build-graph")
    return io.read_json(manifest, storage)["run_id"] if io.exists(manifest, storage) else None


def replay(recommender: Recommender, run_dir: str, storage: StorageConfig | None = None,
           since: int = 0) -> int:
    """Apply the committed changes after version ``since``; returns the version now served.

    Raises:
        StageError: the log was written against another graph than the run's current one.
    """
    state = current(run_dir, storage)
    if state["version"] and state.get("graph") != graph_version(run_dir, storage):
        raise StageError(f"{io.join(run_dir, FOLDER)}: changes made on graph {state.get('graph')}, but the run's "
                         f"graph is now {graph_version(run_dir, storage)}; move that folder away to serve the "
                         "rebuilt graph (its items are not in it)")
    for version in range(since + 1, state["version"] + 1):
        apply(recommender, read_change(run_dir, version, storage))
    return state["version"]


def apply(recommender: Recommender, change: Change) -> None:
    if change.kind == "add":
        recommender.add_items(change.item_ids, change.codes, change.titles)
    else:
        recommender.withdraw(change.item_ids)


def commit(run_dir: str, change: Change, version: int, storage: StorageConfig | None = None) -> None:
    """Write change ``version`` (the change file, then the pointer: see the module docstring)."""
    n = len(change.item_ids)
    codes = change.codes if change.codes is not None else np.zeros((n, 0), np.int16)
    table = pa.table({
        "kind": pa.array([change.kind] * n, pa.string()),
        "item_id": pa.array(change.item_ids, pa.int64()),
        "codes": pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1).astype(np.int16)), codes.shape[1])
        if codes.shape[1] else pa.array([[]] * n, pa.list_(pa.int16())),
        "title": pa.array(change.titles if change.titles is not None else [None] * n, pa.string()),
    })
    io.write_parquet(table, _change_uri(run_dir, version), storage)
    failpoints.reach("catalogue-change-written")
    before = current(run_dir, storage)
    added = before.get("n_added", 0) + (n if change.kind == "add" else 0)
    withdrawn = before.get("n_withdrawn", 0) + (n if change.kind == "withdraw" else 0)
    io.write_json(io.join(run_dir, FOLDER, "current.json"),
                  {"version": version, "graph": graph_version(run_dir, storage), "n_added": added,
                   "n_withdrawn": withdrawn}, storage)


def read_change(run_dir: str, version: int, storage: StorageConfig | None = None) -> Change:
    table = io.read_parquet(_change_uri(run_dir, version), storage)
    kinds = set(table.column("kind").to_pylist())
    if len(kinds) != 1 or not kinds <= {"add", "withdraw"}:
        raise DataError(f"{_change_uri(run_dir, version)}: field 'kind' must be one of add, withdraw; got {sorted(kinds)}")
    kind = kinds.pop()
    ids = table.column("item_id").to_numpy().astype(np.int64)
    if kind == "withdraw":
        return Change("withdraw", ids)
    codes = np.asarray(table.column("codes").combine_chunks().flatten(), np.int16).reshape(len(ids), -1)
    return Change("add", ids, codes, table.column("title").to_pylist())


@contextlib.contextmanager
def writer_lock(run_dir: str) -> Iterator[None]:
    """One writer at a time (replicas and CLIs): a blocking flock on a local run dir. Object-store run
    dirs have no lock primitive; there, change the catalogue from one process only (README)."""
    if not io.is_local(run_dir):
        yield
        return
    with runlock.waiting_lock(os.path.join(io.filesystem(run_dir)[1], FOLDER)):
        yield


def change_and_commit(recommender: Recommender, run_dir: str, change: Change, version: int,
                      storage: StorageConfig | None = None) -> int:
    """Catch up with the log, apply ``change`` and commit it as the next version; returns it.

    ``version`` is the one ``recommender`` serves; under the writer lock, so two writers never
    commit the same number.
    """
    with writer_lock(run_dir):
        version = replay(recommender, run_dir, storage, since=version)
        change = validate(recommender, change)
        if not len(change.item_ids):  # nothing left to do (items already withdrawn)
            return version
        # Committed before it is applied: a failed write changes nothing, here or on disk.
        commit(run_dir, change, version + 1, storage)
        apply(recommender, change)
    return version + 1


def validate(recommender: Recommender, change: Change, origin: str = "items") -> Change:
    """``change`` checked against the served catalogue; withdrawing a withdrawn item is dropped.

    Raises:
        DataError: an added id already in the catalogue (withdrawn ones included) or repeated, codes
            of the wrong shape, a withdrawn id the catalogue never had (naming ``origin`` and the row).
    """
    ids = change.item_ids
    repeated = repeats(ids)
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise DataError(f"{origin}: row {row}: item_id {int(ids[row])} appears twice")
    _, known = recommender.index.find(ids)
    if change.kind == "add":
        if known.any():
            row = int(np.flatnonzero(known)[0])
            raise DataError(f"{origin}: row {row}: item_id {int(ids[row])} is already in the catalogue")
        n_digit = recommender.model.item_codes.shape[1]
        if change.codes is None or change.codes.shape != (len(ids), n_digit):
            raise DataError(f"{origin}: codes must be ({len(ids)}, {n_digit})")
        return change
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise DataError(f"{origin}: row {row}: item_id {int(ids[row])} is not in the catalogue")
    live = ~recommender.withdrawn[torch.from_numpy(recommender.index.rows(ids))].numpy()
    return Change("withdraw", ids[live])


def _change_uri(run_dir: str, version: int) -> str:
    return io.join(run_dir, FOLDER, "changes", f"{version:06d}.parquet")


def read_new_items(uri: str, encoder: ItemEncoder, storage: StorageConfig | None = None) -> Change:
    """An "add" change from a parquet file or folder: ``item_id``, ``text`` (or ``embedding`` when the
    run was tokenized from vectors) and an optional ``title`` (default: the text).

    Raises:
        DataError: a missing field, a null id or text, a bad vector (naming the file, field and row).
    """
    ids, codes, titles = [], [], []
    field = "embedding" if encoder.needs_vectors else "text"
    schema = io.parquet_schema(uri, storage)
    for needed in ("item_id", field):
        if needed not in schema.names:
            raise DataError(f"{uri}: no field {needed!r} (fields: {schema.names})")
    columns = ["item_id", field] + (["title"] if "title" in schema.names else [])
    row, current_file = 0, None
    for file_uri, batch in io.iter_parquet(uri, storage, columns):
        row = 0 if file_uri != current_file else row
        current_file = file_uri
        for name in columns[:2]:
            if batch.column(name).null_count:
                bad = int(np.flatnonzero(batch.column(name).is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{file_uri}: row {row + bad}: field {name!r} is null")
        batch_ids = batch.column("item_id").to_numpy().astype(np.int64)
        values = batch.column(field)
        texts = values.to_pylist() if field == "text" else None
        vectors = None if texts is not None else _vectors(values, file_uri, row)
        codes.append(encoder.codes(batch_ids, texts, vectors, origin=f"{file_uri} (rows from {row})"))
        names = batch.column("title").to_pylist() if "title" in columns else [None] * len(batch_ids)
        fallback = texts or [str(i) for i in batch_ids]
        titles.extend(t if t is not None else f for t, f in zip(names, fallback))
        ids.append(batch_ids)
        row += len(batch_ids)
    if not ids:
        raise DataError(f"{uri}: no items")
    return Change("add", np.concatenate(ids), np.concatenate(codes), titles)


def _vectors(values: pa.Array, uri: str, row: int) -> np.ndarray:
    lengths = np.asarray(pa.compute.list_value_length(values).to_numpy(zero_copy_only=False))
    if len(set(lengths.tolist())) > 1:
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise DataError(f"{uri}: row {row + bad}: field 'embedding' holds {lengths[bad]} floats, not {lengths[0]}")
    flat = np.asarray(pa.compute.list_flatten(values).to_numpy(zero_copy_only=False), np.float32)
    return flat.reshape(len(lengths), -1)
