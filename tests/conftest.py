"""Shared fixtures: a locally trained tokenizer, generated parquet data, and ways to run the trainer."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from lowmem.demo import generate_rows
    from lowmem.tokenizer import train_bpe_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    rows = generate_rows(n_train=3000, n_valid=10, n_test=10)["train"]
    train_bpe_tokenizer((f"{p}\n{r}" for p, r in rows), 600, path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 400-token BPE trained on a few words (English and Chinese)."""
    from lowmem.tokenizer import train_bpe_tokenizer

    words = ["cat", "dog", "sun", "moon", "tree", "猫", "狗", "山", "水", "花", "river", "stone"]
    path = str(tmp_path_factory.mktemp("words_tok") / "tokenizer")
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(600)]
    train_bpe_tokenizer(texts, 400, path)
    return path


def write_qa_parquet(path, n_rows: int, seed: int = 0, row_group_size: int = 50):
    """Prompt/response rows of varied length; every row is distinct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "moon", "tree", "猫", "狗", "山", "水", "花"]
    prompts, responses = [], []
    for i in range(n_rows):
        prompts.append(f"row {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
        responses.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
    pq.write_table(pa.table({"prompt": prompts, "response": responses}), str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def qa_files(tmp_path):
    return {"train_file": write_qa_parquet(tmp_path / "train.parquet", 240, seed=1),
            "validation_file": write_qa_parquet(tmp_path / "valid.parquet", 40, seed=2)}


def tiny_config(tmp_path, tokenizer_dir, files, **overrides):
    from config import TrainConfig

    values = dict(run_name="t", output_dir=str(tmp_path / "model_save"), log_dir=str(tmp_path / "logs"),
                  tokenizer_dir=tokenizer_dir, test_file="", model_preset="tiny", max_seq_len=64,
                  batch_size_per_gpu=8, epochs=1, learn_rate=1e-3, warmup_steps=2, logging_steps=1, eval_steps=1000,
                  save_steps=1000, report_to="none", prefetch_batches=2, **files)
    values.update(overrides)
    return TrainConfig(**values)


def run_in_process(cfg):
    """Run the real loop in this process, resetting Accelerate's process-wide state around it."""
    from accelerate.state import AcceleratorState, GradientState

    from lowmem.loop import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def cli(args, cwd=None, timeout=600, env=None, launcher=None):
    """Run train_low_mem.py as a user would; returns the CompletedProcess."""
    command = (launcher or [sys.executable]) + [os.path.join(REPO, "train_low_mem.py")] + list(args)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def env_without(folder, *packages: str) -> dict:
    """Environment for a subprocess in which `packages` cannot be imported, installed or not."""
    hide = os.path.join(str(folder), "hide_" + "_".join(packages))
    os.makedirs(hide, exist_ok=True)
    with open(os.path.join(hide, "sitecustomize.py"), "w", encoding="utf-8") as f:
        f.write("import sys\n" + "".join(f"sys.modules[{p!r}] = None  # import fails, find_spec: None\n"
                                         for p in packages))
    return {"PYTHONPATH": os.pathsep.join(p for p in (hide, os.environ.get("PYTHONPATH", "")) if p)}


def flags(cfg) -> list[str]:
    import dataclasses

    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, list)]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
