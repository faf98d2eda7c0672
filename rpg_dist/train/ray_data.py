"""Training micro-batches from Ray Data's per-worker shard (launcher "ray")."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from rpg_dist.train.windows import collate_windows


class WindowsCollate(ArrowBatchCollateFn):
    """Arrow batch of windows -> padded model inputs (the same function as the parquet path)."""

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return collate_windows(batch)


class RayShardBatches:
    """Epoch-seeded micro-batches from ``ray.train.get_dataset_shard("train")``.

    Ray's equal split gives every worker the same number of rows; each epoch shuffles locally
    through a ``buffer``-window buffer seeded by (seed, epoch, rank).
    """

    def __init__(self, shard, micro: int, n_micro: int, seed: int, rank: int, shuffle: bool, buffer: int) -> None:
        self.shard, self.micro, self.n_micro = shard, micro, n_micro
        self.seed, self.rank, self.shuffle, self.buffer = seed, rank, shuffle, buffer

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The ``n_micro`` micro-batches of ``epoch`` after the first ``skip``; the rest is drained
        so that every worker finishes the epoch's stream together."""
        batches = self.shard.iter_torch_batches(
            batch_size=self.micro,
            collate_fn=WindowsCollate(),
            local_shuffle_buffer_size=self.buffer if self.shuffle else None,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch * 1_009 + self.rank) if self.shuffle else None,
            device="cpu",
        )
        for i, batch in enumerate(batches):
            if skip <= i < self.n_micro:
                yield batch
