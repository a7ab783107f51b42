"""NonfiniteGuard: a skipped step leaves the optimizer untouched, on the device path without a host sync."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.train.nonfinite import NonfiniteGuard, TrainingHalted
from lowmem.train.state import TrainState


class Metrics:
    def __init__(self):
        self.records = []

    def log(self, record, step):
        self.records.append((step, record))


class HostReads(TorchDispatchMode):
    """Records every device-to-host scalar read (what .item(), float() and bool() of a tensor dispatch to)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _run(optimizer_cls, grads_per_step, max_in_a_row=3):
    """Steps a two-parameter model through the given gradients, as the loop does; returns what is left."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = optimizer_cls(params)
    state = TrainState()
    metrics = Metrics()
    said = []
    guard = NonfiniteGuard(optimizer, True, max_in_a_row, state, "ckpt", torch.device("cpu"), has_ema=False,
                           log=said.append)
    guard.said = said
    reads = HostReads()
    for scale in grads_per_step:
        for p in params:
            p.grad = torch.full_like(p, scale)
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        with reads:
            if guard.allows_step(norm, metrics):
                optimizer.step()
        state.step += 1
    return guard, params, optimizer, state, metrics, reads.reads


def fused(params):
    return torch.optim.AdamW(params, lr=0.1, fused=True)


def plain(params):
    return torch.optim.AdamW(params, lr=0.1, foreach=False)


def test_device_path_skips_like_the_host_path_without_host_reads():
    grads = [1.0, float("nan"), 2.0, float("inf"), float("inf"), 0.5]
    device_guard, device_params, device_opt, device_state, device_metrics, device_reads = _run(fused, grads)
    host_guard, host_params, host_opt, host_state, _, host_reads = _run(plain, grads)
    assert device_guard.on_device and not host_guard.on_device
    assert device_reads == 0  # neither the decision nor the fused step read anything back
    assert host_reads >= len(grads)  # the host path reads the norm every step
    for a, b in zip(device_params, host_params):
        torch.testing.assert_close(a, b)  # skipped steps changed nothing; the finite ones stepped the same
        assert device_opt.state[a]["step"].item() == host_opt.state[b]["step"].item() == 3
    assert device_state.nonfinite_total == 0  # not read yet...
    device_guard.settle(device_metrics)
    assert device_state.nonfinite_total == host_state.nonfinite_total == 3  # ...and now it is
    assert device_state.nonfinite_steps == host_state.nonfinite_steps == 0
    assert device_metrics.records[-1] == (6, {"nonfinite_steps": 2, "nonfinite_since_last_log": 3})
    # the console hears of the first skipped step once (at the step, or at the next settle on the device path)
    assert len(host_guard.said) == len(device_guard.said) == 1
    assert "at step 2" in host_guard.said[0] and "3 times by step 6" in device_guard.said[0]


def test_device_path_halts_at_settle_after_a_streak():
    guard, _, _, state, metrics, _ = _run(fused, [1.0, float("nan"), float("nan"), float("nan"), 1.0])
    with pytest.raises(TrainingHalted, match="3 optimizer steps in a row"):
        guard.settle(metrics)  # the streak ended before the settle, but it reached the limit


def test_host_path_halts_on_the_step():
    with pytest.raises(TrainingHalted, match="3 optimizer steps in a row"):
        _run(plain, [1.0, float("nan"), float("nan"), float("nan"), 1.0])


def test_ema_or_other_optimizers_decide_on_the_host():
    params = [torch.nn.Parameter(torch.zeros(2))]
    state = TrainState()
    assert not NonfiniteGuard(fused(params), True, 3, state, "c", "cpu", has_ema=True).on_device
    assert not NonfiniteGuard(plain(params), True, 3, state, "c", "cpu", has_ema=False).on_device
    assert not NonfiniteGuard(fused(params), False, 3, state, "c", "cpu", has_ema=False).on_device
