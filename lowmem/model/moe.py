"""Mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, ...): what sets them apart for training.

A token passes through `k` of each MoE layer's `E` experts, so it computes with the "active" parameters
(everything but (E - k) / E of the expert weights), while memory holds them all. A router picks the experts;
its load-balancing loss (Switch Transformer style, the models' own `load_balancing_loss_func`) keeps the
experts evenly used. transformers 5 stores a layer's experts fused, as 3-D parameters (`experts.gate_up_proj`
of shape (E, 2I, H), `experts.down_proj` (E, H, I)); older classes and remote code keep one module per expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXPERTS = ".experts."  # what the name of every expert parameter contains, fused or one module per expert


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int
    router_aux_loss_coef: float  # the model config's own coefficient


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def moe_shape(config) -> MoeShape | None:
    """The routing of a model config, or None for a dense model."""
    config = text_config(config)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k or not hasattr(config, "router_aux_loss_coef"):
        return None
    return MoeShape(int(experts), int(top_k), float(config.router_aux_loss_coef or 0.0))


def mlp_width(config) -> int:
    """The MLP width a token computes with in a layer: k experts' widths (plus a shared expert's), or the dense one."""
    shape, config = moe_shape(config), text_config(config)
    if shape is None:
        return config.intermediate_size
    per_expert = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return shape.top_k * per_expert + (getattr(config, "shared_expert_intermediate_size", 0) or 0)


def fused_expert_parameters(model) -> list[tuple[str, str, int]]:
    """(module name, parameter name, E) of every fused 3-D expert weight (transformers 5's expert layout)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts"):
            for pname, param in module.named_parameters(recurse=False):
                shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps an empty placeholder
                if len(shape) == 3:
                    found.append((name, pname, int(shape[0])))
    return found


def sparse_blocks(model) -> list:
    """The MoE blocks (router + experts) of the model's layers."""
    return [m for m in model.modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoeBlock", "MoE"))
            and any(type(c).__name__.endswith("Experts") or "experts" in n for n, c in m.named_children())]


def mark_zero3_leaves(model) -> list[str]:
    """Mark each MoE block a ZeRO-3 leaf (its weights are gathered as one, not per submodule it calls): experts kept
    as one module each are called only where tokens are routed, which differs between ranks and would hang them."""
    classes = sorted({type(block) for block in sparse_blocks(model)}, key=lambda c: c.__name__)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def keep_router_loss_out_of_the_model_loss(model) -> None:
    """The loop adds the router loss itself (padding masked, its own coefficient); the model must not add its own.
    transformers 5.25's MoE CausalLM classes add `self.router_aux_loss_coef * aux_loss` to `loss`."""
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = 0.0


def router_aux_loss(router_logits: tuple, num_experts: int, top_k: int, mask: torch.Tensor | None,
                    total=lambda x: x) -> torch.Tensor:
    """The load-balancing loss over the router logits of every MoE layer (each [tokens, E]), counting only the tokens
    where `mask` ([batch, seq]) is true: E * sum_e f_e * P_e, with f_e the share of routing choices that went to
    expert e and P_e its mean router probability, pooled over layers. 0 when no token counts (a filler batch).
    `total` sums a tensor over the processes that hold parts of the same sequences (sequence parallelism)."""
    logits = torch.stack([layer.float() for layer in router_logits])  # [layers, tokens, E]
    probs = logits.softmax(-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(2).float()  # [layers, tokens, E]
    weight = torch.ones(logits.shape[1], device=logits.device) if mask is None else \
        mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
    count = total(weight.sum() * logits.shape[0]).clamp(min=1)  # no host sync; an empty mask gives 0
    share = total((chosen * weight[None, :, None]).sum((0, 1))) / count
    mean_prob = total((probs * weight[None, :, None]).sum((0, 1))) / count
    return num_experts * (share * mean_prob).sum()
