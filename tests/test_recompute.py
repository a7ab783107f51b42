"""Activation checkpointing modes: what each recomputes, that none changes the math, and their flags."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import cli_here, flags, read_jsonl, run_in_process, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.model import recompute

LAYERS = 4


class OpCounter(TorchDispatchMode):
    """Counts every aten op run under it, forward and backward."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__] = self.counts.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


def _step(mode: str | None, every: int = 1):
    """One forward/backward of a small Llama; returns the op counts, the loss and the flat gradient."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if mode is not None:
        assert recompute.enable(model, mode, every) == len(range(0, LAYERS, every))
    model.train()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with OpCounter() as counter:
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return counter.counts, loss.item(), grads


def test_each_mode_recomputes_what_it_says_and_keeps_the_gradients():
    plain, loss, grads = _step(None)
    mm, attn, silu = "mm.default", "_scaled_dot_product_flash_attention_for_cpu.default", "silu.default"
    assert plain[attn] == LAYERS and plain[silu] == LAYERS
    results = {case: _step(*case) for case in [("full", 1), ("selective", 1), ("full", 2), ("selective", 2)]}
    for counts, case_loss, case_grads in results.values():
        assert case_loss == loss
        torch.testing.assert_close(case_grads, grads, rtol=0, atol=1e-6)
    full, selective, full_half, selective_half = (results[c][0] for c in results)
    per_layer_mm = (full[mm] - plain[mm]) / LAYERS
    assert per_layer_mm >= 6  # full reruns every projection of every block...
    assert full[attn] == full[silu] == 2 * LAYERS  # ...and its attention and activation function
    assert selective[mm] == plain[mm] and selective[attn] == LAYERS  # selective keeps matmul and attention outputs
    assert selective[silu] == 2 * LAYERS  # and recomputes the cheap element-wise ops
    assert full_half[mm] == plain[mm] + per_layer_mm * LAYERS // 2 and full_half[attn] == LAYERS + LAYERS // 2
    assert selective_half[mm] == plain[mm] and selective_half[silu] == LAYERS + LAYERS // 2


def test_trainer_losses_do_not_depend_on_the_mode(tmp_path, tokenizer_dir, qa_files):
    common = dict(max_steps=3, validation_file="", warmup_steps=0, max_seq_len=48, learn_rate=3e-3)
    losses = {}
    for name, extra in {"plain": {}, "full": {"gradient_checkpointing": True},
                        "selective_every_2": {"gradient_checkpointing": True, "gradient_checkpointing_mode": "selective",
                                              "gradient_checkpointing_every": 2}}.items():
        cfg = tiny_config(tmp_path / name, tokenizer_dir, qa_files, **common, **extra)
        run_in_process(cfg)
        losses[name] = [r["loss"] for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r]
    assert len(losses["plain"]) == 3
    assert losses["full"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["selective_every_2"] == pytest.approx(losses["plain"], rel=1e-5)


@pytest.mark.parametrize("extra, needle", [
    (["--gradient_checkpointing_mode=selective"], "take effect only with --gradient_checkpointing=True"),
    (["--gradient_checkpointing=True", "--gradient_checkpointing_mode=ops"], "expects one of full, selective"),
    (["--gradient_checkpointing=True", "--gradient_checkpointing_every=0"],
     "--gradient_checkpointing_every=0 must be at least 1"),
])
def test_checkpointing_flags_are_checked(tmp_path, tokenizer_dir, qa_files, extra, needle):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=1)
    result = cli_here(["train", *flags(cfg, *extra)])
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
