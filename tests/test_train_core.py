"""The loop end to end: LR schedule, gradient accumulation, export, flags, multi-process."""
from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import cli_here, read_jsonl, run_in_process, tiny_config


def expected_lr(step, peak, warmup, div_factor, floor_ratio, total):
    """Warmup from peak/div_factor to peak, then cosine to peak*floor_ratio (written independently)."""
    if step < warmup:
        start = peak / div_factor
        return start + (peak - start) * step / warmup
    t = (step - warmup) / (total - warmup)
    return peak * floor_ratio + (peak - peak * floor_ratio) * (1 + math.cos(math.pi * min(t, 1.0))) / 2


def test_lr_schedule_logged_matches_warmup_cosine(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, learn_rate=2e-3, warmup_steps=5, div_factor=10.0,
                      min_lr_ratio=0.2, max_steps=20, epochs=5)
    run_in_process(cfg)
    records = [r for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert r["lr"] == pytest.approx(expected_lr(r["step"] - 1, 2e-3, 5, 10.0, 0.2, 20), rel=1e-6)
    for key in ("epoch", "loss", "grad_norm", "tokens_per_sec"):
        assert all(key in r for r in records)
    assert records[0]["lr"] == pytest.approx(2e-4)  # learn_rate really takes effect


def _final_state(cfg):
    from safetensors.torch import load_file

    return load_file(os.path.join(cfg.final_dir(), "model.safetensors"))


def test_gradient_accumulation_equivalence(tmp_path, tokenizer_dir, qa_files):
    """8 x 1 and 2 x 4 on the same padded, variable-length samples give the same update."""
    # a large eps keeps Adam from turning float noise in near-zero gradients into full-size steps
    common = dict(max_steps=1, warmup_steps=0, learn_rate=1e-2, lr_scheduler="constant", validation_file="", adam_eps=1e-4,
                  max_grad_norm=0.0)
    files = {"train_file": qa_files["train_file"]}
    a = tiny_config(tmp_path / "a", tokenizer_dir, files, batch_size_per_gpu=8, gradient_accumulation_steps=1, **common)
    b = tiny_config(tmp_path / "b", tokenizer_dir, files, batch_size_per_gpu=2, gradient_accumulation_steps=4, **common)
    run_in_process(a)
    run_in_process(b)
    wa, wb = _final_state(a), _final_state(b)
    rec_a = read_jsonl(os.path.join(a.logging_dir(), "metrics.jsonl"))[0]
    rec_b = read_jsonl(os.path.join(b.logging_dir(), "metrics.jsonl"))[0]
    assert rec_a["loss"] == pytest.approx(rec_b["loss"], rel=1e-5)
    # the gradient's scale: a double division by the accumulation steps would show here (Adam hides it)
    assert rec_a["grad_norm"] == pytest.approx(rec_b["grad_norm"], rel=1e-4)
    init = tiny_config(tmp_path / "c", tokenizer_dir, files, **{**common, "max_steps": 1, "learn_rate": 1e-12})
    run_in_process(init)
    w0 = _final_state(init)
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa)
    assert moved > 1e-3  # the step did something
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=5e-5)  # 0.5% of a 1e-2 Adam step


def test_partial_last_accumulation_is_stepped(tmp_path, tokenizer_dir, qa_files):
    # 240 rows / batch 8 = 30 micro-batches; accumulation 4 leaves a window of 2 at the epoch end
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, gradient_accumulation_steps=4, validation_file="")
    summary = run_in_process(cfg)
    assert summary["step"] == 8


def test_export_loads_with_plain_transformers_and_matches(tmp_path, tokenizer_dir, qa_files):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem.model.build import build_model

    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=5, save_steps=5)
    run_in_process(cfg)
    exported = AutoModelForCausalLM.from_pretrained(cfg.final_dir())
    tokenizer = AutoTokenizer.from_pretrained(cfg.final_dir())
    trainer_model = build_model(cfg, tokenizer)  # the trainer's own construction, weights from its checkpoint
    ckpt = os.path.join(cfg.checkpoint_dir(), "step_00000005", "model", "model.safetensors")
    trainer_model.load_state_dict(load_file(ckpt), strict=False)
    ids = tokenizer("What is 3 + 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trainer_model.eval()(ids).logits)
    out = exported.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json"):
        assert os.path.isfile(os.path.join(cfg.final_dir(), name))


@pytest.mark.parametrize("args, needle", [
    (["--batch_sise=3"], "--batch_size_per_gpu"),
    (["--learn_rat", "1e-5"], "--learn_rate"),
    (["--batch_size_per_gpu=abc"], "batch_size_per_gpu expects int"),
    (["--use_large_config=True", "--use_small_config=True"], "contradict"),
    (["--config=nonexistent_preset"], "neither a preset"),
    (["--batch_size_per_gpu=0"], "must be at least 1"),
    (["--model_preset=huge"], "model_preset 'huge' does not exist"),
])
def test_bad_flags_exit_nonzero_with_one_line(tmp_path, args, needle):
    result = cli_here(["train", f"--output_dir={tmp_path}/ms", f"--log_dir={tmp_path}/logs", *args], cwd=str(tmp_path))
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1


def test_missing_inputs_are_named_together_in_one_line(tmp_path):
    result = cli_here(["train", f"--train_file={tmp_path}/missing.parquet", f"--tokenizer_dir={tmp_path}/no_tokenizer",
                  f"--validation_file={tmp_path}/valid-*.parquet", f"--output_dir={tmp_path}/ms",
                  f"--log_dir={tmp_path}/logs"], cwd=str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 4 input(s) missing")
    for needle in ("missing.parquet' does not exist", "valid-*.parquet' matches no file", "no_tokenizer' does not exist",
                   "--test_file: 'data/demo/test.parquet' does not exist"):  # the demo's, which only the demo makes
        assert needle in errors[0]
    assert not os.path.exists(tmp_path / "ms")


def test_space_separated_flags_and_show_config(tmp_path):
    result = cli_here(["show_config", "--batch_size_per_gpu", "24", "--learn_rate", "2", "--run_name", "007"])
    assert result.returncode == 0, result.stderr
    import json

    values = json.loads(result.stdout)
    assert values["batch_size_per_gpu"] == 24 and values["learn_rate"] == 2.0 and values["run_name"] == "007"
    large = json.loads(cli_here(["show_config", "--use_large_config=True"]).stdout)
    assert large["run_name"] == "pretrain_large" and large["model_preset"] == "small"
    small = json.loads(cli_here(["show_config", "--is_finetune=True", "--use_small_config=True"]).stdout)
    assert small["run_name"] == "sft_small" and small["is_finetune"] is True
    help_text = cli_here(["train", "--help"]).stdout
    assert "--batch_size_per_gpu" in help_text and "default: 32" in help_text


def test_t5_trains_and_exports_for_seq2seq(tmp_path, tokenizer_dir, qa_files):
    from transformers import AutoModelForSeq2SeqLM

    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, model_type="t5", max_steps=4, validation_file="")
    summary = run_in_process(cfg)
    assert summary["step"] == 4
    model = AutoModelForSeq2SeqLM.from_pretrained(cfg.final_dir())
    assert model.config.is_encoder_decoder
    losses = [r["loss"] for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(l) for l in losses)


def _bad_inputs(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), str(tmp_path / "cols.parquet"))
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "badtok").mkdir()
    (tmp_path / "badtok" / "tokenizer.json").write_text("{not json")
    good = str(tmp_path / "cols.parquet")
    return [([f"--train_file={good}", f"--tokenizer_dir={tokenizer_dir}"], "name the columns with --prompt_column"),
            ([f"--train_file={tmp_path}/empty.parquet", f"--tokenizer_dir={tokenizer_dir}"], "is empty"),
            ([f"--tokenizer_dir={tmp_path}/badtok"], "could not be read")]


def test_bad_training_inputs_are_one_line_errors(tmp_path, tokenizer_dir):
    for args, needle in _bad_inputs(tmp_path, tokenizer_dir):
        result = cli_here(["train", *args, "--validation_file=", "--test_file=", f"--output_dir={tmp_path}/ms",
                      f"--log_dir={tmp_path}/logs"], cwd=str(tmp_path))
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not os.path.exists(tmp_path / "ms")  # nothing written
