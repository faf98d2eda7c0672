"""Launcher "ray": the train loop on Ray Train workers (TorchTrainer, DeepSpeed inside each worker).

The driver prepares the windows, then starts ``num_workers`` workers with
``resources_per_worker={"CPU": cpus_per_worker}``; each reads its share of every epoch from the
run's windows (windows.EpochBatches), as under torchrun, so all launchers train on the same
batches. Fault tolerance: with ``FailureConfig(max_failures)``, Ray Train restarts the worker group
when a worker dies, and the loop resumes from the newest complete checkpoint under
``RUN_DIR/checkpoints`` (the same resume path as re-running ``rpg-dist train``). Ray's own storage only holds its run bookkeeping.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

from rpg_dist import configlib, io
from rpg_dist.config import Config, config_from_dict, public_config
from rpg_dist.errors import StageError
from rpg_dist.raycluster import init_ray

log = logging.getLogger(__name__)


def run_ray(cfg: Config) -> dict[str, Any]:
    """Run the train loop on a Ray Train worker group over prepared windows (``stage.prepare``);
    returns rank 0's summary."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rpg_dist.model.export import read_model_metadata

    tc = cfg.train
    init_ray(cfg.ray)
    _check_resources(cfg, ray.cluster_resources())
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=loop_config(cfg),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"rpg-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=_ray_storage(cfg.run_dir),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    result = _fit(trainer)
    if result.error is not None:
        raise StageError(f"training failed after {tc.max_failures} restart(s): {result.error}") from result.error
    return read_model_metadata(cfg.run_dir, cfg.storage)["training"]


def _fit(trainer) -> Any:
    """``trainer.fit()`` on a helper thread, so that Ctrl-C reaches the CLI as KeyboardInterrupt.

    Called from the main thread, Ray Train installs its own SIGINT handler, which aborts the run and
    leaves the process to exit 1 with no message. Ray Train skips that handler off the main thread;
    here the main thread waits, and on Ctrl-C disconnects from Ray, which ends the controller and the
    workers this driver owns, then re-raises for the CLI's exit 130. Checkpoints are committed
    atomically, so the next ``rpg-dist train`` resumes from the newest complete one.
    """
    import threading

    import ray

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        log.warning("interrupted: stopping the training workers; `rpg-dist train` resumes from the newest "
                    "complete checkpoint")
        ray.shutdown()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def loop_config(cfg: Config) -> dict[str, Any]:
    """What Ray Train hands each worker, and records: the config without credentials, and the storage
    section (with them) as an object-store reference, which is all that gets recorded of it."""
    import ray

    return {"config": configlib.to_dict(public_config(cfg)), "storage": ray.put(cfg.storage)}


def _worker(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    from rpg_dist.train.loop import train_loop
    from rpg_dist.train.runtime import ray_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import dataclasses

    import ray

    cfg = config_from_dict(loop_config["config"], "<ray worker>")
    cfg = dataclasses.replace(cfg, storage=ray.get(loop_config["storage"]))
    train_loop(ray_runtime(cfg.train.use_gpu), cfg)


def _check_resources(cfg: Config, cluster: dict[str, float]) -> None:
    """Fail fast where the request could never be scheduled (Ray would wait forever, STACK-NOTES)."""
    tc = cfg.train
    need = tc.num_workers * tc.cpus_per_worker
    if cluster.get("CPU", 0.0) < need:
        raise StageError(
            f"train.cpus_per_worker: {tc.num_workers} workers x {tc.cpus_per_worker} CPU "
            f"need {need} CPUs, but the Ray cluster has "
            f"{cluster.get('CPU', 0.0)}; lower train.cpus_per_worker (fractions are fine) or raise ray.num_cpus"
        )
    if tc.use_gpu and cluster.get("GPU", 0.0) < tc.num_workers:
        raise StageError(f"train.num_workers: {tc.num_workers} GPU workers, cluster has {cluster.get('GPU', 0.0)} GPUs")


def _ray_storage(run_dir: str) -> str:
    """Ray Train's bookkeeping folder: inside a local run_dir, else a local temporary folder."""
    if io.is_local(run_dir):
        return os.path.abspath(io.join(io.filesystem(run_dir)[1], "ray"))
    return os.path.join(tempfile.gettempdir(), "rpg-dist-ray")
