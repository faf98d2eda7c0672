"""Graph-decoded NDCG@10 against the fraction of the catalogue visited, beside full ranking.

    python benchmarks/decode_sweep.py --run RUN_DIR --dataset DATASET [--users 20000] --json out.json

For a trained run: the exact graph and the approximate (token-block) graph are built in-process from
the run's token table (or the run's own graph is loaded: --graphs run); the test split's
log-probabilities are computed once; then every combination of graph x start (random: the paper; history: the user's items and their neighbours) x beams b x
steps q is decoded. Prints NDCG@10, Recall@10, the mean fraction of items visited and queries/s, and
full ranking's NDCG@10 and queries/s on the same users.
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

from common import machine  # noqa: E402

from rpg_dist.data.dataset import read_sequences  # noqa: E402
from rpg_dist.data.splits import leave_one_out  # noqa: E402
from rpg_dist.decode.graph_decode import GraphDecoder, history_start_items, popular_start_items, random_start_items  # noqa: E402
from rpg_dist.decode.scoring import full_ranking_topk  # noqa: E402
from rpg_dist.evaluation.metrics import ranking_metrics  # noqa: E402
from rpg_dist.evaluation.stage import popularity, sample_examples, to_queries  # noqa: E402
from rpg_dist.graph.builder import build_item_graph  # noqa: E402
from rpg_dist.graph.config import GraphConfig  # noqa: E402
from rpg_dist.model.export import load_model  # noqa: E402
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids  # noqa: E402
from rpg_dist.artifacts import RunPaths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--users", type=int, default=0, help="test users sampled (0: all)")
    parser.add_argument("--n-edges", type=int, default=200)
    parser.add_argument("--beams", default="5,10,20")
    parser.add_argument("--steps", default="1,2,3")
    parser.add_argument("--approx-groups", type=int, default=0, help="token groups of the approximate graph (0: auto)")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--graphs", default="exact,approx",
                        help="graphs to decode with: exact, approx (built here) and/or run (the run's own)")
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model = load_model(args.run)
    codes = model.item_codes.cpu()
    index = load_semantic_ids(RunPaths(args.run).semantic_ids).index
    table = model.token_embeddings.detach()
    graphs, out = {}, {"machine": machine(), "run": args.run, "n_items": int(codes.shape[0]), "graphs": {}, "rows": []}
    if "run" in args.graphs.split(","):
        from rpg_dist.graph.store import load_graph, read_manifest

        graphs["run"] = torch.from_numpy(load_graph(args.run, index).neighbors)
        manifest = read_manifest(args.run)
        out["graphs"]["run"] = {k: manifest.get(k) for k in ("mode", "approx_method", "n_edges", "approx_token_groups")}
    for name, mode in (("exact", "exact"), ("approx", "approx")):
        if name not in args.graphs.split(","):
            continue
        cfg = GraphConfig(mode=mode, n_edges=args.n_edges, approx_token_groups=args.approx_groups,
                          local_max_items=10**9, recall_sample=1000, n_partitions=1)
        clock = time.perf_counter()
        built = build_item_graph(table, codes, cfg, seed=0)
        graphs[name] = torch.from_numpy(built.neighbors)
        out["graphs"][name] = {"build_s": time.perf_counter() - clock, **built.stats,
                               **{k: v for k, v in built.info.items() if k.startswith("approx")}}
        print(name, json.dumps(out["graphs"][name]), flush=True)
    split = leave_one_out(read_sequences(args.dataset), max_len=args.max_len)
    counts = popularity(split.train, index)
    queries = to_queries(sample_examples(split.test, args.users, 0), index, "test")
    batches = [(items, lengths, torch.from_numpy(targets)) for items, lengths, targets in queries.batches(256)]
    with torch.no_grad():
        log_probs = [model.next_token_log_probs(items, lengths).float() for items, lengths, _ in batches]
    clock = time.perf_counter()
    full = np.concatenate([full_ranking_topk(lp, codes, 10)[0].numpy() for lp in log_probs])
    full_s = time.perf_counter() - clock
    out["full_ranking"] = {**ranking_metrics(full, queries.targets, [10]), "queries_per_s": len(full) / full_s}
    print("full", json.dumps(out["full_ranking"]), flush=True)
    fallback_all = popular_start_items(counts, 1, 40)[0]
    for graph_name, neighbors in graphs.items():
        for beams in (int(b) for b in args.beams.split(",")):
            for steps in (int(q) for q in args.steps.split(",")):
                decoder = GraphDecoder(codes, neighbors, beams, steps)
                for start in ("random", "history"):
                    gen = torch.Generator().manual_seed(0)
                    ranked, visited, clock = [], [], time.perf_counter()
                    for (items, lengths, _), lp in zip(batches, log_probs):
                        if start == "random":
                            begin = random_start_items(len(lengths), codes.shape[0], beams, gen)
                        else:
                            begin = history_start_items(items, lengths, neighbors, fallback_all[: max(2 * beams, 40)], beams)
                        result = decoder.decode(lp, begin, min(10, beams))
                        ranked.append(result.items.numpy())
                        visited.append(result.n_visited.numpy())
                    seconds = time.perf_counter() - clock
                    ranked_all = np.concatenate(ranked)
                    if ranked_all.shape[1] < 10:
                        ranked_all = np.pad(ranked_all, ((0, 0), (0, 10 - ranked_all.shape[1])), constant_values=-1)
                    metrics = ranking_metrics(ranked_all, queries.targets, [10])
                    row = {"graph": graph_name, "start": start, "beams": beams, "steps": steps,
                           "ndcg@10": metrics["ndcg@10"], "recall@10": metrics["recall@10"],
                           "ndcg_vs_full": metrics["ndcg@10"] / max(out["full_ranking"]["ndcg@10"], 1e-12),
                           "visited_fraction": float(np.concatenate(visited).mean()) / codes.shape[0],
                           "queries_per_s": len(ranked_all) / seconds}
                    out["rows"].append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
