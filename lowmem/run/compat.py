"""Every place the trainer writes into (or relies on) another library's private state, in one module.

Each function names the library version it was checked against; tests/test_compat.py fails with the
library's name when a release moves or renames what it touches. Nothing else in lowmem/ writes a
private attribute of accelerate, transformers, torch, deepspeed, peft, torchao or liger-kernel.
"""
from __future__ import annotations

import types


def set_accumulation_position(accelerator, micro_batches_done: int) -> None:
    """Make the next `accelerator.accumulate` window sync after `num_steps - micro_batches_done` micro-batches.

    accelerate 1.16.0: `Accelerator._do_sync` counts micro-batches in `self.step` and syncs gradients when
    `step % num_steps == 0`; a short last window of an epoch must still sync on its last micro-batch.
    """
    accelerator.step = micro_batches_done


def present_cpu_processes_as_gpus(partial_state) -> None:
    """Let Accelerate pick its FSDP plugin for CPU (gloo) processes.

    accelerate 1.16.0: AcceleratorState only turns an FSDP launch into FSDP for accelerator device types;
    CPU processes are MULTI_CPU and silently fall back to plain data parallel. Relabelling the shared
    PartialState as MULTI_GPU (the device stays cpu) makes it take the FSDP path.
    """
    from accelerate.utils import DistributedType

    if partial_state.distributed_type == DistributedType.MULTI_CPU:
        partial_state.distributed_type = DistributedType.MULTI_GPU


def set_scheduler_last_lr(scheduler, lrs: list[float]) -> None:
    """torch 2.13.0: `LRScheduler.get_last_lr()` returns `_last_lr`, set only by `step()`; after the param
    groups take a resumed run's new learning rate, the scheduler must report it too."""
    scheduler._last_lr = list(lrs)


def ddp_ignore_parameters(model, names: list[str]) -> None:
    """torch 2.13.0: DistributedDataParallel neither broadcasts nor reduces the parameters a module lists in
    `_ddp_params_and_buffers_to_ignore` (QLoRA's NF4 base: every process quantised the same weights)."""
    model._ddp_params_and_buffers_to_ignore = list(names)


def disable_deepspeed_shm_allreduce() -> None:
    """deepspeed 0.19.8: on CPU it JIT-compiles a shared-memory allreduce (g++, about a minute on 2 cores, a
    crash without a compiler) unless `deepspeed.ops.__compatible_ops__` says it cannot; gloo does the job."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # probed once per process, then cached


def torchao_adamw():
    """torchao 0.18.0: plain AdamW with bf16 stochastic rounding is the private `_AdamW`; the public classes
    are the 8-bit and 4-bit ones."""
    from torchao import optim as ao_optim

    return ao_optim._AdamW


def replace_forward(model, forward) -> None:
    """Bind `forward(self, ...)` as this model instance's forward (transformers 5.25.0's CausalLM classes call
    `self.forward` through nn.Module; the class itself is untouched)."""
    model.forward = types.MethodType(forward, model)


def peft_experts_out_first(param_wrapper) -> bool:
    """peft 0.21.2: whether a fused expert weight it adapts lies (experts, out, in), as transformers 5 stores them,
    rather than (experts, in, out); only its private `_did_swap_in_out_features` says so for square experts."""
    return bool(param_wrapper._did_swap_in_out_features)


def apply_liger_kernels(model) -> None:
    """liger-kernel 0.5: its fused kernels for an already built model come from a private helper."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
