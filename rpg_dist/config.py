"""The config tree of a run: one YAML fills every stage's own dataclass.

    cfg = load_config("configs/beauty.yaml", ["train.lr=0.001", "run_dir=s3://bucket/run"])

Sections: ``dataset``, ``run_dir``, ``seed``, ``storage``, ``ray``, ``prepare`` (optional),
``tokenize``, ``model``, ``train``, ``graph``, ``decode``, ``eval``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from rpg_dist import configlib
from rpg_dist.data.config import PrepareConfig
from rpg_dist.decode.config import DecodeConfig
from rpg_dist.errors import ConfigError
from rpg_dist.evaluation.config import EvalConfig
from rpg_dist.graph.config import GraphConfig
from rpg_dist.model.config import ModelConfig
from rpg_dist.tokenizer.config import TokenizeConfig
from rpg_dist.train.config import TrainConfig


@dataclass(kw_only=True)
class StorageConfig:
    """fsspec storage options shared by every stage (and shipped to Ray workers)."""

    # S3-compatible endpoint (MinIO, moto, R2...). None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
    # else the provider default.
    endpoint_url: str | None = None
    region: str | None = None
    # Credentials; None lets the provider chain (environment, profile, instance role) decide.
    key: str | None = None
    secret: str | None = None
    anon: bool = False
    # Extra fsspec options for remote filesystems, merged last (e.g. {"token": ...} for gs://).
    options: dict[str, Any] = field(default_factory=dict)
    # Attempts for transient I/O errors (throttling, resets) before giving up.
    retries: int = 3

    def __post_init__(self) -> None:
        if self.retries < 1:
            raise ConfigError("retries: must be >= 1")

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )


@dataclass(kw_only=True)
class RayConfig:
    # None: start a local Ray instance; otherwise "auto", "HOST:PORT" or "ray://HOST:10001".
    address: str | None = None
    # Logical CPUs of a local instance (None: the machine's cores).
    num_cpus: int | None = None
    namespace: str = "rpg-dist"

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus: {self.num_cpus} must be >= 1 or null (the machine's cores)")


@dataclass(kw_only=True)
class Config:
    # Dataset folder URI (local path, file://, s3://, gs://, memory://).
    dataset: str
    # Where every stage writes its artefacts (local path or fsspec URI).
    run_dir: str
    seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # When set, `rpg-dist run` builds `dataset` from these raw inputs if it does not exist yet.
    prepare: PrepareConfig | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.decode.num_beams < max(self.eval.ks):
            raise ConfigError(
                f"decode.num_beams: {self.decode.num_beams} is smaller than the largest "
                f"eval.ks ({max(self.eval.ks)}); graph decoding returns num_beams items"
            )


def load_config(source: str, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (local path or fsspec URI) and apply ``--set`` overrides.

    Raises:
        ConfigError: the file is missing or invalid, a key is unknown, or a rule fails.
    """
    from rpg_dist import io

    try:
        text = io.read_text(source)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    data = configlib.load_yaml_text(text, source)
    data = configlib.apply_overrides(Config, data, overrides or [])
    return config_from_dict(data, source)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return configlib.build(Config, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


RUN_CONFIG = "config.yaml"
# Settings older runs recorded that no longer exist: a run config holding them still loads.
RETIRED_SETTINGS = {("train", "shuffle_buffer")}


# fsspec storage options that carry credentials (s3fs, gcsfs, adlfs names), matched case-insensitively.
SECRET_OPTIONS = ("key", "secret", "token", "password", "session_token", "client_secret", "account_key",
                  "sas_token", "credentials", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")


def public_config(cfg: Config) -> Config:
    """``cfg`` without credentials: what every config that is written, shipped or recorded holds.

    storage.key and storage.secret become None and credential-like storage.options (any key named in
    ``SECRET_OPTIONS``, also nested) are dropped; whoever loads the config supplies their own.
    """
    options = _without_secrets(cfg.storage.options)
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, key=None, secret=None, options=options))


def has_secrets(cfg: Config) -> bool:
    return public_config(cfg).storage != cfg.storage


def _without_secrets(options: Any) -> Any:
    if isinstance(options, dict):
        return {k: _without_secrets(v) for k, v in options.items() if str(k).lower() not in SECRET_OPTIONS}
    if isinstance(options, list):
        return [_without_secrets(v) for v in options]
    return options


def save_run_config(cfg: Config) -> None:
    """Record the resolved config in ``RUN_DIR/config.yaml`` (what serving and ``synth --like`` read),
    without credentials (``public_config``)."""
    from rpg_dist import io

    io.write_text(io.join(cfg.run_dir, RUN_CONFIG), configlib.to_yaml(public_config(cfg)), cfg.storage)


def read_run_config(run_dir: str, storage: StorageConfig | None = None) -> Config:
    """The config a run was made with (``RUN_DIR/config.yaml``).

    Raises:
        StageError: ``run_dir`` has no config.yaml.
    """
    from rpg_dist import io
    from rpg_dist.errors import StageError

    uri = io.join(run_dir, RUN_CONFIG)
    if not io.exists(uri, storage):
        raise StageError(f"{run_dir}: no config.yaml; is this a run directory (`rpg-dist run`)?")
    data = configlib.load_yaml_text(io.read_text(uri, storage), uri)
    for section, key in RETIRED_SETTINGS:
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    return config_from_dict(data, uri)


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its local relative paths (dataset, run_dir, prepare inputs) made absolute.

    Ray workers do not share the caller's working directory (Ray Train starts each worker in a
    folder of its own), so a path such as ``runs/demo`` is pinned to where the user typed it before
    any worker sees it. URIs with a protocol and absolute paths are left as they are.
    """

    def pin(uri: str) -> str:
        return os.path.abspath(uri) if uri and "://" not in uri and not os.path.isabs(uri) else uri

    prepare = cfg.prepare and dataclasses.replace(cfg.prepare, input=pin(cfg.prepare.input), items=pin(cfg.prepare.items))
    return dataclasses.replace(cfg, dataset=pin(cfg.dataset), run_dir=pin(cfg.run_dir), prepare=prepare)
