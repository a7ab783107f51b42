"""`--sequence_parallel_size=N`: each process of a group of N holds a contiguous 1/N of every sequence, and attention
exchanges heads by all-to-all (DeepSpeed Ulysses, from Arctic Long Sequence Training), so one sequence may be N
times longer than one device's activations allow.

Accelerate wires it: a `ParallelismConfig(sp_backend="deepspeed", sp_size=N, dp_replicate_size=processes / N)` makes
`prepare()` register DeepSpeed's UlyssesSPAttentionHF in place of the model's attention function and hand
DeepSpeed the sequence-parallel groups (N consecutive ranks each). The trainer cuts each batch itself
(data/shards.py: every process of a group reads the same samples, its data-parallel rank's, and keeps its part of
each row, labels shifted before the cut), and sums what a sequence's parts add up to over the group:
`sum_over_group` (a pair's log-probabilities, an MoE router's statistics) returns the whole sequence's value on
every process while the gradient flows only into the part this process computed.

Ulysses drops the attention mask and gathers position ids instead: packed rows keep their documents apart only
where the core attention reads position ids (flash-attn 2's varlen path, this trainer's sdpa_varlen); plain sdpa
and FlexAttention (whose mask DeepSpeed rebuilds as one causal block) would attend across documents, and eager
needs the [tokens x tokens] mask: each is refused in one line naming the fix.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ..run.errors import UserError
from .moe import text_config

PACKED_OK = ("flash_attention_2", "flash_attention_3")  # and whatever name runs sdpa_varlen (attention.is_varlen)


def check(cfg, hf_config, attention: str, world: int) -> None:
    """Every reason this run cannot split its sequences N ways, as one UserError naming the fix."""
    n = cfg.sequence_parallel_size
    if n == 1:
        return
    check_launch(cfg, world)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise UserError("--sequence_parallel_size splits decoder sequences (Llama, Qwen, Mistral, ...); T5 is refused")
    c = text_config(hf_config)
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    if heads % n:
        fits = [d for d in range(2, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
        raise UserError(f"--sequence_parallel_size={n}: each process takes heads/N of the {heads} attention heads, "
                        f"and {heads} is not divisible by {n}; use {' or '.join(map(str, fits[:4])) or 'another N'}")
    if kv % n and n % kv:
        raise UserError(f"--sequence_parallel_size={n}: the {kv} key/value heads must divide N or be divisible by it "
                        f"(DeepSpeed replicates key/value heads when N exceeds their number)")
    if attention == "eager":
        raise UserError("--attn_implementation=eager needs the [tokens x tokens] mask that sequence parallelism drops; "
                        "use sdpa_varlen (or sdpa without --packing)")
    from .attention import is_varlen

    if cfg.packing and attention not in PACKED_OK and not is_varlen(attention):
        raise UserError(f"--packing under --sequence_parallel_size={n} with --attn_implementation={attention}: "
                        "Ulysses drops the attention mask, so packed documents would attend to each other; use "
                        "--attn_implementation=sdpa_varlen (or flash_attention_2 on CUDA)")


def check_launch(cfg, world: int) -> None:
    """What the launch must offer before anything is built: processes divisible by N, DeepSpeed."""
    n = cfg.sequence_parallel_size
    if n == 1:
        return
    if world % n:
        raise UserError(f"--sequence_parallel_size={n} needs a number of processes divisible by it; this launch has "
                        f"{world} (launch {n * max(1, world // n)} or {n * (world // n + 1)} processes)")
    from ..run.distributed import asks_for_deepspeed

    if not asks_for_deepspeed(cfg):
        raise UserError(f"--sequence_parallel_size={n} runs under DeepSpeed: add --zero_stage=2 (or 3), or launch with "
                        "accelerate_configs/deepspeed_zero*.yaml")
    if cfg.torch_compile:
        raise UserError("--torch_compile and --sequence_parallel_size do not combine yet here; drop one")


def parallelism_config(cfg, world: int, attention: str):
    """Accelerate's ParallelismConfig that has prepare() register Ulysses and hand DeepSpeed the groups; None for 1."""
    n = cfg.sequence_parallel_size
    if n == 1:
        return None
    check_launch(cfg, world)
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    # evaluation runs on cut batches too (every process of the group takes part), so SP stays on in eval mode
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=attention,
                                              sp_disable_in_eval=False)
    return ParallelismConfig(sp_backend="deepspeed", sp_size=n, dp_replicate_size=world // n, sp_handler=handler)


def gradient_factor(n: int, zero_stage: int) -> float:
    """What a process's loss is multiplied by before backward so that the step's gradient is the one of one process
    on whole sequences: DeepSpeed adds a group's parts up, except ZeRO-3 before deepspeed 0.20.2 (DeepSpeed#8854),
    which averages them (measured: SP=2 under ZeRO-3 logged half the gradient norm of one process)."""
    if n == 1 or zero_stage != 3:
        return 1.0
    import importlib.metadata

    from packaging import version

    return float(n) if version.parse(importlib.metadata.version("deepspeed")) < version.parse("0.20.2") else 1.0


@functools.lru_cache(maxsize=None)
def _group_state():
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups

    return groups


def group():
    """The sequence-parallel process group of this process, once prepare() made it; None without SP."""
    if not _CORE or _ALONE:  # sequence parallelism is off (never import deepspeed for it), or paused
        return None
    try:
        return _group_state().get_sequence_parallel_group()
    except (ImportError, AssertionError):
        return None


def size() -> int:
    g = group()
    return 1 if g is None else torch.distributed.get_world_size(g)


def sum_over_group(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over the sequence-parallel group (every process gets it); the gradient flows only into this
    process's own `value` (each process backpropagates its own part, DeepSpeed adds their gradients up)."""
    g = group()
    if g is None:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total, group=g)
    return value + (total - value.detach())


_CORE: dict = {}  # attention name -> the function Ulysses wraps, kept before prepare() replaces it
_ALONE: list = []  # non-empty while a process works alone on whole sequences


def keep_core_attention(name: str) -> None:
    """Remember the attention function `name` runs now, before prepare() puts Ulysses in its place."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _CORE.setdefault(name, ALL_ATTENTION_FUNCTIONS[name])


@contextlib.contextmanager
def whole_sequences():
    """One process working alone on whole sequences (generating samples): attention without Ulysses' exchanges and
    objectives without group sums for the duration; nothing changes without sequence parallelism."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    swapped = {name: ALL_ATTENTION_FUNCTIONS[name] for name in _CORE if group() is not None}
    for name in swapped:
        ALL_ATTENTION_FUNCTIONS[name] = _CORE[name]
    _ALONE.append(True)
    try:
        yield
    finally:
        _ALONE.pop()
        for name, wrapped in swapped.items():
            ALL_ATTENTION_FUNCTIONS[name] = wrapped
