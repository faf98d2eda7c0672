"""Choose a prior's weight on validation: full-ranking NDCG@10 of a trained run per weight.

    python benchmarks/transition_weight.py --run runs/beauty-hybrid-fast --weights 0,0.5,1,1.5,2,3
    python benchmarks/transition_weight.py --run runs/like1m --prior popularity --weights 0,0.2,0.4,0.8 \
        --max-users 20000

``--prior transition`` (decode.transition_weight): the model's log-probabilities and its full-ranking
top-10 are computed once per split; each weight then only reranks them with the training successors
(decode/transitions.py, the stage's own code). ``--prior popularity`` (decode.popularity_weight): the
prior moves every item, so each weight ranks the whole catalogue again (decode/scoring.py, the
stage's own scorer) from the cached log-probabilities. The weight with the best validation NDCG@10 is
the one to put in the config; test is printed beside it and never used to choose.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rpg_dist.artifacts import RunPaths  # noqa: E402
from rpg_dist.config import read_run_config  # noqa: E402
from rpg_dist.data.dataset import read_sequences  # noqa: E402
from rpg_dist.data.splits import leave_one_out  # noqa: E402
from rpg_dist.decode.scoring import full_ranking_topk, popularity_prior  # noqa: E402
from rpg_dist.decode.transitions import count_transitions, last_items, rerank  # noqa: E402
from rpg_dist.evaluation.metrics import ranking_metrics  # noqa: E402
from rpg_dist.evaluation.stage import popularity, sample_examples, to_queries  # noqa: E402
from rpg_dist.model.export import load_model  # noqa: E402
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids  # noqa: E402

K = 10


@torch.no_grad()
def ranked_once(model, queries, batch_size: int = 512):
    """Per batch: (log_probs, top-K rows, their scores, last item rows), computed once."""
    out = []
    for items, lengths, _ in queries.batches(batch_size):
        log_probs = model.next_token_log_probs(items, lengths).float()
        rows, scores = full_ranking_topk(log_probs, model.item_codes, K)
        out.append((log_probs, rows, scores, last_items(items, lengths)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--prior", choices=["transition", "popularity"], default="transition")
    parser.add_argument("--weights", default="0,0.5,1,1.5,2,3,5")
    parser.add_argument("--max-successors", type=int, default=100)
    parser.add_argument("--max-users", type=int, default=0, help="a seeded sample of users per split (0: all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = read_run_config(args.run)
    model = load_model(args.run).eval()
    index = load_semantic_ids(RunPaths(args.run).semantic_ids).index
    split = leave_one_out(read_sequences(cfg.dataset), max_len=cfg.model.max_seq_len)
    if args.prior == "transition":
        prior = count_transitions(split.train, index.rows(split.train.flatten().to_numpy()), len(index),
                                  args.max_successors)
    else:
        counts = popularity(split.train, index)
    cached = {}
    for name, examples in (("val", split.val), ("test", split.test)):
        queries = to_queries(sample_examples(examples, args.max_users, cfg.seed), index, name)
        cached[name] = (queries, ranked_once(model, queries))
    results = {}
    for weight in (float(w) for w in args.weights.split(",")):
        row = {}
        item_prior = popularity_prior(counts, weight) if args.prior == "popularity" else None
        for name, (queries, batches) in cached.items():
            if args.prior == "transition":
                ranked = [rerank(lp, model.item_codes, rows, scores, last, prior, weight, K)[0].numpy() if weight
                          else rows.numpy() for lp, rows, scores, last in batches]
            else:
                ranked = [full_ranking_topk(lp, model.item_codes, K, prior=item_prior)[0].numpy() if weight
                          else rows.numpy() for lp, rows, _, _ in batches]
            row[name] = ranking_metrics(np.concatenate(ranked), queries.targets, [K])
        results[weight] = row
        print(f"{args.prior} weight {weight:<5g} val NDCG@10 {row['val']['ndcg@10']:.4f}  "
              f"test NDCG@10 {row['test']['ndcg@10']:.4f}  "
              f"(Recall@10 {row['val']['recall@10']:.4f} / {row['test']['recall@10']:.4f})", flush=True)
    best = max(results, key=lambda w: results[w]["val"]["ndcg@10"])
    print(f"chosen on validation: {best:g} (test NDCG@10 {results[best]['test']['ndcg@10']:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(w): r for w, r in results.items()} | {"chosen": best, "prior": args.prior}, f, indent=2)


if __name__ == "__main__":
    main()
