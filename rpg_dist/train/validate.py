"""Validation during training: full-ranking Recall/NDCG@k on this rank's validation examples.

Every item is scored, as the reference code validates, but only the held-out target's rank is
needed, so there is no top-k sort: rank = #items scoring higher + #lower-row items scoring the same
(ties go to the lower item row, as in full ranking). ``decode.scoring.target_ranks`` does it block by
block with the one scorer every caller uses, so memory is one (item block x 64) score block and the
cost is O(validation users x items): the windows hold a seeded sample of ``train.val_users`` users.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from rpg_dist.decode.scoring import target_ranks
from rpg_dist.evaluation.config import EvalConfig
from rpg_dist.model.rpg import RPG
from rpg_dist.train.windows import history_batches


@torch.inference_mode()
def validation_sums(model: RPG, examples: pa.Table | None, cfg: EvalConfig, device: torch.device,
                    decode=None) -> torch.Tensor:
    """Per-metric sums over this rank's examples, ready for an all-reduce.

    Args:
        decode: ``(GraphDecoder, start_fn)`` to validate graph decoding instead of full ranking:
            ``start_fn(items, lengths)`` gives each query's (B, b) start rows; a target outside the
            decoded top max(ks) counts as a miss.

    Returns:
        (1 + 2 * len(ks),) float64: the example count, then recall@k and ndcg@k sums per k in
        sorted ``cfg.ks``.
    """
    model.eval()
    ks = sorted(cfg.ks)
    sums = torch.zeros(1 + 2 * len(ks), dtype=torch.float64)
    for batch in history_batches(examples, cfg.batch_size):
        items, lengths, targets = batch["items"].to(device), batch["lengths"].to(device), batch["target"].to(device)
        log_probs = model.next_token_log_probs(items, lengths)
        if decode is None:
            ranks = target_ranks(log_probs, model.item_codes, targets, cfg.item_block_size)
        else:
            decoder, start_fn = decode
            top = decoder.decode(log_probs.float().cpu(), start_fn(items.cpu(), lengths.cpu()), max(ks)).items
            hit = top == targets.cpu().long().unsqueeze(1)
            ranks = torch.where(hit.any(1), hit.int().argmax(1), max(ks))  # a miss ranks past every k
        ranks = ranks.cpu().double()
        sums[0] += len(ranks)
        for i, k in enumerate(ks):
            inside = ranks < k
            sums[1 + 2 * i] += inside.sum()
            sums[2 + 2 * i] += torch.where(inside, 1.0 / torch.log2(ranks + 2.0), 0.0).sum()
    return sums


def metrics_from_sums(sums: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Means from all-reduced ``validation_sums``."""
    count = max(float(sums[0]), 1.0)
    out = {}
    for i, k in enumerate(sorted(ks)):
        out[f"recall@{k}"] = float(sums[1 + 2 * i]) / count
        out[f"ndcg@{k}"] = float(sums[2 + 2 * i]) / count
    return out
