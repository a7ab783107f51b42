"""Packed token files for pretraining: tokenize text to `<prefix>.bin` + `<prefix>.json`, and read them.

`<prefix>.bin` is a flat array of token ids, little-endian uint16 when every id fits (vocab_size
<= 65536) else uint32: each document's tokens followed by the tokenizer's eos id. The input is
a parquet column, jsonl objects' field, or a .txt file with one document per line (blank lines
are skipped; use jsonl or parquet for documents that contain newlines). Special-token text inside
a document (e.g. a literal "<|endoftext|>") is tokenized as plain text, so the only eos ids are
the document separators.

`<prefix>.json` is the index: format_version, dtype, n_tokens, n_documents, vocab_size,
eos_token_id, max_token_id (the largest id written, checked against the model before training),
tokenizer_dir, source, complete, plus what resume needs (the settings below and
chunks_done / rows_done / skipped). The source is cut into chunks of chunk_rows source rows;
after each chunk the .bin is flushed and fsynced, then the index is replaced atomically. A run
that finds an incomplete index with the same settings truncates the .bin to the recorded size and
continues at the next chunk, so the result is byte-identical to an uninterrupted run. Chunks
are encoded by a pool of worker processes but written in source order, so the bytes do not
depend on the worker count.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import deque

import numpy as np

from ..run.errors import UserError
from .rawio import describe_skips, file_format, iter_batches, merge_skips

FORMAT_VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_CHUNK_ROWS = 2000
# an index must name these settings exactly for a run to resume it instead of starting over
RESUME_KEYS = ("format_version", "dtype", "vocab_size", "eos_token_id", "tokenizer_sha256", "source",
               "source_bytes", "source_mtime_ns", "text_column", "chunk_rows")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def split_prefix(path: str) -> str:
    """'x', 'x.bin' and 'x.json' all name the token file with prefix 'x'."""
    path = str(path)
    for ext in (".bin", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _fingerprint(tokenizer_dir: str) -> str:
    """SHA-256 of the tokenizer's files, so a retrained tokenizer in the same dir is noticed."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(tokenizer_dir)):
        path = os.path.join(tokenizer_dir, name)
        if os.path.isfile(path):
            digest.update(name.encode("utf-8") + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _load_encoder(tokenizer_dir: str):
    """A function from a list of texts to lists of ids, without special tokens added or parsed."""
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(path)
        backend.encode_special_tokens = True
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    from .tokenizer import load_tokenizer

    slow = load_tokenizer(tokenizer_dir)
    return lambda texts: slow(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


_ENCODER = None  # one per worker process, loaded once by _init_worker


def _exit_when_orphaned(parent: int) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(tokenizer_dir: str) -> None:
    import threading

    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool already uses every core
    _ENCODER = _load_encoder(tokenizer_dir)
    # a killed parent leaves pool workers blocked on their queue forever; they leave instead
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()


def _encode_chunk(task) -> np.ndarray:
    texts, vocab_size, eos, dtype_name = task
    ids = _ENCODER(texts)
    total = sum(len(x) for x in ids) + len(ids)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable((x, (eos,)) for x in ids)),
                       dtype=np.int64, count=total)
    if total and int(flat.max()) >= vocab_size:
        raise UserError(f"the tokenizer produced id {int(flat.max())} >= its vocab_size {vocab_size}; "
                        "the tokenizer dir is inconsistent: retrain or re-save it")
    return flat.astype(DTYPES[dtype_name])


def in_order_pool(tasks, work, num_workers: int, initializer, initargs: tuple, local_initializer=None):
    """(meta, work(task)) per (meta, task) in input order, on `num_workers` spawned processes (1: this one,
    set up by local_initializer); at most 2 tasks per worker in flight, so memory stays bounded."""
    if num_workers <= 1:
        (local_initializer or initializer)(*initargs)
        for meta, task in tasks:
            yield meta, work(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: forking a process whose tokenizers thread pool is already running can deadlock.
    # An executor, unlike multiprocessing.Pool, fails instead of hanging when a worker dies.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_workers, context, initializer, initargs) as pool:
        pending: deque = deque()
        try:
            for meta, task in tasks:
                pending.append((meta, pool.submit(work, task)))
                if len(pending) >= 2 * num_workers:
                    meta, future = pending.popleft()
                    yield meta, future.result()
            while pending:
                meta, future = pending.popleft()
                yield meta, future.result()
        except BrokenProcessPool as exc:
            raise UserError(f"a tokenizer worker process died ({exc}); rerun the same command to resume, with a "
                            "smaller --num_workers if memory ran out") from None
        finally:
            for _, future in pending:  # an error or Ctrl-C: do not wait for queued chunks
                future.cancel()


def _encoded(tasks, num_workers: int, tokenizer_dir: str):
    """(meta, tokens) per task in input order."""
    return in_order_pool(tasks, _encode_chunk, num_workers, _init_worker, (tokenizer_dir,), _init_in_this_process)


def _init_in_this_process(tokenizer_dir: str) -> None:
    global _ENCODER
    _ENCODER = _load_encoder(tokenizer_dir)


def _tasks(input: str, text_column: str, chunk_rows: int, strict: bool, start_row: int, static: tuple):
    for batch in iter_batches(input, [text_column], chunk_rows, strict, start_row, desc="tokenize"):
        skipped, texts = dict(batch.skipped), []
        where = f"rows {batch.row_start + 1}-{batch.row_end}"
        for value in batch.table.column(0).to_pylist():
            if value is None:
                merge_skips(skipped, {"null": [1, where]})
            elif value == "":
                merge_skips(skipped, {"empty": [1, where]})
            else:
                texts.append(value)
        yield (batch.row_end, len(texts), skipped), (texts, *static)


def _write_index(index_path: str, index: dict) -> None:
    tmp = index_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index_path)


def _read_index(index_path: str) -> dict | None:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def tokenize_to_bin(input: str, output_prefix: str, tokenizer_dir: str, text_column: str = "text",
                    num_workers: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS, strict: bool = False) -> dict:
    """Tokenize every document of `input` into `<output_prefix>.bin` + `.json`, resuming an interrupted run.

    num_workers: encoder processes (default: all cores; 1 encodes in this process).
    chunk_rows: source rows per chunk, the unit of work and of resume; part of the settings, so
    changing it (or the source, tokenizer, column) starts the file over.
    """
    from .tokenizer import load_tokenizer

    fmt = file_format(input)
    chunk_rows = int(chunk_rows)
    if chunk_rows < 1:
        raise UserError(f"chunk_rows={chunk_rows} must be at least 1")
    tokenizer_dir = os.path.abspath(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{tokenizer_dir}' has no eos token; documents need one as separator")
    vocab_size, eos = len(tokenizer), int(tokenizer.eos_token_id)
    dtype_name = token_dtype(vocab_size)
    itemsize = DTYPES[dtype_name].itemsize
    prefix = split_prefix(output_prefix)
    bin_path, index_path = prefix + ".bin", prefix + ".json"
    source = os.stat(input)
    settings = {"format_version": FORMAT_VERSION, "dtype": dtype_name, "vocab_size": vocab_size,
                "eos_token_id": eos, "tokenizer_dir": tokenizer_dir, "tokenizer_sha256": _fingerprint(tokenizer_dir),
                "source": os.path.abspath(input), "source_bytes": source.st_size,
                "source_mtime_ns": source.st_mtime_ns, "text_column": "text" if fmt == "txt" else str(text_column),
                "chunk_rows": chunk_rows}
    progress = {"n_tokens": 0, "n_documents": 0, "chunks_done": 0, "rows_done": 0, "skipped": {}, "max_token_id": -1}
    old = _read_index(index_path) or {}
    resumable = (all(old.get(k) == settings[k] for k in RESUME_KEYS) and all(k in old for k in progress)
                 and os.path.isfile(bin_path) and os.path.getsize(bin_path) >= old["n_tokens"] * itemsize)
    if resumable and old.get("complete") is True:
        print(f"tokenize: '{bin_path}' is already complete ({old['n_tokens']} tokens); nothing to do")
        return old
    if resumable:
        progress = {key: old[key] for key in progress}
    os.makedirs(os.path.dirname(os.path.abspath(bin_path)), exist_ok=True)
    with open(bin_path, "ab") as out:  # create it if missing; a partly written chunk is cut off next
        out.truncate(progress["n_tokens"] * itemsize)
    _write_index(index_path, {**settings, **progress, "complete": False})
    resumed_from = progress["rows_done"]
    workers = int(num_workers) if num_workers else (os.cpu_count() or 1)
    tasks = _tasks(input, settings["text_column"], chunk_rows, strict, resumed_from, (vocab_size, eos, dtype_name))
    with open(bin_path, "r+b") as out:
        out.seek(progress["n_tokens"] * itemsize)
        for (rows_done, n_docs, skipped), tokens in _encoded(tasks, workers, tokenizer_dir):
            out.write(tokens.tobytes())
            out.flush()
            os.fsync(out.fileno())
            progress["n_tokens"] += len(tokens)
            progress["max_token_id"] = max(progress["max_token_id"], int(tokens.max()) if len(tokens) else -1)
            progress["n_documents"] += n_docs
            progress["chunks_done"] += 1
            progress["rows_done"] = rows_done
            merge_skips(progress["skipped"], skipped)
            _write_index(index_path, {**settings, **progress, "complete": False})
    if progress["n_documents"] == 0:
        raise UserError(f"'{input}' has no non-empty text in column '{settings['text_column']}' "
                        f"(skipped: {describe_skips(progress['skipped'])}); check --text_column")
    index = {**settings, **progress, "complete": True}
    _write_index(index_path, index)
    print("tokenize:")
    for key in ("source", "n_documents", "n_tokens", "dtype", "vocab_size", "eos_token_id"):
        print(f"  {key}: {index[key]}")
    print(f"  output: {bin_path} (+ {os.path.basename(index_path)})")
    print(f"  resumed_from_row: {resumed_from}")
    print(f"  skipped: {describe_skips(progress['skipped'])}")
    return index


class TokenFile:
    """A packed token file opened read-only as a numpy memmap; O(1) memory whatever its size."""

    def __init__(self, prefix_or_path: str):
        prefix = split_prefix(prefix_or_path)
        self.path, self.index_path = prefix + ".bin", prefix + ".json"
        fix = f"rebuild it with `train_low_mem.py prepare tokenize --output_prefix={prefix} ...`"
        if not os.path.isfile(self.index_path):
            raise UserError(f"token file index '{self.index_path}' is missing; {fix}")
        index = _read_index(self.index_path)
        needed = ("dtype", "n_tokens", "vocab_size", "eos_token_id", "complete")
        if index is None or any(key not in index for key in needed):
            raise UserError(f"token file index '{self.index_path}' is not a valid index "
                            f"(needs {', '.join(needed)}); {fix}")
        if not index["complete"]:
            raise UserError(f"token file '{self.path}' is incomplete (tokenization was interrupted); rerun the same "
                            "`train_low_mem.py prepare tokenize` command to finish it")
        if index["dtype"] not in DTYPES:
            raise UserError(f"token file index '{self.index_path}' has dtype {index['dtype']!r}, "
                            f"expected uint16 or uint32; {fix}")
        self.dtype = DTYPES[index["dtype"]]
        try:
            self.n_tokens, self.vocab_size = int(index["n_tokens"]), int(index["vocab_size"])
            self.eos_token_id, self.n_documents = int(index["eos_token_id"]), int(index.get("n_documents", 0))
        except (TypeError, ValueError):
            raise UserError(f"token file index '{self.index_path}' has a non-integer count; {fix}") from None
        if self.vocab_size > np.iinfo(self.dtype).max + 1:
            raise UserError(f"token file index '{self.index_path}' says vocab_size {self.vocab_size}, which "
                            f"{index['dtype']} cannot hold; {fix}")
        if not os.path.isfile(self.path):
            raise UserError(f"token file '{self.path}' is missing (its index exists); {fix}")
        expected, actual = self.n_tokens * self.dtype.itemsize, os.path.getsize(self.path)
        if actual != expected:
            raise UserError(f"token file '{self.path}' has {actual} bytes but its index says {self.n_tokens} "
                            f"{index['dtype']} tokens ({expected} bytes); {fix}")
        self.index = index
        # numpy cannot map an empty file; an empty array behaves the same for readers
        self.tokens = (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
                       if self.n_tokens else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return self.n_tokens

    def max_token_id(self) -> int:
        """The largest id in the file: from the index, or (files of earlier versions) read in chunks."""
        recorded = self.index.get("max_token_id")
        if isinstance(recorded, int):
            return recorded
        step = 1 << 24
        return max((int(self.tokens[i:i + step].max()) for i in range(0, self.n_tokens, step)), default=-1)

    def check_ids(self, vocab_size: int) -> None:
        """Refuse, before any id reaches an embedding, a file whose ids its own index or the model cannot hold."""
        largest = self.max_token_id()
        if largest >= self.vocab_size:
            raise UserError(f"token file '{self.path}': the index says vocab_size {self.vocab_size} but the file holds "
                            f"id {largest}: it was written with another tokenizer or is corrupt; tokenize it again "
                            "(`train_low_mem.py prepare tokenize`)")
        if self.vocab_size > vocab_size:
            raise UserError(f"token file '{self.path}' was made with a vocabulary of {self.vocab_size} entries, but "
                            f"the model has {vocab_size}; tokenize it again with this run's tokenizer")
        if largest >= vocab_size:
            raise UserError(f"token file '{self.path}' holds token id {largest}, but the model's vocabulary has "
                            f"{vocab_size} entries; tokenize it again with this run's tokenizer "
                            f"(`prepare tokenize --tokenizer_dir=...`) or train with the tokenizer it was made with")

    def __repr__(self) -> str:
        return (f"TokenFile({self.path!r}, n_tokens={self.n_tokens}, dtype={self.dtype.name}, "
                f"vocab_size={self.vocab_size})")
