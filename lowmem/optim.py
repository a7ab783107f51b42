"""Optimizer and learning-rate schedule from the config."""
from __future__ import annotations

import math

import torch

from config import TrainConfig

from .errors import UserError

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of learn_rate for optimizer step `step` (0-based).

    Linear warmup from 1/div_factor to 1 over warmup_steps, then cosine (or linear) decay to
    min_lr_ratio at total_steps; constant holds 1 after warmup.
    """
    start = 1.0 / cfg.div_factor if cfg.div_factor > 0 else 0.0
    if step < cfg.warmup_steps:
        return start + (1.0 - start) * step / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.lr_scheduler == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA); no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.learn_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=on_cuda or None)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.lr_scheduler not in SCHEDULES:
        raise UserError(f"lr_scheduler '{cfg.lr_scheduler}' is unknown; choose one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
