"""Optimizer options on CPU (train, save, resume exactly) and the auto_batch_size search arithmetic."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import COMPILES, cli, cli_here, env_without, flags, read_jsonl, run_in_process, tiny_config

from lowmem.run.errors import UserError
from lowmem.train.autobatch import largest_fitting, split_global_batch

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def test_largest_fitting_against_a_fake_memory_limit():
    for limit in (1, 2, 3, 7, 8, 33, 100):
        calls = []

        def fits(b, limit=limit):
            calls.append(b)
            return b * 1.5 <= limit * 1.5  # memory grows with the batch; the limit is `limit` rows
        assert largest_fitting(fits, upper=64) == min(limit, 64)
        assert len(calls) <= 2 * 7 + 2  # doubling then bisection: logarithmic probes
    assert largest_fitting(lambda b: False, upper=64) == 0
    assert largest_fitting(lambda b: True, upper=48) == 48


@pytest.mark.parametrize("per_process, largest, expected", [
    (32, 100, (32, 1)), (32, 12, (8, 4)), (32, 5, (4, 8)), (24, 7, (6, 4)), (7, 3, (1, 7)), (64, 64, (64, 1))])
def test_split_global_batch_keeps_the_global_batch(per_process, largest, expected):
    micro, steps = split_global_batch(per_process, largest)
    assert (micro, steps) == expected and micro * steps == per_process and micro <= largest


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(UserError, match="gradient_checkpointing"):
        split_global_batch(8, 0)


def test_auto_batch_size_needs_cuda_on_cpu(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=2)
    result = cli_here(["train", *flags(cfg, "--auto_batch_size=True")])
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


CPU_OPTIONS = [("adamw", False), ("adafactor", False)]
if HAS_TORCHAO:
    # 8-bit with bf16 weights (the 7B recipe) saves and loads the same state as with fp32 weights
    CPU_OPTIONS += [("adamw_8bit", True), ("adamw_4bit", False)]


@pytest.fixture(scope="module")
def square_llama_dir(tmp_path_factory, tokenizer_dir):
    """A 2-layer Llama whose weight matrices all have one shape, saved with the tokenizer: torchao compiles its
    optimizer step once per parameter shape, for seconds each on a small CPU (the tiny preset has six shapes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("square_llama") / "model")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@COMPILES  # torchao compiles its optimizer step
@pytest.mark.parametrize("optimizer, bf16_weights", CPU_OPTIONS)
def test_optimizer_trains_saves_and_resumes_exactly(tmp_path, square_llama_dir, qa_files, optimizer, bf16_weights):
    import dataclasses
    import shutil

    from safetensors.torch import load_file

    cfg = tiny_config(tmp_path, "", qa_files, optimizer=optimizer, bf16_weights=bf16_weights, max_steps=8,
                      save_steps=4, validation_file="", learn_rate=2e-3, warmup_steps=0,
                      finetune_from_ckp_file=square_llama_dir)
    run_in_process(cfg)

    def losses():
        return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r}

    la, wa = losses(), load_file(os.path.join(cfg.final_dir(), "model.safetensors"))
    # drop the last checkpoint and the final model: resume from step 4 and redo steps 5..8
    shutil.rmtree(os.path.join(cfg.checkpoint_dir(), "step_00000008"))
    shutil.rmtree(cfg.final_dir())
    run_in_process(dataclasses.replace(cfg, is_keep_training=True))
    assert losses() == la
    assert la[8] < la[1]  # it trains
    wb = load_file(os.path.join(cfg.final_dir(), "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if bf16_weights:
        assert all(v.dtype == torch.bfloat16 for v in wa.values())


def test_compact_optimizer_without_torchao_is_one_line(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=2, optimizer="adamw_8bit")
    result = cli(["train", *flags(cfg)], env=env_without(tmp_path, "torchao"))
    assert result.returncode == 2 and "needs torchao" in result.stderr and "Traceback" not in result.stderr


def test_liger_kernel_on_cpu_is_one_line(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=2, use_liger_kernel=True)
    result = cli_here(["train", *flags(cfg)])
    assert result.returncode == 2 and "liger" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@COMPILES
def test_torch_compile_keeps_the_first_losses(tmp_path, tokenizer_dir, qa_files):
    """Compiled and eager runs agree on the first steps' losses (within bf16 tolerance) on CPU."""
    common = dict(max_steps=3, validation_file="", warmup_steps=0, max_seq_len=32)
    eager = tiny_config(tmp_path / "eager", tokenizer_dir, qa_files, **common)
    compiled = tiny_config(tmp_path / "compiled", tokenizer_dir, qa_files, torch_compile=True, **common)
    run_in_process(eager)
    run_in_process(compiled)
    la = [r["loss"] for r in read_jsonl(os.path.join(eager.logging_dir(), "metrics.jsonl")) if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(os.path.join(compiled.logging_dir(), "metrics.jsonl")) if "loss" in r]
    assert len(la) == len(lb) == 3
    for a, b in zip(la, lb):
        assert b == pytest.approx(a, rel=8e-3)  # bf16 has 8 bits of mantissa


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TORCHAO, reason="needs CUDA and torchao")
def test_gpu_8bit_bf16_tracks_fp32_adamw(tmp_path, tokenizer_dir):
    """The small preset, 300 steps on the same data: 8-bit AdamW with bf16 weights ends near fp32 AdamW."""
    import json as json_module

    from lowmem.data.token_file import tokenize_to_bin

    docs = tmp_path / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for i in range(4000):
            f.write(json_module.dumps({"text": f"What is {i % 50} + {i % 7}? {i % 50 + i % 7}. 重复：猫 狗 山"}) + "\n")
    tokenize_to_bin(str(docs), str(tmp_path / "tokens"), tokenizer_dir, num_workers=1)
    files = {"train_file": str(tmp_path / "tokens.bin"), "validation_file": ""}
    common = dict(model_preset="small", max_seq_len=256, batch_size_per_gpu=16, max_steps=300, epochs=100,
                  learn_rate=6e-4, warmup_steps=30, logging_steps=50, mixed_precision="bf16")
    final = {}
    for name, extra in (("fp32", {}), ("8bit", {"optimizer": "adamw_8bit", "bf16_weights": True})):
        cfg = tiny_config(tmp_path / name, tokenizer_dir, files, **common, **extra)
        run_in_process(cfg)
        final[name] = [r["loss"] for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r][-1]
    assert final["8bit"] == pytest.approx(final["fp32"], rel=0.1), final
