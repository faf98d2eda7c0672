"""``rpg-dist tokenize``: item texts -> embeddings (Ray actors) -> OPQ (one task) -> codes (Ray actors).

Artefacts under ``run_dir`` (see RunPaths):

    embeddings/part-KEY.parquet             item_id, embedding fixed_size_list<float32>[D] (L2-normalised)
    embeddings/_manifests/part-KEY.FP.json  commit marker: node id, pid, seconds, peak RSS, source rows
    tokenizer/collaborative.safetensors, collaborative.json   hybrid IDs only: the collaborative model
    tokenizer/opq.faissindex, opq.json      trained index and its fingerprint
    tokenizer/codes/part-KEY.parquet (+ _manifests/)   codes of each embedding shard
    tokenizer/semantic_ids.parquet          item_id, codes fixed_size_list<int16>[m]; rows in shard order
    tokenizer/stats.json                    collisions, per-digit usage/entropy, timings

Every step resumes: committed shards whose fingerprint matches are skipped, a matching OPQ index is
reused. ``add`` embeds and encodes new items with the trained index and rewrites the semantic IDs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.data import dataset
from rpg_dist.data.items import iter_item_ids, repeats
from rpg_dist.data.splits import leave_one_out
from rpg_dist.errors import ConfigError, DataError, RpgDistError, StageError
from rpg_dist.raycluster import init_ray
from rpg_dist.tokenizer import collaborative, embed, opq, precomputed, shards
from rpg_dist.tokenizer.stats import CodeStats

if TYPE_CHECKING:
    from rpg_dist.config import Config, StorageConfig
    from rpg_dist.tokenizer.config import TokenizeConfig

log = logging.getLogger(__name__)

ADD_PREFIX = "add-"
STATS_VERSION = 1


def tokenize(cfg: Config, add: str | None = None) -> dict[str, Any]:
    """Run the tokenize stage (or, with ``add``, encode new items only); returns the stats dict.

    Raises:
        ConfigError: bad encoder path, or the embedding dimension is not divisible by n_digit.
        DataError: empty text, NaN/inf/zero embeddings, duplicate or already-tokenized items.
        StageError: ``add`` before a full run, or an artefact from an incompatible run.
    """
    start = time.perf_counter()
    if not cfg.tokenize.embeddings:
        embed.resolve_encoder(cfg.tokenize.encoder)  # fail before starting anything
    init_ray(cfg.ray)
    cfg = resolved_dtype(cfg, RunPaths(cfg.run_dir).opq_meta if add else None)
    paths = RunPaths(cfg.run_dir)
    timings: dict[str, Any] = {}
    keys = _add_items(cfg, paths, add, timings) if add else _tokenize_dataset(cfg, paths, timings)
    merge_start = time.perf_counter()
    stats = _merge(paths, keys, cfg.tokenize, cfg.storage)
    timings["merge_seconds"] = time.perf_counter() - merge_start
    timings["total_seconds"] = time.perf_counter() - start
    stats.update(version=STATS_VERSION, n_shards=len(keys), timings=timings,
                 opq=io.read_json(paths.opq_meta, cfg.storage), added_from=add,
                 collaborative=(io.read_json(paths.collaborative_meta, cfg.storage)
                                if io.exists(paths.collaborative_meta, cfg.storage) else None))
    io.write_json(paths.tokenizer_stats, stats, cfg.storage)
    log.info("tokenize: %d items, %d colliding (%.3f%%), %.1f s", stats["n_items"], stats["n_colliding_items"],
             100 * stats["collision_rate"], timings["total_seconds"])
    return stats


def _tokenize_dataset(cfg: Config, paths: RunPaths, timings: dict[str, Any]) -> list[str]:
    """Embed the dataset's items, train (or reuse) OPQ, encode every embedding shard."""
    plan, embed_fp, embed_timings = embed_dataset(cfg)
    timings.update(embed_timings)
    keys = [s.key for s in plan] + _current_added_shards(paths, cfg.tokenize, cfg.storage)
    dim = embed.embedding_dim(io.join(paths.embeddings, shards.part_name(plan[0].key)), cfg.storage)
    t = cfg.tokenize
    if t.collaborative_weight:
        _check_dim(collaborative.joint_dim(dim, t.collaborative_dim, t.collaborative_weight), t,
                   f"joint (text {dim} + collaborative_dim {t.collaborative_dim}) dimension")
    else:
        _check_dim(dim, t)
    collab = _fit_collaborative(cfg, paths, [s.key for s in plan], embed_fp, timings)
    timings.update(_train(cfg, paths, [s.key for s in plan], embed_fp, dim, collab))
    timings.update(encode_shards(cfg, keys))
    return keys


def _fit_collaborative(cfg: Config, paths: RunPaths, keys: list[str], embed_fp: str,
                       timings: dict[str, Any]) -> dict[str, Any] | None:
    """Fit (or reuse) the hybrid IDs' collaborative model on one Ray task; its commit record, or
    None for text-only IDs (a model left by an earlier hybrid run is removed)."""
    import ray

    t, storage = cfg.tokenize, cfg.storage
    if not t.collaborative_weight:
        for uri in (paths.collaborative_meta, paths.collaborative):
            io.remove(uri, storage)
        return None
    seq_fp = shards.input_fingerprint(dataset.sequences_uri(cfg.dataset), storage)
    fingerprint = shards.digest(embed_fp, seq_fp, cfg.seed, cfg.model.max_seq_len, t.collaborative_weight,
                                t.collaborative_dim, t.collaborative_window, collaborative.VERSION)
    if io.exists(paths.collaborative_meta, storage):
        meta = io.read_json(paths.collaborative_meta, storage)
        if meta.get("fingerprint") == fingerprint and io.exists(paths.collaborative, storage):
            log.info("collaborative: reusing %s", paths.collaborative)
            return meta
    io.remove(paths.collaborative_meta, storage)  # uncommit the old model before replacing it
    task = ray.remote(num_cpus=t.opq_num_cpus, max_retries=2, runtime_env=shards.worker_env())(
        collaborative.fit_remote)
    parts = [io.join(paths.embeddings, shards.part_name(k)) for k in keys]
    result = ray.get(task.remote(parts, cfg.dataset, storage, cfg.model.max_seq_len, t.collaborative_window,
                                 t.collaborative_dim, t.collaborative_weight, cfg.seed))
    if isinstance(result, RpgDistError):
        raise result
    io.write_bytes(paths.collaborative, result.model_bytes, storage)
    meta = {"fingerprint": fingerprint, "digest": hashlib.sha256(result.model_bytes).hexdigest(),
            "weight": t.collaborative_weight, "dim": t.collaborative_dim, "window": t.collaborative_window,
            "n_warm_items": result.n_warm, "fit_seconds": result.seconds}
    io.write_json(paths.collaborative_meta, meta, storage)
    log.info("collaborative: %d items with training co-occurrence, fitted in %.1f s", result.n_warm, result.seconds)
    timings["collaborative_seconds"] = result.seconds
    return meta


def embed_dataset(cfg: Config) -> tuple[list[shards.Shard], str, dict[str, Any]]:
    """Embed every item of ``cfg.dataset`` not embedded yet: ``(shard plan, fingerprint, timings)``."""
    init_ray(cfg.ray)
    cfg = resolved_dtype(cfg)
    t, storage = cfg.tokenize, cfg.storage
    dataset.read_info(cfg.dataset, storage)
    items = precomputed.source_uri(t.embeddings, cfg.dataset) if t.embeddings else dataset.items_uri(cfg.dataset)
    if t.embeddings and t.embeddings != precomputed.ITEMS_COLUMN:
        precomputed.check_ids(items, cfg.dataset, storage)
    plan = shards.plan_shards(items, t.shard_size, storage)
    if not plan:
        raise DataError(f"{items}: no items to tokenize")
    embed_fp = shards.digest(_encoder_identity(t), t.embed_batch_size, t.shard_size,
                             shards.input_fingerprint(items, storage))
    timings = _embed(cfg, RunPaths(cfg.run_dir), plan, embed_fp, owned=lambda key: not key.startswith(ADD_PREFIX),
                     source=items)
    return plan, embed_fp, timings


def _add_items(cfg: Config, paths: RunPaths, uri: str, timings: dict[str, Any]) -> list[str]:
    """Embed and encode the items at ``uri`` with the trained index; no retraining."""
    t, storage = cfg.tokenize, cfg.storage
    for needed in (paths.opq_index, paths.opq_meta, paths.semantic_ids):
        if not io.exists(needed, storage):
            raise StageError(f"{needed}: missing; run `rpg-dist tokenize` without --add first")
    meta = io.read_json(paths.opq_meta, storage)
    if meta["encoder"] != _encoder_identity(t):
        raise StageError(f"tokenize.encoder / encoder_dtype: {_encoder_identity(t)} differ from "
                         f"{meta['encoder']}, which the OPQ index at {paths.opq_index} was trained on")
    input_fp = shards.input_fingerprint(uri, storage)
    prefix = f"{ADD_PREFIX}{input_fp[:10]}-"
    _check_new_ids(uri, paths, prefix, storage, vectors=bool(t.embeddings))
    plan = shards.plan_shards(uri, t.shard_size, storage, prefix=prefix)
    embed_fp = shards.digest(_encoder_identity(t), t.embed_batch_size, t.shard_size, input_fp)
    if t.embeddings and precomputed.expected_dim(uri, storage) != meta["dim"]:
        raise DataError(f"{uri}: field 'embedding' has {precomputed.expected_dim(uri, storage)} dimensions; the "
                        f"OPQ index at {paths.opq_index} was trained on {meta['dim']}")
    timings.update(_embed(cfg, paths, plan, embed_fp, owned=lambda key: key.startswith(prefix), source=uri))
    keys = sorted(shards.committed(paths.embedding_manifests, storage))
    timings.update(encode_shards(cfg, keys, only={s.key for s in plan}))
    return keys


def _embed(cfg: Config, paths: RunPaths, plan: list[shards.Shard], fingerprint: str, owned, source: str) -> dict[str, Any]:
    """Embed (or import) the planned shards not committed yet; drop owned shards no longer planned."""
    t, storage = cfg.tokenize, cfg.storage
    done = set(shards.drop_stale(paths.embedding_manifests, {s.key: fingerprint for s in plan}, storage, owned,
                                 part_dir=paths.embeddings))
    _remove_unplanned_parts(paths.embeddings, {s.key for s in plan}, owned, storage)
    pending = [s for s in plan if s.key not in done]
    log.info("embed: %d shards, %d committed, %d to run", len(plan), len(done), len(pending))
    start = time.perf_counter()
    common = dict(out_dir=paths.embeddings, manifest_dir=paths.embedding_manifests, fingerprint=fingerprint,
                  storage=storage)
    if t.embeddings:
        worker, gpus, env = precomputed.ShardImporter, 0.0, None
        kwargs = dict(dim=precomputed.expected_dim(source, storage), identity=_encoder_identity(t), **common)
    else:
        worker, gpus, env = embed.ShardEmbedder, _embed_gpus(t), embed.OFFLINE_ENV
        kwargs = dict(encoder=t.encoder, dtype=t.encoder_dtype, batch_size=t.embed_batch_size,
                      threads=t.actor_threads(), use_gpu=gpus > 0, **common)
    pool = shards.PoolSpec(concurrency=t.concurrency, num_cpus=t.num_cpus_per_actor, num_gpus=gpus,
                           start_timeout_s=t.actor_start_timeout_s)
    manifests = shards.run_shards([_shard_task(s) for s in pending], worker, kwargs, pool, "embed", env=env)
    seconds = time.perf_counter() - start
    n_items = sum(m["n_items"] for m in manifests)
    missing = set(s.key for s in plan) - set(shards.committed(paths.embedding_manifests, storage))
    if missing:
        raise StageError(f"{paths.embeddings}: shard(s) {sorted(missing)[:5]} were not committed")
    return {"embed_seconds": seconds, "embed_items": n_items, "embed_shards_run": len(manifests),
            "embed_shards_skipped": len(done), "embed_items_per_s": n_items / seconds if n_items else 0.0,
            "embed_shards_per_node": dict(Counter(m["node_id"] for m in manifests)),
            "embed_peak_rss_mb": max((m["peak_rss_mb"] for m in manifests), default=0.0)}


def _train(cfg: Config, paths: RunPaths, keys: list[str], embed_fp: str, dim: int,
           collab: dict[str, Any] | None) -> dict[str, Any]:
    """Train OPQ on one Ray task unless an index with the same fingerprint exists; with ``collab``
    (hybrid IDs) on the joint vectors, and the index records the collaborative model it needs."""
    import ray

    t, storage = cfg.tokenize, cfg.storage
    seq_fp = shards.input_fingerprint(dataset.sequences_uri(cfg.dataset), storage)
    link = {"digest": collab["digest"], "weight": collab["weight"]} if collab else None
    fingerprint = shards.digest(embed_fp, seq_fp, cfg.seed, opq.factory_string(t), t.opq_niter,
                                t.opq_sample_size, t.pca_sample_size, link)
    if io.exists(paths.opq_meta, storage) and io.exists(paths.opq_index, storage):
        if io.read_json(paths.opq_meta, storage).get("fingerprint") == fingerprint:
            log.info("opq: reusing %s", paths.opq_index)
            return {"opq_reused": True}
    io.remove(paths.opq_meta, storage)  # uncommit the old index before replacing it
    sample = training_sample(cfg.dataset, storage, cfg.model.max_seq_len, t.opq_sample_size, cfg.seed)
    parts = [io.join(paths.embeddings, shards.part_name(k)) for k in keys]
    use_gpu = _cluster_gpus() > 0 and _driver_faiss_has_gpu()
    task = ray.remote(num_cpus=t.opq_num_cpus, num_gpus=1 if use_gpu else 0, max_retries=2,
                      runtime_env=shards.worker_env())(opq.train_remote)
    log.info("opq: training %s on %d items (dim %d%s)", opq.factory_string(t), len(sample), dim,
             f" + collaborative {collab['dim']}, weight {collab['weight']}" if collab else "")
    result = ray.get(task.remote(parts, sample, t, cfg.seed, t.opq_threads, storage,
                                 (paths.collaborative, link["digest"]) if link else None))
    if isinstance(result, RpgDistError):
        raise result
    # dim: the item vectors the index takes (text or precomputed); index_dim: after the hybrid join.
    save_index(paths, storage, result.index_bytes, {
        "fingerprint": fingerprint, "factory": opq.factory_string(t), "dim": dim, "index_dim": result.dim,
        "collaborative": link,
        "n_sample": result.n_sample, "n_train_items_cap": t.opq_sample_size, "seed": cfg.seed,
        "encoder": _encoder_identity(t), "train_seconds": result.seconds, "threads": result.threads,
        "used_gpu": result.used_gpu, "node_id": result.node_id})
    log.info("opq: trained in %.1f s (+%.1f s gathering the sample)", result.seconds, result.gather_seconds)
    return {"opq_reused": False, "opq_train_seconds": result.seconds, "opq_gather_seconds": result.gather_seconds}


def save_index(paths: RunPaths, storage: StorageConfig | None, index_bytes: bytes, meta: dict[str, Any]) -> None:
    """Commit a trained index: the index file first, then ``opq.json`` (the commit marker)."""
    io.remove(paths.opq_meta, storage)
    io.write_bytes(paths.opq_index, index_bytes, storage)
    io.write_json(paths.opq_meta, {**meta, "index_digest": hashlib.sha256(index_bytes).hexdigest()[:16]}, storage)


def encode_shards(cfg: Config, keys: list[str], only: set[str] | None = None) -> dict[str, Any]:
    """Encode embedding shards ``keys`` (or the subset ``only``) with the trained index on actors.

    Shards whose codes are committed for the current index are skipped; returns timings.
    """
    init_ray(cfg.ray)
    t, storage, paths = cfg.tokenize, cfg.storage, RunPaths(cfg.run_dir)
    meta = io.read_json(paths.opq_meta, storage)
    index_digest, link = meta["index_digest"], meta.get("collaborative")
    embedded = shards.committed(paths.embedding_manifests, storage)
    # The index digest names the collaborative model too: the index is retrained whenever it changes.
    wanted = {k: shards.digest(index_digest, embedded[k][0]) for k in keys if only is None or k in only}
    owned = (lambda key: True) if only is None else (lambda key: key in only)
    done = set(shards.drop_stale(paths.code_manifests, wanted, storage, owned, part_dir=paths.codes))
    _remove_unplanned_parts(paths.codes, set(wanted), owned, storage)
    pending = [k for k in sorted(wanted) if k not in done]
    log.info("encode: %d shards, %d committed, %d to run", len(wanted), len(done), len(pending))
    start = time.perf_counter()
    worker_kwargs = dict(index_uri=paths.opq_index, index_digest=index_digest, threads=t.actor_threads(), out_dir=paths.codes,
                         manifest_dir=paths.code_manifests, storage=storage,
                         collab=(paths.collaborative, link["digest"]) if link else None)
    tasks = [{"key": k, "part": io.join(paths.embeddings, shards.part_name(k)), "fingerprint": wanted[k]}
             for k in pending]
    pool = shards.PoolSpec(concurrency=t.concurrency, num_cpus=t.num_cpus_per_actor,
                           start_timeout_s=t.actor_start_timeout_s)
    manifests = shards.run_shards(tasks, opq.ShardEncoder, worker_kwargs, pool, "encode")
    seconds = time.perf_counter() - start
    n_items = sum(m["n_items"] for m in manifests)
    return {"encode_seconds": seconds, "encode_items": n_items, "encode_shards_run": len(manifests),
            "encode_items_per_s": n_items / seconds if n_items else 0.0,
            "encode_shards_per_node": dict(Counter(m["node_id"] for m in manifests)),
            "encode_peak_rss_mb": max((m["peak_rss_mb"] for m in manifests), default=0.0)}


def _merge(paths: RunPaths, keys: list[str], t: TokenizeConfig, storage: StorageConfig | None) -> dict[str, Any]:
    """Stream every code part into semantic_ids.parquet (atomically) and compute its stats.

    Raises:
        DataError: an item id appears in two parts (e.g. an added item later added to the dataset).
    """
    current = shards.committed(paths.code_manifests, storage)
    missing = [k for k in keys if k not in current]
    if missing:
        raise StageError(f"{paths.codes}: no codes for shard(s) {missing[:5]}; rerun `rpg-dist tokenize`")
    code_stats = CodeStats(t.n_digit, t.codebook_size)
    item_ids = []
    with io.atomic_open(paths.semantic_ids, storage) as handle:
        writer = None
        for key in keys:
            table = io.read_parquet(io.join(paths.codes, shards.part_name(key)), storage)
            if writer is None:
                writer = pq.ParquetWriter(handle, table.schema)
            writer.write_table(table)
            flat = table.column("codes").combine_chunks().flatten().to_numpy()
            code_stats.add(flat.reshape(len(table), -1))  # (n, m)
            item_ids.append(table.column("item_id").to_numpy())
        _check_unique(item_ids, keys, paths.codes)
        writer.close()
    return code_stats.summary()


def training_sample(dataset_uri: str, storage: StorageConfig | None, max_len: int, cap: int, seed: int) -> np.ndarray:
    """Sorted ids of at most ``cap`` items drawn (seeded) from the items of the training sequences.

    Validation/test targets appear only if they also occur in some training sequence.
    """
    ids = training_item_ids(dataset_uri, storage, max_len)
    if len(ids) > cap:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=cap, replace=False))
    return ids


def training_item_ids(dataset_uri: str, storage: StorageConfig | None, max_len: int) -> np.ndarray:
    """Sorted unique item ids of the leave-one-out training sequences, streamed batch by batch."""
    chunks: list[np.ndarray] = []
    size = 0
    unique = np.empty(0, np.int64)
    for _, batch in io.iter_parquet(dataset.sequences_uri(dataset_uri), storage, ["user_id", "item_ids"]):
        train = leave_one_out(pa.Table.from_batches([batch]), max_len).train
        chunks.append(np.unique(train.flatten().to_numpy()))
        size += len(chunks[-1])
        if size > 4 * max(len(unique), 1 << 20):  # collapse now and then: memory O(n_items)
            unique, chunks, size = np.unique(np.concatenate([unique, *chunks])), [], 0
    return np.unique(np.concatenate([unique, *chunks]))


def _check_unique(item_ids: list[np.ndarray], keys: list[str], where: str) -> None:
    ids = np.concatenate(item_ids)
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(dup):
        bounds = np.cumsum([len(i) for i in item_ids])
        first, second = (int(np.searchsorted(bounds, order[d], side="right")) for d in (dup[0], dup[0] + 1))
        raise DataError(f"{where}: item_id {int(ids[order[dup[0]]])} is in both part-{keys[first]} and "
                        f"part-{keys[second]}; remove one of them (an --add batch overlapping the dataset?)")


def _check_new_ids(uri: str, paths: RunPaths, prefix: str, storage: StorageConfig | None, vectors: bool) -> None:
    """New items must be unique and not tokenized yet (except by an earlier run of this same batch)."""
    ours = [io.join(paths.codes, shards.part_name(k)) for k in shards.committed(paths.code_manifests, storage)
            if k.startswith(prefix)]
    known = io.read_parquet(paths.semantic_ids, storage, ["item_id"]).column("item_id").to_numpy()
    if ours:  # a rerun of an interrupted --add of this same batch
        known = np.setdiff1d(known, _ids_of(ours, storage))
    known = np.sort(known)
    seen = np.empty(0, np.int64)
    for file_uri, row0, ids in _iter_ids(uri, storage, vectors):
        pos = np.clip(np.searchsorted(known, ids), 0, max(len(known) - 1, 0))
        old = np.flatnonzero(known[pos] == ids) if len(known) else np.empty(0, np.int64)
        dup_inside = np.flatnonzero(np.isin(ids, seen) | repeats(ids))
        for bad, what in ((old, "already has a semantic ID"), (dup_inside, "is duplicated in the new items")):
            if len(bad):
                row = int(bad[0])
                raise DataError(f"{file_uri}: row {row0 + row}: field 'item_id' {int(ids[row])} {what}")
        seen = np.union1d(seen, ids)


def _ids_of(uris: list[str], storage: StorageConfig | None) -> np.ndarray:
    return np.concatenate([io.read_parquet(u, storage, ["item_id"]).column("item_id").to_numpy() for u in uris])


def _iter_ids(uri: str, storage: StorageConfig | None, vectors: bool = False):
    """``(file, first row, item_ids)`` batches of the new items (only the id column is read).

    New items need ``item_id`` and ``text`` (or, with precomputed embeddings, an ``embedding``).
    """
    for file_uri in io.parquet_files(uri, storage):
        schema = io.parquet_schema(file_uri, storage)
        if vectors:
            precomputed.expected_dim(file_uri, storage)  # checks item_id and embedding
            continue
        for name, ok in (("item_id", pa.types.is_integer), ("text", _is_string)):
            if name not in schema.names or not ok(schema.field(name).type):
                raise DataError(f"{file_uri}: field '{name}' is missing or not "
                                f"{'an integer' if name == 'item_id' else 'a string'} (columns: {schema.names})")
    yield from iter_item_ids(uri, storage)


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _current_added_shards(paths: RunPaths, t: TokenizeConfig, storage: StorageConfig | None) -> list[str]:
    """Keys of committed --add shards; they are re-encoded with a retrained index, never dropped."""
    keys = []
    for key, (fingerprint, *_) in shards.committed(paths.embedding_manifests, storage).items():
        if not key.startswith(ADD_PREFIX):
            continue
        uri = io.join(paths.embedding_manifests, shards.manifest_name(key, fingerprint))
        manifest = io.read_json(uri, storage)
        if manifest.get("encoder") != _encoder_identity(t):
            raise StageError(
                f"{paths.embeddings}/part-{manifest['key']}: added items embedded with {manifest.get('encoder')}, "
                f"not {_encoder_identity(t)}; delete that part and its manifest and add them again"
            )
        keys.append(manifest["key"])
    return sorted(keys)


def _remove_unplanned_parts(folder: str, planned: set[str], owned, storage: StorageConfig | None) -> None:
    """Delete owned part files that the plan no longer has (e.g. the shard count shrank), and the
    temporary files of local writes that a killed worker never committed."""
    for uri in io.list_files(folder, ".parquet", storage):
        key = uri.rsplit("/", 1)[1][len("part-"):-len(".parquet")]
        if owned(key) and key not in planned:
            io.remove(uri, storage)
    for sub in (folder, io.join(folder, "_manifests")):
        if io.is_local(sub) and io.exists(sub, storage):  # object stores never publish partial writes
            fs, path = io.filesystem(sub, storage)
            for name in fs.ls(path, detail=False):
                if posixpath.basename(name).startswith(".tmp-"):  # io.atomic_open's temporary names
                    fs.rm(name)


def _check_dim(dim: int, t: TokenizeConfig, what: str = "embedding dimension") -> None:
    if t.pca_dim > dim:
        raise ConfigError(f"tokenize.pca_dim: {t.pca_dim} is larger than the {what} {dim}")
    if (t.pca_dim or dim) % t.n_digit:
        raise ConfigError(f"tokenize.n_digit: the {what} {dim} is not divisible by "
                          f"n_digit ({t.n_digit}); set tokenize.pca_dim to a multiple of {t.n_digit}")


def resolved_dtype(cfg: Config, trained_meta: str | None = None) -> Config:
    """``cfg`` with ``tokenize.encoder_dtype: auto`` made concrete (embed.resolve_dtype), once, here;
    with ``trained_meta`` (opq.json of the index new items join), the dtype that index recorded, so
    items added on another kind of machine are embedded as the catalogue was."""
    t = cfg.tokenize
    if t.encoder_dtype != "auto":
        return cfg
    recorded = io.read_json(trained_meta, cfg.storage).get("encoder", {}).get("dtype") if (
        trained_meta and io.exists(trained_meta, cfg.storage)) else None
    dtype = recorded or embed.resolve_dtype("auto", use_gpu=not t.embeddings and _embed_gpus(t) > 0)
    return dataclasses.replace(cfg, tokenize=dataclasses.replace(t, encoder_dtype=dtype))


def _encoder_identity(t: TokenizeConfig) -> dict[str, str]:
    if t.embeddings:
        return precomputed.identity(t.embeddings)
    return {"encoder": t.encoder, "dtype": t.encoder_dtype}


def _shard_task(shard: shards.Shard) -> dict[str, Any]:
    return dict(shard.__dict__)


def _embed_gpus(t: TokenizeConfig) -> float:
    if t.num_gpus_per_actor is not None:
        return t.num_gpus_per_actor
    return 1.0 if _cluster_gpus() > 0 else 0.0


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


def _driver_faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources")
