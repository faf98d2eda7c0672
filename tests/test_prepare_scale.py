"""The interactions importer streams: its peak memory does not grow with the number of interactions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg_dist.data import dataset
from rpg_dist.data.config import InteractionsColumns
from rpg_dist.data.interactions import import_interactions

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter; the peak is VmHWM, which starts afresh at exec (ru_maxrss would
# still hold the forked parent's size).
IMPORT_SCRIPT = """
import json, sys
from rpg_dist.data.config import InteractionsColumns
from rpg_dist.data.interactions import import_interactions
events, items, out, per_part = sys.argv[1:5]
info = import_interactions(events, items, InteractionsColumns(text=["title"]), out, rows_per_partition=int(per_part))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mb": int(hwm.split()[1]) / 1024, "n": info.n_interactions}))
"""


def _write_inputs(folder, n_rows: int, n_users: int, n_items: int = 5000, seed: int = 0) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    events = pa.table({"user_id": rng.integers(0, n_users, n_rows), "item_id": rng.integers(0, n_items, n_rows),
                       "timestamp": rng.integers(0, 10**9, n_rows)})
    items = pa.table({"item_id": np.arange(n_items), "title": [f"item {i}" for i in range(n_items)]})
    pq.write_table(events, folder / "events.parquet", row_group_size=1 << 20)
    pq.write_table(items, folder / "items.parquet")
    return str(folder / "events.parquet"), str(folder / "items.parquet")


def _peak_mb(tmp_path, n_rows: int) -> float:
    folder = tmp_path / f"n{n_rows}"
    folder.mkdir()
    events, items = _write_inputs(folder, n_rows, n_users=20_000)
    out = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT, events, items, str(folder / "ds"), str(250_000)],
                         capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == n_rows
    return result["peak_mb"]


def test_peak_memory_does_not_grow_with_interactions(tmp_path):
    """4x the interactions (1M -> 4M rows, +72 MB of raw columns; materialising them with their sort
    keys costs several times that) leave the streaming importer's peak within 60 MB."""
    small, large = _peak_mb(tmp_path, 1_000_000), _peak_mb(tmp_path, 4_000_000)
    assert large - small < 60, (small, large)


def test_spilled_partitions_give_the_same_dataset_as_one(tmp_path):
    """Several spill files (users hashed apart) give the same sequences as one file: order within a user
    by (timestamp, input row), ties included; string user ids dense in order of first appearance."""
    rng = np.random.default_rng(1)
    n = 5000
    users = np.array([f"user-{u}" for u in rng.integers(0, 300, n)])
    events = pa.table({"u": users, "i": rng.integers(0, 50, n), "t": rng.integers(0, 20, n)})  # many time ties
    items = pa.table({"i": np.arange(50), "title": [f"t{i}" for i in range(50)]})
    pq.write_table(events, tmp_path / "e.parquet")
    pq.write_table(items, tmp_path / "it.parquet")
    cols = InteractionsColumns(user="u", item="i", timestamp="t", item_id="i", text=["title"])
    out = {}
    for parts, rows in (("one", 10**9), ("many", 700)):
        uri = str(tmp_path / parts)
        import_interactions(str(tmp_path / "e.parquet"), str(tmp_path / "it.parquet"), cols, uri, rows_per_partition=rows)
        table = dataset.read_sequences(uri)
        out[parts] = {uid: seq for uid, seq in zip(table.column("user_id").to_pylist(), table.column("item_ids").to_pylist())}
    assert out["one"] == out["many"]
    # The twin: per user, rows sorted by (t, input row); users numbered by first appearance.
    first = {}
    for row, u in enumerate(users.tolist()):
        first.setdefault(u, len(first) + 1)
    expected = {}
    for row in sorted(range(n), key=lambda r: (int(events["t"][r].as_py()), r)):
        expected.setdefault(first[users[row]], []).append(int(events["i"][row].as_py()))
    assert out["many"] == expected
