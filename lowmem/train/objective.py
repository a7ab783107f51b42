"""What a training step minimises and what an evaluation measures, for one micro-batch.

The loop normalises over the whole optimizer step: a micro-batch's token loss is summed and divided by
`scale` (the step's label tokens over all processes, divided by micro-batches x processes), so after
Accelerate's division by the accumulation steps and the average over processes, the step minimises the mean
over every label token of the step, whatever the split. An MoE router's load-balancing loss is a mean per
micro-batch; it is added with the run's coefficient, so the step minimises its mean over the step's
micro-batches (its value depends a little on how tokens are split into micro-batches, its scale does not).
Under sequence parallelism a process holds part of each sequence: its token loss is its part's sum (with
labels shifted before the cut), and the router loss is the whole sequence's (sequence_parallel.sum_over_group).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import sequence_parallel
from ..model.moe import keep_router_loss_out_of_the_model_loss, moe_shape, router_aux_loss


class TokenLoss:
    """Next-token cross-entropy over the label tokens, plus the router's balance loss for MoE models."""

    def __init__(self, model, is_encoder_decoder: bool, router_aux_loss_coef: float | None = None):
        self.is_encoder_decoder = is_encoder_decoder
        self.moe = moe_shape(model.config)
        self.router_coef = 0.0
        if self.moe is not None:
            given = router_aux_loss_coef
            self.router_coef = self.moe.router_aux_loss_coef if given is None else float(given)
            keep_router_loss_out_of_the_model_loss(model)

    @property
    def routes(self) -> bool:
        """Whether router logits are asked for: an MoE model with the balance loss on."""
        return self.router_coef > 0

    def describe(self) -> str:
        if self.moe is None:
            return ""
        if not self.routes:
            return "router balance loss off (--router_aux_loss_coef=0)"
        return f"router balance loss x {self.router_coef:g} (logged as aux_loss; padding excluded)"

    perplexity = True  # evaluation reports exp(eval_loss) and the label tokens it saw

    def __call__(self, model, batch, scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(what backward takes, detached parts to log: "loss" and, when routing, "aux_loss"), for a batch on the
        model's device."""
        inputs = batch.tensors
        if self.is_encoder_decoder:
            logits = model(**inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), inputs["labels"].flatten(), reduction="sum") / scale
            return loss, {"loss": loss.detach()}
        # no KV cache while training: it costs memory and hides packed sequences from the mask builder
        out = model(**inputs, use_cache=False, num_items_in_batch=scale, **({"output_router_logits": True}
                                                                            if self.routes else {}))
        if not self.routes:
            return out.loss, {"loss": out.loss.detach()}
        # under sequence parallelism every process of a group holds the whole sequence's router loss: logged once
        aux = router_aux_loss(out.router_logits, self.moe.num_experts, self.moe.top_k, batch.real,
                              sequence_parallel.sum_over_group)
        shared = sequence_parallel.size()
        return out.loss + self.router_coef * aux, {"loss": out.loss.detach(), "aux_loss": aux.detach() / shared}

    @torch.no_grad()
    def eval_sums(self, model, batch) -> dict[str, tuple[torch.Tensor, float]]:
        """name -> (sum, count) of a validation micro-batch: the summed token loss over its label tokens, and the
        router's balance loss over micro-batches."""
        one = torch.ones((), device=batch.tensors["input_ids"].device)
        _, parts = self(model, batch, one)
        sums = {"loss": (parts["loss"], float(batch.loss_units))}
        if "aux_loss" in parts:  # once per micro-batch: a sequence group's processes count one share each
            sums["aux_loss"] = (parts["aux_loss"], 1.0 / sequence_parallel.size())
        return sums
