"""Checkpoints and exports: the only code that writes or reads a run's checkpoint directories.

manager.py   CheckpointManager: save, rotate, best, restore, export (the loop and set-up call it)
resume.py    which checkpoint a resume starts from and whether this run's settings may continue it
weights.py   how the model's weights are stored: every weight, or LoRA adapters only (decided once)
sharded.py   DeepSpeed ZeRO and FSDP optimizer states
files.py     manifests with content hashes, verification, disk space, RNG states

It reads the model package for adapter files and sizes and the data template for exports.
May import: model, data, fields, run.
"""
from ..run.errors import DiskFull
from .files import BEST, check_checkpoints, list_checkpoints
from .manager import CheckpointManager, RunParts
from .resume import ResumePlan, fingerprint, plan_resume
from .weights import is_export, weights_format

__all__ = ["BEST", "CheckpointManager", "DiskFull", "ResumePlan", "RunParts", "check_checkpoints", "fingerprint",
           "is_export", "list_checkpoints", "plan_resume", "weights_format"]
