"""`--gradient_checkpointing_offload`: the input each checkpointed block keeps for its recompute waits in pinned host
memory instead of on the accelerator, and comes back for that block's backward.

With full checkpointing those inputs are what grows with the number of layers ([tokens x hidden] per block): at
long sequences they are the largest activations left. Two engines, the first that can run:
  deepspeed     DeepSpeed's CheckpointHiddenStatesOffload (Arctic Long Sequence Training): copies on a side
                stream, the newest block kept on the device, pinned buffers reused; entered around each
                micro-batch's forward and backward (`micro_batch_context`)
  transformers  transformers' own offload path: each checkpoint call under torch's save_on_cpu, copies on the
                compute stream (slower; used where deepspeed cannot be imported)
Without an accelerator the activations already live in host memory: the option is a no-op, said once.
"""
from __future__ import annotations

import contextlib

import torch

from ..run.errors import UserError

ENGINES = ("deepspeed", "transformers")


def _deepspeed_engine():
    try:
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )
    except Exception:  # missing, too old, or built for another torch
        return None
    return get_checkpoint_hidden_states_offloading_ctx_manager


def choose(cfg) -> str:
    """'off', 'host' (no accelerator: nothing to move), or the engine that moves the checkpointed inputs."""
    if not cfg.gradient_checkpointing_offload:
        return "off"
    if not cfg.gradient_checkpointing:
        raise UserError("--gradient_checkpointing_offload=True moves what checkpointed blocks keep; add "
                        "--gradient_checkpointing=True or drop it")
    if not torch.cuda.is_available():
        return "host"
    return "deepspeed" if _deepspeed_engine() is not None else "transformers"


def describe(choice: str) -> str:
    return {"off": "", "host": "checkpoint offload: no accelerator here, the checkpointed activations already live in "
                               "host memory (nothing to move)",
            "deepspeed": "checkpointed block inputs offloaded to pinned host memory (DeepSpeed, side stream)",
            "transformers": "checkpointed block inputs offloaded to pinned host memory (transformers' save_on_cpu; "
                            "`pip install deepspeed` for side-stream copies)"}[choice]


def micro_batch_context(choice: str, **engine_options):
    """A callable giving the context each micro-batch's forward and backward run in (a no-op but for DeepSpeed's
    engine, whose hooks mark, copy out and bring back the checkpointed inputs)."""
    if choice != "deepspeed":
        return contextlib.nullcontext
    engine = _deepspeed_engine()(**engine_options)  # one engine, entered once per micro-batch: buffers are reused
    return lambda: engine
