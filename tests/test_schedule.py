"""The optimizer the trainer builds, against the paper's formulas: linear warmup then half-cosine
to 0 (transformers' "cosine" schedule, which the reference code uses), AdamW's decoupled weight
decay, and gradient clipping to ``grad_clip`` (global norm), through a real DeepSpeed engine."""

from __future__ import annotations

import math

import pytest
import torch

from rpg_dist.errors import ConfigError
from rpg_dist.train.config import TrainConfig
from rpg_dist.train.engine import build_engine


def paper_lr(step: int, lr: float, warmup: int, total: int) -> float:
    """transformers.get_cosine_schedule_with_warmup, written from its definition."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def engine_for(model: torch.nn.Module, total_steps: int, **train):
    cfg = TrainConfig(launcher="local", batch_size=4, **train)
    return build_engine(model, cfg, total_steps), cfg


@pytest.fixture(scope="module")
def dist_env():
    from rpg_dist.train.runtime import init_process_group

    init_process_group(use_gpu=False)  # the one-process gloo group the trainer's tests share


def test_lr_follows_warmup_then_cosine_to_zero(dist_env):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    total, warmup, lr = 40, 10, 0.01
    engine, _ = engine_for(model, total, lr=lr, warmup_steps=warmup)
    seen = []
    for _ in range(total):
        seen.append(engine.get_lr()[0])
        engine.backward(model(torch.randn(4, 3)).pow(2).mean())
        engine.step()
    expected = [paper_lr(s, lr, warmup, total) for s in range(total)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[0] == 0 and max(seen) == pytest.approx(lr) and seen[-1] < lr * 0.01


@pytest.mark.parametrize("total", [1_000, 16_160])
def test_warmup_fraction_scales_with_the_run(total):
    cfg = TrainConfig(launcher="local", warmup_fraction=0.1)
    assert cfg.warmup_for(total) == total // 10
    assert TrainConfig(launcher="local", warmup_steps=10_000).warmup_for(total) == 10_000
    with pytest.raises(ConfigError, match="warmup_fraction"):
        TrainConfig(launcher="local", warmup_fraction=1.0)


def test_weight_decay_is_decoupled_and_scaled_by_the_lr(dist_env):
    """A zero gradient leaves Adam's moments at 0: the step is AdamW's decay p <- p (1 - lr_t wd)."""
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 4.0]]))
    engine, _ = engine_for(model, 10, lr=0.1, warmup_steps=0, weight_decay=0.5)
    lr_t = engine.get_lr()[0]
    engine.backward(model(torch.zeros(4, 3)).sum())  # zero input: zero gradient
    engine.step()
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.0, -2.0, 4.0]]) * (1 - lr_t * 0.5))


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_gradients_are_clipped_to_grad_clip_global_norm(dist_env, clip):
    """Adam's first moment after one step is (1 - beta1) x the gradient it was given: the gradient
    of norm 10 arrives scaled to norm ``clip`` (unclipped when clip is 0)."""
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    engine, cfg = engine_for(model, 10, lr=0.1, warmup_steps=0, grad_clip=clip)
    x = torch.tensor([[6.0, 8.0]]).repeat(4, 1)  # d(sum w.x)/dw = (6, 8) per row: mean is norm 10
    engine.backward(model(x).mean())
    engine.step()
    exp_avg = engine.optimizer.state[model.weight]["exp_avg"]
    scale = clip / 10 if clip else 1.0
    torch.testing.assert_close(exp_avg, (1 - cfg.adam_beta1) * torch.tensor([[6.0, 8.0]]) * scale)
