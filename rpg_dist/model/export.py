"""The exported model: ``RUN_DIR/model/model.safetensors`` + ``RUN_DIR/model/config.json``.

The weights file holds plain tensors (``token_embeddings`` is the (m, V, d) table used for scoring
and graph building); ``config.json`` holds what rebuilds the module and a fingerprint of the
semantic IDs it was trained on. The item code table itself is not exported: ``load_model`` reads it
from ``RUN_DIR/tokenizer/semantic_ids.parquet`` and refuses codes that differ from the training ones.
No deepspeed, no pickle: loading needs only torch and safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rpg_dist import configlib, io
from rpg_dist.artifacts import RunPaths, read_versioned_json
from rpg_dist.errors import StageError
from rpg_dist.model.config import ModelConfig
from rpg_dist.model.rpg import RPG
from rpg_dist.tokenizer.semantic_ids import SemanticIds, load_semantic_ids

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def semantic_ids_fingerprint(semantic_ids: SemanticIds) -> str:
    """sha256 of the item ids and their codes: a model is only valid with the codes it learned."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(semantic_ids.index.item_ids, np.int64).tobytes())
    digest.update(np.ascontiguousarray(semantic_ids.codes, np.int16).tobytes())
    return digest.hexdigest()


def model_metadata(model: RPG, tokenizer_fingerprint: str, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` content for ``model`` (also the identity a checkpoint is checked against)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.cfg),
        "n_digit": model.n_digit,
        "codebook_size": model.codebook_size,
        "n_items": model.n_items,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        **extra,
    }


WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_weights(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    folder: str,
    storage: StorageConfig | None = None,
) -> None:
    """Write ``folder/model.safetensors``, then ``folder/config.json`` (the commit marker), atomically.

    Args:
        state_dict: the model's parameters (``RPG.state_dict()``, or a gathered ZeRO-3 copy).
        metadata: from ``model_metadata`` (plus any training summary fields).
        folder: local path or fsspec URI.
    """
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    if "token_embeddings" not in tensors:
        raise ValueError("state_dict has no 'token_embeddings'")
    config_uri = io.join(folder, CONFIG_FILE)
    # Remove the old marker first: a crash between the two writes leaves "no model", never a
    # config that describes other weights.
    io.remove(config_uri, storage)
    data = save_safetensors(tensors)
    io.write_bytes(io.join(folder, WEIGHTS_FILE), data, storage)
    io.write_json(config_uri, {**metadata, "weights_sha256": hashlib.sha256(data).hexdigest()}, storage)


def read_weights(folder: str, storage: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors`` (no pickle involved), refused unless they are the
    bytes ``folder/config.json`` recorded at export (exports from before the digest load with a warning).

    Raises:
        StageError: the weights were altered or truncated since they were written.
    """
    uri = io.join(folder, WEIGHTS_FILE)
    config_uri = io.join(folder, CONFIG_FILE)
    expected = io.read_json(config_uri, storage).get("weights_sha256") if io.exists(config_uri, storage) else None
    if expected is None:
        log.warning("%s: no weights digest recorded (exported by an older rpg-dist); loading unverified", uri)
        data = io.read_bytes(uri, storage)
    else:
        data = io.read_verified(uri, expected, "retrain, or restore the file, to use this run", storage)
    try:
        return load_safetensors(data)
    except SafetensorError as err:  # a bad header or sizes (a file from elsewhere, or corrupt)
        raise StageError(f"{uri}: not a readable safetensors file ({err}); retrain, or restore the file") from None


def save_model(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    run_dir: str,
    storage: StorageConfig | None = None,
) -> None:
    """Export to ``RUN_DIR/model/`` (see ``save_weights``)."""
    save_weights(state_dict, metadata, RunPaths(run_dir).model, storage)


def read_model_metadata(run_dir: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """``config.json`` of the exported model.

    Raises:
        StageError: no (complete) exported model under ``run_dir``.
    """
    return read_versioned_json(RunPaths(run_dir).model_config, FORMAT_VERSION,
                               "no trained model; run `rpg-dist train` first", storage)


def load_model(run_dir: str, storage: StorageConfig | None = None, device: str | torch.device = "cpu") -> RPG:
    """The exported RPG in eval mode on ``device``, with item codes from the run's semantic IDs.

    Raises:
        StageError: the model or semantic IDs are missing, or the semantic IDs changed since training.
    """
    paths = RunPaths(run_dir)
    meta = read_model_metadata(run_dir, storage)
    semantic_ids = load_semantic_ids(paths.semantic_ids, storage)
    if semantic_ids_fingerprint(semantic_ids) != meta["tokenizer_fingerprint"]:
        raise StageError(
            f"{paths.semantic_ids}: semantic IDs differ from the ones {paths.model_config} was trained "
            "on (tokenizer_fingerprint mismatch); retrain with `rpg-dist train`"
        )
    cfg = configlib.build(ModelConfig, meta["model"])
    codes = torch.from_numpy(semantic_ids.codes)
    model = RPG(cfg, meta["n_digit"], meta["codebook_size"], codes)
    state = read_weights(paths.model, storage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StageError(f"{paths.model_weights}: missing tensors {missing}, unexpected {unexpected}")
    return model.to(device).eval()
