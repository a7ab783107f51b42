"""Loader throughput alone (no model) on one CPU core: can the data layer feed a GPU?

    python bench/data_throughput.py            # ~2 min: 10 s per configuration
    python bench/data_throughput.py --quick    # CI size (< 30 s)
    python bench/data_throughput.py --seconds=20 --workdir=/tmp/lowmem_bench --json_out=t.json

Sources, each turned into batches by lowmem.data.batches.batches_from exactly as the training loop does
(without the Prefetcher thread, which only moves the same work off the loop's thread):
  parquet prompt/response  ParquetRows (window-shuffled row groups, buffer 10000) -> SampleEncoder
                           (chat template, loss mask, on-the-fly tokenization) -> pad to the batch's longest;
                           short rows (~90 characters, ~50 tokens), the files of bench/data_memory.py
  parquet text (long docs) the same on a `text` column of ~2000-word documents, truncated to the sequence
  memmap windows           TokenWindows over a 100M-token uint16 .bin (random non-overlapping windows)
at seq 2048 (batch 8) and seq 512 (batch 32): 16384 token positions per batch.

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
    from lowmem.data.batches import batches_from

    stream = batches_from(source.iter_shard(0, 0, 1, 0), encoder, batch_size, pad_id)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/lowmem_bench")
    parser.add_argument("--quick", action="store_true", help="CI size (< 30 s): small files, 1 s per configuration")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per configuration (default 10; 1 quick)")
    parser.add_argument("--no_taskset", action="store_true", help="do not re-run under taskset -c 0")
    parser.add_argument("--json_out", default="")
    args = parser.parse_args()
    pinning = "not pinned" if args.no_taskset else pin_to_one_core()
    for key, value in ONE_CORE_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(1)
    from data_memory import human, make_parquet, make_token_file, make_tokenizer, table, tokenizer_ids

    from lowmem.data.batches import SampleEncoder
    from lowmem.data.stream import ParquetRows, TokenWindows
    from lowmem.tokenizer import load_tokenizer

    log = lambda msg: print(f"[data_throughput {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    seconds = args.seconds or (1.0 if args.quick else 10.0)
    work = os.path.abspath(os.path.join(args.workdir, "quick") if args.quick else args.workdir)
    rows, tokens, docs = (20_000, 2_000_000, 200) if args.quick else (1_000_000, 100_000_000, 3000)
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    started = time.time()
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
        sources = [("parquet prompt/response (short rows)", lambda: ParquetRows(short, 10000, seed=42)),
                   ("parquet text (long docs)", lambda: ParquetRows(long_docs, 10000, seed=42)),
                   ("memmap windows (.bin)", lambda: TokenWindows(bin_path, seq, seed=42))]
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
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    text = table(table_rows, ["source", "seq", "batch", "samples/s", "tokens/s (real)", "tokens/s (padded)",
                              "real fraction", "tokens/sample", "vs 125k tok/s", "batches", "s"])
    memmap = [r for r in results if r["source"].startswith("memmap")]
    verdicts = [f"- memmap windows seq {r['seq']}: {r['tokens_per_s'] / 1e3:,.0f}k tokens/s = "
                f"{r['tokens_per_s'] / H100_TOKENS_PER_S:.1f}x of 125k -> target >= 3x: "
                f"{'met' if r['tokens_per_s'] >= MEMMAP_TARGET else 'NOT met'}" for r in memmap]
    print()
    print(f"# data_throughput ({datetime.date.today()}; {pinning}; torch threads {torch.get_num_threads()}; "
          f"load average before {load_before}, after {load_after}; total {time.time() - started:.0f} s)")
    print()
    print(text)
    print("\n".join(verdicts))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"pinning": pinning, "load_before": load_before, "load_after": load_after,
                       "results": results, "table": text, "verdicts": verdicts}, f, indent=1)


if __name__ == "__main__":
    main()
