"""The fault matrix: `rpg-dist run` killed (SIGKILL) inside every stage, then run again.

Each kill happens at an armed crash point (rpg_dist/failpoints.py), in the driver process of the
CLI, so nothing races a timer. After the last rerun the run must hold exactly what an uninterrupted
run of the same config holds (the shared ``tiny_run``): the same dataset bytes, every item's
semantic ID once and the same, the same number of training steps and the same weights (each window
trained exactly once per epoch: a repeated or lost batch moves the weights), the same graph and the
same metrics. README's "Faults" table lists these rows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from rpg_dist import failpoints, io
from rpg_dist.artifacts import RunPaths
from rpg_dist.data.dataset import read_info

from helpers import tiny_config

RPG = str(Path(sys.executable).parent / "rpg-dist")

# (stage killed, crash point in the CLI's own process, what the next run's log shows of the resume)
MATRIX = [
    ("prepare", "dataset-parts-moved", r"\] prepare: building .* from synth input"),
    ("tokenize", "shard-collected", r"embed: 4 shards, [1-4] committed, [0-3] to run"),
    ("train", "checkpoint-committed-rank0", r"resumed from .*checkpoints.* \(step \d+, epoch 1\)"),
    ("build-graph", "graph-part-written", r"\] build-graph: running"),
    ("evaluate", "split-evaluated", r"\] evaluate: running"),
]
STAGES = [stage for stage, _, _ in MATRIX]


def _run(config: str) -> tuple[subprocess.CompletedProcess, int]:
    """``rpg-dist run`` to its end or its death: (the completed process, its pid)."""
    # Its own session: what it started (a local Ray) goes with it when the group is killed below.
    proc = subprocess.Popen([RPG, "run", "--config", config], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a killed driver (none expected)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _complete(run_dir: str) -> list[str]:
    """The stages after prepare whose completion record exists (prepare's is dataset.json)."""
    return [s for s in STAGES[1:] if os.path.exists(RunPaths(run_dir).stage_manifest(s))]


@pytest.mark.slow
def test_kill_9_in_every_stage_then_rerun_gives_the_uninterrupted_runs_artefacts(tiny_run, tmp_path):
    reference_config, reference_dir, _ = tiny_run
    dataset, run_dir = str(tmp_path / "dataset"), str(tmp_path / "run")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(dataset, run_dir)))
    resumed = []  # the log of each run after a kill
    for position, (stage, point, _) in enumerate(MATRIX):
        failpoints.arm(point)
        out, pid = _run(str(config))
        assert out.returncode == -signal.SIGKILL, f"{stage}: exit {out.returncode}\n{out.stderr[-3000:]}"
        assert failpoints.fired(point) == [pid], f"{stage}: the CLI's own process died at {point}"
        assert _complete(run_dir) == STAGES[1:position], stage
        if stage == "prepare":  # parts in place, no dataset.json: not a dataset yet
            assert not io.exists(io.join(dataset, "dataset.json"))
        resumed.append(out.stderr)
    out, _ = _run(str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = resumed[1:] + [out.stderr]
    for (stage, _, shows), log in zip(MATRIX, resumed):
        assert re.search(shows, log), f"after the kill in {stage}, expected /{shows}/ in:\n{log[-3000:]}"
    assert all(f"] {stage}: complete, skipped" in out.stderr for stage in STAGES[1:-1])
    _assert_same_run(run_dir, reference_dir, dataset, yaml.safe_load(Path(reference_config).read_text())["dataset"])


def _assert_same_run(run_dir: str, reference_dir: str, dataset: str, reference_dataset: str) -> None:
    assert read_info(dataset).content_sha256 == read_info(reference_dataset).content_sha256
    ours, theirs = RunPaths(run_dir), RunPaths(reference_dir)
    ids = io.read_parquet(ours.semantic_ids)
    assert ids.equals(io.read_parquet(theirs.semantic_ids))
    assert len(np.unique(ids.column("item_id").to_numpy())) == len(ids) == read_info(dataset).n_items
    summary = io.read_json(ours.model_config)["training"]
    assert summary["steps"] == io.read_json(theirs.model_config)["training"]["steps"]
    weights, reference = load_file(ours.model_weights), load_file(theirs.model_weights)
    assert weights.keys() == reference.keys()
    for name in weights:
        np.testing.assert_allclose(weights[name], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    graph = io.read_parquet(ours.graph).sort_by("item_id")
    assert graph.equals(io.read_parquet(theirs.graph).sort_by("item_id"))
    metrics, expected = io.read_json(ours.metrics), io.read_json(theirs.metrics)
    for split in ("val", "test", "test_full_ranking"):
        for name in {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "n_visited_items"} & set(expected[split]):
            assert metrics[split][name] == pytest.approx(expected[split][name], abs=1e-9), (split, name)
