"""Output projection + cross-entropy in chunks of tokens: the [tokens x vocabulary] logits never exist whole.

For large vocabularies the logits, their fp32 copy and the log-softmax are the largest activations
(a 150k vocabulary at 16k tokens per micro-batch: ~23 GiB). The forward here computes, chunk by
chunk, the logits, the loss and at once the gradients for the hidden states and the output weight,
and keeps only those gradients (the hidden states' size and the weight's size), as liger-kernel's
fused kernel does, in plain PyTorch on any device. It is on by default (`--chunked_cross_entropy=auto`) for
Llama, Qwen2, Qwen3, Mistral and their mixture-of-experts kin (the shapes whose head is a plain linear layer;
an MoE model's router logits pass through), unless liger's fused loss replaces it; under ZeRO-3 the head's
weight is gathered for the chunks when it is frozen (LoRA), and a trained head keeps the model's own loss.
`True` asks for it and refuses what it cannot do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..run.compat import replace_forward
from ..run.errors import UserError

IGNORE = -100
# model_type of the causal LMs whose head is a plain linear layer after `self.model`
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "qwen3_moe", "mixtral")
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32, whatever the vocabulary


def chunk_rows(vocab_size: int) -> int:
    return max(64, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed token loss of `hidden @ weight.T` against `labels`; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int):
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h, y = hidden[start:start + chunk_rows], labels[start:start + chunk_rows]
            raw = h @ weight.t()  # a bf16 matmul under autocast, as the model's own head would run
            compute_dtype, logits = raw.dtype, raw.float()
            del raw
            valid = y != IGNORE
            target = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
            # d loss / d logits = softmax - one_hot(target), zero on ignored rows; reuses the logits' memory
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
            grad_logits.mul_(valid[:, None])
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start:start + chunk_rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_w, None, None


def _gathered(weight):
    """A context in which a ZeRO-3-partitioned weight is whole (a no-op for an ordinary tensor, or for one a module
    holds gathered already: the input embedding a head is tied to)."""
    import contextlib

    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


# Run eagerly under torch.compile: the chunk loop's trip count depends on the token count, so a traced
# loop pins the graph to one sequence length and every new width (padded or packed batches) recompiled
# the whole model until the recompile limit. One graph break here costs little: the chunks are matmuls.
@torch.compiler.disable
def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_rows: int = 4096) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels), ignoring labels == -100."""
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_rows)


def why_not(hf_config, liger: bool = False, zero3: bool = False, head_trains: bool = True) -> str | None:
    """Why the chunked loss cannot serve this model and run, or None where it can."""
    if liger:
        return "liger's fused loss replaces it"
    if zero3 and head_trains:
        return "ZeRO-3 shards the output weight it trains (a frozen one, as under LoRA, is gathered)"
    if getattr(hf_config, "model_type", None) not in SUPPORTED:
        return (f"it supports the heads of {', '.join(SUPPORTED)} models; this one is "
                f"{getattr(hf_config, 'model_type', type(hf_config).__name__)}")
    return None


def wanted(hf_config, cfg, zero3: bool = False) -> bool:
    """Whether this run computes its loss in chunks: auto where it applies; True where it applies, else refused."""
    if cfg.chunked_cross_entropy is False:
        return False
    reason = why_not(hf_config, cfg.use_liger_kernel, zero3, head_trains(cfg))
    if reason and cfg.chunked_cross_entropy is True:
        raise UserError(f"--chunked_cross_entropy=True cannot run here: {reason}; drop the flag (auto turns it on "
                        "wherever it applies)")
    return reason is None


def head_trains(cfg) -> bool:
    """Whether the run trains the output layer's weight (LoRA leaves it frozen unless it is saved in full)."""
    if not cfg.lora_r:
        return True
    saved = set(cfg.lora_modules_to_save)
    return "lm_head" in saved or "embed_tokens" in saved


def enable(model, rows: int | None = None):
    """Route the training loss of a supported causal LM through the chunked loss (evaluation is unchanged)."""
    reason = why_not(model.config)
    if reason or getattr(model.lm_head, "bias", None) is not None:
        raise UserError(f"--chunked_cross_entropy: {reason or 'the output layer has a bias'}; drop the flag")
    full_forward = model.forward
    rows = rows or chunk_rows(model.config.vocab_size)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, shift_labels=None, **kwargs):
        if labels is None or not self.training:
            return full_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                labels=labels, num_items_in_batch=num_items_in_batch,
                                **({"shift_labels": shift_labels} if shift_labels is not None else {}), **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        # position t predicts token t+1, as HF's loss; a sequence-parallel part comes with its labels shifted
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE) if shift_labels is None else shift_labels
        weight = self.lm_head.weight
        with _gathered(weight):  # ZeRO-3: the whole frozen weight for the chunks, partitioned again after
            total = linear_cross_entropy_sum(outputs.last_hidden_state, weight, shifted, rows)
        items = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE).sum()
        router_logits = getattr(outputs, "router_logits", None)
        if router_logits is not None:  # an MoE model: the objective adds its router loss from these
            return MoeCausalLMOutputWithPast(loss=total / items, router_logits=router_logits)
        return CausalLMOutputWithPast(loss=total / items)

    replace_forward(model, forward)
    return model
