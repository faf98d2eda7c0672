"""Neighbour descent (rpg_dist/graph/descent.py) against exact lists on a tokenized catalogue.

    python benchmarks/descent_experiment.py --semantic-ids RUN/tokenizer/semantic_ids.parquet \
        --table TABLE.safetensors --items 100000 --edges 100 --candidates 32 --iters 12
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
from safetensors.torch import load_file

from rpg_dist.graph.descent import DescentParams, descent_neighbors
from rpg_dist.graph.exact import exact_neighbors
from rpg_dist.graph.similarity import digit_similarity_tables
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--semantic-ids", required=True)
    parser.add_argument("--table", required=True, help="a model.safetensors with token_embeddings, or 'random'")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    codes = torch.from_numpy(load_semantic_ids(args.semantic_ids).codes[: args.items])
    table = (torch.randn(codes.shape[1], 256, 448) if args.table == "random"
             else load_file(args.table)["token_embeddings"].float())
    tables = digit_similarity_tables(table)
    clock = time.perf_counter()
    params = DescentParams(max_candidates=args.candidates, max_iters=args.iters)
    result = descent_neighbors(tables, codes, args.edges, params, seed=0, threads=args.threads)
    seconds = time.perf_counter() - clock
    sample = np.sort(np.random.default_rng(0).choice(len(codes), 300, replace=False))
    exact = exact_neighbors(tables, codes, torch.from_numpy(sample), args.edges).numpy()
    recall = np.mean([len(np.intersect1d(a, e)) / args.edges for a, e in zip(result.neighbors[sample], exact)])
    print(json.dumps({"items": len(codes), "edges": args.edges, "candidates": args.candidates, "seconds": seconds,
                      "recall": float(recall), "changed": [h["changed"] for h in result.iterations]}))


if __name__ == "__main__":
    main()
