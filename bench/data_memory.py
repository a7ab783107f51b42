"""Host memory of the data layer: does peak RSS stay flat as the data file grows 10x?

    python bench/data_memory.py              # 1M/10M-row parquet, 10M/100M-token files (~10 min on 2 cores)
    python bench/data_memory.py --quick      # CI size: 20k/200k rows, 200k/2M tokens, no trainer runs;
                                             # 5 measured processes of ~4 s CPU each (< 30 s)
    python bench/data_memory.py --workdir=/tmp/x --max_steps=50 --json_out=results.json

1. Generates, once, into --workdir (kept; a file is reused when its size matches):
   - prompt/response parquet files of N and 10N short rows (~90 characters), row groups of 10k rows,
     written one row group at a time with pyarrow.parquet.ParquetWriter (generation holds one group);
   - a byte-level BPE tokenizer (lowmem.data.tokenizer.train_bpe_tokenizer, 2000 entries) trained on 20k rows;
   - packed token files of T and 10T tokens in the format lowmem.data.token_file.TokenFile reads
     (`<prefix>.bin` little-endian uint16 ids + `<prefix>.json` index), written in 8M-token chunks.
2. Real training runs (not with --quick): `python train_low_mem.py train --model_preset=tiny
   --max_steps=50 --dataloader_buffer_size=10000 ...` on CPU, one fresh subprocess per file; peak RSS
   is the kernel's high-water mark of the process (os.wait4 ru_maxrss) and, as a check, psutil
   polling of the process tree every 50 ms.
3. The loop's data path alone (TrainData.epoch, no model) for --data_batches batches of 32, so that
   several 10k-row windows are read and dropped: RSS after the first batch, at the end, and peak,
   split into anonymous memory and mapped file pages (/proc/self/status RssAnon / RssFile).
4. Time and memory to the first batch of 32, fresh subprocess each: pandas.read_parquet of the whole
   file (then SampleEncoder on its first 32 rows) against the streaming reader -> SampleEncoder -> batches_from.
   Both import torch, pandas, pyarrow and load the tokenizer before the clock starts ('RSS before').
5. Row-group layout: the data path on the 1x parquet as written (10k-row groups) and rewritten as one
   row group (what pyarrow/pandas write by default for up to 1Mi rows).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
if REPO not in sys.path:
    sys.path.insert(0, REPO)
for _key, _value in (("TQDM_DISABLE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_key, _value)

ROWS_PER_GROUP = 10_000
TOKENIZER_VOCAB = 2000
MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# synthetic data, generated streaming
# ----------------------------------------------------------------------------------------------
def _word_pool(rng, words: list[str], n_phrases: int, lo: int, hi: int):
    """n_phrases phrases of lo..hi words drawn from `words` (as a pyarrow string array)."""
    import pyarrow as pa

    picks = rng.integers(0, len(words), size=(n_phrases, hi)).tolist()
    lengths = rng.integers(lo, hi + 1, size=n_phrases).tolist()
    return pa.array([" ".join(words[i] for i in row[:k]) for row, k in zip(picks, lengths)], type=pa.string())


def _pools(seed: int = 0):
    """Four pools of 20k phrases; a row joins one phrase of two pools each (4e8 distinct prompts)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ra", "to", "vi", "de", "pa", "shu", "gen", "tor", "bel",
                 "an", "es", "or", "im", "ul", "qua", "zen", "ri", "fo", "ba", "wy", "ch", "th", "ing"]
    parts = rng.integers(0, len(syllables), size=(3000, 3)).tolist()
    words = ["".join(syllables[i] for i in row[: 1 + j % 3]) for j, row in enumerate(parts)]
    return {"q1": _word_pool(rng, words, 20000, 3, 9), "q2": _word_pool(rng, words, 20000, 2, 8),
            "r1": _word_pool(rng, words, 20000, 2, 6), "r2": _word_pool(rng, words, 20000, 1, 5)}


def _row_group(pools, rng, n: int):
    """n prompt/response rows: prompt = 'phrase <number> phrase?', response = 'phrase phrase.' (~90 chars a row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def pick(name):
        return pools[name].take(pa.array(rng.integers(0, len(pools[name]), size=n)))

    number = pa.array(rng.integers(0, 1_000_000, size=n)).cast(pa.string())
    prompt = pc.binary_join_element_wise(pick("q1"), number, pc.binary_join_element_wise(pick("q2"), "?", ""), " ")
    response = pc.binary_join_element_wise(pick("r1"), pc.binary_join_element_wise(pick("r2"), ".", ""), " ")
    return pa.table({"prompt": prompt, "response": response})


def make_parquet(path: str, n_rows: int, seed: int = 0, log=print) -> str:
    """A prompt/response parquet of n_rows rows in row groups of ROWS_PER_GROUP, written one group at a time."""
    import numpy as np
    import pyarrow.parquet as pq

    if os.path.isfile(path):
        try:
            if pq.ParquetFile(path).metadata.num_rows == n_rows:
                return path
        except Exception:
            pass
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    start = time.time()
    pools, rng = _pools(seed), np.random.default_rng(seed + 1)
    tmp = path + ".tmp"
    writer = None
    done = 0
    while done < n_rows:
        table = _row_group(pools, rng, min(ROWS_PER_GROUP, n_rows - done))
        if writer is None:
            # no dictionary: random rows would not gain from it, and real prompt/response text does not either
            writer = pq.ParquetWriter(tmp, table.schema, compression="snappy", use_dictionary=False)
        writer.write_table(table, row_group_size=ROWS_PER_GROUP)
        done += table.num_rows
    writer.close()
    os.replace(tmp, path)
    log(f"generated {path}: {n_rows} rows, {os.path.getsize(path) / MiB:.0f} MiB, {time.time() - start:.1f}s")
    return path


def make_one_group_copy(src: str, dst: str, log=print) -> str:
    """`src` rewritten as a single row group (holds the whole table in memory once, ~0.1 GB for 1M short rows)."""
    import pyarrow.parquet as pq

    if os.path.isfile(dst) and pq.ParquetFile(dst).metadata.num_row_groups == 1:
        return dst
    table = pq.read_table(src)
    pq.write_table(table, dst + ".tmp", row_group_size=table.num_rows, compression="snappy", use_dictionary=False)
    os.replace(dst + ".tmp", dst)
    log(f"generated {dst}: {table.num_rows} rows in one row group")
    return dst


def make_tokenizer(out_dir: str, sample_file: str, n_rows: int = 20000) -> str:
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    import pyarrow.parquet as pq

    from lowmem.data.tokenizer import train_bpe_tokenizer

    table = pq.ParquetFile(sample_file).read_row_group(0)
    rows = table.slice(0, n_rows)
    texts = [p + " " + r for p, r in zip(rows.column("prompt").to_pylist(), rows.column("response").to_pylist())]
    train_bpe_tokenizer(texts, TOKENIZER_VOCAB, out_dir)
    return out_dir


def tokenizer_ids(tokenizer_dir: str) -> tuple[int, int]:
    """(vocab_size, eos_id) of a saved tokenizer, read from its files without importing transformers."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    ids = dict(spec["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return max(ids.values()) + 1, ids["<|endoftext|>"]


def make_token_file(prefix: str, n_tokens: int, vocab_size: int, eos_id: int, seed: int = 0,
                    chunk: int = 8_000_000, log=print) -> str:
    """`<prefix>.bin` (uint16) + `<prefix>.json`: random ids with an eos every 50..1000 tokens, in chunks."""
    import numpy as np

    index_path, bin_path = prefix + ".json", prefix + ".bin"
    if os.path.isfile(index_path) and os.path.isfile(bin_path):
        with open(index_path) as f:
            old = json.load(f)
        if old.get("n_tokens") == n_tokens and old.get("complete") and os.path.getsize(bin_path) == 2 * n_tokens:
            return bin_path
    assert vocab_size <= 2**16
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    start = time.time()
    rng = np.random.default_rng(seed)
    written, n_docs, next_eos = 0, 0, int(rng.integers(50, 1001))
    with open(bin_path, "wb") as out:
        while written < n_tokens:
            n = min(chunk, n_tokens - written)
            ids = rng.integers(4, vocab_size, size=n, dtype=np.uint16)  # ids 0..3 are the special tokens
            # eos positions within this chunk (global offsets next_eos, next_eos + gap, ...)
            while next_eos < written + n:
                ids[next_eos - written] = eos_id
                n_docs += 1
                next_eos += int(rng.integers(50, 1001))
            ids.astype("<u2", copy=False).tofile(out)
            written += n
    index = {"format_version": 1, "dtype": "uint16", "n_tokens": int(n_tokens), "n_documents": n_docs,
             "vocab_size": int(vocab_size), "eos_token_id": int(eos_id), "tokenizer_dir": "",
             "source": "synthetic uniform ids (bench/data_memory.py)", "complete": True}
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
    log(f"generated {bin_path}: {n_tokens} tokens, {os.path.getsize(bin_path) / MiB:.0f} MiB, {time.time() - start:.1f}s")
    return bin_path


# ----------------------------------------------------------------------------------------------
# peak RSS of a subprocess
# ----------------------------------------------------------------------------------------------
def run_measured(cmd: list[str], log_path: str, env: dict | None = None, timeout: float = 900.0) -> dict:
    """Run cmd; return rc, wall time, peak RSS of the process (wait4 ru_maxrss) and of its tree (psutil polling)."""
    import psutil

    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak_tree = [0]
        done = threading.Event()

        def poll():
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.is_set():
                total = 0
                try:
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    break
                peak_tree[0] = max(peak_tree[0], total)
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child (and its waited-for descendants) only
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        poller.join()
    return {"rc": proc.returncode, "wall_s": round(time.time() - start, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "peak_tree_rss_mib": round(peak_tree[0] / MiB, 1)}


def train_command(train_file: str, tokenizer_dir: str, workdir: str, run_name: str, max_steps: int,
                  batch_size: int) -> list[str]:
    return [sys.executable, "train_low_mem.py", "train", f"--train_file={train_file}",
            f"--tokenizer_dir={tokenizer_dir}", "--model_preset=tiny", f"--max_steps={max_steps}",
            "--dataloader_buffer_size=10000", f"--batch_size_per_gpu={batch_size}", "--max_seq_len=128", "--epochs=1",
            "--report_to=none", "--validation_file=", "--test_file=", "--save_steps=100000",
            "--logging_steps=10", "--mixed_precision=no", f"--run_name={run_name}",
            f"--output_dir={workdir}/runs", f"--log_dir={workdir}/logs", "--overwrite_output_dir=True", "--warmup_steps=0"]


def child_env() -> dict:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
                TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")


# ----------------------------------------------------------------------------------------------
# first batch: pandas vs streaming (runs inside a fresh child process)
# ----------------------------------------------------------------------------------------------
def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MiB


def first_batch_child(mode: str, path: str, tokenizer_dir: str) -> dict:
    import torch  # noqa: F401  (the trainer has it loaded too; keep it out of the measured delta)

    from lowmem.data.batches import batches_from, encode_stream
    from lowmem.data.encoding import SampleEncoder
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    encoder = SampleEncoder(tokenizer, 128, source=path)
    import pandas as pd  # both modes import both readers, so the baseline is the same
    import pyarrow.parquet  # noqa: F401

    from lowmem.data.options import DataOptions
    from lowmem.data.sources import open_dataset, parse_data_arg
    from lowmem.data.stream import Shard, iter_shard
    if mode == "pandas_object":  # the pandas < 3.0 default: Python str objects in object columns
        pd.set_option("future.infer_string", False)
    baseline = _rss_mib()
    start = time.perf_counter()
    if mode.startswith("pandas"):
        frame = pd.read_parquet(path)
        head = frame.iloc[:32]
        samples = enumerate({"prompt": p, "response": r} for p, r in zip(head["prompt"], head["response"]))
        dtype = str(frame["prompt"].dtype)
    else:
        settings = DataOptions(buffer_size=10000, seed=42)
        rows = open_dataset(parse_data_arg(path, "train_file")[0], settings, tokenizer).source
        samples = iter_shard(rows, 0, Shard())
        dtype = "arrow window -> Python rows"
    batch = next(batches_from(encode_stream(samples, encoder), 32, tokenizer.pad_token_id))
    elapsed = time.perf_counter() - start
    hwm = _hwm_mib()
    return {"mode": mode, "first_batch_s": round(elapsed, 3), "baseline_rss_mib": round(baseline, 1),
            "rss_after_mib": round(_rss_mib(), 1), "peak_rss_mib": round(hwm, 1), "samples": batch.samples,
            "dtype": dtype}


def _status_mib() -> dict:
    """VmRSS, VmHWM (peak RSS), RssAnon (heap etc.) and RssFile (mapped file pages) of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _hwm_mib() -> float:
    return _status_mib()["VmHWM"]


def data_pass_child(path: str, tokenizer_dir: str, n_batches: int) -> dict:
    """The training loop's data path alone (TrainData.epoch: source -> SampleEncoder -> batches -> Prefetcher)."""
    from lowmem.data.options import DataOptions
    from lowmem.data.pipeline import TrainData
    from lowmem.data.sources import parse_inputs
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    options = DataOptions(max_seq_len=128, batch_size=32, buffer_size=10000)
    baseline = _status_mib()
    start = time.perf_counter()
    data = TrainData(parse_inputs(path, [], "", [], held_out_split=False), options, tokenizer, False, 0, 1,
                     pin_memory=False)
    from lowmem.data.stream import Shard

    batches = data.epoch(0, Shard(), 0)
    samples = tokens = 0
    first = None
    peak_anon = 0.0
    for i, batch in enumerate(batches):
        samples += batch.samples
        tokens += batch.real_tokens
        if i == 0:
            first = _status_mib()
        if i % 10 == 0:  # sampled: the Prefetcher thread may hold a little more between samples
            peak_anon = max(peak_anon, _status_mib()["RssAnon"])
        if i + 1 >= n_batches:
            break
    batches.close()
    elapsed = time.perf_counter() - start
    end = _status_mib()
    peak_anon = max(peak_anon, end["RssAnon"])
    return {"batches": i + 1, "samples": samples, "real_tokens": tokens, "s": round(elapsed, 2),
            "baseline_rss_mib": round(baseline["VmRSS"], 1), "rss_first_batch_mib": round(first["VmRSS"], 1),
            "rss_end_mib": round(end["VmRSS"], 1), "peak_rss_mib": round(end["VmHWM"], 1),
            "anon_before_mib": round(baseline["RssAnon"], 1), "anon_end_mib": round(end["RssAnon"], 1),
            "peak_anon_sampled_mib": round(peak_anon, 1), "file_end_mib": round(end["RssFile"], 1),
            "file_before_mib": round(baseline["RssFile"], 1)}


def measure_child(mode: str, path: str, tokenizer_dir: str, workdir: str, n_batches: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--child_file", path,
           "--tokenizer_dir", tokenizer_dir, "--child_batches", str(n_batches)]
    log_path = os.path.join(workdir, "logs", f"child_{mode}_{os.path.basename(path)}.log")
    outer = run_measured(cmd, log_path, child_env())
    with open(log_path) as f:
        lines = [line for line in f if line.startswith("CHILD_RESULT ")]
    if outer["rc"] != 0 or not lines:
        return {"mode": mode, "error": f"rc={outer['rc']}, see {log_path}"}
    result = json.loads(lines[-1][len("CHILD_RESULT "):])
    result["wait4_peak_rss_mib"] = outer["peak_rss_mib"]
    return result


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def human(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def _growth(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/lowmem_bench")
    parser.add_argument("--quick", action="store_true",
                        help="CI size (< 30 s once the files exist): small files, data-only runs, no trainer runs")
    parser.add_argument("--max_steps", type=int, default=50, help="optimizer steps per training run")
    parser.add_argument("--train_batch", type=int, default=8,
                        help="micro-batch of the training runs (8: a tiny-model step takes ~0.5 s on 2 loaded cores)")
    parser.add_argument("--rows", type=int, default=None, help="rows of the 1x parquet (default 1M; 20k quick)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens of the 1x token file (default 10M; 200k quick)")
    parser.add_argument("--data_batches", type=int, default=None,
                        help="batches of 32 in each data-only run (default 1500, i.e. 48k samples; 60 quick)")
    parser.add_argument("--train_runs", default=None, choices=("yes", "no"),
                        help="run the real trainer (default yes; no with --quick)")
    parser.add_argument("--only", default="train,data,first,layout",
                        help="comma list of sections to run: train (real trainer), data (data path alone), "
                             "first (first batch: pandas vs streaming), layout (one huge row group)")
    parser.add_argument("--skip_pandas_object", action="store_true", help="skip the pandas object-dtype variant")
    parser.add_argument("--json_out", default="", help="also write the results as JSON here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child_file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child_batches", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer_dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "data_pass":
            result = data_pass_child(args.child_file, args.tokenizer_dir, args.child_batches)
        else:
            result = first_batch_child(args.child, args.child_file, args.tokenizer_dir)
        print("CHILD_RESULT " + json.dumps(result), flush=True)
        return

    rows = args.rows or (20_000 if args.quick else 1_000_000)
    tokens = args.tokens or (200_000 if args.quick else 10_000_000)
    data_batches = args.data_batches or (60 if args.quick else 1500)
    sections = set(args.only.split(","))
    train_runs = (args.train_runs or ("no" if args.quick else "yes")) == "yes" and "train" in sections
    skip_object = args.skip_pandas_object or args.quick
    work = os.path.abspath(args.workdir if not args.quick else os.path.join(args.workdir, "quick"))
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    log = lambda msg: print(f"[data_memory {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    started = time.time()

    parquet = {k: make_parquet(os.path.join(work, f"pr_{human(n)}.parquet"), n, log=log)
               for k, n in (("1x", rows), ("10x", 10 * rows))}
    tok_dir = make_tokenizer(os.path.join(work, "tokenizer"), parquet["1x"])
    vocab, eos = tokenizer_ids(tok_dir)
    bins = {k: make_token_file(os.path.join(work, f"tok_{human(n)}"), n, vocab, eos, log=log)
            for k, n in (("1x", tokens), ("10x", 10 * tokens))}
    generate_s = time.time() - started
    formats = (("parquet prompt/response", "pq", parquet, rows, "rows"), ("token file (.bin)", "bin", bins, tokens, "tokens"))
    results: dict = {"rows": rows, "tokens": tokens, "max_steps": max_steps if (max_steps := args.max_steps) else 0,
                     "data_batches": data_batches, "load_before": load_before, "train": {}, "data_pass": {},
                     "first_batch": {}, "growth_pct": {}}
    report: list[str] = []

    # 1. real training runs
    if train_runs:
        table_rows = []
        for fmt, short, files, count, unit in formats:
            peaks = {}
            for scale, mult in (("1x", 1), ("10x", 10)):
                name = f"mem_{short}_{scale}"
                cmd = train_command(files[scale], tok_dir, work, name, max_steps, args.train_batch)
                log(f"train {fmt} {scale}: --train_file={files[scale]}")
                res = peaks[scale] = run_measured(cmd, os.path.join(work, "logs", name + ".log"), child_env())
                results["train"][f"{fmt} {scale}"] = res
                log(f"  {res}")
                growth = tree = ""
                if scale == "10x":
                    growth = _growth(res["peak_rss_mib"], peaks["1x"]["peak_rss_mib"])
                    tree = _growth(res["peak_tree_rss_mib"], peaks["1x"]["peak_tree_rss_mib"])
                    results["growth_pct"][f"train {fmt}"] = float(growth.rstrip("%"))
                table_rows.append([fmt, f"{human(count * mult)} {unit}", f"{os.path.getsize(files[scale]) / MiB:.0f}",
                                   f"{res['peak_rss_mib']:.0f}", f"{res['peak_tree_rss_mib']:.0f}", growth, tree,
                                   f"{res['wall_s']:.0f}", res["rc"]])
        report += [f"Real training runs: `train_low_mem.py train`, tiny preset, CPU, {max_steps} steps, batch {args.train_batch}, "
                   "seq 128, buffer 10000; a fresh process each:", "",
                   table(table_rows, ["format", "size", "file MiB", "peak RSS MiB (wait4)",
                                      "peak tree RSS MiB (psutil)", "growth vs 1x", "growth (psutil)", "wall s", "rc"]),
                   ""]

    # 2. the loop's data path alone, long enough to turn over several 10k-row windows
    table_rows = []
    for fmt, short, files, count, unit in formats if "data" in sections else ():
        peaks = {}
        for scale, mult in (("1x", 1), ("10x", 10)):
            log(f"data pass {fmt} {scale}")
            res = peaks[scale] = measure_child("data_pass", files[scale], tok_dir, work, data_batches)
            results["data_pass"][f"{fmt} {scale}"] = res
            log(f"  {res}")
            if "error" in res:
                table_rows.append([fmt, f"{human(count * mult)} {unit}", res["error"]] + [""] * 6)
                continue
            growth = anon_growth = ""
            if scale == "10x" and "error" not in peaks["1x"]:
                growth = _growth(res["peak_rss_mib"], peaks["1x"]["peak_rss_mib"])
                anon_growth = _growth(res["peak_anon_sampled_mib"], peaks["1x"]["peak_anon_sampled_mib"])
                results["growth_pct"][f"data pass {fmt} (RSS)"] = float(growth.rstrip("%"))
                results["growth_pct"][f"data pass {fmt} (anonymous RSS)"] = float(anon_growth.rstrip("%"))
            table_rows.append([fmt, f"{human(count * mult)} {unit}", f"{res['samples']}", f"{res['s']:.1f}",
                               f"{res['baseline_rss_mib']:.0f}", f"{res['rss_first_batch_mib']:.0f}",
                               f"{res['rss_end_mib']:.0f}", f"{res['peak_rss_mib']:.0f}", growth,
                               f"{res['anon_before_mib']:.0f} -> {res['peak_anon_sampled_mib']:.0f}", anon_growth,
                               f"{res['file_before_mib']:.0f} -> {res['file_end_mib']:.0f}"])
    report += [] if not table_rows else [f"The loop's data path alone (TrainData.epoch: source -> SampleEncoder -> batches_from -> Prefetcher, "
               f"depth 8), {data_batches} batches of 32, seq 128, buffer 10000, no model; a fresh process each. "
               "'before' = after importing torch and loading the tokenizer. RSS = anonymous (heap, arrays) + "
               "file-backed (mapped pages of libraries and of the memmap):", "",
               table(table_rows, ["format", "size", "samples read", "s", "RSS before MiB", "RSS after 1st batch MiB",
                                  "RSS at end MiB", "peak RSS MiB", "peak growth vs 1x", "anon RSS MiB before -> peak",
                                  "anon growth vs 1x", "file RSS MiB before -> end"]), ""]

    # 3. first batch: pandas vs streaming
    # --quick: pandas only (the streaming path already ran in section 2), to stay under 30 s
    modes = (["pandas"] if args.quick else ["stream", "pandas"]) + ([] if skip_object else ["pandas_object"])
    labels = {"stream": "ParquetRows streaming", "pandas": "pandas.read_parquet",
              "pandas_object": "pandas.read_parquet, object dtype"}
    table_rows = []
    for scale, mult in () if "first" not in sections else (("10x", 10),) if args.quick else (("1x", 1), ("10x", 10)):
        for mode in modes:
            log(f"first batch {mode} {scale}")
            res = measure_child(mode, parquet[scale], tok_dir, work)
            results["first_batch"][f"{mode} {scale}"] = res
            log(f"  {res}")
            if "error" in res:
                table_rows.append([human(rows * mult), labels[mode], res["error"], "", "", "", ""])
                continue
            table_rows.append([human(rows * mult), labels[mode], res["dtype"], f"{res['first_batch_s']:.2f}",
                               f"{res['baseline_rss_mib']:.0f}", f"{res['peak_rss_mib']:.0f}",
                               f"{res['peak_rss_mib'] - res['baseline_rss_mib']:.0f}"])
    report += [] if not table_rows else ["Time and memory to the first batch of 32 (fresh process each; 'before' = after importing torch, "
               "pandas, pyarrow and loading the tokenizer):", "",
               table(table_rows, ["rows", "reader", "column type", "time to first batch s", "RSS before MiB",
                                  "peak RSS MiB", "added by reading MiB"]), ""]

    # 4. a file not written by `prepare`: the same 1x rows in one row group (pyarrow's default row group is
    # 1Mi rows, so a 1M-row file from pandas.to_parquet has one); a window cannot be smaller than a row group
    if "layout" in sections and not args.quick:
        one_group = make_one_group_copy(parquet["1x"], os.path.join(work, f"pr_{human(rows)}_one_group.parquet"), log)
        table_rows = []
        for label, path in (("row groups of 10k rows", parquet["1x"]), ("one row group", one_group)):
            log(f"data pass {label}")
            res = measure_child("data_pass", path, tok_dir, work, data_batches)
            results["layout"] = results.get("layout", {}) | {label: res}
            log(f"  {res}")
            if "error" in res:
                table_rows.append([label, res["error"]] + [""] * 4)
                continue
            table_rows.append([label, f"{res['samples']}", f"{res['s']:.1f}", f"{res['baseline_rss_mib']:.0f}",
                               f"{res['peak_rss_mib']:.0f}", f"{res['peak_rss_mib'] - res['baseline_rss_mib']:.0f}"])
        report += [f"Row-group layout, {human(rows)}-row prompt/response parquet, the data path alone as above "
                   f"({data_batches} batches of 32, buffer 10000):", "",
                   table(table_rows, ["file layout", "samples read", "s", "RSS before MiB", "peak RSS MiB",
                                      "added MiB"]), ""]

    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    results.update({"load_after": load_after, "generate_s": round(generate_s, 1),
                    "total_s": round(time.time() - started, 1), "report": report})
    print()
    print(f"# data_memory ({datetime.date.today()}; load average before {load_before}, after {load_after}; "
          f"generation {generate_s:.0f} s, total {time.time() - started:.0f} s)")
    print()
    print("\n".join(report))
    for key, g in results["growth_pct"].items():
        print(f"- {key}: peak RSS 10x vs 1x {g:+.1f}% -> target < 10%: {'met' if g < 10 else 'NOT met'}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
