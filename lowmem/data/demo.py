"""The bundled default: a synthetic question/answer task generated deterministically on first run.

Questions in English and Chinese about small numbers and short word lists (add, compare, count on,
repeat, reverse). Held-out questions never appear in training, so answering them takes learning the
rules; an untrained model answers none. About 280 KB of parquet, plus a tokenizer trained on it.
"""
from __future__ import annotations

import os
import random
import shutil

from .tokenizer import train_bpe_tokenizer

DEMO_DIR = os.path.join("data", "demo")
DEMO_FILES = {name: os.path.join(DEMO_DIR, f"{name}.parquet") for name in ("train", "valid", "test")}
DEMO_TOKENIZER = os.path.join("model_save", "demo_tokenizer")
DEMO_VOCAB_SIZE = 600
WORDS = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "star", "book",
         "猫", "狗", "山", "水", "花", "鸟", "月", "星", "书", "雨"]


def _question(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    a, b = rng.randrange(50), rng.randrange(50)
    chinese = rng.random() < 0.5
    if kind == 0:
        return (f"{a}加{b}等于多少？" if chinese else f"What is {a} + {b}?"), str(a + b)
    if kind == 1:
        while b == a:
            b = rng.randrange(50)
        return (f"{a}和{b}哪个大？" if chinese else f"Which is larger, {a} or {b}?"), str(max(a, b))
    if kind == 2:
        n = rng.randrange(200)
        return (f"{n}的下一个数是几？" if chinese else f"What number comes after {n}?"), str(n + 1)
    words = rng.sample(WORDS, rng.randint(3, 5))
    listed = " ".join(words)
    if kind == 3:
        return (f"重复：{listed}" if chinese else f"Repeat: {listed}"), listed
    if kind == 4:
        return (f"倒序：{listed}" if chinese else f"Reverse: {listed}"), " ".join(reversed(words))
    return (f"有几个词：{listed}" if chinese else f"How many words: {listed}"), str(len(words))


def generate_rows(n_train: int = 16000, n_valid: int = 400, n_test: int = 300, seed: int = 1234):
    """Train/valid/test rows; valid and test prompts never occur in train."""
    rng = random.Random(seed)
    held_out: dict[str, str] = {}
    while len(held_out) < n_valid + n_test:
        prompt, answer = _question(rng)
        held_out.setdefault(prompt, answer)
    train = []
    while len(train) < n_train:
        prompt, answer = _question(rng)
        if prompt not in held_out:
            train.append((prompt, answer))
    held = list(held_out.items())
    return {"train": train, "valid": held[:n_valid], "test": held[n_valid:]}


def write_demo_data(directory: str = DEMO_DIR) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    splits = generate_rows()
    for split in ("valid", "test", "train"):  # train last: its presence tells other processes the rest is there
        rows = splits[split]
        table = pa.table({"prompt": [p for p, _ in rows], "response": [r for _, r in rows]})
        tmp = os.path.join(directory, f".{split}.parquet.tmp{os.getpid()}")
        pq.write_table(table, tmp, row_group_size=2000)
        os.replace(tmp, os.path.join(directory, f"{split}.parquet"))


def ensure_demo_assets(train_file: str, tokenizer_dir: str) -> list[str]:
    """Create the demo data and tokenizer when the config points at them and they are missing.

    Every file appears whole or not at all (written aside, then renamed), so the processes of a launch may all
    call this at once: the content is the same whoever writes it.
    """
    made = []
    if os.path.normpath(train_file) == os.path.normpath(DEMO_FILES["train"]) and not os.path.isfile(train_file):
        write_demo_data(os.path.dirname(train_file))
        made.append(f"demo data in {os.path.dirname(train_file)}")
    if os.path.normpath(tokenizer_dir) == os.path.normpath(DEMO_TOKENIZER) and not os.path.isdir(tokenizer_dir):
        rows = generate_rows()["train"]
        aside = f"{tokenizer_dir}.tmp{os.getpid()}"
        train_bpe_tokenizer((f"{p}\n{r}" for p, r in rows), DEMO_VOCAB_SIZE, aside)
        try:
            os.rename(aside, tokenizer_dir)
            made.append(f"demo tokenizer in {tokenizer_dir}")
        except OSError:  # another process of the launch was first
            shutil.rmtree(aside, ignore_errors=True)
    return made
