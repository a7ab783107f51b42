"""The settings check of a resume: which checkpoint, and whether this run's settings may continue it.

Each config field declares its resume rule where it is declared (config.py, lowmem/fields.py):
REFUSED fields are recorded in the checkpoint's fingerprint and a change is always refused; DATA
fields too, unless --allow_config_change=True; APPLIED fields that changed take effect and are logged;
FREE fields are not compared. Everything here happens before any weight is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..fields import APPLIED, DATA, REFUSED, names_with
from ..run.errors import UserError
from .files import list_checkpoints, read_train_state, verify

# settings the optimizer's param groups hold: a change on resume is written into them
OPTIMIZER_SETTINGS = ("learn_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")


def fingerprint(cfg, world: int, vocab_size: int) -> dict:
    """What a checkpoint records of the run's settings, to compare on resume: every REFUSED and DATA field."""
    names = names_with(type(cfg), REFUSED) + names_with(type(cfg), DATA)
    values = {name: getattr(cfg, name) for name in names}
    values["vocab_size"] = vocab_size
    values["global_batch"] = cfg.batch_size_per_gpu * world * cfg.gradient_accumulation_steps
    values["world_size"] = world
    return values


@dataclass
class ResumePlan:
    """The checkpoint a resume starts from, what changed, and the older verified ones to fall back to."""

    path: str
    saved: dict
    learn_rate: float  # this run's peak learning rate, which the restored schedule takes
    changed: dict = field(default_factory=dict)  # name -> (old, new) of APPLIED fields
    resharded: bool = False  # another process count: the data position is recomputed, RNG states are not restored
    fallbacks: list = field(default_factory=list)

    @property
    def changes_optimizer(self) -> bool:
        return bool(set(self.changed) & set(OPTIMIZER_SETTINGS))


def _differences(old: dict, new: dict, names) -> dict:
    return {k: (old[k], new[k]) for k in names if k in old and k in new and old[k] != new[k]}


def _describe(changes: dict) -> str:
    return ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changes.items())


def plan_resume(cfg, new_fingerprint: dict, log) -> ResumePlan | None:
    """Pick and verify the checkpoint to resume from and check the settings, before any weight is loaded.

    None when the run has no checkpoint yet (a resumed job that never saved starts from step 0).
    """
    root = cfg.checkpoint_dir()
    complete, incomplete = list_checkpoints(root)
    if not complete and not incomplete:
        return None
    usable, problems = [], []
    for path in reversed(complete):
        try:
            verify(path)
            usable.append((path, read_train_state(path)))
            break  # older ones are verified only if this one fails to load
        except (OSError, ValueError) as exc:
            problems.append(f"{os.path.basename(path)}: {str(exc).splitlines()[0][:200]}")
            log(f"checkpoint {path} is unusable ({problems[-1].split(': ', 1)[1]}); trying the previous one")
    if not usable:
        listed = problems + [f"{os.path.basename(p)}: incomplete (no manifest)" for p in incomplete]
        raise UserError(f"resume refused: no usable checkpoint in {root} ({'; '.join(listed)}); nothing was loaded or "
                        "changed. Start over with --overwrite_output_dir=True, or restore a checkpoint")
    path, saved = usable[0]
    old = saved.get("fingerprint", {})
    refused = _differences(old, new_fingerprint, names_with(type(cfg), REFUSED) + ("vocab_size",))
    if refused:
        raise UserError(f"resume refused: {_describe(refused)}; the checkpoints in {root} hold another model or "
                        "optimizer and are kept as they are. Resume with the old settings, or start a new run with "
                        "another --run_name (e.g. --finetune_from_ckp_file=<checkpoint>/model)")
    data = _differences(old, new_fingerprint, names_with(type(cfg), DATA) + ("global_batch",))
    if data and not cfg.allow_config_change:
        raise UserError(f"resume refused: {_describe(data)}; pass --allow_config_change=True to continue anyway (the "
                        "run will not be exact; a changed batch continues without repeating or skipping a sample)")
    changed = _differences(saved.get("config", {}), vars(cfg), names_with(type(cfg), APPLIED))
    resharded = old.get("world_size", new_fingerprint["world_size"]) != new_fingerprint["world_size"]
    return ResumePlan(path, saved, cfg.learn_rate, changed, resharded,
                      list(reversed(complete[:complete.index(path)])))


def optimizer_hyperparameters(optimizer) -> list[dict]:
    """The param groups' settings as built from this run's config (saved before a checkpoint overwrites them)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in getattr(optimizer, "param_groups", [])]


def apply_settings(optimizer, scheduler, fresh_groups: list[dict], learn_rate: float) -> None:
    """After loading saved state: the param groups take this run's hyperparameters, the schedule its peak lr."""
    import torch

    from ..run.compat import set_scheduler_last_lr

    groups = getattr(optimizer, "param_groups", [])
    for group, fresh in zip(groups, fresh_groups):
        group.update({k: v for k, v in fresh.items() if k not in ("params", "initial_lr", "lr")})
    scheduler.base_lrs = [learn_rate for _ in scheduler.base_lrs]
    for group in groups:
        group["initial_lr"] = learn_rate
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, factor in zip(groups, factors):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(learn_rate * factor)  # torchao's optimizers keep lr as a tensor and refuse a float
        else:
            group["lr"] = learn_rate * factor
    set_scheduler_last_lr(scheduler, [float(group["lr"]) for group in groups])
