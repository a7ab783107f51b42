"""Each private piece of another library that lowmem/run/compat.py relies on is still there and still does what we use
it for. A failure names the library: read the function's comment in compat.py, then that library's changelog."""
from __future__ import annotations

import inspect

import pytest
import torch

from lowmem.run import compat


def _fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_syncs_after_the_micro_batches_counted_in_step():
    from accelerate import Accelerator

    _fresh_accelerate()
    try:
        acc = Accelerator(cpu=True, gradient_accumulation_steps=4)
        model = acc.prepare(torch.nn.Linear(2, 2))
        compat.set_accumulation_position(acc, 3)  # three of four done: the next micro-batch must sync
        with acc.accumulate(model):
            pass
        assert acc.sync_gradients, "accelerate: Accelerator.step no longer decides when gradients sync (compat.py)"
        compat.set_accumulation_position(acc, 1)
        with acc.accumulate(model):
            pass
        assert not acc.sync_gradients, "accelerate: Accelerator.step no longer counts micro-batches (compat.py)"
    finally:
        _fresh_accelerate()


def test_accelerate_picks_fsdp_from_the_shared_distributed_type():
    from accelerate.state import AcceleratorState, PartialState

    source = inspect.getsource(AcceleratorState.__init__)
    assert "self.distributed_type = DistributedType.FSDP" in source, \
        "accelerate: AcceleratorState no longer chooses FSDP by distributed_type (compat.present_cpu_processes_as_gpus)"
    assert "distributed_type" in inspect.getsource(PartialState.__init__), \
        "accelerate: PartialState no longer holds distributed_type (compat.present_cpu_processes_as_gpus)"


def test_torch_scheduler_reports_the_lr_set_through_last_lr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    compat.set_scheduler_last_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25], "torch: LRScheduler.get_last_lr no longer returns _last_lr (compat.py)"


def test_torch_ddp_reads_the_parameters_to_ignore():
    source = inspect.getsource(torch.nn.parallel.DistributedDataParallel.__init__)
    assert "_ddp_params_and_buffers_to_ignore" in source, \
        "torch: DistributedDataParallel no longer reads _ddp_params_and_buffers_to_ignore (compat.ddp_ignore_parameters)"


def test_deepspeed_reads_its_compatible_ops_table():
    import importlib.util
    import os

    spec = importlib.util.find_spec("deepspeed")  # the source is read, not imported: importing deepspeed is slow
    if spec is None:
        pytest.skip("deepspeed is not installed")
    folder = spec.submodule_search_locations[0]
    with open(os.path.join(folder, "comm", "torch.py"), encoding="utf-8") as f:
        comm = f.read()
    with open(os.path.join(folder, "ops", "__init__.py"), encoding="utf-8") as f:
        ops = f.read()
    assert "__compatible_ops__" in comm and "__compatible_ops__" in ops, \
        "deepspeed: deepspeed.comm no longer consults deepspeed.ops.__compatible_ops__ (compat.py)"


def test_torchao_has_plain_adamw_with_stochastic_rounding():
    pytest.importorskip("torchao")
    adamw = compat.torchao_adamw()
    assert "bf16_stochastic_round" in inspect.signature(adamw).parameters, \
        "torchao: torchao.optim._AdamW changed (compat.torchao_adamw)"


def test_a_replaced_forward_is_what_calling_the_model_runs():
    model = torch.nn.Linear(2, 2)
    compat.replace_forward(model, lambda self, x: x * 0 + 7)
    assert (model(torch.ones(1, 2)) == 7).all(), "torch: nn.Module.__call__ no longer runs self.forward (compat.py)"


def test_liger_kernel_keeps_its_instance_patcher():
    liger = pytest.importorskip("liger_kernel.transformers")
    assert hasattr(liger, "_apply_liger_kernel_to_instance"), \
        "liger-kernel: _apply_liger_kernel_to_instance is gone (compat.apply_liger_kernels)"


def test_no_private_attribute_of_a_library_is_written_outside_compat():
    """A write like `obj._name = ...` or `module.__name__[...] = ...` on another library's object lives in compat.py."""
    import ast
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lowmem")
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path.endswith("compat.py"):
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for target in targets:
                    while isinstance(target, ast.Subscript):
                        target = target.value
                    if isinstance(target, ast.Attribute) and target.attr.startswith("_") and not (
                            isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")):
                        found.append(f"{os.path.relpath(path, root)}:{node.lineno} {target.attr}")
                    if isinstance(target, ast.Attribute) and target.attr in ("forward", "step") and not (
                            isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")):
                        found.append(f"{os.path.relpath(path, root)}:{node.lineno} {target.attr}")
    assert not found, f"private writes outside lowmem/run/compat.py: {found}"
