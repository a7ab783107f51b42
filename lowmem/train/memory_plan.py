"""Estimated memory of a training run per process, and the longest sequence that fits it.

Weights, gradients and optimizer states count every parameter (a mixture of experts holds all its experts);
activations count what a token computes with (k experts' MLP width).

Activations are what a Llama-shaped decoder keeps for backward, per token of a micro-batch, at the moment the
first checkpointed block is rebuilt in backward: the input each checkpointed block keeps (on the host with
--gradient_checkpointing_offload), one block rebuilt whole with the largest gradients its backward makes (its MLP
one shard at a time with --tiled_mlp; LoRA's dropped-out inputs included), the gradients in flight between
blocks, and the head (the whole logits and their fp32 copies, or one chunk of them with the chunked loss). Packed rows through plain SDPA add a [tokens x tokens] mask per row,
eager attention its scores. bench/long_context.py compares the total with measured peaks (bench/RESULTS.md).
On a CPU the plan adds what the process already holds besides the weights (Python, torch, the data readers): the
figure is the process's peak resident memory; on a GPU it is what PyTorch allocates.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from config import TrainConfig

GIB = 2**30
STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "adamw_4bit": 1, "adafactor": 0.1}  # per trained parameter
LONGEST = 1 << 22  # the search for the longest length stops at 4M tokens
# What a CPU process computing in bf16 holds beyond its tensors (kernel workspace, allocator reuse): measured on a
# 135M model at 2k-16k tokens as a constant ~0.15 GiB above the sum of the rest; fp32 runs need none
# (bench/long_context.py, bench/RESULTS.md)
HALF_PRECISION_HOST_SLACK = 0.15 * GIB


@dataclass(frozen=True)
class Shape:
    """What the arithmetic reads of a decoder's config."""

    hidden: int
    kv: int
    mlp: int  # the MLP width a token computes with (k experts' for MoE)
    layers: int
    vocab: int
    heads: int


def decoder_shape(hf_config) -> Shape | None:
    """None for shapes not modelled (T5)."""
    from ..model.moe import mlp_width, text_config

    c = text_config(hf_config)
    if getattr(hf_config, "is_encoder_decoder", False) or not hasattr(c, "intermediate_size"):
        return None
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Shape(c.hidden_size, head_dim * c.num_key_value_heads, mlp_width(c), c.num_hidden_layers, c.vocab_size,
                 c.num_attention_heads)


@dataclass(frozen=True)
class Holding:
    """How a run holds its activations: precision, checkpointing and the long-sequence options, as resolved."""

    matmul_bytes: int  # 2 under bf16/fp16 autocast or bf16 weights, else 4
    residual_bytes: int  # the weights' dtype
    checkpointing: str | None  # None, "full" or "selective"
    every: int
    chunked: bool
    tiled: bool
    offload: bool  # checkpointed inputs on the host (a device plan on an accelerator)
    dense_mask: bool  # packed rows through plain SDPA
    eager: bool
    lora_dropout: bool
    head_trains: bool
    head_gathered: bool = False  # ZeRO-3: the chunked loss holds the whole (frozen) output weight while it runs


def holding(hf_config, cfg: TrainConfig, mixed_precision: str, device: str = "cpu", zero3: bool = False,
            attention: str | None = None, weight_bytes: int | None = None) -> Holding:
    """`weight_bytes`: the size of one element of the model's weights (2 for a LoRA base held in bf16); by default
    what the config asks for."""
    from ..model import chunked_loss, offload

    half = mixed_precision in ("bf16", "fp16") or cfg.bf16_weights
    residual = weight_bytes or (2 if cfg.bf16_weights else 4)
    chunked = cfg.chunked_cross_entropy is not False and chunked_loss.why_not(
        hf_config, cfg.use_liger_kernel, zero3, chunked_loss.head_trains(cfg)) is None
    attention = attention or cfg.attn_implementation
    lora = cfg.lora_r > 0
    return Holding(2 if half else 4, residual,
                   cfg.gradient_checkpointing_mode if cfg.gradient_checkpointing else None,
                   cfg.gradient_checkpointing_every, chunked, cfg.tiled_mlp,
                   cfg.gradient_checkpointing and cfg.gradient_checkpointing_offload and device == "cuda"
                   and offload.choose(replace(cfg, gradient_checkpointing=True)) != "host",
                   cfg.packing and attention == "sdpa", attention == "eager", lora and cfg.lora_dropout > 0,
                   not lora and not cfg.freeze_embeddings or "lm_head" in cfg.lora_modules_to_save, zero3 and chunked)


def activations(shape: Shape, how: Holding, tokens: int, rows: int = 1, parts: int = 1) -> tuple[float, float]:
    """(bytes on the device, bytes moved to the host) of the activations of a micro-batch of `tokens` tokens in
    `rows` rows, of which this process holds 1/`parts` (sequence parallelism)."""
    exchanged = 0.0
    if parts > 1:  # Ulysses' all-to-all buffers: q, k, v and the output, before and after the exchange
        exchanged = 2 * how.matmul_bytes * (2 * shape.hidden + 2 * shape.kv) * math.ceil(tokens / parts)
        tokens = math.ceil(tokens / parts)
    h, kv, width, layers, a, r = shape.hidden, shape.kv, shape.mlp, shape.layers, how.matmul_bytes, how.residual_bytes
    casts = a if a < r else 0  # autocast keeps each linear layer's input cast to half precision
    norms = 2 * (4 * h + r * h)  # two RMSNorms: fp32 input, normalised output in the weights' dtype
    attention = 3 * casts * h + a * (2 * h + 2 * kv)  # q/k/v input casts, SDPA's q/k/v/out (o_proj's input)
    mlp = 2 * casts * h + 4 * a * width  # gate/up input casts; gate, act(gate), up and their product
    dropped = (6 * h + width) * (a + 1) if how.lora_dropout else 0  # LoRA's dropped-out inputs and their masks
    block = norms + attention + dropped
    mlp_tokens = min(tokens, shape.hidden) if how.tiled else tokens  # tiled: one shard of ~hidden tokens at a time
    # one block rebuilt with all it keeps, and the largest gradients its backward makes (two of the MLP's width)
    rebuilt = block * tokens + (mlp + 2 * a * width) * mlp_tokens
    whole = (block + mlp) * tokens  # a block that keeps everything (no checkpointing)
    host = 0.0
    if how.checkpointing is None:
        body = layers * whole + 2 * a * width * mlp_tokens  # the last block's backward makes its gradients too
    else:
        checkpointed = len(range(0, layers, how.every))
        kept = r * h if how.checkpointing == "full" else r * h + a * (h + 2 * kv) + 3 * a * h + 2 * a * width
        on_host = checkpointed - 1 if how.offload else 0  # the newest stays on the device for the first backward
        host = on_host * kept * tokens
        # the rebuilt block's own kept part is among the checkpointed ones already
        body = (checkpointed - on_host) * kept * tokens + (layers - checkpointed) * whole + rebuilt - kept * tokens
    in_flight = 2 * r * h * tokens  # the gradient coming in and the one going out of a block
    if how.chunked:
        from ..model.chunked_loss import chunk_rows

        chunk = min(tokens, chunk_rows(shape.vocab))
        head = 2 * r * h * tokens + chunk * shape.vocab * 8 + (shape.vocab * h * 4 if how.head_trains else 0)
        head += shape.vocab * h * r if how.head_gathered else 0
    else:
        head = tokens * shape.vocab * (a + 4 + 4)  # logits, their fp32 copy and the log-softmax
    per_row = tokens / max(rows, 1)
    quadratic = 0.0
    if how.dense_mask:
        quadratic += rows * per_row ** 2
    if how.eager:
        quadratic += rows * shape.heads * per_row ** 2 * (a + 4 + 1)  # scores, fp32 softmax, dropout mask
    return body + in_flight + head + quadratic + exchanged, host


def activation_bytes(hf_config, cfg: TrainConfig, mixed_precision: str, tokens: int) -> float | None:
    """Device bytes of the activations of a micro-batch of `tokens` tokens; None for shapes not modelled (T5)."""
    shape = decoder_shape(hf_config)
    if shape is None:
        return None
    return activations(shape, holding(hf_config, cfg, mixed_precision), tokens, cfg.batch_size_per_gpu)[0]


@dataclass(frozen=True)
class Fixed:
    """What does not grow with the sequence, per process, in bytes."""

    weights: float
    grads: float
    states: float
    reference: float = 0.0
    runtime: float = 0.0  # on a CPU: the process's resident memory besides the weights
    autocast_copies: float = 0.0  # bf16 copies of the fp32 weights autocast keeps for one forward

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.states + self.reference + self.runtime + self.autocast_copies


def fixed_bytes(model, cfg: TrainConfig, mixed_precision: str, world: int = 1, zero_stage: int = 0,
                offload_optimizer: bool = False, reference_bytes: float = 0.0, runtime: float = 0.0) -> Fixed:
    from ..model.sizes import count_parameters, parameter_bytes

    trained = count_parameters(model, trained_only=True)
    shard = lambda stage: world if zero_stage >= stage else 1  # noqa: E731 - ZeRO stage k shards the first k items
    weights = parameter_bytes(model) / shard(3)  # in their own dtypes: a LoRA base in bf16, NF4 at half a byte
    grads = parameter_bytes(model, trained_only=True) / shard(2)
    states = 0.0 if offload_optimizer else trained * STATE_BYTES.get(cfg.optimizer, 8) / shard(1)
    fp32 = sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point and p.element_size() == 4)
    copies = fp32 * 2 / shard(3) if mixed_precision in ("bf16", "fp16") else 0.0
    return Fixed(weights, grads, states, reference_bytes, runtime, copies)


def budget_bytes(device: str, max_gpu_memory_gb: float = 0.0) -> tuple[float, str]:
    """(bytes one process may use, what they are): the GPU's memory (or --max_gpu_memory_gb), or this process's
    share of the host's memory (a cgroup limit counts)."""
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if max_gpu_memory_gb:
            total = min(total, max_gpu_memory_gb * GIB)
        return float(total), "GPU memory"
    import psutil

    total = float(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                total = min(total, float(text))
        except OSError:
            pass
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return total / local, "host memory" + (f" / {local} processes" if local > 1 else "")


def longest_length(fits_tokens, step: int = 128) -> int:
    """The longest multiple of `step` up to LONGEST for which fits_tokens(length) holds (0: not even `step`)."""
    if not fits_tokens(step):
        return 0
    low, high = step, step * 2
    while high <= LONGEST and fits_tokens(high):
        low, high = high, high * 2
    high = min(high, LONGEST + step)
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if fits_tokens(mid) else (low, mid)
    return low


@dataclass
class Planner:
    """The plan of one run: fixed bytes, and activations as a function of the sequence length."""

    shape: Shape | None
    how: Holding
    fixed: Fixed
    rows: int  # micro-batch
    budget: float
    budget_name: str
    parts: int = 1  # --sequence_parallel_size: this process holds 1/parts of every sequence

    def peak(self, length: int, rows: int | None = None, how: Holding | None = None) -> float | None:
        if self.shape is None:
            return None
        rows = rows or self.rows
        device, _ = activations(self.shape, how or self.how, rows * length, rows, self.parts)
        return self.fixed.total + device

    def host(self, length: int) -> float:
        return activations(self.shape, self.how, self.rows * length, self.rows, self.parts)[1] if self.shape else 0.0

    def longest(self, rows: int | None = None, how: Holding | None = None, fixed: Fixed | None = None,
                parts: int | None = None) -> int:
        if self.shape is None:
            return 0
        base, rows, parts = fixed or self.fixed, rows or self.rows, parts or self.parts
        return longest_length(lambda n: base.total + activations(self.shape, how or self.how, rows * n, rows,
                                                                 parts)[0] <= self.budget)


def planner(model, cfg: TrainConfig, mixed_precision: str, world: int = 1, zero_stage: int = 0,
            offload_optimizer: bool = False, reference_bytes: float = 0.0, device: str = "cpu",
            runtime: float = 0.0, attention: str | None = None, parts: int = 1,
            budget: tuple[float, str] | None = None) -> Planner:
    """`budget`: (bytes, what they are) to plan against instead of this machine's (a GPU plan made elsewhere)."""
    embeddings = model.get_input_embeddings().weight
    how = holding(model.config, cfg, mixed_precision, device, zero_stage == 3, attention, embeddings.element_size())
    if device == "cpu" and how.matmul_bytes == 2:
        runtime += HALF_PRECISION_HOST_SLACK
    fixed = fixed_bytes(model, cfg, mixed_precision, world, zero_stage, offload_optimizer, reference_bytes, runtime)
    budget, name = budget or budget_bytes(device, cfg.max_gpu_memory_gb)
    return Planner(decoder_shape(model.config), how, fixed, cfg.batch_size_per_gpu, budget, name, parts)


def memory_plan(model, cfg: TrainConfig, mixed_precision: str, world: int = 1, zero_stage: int = 0,
                offload_optimizer: bool = False, reference: str | None = None, reference_bytes: float = 0.0,
                device: str = "cpu", runtime: float = 0.0, attention: str | None = None, parts: int = 1,
                budget: tuple[float, str] | None = None) -> str:
    """One line: estimated GiB per process of weights, gradients, optimizer states and activations; then the
    longest --max_seq_len that fits this device with these flags."""
    p = planner(model, cfg, mixed_precision, world, zero_stage, offload_optimizer, reference_bytes, device, runtime,
                attention, parts, budget)
    f = p.fixed
    recompute = (f"checkpointing {cfg.gradient_checkpointing_mode}"
                 + (f" every {cfg.gradient_checkpointing_every}" if cfg.gradient_checkpointing_every > 1 else "")
                 if cfg.gradient_checkpointing else "no checkpointing")
    parts = [f"weights {f.weights / GIB:.2f} GiB", f"gradients {f.grads / GIB:.2f} GiB",
             f"optimizer states {f.states / GIB:.2f} GiB{' (offloaded to the CPU)' if offload_optimizer else ''}"]
    if reference is not None:  # preference training: what its reference costs (a copy, or nothing)
        parts.append(f"reference {f.reference / GIB:.2f} GiB ({reference})")
    if f.runtime:
        parts.append(f"process {f.runtime / GIB:.2f} GiB")
    if f.autocast_copies:
        parts.append(f"autocast copies {f.autocast_copies / GIB:.2f} GiB")
    peak = p.peak(cfg.max_seq_len)
    if peak is None:
        return "memory plan: " + ", ".join(parts + ["activations not estimated for this model type"])
    device_bytes = peak - f.total
    split = f" split {p.parts} ways" if p.parts > 1 else ""
    parts.append(f"activations ~{device_bytes / GIB:.2f} GiB ({cfg.batch_size_per_gpu} x {cfg.max_seq_len} tokens{split}, "
                 f"{recompute}{', MLP tiled' if p.how.tiled else ''}{', loss in chunks' if p.how.chunked else ''})")
    host = p.host(cfg.max_seq_len)
    moved = f" (+{host / GIB:.2f} GiB of offloaded checkpoints in pinned host memory)" if host else ""
    line = "memory plan: " + ", ".join(parts) + f" = ~{peak / GIB:.2f} GiB per process{moved}"
    return line + "\n" + longest_line(p, cfg)


def longest_line(p: Planner, cfg: TrainConfig) -> str:
    longest = p.longest()
    return (f"longest --max_seq_len that fits {p.budget / GIB:.1f} GiB ({p.budget_name}) with these flags: {longest} "
            f"(x {cfg.batch_size_per_gpu} row{'s' if cfg.batch_size_per_gpu > 1 else ''})")


def what_raises_it(p: Planner, cfg: TrainConfig, model, lora_fixed: Fixed | None = None,
                   device: str = "cpu") -> list[tuple[str, int]]:
    """(the flag to add, the longest length with it) for each option this run does not use that would raise it."""
    if p.shape is None:
        return []
    from ..model.moe import moe_shape

    rows = []
    if p.how.checkpointing is None:
        rows.append(("--gradient_checkpointing=True", p.longest(how=replace(p.how, checkpointing="full", every=1))))
    elif p.how.checkpointing == "selective" or p.how.every > 1:
        rows.append(("--gradient_checkpointing_mode=full --gradient_checkpointing_every=1",
                     p.longest(how=replace(p.how, checkpointing="full", every=1))))
    if device == "cuda" and not p.how.offload:
        rows.append(("--gradient_checkpointing_offload=True",
                     p.longest(how=replace(p.how, checkpointing=p.how.checkpointing or "full", offload=True))))
    if not p.how.tiled and moe_shape(model.config) is None:
        rows.append(("--tiled_mlp=True", p.longest(how=replace(p.how, tiled=True))))
    if not p.how.chunked and not cfg.use_liger_kernel:
        rows.append(("--chunked_cross_entropy=auto (Llama/Qwen2/Qwen3/Mistral)", p.longest(how=replace(p.how,
                                                                                                     chunked=True))))
    if p.rows > 1:
        rows.append(("--batch_size_per_gpu=1", p.longest(rows=1)))
    if lora_fixed is not None:
        rows.append(("--lora_r=16", p.longest(fixed=lora_fixed)))
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    for n in (2, 4, 8):  # per process, on n processes (weights as now: ZeRO-3 would shard them too)
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        if n > p.parts and heads % n == 0 and (kv % n == 0 or n % kv == 0):
            rows.append((f"--sequence_parallel_size={n} (on {n} processes per sequence)", p.longest(parts=n)))
    return [(flag, n) for flag, n in rows if n > p.longest()]


def plan_table(p: Planner, cfg: TrainConfig, model, lora_fixed: Fixed | None = None, device: str = "cpu") -> str:
    """The longest length that fits, and what each option would raise it to: `train_low_mem.py plan` prints it."""
    lines = [longest_line(p, cfg)]
    for flag, n in what_raises_it(p, cfg, model, lora_fixed, device):
        lines.append(f"  with {flag}: {n}")
    if len(lines) == 1:
        lines.append("  (no option of this trainer raises it further; a smaller model or more processes would)")
    return "\n".join(lines)
