"""Every rule a TrainConfig's values must follow, checked once before anything is built.

`check_config(cfg)` raises a one-line UserError for the first bad value: a choice outside its
`Literal[...]`, a number outside its range, or two fields that contradict each other. It reads only
the config (no files, no devices), so `show_config` refuses exactly what `train` would.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing

from config import MODEL_PRESETS, TrainConfig

from .cli import choice_error, field_types
from .errors import UserError

TRACKERS = ("tensorboard", "wandb")


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a number: low <= v (low < v when low_open), v <= high (v < high when high_open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"greater than {low}" if self.low_open else f"at least {low}"
        if self.low is None:
            return f"below {high}" if self.high_open else f"at most {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {high}{right}"


def _number(value) -> str:
    """2**32 - 1 as 4294967295, not 4.29497e+09; 0.5 as 0.5."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)

RANGES: dict[str, Range] = {
    # counts that must be at least 1 (the original trainer's check_values)
    **{name: AT_LEAST_1 for name in ("batch_size_per_gpu", "gradient_accumulation_steps", "epochs", "logging_steps",
                                     "eval_steps", "save_steps", "keep_latest_n_ckp", "dataloader_buffer_size",
                                     "max_nonfinite_steps", "prefetch_batches")},
    "max_seq_len": Range(8, hint="a sample needs room for a prompt, a response and the end token"),
    "max_steps": Range(0, hint="0: --epochs sets the length"),
    "warmup_steps": Range(0, hint="0: no warmup"),
    "eval_max_batches": Range(0, hint="0: the whole validation file"),
    "test_generation_samples": Range(0, hint="0: skip"),
    "max_history_items": AT_LEAST_0,
    "seed": Range(0, 2**32 - 1, hint="the range numpy seeds take"),
    "learn_rate": Range(0, low_open=True, hint="try 3e-4"),
    "div_factor": Range(1, hint="warmup starts at learn_rate / div_factor; 1: no warmup ramp"),
    "min_lr_ratio": Range(0, 1, hint="the schedule ends at learn_rate * min_lr_ratio"),
    "weight_decay": AT_LEAST_0,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_eps": POSITIVE,
    "max_grad_norm": Range(0, hint="0 disables clipping"),
    "max_gpu_memory_gb": Range(0, hint="0: the whole card"),
    "dropout": FRACTION,
    "ema_decay": FRACTION,
    "lora_r": Range(0, hint="0: full fine-tuning"),
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    "early_stopping_patience": Range(0, hint="0 turns it off"),
    "early_stopping_threshold": AT_LEAST_0,
    "val_ratio": FRACTION,
    "max_samples_per_user": Range(1, hint="or None for no cap"),
}


def _check_choices(cfg: TrainConfig) -> None:
    """Literal fields set in code (not parsed from flags) still take only their choices."""
    for name, type_ in field_types(type(cfg)).items():
        if typing.get_origin(type_) is typing.Literal and getattr(cfg, name) not in typing.get_args(type_):
            raise choice_error(name, getattr(cfg, name), typing.get_args(type_))


def _check_ranges(cfg: TrainConfig) -> None:
    for name, allowed in RANGES.items():
        value = getattr(cfg, name)
        if value is None:  # Optional fields: None is their "no limit"
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name}={value} must be a finite number {allowed.describe()}")
        if not allowed.holds(value):
            hint = f" ({allowed.hint})" if allowed.hint else ""
            raise UserError(f"--{name}={value} must be {allowed.describe()}{hint}")
    for field in dataclasses.fields(cfg):  # float fields without a range, too
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{field.name}={value} must be a finite number")


def _check_names(cfg: TrainConfig) -> None:
    if cfg.model_preset not in MODEL_PRESETS:
        near = difflib.get_close_matches(cfg.model_preset, list(MODEL_PRESETS), n=1)
        raise UserError(f"model_preset '{cfg.model_preset}' does not exist; choose one of {', '.join(MODEL_PRESETS)}"
                        + (f" (closest: {near[0]})" if near else ""))
    for tracker in (t for t in cfg.report_to.replace(" ", "").split(",") if t and t != "none"):
        if tracker not in TRACKERS:
            raise UserError(f"report_to '{tracker}' is unknown; use tensorboard, wandb, both comma-separated, or none")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage={cfg.zero_stage} is not a ZeRO stage; use 1, 2 or 3 (0: off)")


def _check_gradient_checkpointing(cfg: TrainConfig) -> None:
    from . import recompute  # imports torch: only when a config is checked, not when the CLI starts

    recompute.check_options(cfg.gradient_checkpointing, cfg.gradient_checkpointing_mode,
                            cfg.gradient_checkpointing_every)


def _check_combinations(cfg: TrainConfig) -> None:
    if cfg.chunked_cross_entropy and cfg.use_liger_kernel:
        raise UserError("--chunked_cross_entropy and --use_liger_kernel both replace the loss; pick one "
                        "(liger's is a fused GPU kernel, the chunked one runs anywhere)")
    if cfg.use_liger_kernel and cfg.torch_compile:
        raise UserError("--use_liger_kernel and --torch_compile do not combine (dynamo cannot trace liger's fused "
                        "cross-entropy); pick one")
    if cfg.freeze_encoder and not cfg.finetune_from_ckp_file and cfg.model_type != "t5":
        raise UserError(f"--freeze_encoder applies to encoder-decoder models (T5), not model_type={cfg.model_type}; "
                        "use --freeze_embeddings instead")


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are legal but probably not meant (printed in the start-up summary, not refused)."""
    warnings = []
    if cfg.max_steps > 0 and cfg.warmup_steps > cfg.max_steps:
        # legal: the first part of a longer run resumed later with a larger --max_steps
        warnings.append(f"--warmup_steps={cfg.warmup_steps} is more than --max_steps={cfg.max_steps}, so this run "
                        f"ends before the learning rate reaches --learn_rate; pass --warmup_steps={cfg.max_steps // 10} "
                        f"(or any value up to {cfg.max_steps}) unless a resume will continue the schedule")
    return warnings


def check_config(cfg: TrainConfig) -> None:
    """Raise a one-line UserError for the first value of `cfg` that is out of range or contradicts another."""
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_names(cfg)
    _check_gradient_checkpointing(cfg)
    _check_combinations(cfg)
    from .adapters import check_lora_config

    check_lora_config(cfg)
