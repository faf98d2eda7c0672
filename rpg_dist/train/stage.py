"""``rpg-dist train``: prepare the windows, then run the train loop under the configured launcher.

    rpg-dist train --config configs/beauty.yaml                          # Ray Train (default)
    rpg-dist train --config C --set train.launcher=local                 # one process, no Ray
    torchrun --nproc_per_node 2 -m rpg_dist.train.torchrun_main --config C   # torchrun
"""

from __future__ import annotations

import logging
from typing import Any

from rpg_dist.artifacts import RunPaths
from rpg_dist.config import Config, with_absolute_paths
from rpg_dist.model.export import semantic_ids_fingerprint
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids, require_semantic_ids
from rpg_dist.train import windows

log = logging.getLogger(__name__)


def prepare(cfg: Config) -> dict[str, Any]:
    """Build (or reuse) the training windows and validation examples for this run."""
    paths = RunPaths(cfg.run_dir)
    semantic_ids = load_semantic_ids(paths.semantic_ids, cfg.storage)
    return windows.prepare_windows(
        paths.windows, cfg.dataset, semantic_ids.index, cfg.model.max_seq_len, cfg.seed,
        semantic_ids_fingerprint(semantic_ids), paths.semantic_ids, cfg.storage, val_users=cfg.train.val_users,
    )


def train(cfg: Config) -> dict[str, Any]:
    """Train RPG and export the best model to ``RUN_DIR/model``.

    Returns:
        Summary: epochs_run, steps, best_epoch, best_val_ndcg@10, wall_time_s, seq_per_s, ...
    """
    # Before Ray, DeepSpeed or a process group start (~15 s of imports): a missing input is an error now.
    require_semantic_ids(RunPaths(cfg.run_dir).semantic_ids, cfg.storage)
    if cfg.train.launcher == "ray":
        from rpg_dist.train.ray_launcher import run_ray

        cfg = with_absolute_paths(cfg)
        prepare(cfg)  # on the driver, before any worker starts
        return run_ray(cfg)
    return run_in_process(cfg)


def run_in_process(cfg: Config) -> dict[str, Any]:
    """The "local" and "torchrun" launchers: this process is one rank of the job."""
    import torch.distributed as dist

    from rpg_dist.train.loop import train_loop
    from rpg_dist.train.runtime import env_runtime

    runtime = env_runtime(cfg.train.launcher, cfg.train.use_gpu)
    if runtime.is_main:
        prepare(cfg)
    if runtime.world_size > 1:
        dist.barrier()
    return train_loop(runtime, cfg)
