"""Config of the DeepSpeed trainer and its launchers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rpg_dist.errors import ConfigError


@dataclass(kw_only=True)
class TrainConfig:
    # "ray": Ray Train TorchTrainer; "torchrun": the caller started the processes (torchrun or the
    # deepspeed launcher); "local": one process, no launcher (tests, notebooks).
    launcher: Literal["ray", "torchrun", "local"] = "ray"
    num_workers: int = 1
    use_gpu: bool = False
    # Fractional CPUs per Ray Train worker: whole CPUs can deadlock a 2-core box (STACK-NOTES).
    cpus_per_worker: float = 1.0
    # Sequences (training windows) per optimizer step, summed over workers and accumulation.
    batch_size: int = 256
    # Windows per worker per forward pass; None = batch_size / num_workers (no accumulation).
    micro_batch_size: int | None = None
    lr: float = 0.01
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 10_000
    epochs: int = 160
    # Stop after this many optimizer steps (smoke runs); None = run all epochs.
    max_steps: int | None = None
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 0
    # "auto": bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = 1
    patience: int = 20
    log_every: int = 50
    max_failures: int = 1

    def __post_init__(self) -> None:
        for name in ("num_workers", "batch_size", "epochs", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        micro = self.micro_batch_size or self.batch_size // self.num_workers
        if micro < 1 or self.batch_size % (micro * self.num_workers):
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by micro_batch_size ({micro}) "
                f"x num_workers ({self.num_workers})"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps: must be >= 1 or null")
        if self.lr <= 0:
            raise ConfigError("lr: must be > 0")

    @property
    def micro_batch(self) -> int:
        """Windows per worker per forward pass."""
        return self.micro_batch_size or self.batch_size // self.num_workers

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch * self.num_workers)
