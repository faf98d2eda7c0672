"""Decoding benchmark: queries/s of graph-constrained decoding, vectorised vs loops, single vs sharded.

    # Beauty size (12,101 items), b=20, k=200, q=3, B=256, on an exactly built graph (locality)
    python benchmarks/bench_decode.py --items 12101 --graph built
    # 1M items on a random graph (no locality: the worst case for sharding)
    python benchmarks/bench_decode.py --items 1000000 --graph random

Five decoders on the same start items, graph and log-probs (results are checked to be equal):
- ``vectorised``: ``GraphDecoder`` in this process, its CPU default (the compiled ``beam_kernel``);
- ``tensor``: ``GraphDecoder(kernel="torch")``, the batched-tensor formulation (the default off CPU);
- ``sharded``: ``ShardedGraphDecoder``, one Ray actor per partition (``--shards``), coordinator here;
- ``twin``: ``graph_decode_reference``, the plain-loop twin (Python sets, item-by-item scores);
- ``paper_loop``: the paper's ``graph_propagation`` structure (a Python loop over queries, with
  ``torch.unique`` + a gather + ``topk`` per query and step), the stronger loop baseline.
Loops run on ``--loop-queries`` queries only; queries/s are medians over batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import PeakMemory, machine, timed  # noqa: E402

from rpg_dist.decode.graph_decode import GraphDecoder, random_start_items  # noqa: E402
from rpg_dist.decode.scoring import candidate_scores  # noqa: E402
from rpg_dist.decode.sharded import ShardedGraphDecoder  # noqa: E402
from rpg_dist.testing.codes import random_token_table, taxonomy_codes  # noqa: E402
from twins import graph_decode_reference  # noqa: E402 (tests/twins.py)


class LazyRows:
    """Neighbour lists as Python lists on demand (a 1M x 200 list of lists would not fit)."""

    def __init__(self, neighbors: np.ndarray) -> None:
        self.neighbors = neighbors

    def __getitem__(self, item: int) -> list[int]:
        return self.neighbors[item].tolist()


def random_graph(n_items: int, n_edges: int, seed: int) -> np.ndarray:
    """(N, k) int32 distinct non-self neighbours: row + 1 + k distinct random offsets (mod N)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randperm(n_items - 1, generator=gen)[:n_edges]
    shift = torch.randint(0, n_edges, (n_items, 1), generator=gen)
    rows = torch.arange(n_items).unsqueeze(1)
    return ((rows + 1 + offsets[(torch.arange(n_edges) + shift) % n_edges]) % n_items).to(torch.int32).numpy()


def built_graph(codes: torch.Tensor, n_edges: int, n_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """An exactly built graph and its partitions (small catalogues: an exact build)."""
    import ray

    from rpg_dist.graph.builder import build_item_graph
    from rpg_dist.graph.config import GraphConfig

    table = random_token_table(codes.shape[1], 256, 448, seed=0)
    built = build_item_graph(table, codes, GraphConfig(n_edges=n_edges, n_partitions=n_parts), seed=0)
    assert ray.is_initialized()
    return built.neighbors, built.partition


def paper_loop(log_probs, codes, neighbors: torch.Tensor, start, num_beams: int, steps: int) -> torch.Tensor:
    """genrec RPG ``graph_propagation``, beam added to the candidates (our lists exclude self-edges)."""
    beams = []
    for query in range(log_probs.shape[0]):
        lp = log_probs[query : query + 1]
        beam = start[query]
        for _ in range(steps):
            cand = torch.unique(torch.cat([beam, neighbors[beam].flatten().long()]))
            scores = candidate_scores(lp, codes, cand.unsqueeze(0))[0]  # (C,), item-major codes
            beam = cand[torch.topk(scores, num_beams).indices]
        beams.append(beam)
    return torch.stack(beams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=12_101)
    parser.add_argument("--graph", choices=["random", "built"], default="random")
    parser.add_argument("--digits", type=int, default=32)
    parser.add_argument("--edges", type=int, default=200)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--loop-queries", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def run(args) -> dict:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    n_cat = max(1, args.items // 500)
    codes = taxonomy_codes(args.items, args.digits, [(max(1, n_cat // 25), 1.0), (n_cat, 0.5)], 0.7, seed=0)
    if args.graph == "built":
        neighbors, partition = built_graph(codes, args.edges, args.shards)
    else:
        neighbors = random_graph(args.items, args.edges, seed=0)
        partition = (np.arange(args.items) * args.shards // args.items).astype(np.int32)  # contiguous halves
    gen = torch.Generator().manual_seed(1)
    log_probs = torch.log_softmax(torch.randn(args.batch, args.digits, 256, generator=gen) * 3, dim=-1)
    start = random_start_items(args.batch, args.items, args.beams, gen)
    nbrs = torch.from_numpy(neighbors)
    out: dict = {"items": args.items, "graph": args.graph, "digits": args.digits, "edges": args.edges,
                 "beams": args.beams, "steps": args.steps, "batch": args.batch}
    with PeakMemory() as memory:
        decoder = GraphDecoder(codes, nbrs, args.beams, args.steps)
        seconds, vec = timed(lambda: decoder.decode(log_probs, start), args.repeats)
        out["vectorised_qps"] = args.batch / seconds
        tensor = GraphDecoder(codes, nbrs, args.beams, args.steps, kernel="torch")
        seconds, ten = timed(lambda: tensor.decode(log_probs, start), args.repeats)
        out["tensor_qps"] = args.batch / seconds
        assert torch.equal(ten.items, vec.items) and torch.equal(ten.n_visited, vec.n_visited)
        sharded = ShardedGraphDecoder.from_arrays(codes.numpy(), neighbors, partition, args.beams, args.steps)
        seconds, shr = timed(lambda: sharded.decode(log_probs, start), args.repeats)
        out["sharded_qps"] = args.batch / seconds
        out["sharded_step_stats"] = sharded.step_stats
        assert torch.equal(shr.items, vec.items) and torch.equal(shr.n_visited, vec.n_visited)
        sharded.close()
    out["peak_rss_gib"] = memory.peak / 2**30
    n = args.loop_queries
    seconds, (beams, visited) = timed(lambda: graph_decode_reference(
        log_probs[:n], codes, LazyRows(neighbors), start[:n].tolist(), args.beams, args.steps), 1)
    out["twin_qps"] = n / seconds
    assert beams == vec.items[:n].tolist() and visited == vec.n_visited[:n].tolist()
    seconds, _ = timed(lambda: paper_loop(log_probs[:n], codes, nbrs, start[:n], args.beams, args.steps), 1)
    out["paper_loop_qps"] = n / seconds
    out["speedup_vs_twin"] = out["vectorised_qps"] / out["twin_qps"]
    out["speedup_vs_paper_loop"] = out["vectorised_qps"] / out["paper_loop_qps"]
    out["speedup_vs_tensor"] = out["vectorised_qps"] / out["tensor_qps"]
    out["n_visited_mean"] = float(vec.n_visited.float().mean())
    ray.shutdown()
    return out


if __name__ == "__main__":
    main()
