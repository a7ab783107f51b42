"""Activation checkpointing: which blocks recompute their activations in backward, and what they keep.

full: a checkpointed block keeps only its input and reruns its whole forward in backward (the most memory
saved, about one extra forward of compute). selective: a checkpointed block keeps the outputs of its matrix
multiplies and attention and recomputes only the cheap element-wise ops (norms, activation functions,
rotary), which hold a large share of the activation memory but little of the compute.
`gradient_checkpointing_every=N` checkpoints one block in N; the others keep all their activations.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..run.errors import UserError

MODES = ("full", "selective")

_aten = torch.ops.aten
# Ops whose outputs a selective block keeps: the expensive ones. Anything else is recomputed.
_KEPT_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_expensive)


def check_options(enabled: bool, mode: str, every: int) -> None:
    if mode not in MODES:
        raise UserError(f"gradient_checkpointing_mode '{mode}' is unknown; choose one of {', '.join(MODES)}")
    if not isinstance(every, int) or every < 1:
        raise UserError(f"gradient_checkpointing_every must be a whole number >= 1 (got {every!r})")
    if not enabled and (mode != "full" or every != 1):
        raise UserError("--gradient_checkpointing_mode / --gradient_checkpointing_every take effect only with "
                        "--gradient_checkpointing=True; add it or drop them")


def enable(model, mode: str = "full", every: int = 1, offload: bool = False) -> int:
    """Turn checkpointing on for one decoder block in `every`; returns how many blocks recompute. `offload`:
    transformers keeps what a checkpointed block saves in pinned host memory (model/offload.py)."""
    check_options(True, mode, every)
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing; drop --gradient_checkpointing")
    kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs, compile and selective contexts
    if mode == "selective":
        kwargs["context_fn"] = _selective_contexts
    # activation_checkpointing_enable replaced gradient_checkpointing_enable in transformers 5.2x
    turn_on = getattr(model, "activation_checkpointing_enable", None)
    if turn_on is not None:
        turn_on(activation_checkpointing_kwargs=kwargs, **({"offload": True} if offload else {}))
    elif offload:
        raise UserError("transformers older than 5.2x has no checkpoint offload of its own; `pip install deepspeed` "
                        "for --gradient_checkpointing_offload, or drop it")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = checkpointable_blocks(model)
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index % every == 0
    model.config.use_cache = False
    return sum(1 for block in blocks if block.gradient_checkpointing)


def checkpointable_blocks(model) -> list:
    """The repeated blocks (decoder layers; T5's encoder and decoder blocks) in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]

