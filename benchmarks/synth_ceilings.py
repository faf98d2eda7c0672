"""What a `synth --like` catalogue lets a recommender reach: baselines built from the generator's own
structure, estimated on the training part of the sequences only, on the leave-one-out test targets.

    python benchmarks/synth_ceilings.py --dataset runs/like1m/dataset --users 20000

The generator walks users between mixture components (transitions counted on the real data) and
draws the item inside a component by a popularity that has nothing to do with the item's vector
(rpg_dist/data/realistic.py). So:

- ``popularity``: the 10 most frequent training items;
- ``components, uniform inside``: the next component by the counted transitions from the last
  item's, items of a component equally likely: the most a model can reach that knows only where an
  item lies (its codes), not how often it is chosen;
- ``components x popularity``: the same, items inside a component by their training frequency:
  roughly the generator's own next-item distribution, a ceiling for any model.

Each ranks the catalogue for a seeded sample of test users; Recall/NDCG@10 as `evaluate` computes them.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rpg_dist.data.dataset import read_sequences  # noqa: E402
from rpg_dist.data.splits import leave_one_out  # noqa: E402
from rpg_dist.evaluation.metrics import ranking_metrics  # noqa: E402

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    items = pq.read_table(os.path.join(args.dataset, "items"), columns=["item_id", "component"])
    ids, comp_of_id = items["item_id"].to_numpy(), items["component"].to_numpy().astype(np.int64)
    assert np.array_equal(np.sort(ids), np.arange(1, len(ids) + 1)), "expected item ids 1..N (row = id - 1)"
    n_items, n_comp = len(ids), int(comp_of_id.max()) + 1
    comp = np.empty(n_items, np.int64)
    comp[ids - 1] = comp_of_id
    split = leave_one_out(read_sequences(args.dataset), max_len=50)
    flat = split.train.flatten().to_numpy() - 1
    offsets = split.train.offsets.to_numpy() - split.train.offsets.to_numpy()[0]
    counts = np.bincount(flat, minlength=n_items).astype(np.float64)
    inner = np.ones(len(flat), bool)
    inner[offsets[:-1][np.diff(offsets) > 0]] = False  # a sequence's first item has no predecessor
    dst = np.flatnonzero(inner)
    src, nxt = comp[flat[dst - 1]], comp[flat[dst]]
    pairs, n_pairs = np.unique(src * n_comp + nxt, return_counts=True)  # component transitions, counted
    pair_src, pair_dst = pairs // n_comp, pairs % n_comp
    row_start = np.searchsorted(pair_src, np.arange(n_comp + 1))
    size = np.bincount(comp, minlength=n_comp).astype(np.float64)
    comp_counts = np.bincount(comp, weights=counts, minlength=n_comp)
    rng = np.random.default_rng(args.seed)
    # Inside each component: its K most frequent training items, and K items taken at random.
    by_count = np.lexsort((rng.random(n_items), -counts, comp))  # component, then count, ties at random
    by_chance = np.lexsort((rng.random(n_items), comp))
    first = np.searchsorted(comp[by_count], np.arange(n_comp + 1))
    pick = np.sort(rng.choice(len(split.test.targets), min(args.users, len(split.test.targets)), replace=False))
    histories = split.test.histories.take(pick)
    last = histories.flatten().to_numpy()[histories.offsets.to_numpy()[1:] - 1] - 1  # (U,) last item rows
    targets = split.test.targets[pick] - 1
    results = {"popularity": np.tile(np.argsort(-counts, kind="stable")[:K], (len(pick), 1))}
    uniform, popular = np.empty((len(pick), K), np.int64), np.empty((len(pick), K), np.int64)
    for u, item in enumerate(last):  # a baseline, not a serving path: one user at a time
        lo, hi = row_start[comp[item]], row_start[comp[item] + 1]
        nexts, chance = pair_dst[lo:hi], n_pairs[lo:hi] / n_pairs[lo:hi].sum()
        members = [np.arange(first[c], min(first[c] + K, first[c + 1])) for c in nexts]
        owner = np.repeat(np.arange(len(nexts)), [len(m) for m in members])
        members = np.concatenate(members) if members else np.empty(0, np.int64)
        for out, order, score in ((uniform, by_chance, chance[owner] / size[nexts[owner]]),
                                  (popular, by_count, chance[owner] * counts[by_count[members]]
                                   / np.maximum(comp_counts[nexts[owner]], 1))):
            rows = order[members][np.argsort(-score, kind="stable")][:K]
            out[u] = np.concatenate([rows, results["popularity"][0]])[:K]  # fewer than K: pad by popularity
    results["components, uniform inside"] = uniform
    results["components x popularity"] = popular
    for name, ranked in results.items():
        m = ranking_metrics(ranked, targets, [K])
        print(f"{name:28s} Recall@10 {m['recall@10']:.5f}  NDCG@10 {m['ndcg@10']:.5f}  ({len(pick)} test users)")


if __name__ == "__main__":
    main()
