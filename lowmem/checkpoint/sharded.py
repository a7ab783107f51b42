"""Checkpoints of sharded training (DeepSpeed ZeRO, FSDP): the optimizer state and weights each engine keeps.

DeepSpeed writes its own files into `deepspeed/` (each rank its ZeRO partition) and loads them with
pickle, so resume only from checkpoints you wrote. FSDP gathers the full optimizer state to the main
process and saves it as optimizer.pt, as without sharding.
"""
from __future__ import annotations

import json
import os

import torch

from ..run.errors import UserError


def sharded_kind(accelerator) -> str | None:
    """'deepspeed' or 'fsdp' when optimizer state is sharded across processes, else None."""
    from accelerate.utils import DistributedType

    return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(accelerator.distributed_type)


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the real one


def save_sharded_optimizer(accelerator, model, optimizer, directory: str, frozen_base: bool) -> None:
    """Sharded optimizer state; every process must call this.

    DeepSpeed: the engine writes its own files into `deepspeed/` (each rank its ZeRO partition of the
    fp32 master weights and Adam moments). FSDP: the full optimizer state is gathered to the main process
    and saved as optimizer.pt, as without sharding.
    """
    if sharded_kind(accelerator) == "deepspeed":
        # LoRA: the frozen base is rebuilt on resume; only the trained weights go into the engine's module file
        model.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state", save_latest=False,
                              exclude_frozen_parameters=frozen_base)
        if accelerator.is_main_process:
            with open(os.path.join(directory, "deepspeed", "layout.json"), "w", encoding="utf-8") as f:
                json.dump(_deepspeed_layout(accelerator), f)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # full_state_dict with cpu_offload gathers onto rank 0 only; other ranks get an empty dict
    state = get_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:
        torch.save(state, os.path.join(directory, "optimizer.pt"))


def _deepspeed_layout(accelerator) -> dict:
    """What a ZeRO checkpoint can only be loaded back into: the same stage on the same number of processes."""
    if sharded_kind(accelerator) != "deepspeed":
        return {}
    return {"zero_stage": accelerator.state.deepspeed_plugin.zero_stage, "world_size": accelerator.num_processes}


def check_layout(accelerator, path: str) -> None:
    """A UserError (not a broken checkpoint to pass over) when `path` was written under another ZeRO layout."""
    layout_file = os.path.join(path, "deepspeed", "layout.json")
    saved = {}
    if os.path.isfile(layout_file):
        with open(layout_file, encoding="utf-8") as f:
            saved = json.load(f)
    elif os.path.isdir(os.path.join(path, "deepspeed")):
        saved = {"zero_stage": "?", "world_size": "?"}
    now = _deepspeed_layout(accelerator)
    if saved != now:
        def describe(layout):
            return f"ZeRO stage {layout['zero_stage']} on {layout['world_size']} processes" if layout else "no DeepSpeed"

        raise UserError(f"resume refused: {path} was written with {describe(saved)}, this run has {describe(now)}; "
                        "launch with the same DeepSpeed settings and process count, or start a new run from its "
                        "model/ with --finetune_from_ckp_file")


def load_sharded(accelerator, path: str, model, optimizer, weights_format) -> None:
    """Weights and optimizer state saved by `save_sharded_optimizer`; every process must call this.

    DeepSpeed restores the weights from its fp32 master partitions (the engine unpickles its own files,
    so resume only from checkpoints you wrote). FSDP loads model/ and optimizer.pt on the main process
    and broadcasts them into the shards.
    """
    if sharded_kind(accelerator) == "deepspeed":
        loaded, _ = model.load_checkpoint(os.path.join(path, "deepspeed"), tag="state", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError("the DeepSpeed state in deepspeed/state is missing")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from .weights import read_safetensors

    weights, optim_state = {}, {}
    if accelerator.is_main_process:
        # adapter files name weights without the adapter name: the format puts it back
        unwrapped = accelerator.unwrap_model(model)
        weights = weights_format.sharded_names(unwrapped, read_safetensors(os.path.join(path, "model")))
        optim_state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state, options=options)
