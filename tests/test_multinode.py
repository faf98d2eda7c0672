"""The pipeline on a two-node Ray cluster (two raylets on 127.0.0.1) and Ray job submission to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch.submit import submit
from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict
from rpg_dist.pipeline import run_pipeline
from rpg_dist.tokenizer.shards import shard_node_ids

from helpers import tiny_config

pytestmark = pytest.mark.slow


def cluster_config(root: Path, address: str) -> dict:
    """Resource requests that cannot fit twice on one 1-CPU node, so work must spread over both."""
    return tiny_config(
        str(root / "dataset"), str(root / "run"),
        ray={"address": address},
        tokenize={"concurrency": 2, "num_cpus_per_actor": 0.6},
        train={"launcher": "ray", "num_workers": 2, "cpus_per_worker": 0.6, "epochs": 1},
    )


def test_pipeline_on_two_nodes_and_job_submission(ray_two_nodes, tmp_path):
    cluster = ray_two_nodes
    nodes = set(cluster.alive_node_ids())
    assert len(nodes) == 2
    data = cluster_config(tmp_path, cluster.gcs_address)
    cfg = config_from_dict(data)
    metrics = run_pipeline(cfg)
    assert metrics["test"]["n_visited_items"] > 0
    # Embedding and encoding shards ran on both nodes (recorded in their shard manifests)...
    assert set(shard_node_ids(cfg.run_dir, kind="embed")) == nodes
    assert set(shard_node_ids(cfg.run_dir, kind="encode")) == nodes
    # ... and so did the two training workers (recorded in the training summary).
    train = io.read_json(RunPaths(cfg.run_dir).stage_manifest("train"))["result"]
    assert set(train["worker_node_ids"]) == nodes

    # A job submitted through the dashboard re-runs the evaluation on the cluster.
    io.remove(RunPaths(cfg.run_dir).metrics)
    io.remove(RunPaths(cfg.run_dir).stage_manifest("evaluate"))
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump({**data, "ray": {"address": None}}))  # the job joins via RAY_ADDRESS
    assert submit(cluster.dashboard_url, str(config_path), [], command="run", wait=True) == 0
    rerun = io.read_json(RunPaths(cfg.run_dir).metrics)
    assert rerun["test"]["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"])

    # A job that fails (no dataset, nothing to build it from) makes `submit --wait` return 1.
    failing = tiny_config(str(tmp_path / "missing-dataset"), str(tmp_path / "run2"))
    failing["prepare"] = None
    config_path.write_text(yaml.safe_dump(failing))
    assert submit(cluster.dashboard_url, str(config_path), [], command="run", wait=True) == 1
