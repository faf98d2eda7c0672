"""Graph-build benchmark: seconds, peak memory and recall of the kNN graph builder at scale.

    # Beauty size, exact (12,101 items, m 32, d 448, k 200)
    python benchmarks/bench_graph.py --items 12101 --mode exact
    # synthetic 100k: exact, then approximate (recall measured against exact on a sample)
    python benchmarks/bench_graph.py --items 100000 --mode exact
    python benchmarks/bench_graph.py --items 100000 --mode approx
    # 1M approximate (the goal: < 15 min, < 6 GB, recall >= 0.9 on this 2-core machine)
    python benchmarks/bench_graph.py --items 1000000 --mode approx
    # the similarity formulations head to head (lookups vs fp32/bf16 GEMM in the concatenated space)
    python benchmarks/bench_graph.py --formulations
    # real codes (and a trained table): Beauty's semantic IDs, approximate vs exact recall
    python benchmarks/bench_graph.py --semantic-ids runs/beauty/tokenizer/semantic_ids.parquet \
        --run-dir runs/beauty --mode approx --set recall_sample=2000

Token tables are i.i.d. Gaussian (m, 256, d). Codes (``--codes``): ``taxonomy`` (default) nests
departments > categories > items like the synthetic catalogue, so items of a category share most
digits; ``uniform`` draws every digit at random (no neighbourhood structure: the worst case for any
approximate index). Peak memory is the sum of RSS over this process and all its descendants (Ray's
raylet, GCS and workers included), sampled every 0.5 s.
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

from common import PeakMemory, machine, timed  # noqa: E402

from rpg_dist.graph.builder import build_item_graph  # noqa: E402
from rpg_dist.graph.config import GraphConfig  # noqa: E402
from rpg_dist.decode.scoring import offset_codes  # noqa: E402
from rpg_dist.graph.similarity import block_sums, digit_similarity_tables, query_tables  # noqa: E402
from rpg_dist.testing.codes import random_token_table, taxonomy_codes  # noqa: E402


def make_codes(kind: str, n_items: int, n_digit: int, seed: int) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, 256, (n_items, n_digit), generator=torch.Generator().manual_seed(seed), dtype=torch.int16)
    # ~500 items per category, 25 categories per department.
    n_categories = max(1, n_items // 500)
    levels = [(max(1, n_categories // 25), 1.0), (n_categories, 0.5)]
    return taxonomy_codes(n_items, n_digit, levels, keep=0.7, seed=seed)


def formulations(n_digit: int = 32, dim: int = 448, queries: int = 64, items: int = 16_384, repeats: int = 5) -> dict:
    """Pairs/s of the ways to compute S(a, b) for a (queries x items) block, one thread."""
    table = random_token_table(n_digit, 256, dim, seed=0)
    tables = digit_similarity_tables(table)
    codes = torch.randint(0, 256, (queries + items, n_digit))
    q_codes, i_codes = codes[:queries], codes[queries:]
    luts, i_offsets, i_codes_t = query_tables(tables, q_codes), offset_codes(i_codes, 256), i_codes.t().contiguous()
    normed = torch.nn.functional.normalize(table, dim=-1)
    concat = normed[torch.arange(n_digit), codes].reshape(len(codes), -1)  # (Q+C, m*d)
    xq, xi = concat[:queries], concat[queries:]

    def index_select_gathers():
        # The previous kernel and the reference code's build_ii_sim_mat: per digit, the queries'
        # table rows, then the items' columns.
        total = tables[0].index_select(0, q_codes[:, 0]).index_select(1, i_codes_t[0])
        for k in range(1, n_digit):
            total += tables[k].index_select(0, q_codes[:, k]).index_select(1, i_codes_t[k])
        return total

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for name, fn in (
            ("embedding_bag_lookups", lambda: block_sums(luts, i_offsets)),
            ("index_select_gathers", index_select_gathers),
            ("gemm_fp32_concat", lambda: xq @ xi.T),
            ("gemm_bf16_concat", lambda: (xq.bfloat16() @ xi.bfloat16().T)),
        ):
            fn()  # warm-up
            seconds, _ = timed(fn, repeats)
            out[name] = {"pairs_per_s": queries * items / seconds, "ns_per_pair": seconds / (queries * items) * 1e9}
    finally:
        torch.set_num_threads(saved)
    out["embedding_bag_vs_index_select"] = out["embedding_bag_lookups"]["pairs_per_s"] / out["index_select_gathers"]["pairs_per_s"]
    out["embedding_bag_vs_fp32_gemm"] = out["embedding_bag_lookups"]["pairs_per_s"] / out["gemm_fp32_concat"]["pairs_per_s"]
    return out


def reference_dense(table: torch.Tensor, codes: torch.Tensor, n_edges: int, chunk: int = 1024) -> torch.Tensor:
    """The reference code's build_ii_sim_mat + build_adjacency_list: the dense (N, N) similarity,
    chunk by chunk with per-digit index_select gathers, then one torch.topk (self included, as there)."""
    tables = digit_similarity_tables(table)
    n_items, n_digit = codes.shape
    codes = codes.long()
    sims = torch.zeros(n_items, n_items)
    for lo in range(0, n_items, chunk):
        for c_lo in range(0, n_items, chunk):
            rows, cols = codes[lo : lo + chunk], codes[c_lo : c_lo + chunk]
            block = torch.zeros(len(rows), len(cols))
            for k in range(n_digit):
                block += tables[k].index_select(0, rows[:, k]).index_select(1, cols[:, k])
            sims[lo : lo + chunk, c_lo : c_lo + chunk] = block / n_digit
    return torch.topk(sims, n_edges, dim=-1).indices


def small(args) -> dict:
    """In-process exact build beside the reference code's dense formulation, same codes and table."""
    codes, table = load_inputs(args)
    cfg = graph_config(args)
    out = {"items": int(codes.shape[0]), "threads": torch.get_num_threads()}
    seconds, built = timed(lambda: build_item_graph(table, codes, cfg, seed=0), args.repeats)
    out["builder_s"] = seconds
    out["builder_workers"] = built.info["workers"]
    out["builder_neighbors_s"] = built.info["timings_s"]["neighbors_s"]
    seconds, dense = timed(lambda: reference_dense(table, codes, args.n_edges + 1), 1)
    out["reference_dense_s"] = seconds
    # The reference lists include the item itself first; drop it before comparing.
    same = np.mean([len(set(d[1:].tolist()) & set(b.tolist())) / args.n_edges
                    for d, b in zip(dense.numpy(), built.neighbors)])
    out["overlap_with_reference"] = float(same)
    out["builder_vs_reference"] = out["reference_dense_s"] / out["builder_s"]
    return out


def load_inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, m), token table) from --semantic-ids / --run-dir, or synthetic ones."""
    if args.semantic_ids:
        from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

        codes = torch.from_numpy(load_semantic_ids(args.semantic_ids).codes)
        args.items, args.digits, args.codes = codes.shape[0], codes.shape[1], args.semantic_ids
    else:
        codes = make_codes(args.codes, args.items, args.digits, seed=0)
    if args.run_dir:
        from rpg_dist.graph.stage import load_token_embeddings

        table = load_token_embeddings(args.run_dir)
        args.dim = table.shape[2]
    else:
        table = random_token_table(args.digits, 256, args.dim, seed=0)
    return codes, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=12_101)
    parser.add_argument("--mode", choices=["exact", "approx"], default="exact")
    parser.add_argument("--codes", choices=["taxonomy", "uniform"], default="taxonomy")
    parser.add_argument("--semantic-ids", help="use these codes (a semantic_ids.parquet, e.g. Beauty's) instead")
    parser.add_argument("--run-dir", help="use this run's trained token_embeddings instead of a random table")
    parser.add_argument("--digits", type=int, default=32)
    parser.add_argument("--dim", type=int, default=448)
    parser.add_argument("--n-edges", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="GraphConfig override, e.g. --set approx_index=IVF4096,Flat (repeatable)")
    parser.add_argument("--formulations", action="store_true", help="only compare similarity formulations")
    parser.add_argument("--small", action="store_true",
                        help="in-process exact build beside the reference code's dense formulation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.formulations:
        result = formulations(args.digits, args.dim)
    else:
        result = small(args) if args.small else run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def graph_config(args) -> GraphConfig:
    from rpg_dist import configlib

    fields = {"mode": args.mode, "n_edges": args.n_edges, "n_partitions": args.partitions,
              "num_actors": args.actors}
    data = configlib.apply_overrides(GraphConfig, fields, args.overrides)
    return configlib.build(GraphConfig, data)


def run(args) -> dict:
    import ray

    cfg = graph_config(args)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with PeakMemory() as memory:
        clock = time.perf_counter()
        codes, table = load_inputs(args)
        data_s = time.perf_counter() - clock
        # Logical CPUs above the 2 cores: fractional actors never starve the driver.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        clock = time.perf_counter()
        built = build_item_graph(table, codes, cfg, seed=0)
        build_s = time.perf_counter() - clock
        ray.shutdown()
    return {
        "items": args.items, "digits": args.digits, "dim": args.dim, "codes": args.codes,
        "token_table": args.run_dir or "random",
        "config": {k: v for k, v in vars(cfg).items()},
        "data_s": data_s, "build_s": build_s, "peak_rss_gib": memory.peak / 2**30,
        **{k: v for k, v in built.info.items() if k != "partition_sizes"},
        "partition_sizes": built.info["partition_sizes"],
        "stats": built.stats,
    }


if __name__ == "__main__":
    main()
