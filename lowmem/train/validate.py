"""Every rule a TrainConfig's values must follow, checked once before anything is built.

`check_config(cfg)` raises a one-line UserError for the first bad value: a choice outside its
`Literal[...]`, a number outside the range its field declares, or two fields that contradict each other. It reads only
the config (no files, no devices), so `show_config` refuses exactly what `train` would.
"""
from __future__ import annotations

import difflib
import typing

from config import MODEL_PRESETS, TrainConfig

from ..fields import choice_error, field_types, out_of_range, rules
from ..run.errors import UserError

TRACKERS = ("tensorboard", "wandb")


def _check_choices(cfg: TrainConfig) -> None:
    """Literal fields set in code (not parsed from flags) still take only their choices."""
    for name, type_ in field_types(type(cfg)).items():
        if typing.get_origin(type_) is typing.Literal and getattr(cfg, name) not in typing.get_args(type_):
            raise choice_error(name, getattr(cfg, name), typing.get_args(type_))


def _check_ranges(cfg: TrainConfig) -> None:
    """Each number within the range its field declares (config.py), and finite."""
    for name, meta in rules(type(cfg)).items():
        problem = out_of_range(name, getattr(cfg, name), meta.get("range"))
        if problem:
            raise UserError(problem)


def _check_names(cfg: TrainConfig) -> None:
    if cfg.model_preset not in MODEL_PRESETS:
        near = difflib.get_close_matches(cfg.model_preset, list(MODEL_PRESETS), n=1)
        raise UserError(f"model_preset '{cfg.model_preset}' does not exist; choose one of {', '.join(MODEL_PRESETS)}"
                        + (f" (closest: {near[0]})" if near else ""))
    for tracker in (t for t in cfg.report_to.replace(" ", "").split(",") if t and t != "none"):
        if tracker not in TRACKERS:
            raise UserError(f"report_to '{tracker}' is unknown; use tensorboard, wandb, both comma-separated, or none")


def _check_gradient_checkpointing(cfg: TrainConfig) -> None:
    from ..model import recompute  # imports torch: only when a config is checked, not when the CLI starts

    recompute.check_options(cfg.gradient_checkpointing, cfg.gradient_checkpointing_mode,
                            cfg.gradient_checkpointing_every)


def _check_combinations(cfg: TrainConfig) -> None:
    if cfg.chunked_cross_entropy is True and cfg.use_liger_kernel:
        raise UserError("--chunked_cross_entropy and --use_liger_kernel both replace the loss; pick one "
                        "(liger's is a fused GPU kernel, the chunked one runs anywhere)")
    if cfg.gradient_checkpointing_offload and not cfg.gradient_checkpointing:
        raise UserError("--gradient_checkpointing_offload=True moves what checkpointed blocks keep; add "
                        "--gradient_checkpointing=True or drop it")
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
    from ..model.adapters import check_lora_config

    check_lora_config(cfg)
