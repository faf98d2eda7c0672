"""Resumable DeepSpeed checkpoints under ``RUN_DIR/checkpoints/``, local or on an object store.

    checkpoints/step-00000404/ds/...        DeepSpeed's files (every rank writes its own)
    checkpoints/step-00000404/meta.json     the commit marker, written by rank 0 after a barrier
    checkpoints/best/model.safetensors      best weights so far, and their config.json

A step folder without ``meta.json`` is incomplete (a crash mid-save) and is ignored, then deleted
by the next commit. On s3:// or gs:// each rank saves to a local temporary folder and uploads its
own files through fsspec; loading downloads the folder first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rpg_dist import io
from rpg_dist.artifacts import read_versioned_json
from rpg_dist.errors import StageError


class CheckpointError(StageError):
    """A committed checkpoint that cannot be loaded (refused, truncated or altered)."""


def _deepspeed_globals() -> list:
    """Classes the restricted unpickler may rebuild from DeepSpeed checkpoints: data records only
    (a loss-scale state, a stage enum, a tensor-fragment address), none that runs code on load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TAG = "ds"  # DeepSpeed's tag folder; never "latest", which collides with DeepSpeed's own file.
_STEP = re.compile(r"^step-(\d{8})$")


def step_dir(root: str, step: int) -> str:
    return io.join(root, f"step-{step:08d}")


def best_dir(root: str) -> str:
    return io.join(root, "best")


def list_complete(root: str, storage: StorageConfig | None = None) -> list[tuple[int, str]]:
    """``(step, uri)`` of committed checkpoints, oldest first."""
    fs, path = io.filesystem(root, storage)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        match = _STEP.match(posixpath.basename(entry.rstrip("/")))
        if match:
            uri = io.join(root, match.group(0))
            if io.exists(io.join(uri, "meta.json"), storage):
                found.append((int(match.group(1)), uri))
    return sorted(found)


def read_meta(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    return read_versioned_json(io.join(uri, "meta.json"), FORMAT_VERSION, "no checkpoint metadata", storage)


def check_compatible(uri: str, meta: dict[str, Any], identity: dict[str, Any], layout: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint of another model, tokenizer or sharding.

    Raises:
        StageError: naming the checkpoint and every differing field.
    """
    diffs = _diff("", meta.get("identity", {}), identity) + _diff("", meta.get("layout", {}), layout)
    if diffs:
        raise StageError(
            f"{uri}: cannot resume, the checkpoint was written with a different config: "
            + "; ".join(diffs)
            + ". Use another run_dir, or --set train.resume=false to start over (this deletes the "
            "old checkpoints)."
        )


def _diff(prefix: str, saved: Any, current: Any) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _diff(f"{prefix}.{key}" if prefix else key, saved.get(key), current.get(key))
        return out
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r}, now {current!r}"]


def save(engine, root: str, step: int, meta: dict[str, Any], rank: int, barrier, storage: StorageConfig | None = None) -> str:
    """Save a DeepSpeed checkpoint for ``step`` and commit it with ``meta.json`` (all ranks call).

    Args:
        barrier: a callable that blocks until every rank reaches it.
    """
    target = step_dir(root, step)
    if io.is_local(root):
        engine.save_checkpoint(target, tag=TAG, save_latest=False)
    else:
        with tempfile.TemporaryDirectory(prefix="rpg-ckpt-") as local:
            engine.save_checkpoint(local, tag=TAG, save_latest=False)
            _upload(local, target, storage)
    barrier()
    if rank == 0:
        io.write_json(io.join(target, "meta.json"), {"format_version": FORMAT_VERSION, "step": step, **meta}, storage)
    barrier()
    return target


def load(engine, uri: str, storage: StorageConfig | None = None) -> None:
    """Restore parameters, optimizer and LR schedule from a committed checkpoint (all ranks call)."""
    if io.is_local(uri):
        _load_local(engine, io.filesystem(uri)[1])
        return
    with tempfile.TemporaryDirectory(prefix="rpg-ckpt-") as local:
        io.download_folder(uri, local, storage)
        _load_local(engine, local)


def _load_local(engine, folder: str) -> None:
    with tensors_only():
        load_path, _ = engine.load_checkpoint(
            folder, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise StageError(f"{folder}: DeepSpeed found no checkpoint under tag {TAG!r}")


@contextlib.contextmanager
def tensors_only() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's included) unpickles tensors and plain data only.

    DeepSpeed reads checkpoints with ``weights_only=False``, i.e. arbitrary pickles: whoever can write
    RUN_DIR/checkpoints (a shared bucket prefix) would run code on every training worker. Inside this
    block torch's restricted unpickler is forced, and a file it refuses is a ``CheckpointError``
    naming it. Besides tensors, dicts, lists, numbers and strings, ZeRO's optimizer files hold three
    plain DeepSpeed records (allowed below, found by loading ZeRO-1..3 checkpoints in the tests).
    """
    import torch

    original = torch.load

    def restricted(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return original(f, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - torch raises several types for refused or broken files
            raise CheckpointError(f"{f}: refused to load: {str(err).splitlines()[0]}") from None

    torch.load = restricted
    try:
        yield
    finally:
        torch.load = original


def prune(root: str, keep: int, storage: StorageConfig | None = None) -> None:
    """Delete all but the newest ``keep`` committed checkpoints, and uncommitted leftovers (rank 0)."""
    complete = list_complete(root, storage)
    committed = {uri for _, uri in complete[-keep:]}
    newest = complete[-1][0] if complete else -1
    fs, path = io.filesystem(root, storage)
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        match = _STEP.match(name)
        # Uncommitted folders newer than the newest commit may be a save in progress: leave them.
        if match and io.join(root, name) not in committed and int(match.group(1)) <= newest:
            io.remove(io.join(root, name), storage)


def remove_all(root: str, storage: StorageConfig | None = None) -> None:
    """Delete every checkpoint and the best weights (``train.resume=false``)."""
    io.remove(root, storage)


def _upload(local: str, target: str, storage: StorageConfig | None) -> None:
    """Upload every file under ``local`` to ``target`` (this rank's files only)."""
    for folder, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), local)
            io.upload_file(os.path.join(folder, name), io.join(target, rel.replace(os.sep, "/")), storage)
