"""Checkpoint size and save time: LoRA (adapters and their optimizer state only) against full fine-tuning.

    python bench/adapter_checkpoint.py                     # small preset (~0.1B with a 32k vocabulary), CPU
    python bench/adapter_checkpoint.py --preset tiny --repeats 3

The same model is set up twice through the trainer's own pieces (build_model, apply_training_options,
build_optimizer, CheckpointManager): all weights trained, and LoRA r=--lora_r on every linear layer of the
blocks. After one optimizer step (so Adam's moments exist) `CheckpointManager.save` writes --repeats
checkpoints; the table gives the bytes of one and the median seconds of a save (fsync and hashes included).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import REPO, fmt, make_tokenizer, print_table  # noqa: E402

sys.path.insert(0, REPO)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/lowmem_bench")
    return ap.parse_args(argv)


def _trained_once(cfg, tokenizer):
    """(accelerator, model, optimizer, scheduler) after one optimizer step on random tokens."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lowmem.model.build import apply_training_options, build_model
    from lowmem.train.optim import build_optimizer, build_scheduler

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(cfg.seed)
    model = apply_training_options(build_model(cfg, tokenizer), cfg, log=lambda _: None)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, len(tokenizer), (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    return accelerator, model, optimizer, scheduler


class _StepOnly:
    """A train state that holds the step alone (the bench times the weights and optimizer state)."""

    step = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "config": {}}


def measure(cfg, tokenizer, repeats: int, root: str) -> dict:
    from lowmem.checkpoint import CheckpointManager, RunParts, weights_format
    from lowmem.checkpoint.files import checkpoint_bytes
    from lowmem.model.sizes import count_parameters

    accelerator, model, optimizer, scheduler = _trained_once(cfg, tokenizer)
    state = _StepOnly()
    parts = RunParts(model, optimizer, scheduler, tokenizer, state)
    manager = CheckpointManager(accelerator, root, repeats, parts, weights_format(cfg.lora_r > 0))
    seconds, path = [], ""
    for step in range(1, repeats + 1):
        state.step = step
        start = time.perf_counter()
        path = manager.save(step)
        seconds.append(time.perf_counter() - start)
    unwrapped = accelerator.unwrap_model(model)
    return {"parameters": count_parameters(unwrapped), "trained": count_parameters(unwrapped, trained_only=True),
            "bytes": checkpoint_bytes(path), "save_s": statistics.median(seconds), "all_s": seconds}


def main(argv=None) -> int:
    args = parse_args(argv)
    from config import TrainConfig
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(make_tokenizer(os.path.join(args.workdir, f"tokenizer{args.vocab}"), args.vocab))
    base = TrainConfig(model_preset=args.preset, max_seq_len=64, mixed_precision="no", report_to="none")
    rows, results = [], {}
    lora_cfg = dataclasses.replace(base, lora_r=args.lora_r)
    for name, cfg in (("full fine-tuning", base), (f"LoRA r={args.lora_r}", lora_cfg)):
        with tempfile.TemporaryDirectory(prefix="ckpt_", dir=args.workdir) as root:
            results[name] = r = measure(cfg, tokenizer, args.repeats, root)
        rows.append([name, fmt(r["parameters"] / 1e6, ".2f"), fmt(r["trained"] / 1e6, ".2f"),
                     fmt(r["bytes"] / 2**20, ".1f"), fmt(r["save_s"], ".2f"), " ".join(f"{s:.2f}" for s in r["all_s"])])
    full, lora = results["full fine-tuning"], results[f"LoRA r={args.lora_r}"]
    print(f"\npreset {args.preset}, vocabulary {len(tokenizer)}, fp32, CPU ({os.cpu_count()} cores), "
          f"{args.repeats} saves each:")
    print_table(rows, ["run", "parameters (M)", "trained (M)", "checkpoint MiB", "save s (median)", "each save s"])
    print(f"LoRA checkpoint: {lora['bytes'] / full['bytes']:.1%} of the full one's bytes, "
          f"{lora['save_s'] / full['save_s']:.1%} of its save time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
