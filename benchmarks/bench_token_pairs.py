"""Token-pairs kernel rates: seconds and counts per digit triple on real codes (graph/token_pairs.py).

    # 10M realistic codes, r 4: a late digit pair (lists filled from empty, so its offers all land)
    python benchmarks/bench_token_pairs.py --semantic-ids runs/like10m/run/tokenizer/semantic_ids.parquet \
        --run-dir runs/like10m/run --shared 4 --pairs 12,20 5,9
    # the same as one share of a streamed build: the lists of partition 0 of the run's graph only,
    # the pairs across shares compared here only when this share's end comes first (offers to the
    # other shares' rows are dropped)
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
    n_items = codes.shape[0]
    share = tp.new_share(tables, codes, args.n_edges, args.shared, args.threads, *_owner(args, index), width=3)
    out = {"items": int(n_items), "kept": len(share.rows), "shared": args.shared, "threads": args.threads, "pairs": []}
    for pair in args.pairs:
        first, second = (int(x) for x in pair.split(","))
        share.totals = tp.new_counts(3)
        n_triples = share.run_pair(first, second, outgoing=[])  # offers to other shares' rows are dropped
        totals = share.totals
        row = {"pair": [first, second], "triples": n_triples, **totals,
               "s_per_triple": (totals["sort_s"] + totals["visit_s"]) / max(n_triples, 1),
               "core_ns_per_pair_compared": totals["visit_s"] * args.threads / max(totals["visited"], 1) * 1e9}
        out["pairs"].append(row)
        print(json.dumps(row), flush=True)
    share.pool.close()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))


def _owner(args, index) -> tuple:
    """(owner, share) for ``new_share``: every row's lists, or (``--keep-partition``) those of one
    partition of the run's graph, as a streamed build's actor keeps them."""
    from rpg_dist.graph.store import load_partitions

    if args.keep_partition < 0:
        return None, 0
    return load_partitions(args.run_dir, index), args.keep_partition


if __name__ == "__main__":
    main()
