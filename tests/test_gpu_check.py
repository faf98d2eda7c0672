"""benchmarks/gpu_figures.py (what benchmarks/gpu_check.sh runs on a GPU machine) on the CPU, small:
every figure it prints comes out, training included, so the prepared GPU check is known to work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_gpu_figures_run_on_cpu(beauty_raw, tmp_path):
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_figures.py"), "--device", "cpu", "--quick",
                           "--beauty", str(beauty_raw), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = [json.loads(line) for line in out.read_text().splitlines()]
    names = [f["figure"] for f in figures]
    assert names == ["device", "full_ranking", "graph_decoding", "training", "faiss_gpu"]
    training = figures[3]
    assert "error" not in training, training.get("error")
    assert training["steps"] == 3 and training["seq_per_s"] > 0
    assert all(f["queries_per_s"] > 0 for f in figures[1:3])
