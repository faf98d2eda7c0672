"""The DeepSpeed engine: ZeRO stage, optimizer, schedule and precision from ``TrainConfig``.

Nothing here compiles a DeepSpeed op: the optimizer is torch's AdamW passed as a client optimizer
(FusedAdam and CPUAdam would each build a C++ extension on first use, STACK-NOTES).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from typing import Any

import torch

from rpg_dist.errors import StageError
from rpg_dist.model.rpg import RPG
from rpg_dist.train.config import TrainConfig


def resolved_precision(cfg: TrainConfig) -> str:
    """"auto" -> bf16 on GPU, fp32 on CPU."""
    if cfg.precision == "auto":
        return "bf16" if cfg.use_gpu else "fp32"
    return cfg.precision


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run."""
    precision = resolved_precision(cfg)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Keep every parameter partitioned: RPG's layers are all small, and the default threshold
        # would leave most of them replicated, which hides ZeRO-3 bugs in tests.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # torch's AdamW under ZeRO is a supported path but not on DeepSpeed's tested list.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup from 0, then half-cosine to 0 at ``total_steps`` (transformers' "cosine")."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def build_engine(model: RPG, cfg: TrainConfig, total_steps: int):
    """``deepspeed.initialize`` with AdamW and the warmup + cosine schedule over ``total_steps``.

    Returns:
        The DeepSpeed engine (it owns the optimizer and steps the scheduler at each optimizer step).
    """
    import deepspeed

    # fused: one kernel per parameter for the whole update (CPU and CUDA), the same arithmetic as
    # the per-op loop, which on CPU took ~0.05 s of a 0.6 s Beauty step.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_for(total_steps), total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    return engine


def check_compile_toolchain(device: torch.device) -> None:
    """train.compile needs a C compiler where the worker runs: inductor builds C++ kernels on CPU,
    and triton builds its launcher with one on GPU. Refuse before the first step, not inside it."""
    names = ("CXX", "g++", "c++", "clang++") if device.type == "cpu" else ("CC", "gcc", "cc", "clang")
    found = [n for n in names if (os.environ.get(n) if n.isupper() else shutil.which(n))]
    if not found:
        raise StageError(f"train.compile: no C{'++' if device.type == 'cpu' else ''} compiler on "
                         f"{os.uname().nodename} (looked for {', '.join(names)}); install one "
                         "(e.g. build-essential) or set train.compile=false")


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for "bf16-autocast", else nothing."""
    if resolved_precision(cfg) != "bf16-autocast":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's full fp32 parameters on CPU, on every rank (a collective under ZeRO-3)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    gathered = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    with gathered:
        return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in module.named_parameters()}


def local_grad_norm(engine) -> torch.Tensor | None:
    """Norm of the (already data-parallel-reduced) gradients held on the module, before the step.

    DeepSpeed's ZeRO optimizers record the global norm themselves; without ZeRO, clipping happens
    inside torch and the norm is not kept, so the loop measures it here on log steps.
    """
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def grad_norm(engine, before_step: torch.Tensor | None) -> float:
    """The global gradient norm of the last optimizer step (before clipping)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = before_step
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)
