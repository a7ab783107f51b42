"""Mixture-of-experts models (tiny Qwen3-MoE and Mixtral from local directories): the router's balance loss, LoRA on
the fused experts but never the router, honest sizes, and the same results however a step is split."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import cli, flags, read_jsonl, run_in_process, tiny_config, two_processes


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _batch(tokenizer_dir, padded: bool = True):
    """Two samples of different lengths, padded (attention mask) or packed one per row (a padding tail, no mask)."""
    from lowmem.data.batches import collate, collate_packed
    from lowmem.data.encoding import Encoded

    samples = [Encoded(torch.arange(5, 17), torch.arange(5, 17)), Encoded(torch.arange(30, 37), torch.arange(30, 37))]
    return collate(samples, 0, False, 0) if padded else collate_packed([[samples[0]], [samples[1]]], 0, 0, 0)


def test_router_loss_is_the_models_own_and_leaves_padding_out(qwen3_moe_dir, tokenizer_dir):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from lowmem.model.moe import router_aux_loss

    model = _model(qwen3_moe_dir).requires_grad_(False)
    batch = _batch(tokenizer_dir)
    out = model(**batch.tensors, output_router_logits=True)
    shape = (model.config.num_experts, model.config.num_experts_per_tok)
    mine = router_aux_loss(out.router_logits, *shape, batch.real)
    torch.testing.assert_close(mine, out.aux_loss, rtol=1e-6, atol=1e-6)  # the model masks with its attention mask
    unmasked = load_balancing_loss_func(out.router_logits, *shape, None)
    assert abs(float(unmasked - mine)) > 1e-4  # the padding would have counted
    packed = _batch(tokenizer_dir, padded=False)  # packed rows have no attention mask: only `real` leaves padding out
    logits = model(**packed.tensors, output_router_logits=True).router_logits
    assert abs(float(router_aux_loss(logits, *shape, packed.real) - router_aux_loss(logits, *shape, None))) > 1e-4
    assert float(router_aux_loss(logits, *shape, torch.zeros_like(packed.real))) == 0.0  # a filler batch adds nothing


def test_router_loss_moves_the_gate_and_zero_turns_it_off(qwen3_moe_dir, tokenizer_dir):
    from lowmem.train.objective import TokenLoss

    batch = _batch(tokenizer_dir)
    grads = {}
    for coef in (0.0, 0.5):
        model = _model(qwen3_moe_dir)
        objective = TokenLoss(model, False, coef)
        loss, parts = objective(model, batch, torch.tensor(float(batch.loss_units)))
        loss.backward()
        assert objective.routes == (coef > 0) and ("aux_loss" in parts) == (coef > 0)
        grads[coef] = model.model.layers[0].mlp.gate.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.5])
    assert TokenLoss(_model(qwen3_moe_dir), False, None).router_coef == 0.001  # the model's own by default


def moe_config(tmp_path, qa_files, model_dir, **overrides):
    """A run fine-tuning the MoE model of `model_dir` with its own tokenizer."""
    values = dict(finetune_from_ckp_file=model_dir, learn_rate=1e-2, warmup_steps=0, lr_scheduler="constant",
                  mixed_precision="no", max_steps=8, eval_steps=4, save_steps=8)
    return tiny_config(tmp_path, "", qa_files, **{**values, **overrides})


def losses(cfg) -> list[float]:
    return [r["loss"] for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_trains_with_its_router_loss_and_says_what_it_is(tmp_path, tokenizer_dir, qa_files, family, request,
                                                             capsys):
    cfg = moe_config(tmp_path, qa_files, request.getfixturevalue(f"{family}_dir"), eval_steps=2)
    result = run_in_process(cfg)
    out = capsys.readouterr().out
    assert f"model {family} from {os.path.abspath(cfg.finetune_from_ckp_file)}: 0.23M parameters, 0.12M active per " \
           "token (2 of 8 experts)" in out and "router balance loss x 0.001" in out
    records = read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl"))
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.05  # it learns
    aux = [r["aux_loss"] for r in records if "loss" in r]
    assert len(aux) == 8 and all(0 < a < 10 for a in aux)  # logged every step beside the LM loss, finite
    assert 0 < result["eval_aux_loss"] < 10 and result["eval_loss"] == evals[-1]


@pytest.mark.slow
def test_with_the_router_loss_off_a_step_is_the_same_however_it_is_split(tmp_path, tokenizer_dir, qa_files,
                                                                        qwen3_moe_dir):
    """8 x 1 = 4 x 2 accumulation = 2 processes x 4 (each process on samples of its own): the same losses and weights
    (the balance loss is a mean per micro-batch, so only with it off is the split invisible)."""
    from safetensors.torch import load_file

    common = dict(router_aux_loss_coef=0.0, max_steps=4, save_steps=4, validation_file="", adam_eps=1e-4)
    whole = moe_config(tmp_path / "whole", qa_files, qwen3_moe_dir, batch_size_per_gpu=8, **common)
    split = moe_config(tmp_path / "split", qa_files, qwen3_moe_dir, batch_size_per_gpu=4,
                       gradient_accumulation_steps=2, **common)
    shared = moe_config(tmp_path / "shared", qa_files, qwen3_moe_dir, batch_size_per_gpu=4, trace_samples=True,
                        **common)
    for cfg in (whole, split):
        run_in_process(cfg)
    result = cli(["train", *flags(shared)], launcher=two_processes(), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "aux_loss" not in read_jsonl(os.path.join(whole.logging_dir(), "metrics.jsonl"))[0]
    ranks = [read_jsonl(os.path.join(shared.logging_dir(), f"samples_rank{r}.jsonl")) for r in (0, 1)]
    seen = [[h for record in records for h in record["samples"]] for records in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 4  # both processes took every optimizer step...
    assert len(set(seen[0]) | set(seen[1])) == len(seen[0]) + len(seen[1]) == 32  # ...on samples of their own
    assert not os.path.exists(shared.final_dir() + ".tmp")
    reference = load_file(os.path.join(whole.final_dir(), "model.safetensors"))
    for cfg in (split, shared):
        assert losses(cfg) == pytest.approx(losses(whole), rel=1e-6)
        weights = load_file(os.path.join(cfg.final_dir(), "model.safetensors"))
        for name, tensor in reference.items():
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=2e-6)


def test_lora_adapts_the_experts_never_the_router_and_merges_exactly(qwen3_moe_dir, tokenizer_dir):
    """LoRA on q,k,v,o and the fused experts; the router trains in full only when asked; the merged weights give the
    peft model's logits."""
    from peft.tuners.lora import ParamWrapper

    from config import TrainConfig
    from lowmem.model.adapters import apply_lora, base_state_dict, lora_merges

    said = []
    cfg = TrainConfig(finetune_from_ckp_file=qwen3_moe_dir, lora_r=4, lora_alpha=8.0)
    peft_model = apply_lora(_model(qwen3_moe_dir), cfg, said.append)
    wrapped = {name for name, m in peft_model.named_modules() if isinstance(m, ParamWrapper)}
    assert len(wrapped) == 4  # gate_up_proj and down_proj of both layers' experts
    trained = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert not [name for name in trained if ".mlp.gate." in name]  # the router: no adapter, not trained
    assert "LoRA r=4 on k,o,q,v + 8 experts x 2 layers (down_proj, gate_up_proj)" in said[-1]
    assert "no dropout" in said[0]  # peft's LoRA on parameters has none; the run says so
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # B starts at zero: give every adapter an update to merge
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    expected = peft_model(input_ids=ids).logits
    merged = _model(qwen3_moe_dir)
    merged.load_state_dict(base_state_dict(peft_model.state_dict(), lora_merges(peft_model)))
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    router = apply_lora(_model(qwen3_moe_dir), dataclasses.replace(cfg, lora_train_router=True), said.append)
    assert [n for n, p in router.named_parameters() if p.requires_grad and ".mlp.gate." in n]
    assert "trained in full: mlp.gate" in said[-1]
