"""ID-only SASRec (Kang & McAuley, ICDM'18), the field's standard baseline, on RPG's split.

    python benchmarks/sasrec.py --dataset runs/beauty-dataset --out runs/sasrec-beauty.json

The protocol is `rpg-dist evaluate`'s: ``data.splits.leave_one_out`` (training part s[:-2],
validation target s[-2], test target s[-1], histories of at most 50 items), the whole catalogue
ranked, the history left rankable as for RPG, Recall/NDCG@5/10 by ``evaluation.metrics``; the test
figures are those of the epoch with the best validation NDCG@10 (early stopping with patience).

The model is the paper's: item and learned position embeddings, ``n_layer`` causal self-attention
blocks (pre-LN, point-wise FFN of width d), scores = final state . item embedding (tied). Only item
ids: no text, no semantic IDs. Training is on each user's last ``max_len`` + 1 training items, every
position predicting the next. Loss: ``--loss ce`` (default), softmax cross-entropy over the whole
catalogue at every position, the stronger form used in recent comparisons; ``--loss bce`` is the
original (one sampled negative per position, binary cross-entropy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rpg_dist.data.dataset import read_items, read_sequences  # noqa: E402
from rpg_dist.data.items import ItemIndex  # noqa: E402
from rpg_dist.data.splits import leave_one_out  # noqa: E402
from rpg_dist.evaluation.metrics import ranking_metrics  # noqa: E402
from rpg_dist.model.rpg import PAD, right_pad  # noqa: E402


class SASRec(nn.Module):
    """Item rows 1..N (0 = padding) -> (B, T, d) states; ``scores`` ranks all N items."""

    def __init__(self, n_items: int, d: int, n_layer: int, n_head: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.position = nn.Embedding(max_len, d)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d, n_head, d, dropout, activation="relu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.item.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded rows (0 = pad) -> (B, T) states (B, T, d)."""
        t = items.shape[1]
        keep = (items > 0).unsqueeze(-1)  # the paper's timeline mask: pads stay zero
        x = self.item(items) * math.sqrt(self.item.embedding_dim) + self.position.weight[:t]
        x = self.dropout(x) * keep
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        return self.norm(self.blocks(x, mask=causal, is_causal=True)) * keep

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """(n, d) states -> (n, N) scores of items 1..N."""
        return states @ self.item.weight[1:].T


def as_rows(lists, index: ItemIndex, max_len: int) -> tuple[torch.Tensor, np.ndarray]:
    """Lists of item ids -> (n, T) rows + 1 (0 = pad) of each list's last ``max_len`` items, lengths."""
    offsets = lists.offsets.to_numpy()  # into lists.values
    lengths = np.minimum(np.diff(offsets), max_len)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    take = np.repeat(offsets[1:] - lengths, lengths) + within
    padded = right_pad(index.rows(lists.values.to_numpy()[take]) + 1, lengths)
    padded[padded == PAD] = 0
    return torch.from_numpy(padded), lengths


def training_pairs(train, index: ItemIndex, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, T) inputs and (U, T) next-item targets (0 = none) from each training part's last T + 1."""
    lengths = np.diff(train.offsets.to_numpy())
    keep = np.flatnonzero(lengths >= 2)
    sequences, n = as_rows(train.take(keep), index, max_len + 1)
    inputs = sequences.clone()
    inputs[torch.arange(len(n)), torch.from_numpy(n - 1)] = 0  # the last item is only a target
    return inputs[:, :-1], sequences[:, 1:].clone()


def length_batches(lengths: np.ndarray, batch: int, generator: torch.Generator, pool: int = 50) -> list:
    """One epoch's batches: a random permutation cut into pools of ``pool`` batches, each pool sorted
    by length, so a batch's rows have similar lengths and can be cut to the longest (on Beauty a
    random batch of 50 columns is ~85 % padding). Every row appears once; batch order is shuffled."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    batches = []
    for lo in range(0, len(order), batch * pool):
        chunk = order[lo : lo + batch * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def loss_of(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, kind: str, n_items: int,
            generator: torch.Generator) -> torch.Tensor:
    states = model(inputs)
    labelled = targets > 0
    h, y = states[labelled], targets[labelled] - 1  # (P, d), (P,) rows 0..N-1
    if kind == "ce":
        return nn.functional.cross_entropy(model.scores(h), y)
    negative = torch.randint(1, n_items + 1, y.shape, generator=generator)
    pos = (h * model.item(y + 1)).sum(-1)
    neg = (h * model.item(negative)).sum(-1)
    return nn.functional.softplus(-pos).mean() + nn.functional.softplus(neg).mean()


@torch.no_grad()
def evaluate(model: SASRec, histories: torch.Tensor, lengths: np.ndarray, targets: np.ndarray,
             batch: int = 1024) -> dict[str, float]:
    model.eval()
    ranked = []
    for lo in range(0, len(histories), batch):
        states = model(histories[lo : lo + batch])
        last = states[torch.arange(states.shape[0]), torch.from_numpy(lengths[lo : lo + batch] - 1)]
        ranked.append(torch.topk(model.scores(last), 10, dim=1).indices.numpy())
    model.train()
    return ranking_metrics(np.concatenate(ranked), targets, [5, 10])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--loss", choices=["ce", "bce"], default="ce")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    index = ItemIndex(np.sort(read_items(args.dataset, columns=["item_id"]).column("item_id").to_numpy()))
    split = leave_one_out(read_sequences(args.dataset), max_len=args.max_len)
    inputs, targets = training_pairs(split.train, index, args.max_len)
    input_lengths = (inputs > 0).sum(1).numpy()  # right-padded: a row's items are its first n columns
    examples = {}
    for name, part in (("val", split.val), ("test", split.test)):
        histories, lengths = as_rows(part.histories, index, args.max_len)
        examples[name] = (histories, lengths, index.rows(part.targets))
    n_items = len(index)
    model = SASRec(n_items, args.d, args.layers, args.heads, args.max_len, args.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed)
    best, curve, start = {"epoch": 0, "val": {"ndcg@10": -1.0}}, [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for rows in length_batches(input_lengths, args.batch, generator):
            # Causal attention over right-padded rows: the columns past a batch's longest row are
            # padding no labelled position can see, so cutting them changes no loss term.
            width = int(input_lengths[rows].max())
            rows = torch.from_numpy(rows)
            loss = loss_of(model, inputs[rows, :width], targets[rows, :width], args.loss, n_items, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        val = evaluate(model, *examples["val"])
        curve.append({"epoch": epoch, "train_loss": total / len(inputs), "val_ndcg@10": val["ndcg@10"]})
        print(f"epoch {epoch} loss {total / len(inputs):.4f} val ndcg@10 {val['ndcg@10']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if val["ndcg@10"] > best["val"]["ndcg@10"]:
            best = {"epoch": epoch, "val": val, "test": evaluate(model, *examples["test"])}
        elif epoch - best["epoch"] >= args.patience:
            break
    result = {"model": "SASRec (item ids only)", "args": vars(args), "n_items": n_items,
              "n_train_sequences": len(inputs), "epochs_run": epoch, "best_epoch": best["epoch"],
              "val": best["val"], "test": best["test"], "wall_s": time.perf_counter() - start, "curve": curve}
    print(json.dumps({k: result[k] for k in ("best_epoch", "epochs_run", "val", "test", "wall_s")}, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
