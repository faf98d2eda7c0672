"""Config of the online service (``rpg-dist serve``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from rpg_dist.errors import ConfigError

# The environment variable holding the bearer token clients must send (never a flag: flags land in
# shell history and process listings). The deployment receives only the token's sha256.
TOKEN_ENV = "RPG_DIST_SERVE_TOKEN"


@dataclass(kw_only=True)
class ServeConfig:
    # HTTP address of Ray Serve's proxy; loopback unless configured.
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    # Ray CPUs per replica; torch uses that many threads (at least one).
    num_cpus_per_replica: float = 1.0
    # Concurrent requests are merged into one decoder call of at most this many requests...
    max_batch_size: int = 64
    # ...waiting at most this long for the batch to fill once its first request arrived.
    batch_wait_timeout_s: float = 0.002
    # Requests a replica holds at once (queued for the batcher included).
    max_ongoing_requests: int = 256
    # Request limits: bytes of JSON body, histories per request, item ids per history (only the
    # last model.max_seq_len are used), and the largest k.
    max_body_bytes: int = 1 << 20
    max_histories: int = 256
    max_history_len: int = 10_000
    max_k: int = 1000
    # Items per POST /items.
    max_new_items: int = 10_000
    # A replica looks for catalogue changes committed by others (catalogue.py) before a batch, at
    # most this often; 0: before every batch.
    catalogue_poll_s: float = 1.0
    # Beam starts for graph decoding: the user's history and its graph neighbours by default (one
    # answer per history, whatever the batch it lands in); "run" keeps the run's decode.start.
    start: Literal["run", "random", "popular", "history"] = "history"
    # Graph decoding or full ranking (decode.method: auto picks full ranking up to
    # decode.full_ranking_max_items, where it is faster and exact); "run" keeps the run's. A sharded
    # graph (below) is always served by graph decoding.
    method: Literal["run", "auto", "graph", "full"] = "run"
    # Where the graph lives. memory: every replica holds the whole (N, n_edges) lists. sharded: one
    # GraphShard deployment per graph partition holds that partition's lists and codes, and the
    # replicas decode through them (rpg_dist/decode/sharded.py), holding (N,) partition owners and
    # the model only: for catalogues beyond one replica's memory. A sharded service serves the built
    # graph as it is: catalogue changes (POST /items, DELETE /items/{id}) are refused with 409.
    graph: Literal["memory", "sharded"] = "memory"
    # Ray CPUs per graph shard (graph=sharded).
    num_cpus_per_shard: float = 0.5
    # Only with host bound beyond loopback and no RPG_DIST_SERVE_TOKEN: serve without auth anyway.
    allow_unauthenticated: bool = False

    def __post_init__(self) -> None:
        for name in ("replicas", "max_batch_size", "max_ongoing_requests", "max_body_bytes",
                     "max_histories", "max_history_len", "max_k", "max_new_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port (1..65535)")
        for name in ("num_cpus_per_replica", "num_cpus_per_shard"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError("batch_wait_timeout_s: must be >= 0")
        if self.catalogue_poll_s < 0:
            raise ConfigError("catalogue_poll_s: must be >= 0")

    def is_loopback(self) -> bool:
        """True when only this machine can reach ``host``."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
