"""SFT: response-only loss, packing equivalence, user-modeling records end to end, early stopping."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_here, read_jsonl, run_in_process, tiny_config

from lowmem.data.batches import collate, collate_packed, pack_rows
from lowmem.data.encoding import SampleEncoder
from lowmem.data.template import IGNORE_INDEX, encode_example


@pytest.fixture(scope="module")
def tiny_model(tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval(), tok


def test_masked_loss_is_cross_entropy_over_response_tokens_only(tiny_model):
    model, tok = tiny_model
    prompt, response = "What is 3 + 4?", "7"
    example = encode_example(tok, prompt, response, max_len=64)
    response_ids = [i for i, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert tok.decode(response_ids).startswith(response)  # only the answer (and its end marker) is learned
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
        ours = model(ids, labels=torch.tensor([example.labels])).loss
    # by hand: position t predicts token t+1; keep the positions whose next token is in the response
    first = example.labels.index(next(l for l in example.labels if l != IGNORE_INDEX))
    by_hand = F.cross_entropy(logits[first - 1:-1], ids[0, first:])
    torch.testing.assert_close(ours, by_hand)


def test_packed_and_padded_batches_give_same_loss_and_gradients(tiny_model):
    model, tok = tiny_model
    model = model.train()
    encoder = SampleEncoder(tok, 64)
    rng = random.Random(0)
    samples = [encoder({"prompt": "q " * rng.randint(1, 15), "response": "a " * rng.randint(1, 6)}) for _ in range(7)]
    padded = collate(samples, tok.pad_token_id, False, position=7)
    packed = collate_packed(pack_rows(samples, 64), tok.pad_token_id, position=7, skip=0)
    assert packed.loss_units == padded.loss_units
    assert packed.tensors["input_ids"].shape[0] < padded.tensors["input_ids"].shape[0]

    def loss_and_grads(batch):
        model.zero_grad()
        n = torch.tensor(float(batch.loss_units))
        loss = model(**batch.tensors, use_cache=False, num_items_in_batch=n).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads(padded)
    loss_b, grads_b = loss_and_grads(packed)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def write_user_records(path, n_users=60, per_user=8, seed=0):
    """Each user's messages name their favourite colour (profile) and echo their latest history item."""
    rng = random.Random(seed)
    colours = ["red", "blue", "green", "gold", "pink", "gray"]
    with open(path, "w", encoding="utf-8") as f:
        for u in range(n_users):
            colour = rng.choice(colours)
            for i in range(per_user):
                f.write(json.dumps({"user_id": f"u{u}", "profile": {"colour": colour}, "timestamp": i,
                                    "item_id": i, "context": [f"friend: what do you like, day {i}?"],
                                    "target": f"I like {colour} things"}) + "\n")
    return str(path)


@pytest.mark.slow
def test_sft_on_user_records_lowers_validation_loss(tmp_path, tokenizer_dir):
    data = write_user_records(tmp_path / "users.jsonl")
    cfg = tiny_config(tmp_path, tokenizer_dir, {"train_file": data, "validation_file": ""}, val_ratio=0.2,
                      split_by="user", ablation_config="profile_and_context", prompt_style="simple", epochs=4,
                      max_seq_len=128, batch_size_per_gpu=8, learn_rate=3e-3, eval_steps=1000, packing=True,
                      max_samples_per_user=4, resample_each_epoch=True, logging_steps=5)
    summary = run_in_process(cfg)
    evals = [r for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "eval_loss" in r]
    first, last = evals[0]["eval_loss"], summary["eval_loss"]
    assert last < 0.5 * first, (first, last)
    losses = [r for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r]
    assert all(r["real_token_fraction"] > 0.7 for r in losses)  # packing keeps padding low


def test_early_stopping_stops_at_expected_epoch_and_exports_best(tmp_path, tokenizer_dir, qa_files):
    # a learning rate so small the loss plateaus: epoch 0 sets the best, the next two do not improve it
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, epochs=10, learn_rate=1e-9, warmup_steps=0,
                      early_stopping_patience=2, early_stopping_threshold=0.01, eval_steps=1000)
    summary = run_in_process(cfg)
    assert summary["stopped_early"] and summary["epoch"] == 3
    evals = [r for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "eval_loss" in r]
    assert len(evals) == 3
    from safetensors.torch import load_file

    best = load_file(os.path.join(cfg.checkpoint_dir(), "best", "model", "model.safetensors"))
    final = load_file(os.path.join(cfg.final_dir(), "model.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in final)


def test_ema_is_saved_and_used_for_export(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=6, use_ema=True, ema_decay=0.5, save_steps=6)
    run_in_process(cfg)
    from safetensors.torch import load_file

    ckpt = os.path.join(cfg.checkpoint_dir(), "step_00000006")
    ema = load_file(os.path.join(ckpt, "ema", "model.safetensors"))
    raw = load_file(os.path.join(ckpt, "model", "model.safetensors"))
    final = load_file(os.path.join(cfg.final_dir(), "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ema[key], raw[key]) and torch.equal(final[key], ema[key])


def test_users_command_shape_runs_as_written(tmp_path, tokenizer_dir):
    data = write_user_records(tmp_path / "users.jsonl", n_users=20, per_user=4)
    config_file = tmp_path / "config_tiny.json"
    config_file.write_text(json.dumps({"preset": "sft", "train_file": data, "tokenizer_dir": tokenizer_dir,
                                       "finetune_from_ckp_file": "", "model_preset": "tiny", "max_seq_len": 128,
                                       "batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                                       "report_to": "none", "log_dir": str(tmp_path / "logs"), "learn_rate": 1e-3}))
    out = tmp_path / "outputs" / "profile_context_sampled_seed42"
    result = cli_here(["train", "--config", str(config_file), "--ablation_config", "profile_and_context",
                  "--output_dir", str(out), "--max_epochs", "3", "--val_ratio", "0.1", "--prompt_style", "simple",
                  "--max_samples_per_user", "2", "--sample_seed", "42", "--early_stopping_patience", "3",
                  "--early_stopping_threshold", "0.001"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(out / "sft" / "final" / "model.safetensors")
    assert "samples per user" in result.stdout or "per user" in result.stdout
    assert "optimizer steps (3 epochs x ~" in result.stdout  # --max_epochs is the run length the summary states


@pytest.mark.parametrize("flag, needle", [("--ablation_config=profile_and_mood", "ablation_config"),
                                          ("--prompt_style=lovink", "prompt_style"),
                                          ("--max_samples_per_user=0", "max_samples_per_user")])
def test_bad_sft_options_are_one_line_errors(tmp_path, tokenizer_dir, flag, needle):
    data = write_user_records(tmp_path / "users.jsonl", n_users=4, per_user=2)
    result = cli_here(["train", f"--train_file={data}", f"--tokenizer_dir={tokenizer_dir}", "--validation_file=",
                  "--test_file=", f"--output_dir={tmp_path}/m", f"--log_dir={tmp_path}/l", flag])
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_finetune_from_local_dir_with_its_tokenizer_and_sample_prompts(tmp_path, tokenizer_dir, qa_files):
    base = tiny_config(tmp_path / "base", tokenizer_dir, qa_files, max_steps=3, validation_file="")
    run_in_process(base)
    sft = tiny_config(tmp_path / "sft", "", qa_files, finetune_from_ckp_file=base.final_dir(), max_steps=4,
                      freeze_embeddings=True, gradient_checkpointing=True, eval_steps=2,
                      sample_prompts=["What is 2 + 2?", "重复：猫 狗"])
    run_in_process(sft)
    records = read_jsonl(os.path.join(sft.logging_dir(), "metrics.jsonl"))
    samples = [r["samples"] for r in records if "samples" in r]
    assert len(samples) >= 2 and set(samples[0]) == {"What is 2 + 2?", "重复：猫 狗"}
    from safetensors.torch import load_file

    before = load_file(os.path.join(base.final_dir(), "model.safetensors"))
    after = load_file(os.path.join(sft.final_dir(), "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert torch.equal(before[key], after[key])  # frozen
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
