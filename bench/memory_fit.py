"""GPU memory: optimizer-state options on the 1B preset, the 7B shape, and the largest model in a 20 GiB budget.

    python bench/memory_fit.py                          # the four parts on CUDA
    python bench/memory_fit.py --parts optim --preset tiny --seq 128 --steps 8   # CPU smoke run
    python bench/memory_fit.py --parts lora             # 7B LoRA and QLoRA in --max_gpu_memory_gb=20
    python bench/memory_fit.py --parts lora --preset_7b tiny --seq 128 --max_mb_lora 8  # CPU smoke run (LoRA only)

Every run goes through this trainer's loop (`lowmem.train.loop.train`), each in a fresh process, on a
learnable synthetic token stream (bench/benchlib.py: a Markov chain, best loss about 1.06 nats).

Parts:
  optim   --preset (default large, ~1B) at --seq 2048, micro-batch --mb, the same data and seed:
          adamw (fp32 weights and states, bf16 autocast), adamw_8bit + bf16_weights,
          adamw_4bit + bf16_weights, adafactor (fp32 weights). Peak GPU memory, tokens/s, and the
          loss after --steps steps (mean of the last 5) against fp32 AdamW.
  7b      preset 7b, seq 2048, gradient_checkpointing, adamw_8bit, bf16_weights, liger when
          importable: a probe at --probe_mb gives memory per sample, then the largest micro-batch
          predicted to fit is run (and a smaller one if that runs out of memory).
  budget  torch.cuda.set_per_process_memory_fraction(20 GiB / card) before anything is built; the
          largest of 3b / large that trains at seq 2048 (micro-batch 1, gradient checkpointing,
          bf16 weights), trying adamw_8bit, then adamw_4bit, then adafactor.
  lora    preset 7b, seq 2048, gradient checkpointing, --max_gpu_memory_gb=--budget_gib (20): LoRA r=16 on
          every linear layer of the blocks over a bf16 base, then QLoRA (NF4 base, bf16 compute). Probes
          at micro-batch 1 and 2 give the memory per sample, then the largest micro-batch predicted to fit
          is run (smaller ones after an OOM). Peak GPU memory is training's (after the base is built and
          quantised; the build's own peak is reported beside it) and tokens/s.

The model is initialised directly on the GPU (bench/benchlib.py `_build_on_device`); the
trainer itself builds it on the host in fp32 first, which for 7B takes minutes and ~27 GB of RAM.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import VOCAB, fmt, make_token_file, make_tokenizer, print_table, run_worker  # noqa: E402

OPTIM_CONFIGS = [
    ("adamw", False),
    ("adamw_8bit", True),
    ("adamw_4bit", True),
    ("adafactor", False),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--parts", default="optim,7b,budget,lora")
    ap.add_argument("--preset", default=None, help="optim part preset (default large; CPU tiny)")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (CPU 128)")
    ap.add_argument("--mb", type=int, default=4, help="optim part micro-batch")
    ap.add_argument("--steps", type=int, default=60, help="optim part optimizer steps")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--optimizers", default=",".join(o for o, _ in OPTIM_CONFIGS))
    ap.add_argument("--compile", action="store_true", help="torch_compile=True in the optim part")
    ap.add_argument("--probe_mb", type=int, default=8, help="7b part: micro-batch of the memory probe")
    ap.add_argument("--max_mb_7b", type=int, default=64)
    ap.add_argument("--preset_7b", default="7b", help="7b part preset (another only to test this script)")
    ap.add_argument("--budget_gib", type=float, default=20.0)
    ap.add_argument("--budget_presets", default="3b,large")
    ap.add_argument("--lora_r", type=int, default=16, help="lora part: adapter rank")
    ap.add_argument("--max_mb_lora", type=int, default=64, help="lora part: largest micro-batch tried")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--time_budget", type=float, default=3600.0)
    ap.add_argument("--workdir", default="/tmp/lowmem_bench")
    ap.add_argument("--out", default="")
    ap.add_argument("--log", default="")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.preset = args.preset or ("large" if cuda else "tiny")
    args.seq = args.seq or (2048 if cuda else 128)
    args.vocab = args.vocab or (VOCAB if cuda else 2048)
    args.parts = args.parts.split(",")
    return args


class Runner:
    def __init__(self, args, data: str, tok: str):
        self.args, self.data, self.tok, self.start, self.results = args, data, tok, time.time(), []
        self.liger = args.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None

    def spec(self, name: str, **over) -> dict:
        base = {"trainer": "lowmem", "name": name, "device": self.args.device, "data": self.data,
                "tokenizer_dir": self.tok, "vocab": self.args.vocab, "seq": self.args.seq, "liger": self.liger,
                "lr": self.args.lr, "lr_warmup": 10, "seed": 42}
        return {**base, **over}

    def run(self, spec: dict) -> dict:
        remaining = self.args.time_budget - (time.time() - self.start)
        if remaining < (60 if self.args.device == "cuda" else 5):
            result = {"ok": False, "oom": False, "skipped": True, "error": "time budget spent", "spec": spec}
        else:
            print(f"[{time.time() - self.start:6.0f}s] run {spec['name']} (mb {spec['mb']}) ...", flush=True)
            result = run_worker(spec, remaining, self.args.log or None)
            result.setdefault("spec", spec)
            state = "ok" if result.get("ok") else ("OOM" if result.get("oom") else "FAILED " + result.get("error", ""))
            print(f"[{time.time() - self.start:6.0f}s]   {state} | {fmt(result.get('tokens_per_sec'), '.0f')} tok/s | "
                  f"peak alloc {fmt(result.get('peak_alloc_gib'), '.1f')} GiB reserved "
                  f"{fmt(result.get('peak_reserved_gib'), '.1f')} GiB | host {fmt(result.get('host_peak_rss_gib'), '.1f')} "
                  f"GiB | loss {fmt(result.get('final_loss'), '.4f')} | wall {result.get('wall_s')}s", flush=True)
        self.results.append(result)
        return result


def status(r: dict) -> str:
    return "ok" if r.get("ok") else ("skipped" if r.get("skipped") else ("OOM" if r.get("oom") else "failed"))


def part_optim(runner: Runner, args) -> str:
    wanted = args.optimizers.split(",")
    rows, base_loss = [], None
    for optimizer, bf16_weights in OPTIM_CONFIGS:
        if optimizer not in wanted:
            continue
        spec = runner.spec(f"optim_{optimizer}{'_bf16w' if bf16_weights else ''}", preset=args.preset, mb=args.mb,
                           warmup=5 if args.steps > 10 else 1, steps=args.steps - (5 if args.steps > 10 else 1),
                           optimizer=optimizer, bf16_weights=bf16_weights, compile=args.compile)
        r = runner.run(spec)
        loss = r.get("final_loss") if r.get("ok") else None
        if optimizer == "adamw" and not bf16_weights:
            base_loss = loss
        losses = r.get("losses") or []
        rows.append([optimizer, "bf16 (stochastic rounding)" if bf16_weights and optimizer != "adafactor" else
                     ("bf16" if bf16_weights else "fp32 (bf16 autocast)"),
                     fmt(r.get("peak_alloc_gib"), ".1f"), fmt(r.get("peak_reserved_gib"), ".1f"),
                     fmt(r.get("tokens_per_sec"), ",.0f"), fmt(losses[0] if losses else None, ".3f"),
                     fmt(loss, ".4f"), f"{loss - base_loss:+.4f}" if loss is not None and base_loss is not None else "-",
                     status(r)])
    print(f"\noptimizer states, preset {args.preset}, seq {args.seq}, micro-batch {args.mb}, {args.steps} steps, "
          f"lr {args.lr}, liger {runner.liger}, compile {args.compile}; loss = mean of the last 5 steps:")
    return print_table(rows, ["optimizer", "weights", "peak GPU alloc GiB", "peak GPU reserved GiB", "tokens/s",
                              "loss step 1", f"loss step {args.steps}", "vs adamw fp32", "status"])


def part_7b(runner: Runner, args) -> str:
    common = dict(preset=args.preset_7b, grad_ckpt=True, optimizer="adamw_8bit", bf16_weights=True, lr=1e-4)
    probe = runner.run(runner.spec(f"7b_probe_mb{args.probe_mb}", mb=args.probe_mb, warmup=1, steps=1, **common))
    rows = [probe]
    if probe.get("ok"):
        total = probe.get("gpu_total_gib", 4.0)  # CPU test runs: a pretend 4 GiB card
        peak = probe.get("peak_reserved_gib", probe["host_peak_rss_gib"])
        n = probe["n_params"]
        # bf16 weights + bf16 grads + two 8-bit states (+ a block scale per 256): independent of the batch
        fixed = n * (2 + 2 + 2 + 8 / 256) / 2**30
        per_sample = max((peak - fixed) / args.probe_mb, 0.05)
        target = int((total * 0.94 - fixed) / per_sample)
        target = max(args.probe_mb, min(args.max_mb_7b, target - target % 2))
        print(f"  7b: {fixed:.1f} GiB for weights+grads+states, {per_sample:.2f} GiB per sample -> try {target}")
        tried = set()
        while target > args.probe_mb and target not in tried:
            tried.add(target)
            r = runner.run(runner.spec(f"7b_mb{target}", mb=target, warmup=1, steps=3, **common))
            rows.append(r)
            if not r.get("oom"):
                break
            target = int(target * 0.8) - int(target * 0.8) % 2
    table = []
    for r in rows:
        table.append([r["spec"]["preset"], str(r["spec"]["mb"]), fmt(r.get("tokens_per_sec"), ",.0f"),
                      fmt(r.get("peak_alloc_gib"), ".1f"), fmt(r.get("peak_reserved_gib"), ".1f"),
                      fmt(r.get("host_peak_rss_gib"), ".1f"), fmt(r.get("build_s"), ".0f"),
                      fmt(r.get("warmup_s"), ".0f"), fmt(r.get("final_loss"), ".3f"), status(r)])
    print(f"\n7B shape (6.74B parameters), seq {args.seq}, gradient checkpointing, adamw_8bit, bf16 weights, "
          f"liger {runner.liger}:")
    return print_table(table, ["preset", "micro-batch", "tokens/s", "peak GPU alloc GiB", "peak GPU reserved GiB",
                               "host peak RSS GiB", "build s (on GPU)", "warm-up s", "loss", "status"])


def part_budget(runner: Runner, args) -> str:
    table, done = [], False
    for preset in args.budget_presets.split(","):
        for optimizer in ("adamw_8bit", "adamw_4bit", "adafactor"):
            r = runner.run(runner.spec(f"budget_{preset}_{optimizer}", preset=preset, mb=1, warmup=1, steps=3,
                                       grad_ckpt=True, optimizer=optimizer, bf16_weights=True,
                                       mem_budget_gib=args.budget_gib, lr=1e-4))
            table.append([preset, optimizer, "1", fmt(r.get("n_params") and r["n_params"] / 1e9, ".2f"),
                          fmt(r.get("tokens_per_sec"), ",.0f"), fmt(r.get("peak_alloc_gib"), ".1f"),
                          fmt(r.get("peak_reserved_gib"), ".1f"), status(r)])
            if r.get("ok"):
                done = True
                break
            if r.get("skipped") or not r.get("oom"):
                break
        if done:
            break
    print(f"\nlargest model in a {args.budget_gib:g} GiB budget (set_per_process_memory_fraction), seq {args.seq}, "
          "micro-batch 1, gradient checkpointing, bf16 weights, liger {runner.liger}:".replace("{runner.liger}",
                                                                                              str(runner.liger)))
    return print_table(table, ["preset", "optimizer", "micro-batch", "params (B)", "tokens/s", "peak GPU alloc GiB",
                               "peak GPU reserved GiB", "status"])


LORA_CONFIGS = [("LoRA", {}), ("QLoRA", {"qlora": True})]


def _lora_spec(runner: Runner, args, name: str, extra: dict, mb: int) -> dict:
    cuda = args.device == "cuda"
    return runner.spec(f"lora_{'q' if extra.get('qlora') else ''}r{args.lora_r}_mb{mb}", preset=args.preset_7b, mb=mb,
                       warmup=1, steps=3, grad_ckpt=True, optimizer="adamw", lr=1e-4, lora_r=args.lora_r,
                       lora_alpha=2.0 * args.lora_r, peak_after_build=True, label=name,
                       # QLoRA builds its bf16 base on the host and sends each weight over as NF4, as the trainer does
                       build_on_device=not extra.get("qlora"),
                       max_gpu_memory_gb=args.budget_gib if cuda else 0.0,
                       mem_budget_gib=args.budget_gib if cuda else 0.0, **extra)


def _largest_lora_batch(runner: Runner, args, name: str, extra: dict) -> list[dict]:
    """Micro-batches 1 and 2, then the largest the slope between them predicts in the budget (smaller on OOM)."""
    rows = [runner.run(_lora_spec(runner, args, name, extra, mb)) for mb in (1, 2)]
    if not all(r.get("ok") for r in rows):
        return rows
    peaks = [r.get("peak_reserved_gib", r["host_peak_rss_gib"]) for r in rows]
    per_sample = max(peaks[1] - peaks[0], 0.05)
    budget = args.budget_gib if args.device == "cuda" else 4.0  # CPU smoke runs: a pretend 4 GiB card
    target = min(args.max_mb_lora, int((budget * 0.94 - (peaks[0] - per_sample)) / per_sample))
    print(f"  {name}: {peaks[0] - per_sample:.1f} GiB fixed, {per_sample:.2f} GiB per sample -> try {target}")
    tried = {1, 2}
    while target > 2 and target not in tried:
        tried.add(target)
        result = runner.run(_lora_spec(runner, args, name, extra, target))
        rows.append(result)
        if not result.get("oom"):
            break
        target = int(target * 0.85)
    return rows


def part_lora(runner: Runner, args) -> str:
    if args.device != "cuda":
        print("  lora part on CPU: QLoRA needs CUDA, LoRA only (a smoke run of this script)")
    table = []
    for name, extra in LORA_CONFIGS:
        if extra.get("qlora") and args.device != "cuda":
            continue
        for r in _largest_lora_batch(runner, args, name, extra):
            table.append([name, str(r["spec"]["mb"]), fmt(r.get("tokens_per_sec"), ",.0f"),
                          fmt(r.get("peak_alloc_gib"), ".1f"), fmt(r.get("peak_reserved_gib"), ".1f"),
                          fmt(r.get("build_peak_gib"), ".1f"), fmt(r.get("host_peak_rss_gib"), ".1f"),
                          fmt(r.get("final_loss"), ".3f"), status(r)])
    print(f"\n{args.preset_7b} preset, seq {args.seq}, gradient checkpointing, LoRA r={args.lora_r} on every linear "
          f"layer of the blocks (base in bf16 on CUDA, NF4 with QLoRA; fp32 on CPU), adamw on the adapters, "
          f"--max_gpu_memory_gb={args.budget_gib:g}:")
    return print_table(table, ["adapters", "micro-batch", "tokens/s", "peak GPU alloc GiB (training)",
                               "peak GPU reserved GiB", "peak GPU alloc GiB (build)", "host peak RSS GiB", "loss",
                               "status"])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    tok = make_tokenizer(os.path.join(args.workdir, f"tokenizer{args.vocab}"), args.vocab)
    n_tokens = max(args.steps * args.mb * args.seq + args.seq * 64, 64 * 4 * 2048 * 2 if args.device == "cuda" else 0)
    data = make_token_file(os.path.join(args.workdir, f"markov_v{args.vocab}_{n_tokens}"), n_tokens, args.vocab,
                           tokenizer_dir=tok)
    import torch

    print(f"bench/memory_fit.py | {datetime.date.today()} | device {args.device}"
          f"{' ' + torch.cuda.get_device_name(0) if args.device == 'cuda' else ''} | torch {torch.__version__} | "
          f"torchao {'yes' if importlib.util.find_spec('torchao') else 'no'} | "
          f"liger {'yes' if importlib.util.find_spec('liger_kernel') else 'no'}", flush=True)
    runner = Runner(args, data, tok)
    summary: dict = {"args": vars(args), "date": str(datetime.date.today()), "tables": {}}
    parts = {"optim": part_optim, "7b": part_7b, "budget": part_budget, "lora": part_lora}
    for part in args.parts:
        summary["tables"][part] = parts[part](runner, args)
    for r in runner.results:
        if not r.get("ok") and not r.get("oom") and not r.get("skipped"):
            print(f"  {r['spec']['name']} failed: {r.get('error', '')[:400]}")
    summary["results"] = runner.results
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
