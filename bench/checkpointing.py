"""Speed cost and memory saving of each activation-checkpointing mode, with the memory plan's estimate beside.

For each mode (none, full, selective, full every 2nd block, selective every 2nd block) a fresh process
builds the preset's Llama shape, runs warm-up steps, then times forward+backward steps and measures
the memory that one step adds on top of weights and gradients:
- CUDA: torch.cuda.max_memory_allocated() minus what was allocated before the step (bf16 autocast).
- CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the RSS before
  the step, with glibc told to give every block over 64 KiB its own mapping (MALLOC_MMAP_THRESHOLD_)
  so that freed tensors leave the RSS at once (fp32).

  python bench/checkpointing.py --preset=small --seq=512 --batch=4            # CPU
  python bench/checkpointing.py --preset=large --seq=2048 --batch=8 --steps=10 # one GPU
  python bench/checkpointing.py ... --chunked_cross_entropy   # the same with the loss computed in chunks

Prints a table: ms per step (the fastest of --steps: the least disturbed by other load), its ratio to
no checkpointing, the measured step memory and the memory plan's activation estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODES = {"none": None, "full": ("full", 1), "selective": ("selective", 1), "full/2": ("full", 2),
         "selective/2": ("selective", 2)}
TAG = "CHECKPOINTING_RESULT "


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(preset: str, mode: str, seq: int, batch: int, steps: int, vocab: int, chunked_ce: bool) -> dict:
    """One mode in this process: ms per step and the memory one step adds."""
    import torch
    from transformers import AutoModelForCausalLM

    from config import TrainConfig
    from lowmem.model import chunked_loss, recompute
    from lowmem.model.build import _hf_config
    from lowmem.train.memory_plan import activation_bytes

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    cfg = TrainConfig(model_preset=preset, max_seq_len=seq, batch_size_per_gpu=batch,
                      gradient_checkpointing=MODES[mode] is not None, chunked_cross_entropy=chunked_ce,
                      **({"gradient_checkpointing_mode": MODES[mode][0],
                          "gradient_checkpointing_every": MODES[mode][1]} if MODES[mode] else {}))
    hf_config = _hf_config(cfg, vocab, {"pad": 0, "eos": 1, "bos": None})
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    if MODES[mode] is not None:
        recompute.enable(model, *MODES[mode])
    if chunked_ce:
        chunked_loss.enable(model)
    model.train()
    tokens = torch.randint(0, vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    def step():
        with autocast:
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()

    for _ in range(2):  # warm-up: kernels chosen, gradient buffers allocated
        step()
    times, added = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            before = _rss()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        added.append((torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - before)
    estimate = activation_bytes(hf_config, cfg, "bf16" if cuda else "no", batch * seq)
    return {"mode": mode, "ms_per_step": 1000 * min(times), "step_memory_mib": min(added) / 2**20,
            "estimated_activations_mib": estimate / 2**20, "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--chunked_cross_entropy", action="store_true", help="the loss without whole logits")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(TAG + json.dumps(measure(args.preset, args.worker, args.seq, args.batch, args.steps, args.vocab,
                                       args.chunked_cross_entropy)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    for mode in args.modes.split(","):
        command = [sys.executable, os.path.abspath(__file__), f"--preset={args.preset}", f"--seq={args.seq}",
                   f"--batch={args.batch}", f"--steps={args.steps}", f"--vocab={args.vocab}", f"--worker={mode}"] + (["--chunked_cross_entropy"] if args.chunked_cross_entropy else [])
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith(TAG))[len(TAG):]))
    base = next((r["ms_per_step"] for r in rows if r["mode"] == "none"), rows[0]["ms_per_step"])
    print(f"preset {args.preset}, seq {args.seq}, batch {args.batch}, device {rows[0]['device']}"
          f"{', chunked cross-entropy' if args.chunked_cross_entropy else ''}")
    print("| mode | ms/step | time vs none | step memory MiB | estimated activations MiB |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['ms_per_step']:.0f} | {r['ms_per_step'] / base:.2f}x | {r['step_memory_mib']:.1f} "
              f"| {r['estimated_activations_mib']:.1f} |")


if __name__ == "__main__":
    main()
