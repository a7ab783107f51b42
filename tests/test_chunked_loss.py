"""Chunked output projection + cross-entropy: the same loss and gradients as the model's own, without the logits."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import cli_here, flags, read_jsonl, run_in_process, tiny_config

from lowmem.model import chunked_loss
from lowmem.run.errors import UserError

VOCAB = 3000


def _pair(tie: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    plain = AutoModelForCausalLM.from_config(config)
    chunked = AutoModelForCausalLM.from_config(config)
    chunked.load_state_dict(plain.state_dict())
    chunked_loss.enable(chunked, rows=7)  # several chunks, the last one short
    return plain, chunked


def _step(model, autocast: bool):
    """Loss, gradients and the bytes autograd saved for backward in one training step."""
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = tokens.clone()
    labels[0, :6] = -100  # a prompt that is not trained on
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=labels, num_items_in_batch=torch.tensor(50.0), use_cache=False).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]), sum(saved)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_same_loss_and_gradients_without_the_logits(tie, autocast):
    plain, chunked = _pair(tie)
    loss_a, grads_a, saved_a = _step(plain, autocast)
    loss_b, grads_b, saved_b = _step(chunked, autocast)
    tolerance = 8e-3 if autocast else 1e-5  # bf16 has 8 bits of mantissa; fp32 sums in another order
    assert loss_b == pytest.approx(loss_a, rel=tolerance)
    torch.testing.assert_close(grads_b, grads_a, rtol=0, atol=tolerance * grads_a.abs().max().item())
    logits_fp32 = 3 * 20 * VOCAB * 4
    assert saved_a - saved_b > logits_fp32  # at least one full fp32 copy of the logits is no longer kept


def test_a_mixture_of_experts_keeps_its_router_logits(qwen3_moe_dir):
    """The chunked loss on a Qwen3-MoE: the same LM loss, router loss and gradients as the model's own forward."""
    from transformers import AutoModelForCausalLM

    from lowmem.data.batches import collate_packed
    from lowmem.data.encoding import Encoded
    from lowmem.train.objective import TokenLoss

    ids = [torch.arange(5, 30), torch.arange(40, 52)]
    batch = collate_packed([[Encoded(i, i.clone()) for i in ids]], 0, 0, 0)
    results = []
    for chunked in (False, True):
        model = AutoModelForCausalLM.from_pretrained(qwen3_moe_dir).train()
        objective = TokenLoss(model, False, 0.01)
        if chunked:
            chunked_loss.enable(model, rows=7)
        loss, parts = objective(model, batch, torch.tensor(float(batch.loss_units)))
        loss.backward()
        results.append((parts["loss"].item(), parts["aux_loss"].item(),
                        torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and aux_b == pytest.approx(aux_a, rel=1e-6) and aux_a > 0
    torch.testing.assert_close(grads_b, grads_a, rtol=0, atol=1e-5 * grads_a.abs().max().item())


def test_evaluation_and_generation_keep_the_full_head():
    plain, chunked = _pair(True)
    tokens = torch.randint(0, VOCAB, (1, 9))
    plain.eval()
    chunked.eval()
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=tokens, labels=tokens).loss, plain(input_ids=tokens, labels=tokens).loss)
        assert chunked(input_ids=tokens).logits.shape == (1, 9, VOCAB)


def test_trainer_losses_match_with_packing(tmp_path, tokenizer_dir, qa_files):
    common = dict(max_steps=3, validation_file="", warmup_steps=0, learn_rate=3e-3, packing=True)
    losses = {}
    for name, extra in {"plain": {}, "chunked": {"chunked_cross_entropy": True}}.items():
        cfg = tiny_config(tmp_path / name, tokenizer_dir, qa_files, **common, **extra)
        run_in_process(cfg)
        losses[name] = [r["loss"] for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r]
    assert len(losses["plain"]) == 3 and losses["chunked"] == pytest.approx(losses["plain"], rel=1e-5)


def test_combinations_that_cannot_work_are_refused(tmp_path, tokenizer_dir, qa_files):
    from lowmem.run import distributed

    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=1)
    result = cli_here(["train", *flags(cfg, "--chunked_cross_entropy=True", "--use_liger_kernel=True")])
    assert result.returncode == 2 and "pick one" in result.stderr and "Traceback" not in result.stderr
    cfg.chunked_cross_entropy = True
    with pytest.raises(UserError, match="ZeRO stage 2"):
        distributed.check_training_options(cfg, {"zero_optimization": {"stage": 3}}, "--zero_stage=3")
    distributed.check_training_options(cfg, {"zero_optimization": {"stage": 2}}, "--zero_stage=2")
