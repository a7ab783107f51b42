"""Optimizer and learning-rate schedule from the config."""
from __future__ import annotations

import math

import torch

from config import TrainConfig

from ..run.errors import UserError

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "adamw_4bit", "adafactor")


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
    """The configured optimizer; no weight decay on biases and norms.

    adamw: torch AdamW, fused (CUDA and CPU), fp32 states (with bf16_weights: torchao's AdamW with bf16
    stochastic rounding). adamw_8bit / adamw_4bit: torchao's compact states. adafactor: as in the
    original trainer but with relative_step=False, so learn_rate and the schedule take effect.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer '{cfg.optimizer}' is unknown; choose one of {', '.join(OPTIMIZERS)}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # under ZeRO-3 (zero.Init) a parameter is an empty 1-d placeholder; ds_shape is its real shape
            (no_decay if len(getattr(param, "ds_shape", param.shape)) < 2 else decay).append(param)
    # DeepSpeed drops empty groups, which would leave the scheduler with more base_lrs than param_groups
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    adam = {"lr": cfg.learn_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learn_rate, relative_step=False, scale_parameter=False, warmup_init=False)
    if cfg.optimizer == "adamw" and not cfg.bf16_weights:
        # fused: one kernel per step on CUDA and CPU, and it can skip a non-finite step without a host sync
        return torch.optim.AdamW(groups, fused=True, **adam)
    try:
        from torchao import optim as ao_optim

        from ..run.compat import torchao_adamw
    except ImportError:
        raise UserError(f"optimizer={cfg.optimizer} with bf16_weights={cfg.bf16_weights} needs torchao; "
                        "pip install torchao, or use --optimizer=adamw --bf16_weights=False") from None
    cls = {"adamw": torchao_adamw(), "adamw_8bit": ao_optim.AdamW8bit, "adamw_4bit": ao_optim.AdamW4bit}[cfg.optimizer]
    return cls(groups, bf16_stochastic_round=cfg.bf16_weights, **adam)


def allow_optimizer_state_types() -> None:
    """Let weights_only loading accept torchao's compact optimizer-state tensors."""
    try:
        from torchao.optim.subclass_4bit import OptimState4bit
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:
        return
    torch.serialization.add_safe_globals([OptimState8bit, OptimState4bit])


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.lr_scheduler not in SCHEDULES:
        raise UserError(f"lr_scheduler '{cfg.lr_scheduler}' is unknown; choose one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
