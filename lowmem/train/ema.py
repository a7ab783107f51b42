"""Exponential moving average of the trained weights, kept as a model copy that eval and export use.

The copy shares every frozen weight with the trained model (a LoRA base, frozen embeddings): only the
weights that train are held twice, so with LoRA the EMA costs the adapters' size, not a second base.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model, decay: float):
        if not 0.0 < decay < 1.0:
            from ..run.errors import UserError

            raise UserError(f"--ema_decay={decay} must be between 0 and 1")
        self.decay = decay
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}  # deepcopy reuses what memo holds
        self.model = copy.deepcopy(model, memo=frozen).eval()
        self.model.requires_grad_(False)
        self._pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self) -> None:
        """ema = decay * ema + (1 - decay) * weights, for every trained parameter."""
        ema_params = [e for e, _ in self._pairs]
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in self._pairs], 1.0 - self.decay)
