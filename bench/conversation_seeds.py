"""How reliably tests/test_conversations.py's task is learnt: the held-out answers right after N steps, per seed.

    python bench/conversation_seeds.py                                   # 5 seeds x 60/100/150 steps, ~4 min on 1 core
    python bench/conversation_seeds.py --seeds=0,1 --steps=100          # a quick check

The task, data and settings are the test's (a key word in the first turn, its answer asked for in the
second; held-out first turns never trained on; tiny preset, packing, lr 2e-3, batch 16); only the seed
(model init and data order) and the step count vary. Answers are greedy, through the same chat template
as `train_low_mem.py chat`, in this process. The test asserts >= 20 of 30 after 100 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the test suite runs
BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from conftest import run_in_process, tiny_config  # noqa: E402
from test_conversations import FILLER, KEYS, conversation  # noqa: E402


def word_tokenizer(path: str) -> str:
    from lowmem.data.tokenizer import train_bpe_tokenizer

    words = list(KEYS) + FILLER + ["user", "assistant", "ok", "what"]  # as the test's fixture
    train_bpe_tokenizer([" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(600)],
                        400, path)
    return path


def right_after(root: Path, tokenizer: str, seed: int, steps: int, lr: float) -> int:
    from lowmem.infer.generate import GenerationOptions, generate_text, load_for_inference

    rng = random.Random(seed)
    held_out = [conversation(rng) for _ in range(30)]
    unseen = {c[0]["content"] for c in held_out}
    root.mkdir(parents=True, exist_ok=True)
    data = root / "chats.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        written = 0
        while written < 2000:
            c = conversation(rng)
            if c[0]["content"] not in unseen:
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
                written += 1
    cfg = tiny_config(root, tokenizer, {"train_file": str(data), "validation_file": ""}, max_steps=steps,
                      warmup_steps=10, batch_size_per_gpu=16, learn_rate=lr, max_seq_len=64, packing=True,
                      logging_steps=50, seed=seed)
    run_in_process(cfg)
    model, tok = load_for_inference(cfg.final_dir(), device="cpu")
    options = GenerationOptions(greedy=True, max_new_tokens=6)
    return sum(generate_text(model, tok, c[2]["content"], options, history=[(c[0]["content"], c[1]["content"])]).strip()
               == c[3]["content"] for c in held_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", default="60,100,150")
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    seeds, step_counts = [int(s) for s in args.seeds.split(",")], [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = word_tokenizer(os.path.join(tmp, "tokenizer"))
        rows = [f"| seed | {' | '.join(f'{n} steps' for n in step_counts)} |",
                f"| --- | {' | '.join('---' for _ in step_counts)} |"]
        for seed in seeds:
            cells = [f"{right_after(Path(tmp) / f's{seed}_{n}', tokenizer, seed, n, args.lr)}/30" for n in step_counts]
            rows.append(f"| {seed} | {' | '.join(cells)} |")
    print("\n".join(rows))  # after the trainer's own lines


if __name__ == "__main__":
    main()
