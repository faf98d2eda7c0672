"""The synthetic catalogue is deterministic, valid and learnable (history predicts the next item)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from rpg_dist.data import importers, synth
from rpg_dist.data.dataset import read_info
from rpg_dist.data.splits import leave_one_out
from rpg_dist.evaluation.metrics import ranking_metrics


def test_deterministic_and_valid(tmp_path):
    a = synth.generate(n_items=500, n_users=300, seed=3)
    b = synth.generate(n_items=500, n_users=300, seed=3)
    c = synth.generate(n_items=500, n_users=300, seed=4)
    assert a.items.equals(b.items) and a.sequences.equals(b.sequences)
    assert not a.sequences.equals(c.sequences)
    info = importers.write(a, str(tmp_path / "ds"), source="synth")
    assert (info.n_items, info.n_users) == (500, 300)
    assert info.n_interactions >= 5 * 300  # every user has at least 5 items, like a 5-core dataset
    assert read_info(str(tmp_path / "ds")) == info
    text = a.items.column("text")[0].as_py()
    assert text.endswith(".") and a.items.column("category")[0].as_py() in text


def test_history_predicts_the_next_item():
    """A first-order transition model beats popularity by a wide margin on the held-out items."""
    n = 3000
    raw = synth.generate(n_items=n, n_users=n, seed=0)
    split = leave_one_out(raw.sequences, 50)
    flat = split.train.flatten().to_numpy() - 1
    offsets = split.train.offsets.to_numpy()
    same_user = np.ones(len(flat) - 1, bool)
    same_user[offsets[1:-1] - 1] = False  # no transition across user boundaries
    counts = sp.coo_matrix(
        (np.ones(same_user.sum()), (flat[:-1][same_user], flat[1:][same_user])), shape=(n, n)
    ).tocsr()
    popularity = np.bincount(flat, minlength=n).astype(float)
    last = np.array([h[-1] for h in split.test.histories.to_pylist()]) - 1
    scores = counts[last].toarray() + 1e-3 * popularity / popularity.max()
    transition = ranking_metrics(np.argsort(-scores, axis=1)[:, :10], split.test.targets - 1, [10])
    popular = ranking_metrics(np.tile(np.argsort(-popularity)[:10], (len(last), 1)), split.test.targets - 1, [10])
    assert transition["ndcg@10"] > 2 * popular["ndcg@10"] > 0
