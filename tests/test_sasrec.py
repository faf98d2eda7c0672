"""benchmarks/sasrec.py, the SASRec baseline: its inputs follow the leave-one-out protocol (a loop
twin written from the protocol), and a short run through its command line ranks far above chance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import sasrec  # noqa: E402

from rpg_dist.data.items import ItemIndex  # noqa: E402


def test_training_pairs_and_histories_follow_the_protocol():
    rng = np.random.default_rng(3)
    ids = np.arange(100, 160)
    index = ItemIndex(ids)
    sequences = [rng.choice(ids, size=n).tolist() for n in rng.integers(1, 12, 40)]
    train = pa.array(sequences, pa.list_(pa.int64())).slice(3, 30)  # an offset slice, as splits return
    max_len = 5
    inputs, targets = sasrec.training_pairs(train, index, max_len)
    expected = [s[-(max_len + 1):] for s in sequences[3:33] if len(s) >= 2]
    assert len(inputs) == len(expected)
    for got_in, got_out, seq in zip(inputs.tolist(), targets.tolist(), expected):
        rows = [i - 100 + 1 for i in seq]  # ids 100.. are rows 0..; 0 is padding
        width = len(got_in)
        assert got_in == rows[:-1] + [0] * (width - len(rows) + 1)  # every item but the last is an input
        assert got_out == rows[1:] + [0] * (width - len(rows) + 1)  # each input predicts the next
    histories, lengths = sasrec.as_rows(train, index, max_len)
    for got, n, seq in zip(histories.tolist(), lengths.tolist(), sequences[3:33]):
        assert n == min(len(seq), max_len) and got[:n] == [i - 99 for i in seq[-max_len:]] and not any(got[n:])


def test_a_short_run_ranks_far_above_chance(synth_dataset, tmp_path):
    out = tmp_path / "sasrec.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sasrec.py"), "--dataset", synth_dataset,
                           "--epochs", "6", "--d", "32", "--dropout", "0.2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert 1 <= result["best_epoch"] <= result["epochs_run"] <= 6
    # 600 items: a random ranking gets NDCG@10 ~ 0.009.
    assert result["test"]["ndcg@10"] > 0.05, result["test"]


def test_length_batches_cover_each_row_once_and_cutting_padding_changes_no_loss():
    import torch

    rng = np.random.default_rng(5)
    ids = np.arange(1, 41)
    index = ItemIndex(ids)
    train = pa.array([rng.choice(ids, size=n).tolist() for n in rng.integers(2, 14, 300)], pa.list_(pa.int64()))
    inputs, targets = sasrec.training_pairs(train, index, 12)
    lengths = (inputs > 0).sum(1).numpy()
    batches = sasrec.length_batches(lengths, 16, torch.Generator().manual_seed(0), pool=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(inputs)))
    # Pools sort by length: batches are far narrower than the widest row.
    assert np.mean([lengths[b].max() - lengths[b].min() for b in batches]) < 0.5 * (lengths.max() - lengths.min())
    model = sasrec.SASRec(40, 16, 2, 1, 12, 0.0).eval()
    generator = torch.Generator().manual_seed(0)
    narrow = [b for b in batches if lengths[b].max() < inputs.shape[1]]
    assert len(narrow) >= 5
    for rows in narrow[:5]:
        width = int(lengths[rows].max())
        rows = torch.from_numpy(rows)
        full = sasrec.loss_of(model, inputs[rows], targets[rows], "ce", 40, generator)
        cut = sasrec.loss_of(model, inputs[rows, :width], targets[rows, :width], "ce", 40, generator)
        torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)
