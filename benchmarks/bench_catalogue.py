"""Catalogue-change benchmark: the time to add (and withdraw) items in a trained run, in memory.

    python benchmarks/bench_catalogue.py --run /work/runs/beauty-snap92 --items 1000
    python benchmarks/bench_catalogue.py --run /work/runs/e2e1m/run --items 1000

New items are copies of random catalogue items under new ids: their text gets " (new)" (runs
tokenized from text) or their vector a little noise (runs tokenized from vectors), so they land
where real new items of this catalogue would. Reported: encoding (encoder + PCA + OPQ), inserting
into the graph (exact lists + reverse edges), withdrawing as many items, and how many existing
lists changed. Nothing is written to the run (the change log's write is one small parquet file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import PeakMemory, machine  # noqa: E402


def new_items(run_dir: str, n: int, encoder, seed: int):
    from rpg_dist.config import read_run_config
    from rpg_dist.data.dataset import read_items

    cfg = read_run_config(run_dir)
    column = "embedding" if encoder.needs_vectors else "text"
    items = read_items(cfg.dataset, cfg.storage, columns=["item_id", column])
    pick = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    ids = items.column("item_id").to_numpy().max() + 1 + np.arange(n)
    if encoder.needs_vectors:
        flat = items.column(column).take(pick).combine_chunks().flatten().to_numpy()
        vectors = flat.reshape(n, -1) + np.random.default_rng(seed).normal(0, 0.01, (n, flat.size // n))
        return ids, None, vectors.astype(np.float32)
    return ids, [t + " (new)" for t in items.column(column).take(pick).to_pylist()], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from rpg_dist import catalogue
    from rpg_dist.recommend import Recommender

    recommender = Recommender.load(args.run, start="history")
    encoder = catalogue.ItemEncoder(args.run)
    ids, texts, vectors = new_items(args.run, args.items, encoder, args.seed)
    result = {"machine": machine(), "run": args.run, "n_items": len(recommender.index), "added": args.items,
              "torch_threads": torch.get_num_threads()}
    with PeakMemory() as peak:
        clock = time.perf_counter()
        codes = encoder.codes(ids, texts, vectors)
        result["encode_s"] = time.perf_counter() - clock
        before = recommender.neighbors.clone()
        clock = time.perf_counter()
        recommender.add_items(ids, codes, texts or [str(i) for i in ids])
        result["insert_s"] = time.perf_counter() - clock
        old_rows = torch.from_numpy(recommender.index.rows(np.setdiff1d(recommender.index.item_ids, ids)))
        remap = torch.full((len(before),), -1, dtype=torch.int64)
        remap[torch.arange(len(before))] = old_rows
        moved = torch.where(before >= 0, remap[before.long().clamp(min=0)], -1)
        result["existing_lists_changed"] = int((recommender.neighbors[old_rows].long() != moved).any(dim=1).sum())
        withdraw = np.random.default_rng(args.seed + 1).choice(recommender.index.item_ids, args.items, replace=False)
        clock = time.perf_counter()
        recommender.withdraw(withdraw)
        result["withdraw_s"] = time.perf_counter() - clock
    result["peak_rss_gb"] = round(peak.peak / 2**30, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
