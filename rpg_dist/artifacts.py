"""Where each stage writes under ``run_dir``: one place, so stages and users agree on the layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rpg_dist import io
from rpg_dist.errors import StageError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig


@dataclass(frozen=True)
class RunPaths:
    """URIs of every artefact of a run; ``run_dir`` may be a local path or any fsspec URI."""

    run_dir: str

    def _at(self, *parts: str) -> str:
        return io.join(self.run_dir, *parts)

    # tokenize
    @property
    def embeddings(self) -> str:  # part-*.parquet: item_id int64, embedding fixed_size_list<float32>[D]
        return self._at("embeddings")

    @property
    def embedding_manifests(self) -> str:  # part-KEY.FINGERPRINT.json per committed shard (node id, ...)
        return self._at("embeddings", "_manifests")

    @property
    def tokenizer(self) -> str:
        return self._at("tokenizer")

    @property
    def codes(self) -> str:  # part-KEY.parquet: item_id int64, codes fixed_size_list<int16>[m]
        return self._at("tokenizer", "codes")

    @property
    def code_manifests(self) -> str:
        return self._at("tokenizer", "codes", "_manifests")

    @property
    def opq_meta(self) -> str:  # fingerprint and training facts of opq.faissindex
        return self._at("tokenizer", "opq.json")

    @property
    def semantic_ids(self) -> str:  # item_id int64, codes fixed_size_list<int16>[m]
        return self._at("tokenizer", "semantic_ids.parquet")

    @property
    def opq_index(self) -> str:
        return self._at("tokenizer", "opq.faissindex")

    @property
    def collaborative(self) -> str:  # safetensors: hybrid semantic IDs' collaborative vectors and text map
        return self._at("tokenizer", "collaborative.safetensors")

    @property
    def collaborative_meta(self) -> str:  # its commit marker: fingerprint, digest, weight, fit facts
        return self._at("tokenizer", "collaborative.json")

    @property
    def tokenizer_stats(self) -> str:
        return self._at("tokenizer", "stats.json")

    # train
    @property
    def windows(self) -> str:  # training windows, part-*.parquet
        return self._at("windows")

    @property
    def checkpoints(self) -> str:
        return self._at("checkpoints")

    @property
    def model(self) -> str:
        return self._at("model")

    @property
    def model_weights(self) -> str:  # safetensors; holds token_embeddings (m, codebook_size, d)
        return self._at("model", "model.safetensors")

    @property
    def model_config(self) -> str:
        return self._at("model", "config.json")

    @property
    def tensorboard(self) -> str:
        return self._at("tb")

    @property
    def plots(self) -> str:
        return self._at("plots")

    # graph
    @property
    def graph(self) -> str:  # part-*.parquet: item_id int64, neighbors list<int64>, partition int32
        return self._at("graph")

    @property
    def graph_manifest(self) -> str:
        return self._at("graph", "manifest.json")

    @property
    def graph_stats(self) -> str:
        return self._at("graph", "stats.json")

    # evaluate / pipeline
    @property
    def metrics(self) -> str:
        return self._at("metrics.json")

    def stage_manifest(self, stage: str) -> str:
        return self._at("stages", f"{stage}.json")


def read_versioned_json(uri: str, version: int, missing: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The JSON document at ``uri``, whose ``format_version`` must equal ``version``.

    Raises:
        StageError: the file is absent (the message ends with ``missing``, which says what to run)
            or was written by another format version.
    """
    if not io.exists(uri, storage):
        raise StageError(f"{uri}: {missing}")
    document = io.read_json(uri, storage)
    if document.get("format_version") != version:
        raise StageError(f"{uri}: format_version {document.get('format_version')!r} is not {version}")
    return document
