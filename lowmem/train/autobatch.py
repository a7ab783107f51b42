"""auto_batch_size: the largest micro-batch that fits, with accumulation keeping the global batch.

The search and the arithmetic are plain functions of a `fits(batch_size) -> bool` probe, so they
are tested against a fake memory limit; on CUDA the probe runs a real forward and backward pass.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..run.errors import UserError


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest b in [1, upper] with fits(b), assuming fits is monotone; 0 when even 1 does not fit."""
    if upper < 1 or not fits(1):
        return 0
    low, high = 1, 2
    while high <= upper and fits(high):  # double until it no longer fits
        low, high = high, high * 2
    high = min(high, upper + 1)
    while high - low > 1:  # then bisect between the last fit and the first failure
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def split_global_batch(per_process_batch: int, largest_micro: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) with micro x steps == per_process_batch and micro <= largest_micro."""
    if largest_micro < 1:
        raise UserError("not even a micro-batch of 1 fits in memory; use --gradient_checkpointing=True, "
                        "--optimizer=adamw_8bit, a shorter --max_seq_len or a smaller model")
    micro = max(d for d in range(1, min(per_process_batch, largest_micro) + 1) if per_process_batch % d == 0)
    return micro, per_process_batch // micro


def cuda_probe(model, optimizer_state_bytes: int, seq_len: int, vocab_size: int, budget_bytes: int,
               margin: float = 0.1, loss_fn=None) -> Callable[[int], bool]:
    """fits(b): a forward/backward of b full-length rows stays under (1 - margin) x budget, states included."""
    device = next(model.parameters()).device

    def fits(batch: int) -> bool:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            ids = torch.randint(0, vocab_size, (batch, seq_len), device=device)
            out = model(input_ids=ids, labels=ids, use_cache=False) if loss_fn is None else loss_fn(model, ids)
            out.loss.backward() if hasattr(out, "loss") else out.backward()
            peak = torch.cuda.max_memory_allocated(device) + optimizer_state_bytes
            return peak <= (1.0 - margin) * budget_bytes
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return fits


def limit_gpu_memory(max_gpu_memory_gb: float) -> int:
    """Run as if the card had max_gpu_memory_gb (0: the whole card); returns the budget in bytes."""
    if not torch.cuda.is_available():
        if max_gpu_memory_gb:
            raise UserError("--max_gpu_memory_gb needs a CUDA GPU; drop it on CPU")
        return 0
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not max_gpu_memory_gb:
        return total
    budget = int(max_gpu_memory_gb * 2**30)
    if budget > total:
        raise UserError(f"--max_gpu_memory_gb={max_gpu_memory_gb} is more than the card's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(budget / total)
    return budget
