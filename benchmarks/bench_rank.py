"""Full ranking (every item scored for every query, top-k kept) by catalogue size, beside the
paper code's formulation and the scorer's own lookup kernel without selection.

    python benchmarks/bench_rank.py                       # 12,101 / 100k / 1M items, m 32
    python benchmarks/bench_rank.py --items 12101 --batches 20

An item's score is mean_k log p_k(code_k): m lookups per (query, item) pair, like PQ's asymmetric
distance. Rows:
- ``full_ranking_topk``: the one scorer (``decode.scoring``), blocks of items x 64 queries through
  ``F.embedding_bag`` on a (m*V, 64) table, then a running top-k (numba) over each block;
- ``lookup kernel only``: the same blocks without the top-k: the bound on this path;
- ``paper formulation``: the reference code's way, a (B, N) gather per digit summed, then torch.topk
  (it holds B x N scores: only run where that fits).
Log-probabilities and codes are random (the cost does not depend on the values); all three give the
same top-k (checked on the first batch).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import machine, timed  # noqa: E402

from rpg_dist.decode.scoring import full_ranking_topk, score_blocks  # noqa: E402


def paper_topk(log_probs: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """Reference formulation: sum over digits of a (B, N) gather, mean, torch.topk."""
    scores = torch.zeros(log_probs.shape[0], codes.shape[0])
    for d in range(codes.shape[1]):
        scores += log_probs[:, d, :].index_select(1, codes[:, d].long())
    return torch.topk(scores / codes.shape[1], k, dim=1).indices


def kernel_only(log_probs: torch.Tensor, codes: torch.Tensor) -> float:
    total = 0.0
    for _, _, scores in score_blocks(log_probs, codes, 65_536):
        total += float(scores[0, 0])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="12101,100000,1000000")
    parser.add_argument("--digits", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paper-max-items", type=int, default=100_000)
    args = parser.parse_args()
    print(f"machine: {machine()}; {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    m, vocab, batch = args.digits, 256, args.batch
    log_probs = torch.log_softmax(torch.randn(batch, m, vocab, generator=gen), dim=-1)
    print(f"{'items':>9} {'full_ranking_topk q/s':>22} {'pairs/s (G)':>11} {'kernel only q/s':>16} "
          f"{'x kernel':>8} {'paper formulation q/s':>22} {'vs paper':>8}")
    for n_items in (int(x) for x in args.items.split(",")):
        codes = torch.randint(0, vocab, (n_items, m), generator=gen, dtype=torch.int16)
        full_ranking_topk(log_probs, codes, args.k)  # warm-up: numba compilation, thread pool
        ours_s, (rows, _) = timed(lambda: full_ranking_topk(log_probs, codes, args.k), args.repeats)
        kernel_s, _ = timed(lambda: kernel_only(log_probs, codes), args.repeats)
        ours_qps, kernel_qps = batch / ours_s, batch / kernel_s
        paper = ""
        if n_items <= args.paper_max_items:
            paper_s, paper_rows = timed(lambda: paper_topk(log_probs, codes, args.k), max(1, args.repeats // 2))
            # Same top-k sets (ties among random float sums are vanishingly rare).
            assert all(set(a) == set(b) for a, b in zip(rows.tolist(), paper_rows.tolist())), "top-k differs"
            paper = f"{batch / paper_s:>22.0f} {paper_s / ours_s:>7.1f}x"
        print(f"{n_items:>9} {ours_qps:>22.0f} {ours_qps * n_items / 1e9:>11.2f} {kernel_qps:>16.0f} "
              f"{ours_qps / kernel_qps:>8.2f} {paper}", flush=True)
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
