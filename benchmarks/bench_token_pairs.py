"""Token-pairs kernel rates: seconds and counts per digit triple on real codes (graph/token_pairs.py).

    # 10M realistic codes, r 4: a late digit pair (lists filled from empty, so its offers all land)
    python benchmarks/bench_token_pairs.py --semantic-ids runs/like10m/run/tokenizer/semantic_ids.parquet \
        --run-dir runs/like10m/run --shared 4 --pairs 12,20 5,9
    # the same, keeping the lists of partition 0 of the run's graph only (a streamed build's share)
    python benchmarks/bench_token_pairs.py ... --threads 1 --keep-partition 0

For each digit pair given, the pair sort (counting sort over 2^16 keys, codes copied into pair
order) and then every third digit's buckets, visited on ``--threads`` threads into empty lists, as
the build's own loop does. Prints pairs compared, scored, offers, list entries changed and seconds
per triple, and the visit's core time (comparing, scoring, list updates) per pair compared. Starts
from empty lists, so offers and list updates are those of a build's first passes (the most
expensive); a whole build's figures are its log lines.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402


def main() -> None:
    from rpg_dist.graph import token_pairs as tp
    from rpg_dist.graph.similarity import digit_similarity_tables
    from rpg_dist.graph.stage import load_token_embeddings
    from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--semantic-ids", required=True, help="a semantic_ids.parquet")
    parser.add_argument("--run-dir", required=True, help="the run whose exported token table scores the pairs")
    parser.add_argument("--shared", type=int, default=4, help="r, tokens a pair must share")
    parser.add_argument("--n-edges", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", nargs="+", default=["12,20"], help="digit pairs FIRST,SECOND to run")
    parser.add_argument("--keep-partition", type=int, default=-1,
                        help="keep the lists of this partition of the run's graph only, as a streamed build's "
                             "actor does (default: every row's)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    semantic_ids = load_semantic_ids(args.semantic_ids)
    codes, index = semantic_ids.codes, semantic_ids.index
    tables = digit_similarity_tables(load_token_embeddings(args.run_dir))
    n_items, n_digit = codes.shape
    tab = np.ascontiguousarray(tables.numpy()).reshape(-1)
    cod = tp._padded_codes(codes)
    heaps, worst, slot = _lists(n_items, args, index)
    out = {"items": int(n_items), "kept": len(heaps), "shared": args.shared, "threads": args.threads, "pairs": []}
    with tp._Pool(args.threads) as pool:
        for pair in args.pairs:
            first, second = (int(x) for x in pair.split(","))
            totals = tp.new_counts(3)
            n_triples = tp._run_pair(tab, tables.shape[1], cod, n_digit, heaps, slot, worst, first, second, 3,
                                     args.shared, tp.CHUNK_PAIRS, pool, totals)
            row = {"pair": [first, second], "triples": n_triples, **totals,
                   "s_per_triple": (totals["sort_s"] + totals["visit_s"]) / max(n_triples, 1),
                   "core_ns_per_pair_compared": totals["visit_s"] * args.threads / max(totals["visited"], 1) * 1e9}
            out["pairs"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))


def _lists(n_items: int, args, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty (L, k) heaps, the (N,) roots and the row -> list map: every row's lists, or (``--keep-partition``)
    those of one partition of the run's graph, as a streamed build's actor keeps them."""
    from rpg_dist.decode.topk import MIN_KEY
    from rpg_dist.graph import token_pairs as tp
    from rpg_dist.graph.store import load_partitions

    rows = None
    if args.keep_partition >= 0:
        rows = np.flatnonzero(load_partitions(args.run_dir, index) == args.keep_partition)
    worst, slot = tp.kept_roots(n_items, rows)
    return np.full((n_items if rows is None else len(rows), args.n_edges), MIN_KEY, np.int64), worst, slot


if __name__ == "__main__":
    main()
