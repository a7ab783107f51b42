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
bytes do not depend on the worker count; an interrupted run resumes at the next unit (building:
lowmem/data/sft_cache_build.py; this module holds the format and the reader).

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

from ..run.errors import UserError
from .options import DataOptions
from .stream import close_all
from .tables import epoch_windows, window_order
from .token_file import _fingerprint, _read_index, split_prefix

FORMAT_VERSION = 1
ROW = np.dtype([("start", "<i8"), ("length", "<i4"), ("status", "<i4")])
CACHE_KINDS = ("prompt_response", "messages", "sharegpt")
CHECKED = ("tokenizer_sha256", "chat_template_sha256", "max_seq_len", "train_on", "train_on_prompt")


def tokenizer_hash(tokenizer_dir: str) -> str:
    return _fingerprint(tokenizer_dir)


def template_hash(tokenizer) -> str:
    from .template import ensure_chat_template

    ensure_chat_template(tokenizer)
    return hashlib.sha256(str(tokenizer.chat_template).encode("utf-8")).hexdigest()


def cache_files(prefix: str) -> dict[str, str]:
    return {"index": prefix + ".json", "ids": prefix + ".ids.bin", "labels": prefix + ".labels.bin",
            "rows": prefix + ".rows.bin"}


# ---------------------------------------------------------------- reading

class CachedSamples:
    """Samples of a tokenize-once cache, in the same order as the on-the-fly reader of its source."""

    def __init__(self, index_path: str, options: DataOptions, tokenizer, shuffle: bool = True, name: str = ""):
        self.files = cache_files(split_prefix(index_path))
        index = _read_index(self.files["index"])
        fix = "rebuild it with `train_low_mem.py prepare tokenize` (the same command resumes an interrupted one)"
        if index is None or index.get("kind") != "sft_cache" or index.get("format_version") != FORMAT_VERSION:
            raise UserError(f"'{self.files['index']}' is not a tokenize-once cache of this version; {fix}")
        if not index.get("complete"):
            raise UserError(f"cache '{self.files['index']}' is incomplete (tokenization was interrupted); {fix}")
        self._check_settings(self.files["index"], index, options, tokenizer)
        self.index, self.name, self.shuffle = index, name, shuffle
        self.seed, self.buffer_size = options.seed, max(1, options.buffer_size)
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
    def _check_settings(path: str, index: dict, options: DataOptions, tokenizer) -> None:
        wanted = {"tokenizer_sha256": tokenizer_hash(tokenizer.name_or_path) if os.path.isdir(str(tokenizer.name_or_path))
                  else index["tokenizer_sha256"], "chat_template_sha256": template_hash(tokenizer),
                  "max_seq_len": options.max_seq_len, "train_on": options.train_on,
                  "train_on_prompt": options.train_on_prompt}
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
