"""Tokenize-once caches of SFT data: `prepare tokenize` of prompt/response or conversation files.

Files of a cache with prefix P:
  P.json         the index: kind "sft_cache", the settings the tokens depend on (tokenizer files hash,
                 chat template hash, max_seq_len, train_on, train_on_prompt), the source files and their
                 units (parquet row groups / jsonl blocks, in file order), counts, and resume progress
  P.ids.bin      every sample's token ids, one after another (uint16, or uint32 for large vocabularies)
  P.labels.bin   one byte per token: 1 where the token carries the loss
  P.rows.bin     per source row: where its tokens start, how many, and a status code (kept, or skipped
                 and why, plus notes such as a truncated prompt), 16 bytes a row
Rows are encoded by a pool of worker processes (one unit each) and written in source order, so the
bytes do not depend on the worker count; an interrupted run resumes at the next unit.

Training reads a sample with three preads: O(1) memory whatever the cache's size. Its order is the
on-the-fly reader's (the same units, windows and seeds, lowmem/data/tables.py), so a run from the cache
trains exactly the batches the run from the source would; a cache whose settings disagree with the
run's is refused.
"""
from __future__ import annotations

import bisect
import hashlib
import os

import numpy as np

from ..errors import UserError
from .stream import close_all
from .tables import epoch_windows, window_order
from .token_file import _read_index, _write_index, in_order_pool

FORMAT_VERSION = 1
ROW = np.dtype([("start", "<i8"), ("length", "<i4"), ("status", "<i4")])
CACHE_KINDS = ("prompt_response", "messages", "sharegpt")
CHECKED = ("tokenizer_sha256", "chat_template_sha256", "max_seq_len", "train_on", "train_on_prompt")


def tokenizer_hash(tokenizer_dir: str) -> str:
    from .token_file import _fingerprint

    return _fingerprint(tokenizer_dir)


def template_hash(tokenizer) -> str:
    from ..template import ensure_chat_template

    ensure_chat_template(tokenizer)
    return hashlib.sha256(str(tokenizer.chat_template).encode("utf-8")).hexdigest()


def cache_files(prefix: str) -> dict[str, str]:
    return {"index": prefix + ".json", "ids": prefix + ".ids.bin", "labels": prefix + ".labels.bin",
            "rows": prefix + ".rows.bin"}


# ---------------------------------------------------------------- building

_WORKER: dict = {}


def _init_worker(table_args: tuple, encoder_args: tuple) -> None:
    from ..tokenizer import load_tokenizer
    from .encoding import SampleEncoder
    from .tables import ShardTable

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool already uses every core
    paths, columns, fmt = table_args
    tokenizer_dir, *settings = encoder_args
    _WORKER["table"] = ShardTable(paths, columns, fmt, 1 << 30, 0, shuffle=False)  # file order, no windows
    _WORKER["encoder"] = SampleEncoder(load_tokenizer(tokenizer_dir), *settings)


def _encode_unit(u: int) -> tuple[list, list, list]:
    """(ids per row or None, label masks, status text per row) of one unit."""
    from .encoding import Skipped

    rows = _WORKER["table"].unit_rows(u)
    readable = [i for i, row in enumerate(rows) if "_skip" not in row]
    results = iter(_WORKER["encoder"].encode_many([rows[i] for i in readable], readable))
    ids, masks, status = [], [], []
    for row in rows:
        result = None if "_skip" in row else next(results)
        if result is None or isinstance(result, Skipped):
            ids.append(None)
            masks.append(None)
            status.append("skip:" + (row["_skip"] if result is None else result.reason))
            continue
        tokens = result.input_ids.numpy()
        ids.append(tokens)
        masks.append((result.labels.numpy() == tokens).astype(np.uint8))
        status.append("note:" + "+".join(result.notes) if result.notes else "ok")
    return ids, masks, status


def _results(units: list[int], workers: int, table_args, encoder_args):
    """(unit, encoded) in unit order."""
    return in_order_pool(((u, u) for u in units), _encode_unit, workers, _init_worker, (table_args, encoder_args))


def build_sft_cache(input: str, output_prefix: str, tokenizer_dir: str, max_seq_len: int,
                    train_on: str = "all_assistant", train_on_prompt: bool = False, columns: dict | None = None,
                    num_workers: int | None = None, strict: bool = False, log=print) -> dict:
    """Encode every row of an SFT data file (or dir/glob/list) into a tokenize-once cache; resumes when rerun."""
    from config import TrainConfig

    from ..tokenizer import load_tokenizer
    from .sources import open_dataset, parse_data_arg
    from .token_file import split_prefix, token_dtype

    tokenizer_dir = os.path.abspath(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    settings_cfg = TrainConfig(train_file=input, validation_file="", test_file="", max_seq_len=int(max_seq_len),
                               train_on=train_on, train_on_prompt=train_on_prompt, strict=strict, **(columns or {}))
    specs = parse_data_arg(input, "input")
    if len(specs) != 1:
        raise UserError(f"--input '{input}' names a weighted mixture; build one cache per dataset")
    dataset = open_dataset(specs[0], settings_cfg, tokenizer, shuffle=False, flag="input", log=log)
    if dataset.kind not in CACHE_KINDS:
        hint = "tokenize plain text into a token file instead (a text column)" if dataset.kind == "text" else \
            "train on the records file directly"
        raise UserError(f"--input '{input}' holds {dataset.kind} data; a tokenize-once cache takes prompt/response or "
                        f"conversations ({hint})")
    table = dataset.source
    dtype = token_dtype(len(tokenizer))
    files = cache_files(split_prefix(output_prefix))
    stats = [os.stat(p) for p in table.paths]
    settings = {"kind": "sft_cache", "format_version": FORMAT_VERSION, "dtype": dtype,
                "tokenizer_dir": tokenizer_dir, "tokenizer_sha256": tokenizer_hash(tokenizer_dir),
                "chat_template_sha256": template_hash(tokenizer), "max_seq_len": int(max_seq_len),
                "train_on": train_on, "train_on_prompt": bool(train_on_prompt), "data_kind": dataset.kind,
                "columns": table.columns, "file_format": table.format, "sources": [os.path.abspath(p) for p in table.paths],
                "source_bytes": [st.st_size for st in stats], "source_mtime_ns": [st.st_mtime_ns for st in stats],
                "units": [[u.shard, u.part, u.rows, u.start, u.end] for u in table.units]}
    progress = {"units_done": 0, "n_rows": 0, "n_tokens": 0, "status_codes": ["ok"], "counts": {}}
    old = _read_index(files["index"]) or {}
    itemsize = np.dtype(dtype).itemsize
    resumable = all(old.get(k) == v for k, v in settings.items()) and all(k in old for k in progress)
    if resumable and old.get("complete") is True:
        log(f"tokenize: cache '{files['index']}' is already complete ({old['n_rows']} rows); nothing to do")
        return old
    if resumable:
        progress = {k: old[k] for k in progress}
    os.makedirs(os.path.dirname(os.path.abspath(files["index"])), exist_ok=True)
    sizes = {"ids": progress["n_tokens"] * itemsize, "labels": progress["n_tokens"], "rows": progress["n_rows"] * ROW.itemsize}
    for part, size in sizes.items():
        with open(files[part], "ab") as f:  # create if missing; a partly written unit is cut off
            f.truncate(size)
    _write_index(files["index"], {**settings, **progress, "complete": False})
    resumed_from = progress["units_done"]
    workers = int(num_workers) if num_workers else (os.cpu_count() or 1)
    table_args = (table.paths, table.columns, table.format)
    encoder_args = (tokenizer_dir, int(max_seq_len), False, train_on, bool(train_on_prompt), bool(strict), input)
    codes = {name: i for i, name in enumerate(progress["status_codes"])}
    with open(files["ids"], "r+b") as ids_f, open(files["labels"], "r+b") as labels_f, open(files["rows"], "r+b") as rows_f:
        for f, size in ((ids_f, sizes["ids"]), (labels_f, sizes["labels"]), (rows_f, sizes["rows"])):
            f.seek(size)
        for _, (ids, masks, status) in _results(list(range(resumed_from, len(table.units))), workers, table_args,
                                                encoder_args):
            rows = np.zeros(len(ids), dtype=ROW)
            for i, (tokens, mask, state) in enumerate(zip(ids, masks, status)):
                if state not in codes:
                    codes[state] = len(codes)
                    progress["status_codes"].append(state)
                rows[i] = (progress["n_tokens"], 0 if tokens is None else len(tokens), codes[state])
                progress["counts"][state] = progress["counts"].get(state, 0) + 1
                if tokens is not None:
                    ids_f.write(tokens.astype(dtype).tobytes())
                    labels_f.write(mask.tobytes())
                    progress["n_tokens"] += len(tokens)
            rows_f.write(rows.tobytes())
            for f in (ids_f, labels_f, rows_f):
                f.flush()
                os.fsync(f.fileno())
            progress["n_rows"] += len(ids)
            progress["units_done"] += 1
            _write_index(files["index"], {**settings, **progress, "complete": False})
    kept = progress["counts"].get("ok", 0) + sum(n for s, n in progress["counts"].items() if s.startswith("note:"))
    if kept == 0:
        raise UserError(f"'{input}' has no usable rows for max_seq_len={max_seq_len} (counts: {progress['counts']})")
    index = {**settings, **progress, "complete": True}
    _write_index(files["index"], index)
    log(f"tokenize: cache {files['index']} with {progress['n_rows']} rows ({kept} kept), {progress['n_tokens']} tokens, "
        f"resumed from unit {resumed_from}; rows by status: {progress['counts']}")
    return index


# ---------------------------------------------------------------- reading

class CachedSamples:
    """Samples of a tokenize-once cache, in the same order as the on-the-fly reader of its source."""

    def __init__(self, index_path: str, cfg, tokenizer, shuffle: bool = True, name: str = ""):
        from .token_file import split_prefix

        self.files = cache_files(split_prefix(index_path))
        index = _read_index(self.files["index"])
        fix = "rebuild it with `train_low_mem.py prepare tokenize` (the same command resumes an interrupted one)"
        if index is None or index.get("kind") != "sft_cache" or index.get("format_version") != FORMAT_VERSION:
            raise UserError(f"'{self.files['index']}' is not a tokenize-once cache of this version; {fix}")
        if not index.get("complete"):
            raise UserError(f"cache '{self.files['index']}' is incomplete (tokenization was interrupted); {fix}")
        self._check_settings(self.files["index"], index, cfg, tokenizer)
        self.index, self.name, self.shuffle = index, name, shuffle
        self.seed, self.buffer_size = cfg.seed, max(1, cfg.dataloader_buffer_size)
        self.dtype = np.dtype(index["dtype"])
        self.paths = [self.files["index"]]
        self.unit_rows = [u[2] for u in index["units"]]
        self.unit_first = list(np.cumsum([0] + self.unit_rows[:-1]))
        self.num_samples = int(index["n_rows"])
        self.status = index["status_codes"]
        self.empty_shards: list[str] = []
        expected = {"ids": index["n_tokens"] * self.dtype.itemsize, "labels": index["n_tokens"],
                    "rows": self.num_samples * ROW.itemsize}
        for part, size in expected.items():
            if not os.path.isfile(self.files[part]) or os.path.getsize(self.files[part]) != size:
                raise UserError(f"cache file '{self.files[part]}' is missing or not the size its index says; {fix}")
        self._fds = {part: os.open(self.files[part], os.O_RDONLY) for part in ("ids", "labels", "rows")}
        self._layout: tuple | None = None
        self._window: tuple | None = None

    @staticmethod
    def _check_settings(path: str, index: dict, cfg, tokenizer) -> None:
        wanted = {"tokenizer_sha256": tokenizer_hash(tokenizer.name_or_path) if os.path.isdir(str(tokenizer.name_or_path))
                  else index["tokenizer_sha256"], "chat_template_sha256": template_hash(tokenizer),
                  "max_seq_len": cfg.max_seq_len, "train_on": cfg.train_on, "train_on_prompt": cfg.train_on_prompt}
        for key in CHECKED:
            if index.get(key) != wanted[key]:
                what = {"tokenizer_sha256": "another tokenizer", "chat_template_sha256": "another chat template"}.get(
                    key, f"{key}={index.get(key)!r} (this run: {wanted[key]!r})")
                raise UserError(f"tokenize-once cache '{path}' was built with {what}; rebuild it with this run's settings "
                                "(`prepare tokenize`) or train with the settings it was built with")

    def _row(self, epoch: int, index: int) -> int:
        """The source row of the epoch's index-th sample, as the on-the-fly reader orders them."""
        if self._layout is None or self._layout[0] != epoch:
            self._layout = (epoch, *epoch_windows(self.unit_rows, self.buffer_size, self.seed, epoch, self.shuffle))
        _, windows, starts = self._layout
        w = bisect.bisect_right(starts, index) - 1
        if self._window is None or self._window[0] != (epoch, w):
            units = windows[w]
            sizes = [self.unit_rows[u] for u in units]
            order = window_order(self.seed, epoch, w, sum(sizes), self.shuffle)
            self._window = ((epoch, w), units, list(np.cumsum([0] + sizes[:-1])), order)
        _, units, firsts, order = self._window
        in_window = int(order[index - starts[w]])
        k = bisect.bisect_right(firsts, in_window) - 1
        return int(self.unit_first[units[k]]) + in_window - int(firsts[k])

    def sample(self, epoch: int, index: int) -> dict:
        row = np.frombuffer(os.pread(self._fds["rows"], ROW.itemsize, self._row(epoch, index) * ROW.itemsize), ROW)[0]
        status = self.status[int(row["status"])]
        if status.startswith("skip:"):
            return {"_skip": status[len("skip:"):]}
        start, length = int(row["start"]), int(row["length"])
        ids = np.frombuffer(os.pread(self._fds["ids"], length * self.dtype.itemsize, start * self.dtype.itemsize),
                            self.dtype).astype(np.int64)
        mask = np.frombuffer(os.pread(self._fds["labels"], length, start), np.uint8)
        sample = {"input_ids": ids, "labels": np.where(mask == 1, ids, -100)}
        if status.startswith("note:"):
            sample["_notes"] = status[len("note:"):].split("+")
        return sample

    def __del__(self):
        close_all(getattr(self, "_fds", {}))
