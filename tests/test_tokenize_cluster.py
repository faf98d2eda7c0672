"""Tokenize on a two-node Ray cluster (a head and a second raylet on 127.0.0.1, one CPU each):
the embedding and encoding shards must run on both nodes, as their manifests record."""

from __future__ import annotations

import numpy as np
import pytest

from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict
from rpg_dist.data import dataset
from rpg_dist.tokenizer import shards, stage
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

pytestmark = pytest.mark.slow


def test_shards_run_on_both_nodes(ray_two_nodes, synth_dataset, tmp_path):
    cfg = config_from_dict({
        "dataset": synth_dataset, "run_dir": str(tmp_path / "run"), "seed": 0,
        "ray": {"address": ray_two_nodes.gcs_address},
        # Two 0.5-CPU actors on two 1-CPU nodes: Ray Data spreads them, one per node.
        "tokenize": {"n_digit": 8, "shard_size": 40, "opq_niter": 2, "encoder_dtype": "auto",
                     "concurrency": 2, "num_cpus_per_actor": 0.5, "opq_num_cpus": 1.0},
    })
    stats = stage.tokenize(cfg)
    nodes = set(ray_two_nodes.alive_node_ids())
    assert len(nodes) == 2
    for kind in ("embed", "encode"):
        used = shards.shard_node_ids(cfg.run_dir, kind=kind)
        assert len(used) == stats["n_shards"]
        assert set(used) == nodes, f"{kind} shards ran on {set(used)}, cluster nodes {nodes}"
    sem = load_semantic_ids(RunPaths(cfg.run_dir).semantic_ids)
    items = dataset.read_items(synth_dataset, columns=["item_id"]).column("item_id").to_numpy()
    np.testing.assert_array_equal(sem.index.item_ids, np.sort(items))
