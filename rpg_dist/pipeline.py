"""``rpg-dist run``: prepare -> tokenize -> train -> build-graph -> evaluate, skipping complete stages.

Each stage, when it finishes, writes ``RUN_DIR/stages/<stage>.json`` with a fingerprint of what it
was computed from: its own config sections plus the run ids of the stages it reads. A rerun skips a
stage whose manifest matches and whose outputs exist; anything upstream that was redone (or a
changed config section) invalidates everything downstream. ``--force STAGE`` redoes one stage and,
through the run ids, everything after it. The manifest also records the sha256 of each output: an
output altered, truncated or deleted since makes the stage run again, not count as complete.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import Config, with_absolute_paths
from rpg_dist.configlib import fingerprint, to_dict

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Train settings that change how a run is executed, not what it computes.
_OPERATIONAL_TRAIN_FIELDS = (
    "log_every", "max_failures", "cpus_per_worker", "launcher", "torch_threads", "reuse_freed_memory",
    "keep_checkpoints", "checkpoint_every", "resume",
)


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    config: Callable[[Config], Any]  # the config slice the stage's result depends on
    outputs: Callable[[Config], list[str]]  # URIs that must exist for the stage to count as done
    run: Callable[[Config], Any]


def _prepare(cfg: Config) -> Any:
    from rpg_dist.data.importers import prepare

    # Only called when the dataset is missing or --force prepare asked for a rebuild.
    return prepare(cfg.prepare, cfg.dataset, cfg.storage, overwrite=True).__dict__


def _tokenize(cfg: Config) -> Any:
    from rpg_dist.tokenizer.stage import tokenize

    return tokenize(cfg)


def _train(cfg: Config) -> Any:
    from rpg_dist.train.stage import train

    return train(cfg)


def _build_graph(cfg: Config) -> Any:
    from rpg_dist.graph.stage import build_graph

    return build_graph(cfg)


def _evaluate(cfg: Config) -> Any:
    from rpg_dist.evaluation.stage import evaluate

    return evaluate(cfg)


def _graph_outputs(cfg: Config) -> list[str]:
    """The graph manifest and every part it lists."""
    from rpg_dist.graph.store import read_manifest

    paths = RunPaths(cfg.run_dir)
    if not io.exists(paths.graph_manifest, cfg.storage):
        return [paths.graph_manifest]
    files = read_manifest(cfg.run_dir, cfg.storage)["files"]
    return [paths.graph_manifest] + [io.join(paths.graph, name) for names in files.values() for name in names]


def _train_config(cfg: Config) -> dict[str, Any]:
    train = to_dict(cfg.train)
    for name in _OPERATIONAL_TRAIN_FIELDS:
        train.pop(name, None)
    return {"model": to_dict(cfg.model), "train": train, "seed": cfg.seed}


STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), lambda c: {"prepare": to_dict(c.prepare) if c.prepare else None, "dataset": c.dataset},
          lambda c: [io.join(c.dataset, "dataset.json")], _prepare),
    Stage("tokenize", ("prepare",), lambda c: {"tokenize": to_dict(c.tokenize), "seed": c.seed},
          lambda c: [RunPaths(c.run_dir).semantic_ids, RunPaths(c.run_dir).opq_index, RunPaths(c.run_dir).opq_meta],
          _tokenize),
    Stage("train", ("tokenize",), _train_config,
          lambda c: [RunPaths(c.run_dir).model_weights, RunPaths(c.run_dir).model_config], _train),
    Stage("build-graph", ("train",), lambda c: {"graph": to_dict(c.graph)}, _graph_outputs, _build_graph),
    Stage("evaluate", ("build-graph",), lambda c: {"decode": to_dict(c.decode), "eval": to_dict(c.eval)},
          lambda c: [RunPaths(c.run_dir).metrics], _evaluate),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def run_pipeline(cfg: Config, force: list[str] | None = None) -> dict[str, Any]:
    """Run every stage in order; returns the evaluation metrics (also in ``RUN_DIR/metrics.json``)."""
    force = set(force or [])
    unknown = force - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGE_NAMES)}")
    from rpg_dist.config import save_run_config

    cfg = with_absolute_paths(cfg)
    paths = RunPaths(cfg.run_dir)
    save_run_config(cfg)
    run_ids: dict[str, str] = {}
    wall: dict[str, float] = {}
    try:
        for position, stage in enumerate(STAGES, start=1):
            banner = f"[{position}/{len(STAGES)}] {stage.name}"
            run_ids[stage.name], wall[stage.name] = _run_stage(cfg, paths, stage, run_ids, stage.name in force, banner)
    finally:
        _shutdown_ray()
    metrics = io.read_json(paths.metrics, cfg.storage)
    metrics.setdefault("pipeline", {})["stage_wall_s"] = wall
    io.write_json(paths.metrics, metrics, cfg.storage)
    print(format_metrics(metrics))
    print(f"run directory: {cfg.run_dir}")
    return metrics


def _run_stage(cfg: Config, paths: RunPaths, stage: Stage, run_ids: dict[str, str], force: bool, banner: str) -> tuple[str, float]:
    """Run or skip one stage; returns (its run id, seconds spent now)."""
    if stage.name == "prepare":
        return _prepare_stage(cfg, force, banner)
    inputs = {"config": stage.config(cfg), "upstream": {u: run_ids.get(u) for u in stage.upstream}}
    key = fingerprint(inputs)
    manifest_uri = paths.stage_manifest(stage.name)
    manifest = io.read_json(manifest_uri, cfg.storage) if io.exists(manifest_uri, cfg.storage) else None
    current = not force and manifest is not None and manifest.get("fingerprint") == key
    if current and all(io.exists(uri, cfg.storage) for uri in stage.outputs(cfg)) and _unchanged(cfg, manifest, banner):
        log.info("==== %s: complete, skipped (inputs and config unchanged)", banner)
        return manifest["run_id"], 0.0
    log.info("==== %s: running", banner)
    start = time.perf_counter()
    result = stage.run(cfg)
    seconds = time.perf_counter() - start
    run_id = uuid.uuid4().hex
    # metrics.json is merged into by later commands: its presence is what counts.
    digests = {} if stage.name == "evaluate" else {
        _relative(uri, cfg.run_dir): io.file_sha256(uri, cfg.storage) for uri in stage.outputs(cfg)}
    io.write_json(manifest_uri, {
        "version": MANIFEST_VERSION, "stage": stage.name, "fingerprint": key, "run_id": run_id,
        "inputs": inputs, "wall_s": seconds, "output_digests": digests,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "result": result,
    }, cfg.storage)
    log.info("==== %s: done in %.1f s", banner, seconds)
    return run_id, seconds


def _unchanged(cfg: Config, manifest: dict[str, Any] | None, banner: str) -> bool:
    """The stage's outputs are the bytes it wrote (sha256 recorded at completion; manifests from
    before digests were recorded count as unchanged)."""
    for name, digest in (manifest or {}).get("output_digests", {}).items():
        uri = io.join(cfg.run_dir, name)
        if not io.exists(uri, cfg.storage) or io.file_sha256(uri, cfg.storage) != digest:
            log.warning("==== %s: %s changed since the stage completed (missing, altered or truncated): "
                        "redoing the stage", banner, uri)
            return False
    return True


def _relative(uri: str, run_dir: str) -> str:
    """``uri`` as a path inside ``run_dir`` (manifests stay valid when a run directory moves)."""
    prefix = run_dir.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not inside {run_dir}")
    return uri[len(prefix):]


def _prepare_stage(cfg: Config, force: bool, banner: str) -> tuple[str, float]:
    """Build the dataset only when it is missing (or forced): datasets are shared by many runs.

    Its run id is derived from ``dataset.json``, so a dataset rebuilt with other content (counts,
    source) invalidates the stages after it.
    """
    from rpg_dist.data.dataset import read_info

    seconds = 0.0
    exists = io.exists(io.join(cfg.dataset, "dataset.json"), cfg.storage)
    if cfg.prepare is not None and (force or not exists):
        log.info("==== %s: building %s from %s input", banner, cfg.dataset, cfg.prepare.format)
        start = time.perf_counter()
        _prepare(cfg)
        seconds = time.perf_counter() - start
    else:
        log.info("==== %s: dataset %s exists, reused", banner, cfg.dataset)
    return fingerprint(read_info(cfg.dataset, cfg.storage).__dict__), seconds


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics of ``metrics.json``."""
    rows = [(name, metrics[name]) for name in ("val", "test", "test_full_ranking", "popularity") if isinstance(metrics.get(name), dict)]
    columns = ["recall@5", "ndcg@5", "recall@10", "ndcg@10", "n_visited_items"]
    lines = [f"{'split':<20}" + "".join(f"{c:>17}" for c in columns)]
    for name, values in rows:
        cells = "".join(f"{values[c]:>17.4f}" if isinstance(values.get(c), (int, float)) else f"{'-':>17}" for c in columns)
        lines.append(f"{name:<20}{cells}")
    return "\n".join(lines)
