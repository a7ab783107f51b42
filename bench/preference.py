"""Preference training's cost against SFT's, each reference against the others, packing against padding, and
TRL's DPOTrainer beside it where TRL is installed (`pip install trl` for this bench only; never a dependency).

    python bench/preference.py [--hidden 512] [--layers 6] [--seq 512] [--pairs_per_step 2] [--steps 8] [--trl]

A Llama of --hidden x --layers (vocabulary 8192) is saved once and every run starts from it, through
`train_low_mem.py train` in a fresh process: peak RSS is that process's (os.wait4; on a GPU the same runs would be
read for peak GPU memory), step time and real tokens/s come from its metrics.jsonl after --warmup steps. The
pairs have prompts of 16..240 words and answers of 8..160 words (varied, so padding wastes a lot). SFT is run
on the same sequences a DPO step sees (prompt + chosen and prompt + rejected as samples), at twice the
micro-batch, so both hold the same number of sequences per step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import REPO, fmt  # noqa: E402

VOCAB = 8192


def make_model(folder: str, tokenizer_dir: str, hidden: int, layers: int) -> str:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_data(folder: str, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)

    def words(low, high):
        return " ".join(f"t{rng.randrange(10, VOCAB)}" for _ in range(rng.randint(low, high)))

    pairs = [{"prompt": words(16, 240), "chosen": words(8, 160), "rejected": words(8, 160)} for _ in range(n)]
    paths = {"pairs": os.path.join(folder, "pairs.jsonl"), "sft": os.path.join(folder, "sft.jsonl")}
    with open(paths["pairs"], "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    with open(paths["sft"], "w") as f:  # the sequences a DPO step sees, as SFT samples
        f.writelines(json.dumps({"prompt": p["prompt"], "response": p[side]}) + "\n"
                     for p in pairs for side in ("chosen", "rejected"))
    return paths


def run(name: str, args, model: str, train_file: str, work: str, *extra: str) -> dict:
    """One training process; its peak RSS, and step time and real tokens/s after the warm-up steps."""
    out = os.path.join(work, name)
    flags = [f"--run_name={name}", f"--output_dir={out}", f"--log_dir={out}/logs", f"--finetune_from_ckp_file={model}",
             "--tokenizer_dir=", f"--train_file={train_file}", "--validation_file=", "--test_file=",
             f"--max_seq_len={args.seq}", f"--max_steps={args.warmup + args.steps}", "--logging_steps=1",
             "--save_steps=100000", "--report_to=none", "--warmup_steps=0", "--learn_rate=1e-5",
             "--mixed_precision=no", "--overwrite_output_dir=True", *extra]
    if train_file.endswith("pairs.jsonl"):  # a fresh cache per run: its build is not part of the steps timed
        flags.append(f"--reference_cache_dir={work}/cache_{name}")
    started = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_low_mem.py"), "train", *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        return {"name": name, "error": output.strip().splitlines()[-1][:300]}
    with open(os.path.join(out, "logs", name, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r][args.warmup:]
    elapsed = steps[-1]["time"] - steps[0]["time"]
    return {"name": name, "peak_rss_gib": usage.ru_maxrss / 2**20, "wall_s": time.time() - started,
            "step_s": elapsed / max(len(steps) - 1, 1),
            "real_tokens_per_sec": (steps[-1]["tokens_seen"] - steps[0]["tokens_seen"]) / max(elapsed, 1e-9),
            "real_token_fraction": sum(r["real_token_fraction"] for r in steps) / len(steps), "flags": list(extra)}


def run_trl(args, model: str, train_file: str, work: str) -> dict:
    """TRL's DPOTrainer on the same model, pairs, micro-batch and length, in a fresh process."""
    code = f"""
import json, os, time, sys
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
tok = AutoTokenizer.from_pretrained({model!r})
model = AutoModelForCausalLM.from_pretrained({model!r})
data = load_dataset("json", data_files={train_file!r})["train"]
config = DPOConfig(output_dir={work!r} + "/trl", per_device_train_batch_size={args.pairs_per_step},
                   max_steps={args.warmup + args.steps}, max_length={args.seq}, learning_rate=1e-5, logging_steps=1,
                   report_to=[], save_strategy="no", use_cpu=True, bf16=False)
times = []
from transformers import TrainerCallback
class Clock(TrainerCallback):
    def on_step_end(self, a, s, c, **k): times.append(time.time())
trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Clock()])
trainer.train()
print("TIMES", json.dumps(times))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    line = next((ln for ln in output.splitlines() if ln.startswith("TIMES ")), None)
    if status or line is None:
        return {"name": "trl DPOTrainer", "error": output.strip().splitlines()[-1][:300]}
    times = json.loads(line[6:])[args.warmup:]
    return {"name": "trl DPOTrainer", "peak_rss_gib": usage.ru_maxrss / 2**20,
            "step_s": (times[-1] - times[0]) / max(len(times) - 1, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--pairs_per_step", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trl", action="store_true", help="also run TRL's DPOTrainer (needs `pip install trl`)")
    parser.add_argument("--work", default="/tmp/bench_preference")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    tokenizer = benchlib.make_tokenizer(os.path.join(args.work, f"tokenizer{VOCAB}"), VOCAB)
    model = make_model(os.path.join(args.work, f"llama_{args.hidden}x{args.layers}"), tokenizer, args.hidden,
                       args.layers)
    data = make_data(args.work, 2 * (args.warmup + args.steps) * args.pairs_per_step)  # every cache is built anew
    b = args.pairs_per_step
    plan = {"sft": (data["sft"], f"--batch_size_per_gpu={2 * b}"),
            "dpo_cache": (data["pairs"], f"--batch_size_per_gpu={b}"),
            "dpo_model": (data["pairs"], f"--batch_size_per_gpu={b}", "--reference=model"),
            "dpo_cache_packed": (data["pairs"], f"--batch_size_per_gpu={b}", "--packing=True"),
            "sft_lora": (data["sft"], f"--batch_size_per_gpu={2 * b}", "--lora_r=16"),
            "dpo_lora_adapters_off": (data["pairs"], f"--batch_size_per_gpu={b}", "--lora_r=16")}
    chosen = [n for n in args.only.split(",") if n] or list(plan)
    runs = [run(name, args, model, plan[name][0], args.work, *plan[name][1:]) for name in chosen]
    if args.trl:
        runs.append(run_trl(args, model, data["pairs"], args.work))
    by = {r["name"]: r for r in runs}
    rows = [[r["name"], " ".join(r.get("flags", [])), fmt(r.get("peak_rss_gib"), ".3f"), fmt(r.get("step_s"), ".2f"),
             fmt(r.get("real_tokens_per_sec"), ",.0f"), fmt(r.get("real_token_fraction"), ".2f"), r.get("error", "")]
            for r in runs]
    benchlib.print_table(rows, ["run", "flags", "peak RSS GiB", "step s", "real tokens/s", "real share", "error"])

    def ratio(a, b, key):
        return fmt(by[a][key] / by[b][key], ".2f") if key in by.get(a, {}) and key in by.get(b, {}) else "-"

    print(f"DPO cache / SFT peak RSS: {ratio('dpo_cache', 'sft', 'peak_rss_gib')} (target <= 1.10)")
    print(f"DPO LoRA adapters off / SFT LoRA peak RSS: {ratio('dpo_lora_adapters_off', 'sft_lora', 'peak_rss_gib')} "
          "(target <= 1.10)")
    print(f"DPO --reference=model / cache step time: {ratio('dpo_model', 'dpo_cache', 'step_s')} (target >= 1.25)")
    print(f"DPO packed / padded real tokens/s: {ratio('dpo_cache_packed', 'dpo_cache', 'real_tokens_per_sec')} "
          "(target >= 1.5)")
    if args.trl:
        print(f"TRL / this trainer (cache) step time: {ratio('trl DPOTrainer', 'dpo_cache', 'step_s')}; peak RSS: "
              f"{ratio('trl DPOTrainer', 'dpo_cache', 'peak_rss_gib')}")
    with open(os.path.join(args.work, "preference.json"), "w") as f:
        json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
