"""Skip optimizer steps whose gradient norm is inf/nan; stop a run that keeps producing them.

With torch's fused AdamW the skip is decided on the device: the optimizer's `found_inf` flag (the one
GradScaler sets) makes the fused kernel leave weights, moments and step count untouched, and the
counters stay on the device until the loop logs, evaluates or saves (`settle`). No host sync per step.
Other optimizers (torchao's, Adafactor, DeepSpeed's) need the norm on the host every step to decide.
"""
from __future__ import annotations

import math

import torch

from ..run.errors import UserError


class TrainingHalted(UserError):
    """The run cannot go on (e.g. the loss diverged); nothing was saved after the last good checkpoint."""


class NonfiniteGuard:
    def __init__(self, optimizer, enabled: bool, max_in_a_row: int, state, checkpoint_dir: str,
                 device, has_ema: bool, log=print):
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the torch optimizer
        fused = isinstance(inner, torch.optim.AdamW) and bool(inner.defaults.get("fused"))
        self.enabled, self.max_in_a_row, self.state, self.checkpoint_dir = enabled, max_in_a_row, state, checkpoint_dir
        self.log, self.announced = log, False
        # EMA would still average a skipped step in: that path decides on the host
        self.optimizer = inner if enabled and fused and not has_ema else None
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.streak, self.worst, self.count = zero(), zero(), zero()
        self.streak += state.nonfinite_steps

    @property
    def on_device(self) -> bool:
        return self.optimizer is not None

    def allows_step(self, grad_norm, metrics) -> bool:
        """Whether the loop should call optimizer.step(); on the device path the fused kernel skips by itself."""
        if not self.enabled:
            return True
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: clip_grad_norm_ returns a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        if self.on_device and isinstance(grad_norm, torch.Tensor):
            bad = (~torch.isfinite(grad_norm)).float()
            self.optimizer.found_inf = bad
            self.streak.add_(1).mul_(bad)
            torch.maximum(self.worst, self.streak, out=self.worst)
            self.count.add_(bad)
            return True
        state = self.state
        if math.isfinite(float(grad_norm)):  # the host path's one sync per step
            state.finite_step()
            return True
        in_a_row = state.nonfinite_step()
        metrics.log({"nonfinite_steps": in_a_row, "grad_norm": float(grad_norm)}, state.step + 1)
        self._announce(state.step + 1, 1)
        self._halt_if(in_a_row, state.step + 1)
        return False

    def settle(self, metrics) -> None:
        """Bring the device counters into the train state; halt if a streak reached the limit."""
        if not self.on_device:
            return
        streak, worst, count = (int(t.item()) for t in (self.streak, self.worst, self.count))
        state = self.state
        state.settle_nonfinite(streak, count)
        if count:
            metrics.log({"nonfinite_steps": worst, "nonfinite_since_last_log": count}, state.step)
            self._announce(state.step, count)
        self.worst.zero_()
        self.count.zero_()
        self._halt_if(worst, state.step)

    def _announce(self, step: int, count: int) -> None:
        """The first skipped step of a run is said on the console; later ones are counted in metrics.jsonl."""
        if self.announced:
            return
        self.announced = True
        when = f"at step {step}" if count == 1 else f"{count} times by step {step}"
        self.log(f"warning: the gradient was not finite {when}; such steps are skipped (the weights do not change) and "
                 f"the run stops after {self.max_in_a_row} in a row; later ones are counted in metrics.jsonl "
                 "(nonfinite_total). A loss that diverges usually needs a lower --learn_rate")

    def _halt_if(self, in_a_row: int, step: int) -> None:
        if in_a_row >= self.max_in_a_row:
            raise TrainingHalted(f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient (by step "
                                 f"{step}); stopped without saving. The last good checkpoint in {self.checkpoint_dir} "
                                 "is intact: lower --learn_rate or check the data")
