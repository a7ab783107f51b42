"""Estimated memory of a training run per process: weights, gradients, optimizer states, activations.

Weights, gradients and optimizer states count every parameter (a mixture of experts holds all its experts);
activations count what a token computes with (k experts' MLP width).

The activation figure is a per-token count of what a Llama-shaped decoder block keeps for backward
under mixed precision (bf16 matmul outputs, an fp32 residual stream and fp32 norm internals), plus the
logits and their fp32 loss copies; bench/checkpointing.py compares it with measured memory.
"""
from __future__ import annotations

from config import TrainConfig

GIB = 2**30
STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "adamw_4bit": 1, "adafactor": 0.1}  # per trained parameter


def activation_bytes_per_token(hf_config, cfg: TrainConfig, mixed_precision: str) -> float | None:
    """Bytes of activations kept for backward per token of a micro-batch; None for shapes not modelled (T5)."""
    if getattr(hf_config, "is_encoder_decoder", False) or not hasattr(hf_config, "intermediate_size"):
        return None
    from ..model.moe import mlp_width

    hf_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    h, inter, layers = hf_config.hidden_size, mlp_width(hf_config), hf_config.num_hidden_layers  # MoE: k experts
    kv = h * hf_config.num_key_value_heads // hf_config.num_attention_heads
    half = mixed_precision in ("bf16", "fp16") or cfg.bf16_weights
    a = 2 if half else 4  # matmul outputs
    r = 2 if cfg.bf16_weights else 4  # residual stream: the weights' dtype
    norms = 2 * (4 * h + r * h)  # two RMSNorms: fp32 input, normalised output in the weights' dtype
    attention = 3 * a * h + a * (2 * h + 2 * kv) + a * h  # q/k/v input casts, SDPA's q/k/v/out, o_proj input
    mlp = 2 * a * h + 4 * a * inter  # gate/up input casts; gate, silu(gate), up and their product
    whole_block = norms + attention + mlp
    kept_by_selective = r * h + a * (h + 2 * kv) + 3 * a * h + 2 * a * inter  # input + matmul/attention outputs
    # logits, their fp32 copy and the log-softmax; fused/chunked losses keep one chunk at a time instead
    fused = cfg.use_liger_kernel or getattr(cfg, "chunked_cross_entropy", False)
    logits = r * h if fused else hf_config.vocab_size * (a + 4 + 4)
    if not cfg.gradient_checkpointing:
        return layers * whole_block + logits
    checkpointed = len(range(0, layers, cfg.gradient_checkpointing_every))
    kept = r * h if cfg.gradient_checkpointing_mode == "full" else kept_by_selective
    # checkpointed blocks keep `kept`; one of them is rebuilt whole during its backward
    return checkpointed * kept + (layers - checkpointed) * whole_block + whole_block + logits


def activation_bytes(hf_config, cfg: TrainConfig, mixed_precision: str, tokens: int) -> float | None:
    """Activations of a micro-batch of `tokens` tokens; None for shapes not modelled (T5)."""
    per_token = activation_bytes_per_token(hf_config, cfg, mixed_precision)
    if per_token is None:
        return None
    fixed = 0.0
    if getattr(cfg, "chunked_cross_entropy", False):
        from ..model.chunked_loss import chunk_rows

        rows = min(tokens, chunk_rows(hf_config.vocab_size))
        fixed = rows * hf_config.vocab_size * 8 + hf_config.vocab_size * hf_config.hidden_size * 4  # chunk + weight grad
    return per_token * tokens + fixed


def memory_plan(model, cfg: TrainConfig, mixed_precision: str, world: int = 1, zero_stage: int = 0,
                offload_optimizer: bool = False, reference: str | None = None, reference_bytes: float = 0.0) -> str:
    """One line: estimated GiB per process of weights, gradients, optimizer states and activations."""
    from ..model.sizes import count_parameters, parameter_bytes

    trained = count_parameters(model, trained_only=True)
    shard = lambda stage: world if zero_stage >= stage else 1  # noqa: E731 - ZeRO stage k shards the first k items
    weights = parameter_bytes(model) / shard(3)  # in their own dtypes: a LoRA base in bf16, NF4 at half a byte
    grads = parameter_bytes(model, trained_only=True) / shard(2)
    states = 0.0 if offload_optimizer else trained * STATE_BYTES.get(cfg.optimizer, 8) / shard(1)
    activations = activation_bytes(model.config, cfg, mixed_precision, cfg.batch_size_per_gpu * cfg.max_seq_len)
    recompute = (f"checkpointing {cfg.gradient_checkpointing_mode}"
                 + (f" every {cfg.gradient_checkpointing_every}" if cfg.gradient_checkpointing_every > 1 else "")
                 if cfg.gradient_checkpointing else "no checkpointing")
    parts = [f"weights {weights / GIB:.2f} GiB", f"gradients {grads / GIB:.2f} GiB",
             f"optimizer states {states / GIB:.2f} GiB{' (offloaded to the CPU)' if offload_optimizer else ''}"]
    if reference is not None:  # preference training: what its reference costs (a copy, or nothing)
        parts.append(f"reference {reference_bytes / GIB:.2f} GiB ({reference})")
        weights += reference_bytes
    if activations is None:
        parts.append("activations not estimated for this model type")
        total = ""
    else:
        parts.append(f"activations ~{activations / GIB:.2f} GiB ({cfg.batch_size_per_gpu} x {cfg.max_seq_len} tokens, "
                     f"{recompute})")
        total = f" = ~{(weights + grads + states + activations) / GIB:.2f} GiB per process"
    return "memory plan: " + ", ".join(parts) + total
