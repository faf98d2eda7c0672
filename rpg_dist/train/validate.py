"""Validation during training: full-ranking Recall/NDCG@k on this rank's validation examples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rpg_dist.decode.scoring import full_ranking_topk
from rpg_dist.evaluation.config import EvalConfig
from rpg_dist.evaluation.metrics import ranking_metrics
from rpg_dist.model.rpg import RPG
from rpg_dist.train.windows import history_batches


@torch.no_grad()
def validation_sums(model: RPG, examples: pa.Table | None, cfg: EvalConfig, device: torch.device, autocast) -> torch.Tensor:
    """Per-metric sums over this rank's examples, ready for an all-reduce.

    Every item is scored (blocked over ``cfg.item_block_size`` items, so memory stays
    O(batch x block)), the way the reference code validates.

    Returns:
        (1 + 2 * len(ks),) float64: the example count, then recall@k and ndcg@k sums per k in ``ks``.
    """
    model.eval()
    ks = sorted(cfg.ks)
    codes = model.item_codes  # (n_items, m)
    ranked, targets = [], []
    for batch in history_batches(examples, cfg.batch_size):
        with autocast:
            log_probs = model.next_token_log_probs(batch["items"].to(device), batch["lengths"].to(device))
        rows, _ = full_ranking_topk(log_probs.float(), codes, max(ks), cfg.item_block_size)
        ranked.append(rows.cpu().numpy())
        targets.append(batch["target"].numpy())
    sums = torch.zeros(1 + 2 * len(ks), dtype=torch.float64)
    if not ranked:
        return sums
    ranked_all, targets_all = np.concatenate(ranked), np.concatenate(targets)
    means = ranking_metrics(ranked_all, targets_all, ks)
    sums[0] = len(targets_all)
    for i, k in enumerate(ks):
        sums[1 + 2 * i] = means[f"recall@{k}"] * len(targets_all)
        sums[2 + 2 * i] = means[f"ndcg@{k}"] * len(targets_all)
    return sums


def metrics_from_sums(sums: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Means from all-reduced ``validation_sums``."""
    count = max(float(sums[0]), 1.0)
    out = {}
    for i, k in enumerate(sorted(ks)):
        out[f"recall@{k}"] = float(sums[1 + 2 * i]) / count
        out[f"ndcg@{k}"] = float(sums[2 + 2 * i]) / count
    return out
