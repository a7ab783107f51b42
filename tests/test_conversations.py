"""Multi-turn conversations end to end: a model trained on them answers the second turn of an unseen
conversation, which it can only do by reading the first turn, through `chat` as a user would."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch
from conftest import REPO, run_in_process, tiny_config

ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
           "frog": "ribbit", "bee": "buzz", "lion": "roar", "mouse": "squeak"}
GREETINGS = ["Hi", "Hello", "Hey", "Good day", "Welcome", "Greetings"]
UNSEEN_GREETINGS = ["Howdy", "Yo"]  # held-out conversations differ from every training one


def conversation(rng: random.Random, greeting: str) -> list[dict]:
    animal = rng.choice(list(ANIMALS))
    return [{"role": "user", "content": f"{greeting}! Today you are a {animal}."},
            {"role": "assistant", "content": "OK."},
            {"role": "user", "content": "What do you say?"},
            {"role": "assistant", "content": ANIMALS[animal]}]


def chat_answers(model_dir: str, conversations: list[list[dict]]) -> list[str]:
    """The second answer of each conversation, asked turn by turn through `train_low_mem.py chat` over a pipe."""
    lines = [line for c in conversations for line in (c[0]["content"], c[2]["content"], "clear")]
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_low_mem.py"), "chat", model_dir, "--greedy=True",
                             "--max_new_tokens=8"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                            timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()[1::2]


def test_a_model_trained_on_conversations_answers_from_the_earlier_turn(tmp_path, tokenizer_dir):
    rng = random.Random(0)
    data = tmp_path / "chats.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for _ in range(2000):
            f.write(json.dumps({"messages": conversation(rng, rng.choice(GREETINGS))}) + "\n")
    held_out = [conversation(rng, rng.choice(UNSEEN_GREETINGS)) for _ in range(30)]
    cfg = tiny_config(tmp_path, tokenizer_dir, {"train_file": str(data), "validation_file": ""}, max_steps=250,
                      warmup_steps=10, batch_size_per_gpu=16, learn_rate=5e-3, max_seq_len=96, packing=True,
                      logging_steps=50)
    summary = run_in_process(cfg)
    assert summary["step"] == 250
    untrained_dir = str(tmp_path / "untrained")
    from transformers import AutoTokenizer

    from lowmem.model import build_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(cfg.final_dir())
    build_model(cfg, tokenizer).save_pretrained(untrained_dir)
    tokenizer.save_pretrained(untrained_dir)
    expected = [c[3]["content"] for c in held_out]
    trained = chat_answers(cfg.final_dir(), held_out)
    untrained = chat_answers(untrained_dir, held_out)
    right = sum(a.strip() == e for a, e in zip(trained, expected))
    assert right >= 10, list(zip(trained, expected))  # by chance (one sound for all): 3 of 30
    assert right > sum(a.strip() == e for a, e in zip(untrained, expected))
