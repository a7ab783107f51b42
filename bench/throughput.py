"""Training throughput: this trainer's loop against the Hugging Face Trainer, same model, data and batch.

    python bench/throughput.py                                   # GPU: presets medium and large, seq 2048
    python bench/throughput.py --device cpu --preset tiny --steps 6   # CI-size smoke run, under a minute
    python bench/throughput.py --find_max_batch --preset large  # each trainer at its largest micro-batch

Trainers (each run is a fresh subprocess; see bench/benchlib.py):
  lowmem          lowmem.train.loop.train: bf16 autocast, fused AdamW, torch_compile=True, liger fused
                  linear+cross-entropy when liger-kernel is importable (CUDA only)
  lowmem-noliger  the same without liger
  hf              transformers.Trainer with its defaults (bf16=True is the one flag set)
  hf-compile      transformers.Trainer with torch_compile=True, optim="adamw_torch_fused"

tokens/s counts the optimizer steps after --warmup (compilation happens in the warm-up). MFU is
6 x non-embedding parameters per token (attention scores not counted) against a matmul ceiling
measured in the same run (bf16 8192^3 on CUDA, fp32 on CPU). Peak memory is
torch.cuda.max_memory_allocated / max_memory_reserved of the run's process.

The padding-efficiency lines need no GPU: real tokens / padded tokens per batch for SFT-style
samples with lengths uniform in 20..2000.
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
from benchlib import REPO, VOCAB, fmt, make_token_file, make_tokenizer, print_table, run_worker  # noqa: E402

TRAINERS = {
    "lowmem": {"trainer": "lowmem", "compile": True, "liger": True},
    "lowmem-noliger": {"trainer": "lowmem", "compile": True, "liger": False},
    "hf": {"trainer": "hf", "compile": False},
    "hf-compile": {"trainer": "hf", "compile": True, "optim": "adamw_torch_fused"},
}
DEFAULT_MB = {"tiny": 4, "small": 16, "medium": 8, "large": 4, "3b": 2, "7b": 1}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--preset", "--presets", dest="presets", default=None,
                    help="comma-separated presets (default: medium,large on CUDA, tiny on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048 CUDA, 128 CPU)")
    ap.add_argument("--mb", default=None, help="micro-batch, one value or one per preset (default per preset)")
    ap.add_argument("--ga", type=int, default=1, help="gradient accumulation steps (same for every trainer)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=None, help="steps excluded from tokens/s (default 3, CPU 2)")
    ap.add_argument("--trainers", default=None,
                    help="comma-separated (default: lowmem,lowmem-noliger,hf,hf-compile; CPU: lowmem,hf,hf-compile)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000; CPU 2048)")
    ap.add_argument("--cpu_compile", action="store_true",
                    help="CPU: keep torch_compile on (a cold compile takes minutes on a small CPU)")
    ap.add_argument("--find_max_batch", action="store_true",
                    help="per trainer, the largest micro-batch that fits (memory model + bisection), and its tokens/s")
    ap.add_argument("--max_probes", type=int, default=4, help="find_max_batch: runs per trainer and preset")
    ap.add_argument("--usable_fraction", type=float, default=0.96, help="find_max_batch: card fraction aimed at")
    ap.add_argument("--hints", default="", help="find_max_batch: an earlier --out JSON whose runs count as probes")
    ap.add_argument("--time_budget", type=float, default=3600.0, help="seconds; later runs are skipped")
    ap.add_argument("--workdir", default="/tmp/lowmem_bench")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    ap.add_argument("--log", default="", help="append every run's stdout/stderr here")
    ap.add_argument("--skip_padding", action="store_true")
    ap.add_argument("--subprocess", action="store_true", help="CPU: run each training in its own process too")
    ap.add_argument("--padding_samples", type=int, default=0, help="samples for the padding lines (default 512 CPU, 4096)")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.presets = (args.presets or ("medium,large" if cuda else "tiny")).split(",")
    args.seq = args.seq or (2048 if cuda else 128)
    args.steps = args.steps or (13 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else min(3 if cuda else 2, max(1, args.steps // 3))
    if args.steps <= args.warmup:
        ap.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    mbs = [int(x) for x in args.mb.split(",")] if args.mb else [DEFAULT_MB.get(p, 1) for p in args.presets]
    if len(mbs) == 1:
        mbs = mbs * len(args.presets)
    args.mbs = dict(zip(args.presets, mbs))
    args.trainers = (args.trainers or ("lowmem,lowmem-noliger,hf,hf-compile" if cuda else "lowmem,hf,hf-compile")).split(",")
    args.vocab = args.vocab or (VOCAB if cuda else 2048)
    for name in args.trainers:
        if name not in TRAINERS:
            ap.error(f"unknown trainer {name}; choose from {', '.join(TRAINERS)}")
    return args


def trainer_spec(name: str, args, preset: str, mb: int, data: str, tok: str) -> dict:
    spec = {**TRAINERS[name], "name": f"{name}_{preset}_mb{mb}", "preset": preset, "seq": args.seq, "mb": mb,
            "ga": args.ga, "warmup": args.warmup, "steps": args.steps - args.warmup, "device": args.device,
            "data": data, "tokenizer_dir": tok, "vocab": args.vocab, "lr": 3e-4, "lr_warmup": 10}
    if spec.get("liger") and not (args.device == "cuda" and importlib.util.find_spec("liger_kernel")):
        spec["liger"] = False  # liger-kernel needs CUDA and triton
        spec["liger_unavailable"] = True
    if args.device == "cpu" and spec.get("compile") and not args.cpu_compile:
        spec["compile"] = False
        spec["compile_off_on_cpu"] = True
    return spec


class Runner:
    def __init__(self, args):
        self.args, self.start, self.results = args, time.time(), []

    def remaining(self) -> float:
        return self.args.time_budget - (time.time() - self.start)

    def run(self, spec: dict) -> dict:
        min_needed = 45 if self.args.device == "cuda" else 5
        if self.remaining() < min_needed:
            result = {"ok": False, "oom": False, "skipped": True, "error": "time budget spent", "spec": spec}
        else:
            print(f"[{time.time() - self.start:6.0f}s] run {spec['name']} ...", flush=True)
            if self.args.device == "cpu" and not self.args.subprocess:
                from benchlib import worker  # CPU smoke mode: in this process, saving the imports per run

                started = time.time()
                result = worker(spec)
                result["wall_s"] = round(time.time() - started, 1)
            else:
                result = run_worker(spec, self.remaining(), self.args.log or None)
            result.setdefault("spec", spec)
            state = "ok" if result.get("ok") else ("OOM" if result.get("oom") else "FAILED " + result.get("error", ""))
            print(f"[{time.time() - self.start:6.0f}s]   {state} | {fmt(result.get('tokens_per_sec'), '.0f')} tok/s | "
                  f"peak {fmt(result.get('peak_reserved_gib'), '.1f')} GiB | wall {result.get('wall_s')}s | "
                  f"warm-up {fmt(result.get('warmup_s'), '.0f')}s", flush=True)
        self.results.append(result)
        return result


def label(result: dict) -> str:
    spec = result["spec"]
    name = spec["name"].rsplit("_", 2)[0]
    notes = (["no liger here"] if name == "lowmem" and spec.get("liger_unavailable") else []) + \
        (["compile off on cpu"] if spec.get("compile_off_on_cpu") else [])
    return name + (f" ({', '.join(notes)})" if notes else "")


def table_rows(results: list[dict], device: str, ceiling: float | None = None) -> tuple[list[str], list[list[str]]]:
    header = ["trainer", "preset", "seq", "micro-batch", "tokens/s", "MFU", "peak GPU alloc GiB",
              "peak GPU reserved GiB", "host peak RSS GiB", "vs HF", "vs HF-compile", "warm-up s", "status"]
    base = {}
    for r in results:
        if r.get("ok") and r.get("tokens_per_sec"):
            base[(r["spec"]["name"].rsplit("_", 2)[0], r["spec"]["preset"], r["spec"]["mb"] if not r.get("_at_max") else "max")] = r["tokens_per_sec"]
    rows = []
    for r in results:
        spec = r["spec"]
        key_mb = "max" if r.get("_at_max") else spec["mb"]
        tps = r.get("tokens_per_sec") if r.get("ok") else None
        mfu = tps * r["flops_per_token"] / ceiling if tps and ceiling else None
        hf = base.get(("hf", spec["preset"], key_mb))
        hfc = base.get(("hf-compile", spec["preset"], key_mb))
        status = "ok" if r.get("ok") else ("skipped" if r.get("skipped") else ("OOM" if r.get("oom") else "failed"))
        rows.append([label(r), spec["preset"], str(spec["seq"]), str(spec["mb"]),
                     fmt(tps, ",.0f"), fmt(mfu * 100 if mfu else None, ".1f") + ("%" if mfu else ""),
                     fmt(r.get("peak_alloc_gib"), ".1f", "n/a (cpu)" if device == "cpu" else "-"),
                     fmt(r.get("peak_reserved_gib"), ".1f", "n/a (cpu)" if device == "cpu" else "-"),
                     fmt(r.get("host_peak_rss_gib"), ".1f"),
                     f"{tps / hf:.2f}x HF" if tps and hf else "-",
                     f"{tps / hfc:.2f}x HF-compile" if tps and hfc else "-",
                     fmt(r.get("warmup_s"), ".0f"), status])
    return header, rows


def _predict(points: list[tuple[int, float]], usable_gib: float) -> int:
    """Micro-batch whose peak reserved memory reaches usable_gib, by a line through the last two points."""
    (b1, m1), (b2, m2) = points[-2], points[-1]
    slope = (m2 - m1) / (b2 - b1) if b2 != b1 else 0.0
    if slope <= 0:
        return 2 * b2
    return int(b2 + (usable_gib - m2) / slope)


def find_max(runner: Runner, name: str, args, preset: str, data: str, tok: str, hint: dict | None) -> dict | None:
    """Largest micro-batch that trains, found in at most --max_probes runs.

    Starts from a measured point (`hint`, a run of an earlier --out JSON, or a run at the preset's
    micro-batch) and doubles; once two batch sizes have fitted, jumps to the batch where a line
    through their peak memory reaches --usable_fraction of the card; after an out-of-memory run,
    bisects between the largest that fitted and the smallest that did not. (On an H100 a one-point
    guess of the batch-independent memory was tried first and overshot for every trainer.)
    """
    probes = 0
    if hint is None:
        hint = runner.run(trainer_spec(name, args, preset, args.mbs[preset], data, tok))
        probes += 1
    if not hint.get("ok"):
        return None
    best, lo, hi = hint, hint["spec"]["mb"], None
    points = [(lo, hint["peak_reserved_gib"])] if hint.get("peak_reserved_gib") else []
    usable = args.usable_fraction * hint.get("gpu_total_gib", 0.0)
    while probes < args.max_probes:
        if hi is None:
            if len(points) < 2 or args.device != "cuda":
                target = 2 * lo
            else:
                target = min(_predict(points, usable), 4 * lo)
            if target <= lo:
                break
        else:
            if hi - lo <= max(1, lo // 8):
                break
            target = (lo + hi) // 2
        result = runner.run(trainer_spec(name, args, preset, target, data, tok))
        probes += 1
        if result.get("ok"):
            best, lo = result, target
            if result.get("peak_reserved_gib"):
                points.append((target, result["peak_reserved_gib"]))
        elif result.get("oom"):
            hi = target
        else:
            break  # a failure that is not memory: stop probing this trainer
    return dict(best, _at_max=True, _max_bracket=[lo, hi])


def padding_efficiency(tok_dir: str, n: int = 768, seed: int = 0, max_len: int = 2048) -> list[list[str]]:
    """Real / total tokens per batch for lengths uniform in 20..2000: this trainer's batching vs HF collators.

    The same samples in the same order go through lowmem's pad-to-longest `collate`, lowmem's
    `--packing` path (`packed_batches_from`: first-fit-decreasing rows of max_len, no attention
    across samples), and HF's DataCollatorWithPadding / DataCollatorForSeq2Seq (pad to longest)
    and DataCollatorWithFlattening (padding-free: one row, position ids restart per sample).
    """
    import numpy as np
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, DataCollatorWithPadding

    from lowmem.data.batches import collate, encode_stream, packed_batches_from
    from lowmem.data.encoding import Encoded, SampleEncoder
    from lowmem.data.template import IGNORE_INDEX
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 2001, size=n)
    samples = []
    for length in lengths:
        ids = rng.integers(4, len(tokenizer), size=int(length)).tolist()
        prompt = int(length) // 2
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    encoder = SampleEncoder(tokenizer, max_len)
    rows = []
    for bs in (4, 8, 16):
        names = ("lowmem, default (pad to longest)", f"lowmem --packing (rows of {max_len})",
                 "HF DataCollatorWithPadding", "HF DataCollatorForSeq2Seq", "HF DataCollatorWithFlattening")
        fractions = {name: [0, 0] for name in names}
        with_padding, seq2seq, flattening = (DataCollatorWithPadding(tokenizer), DataCollatorForSeq2Seq(tokenizer),
                                             DataCollatorWithFlattening())
        for i in range(0, n - bs + 1, bs):
            chunk = samples[i:i + bs]
            ours = collate([Encoded(torch.tensor(s["input_ids"]), torch.tensor(s["labels"])) for s in chunk],
                           tokenizer.pad_token_id, False, i + bs)
            fractions[names[0]][0] += ours.real_tokens
            fractions[names[0]][1] += ours.total_tokens
            a = with_padding([{"input_ids": s["input_ids"]} for s in chunk])
            fractions[names[2]][0] += int(a["attention_mask"].sum())
            fractions[names[2]][1] += a["input_ids"].numel()
            b = seq2seq([dict(s) for s in chunk])
            fractions[names[3]][0] += int(b["attention_mask"].sum())
            fractions[names[3]][1] += b["input_ids"].numel()
            c = flattening([{"input_ids": s["input_ids"]} for s in chunk])
            fractions[names[4]][0] += sum(len(s["input_ids"]) for s in chunk)
            fractions[names[4]][1] += c["input_ids"].numel()
        stream = ((pos, {"input_ids": np.asarray(s["input_ids"])}) for pos, s in enumerate(samples))
        packed_rows = 0
        for batch in packed_batches_from(encode_stream(stream, encoder), bs, tokenizer.pad_token_id, max_len):
            fractions[names[1]][0] += batch.real_tokens
            fractions[names[1]][1] += batch.total_tokens
            packed_rows += batch.tensors["input_ids"].shape[0]
        for name in names:
            real, total = fractions[name]
            note = f" ({packed_rows} rows for {n} samples)" if name == names[1] else ""
            rows.append([name, str(bs) + (" rows" if name == names[1] else (" samples, 1 row" if name == names[4]
                                                                               else "")), f"{real / total:.1%}{note}"])
    rows.append(["lowmem token windows (.bin, pretraining)", "any", "100.0%"])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.log:
        open(args.log, "a").close()
    tok = make_tokenizer(os.path.join(args.workdir, f"tokenizer{args.vocab}"), args.vocab)
    # enough windows that no run repeats data: the largest run's tokens, with room for find_max_batch
    biggest = max(args.mbs.values()) * (16 if args.find_max_batch else 1) * args.ga * args.steps * args.seq
    n_tokens = max(biggest + args.seq * 64, 2_000_000 if args.device == "cuda" else 200_000)
    data = make_token_file(os.path.join(args.workdir, f"markov_v{args.vocab}_{n_tokens}"), n_tokens, args.vocab,
                           tokenizer_dir=tok)
    runner = Runner(args)
    import torch

    print(f"bench/throughput.py | {datetime.date.today()} | device {args.device}"
          f"{' ' + torch.cuda.get_device_name(0) if args.device == 'cuda' else ''} | torch {torch.__version__} | "
          f"transformers {__import__('transformers').__version__} | accelerate {__import__('accelerate').__version__} | "
          f"liger {'yes' if importlib.util.find_spec('liger_kernel') else 'no'} | seq {args.seq} | "
          f"steps {args.steps} (warm-up {args.warmup}) | ga {args.ga}", flush=True)
    hints = {}
    if args.hints:
        with open(args.hints) as f:
            for r in json.load(f)["results"]:
                if r.get("ok") and not r.get("_at_max") and r["spec"]["seq"] == args.seq:
                    key = (r["spec"]["name"].rsplit("_", 2)[0], r["spec"]["preset"])
                    if key not in hints or r["spec"]["mb"] > hints[key]["spec"]["mb"]:
                        hints[key] = r
    summary: dict = {"args": {k: v for k, v in vars(args).items()}, "date": str(datetime.date.today())}
    for preset in args.presets:
        for name in args.trainers:
            if args.find_max_batch:
                best = find_max(runner, name, args, preset, data, tok, hints.get((name, preset)))
                if best is not None:
                    runner.results.append(best)
            else:
                runner.run(trainer_spec(name, args, preset, args.mbs[preset], data, tok))
    results = runner.results
    ceilings = sorted(r["ceiling_flops"] for r in results if r.get("ceiling_flops"))
    ceiling = ceilings[len(ceilings) // 2] if ceilings else None
    summary["ceiling_flops"] = ceiling
    if ceilings:
        unit, scale = ("TFLOP/s", 1e12) if args.device == "cuda" else ("GFLOP/s", 1e9)
        print(f"\nmatmul ceiling ({'bf16 8192^3' if args.device == 'cuda' else 'fp32 1024^3'}), median of "
              f"{len(ceilings)} runs: {ceiling / scale:.1f} {unit} (range {ceilings[0] / scale:.1f}-"
              f"{ceilings[-1] / scale:.1f}); MFU = tokens/s x 6 x non-embedding params / this ceiling")
    shown = [r for r in results if r.get("_at_max")] if args.find_max_batch else results
    if args.find_max_batch:
        print("\nall probes:")
        print_table(table_rows([r for r in results if not r.get("_at_max")], args.device, ceiling)[1],
                    table_rows([], args.device)[0])
        print("\neach trainer at its largest micro-batch that fits (ratios against HF at its own largest):")
    else:
        print()
    header, rows = table_rows(shown, args.device, ceiling)
    summary["table"] = print_table(rows, header)
    for r in results:
        if not r.get("ok") and not r.get("skipped") and not r.get("oom"):
            print(f"  {r['spec']['name']} failed: {r.get('error', '')[:400]}")
    if not args.skip_padding:
        print("\npadding efficiency, SFT-style samples with lengths uniform in 20..2000 (real tokens / batch tokens):")
        rows = padding_efficiency(tok, n=args.padding_samples or (512 if args.device == "cpu" else 4096))
        summary["padding"] = print_table(rows, ["batching", "batch", "real tokens"])
    summary["results"] = results
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    failed = [r for r in results if not r.get("ok") and not r.get("oom") and not r.get("skipped")]
    return 1 if failed and not args.find_max_batch else 0


if __name__ == "__main__":
    sys.exit(main())
