"""`--tiled_mlp`: each decoder MLP runs over its tokens in shards, so its [tokens x intermediate] activations exist
for one shard at a time.

DeepSpeed's TiledMLP (Arctic Long Sequence Training) computes the MLP shard by shard without keeping anything but
its input, and in backward recomputes each shard with gradients on, accumulating the weights' gradients (LoRA's
included: every trained parameter the MLP reaches is handed over, so ZeRO reduces them once, after the last shard).
An MLP is per token, so the result is the untiled one up to float rounding. It pays where a block's MLP width
dominates what one rebuilt block holds: with activation checkpointing, that is the peak at long sequences.
A mixture-of-experts layer routes tokens to experts and records its router's logits: it is refused, not tiled.
TiledMLP reruns each shard in backward; where the MLP drops out (LoRA's dropout), each shard's rerun replays the
random state of its forward, so the gradient is that of the output the forward gave.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from ..run.compat import replace_forward
from ..run.errors import UserError
from .moe import moe_shape


def _tiled_mlp_class():
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    except Exception as exc:  # missing, or built for another torch: either way one line
        raise UserError(f"--tiled_mlp=True uses DeepSpeed's TiledMLP, which cannot be imported here "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); `pip install deepspeed` or drop "
                        "the flag") from None
    return TiledMLP


def shards_for(tokens: int, hidden_size: int) -> int:
    """ALST's rule: shards of about hidden_size tokens, so a shard's intermediate activations are no larger than a
    [hidden x intermediate] weight."""
    return max(1, math.ceil(tokens / hidden_size))


def decoder_mlps(model) -> list:
    """The `mlp` module of every decoder layer."""
    from .recompute import checkpointable_blocks

    return [block.mlp for block in checkpointable_blocks(model) if hasattr(block, "mlp")]


def tile_mlps(model) -> int:
    """Run every decoder MLP through TiledMLP; returns how many. Call before LoRA wraps the linear layers (the
    tiled forward calls whatever the MLP's layers are when it runs)."""
    if moe_shape(model.config) is not None:
        raise UserError("--tiled_mlp=True tiles dense MLPs; this model's MLP layers route tokens to experts: drop "
                        "the flag (activation checkpointing and --gradient_checkpointing_offload still apply)")
    mlps = decoder_mlps(model)
    if not mlps:
        raise UserError(f"--tiled_mlp=True found no decoder MLP in {type(model).__name__}: drop the flag")
    tiled = _tiled_mlp_class()
    hidden_size = model.config.get_text_config().hidden_size

    def forward_in_shards(self, x):
        tokens = x.reshape(1, -1, x.shape[-1])  # TiledMLP's backward cuts the flattened tokens: so does its forward
        shards = shards_for(tokens.shape[1], hidden_size)
        if shards == 1:
            return self.untiled_forward(x)
        trained = [p for p in self.parameters() if p.requires_grad]  # LoRA's adapters too, whenever it wraps
        replay = ShardRandomness() if self.training and _drops_out(self) else None
        run = replay.run if replay is not None else (lambda module, shard: module.untiled_forward(shard))
        out = tiled.apply(run, self, tokens, shards, trained)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    for mlp in mlps:
        mlp.untiled_forward = mlp.forward
        replace_forward(mlp, forward_in_shards)
    return len(mlps)


def _drops_out(module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


class ShardRandomness:
    """Each shard's random state as TiledMLP's forward met it, replayed when its backward reruns that shard."""

    def __init__(self):
        self.states: deque = deque()

    def run(self, module, shard):
        devices = [shard.device] if shard.device.type == "cuda" else []
        if not torch.is_grad_enabled():  # TiledMLP's forward: shard by shard under no_grad
            self.states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]))
            return module.untiled_forward(shard)
        cpu, cuda = self.states.popleft()
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu)
            for device, state in zip(devices, cuda):
                torch.cuda.set_rng_state(state, device)
            return module.untiled_forward(shard)
