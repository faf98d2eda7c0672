"""Connecting to Ray: a local instance by default, or the cluster at ``ray.address``."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from rpg_dist.errors import ClusterError

if TYPE_CHECKING:
    from rpg_dist.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    # Workers import rpg_dist from this interpreter's environment; nothing else needs shipping.
    kwargs = {"namespace": cfg.namespace, "log_to_driver": True, "configure_logging": False}
    # Inside a Ray job (rpg-dist submit) RAY_ADDRESS names the cluster the job runs on.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            # A cluster decides its own authentication (cluster/ enables token auth): never override it.
            ray.init(address=address, **kwargs)
        else:
            # A local instance without a dashboard, reachable from this machine only: token auth
            # would only add a token file per run.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, **kwargs)
    except Exception as err:
        # ray.init raises bare Exception when a local node times out starting (an overloaded
        # machine), ValueError for a malformed address, ConnectionError for a refused one.
        where = f"join the Ray cluster at ray.address {address!r}" if address else "start a local Ray instance"
        raise ClusterError(f"ray: could not {where}: {err}") from None
    log.info("ray: %s, resources %s", address or "local", ray.cluster_resources())


def node_id() -> str:
    """The Ray node this process runs on ('' outside Ray)."""
    import ray

    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id()
