"""Where rank 0's training metrics go: the log, TensorBoard and the final plot, behind one interface."""

from __future__ import annotations

import io as _bytes_io
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

from rpg_dist import io

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

log = logging.getLogger("rpg_dist.train")


class MetricSinks:
    """Console line + TensorBoard scalars; a no-op on ranks other than 0.

    TensorBoard writes to a local folder; for a remote ``tb_uri`` that folder is uploaded on
    ``flush`` (after each validation) and on ``close``.
    """

    def __init__(self, enabled: bool, tb_uri: str, storage: StorageConfig | None = None) -> None:
        self.enabled, self.tb_uri, self.storage = enabled, tb_uri, storage
        self.writer = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if io.is_local(tb_uri):
            local = io.filesystem(tb_uri)[1]
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="rpg-tb-")
            local = self._tmp.name
        self.writer = SummaryWriter(local, flush_secs=30)

    def step(self, fields: dict[str, Any]) -> None:
        """One fixed-format line, and the scalars under ``train/``."""
        if not self.enabled:
            return
        log.info(
            "step %(step)d | epoch %(epoch)d | loss %(loss).4f | lr %(lr).3e | grad_norm %(grad_norm).3f "
            "| %(seq_per_s).0f seq/s",
            fields,
        )
        for key in ("loss", "lr", "grad_norm", "seq_per_s"):
            self.writer.add_scalar(f"train/{key}", fields[key], fields["step"])

    def epoch(self, epoch: int, step: int, scalars: dict[str, float]) -> None:
        """Per-epoch scalars (train loss, validation metrics)."""
        if not self.enabled:
            return
        log.info("epoch %d (step %d): %s", epoch, step,
                 ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, epoch)
        self.flush()

    def flush(self) -> None:
        if not self.enabled or self.writer is None:
            return
        self.writer.flush()
        if self._tmp is not None:
            for name in os.listdir(self._tmp.name):
                io.upload_file(os.path.join(self._tmp.name, name), io.join(self.tb_uri, name), self.storage)

    def close(self) -> None:
        """Flush and release the writer (idempotent)."""
        if not self.enabled or self.writer is None:
            return
        self.flush()
        self.writer.close()
        self.writer = None
        if self._tmp is not None:
            self._tmp.cleanup()


def write_training_plot(history: list[dict[str, Any]], steps: list[dict[str, Any]], uri: str,
                        storage: StorageConfig | None = None) -> None:
    """``training.png``: training loss (logged steps and epoch means) and validation NDCG@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="logged steps")
    epochs = [h for h in history if "train_loss" in h]
    if epochs:
        ax_loss.plot([h["step"] for h in epochs], [h["train_loss"] for h in epochs], "o-", ms=3, label="epoch mean")
    ax_loss.set(xlabel="optimizer step", ylabel="loss (mean CE over digits)", title="training loss")
    ax_loss.legend()
    val = [h for h in history if "val/ndcg@10" in h]
    ax_val.plot([h["epoch"] for h in val], [h["val/ndcg@10"] for h in val], "o-", ms=3, color="tab:green")
    ax_val.set(xlabel="epoch", ylabel="NDCG@10", title="validation NDCG@10 (full ranking)")
    fig.tight_layout()
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    io.write_bytes(uri, buffer.getvalue(), storage)
