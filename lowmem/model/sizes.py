"""How big a model is: its parameters, counted at their real size under ZeRO-3 (whose tensors are empty
placeholders), the trained ones, and for a mixture of experts those a token computes with."""
from __future__ import annotations

from .moe import EXPERTS, moe_shape


def real_numel(param) -> int:
    """Elements of a parameter; under ZeRO-3 the tensor is an empty placeholder and ds_numel its real size."""
    return getattr(param, "ds_numel", param.numel())


def count_parameters(model, trained_only: bool = False) -> int:
    return sum(real_numel(p) for p in model.parameters() if p.requires_grad or not trained_only)


def parameter_bytes(model, trained_only: bool = False) -> float:
    """Bytes the parameters take in their own dtypes (4-bit NF4 weights at half a byte each, scales aside)."""
    return sum(real_numel(p) * (0.5 if "NF4" in type(p).__name__ or "NF4" in type(p.data).__name__
                                else p.element_size())
               for p in model.parameters() if p.requires_grad or not trained_only)


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, those a token computes with): each MoE layer's experts count k / E of their weights."""
    shape = moe_shape(model.config)
    total, inactive = 0, 0.0
    for name, param in model.named_parameters():
        n = real_numel(param)
        total += n
        if shape is not None and EXPERTS in f".{name}":
            inactive += n * (shape.num_experts - shape.top_k) / shape.num_experts
    return total, int(round(total - inactive))
