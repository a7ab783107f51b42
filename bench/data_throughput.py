"""Loader throughput alone (no model) on one CPU core: can the data layer feed a GPU?

    python bench/data_throughput.py            # ~2 min: 10 s per configuration
    python bench/data_throughput.py --quick    # CI size (< 30 s)
    python bench/data_throughput.py --seconds=20 --workdir=/tmp/lowmem_bench --json_out=t.json
    python bench/data_throughput.py --only=sft_encoding   # the SFT encoders alone (~80 s)

Sources, each turned into batches by lowmem.data.batches.batches_from exactly as the training loop does
(without the Prefetcher thread, which only moves the same work off the loop's thread):
  parquet prompt/response  the parquet reader of lowmem.data.sources (window-shuffled row groups, buffer
                           10000) -> lowmem.data.encoding.SampleEncoder
                           (chat template, loss mask, on-the-fly tokenization) -> pad to the batch's longest;
                           short rows (~90 characters, ~50 tokens), the files of bench/data_memory.py
  parquet text (long docs) the same on a `text` column of ~2000-word documents, truncated to the sequence
  memmap windows           TokenWindows over a 100M-token uint16 .bin (random non-overlapping windows)
at seq 2048 (batch 8) and seq 512 (batch 32): 16384 token positions per batch.

sft_encoding (--only=sft_encoding): on-the-fly SFT encoding, the old per-sample path (encode_example
on each row, what lowmem.data.batches.SampleEncoder did) against lowmem.data.encoding's
SampleEncoder.encode_many on groups of --encode_group samples (one batched tokenizer call a group).
Rows are read from parquet with pyarrow, 1024 at a time (timed too), and padded to the batch's longest
with batches.collate: the short prompt/response rows above, and conversations (OpenAI `messages`, a
system message in half of them, 1..8 exchanges) under the project's ChatML template, also with the
template's Jinja forced instead of concatenation. --rounds interleaved runs of --seconds/--rounds each;
the best of each configuration is kept (other processes' load hits every configuration alike).

One core: the process re-runs itself under `taskset -c 0` (when taskset exists), with
torch.set_num_threads(1), TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1, OMP_NUM_THREADS=1.
tokens/s counts real (non-padding) tokens; 'padded' counts every position of the batch. The first
batch of each configuration is a warm-up and not timed. The files are in the page cache (just
generated or read), so disk speed is not measured.

Reference: one H100 trains a 0.35B model at about 125k tokens/s (bench/RESULTS.md, DESIGN.md);
the target is memmap windows >= 3x that (375k tokens/s) on one core.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for _p in (REPO, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)
ONE_CORE_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
H100_TOKENS_PER_S = 125_000
MEMMAP_TARGET = 3 * H100_TOKENS_PER_S
OLD_SFT_TOKENS_PER_S = 175_000  # the per-sample SampleEncoder on short prompt/response rows (RESULTS.md, 2026-11-23)
PINNED_FLAG = "LOWMEM_BENCH_PINNED"


def pin_to_one_core() -> str:
    """Re-exec under taskset -c 0 once; returns a description of how the process is limited."""
    for key, value in ONE_CORE_ENV.items():
        os.environ[key] = value
    if os.environ.get(PINNED_FLAG) != "1" and shutil.which("taskset"):
        os.environ[PINNED_FLAG] = "1"
        os.execvp("taskset", ["taskset", "-c", "0", sys.executable, *sys.argv])
    cpus = sorted(os.sched_getaffinity(0))
    return f"cpus {cpus} (taskset)" if os.environ.get(PINNED_FLAG) == "1" else f"cpus {cpus} (no taskset)"


def make_text_parquet(path: str, n_docs: int, words_per_doc: int = 2000, seed: int = 3, log=print) -> str:
    """A `text` parquet of long documents of pseudo-words, written one row group (100 docs) at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(path):
        try:
            if pq.ParquetFile(path).metadata.num_rows == n_docs:
                return path
        except Exception:
            pass
    from data_memory import _pools

    rng = np.random.default_rng(seed)
    phrases = _pools(seed)["q1"].to_pylist()  # phrases of 3..9 words
    writer, done, start = None, 0, time.time()
    tmp = path + ".tmp"
    while done < n_docs:
        n = min(100, n_docs - done)
        picks = rng.integers(0, len(phrases), size=(n, words_per_doc // 6)).tolist()
        docs = [". ".join(phrases[i] for i in row) + "." for row in picks]
        table = pa.table({"text": pa.array(docs, type=pa.string())})
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema, compression="snappy", use_dictionary=False)
        writer.write_table(table, row_group_size=100)
        done += n
    writer.close()
    os.replace(tmp, path)
    log(f"generated {path}: {n_docs} documents, {os.path.getsize(path) / 2**20:.0f} MiB, {time.time() - start:.1f}s")
    return path


def measure(source, encoder, seq: int, batch_size: int, pad_id: int, seconds: float, max_batches: int) -> dict:
    from lowmem.data.batches import batches_from, encode_stream
    from lowmem.data.stream import Shard, iter_shard

    stream = batches_from(encode_stream(iter_shard(source, 0, Shard()), encoder), batch_size, pad_id)
    first_start = time.perf_counter()
    next(stream)  # warm-up: lazy imports, first window read
    first_s = time.perf_counter() - first_start
    samples = real = padded = batches = 0
    start = time.perf_counter()
    for batch in stream:
        samples += batch.samples
        real += batch.real_tokens
        padded += batch.total_tokens
        batches += 1
        if batches >= max_batches or time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"seq": seq, "batch": batch_size, "batches": batches, "seconds": round(elapsed, 2),
            "first_batch_s": round(first_s, 3), "samples_per_s": samples / elapsed, "tokens_per_s": real / elapsed,
            "padded_tokens_per_s": padded / elapsed, "real_fraction": real / max(1, padded),
            "mean_real_tokens_per_sample": real / max(1, samples)}


def sft_conversation_rows(pools, rng, n: int) -> list[list[dict]]:
    """n conversations: a system message in half of them, 1..8 exchanges of short questions and answers."""
    def phrase(name):
        return pools[name][int(rng.integers(0, len(pools[name])))].as_py()

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": phrase("q2")}] if rng.random() < 0.5 else []
        for _ in range(int(rng.integers(1, 9))):
            question = f"{phrase('q1')} {int(rng.integers(0, 10**6))} {phrase('q2')}?"
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": f"{phrase('r1')} {phrase('r2')}. {phrase('r1')}."})
        rows.append(messages)
    return rows


def make_chat_parquet(path: str, n_rows: int, seed: int = 5, log=print) -> str:
    """A `messages` parquet (OpenAI format, list<struct<role, content>>) in row groups of 10k conversations."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(path) and pq.ParquetFile(path).metadata.num_rows == n_rows:
        return path
    from data_memory import ROWS_PER_GROUP, _pools

    pools, rng, start = _pools(seed), np.random.default_rng(seed + 1), time.time()
    writer, done, tmp = None, 0, path + ".tmp"
    while done < n_rows:
        n = min(ROWS_PER_GROUP, n_rows - done)
        table = pa.table({"messages": sft_conversation_rows(pools, rng, n)})
        writer = writer or pq.ParquetWriter(tmp, table.schema, compression="snappy", use_dictionary=False)
        writer.write_table(table, row_group_size=ROWS_PER_GROUP)
        done += n
    writer.close()
    os.replace(tmp, path)
    log(f"generated {path}: {n_rows} conversations, {os.path.getsize(path) / 2**20:.0f} MiB, "
        f"{time.time() - start:.1f}s")
    return path


def parquet_rows(path: str):
    """Rows of a parquet file as dicts, read 1024 at a time, round and round (the read is timed too)."""
    import pyarrow.parquet as pq

    while True:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def old_encoding(tokenizer, seq: int):
    """The group encoded one row at a time by encode_example, as lowmem.data.batches.SampleEncoder did until
    it was replaced by lowmem.data.encoding (same checks, same calls, same tensors)."""
    import torch

    from lowmem.data.encoding import Encoded
    from lowmem.data.template import encode_example

    def encode(group):
        encoded = []
        for sample in group:
            prompt, response = sample.get("prompt"), sample.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
                continue
            example = encode_example(tokenizer, prompt, response, seq)
            if example is not None:
                encoded.append(Encoded(torch.tensor(example.input_ids), torch.tensor(example.labels)))
        return encoded

    return encode


def new_encoding(encoder):
    """The group encoded with one SampleEncoder.encode_many call of lowmem.data.encoding."""
    from lowmem.data.encoding import Encoded

    def encode(group):
        return [e for e in encoder.encode_many(group, list(range(len(group)))) if isinstance(e, Encoded)]

    return encode


def measure_sft(encode_group, rows, batch_size: int, group_size: int, pad_id: int, seconds: float) -> dict:
    """Rows -> encode a group -> pad batches of batch_size (lowmem.data.batches.collate), for `seconds`."""
    from lowmem.data.batches import collate

    encode_group([next(rows) for _ in range(group_size)])  # warm-up: template probe, lazy imports
    samples = real = batches = 0
    pending: list[dict] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pending += encode_group([next(rows) for _ in range(group_size)])
        while len(pending) >= batch_size:
            batch = collate(pending[:batch_size], pad_id, False, position=0)
            pending = pending[batch_size:]
            samples, real, batches = samples + batch.samples, real + batch.real_tokens, batches + 1
    elapsed = time.perf_counter() - start
    return {"batches": batches, "seconds": elapsed, "samples_per_s": samples / elapsed, "tokens_per_s": real / elapsed,
            "mean_real_tokens_per_sample": real / max(1, samples)}


def run_sft_encoding(args, work: str, seconds: float, log) -> tuple[list[dict], str, list[str]]:
    """On-the-fly SFT encoding, old per-sample encoder against encode_many; best of `rounds` interleaved runs."""
    from data_memory import human, make_parquet, make_tokenizer, table

    from lowmem.data.encoding import SampleEncoder
    from lowmem.data.tokenizer import load_tokenizer

    rows = 20_000 if args.quick else 1_000_000
    pairs = make_parquet(os.path.join(work, f"pr_{human(rows)}.parquet"), rows, log=log)
    chats = make_chat_parquet(os.path.join(work, f"chat_{human(rows // 10)}.parquet"), rows // 10, log=log)
    tokenizer = load_tokenizer(make_tokenizer(os.path.join(work, "tokenizer"), pairs))
    configs = []
    for seq in (512, 2048):
        configs += [("prompt/response", "old (encode_example per row)", seq, pairs, old_encoding(tokenizer, seq)),
                    ("prompt/response", "new (encode_many)", seq, pairs, new_encoding(SampleEncoder(tokenizer, seq))),
                    ("conversations", "new (encode_many)", seq, chats, new_encoding(SampleEncoder(tokenizer, seq))),
                    ("conversations", "new, Jinja path forced", seq, chats,
                     new_encoding(SampleEncoder(tokenizer, seq, render_with_jinja=True)))]
    best: dict[int, dict] = {}
    streams = {path: parquet_rows(path) for path in (pairs, chats)}
    for _ in range(args.rounds):  # interleaved: load from other processes hits every configuration alike
        for i, (data, encoder, seq, path, encode) in enumerate(configs):
            res = measure_sft(encode, streams[path], 16384 // seq, args.encode_group, tokenizer.pad_token_id,
                              seconds / args.rounds)
            if i not in best or res["tokens_per_s"] > best[i]["tokens_per_s"]:
                best[i] = {**res, "data": data, "encoder": encoder, "seq": seq, "batch": 16384 // seq}
    results = [best[i] for i in range(len(configs))]
    for r in results:
        log(f"{r['data']} / {r['encoder']} seq {r['seq']}: {r['tokens_per_s'] / 1e3:.0f}k tokens/s")
    old = {r["seq"]: r["tokens_per_s"] for r in results if r["encoder"].startswith("old")}
    table_rows = [[r["data"], r["encoder"], r["seq"], r["batch"], f"{r['samples_per_s']:,.0f}",
                   f"{r['tokens_per_s'] / 1e3:,.0f}k", f"{r['mean_real_tokens_per_sample']:.0f}",
                   f"{r['tokens_per_s'] / old[r['seq']]:.2f}x" if r["data"] == "prompt/response" else "-"]
                  for r in results]
    text = table(table_rows, ["data", "encoder", "seq", "batch", "samples/s", "tokens/s (real)", "tokens/sample",
                              "vs old"])
    verdicts = [f"- prompt/response seq {r['seq']}: new {r['tokens_per_s'] / 1e3:,.0f}k tokens/s = "
                f"{r['tokens_per_s'] / old[r['seq']]:.2f}x the old path in this run -> target >= 2x: "
                f"{'met' if r['tokens_per_s'] >= 2 * old[r['seq']] else 'NOT met'}; "
                f"{r['tokens_per_s'] / OLD_SFT_TOKENS_PER_S:.2f}x the 175k measured on 2026-11-23"
                for r in results if r["data"] == "prompt/response" and r["encoder"].startswith("new")]
    return results, text, verdicts


def run_loaders(args, work: str, seconds: float, log) -> tuple[list[dict], str, list[str]]:
    from data_memory import human, make_parquet, make_token_file, make_tokenizer, table, tokenizer_ids

    from lowmem.data.encoding import SampleEncoder
    from lowmem.data.options import DataOptions
    from lowmem.data.sources import open_dataset, parse_data_arg
    from lowmem.data.stream import TokenWindows
    from lowmem.data.tokenizer import load_tokenizer

    rows, tokens, docs = (20_000, 2_000_000, 200) if args.quick else (1_000_000, 100_000_000, 3000)
    short = make_parquet(os.path.join(work, f"pr_{human(rows)}.parquet"), rows, log=log)
    tok_dir = make_tokenizer(os.path.join(work, "tokenizer"), short)
    vocab, eos = tokenizer_ids(tok_dir)
    bin_path = make_token_file(os.path.join(work, f"tok_{human(tokens)}"), tokens, vocab, eos, log=log)
    long_docs = make_text_parquet(os.path.join(work, f"text_long_{docs}.parquet"), docs, log=log)
    tokenizer = load_tokenizer(tok_dir)
    pad = tokenizer.pad_token_id

    results, table_rows = [], []
    for seq in (2048, 512):
        batch_size = 16384 // seq
        encoder = SampleEncoder(tokenizer, seq, source="bench")

        def parquet_source(path: str):  # the training data path's reader: window-shuffled row groups
            settings = DataOptions(buffer_size=10000, seed=42)
            return open_dataset(parse_data_arg(path, "train_file")[0], settings, tokenizer).source

        sources = [("parquet prompt/response (short rows)", lambda: parquet_source(short)),
                   ("parquet text (long docs)", lambda: parquet_source(long_docs)),
                   ("memmap windows (.bin)", lambda: TokenWindows([bin_path], seq, seed=42))]
        for name, build in sources:
            res = measure(build(), encoder, seq, batch_size, pad, seconds, max_batches=10**9)
            res["source"] = name
            results.append(res)
            log(f"{name} seq {seq}: {res['samples_per_s']:.0f} samples/s, {res['tokens_per_s'] / 1e3:.0f}k tokens/s")
            ratio = res["tokens_per_s"] / H100_TOKENS_PER_S
            table_rows.append([name, seq, batch_size, f"{res['samples_per_s']:,.0f}",
                               f"{res['tokens_per_s'] / 1e3:,.0f}k", f"{res['padded_tokens_per_s'] / 1e3:,.0f}k",
                               f"{res['real_fraction']:.2f}", f"{res['mean_real_tokens_per_sample']:.0f}",
                               f"{ratio:.1f}x", res["batches"], f"{res['seconds']:.1f}"])
    text = table(table_rows, ["source", "seq", "batch", "samples/s", "tokens/s (real)", "tokens/s (padded)",
                              "real fraction", "tokens/sample", "vs 125k tok/s", "batches", "s"])
    memmap = [r for r in results if r["source"].startswith("memmap")]
    verdicts = [f"- memmap windows seq {r['seq']}: {r['tokens_per_s'] / 1e3:,.0f}k tokens/s = "
                f"{r['tokens_per_s'] / H100_TOKENS_PER_S:.1f}x of 125k -> target >= 3x: "
                f"{'met' if r['tokens_per_s'] >= MEMMAP_TARGET else 'NOT met'}" for r in memmap]
    return results, text, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/lowmem_bench")
    parser.add_argument("--quick", action="store_true", help="CI size (< 30 s): small files, 1 s per configuration")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timed seconds per configuration (default 10; 1 quick)")
    parser.add_argument("--only", choices=["loaders", "sft_encoding"], default=None, help="run one part (default both)")
    parser.add_argument("--rounds", type=int, default=3, help="sft_encoding: interleaved rounds, best one kept")
    parser.add_argument("--encode_group", type=int, default=64, help="sft_encoding: samples per encode_many call")
    parser.add_argument("--no_taskset", action="store_true", help="do not re-run under taskset -c 0")
    parser.add_argument("--json_out", default="")
    args = parser.parse_args()
    pinning = "not pinned" if args.no_taskset else pin_to_one_core()
    for key, value in ONE_CORE_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(1)
    log = lambda msg: print(f"[data_throughput {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    seconds = args.seconds or (1.0 if args.quick else 10.0)
    work = os.path.abspath(os.path.join(args.workdir, "quick") if args.quick else args.workdir)
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    started = time.time()
    parts = {"loaders": run_loaders, "sft_encoding": run_sft_encoding}
    outputs = {name: run(args, work, seconds, log) for name, run in parts.items() if args.only in (None, name)}
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    print()
    print(f"# data_throughput ({datetime.date.today()}; {pinning}; torch threads {torch.get_num_threads()}; "
          f"load average before {load_before}, after {load_after}; total {time.time() - started:.0f} s)")
    for name, (_, text, verdicts) in outputs.items():
        print(f"\n## {name}\n\n{text}")
        print("\n".join(verdicts))
    if args.json_out:
        record = {"pinning": pinning, "load_before": load_before, "load_after": load_after}
        for name, (results, text, verdicts) in outputs.items():  # the loaders' keys stay at the top, as before
            part = {"results": results, "table": text, "verdicts": verdicts}
            record.update(part if name == "loaders" else {name: part})
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
