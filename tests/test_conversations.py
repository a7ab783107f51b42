"""Multi-turn conversations end to end: a model trained on them answers the second turn of an unseen
conversation, which it can only do by reading the first turn, through `chat` as a user would."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from conftest import REPO, run_in_process, tiny_config

KEYS = {"cat": "狗", "dog": "山", "sun": "水", "moon": "花", "tree": "river", "猫": "stone"}  # first turn -> answer
FILLER = list(KEYS.values())  # filler words are answers too, so only the key decides


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A BPE where every word and role name is one token, so a conversation is about 25 tokens."""
    from lowmem.data.tokenizer import train_bpe_tokenizer

    words = list(KEYS) + FILLER + ["user", "assistant", "ok", "what"]
    path = str(tmp_path_factory.mktemp("conv_tok") / "tokenizer")
    train_bpe_tokenizer([" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(600)],
                        400, path)
    return path


def conversation(rng: random.Random) -> list[dict]:
    key = rng.choice(list(KEYS))
    filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3)))
    return [{"role": "user", "content": f"{filler} {key}"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "what"}, {"role": "assistant", "content": KEYS[key]}]


def chat_answers(model_dir: str, conversations: list[list[dict]]) -> tuple[list[str], list[str]]:
    """Through `train_low_mem.py chat` over a pipe: the second answer of each conversation asked turn by turn, and the
    answer to its second question asked alone (after `clear`, without the first turn)."""
    lines = [line for c in conversations for line in (c[0]["content"], c[2]["content"], "clear", c[2]["content"],
                                                       "clear")]
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_low_mem.py"), "chat", model_dir, "--greedy=True",
                             "--max_new_tokens=6"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                            timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = result.stdout.splitlines()
    assert len(answers) == 3 * len(conversations), answers  # one line per answer
    return answers[1::3], answers[2::3]


@pytest.mark.slow
def test_a_model_trained_on_conversations_answers_from_the_earlier_turn(tmp_path, word_tokenizer):
    rng = random.Random(0)
    held_out = [conversation(rng) for _ in range(30)]
    unseen = {c[0]["content"] for c in held_out}
    data = tmp_path / "chats.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        written = 0
        while written < 2000:
            c = conversation(rng)
            if c[0]["content"] not in unseen:  # no held-out first turn is ever trained on
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
                written += 1
    cfg = tiny_config(tmp_path, word_tokenizer, {"train_file": str(data), "validation_file": ""}, max_steps=100,
                      warmup_steps=10, batch_size_per_gpu=16, learn_rate=2e-3, max_seq_len=64, packing=True,
                      logging_steps=50)
    summary = run_in_process(cfg)
    assert summary["step"] == 100
    expected = [c[3]["content"] for c in held_out]
    in_context, alone = chat_answers(cfg.final_dir(), held_out)
    right = sum(a.strip() == e for a, e in zip(in_context, expected))
    assert right >= 20, list(zip(in_context, expected))  # one answer for all would get about 5 of 30
    assert sum(a.strip() == e for a, e in zip(alone, expected)) <= right - 10  # the first turn is what decides
