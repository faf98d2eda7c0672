"""Non-neural baselines on a tokenized run: how much signal the data and the semantic IDs carry.

    python benchmarks/beauty_baselines.py --dataset runs/beauty-dataset --run runs/beauty-A

Every baseline ranks the whole catalogue for each user's leave-one-out example (validation:
history = s[:-2], target s[-2]; test: history = s[:-1], target s[-1]) and counts only the training
part of the sequences (s[:-2]), like the model:

- ``popularity``: training interaction counts.
- ``code_overlap``: digits shared with the last history item (ties broken by popularity).
- ``embedding_cosine``: cosine of the item text embeddings to the last history item.
- ``item_transitions``: how often each item followed the last history item in training, with
  popularity as the tie-breaker.
- ``digit_transitions``: RPG's own scoring form, score(j) = mean_k log p_k(j_k | a_k) for the last
  item a, with p_k the add-one-smoothed counts of digit-k token transitions. It shows what a model
  restricted to per-digit distributions can reach on these semantic IDs.

Ranking uses the evaluator's metrics on each baseline's top 10 (``torch.topk``). The last history
item itself stays rankable (as for the model), except for the two similarity
baselines, where it would always rank first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rpg_dist.artifacts import RunPaths  # noqa: E402
from rpg_dist.data.dataset import read_sequences  # noqa: E402
from rpg_dist.decode.scoring import item_scores  # noqa: E402
from rpg_dist.evaluation.metrics import ranking_metrics  # noqa: E402
from rpg_dist.tokenizer.embed import read_embeddings  # noqa: E402
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids  # noqa: E402

BLOCK = 1024


def load(dataset: str, run: str):
    """Each user's sequence as item rows, the (n, m) codes and the (n, D) text embeddings."""
    paths = RunPaths(run)
    sids = load_semantic_ids(paths.semantic_ids)
    seqs = read_sequences(dataset).column("item_ids").to_pylist()
    rows = [sids.index.rows(np.asarray(s, np.int64)) for s in seqs]
    item_ids, embeddings = read_embeddings(paths.embeddings)  # every part file under the folder
    vectors = np.zeros((len(sids.index.item_ids), embeddings.shape[1]), np.float32)
    vectors[sids.index.rows(item_ids)] = embeddings
    return rows, torch.from_numpy(sids.codes.astype(np.int64)), torch.from_numpy(vectors)


def baselines(rows, codes, vectors):
    n, m = codes.shape
    train = [r[:-2] for r in rows]
    src = np.concatenate([t[:-1] for t in train])
    dst = np.concatenate([t[1:] for t in train])
    popularity = torch.from_numpy(np.bincount(np.concatenate(train), minlength=n).astype(np.float32))
    tie = popularity / (popularity.max() + 1)  # < 1: only breaks ties
    transitions = sp.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(n, n))
    v = int(codes.max()) + 1  # codebook size (every token of a trained OPQ codebook is used)
    digit_counts = torch.zeros(m, v, v)
    for k in range(m):  # (m, V, V) token-transition counts, one scatter per digit
        digit_counts[k].index_put_((codes[src, k], codes[dst, k]), torch.ones(len(src)), accumulate=True)
    digit_logp = torch.log((digit_counts + 1) / (digit_counts + 1).sum(-1, keepdim=True))  # (m, V, V)
    unit = torch.nn.functional.normalize(vectors, dim=-1)

    def exclude(scores, last):
        return scores.scatter(1, last[:, None], float("-inf"))

    return {
        "popularity": lambda last: popularity.expand(len(last), n),
        "code_overlap": lambda last: exclude(shared_digits(codes, last) + tie, last),
        "embedding_cosine": lambda last: exclude(unit[last] @ unit.T, last),
        "item_transitions": lambda last: torch.from_numpy(transitions[last.numpy()].toarray()) + tie,
        # (B, m, V): the transition row of each digit's last token, scored like the model's output
        "digit_transitions": lambda last: item_scores(digit_logp[torch.arange(m), codes[last]], codes),
    }


def shared_digits(codes: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Digits each item shares with ``last``: (B,) -> (B, n)."""
    total = torch.zeros(len(last), codes.shape[0])
    for k in range(codes.shape[1]):
        total += codes[last, k][:, None] == codes[:, k][None]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run", required=True, help="a run directory with tokenizer/ and embeddings/")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    rows, codes, vectors = load(args.dataset, args.run)
    rows = [r for r in rows if len(r) >= 4]  # a training pair, a validation and a test target
    results = {}
    for name, score in baselines(rows, codes, vectors).items():
        for split, cut in (("val", 2), ("test", 1)):
            last = torch.tensor([r[-cut - 1] for r in rows])
            targets = torch.tensor([r[-cut] for r in rows])
            ranked = np.concatenate([score(last[lo:lo + BLOCK]).topk(10, dim=1).indices.numpy()
                                     for lo in range(0, len(rows), BLOCK)])  # (users, 10)
            metrics = ranking_metrics(ranked, targets.numpy(), [10])
            results[f"{split}/{name}"] = {key: round(value, 4) for key, value in metrics.items()}
            print(f"{split:5s} {name:18s} NDCG@10 {metrics['ndcg@10']:.4f}  "
                  f"Recall@10 {metrics['recall@10']:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
