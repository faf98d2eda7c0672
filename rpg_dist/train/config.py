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
    # Intra-op threads per worker; 0 = the node's cores / workers on the node (Ray's logical CPUs
    # are for scheduling and would leave cores idle).
    torch_threads: int = 0
    # Serve activations from glibc's heap (trimmed every 16 steps) instead of fresh mmaps: ~5x fewer
    # page faults, ~0.3 s less system time per Beauty step on CPU (see runtime.HeapReuse).
    reuse_freed_memory: bool = True
    # Sequences (training windows) per optimizer step, summed over workers and accumulation.
    batch_size: int = 256
    # Windows per worker per forward pass; None = batch_size / num_workers (no accumulation).
    micro_batch_size: int | None = None
    lr: float = 0.01
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Linear warmup from 0 over this many optimizer steps, then cosine decay to 0 at the last step
    # of `epochs` (the reference code's transformers "cosine" schedule).
    warmup_steps: int = 10_000
    # When set, the warmup is this share of the run's total steps instead of warmup_steps, so a
    # schedule carries over to a dataset of another size (configs/beauty.yaml's 10,000 of
    # 160 x 101 steps is 0.62). None: warmup_steps as given.
    warmup_fraction: float | None = None
    epochs: int = 160
    # Stop after this many optimizer steps (smoke runs); None = run all epochs.
    max_steps: int | None = None
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 0
    # "auto": bf16 on GPU, fp32 on CPU. "bf16"/"fp16": DeepSpeed mixed precision (bf16 or fp16
    # weights, fp32 master copy). "bf16-autocast": fp32 weights and optimizer, bf16 matmuls under
    # torch.autocast (about 2x faster on CPUs with avx512_bf16).
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-autocast"] = "auto"
    # torch.compile the digit heads, cosine logits and loss (RPG.compile_label_loss): a bf16 Beauty step
    # 0.53 -> 0.45 s in the trainer on a 2-core CPU (BENCHMARKS.md). Needs a C++ compiler on CPU (triton on
    # GPU) and costs ~5-30 s at the first step of each process; off for short runs and tests.
    compile: bool = False
    # A new order of all the windows every epoch (seeded by seed and epoch), dealt to the workers:
    # the same batches under every launcher (windows.EpochBatches). Off only for tests that compare
    # runs step by step in file order.
    shuffle: bool = True
    eval_every: int = 1
    # Validation users: a seeded sample of this many (0: all), so that a validation pass costs
    # O(val_users x items) whatever the number of users; the final evaluation keeps every user.
    val_users: int = 20_000
    # "full": rank every item (the reference code's validation); "graph": decode through a graph of
    # the current token table with the decode section's settings (built in-process each validation),
    # so that validation measures what serving does at a cost set by the beams, not the catalogue.
    val_decoding: Literal["full", "graph"] = "full"
    # Early stopping: stop after this many epochs without a better validation NDCG@10.
    patience: int = 20
    log_every: int = 50
    # Save a resumable DeepSpeed checkpoint every this many epochs (and at the end).
    checkpoint_every: int = 1
    # Complete checkpoints kept (older ones are deleted once a newer one is committed).
    keep_checkpoints: int = 2
    # Resume from the newest complete checkpoint under RUN_DIR/checkpoints when there is one.
    resume: bool = True
    # Ray Train restarts of the worker group after a worker dies (resuming from the last checkpoint).
    max_failures: int = 1

    def __post_init__(self) -> None:
        for name in ("num_workers", "batch_size", "epochs", "eval_every", "log_every",
                     "checkpoint_every", "keep_checkpoints"):
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
        for name in ("warmup_steps", "patience", "max_failures", "torch_threads", "val_users"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction: {self.warmup_fraction} must be in [0, 1) or null")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip: must be >= 0 (0 disables clipping)")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker: must be > 0")
        if self.launcher == "local" and self.num_workers != 1:
            raise ConfigError(f"num_workers: launcher 'local' runs one process, got {self.num_workers}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ConfigError("precision: fp16 needs use_gpu=true (use fp32 or bf16-autocast on CPU)")

    @property
    def micro_batch(self) -> int:
        """Windows per worker per forward pass."""
        return self.micro_batch_size or self.batch_size // self.num_workers

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps`` optimizer steps."""
        if self.warmup_fraction is None:
            return self.warmup_steps
        return round(self.warmup_fraction * total_steps)

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch * self.num_workers)
