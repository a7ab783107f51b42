"""Long sequences on one device: peak host memory and seconds per step of LoRA SFT at 2k-16k tokens, for each of this
trainer's options and for TRL's SFTTrainer, the memory plan's prediction beside each row, and the longest length
that trains under a hard memory cap.

    python bench/long_context.py [--lengths 2048,8192,16384] [--runs lowmem,lowmem_tiled,trl] [--layers 30]
                                 [--cap_gib 6 --cap_lengths lowmem:8192,12288,16384;trl:4096,6144,8192]

The model is SmolLM2-135M-shaped (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocabulary 49152, tied embeddings,
--layers layers), random weights saved once; every run starts from that directory in a fresh process. Each step is
one sequence of the full length (a prompt of 16 words and a response that fills the rest, one token a word), LoRA
r=16 on every linear layer, activation checkpointing, micro-batch 1. A row trains --warmup + 1 steps; its step
time is the last step's, its peak the process's ru_maxrss at the end of its last step (metrics.jsonl's
host_peak_rss_gb; for TRL, read in its step-end callback): training's peak, not the export's after it. Runs:
  lowmem          train_low_mem.py train ... --lora_r=16 --gradient_checkpointing=True --packing=True
                  --mixed_precision=bf16 (TRL's default precision; the chunked loss and sdpa_varlen come by default)
  lowmem_fp32     the same in fp32 (this trainer's default on a CPU)
  lowmem_tiled    lowmem + --tiled_mlp=True
  lowmem_offload  lowmem + --gradient_checkpointing_offload=True (a no-op without a GPU: skipped there)
  trl             TRL's SFTTrainer with its defaults (bf16, gradient checkpointing, its chunked loss) and the same
                  LoRA (`pip install trl` for this bench only; never a dependency)
  lowmem_sp1      lowmem in fp32 on a variant with 8 attention heads of 72 (2 key/value heads; SmolLM2's 9 heads do not
                  split in two) and --sp_layers layers (8: two CPU processes at 16k take long), one process
  lowmem_sp2      the same on 2 processes splitting each sequence (--sequence_parallel_size=2, DeepSpeed ZeRO-2 over
                  gloo): the peak is one process's (rank 0's), the step time the group's
The cap: each probe runs in a memory cgroup limited to --cap_gib (cgroup v1 or v2, needs root); the longest length
of --cap_lengths whose one step completes is reported per run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import REPO, fmt  # noqa: E402

VOCAB = 49152
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
             tie_word_embeddings=True, rope_theta=100000.0)
RUNS = {"lowmem": ["--mixed_precision=bf16"], "lowmem_fp32": ["--mixed_precision=no"],
        "lowmem_tiled": ["--mixed_precision=bf16", "--tiled_mlp=True"],
        "lowmem_offload": ["--mixed_precision=bf16", "--gradient_checkpointing_offload=True"],
        "lowmem_sp1": ["--mixed_precision=no"], "lowmem_sp2": ["--mixed_precision=no", "--sequence_parallel_size=2"]}
SPLIT_SHAPE = dict(SHAPE, num_attention_heads=8, num_key_value_heads=2, head_dim=72)


def make_model(folder: str, tokenizer_dir: str, layers: int, max_len: int, shape: dict = SHAPE) -> str:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=max(max_len, 8192),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_data(folder: str, length: int, n: int) -> str:
    """n samples of `length` tokens in all: a 16-word prompt and a response filling the rest (template room left)."""
    path = os.path.join(folder, f"long_{length}.jsonl")
    if not os.path.isfile(path):
        rng = random.Random(length)
        words = lambda k: " ".join(f"t{rng.randrange(10, VOCAB)}" for _ in range(k))  # noqa: E731
        with open(path, "w") as f:
            f.writelines(json.dumps({"prompt": words(16), "response": words(length - 16 - 32)}) + "\n"
                         for _ in range(n))
    return path


def _cgroup_wrap(command: list[str], cap_gib: float, name: str) -> tuple[list[str], str | None]:
    """The command run inside a fresh memory cgroup of cap_gib (v1 or v2); (command, its directory) or (command, None)."""
    limit = int(cap_gib * 2**30)
    for root, limit_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        group = os.path.join(root, f"lowmem_bench_{name}")
        try:
            os.makedirs(group, exist_ok=True)
            with open(os.path.join(group, limit_file), "w") as f:
                f.write(str(limit))
        except OSError:
            continue
        script = f'echo $$ > {group}/cgroup.procs && exec "$@"'
        return ["sh", "-c", script, "sh", *command], group
    return command, None


def _run(command: list[str], cap_gib: float | None, name: str) -> tuple[int, str, float]:
    """(exit status, output, peak RSS GiB) of one process, inside the cap when one is given."""
    group = None
    if cap_gib:
        command, group = _cgroup_wrap(command, cap_gib, name)
        if group is None:
            raise SystemExit("--cap_gib needs a writable memory cgroup (cgroup v1 or v2, as root)")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if group:
        try:
            os.rmdir(group)
        except OSError:
            pass
    return status, output, usage.ru_maxrss / 2**20


def run_lowmem(name: str, args, model: str, length: int, data: str, cap_gib: float | None = None) -> dict:
    out = os.path.join(args.work, f"{name}_{length}")
    flags = [f"--run_name={name}_{length}", f"--output_dir={out}", f"--log_dir={out}/logs",
             f"--finetune_from_ckp_file={model}", "--tokenizer_dir=", f"--train_file={data}", "--validation_file=",
             "--test_file=", f"--max_seq_len={length}", "--batch_size_per_gpu=1", "--gradient_accumulation_steps=1",
             f"--max_steps={args.warmup + 1}", "--logging_steps=1", "--save_steps=100000", "--report_to=none",
             "--warmup_steps=0", "--learn_rate=1e-4", "--lora_r=16", "--gradient_checkpointing=True",
             "--packing=True", "--overwrite_output_dir=True", *RUNS[name]]
    launcher = [sys.executable]
    if name == "lowmem_sp2":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    os.path.join(REPO, "accelerate_configs", "deepspeed_zero2.yaml"), "--num_processes", "2"]
    started = time.time()
    status, output, peak = _run([*launcher, os.path.join(REPO, "train_low_mem.py"), "train", *flags], cap_gib, name)
    row = {"run": name, "length": length, "peak_rss_gib": peak, "wall_s": time.time() - started,
           "flags": " ".join(RUNS[name])}
    plan = re.search(r"= ~([0-9.]+) GiB per process", output)
    longest = re.search(r"longest --max_seq_len that fits[^:]*: (\d+)", output)
    row.update(plan_gib=float(plan.group(1)) if plan else None, plan_longest=int(longest.group(1)) if longest else None)
    if status:
        row["error"] = "killed (over the cap)" if status in (9, 137) or os.WIFSIGNALED(status) else \
            (output.strip().splitlines() or ["?"])[-1][:300]
        return row
    with open(os.path.join(out, "logs", f"{name}_{length}", "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    row["step_s"] = steps[-1]["time"] - steps[-2]["time"] if len(steps) >= 2 else None
    row["loss"] = steps[-1]["loss"]
    row["peak_rss_gib"] = steps[-1]["host_peak_rss_gb"]  # training's peak, not the export's after it
    return row


TRL_CODE = """
import json, resource, sys, time
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
model, data, length, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = [json.loads(line) for line in open(data)]
dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in rows])
times = []
class Clock(TrainerCallback):
    def on_step_end(self, a, s, c, **k):
        times.append(time.time())
        print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, flush=True)
config = SFTConfig(output_dir=out, per_device_train_batch_size=1, max_steps=steps, max_length=length,
                   learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model),
                     peft_config=lora, callbacks=[Clock()])
trainer.train()
print("TIMES", json.dumps(times))
"""


def run_trl(args, model: str, length: int, data: str, cap_gib: float | None = None) -> dict:
    started = time.time()
    status, output, peak = _run([sys.executable, "-c", TRL_CODE, model, data, str(length), str(args.warmup + 1),
                                 os.path.join(args.work, f"trl_{length}")], cap_gib, "trl")
    row = {"run": "trl", "length": length, "peak_rss_gib": peak, "wall_s": time.time() - started,
           "flags": "SFTTrainer defaults + LoRA r=16"}
    line = next((ln for ln in output.splitlines() if ln.startswith("TIMES ")), None)
    if status or line is None:
        row["error"] = "killed (over the cap)" if os.WIFSIGNALED(status) else \
            (output.strip().splitlines() or ["?"])[-1][:300]
        return row
    times = json.loads(line[6:])
    row["step_s"] = times[-1] - times[-2] if len(times) >= 2 else None
    row["peak_rss_gib"] = float([ln for ln in output.splitlines() if ln.startswith("PEAK ")][-1].split()[1])
    return row


def _one_step(args):
    """The same settings with no warm-up step: a cap probe needs one step to succeed."""
    probe = argparse.Namespace(**vars(args))
    probe.warmup = 0
    return probe


def measure(name: str, args, model: str, length: int, cap_gib: float | None = None) -> dict:
    data = make_data(args.work, length, args.warmup + 1)
    if name.startswith("lowmem_sp"):  # 8 heads: a split in two
        model = make_model(os.path.join(args.work, f"smollm2_135m_8heads_{args.sp_layers}"), args.tokenizer,
                           args.sp_layers, 32768, SPLIT_SHAPE)
    if name == "trl":
        return run_trl(args, model, length, data, cap_gib)
    return run_lowmem(name, args, model, length, data, cap_gib)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,16384")
    parser.add_argument("--runs", default="lowmem,lowmem_tiled,trl")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--sp_layers", type=int, default=8, help="layers of the lowmem_sp* model (8 heads)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cap_gib", type=float, default=0.0, help="also find the longest length under this cap")
    parser.add_argument("--cap_lengths", default="lowmem:16384;trl:4096,6144,8192",
                        help="run:lengths;run:lengths tried in order under the cap, one step each (stops at the "
                             "first failure)")
    parser.add_argument("--work", default="/tmp/bench_long_context")
    parser.add_argument("--json_out", default="")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    tokenizer = args.tokenizer = benchlib.make_tokenizer(os.path.join(args.work, f"tokenizer{VOCAB}"), VOCAB)
    model = make_model(os.path.join(args.work, f"smollm2_135m_shape_{args.layers}"), tokenizer, args.layers,
                       max(lengths + [32768]))
    import torch

    rows = []
    for length in lengths:
        for name in [n for n in args.runs.split(",") if n]:
            if name == "lowmem_offload" and not torch.cuda.is_available():
                continue
            rows.append(measure(name, args, model, length))
            print(json.dumps(rows[-1]), flush=True)
    table = [[r["run"], str(r["length"]), fmt(r.get("peak_rss_gib"), ".2f"), fmt(r.get("plan_gib"), ".2f"),
              fmt(r["plan_gib"] / r["peak_rss_gib"] if r.get("plan_gib") and r.get("peak_rss_gib") else None, ".2f"),
              fmt(r.get("step_s"), ".1f"), r.get("error", "")] for r in rows]
    benchlib.print_table(table, ["run", "tokens", "peak RSS GiB", "plan GiB", "plan / peak", "step s", "error"])
    by = {(r["run"], r["length"]): r for r in rows}
    for length in lengths:
        ours, trl = by.get(("lowmem", length), {}), by.get(("trl", length), {})
        if ours.get("step_s") and trl.get("step_s"):
            print(f"{length} tokens: lowmem / TRL peak RSS {ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f} (goal <= 0.5 "
                  f"from 8k), step time {ours['step_s'] / trl['step_s']:.2f} (goal <= 1.0)")
    capped = {}
    if args.cap_gib:
        for part in args.cap_lengths.split(";"):
            name, listed = part.split(":")
            capped[name] = None
            for length in [int(x) for x in listed.split(",")]:
                row = measure(name, _one_step(args), model, length, args.cap_gib)
                print(json.dumps({"cap_gib": args.cap_gib, **row}), flush=True)
                if "error" in row:
                    break
                capped[name] = length
        print(f"longest length that trains under {args.cap_gib:g} GiB: " +
              ", ".join(f"{n} {v if v else 'none of those tried'}" for n, v in capped.items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "capped": capped, "cap_gib": args.cap_gib}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
