"""The loop's bookkeeping cost on CPU: time per optimizer step of the trainer vs a bare PyTorch loop.

Both train the same tiny Llama on the same fixed-length token windows with AdamW, clipping and a
LambdaLR schedule, one thread each; the trainer's steps are timed from its own metrics.jsonl
(tokens/s over logging intervals, the first interval excluded as warm-up).

    python bench/cpu_overhead.py [--steps 200] [--batch 16] [--seq 128]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_tokens(prefix: str, n_tokens: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, n_tokens, dtype=np.uint16).tofile(prefix + ".bin")
    with open(prefix + ".json", "w") as f:
        json.dump({"format_version": 1, "dtype": "uint16", "n_tokens": n_tokens, "n_documents": 1, "vocab_size": vocab,
                   "eos_token_id": 1, "tokenizer_dir": "", "source": "random", "complete": True}, f)


def bare_loop(model, windows: np.ndarray, batch: int, steps: int, warmup: int) -> float:
    """Seconds per step after warm-up: forward, backward, clip, AdamW, schedule; nothing else."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model.train()
    start = None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        ids = torch.from_numpy(windows[(step * batch) % (len(windows) - batch):][:batch].astype(np.int64))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState

    from config import TrainConfig
    from lowmem.data.demo import DEMO_VOCAB_SIZE, generate_rows
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.model.build import build_model
    from lowmem.train.loop import train

    work = tempfile.mkdtemp(prefix="lowmem_overhead_")
    tok_dir = os.path.join(work, "tok")
    from lowmem.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer((f"{p} {r}" for p, r in generate_rows(2000, 1, 1)["train"]), DEMO_VOCAB_SIZE, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    prefix = os.path.join(work, "tokens")
    write_tokens(prefix, args.seq * args.batch * (args.steps + 8), len(tokenizer))
    log_every = 20
    cfg = TrainConfig(run_name="overhead", output_dir=work, log_dir=work, train_file=prefix + ".bin",
                      validation_file="", test_file="", tokenizer_dir=tok_dir, max_seq_len=args.seq,
                      batch_size_per_gpu=args.batch, max_steps=args.steps, epochs=10, logging_steps=log_every,
                      eval_steps=10**9, save_steps=10**9, report_to="none", learn_rate=1e-3, warmup_steps=0,
                      overwrite_output_dir=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(cfg)
    with open(os.path.join(work, "overhead", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"loss"' in line]
    tokens_per_step = args.batch * args.seq
    trainer = float(np.mean([tokens_per_step / r["tokens_per_sec"] for r in records[1:]]))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    windows = np.fromfile(prefix + ".bin", dtype=np.uint16).reshape(-1, args.seq)
    bare = bare_loop(model, windows, args.batch, args.steps, warmup=log_every)
    print(f"| loop | s/step | vs bare |\n| --- | --- | --- |\n| bare PyTorch | {bare:.4f} | 1.000 |\n"
          f"| lowmem | {trainer:.4f} | {trainer / bare:.3f} |")


if __name__ == "__main__":
    main()
