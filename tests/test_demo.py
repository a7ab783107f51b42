"""The bundled default: generated data and tokenizer, training that visibly learns the held-out task."""
from __future__ import annotations

import json
import os

import pytest
from conftest import cli, read_jsonl


@pytest.mark.slow
def test_default_run_learns_held_out_questions(tmp_path):
    # the README's command, shortened to 300 steps (0.19 answered right there) and 100 test questions, run in an
    # empty directory like a fresh checkout
    result = cli(["train", "--max_steps=300", "--report_to=tensorboard", "--test_generation_samples=100"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "data" / "demo" / "train.parquet")
    assert os.path.isfile(tmp_path / "model_save" / "demo_tokenizer" / "tokenizer.json")
    final = tmp_path / "model_save" / "demo" / "final"
    summary = json.loads(result.stdout.split("done: ", 1)[1].split(" | ", 1)[0])
    # what the newcomer sees: one training bar with the last eval loss, a bar while answering, no noise
    terminal = result.stdout + result.stderr
    for noise in ("Traceback", "[WARNING]", "Setting accelerator", "_pytree", "register_constant", "Failed to load",
                  "Detected no triton", "Writing model shards", "UserWarning", "FutureWarning"):  # import notices too
        assert noise not in terminal, noise
    bars = {line.split(":", 1)[0].strip() for line in result.stderr.replace("\r", "\n").splitlines() if "%|" in line}
    assert bars == {"train", "answering the test questions"}, bars
    assert "eval=" in result.stderr and "eval_loss" in result.stdout
    assert "300 optimizer steps (--max_steps; ~500 per epoch, so ~0.6 epochs" in result.stdout

    import torch

    from config import TrainConfig
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.infer.evaluate import evaluate_loss, generation_metrics
    from lowmem.infer.generate import GenerationOptions
    from lowmem.model.build import build_model

    tokenizer = load_tokenizer(str(final))
    torch.manual_seed(42)
    untrained = build_model(TrainConfig(), tokenizer).eval()
    base_loss = evaluate_loss(untrained, tokenizer, str(tmp_path / "data/demo/valid.parquet"), 128)["loss"]
    base_accuracy = generation_metrics(untrained, tokenizer, str(tmp_path / "data/demo/test.parquet"),
                                       GenerationOptions(max_new_tokens=16, greedy=True), batch_size=32,
                                       max_examples=32)["exact_match"]
    assert base_accuracy == 0.0
    assert summary["eval_loss"] < 0.35 * base_loss, (summary["eval_loss"], base_loss)
    assert summary["test_exact_match"] >= 0.1, summary  # held-out questions, never seen in training
    records = read_jsonl(tmp_path / "logs" / "demo" / "metrics.jsonl")
    assert any("test_exact_match" in r for r in records)
    events = [n for n in os.listdir(tmp_path / "logs" / "demo") if n.startswith("events.out.tfevents")]
    assert events  # TensorBoard got the same scalars
