"""The data registry's costs: host memory over shards and mixtures, loader speed from a tokenize-once cache,
and padding of packed multi-turn conversations.

    python bench/data_sources.py                       # ~5 min on 2 cores
    python bench/data_sources.py --rows=40000 --quick  # a smoke run (seconds)

1. rss: peak RSS of the training data path (TrainData.epoch, no model) over the same rows stored as one
   parquet file, as 100 shards in a folder, and as a 3-dataset weighted mixture; a fresh subprocess each,
   reading --batches batches of 32 (several 10k-row windows), peak = the kernel's VmHWM.
2. speed: real tokens/s of TrainData.epoch on one core (sched_setaffinity), prompt/response SFT data at
   seq 512 and 2048 with packing, from the tokenize-once cache (`prepare tokenize` of SFT data) and on
   the fly from the parquet.
3. packing: real-token share of packed rows of multi-turn conversations (2-12 turns of 20-400 tokens each,
   uniform) at seq 2048, batch 8.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORDS = ("cat dog sun moon tree fish bird rain star book river stone light cloud wind fire snow leaf road hill "
         "猫 狗 山 水 花 鸟 月 星 书 雨").split()


def make_tokenizer(workdir: str) -> str:
    from lowmem.data.tokenizer import train_bpe_tokenizer

    path = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(path):
        import random

        rng = random.Random(0)
        train_bpe_tokenizer((" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(3000)), 2000, path)
    return path


def phrase(rng, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_parquet(path: str, rows: int, seed: int, lo: int = 5, hi: int = 40, group: int = 10_000) -> str:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(path) and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    rng = random.Random(seed)
    with pq.ParquetWriter(path + ".tmp", pa.schema([("prompt", pa.string()), ("response", pa.string())])) as w:
        for first in range(0, rows, group):
            n = min(group, rows - first)
            w.write_table(pa.table({"prompt": [phrase(rng, lo, hi) for _ in range(n)],
                                    "response": [phrase(rng, lo, hi) for _ in range(n)]}))
    os.replace(path + ".tmp", path)
    return path


def split_into_shards(source: str, folder: str, n: int) -> str:
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    if len([f for f in os.listdir(folder) if f.endswith(".parquet")]) == n:
        return folder
    table = pq.read_table(source)
    per = -(-table.num_rows // n)
    for i in range(n):
        pq.write_table(table.slice(i * per, per), os.path.join(folder, f"train-{i:05d}-of-{n:05d}.parquet"),
                       row_group_size=10_000)
    return folder


# ---------------------------------------------------------------- children (fresh processes)

def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) / 1024
    return out


def child_pass(train_file: str, tokenizer_dir: str, batches: int, seq: int, packing: bool, one_core: bool) -> dict:
    from lowmem.data.options import DataOptions
    from lowmem.data.pipeline import TrainData
    from lowmem.data.sources import parse_inputs
    from lowmem.data.stream import Shard
    from lowmem.data.tokenizer import load_tokenizer

    if one_core:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        import torch

        torch.set_num_threads(1)
    tokenizer = load_tokenizer(tokenizer_dir)
    options = DataOptions(max_seq_len=seq, batch_size=32 if not packing else 8, packing=packing, buffer_size=10000,
                          prefetch_batches=8)
    inputs = parse_inputs(train_file, [], "", [], held_out_split=False)
    before = _status()
    data = TrainData(inputs, options, tokenizer, False, 0, 1, pin_memory=False, log=lambda _: None)
    stream = data.epoch(0, Shard(), 0)
    first = next(stream)
    start, real, n = time.perf_counter(), 0, 0
    for batch in stream:
        real += batch.real_tokens
        n += 1
        if n >= batches:
            break
    elapsed = time.perf_counter() - start
    stream.close()
    del first
    after = _status()
    return {"real_tokens_per_s": real / elapsed, "batches": n, "peak_rss_mib": after["VmHWM"],
            "rss_before_mib": before["VmRSS"], "rss_anon_mib": after["RssAnon"]}


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         timeout=1800, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parts

def part_rss(workdir: str, tokenizer_dir: str, rows: int, batches: int) -> list[list[str]]:
    single = write_parquet(os.path.join(workdir, f"all_{rows}.parquet"), rows, seed=1)
    shards = split_into_shards(single, os.path.join(workdir, f"shards_{rows}"), 100)
    parts = [write_parquet(os.path.join(workdir, f"mix{i}_{rows}.parquet"), rows // 3, seed=10 + i) for i in range(3)]
    mixture = ",".join(f"{p}:{w}" for p, w in zip(parts, (0.5, 0.3, 0.2)))
    results = []
    for name, train_file in (("1 file", single), ("100 shards", shards), ("3-dataset mixture", mixture)):
        r = run_child(train_file, tokenizer_dir, batches, 128, False, False)
        results.append([name, f"{r['peak_rss_mib']:.0f}", f"{r['rss_anon_mib']:.0f}", f"{r['real_tokens_per_s']:,.0f}"])
    base = float(results[0][1])
    for row in results:
        row.append(f"{(float(row[1]) - base) / base:+.1%}")
    return results


def part_speed(workdir: str, tokenizer_dir: str, rows: int, batches: int) -> list[list[str]]:
    from lowmem.data.sft_cache_build import build_sft_cache

    source = write_parquet(os.path.join(workdir, f"sft_{rows}.parquet"), rows, seed=3, lo=20, hi=300)
    results = []
    for seq in (512, 2048):
        prefix = os.path.join(workdir, f"sft_cache_{rows}_{seq}")
        build_sft_cache(source, prefix, tokenizer_dir, seq, log=lambda _: None)
        for name, train_file in (("tokenize-once cache", prefix), ("on the fly", source)):
            r = run_child(train_file, tokenizer_dir, batches, seq, True, True)
            results.append([name, str(seq), f"{r['real_tokens_per_s']:,.0f}"])
    return results


def part_packing(tokenizer_dir: str, conversations: int) -> list[list[str]]:
    import random

    from lowmem.data.batches import encode_stream, packed_batches_from
    from lowmem.data.encoding import SampleEncoder
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    rng = random.Random(0)
    probe = phrase(rng, 2000, 2000)
    per_word = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / 2000

    def turn() -> str:  # 20-400 tokens
        words = max(1, round(rng.randint(20, 400) / per_word))
        return phrase(rng, words, words)

    samples = []
    for i in range(conversations):
        messages = []
        for _ in range(rng.randint(1, 6)):  # 2-12 messages
            messages += [{"role": "user", "content": turn()}, {"role": "assistant", "content": turn()}]
        samples.append((i, {"messages": messages}))
    encoder = SampleEncoder(tokenizer, 2048)
    real = total = rows = 0
    for batch in packed_batches_from(encode_stream(iter(samples), encoder), 8, tokenizer.pad_token_id, 2048):
        real += batch.real_tokens
        total += batch.total_tokens
        rows += batch.tensors["input_ids"].shape[0]
    return [["packed conversations, seq 2048, batch 8", str(conversations), str(rows), f"{real / total:.1%}"]]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/lowmem_data_sources")
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--only", default="rss,speed,packing")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_pass(*json.loads(args.child))))
        return 0
    if args.quick:
        args.rows, args.batches, args.conversations = min(args.rows, 30_000), min(args.batches, 20), 100
    os.makedirs(args.workdir, exist_ok=True)
    tokenizer_dir = make_tokenizer(args.workdir)
    print(f"command: python bench/data_sources.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if "rss" in args.only:
        print(table(["data", "peak RSS MiB", "anon MiB", "tokens/s", "vs 1 file"],
                    part_rss(args.workdir, tokenizer_dir, args.rows, args.batches)))
    if "speed" in args.only:
        print(table(["reader", "seq", "real tokens/s, one core"],
                    part_speed(args.workdir, tokenizer_dir, max(args.rows // 4, 5000), args.batches)))
    if "packing" in args.only:
        print(table(["what", "conversations", "rows", "real tokens"], part_packing(tokenizer_dir, args.conversations)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
