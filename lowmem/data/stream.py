"""Streaming sample sources with a resumable position, sharded across processes.

A source yields, for one process, its share of one epoch's samples in a seeded order that is a
pure function of (seed, epoch). The position is the number of this process's samples already
consumed in the epoch, so a restore is O(1) and exact: it recomputes the order and seeks.

- `ParquetRows`: row groups are shuffled each epoch and taken a few at a time into a window of
  about `buffer_size` rows whose rows are shuffled; memory is one window, whatever the file size.
- `TokenWindows`: fixed `seq_len` windows of a packed token file (numpy memmap), shuffled per epoch.
Process r of W takes global positions r, r+W, r+2W, ...: every sample goes to exactly one process.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ..errors import UserError

STRING_TYPES = ("string", "large_string", "string_view")


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *more])


def open_parquet(path: str):
    """Open a parquet file for streaming; a missing, empty or broken file is a UserError."""
    import os

    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise UserError(f"data file '{path}' does not exist; check --train_file/--validation_file")
    if os.path.getsize(path) == 0:
        raise UserError(f"data file '{path}' is empty")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-parquet or truncated files
        raise UserError(f"data file '{path}' is not a readable parquet file ({str(exc).splitlines()[0]}); "
                        "convert it with `train_low_mem.py prepare convert`") from None
    if pf.metadata.num_rows == 0:
        raise UserError(f"data file '{path}' has no rows")
    return pf


def text_columns(pf, path: str) -> tuple[str, ...]:
    """('prompt', 'response') or ('text',), checked to be string columns."""
    schema = pf.schema_arrow
    names = set(schema.names)
    if {"prompt", "response"} <= names:
        columns: tuple[str, ...] = ("prompt", "response")
    elif "text" in names:
        columns = ("text",)
    else:
        raise UserError(f"data file '{path}' needs columns prompt+response or text, it has {sorted(names)}; "
                        "rename with `train_low_mem.py prepare convert --prompt_column=... --response_column=...`")
    for name in columns:
        type_name = str(schema.field(name).type)
        if type_name not in STRING_TYPES:
            raise UserError(f"column '{name}' of '{path}' has type {type_name}, expected string")
    return columns


class ParquetRows:
    """Rows of a parquet file in a seeded, window-shuffled order; one process's share at a time."""

    def __init__(self, path: str, buffer_size: int, seed: int, shuffle: bool = True):
        self.path = path
        self.pf = open_parquet(path)
        self.columns = text_columns(self.pf, path)
        self.group_rows = [self.pf.metadata.row_group(i).num_rows for i in range(self.pf.num_row_groups)]
        self.num_samples = sum(self.group_rows)
        self.buffer_size = max(1, buffer_size)
        self.seed, self.shuffle = seed, shuffle
        largest = max(self.group_rows)
        if largest > 4 * self.buffer_size:
            import warnings

            warnings.warn(f"'{path}' has row groups of up to {largest} rows, more than dataloader_buffer_size="
                          f"{self.buffer_size}; memory follows the row group. Rewrite it with "
                          "`train_low_mem.py prepare convert` (10k-row groups)", stacklevel=2)

    def _windows(self, epoch: int) -> list[list[int]]:
        order = epoch_rng(self.seed, epoch).permutation(len(self.group_rows)) if self.shuffle else range(len(self.group_rows))
        windows, current, rows = [], [], 0
        for group in order:
            current.append(int(group))
            rows += self.group_rows[group]
            if rows >= self.buffer_size:
                windows.append(current)
                current, rows = [], 0
        if current:
            windows.append(current)
        return windows

    def iter_shard(self, epoch: int, rank: int, world: int, start: int = 0) -> Iterator[tuple[int, dict]]:
        """(position, row) for this process's rows from position `start` on."""
        first_global = start * world + rank
        window_start = 0
        for w, groups in enumerate(self._windows(epoch)):
            n = sum(self.group_rows[g] for g in groups)
            window_end = window_start + n
            if window_end > first_global:
                base = max(first_global, window_start)
                lo = base + (rank - base) % world  # first index of this process at or after base
                wanted = np.arange(lo, window_end, world) - window_start
                if len(wanted):
                    order = epoch_rng(self.seed, epoch, w).permutation(n) if self.shuffle else np.arange(n)
                    table = self.pf.read_row_groups(groups, columns=list(self.columns))
                    picked = table.take(order[wanted])
                    del table
                    first = (lo - rank) // world
                    for offset in range(0, picked.num_rows, 1024):  # Python objects for 1024 rows at a time
                        part = picked.slice(offset, 1024)
                        values = [part.column(c).to_pylist() for c in self.columns]
                        for i, row in enumerate(zip(*values)):
                            yield first + offset + i, dict(zip(self.columns, row))
            window_start = window_end


class TokenWindows:
    """Non-overlapping `seq_len` windows of a token file, shuffled per epoch."""

    def __init__(self, path: str, seq_len: int, seed: int, shuffle: bool = True):
        from .token_file import TokenFile

        self.path = path
        self.file = TokenFile(path)
        self.seq_len = seq_len
        self.num_samples = self.file.n_tokens // seq_len
        if self.num_samples == 0:
            raise UserError(f"token file '{path}' has {self.file.n_tokens} tokens, fewer than max_seq_len={seq_len}")
        self.seed, self.shuffle = seed, shuffle

    def iter_shard(self, epoch: int, rank: int, world: int, start: int = 0) -> Iterator[tuple[int, dict]]:
        order = epoch_rng(self.seed, epoch).permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        itemsize = self.file.dtype.itemsize
        nbytes = self.seq_len * itemsize
        # pread rather than slicing the memmap: mapped pages would count in RSS and grow with the file
        fd = os.open(self.file.path, os.O_RDONLY)
        try:
            for position, window in enumerate(order[rank::world][start:], start=start):
                raw = os.pread(fd, nbytes, int(window) * nbytes)
                ids = np.frombuffer(raw, dtype=self.file.dtype).astype(np.int64)
                yield position, {"input_ids": ids}
        finally:
            os.close(fd)


def open_source(path: str, seq_len: int, buffer_size: int, seed: int, shuffle: bool = True):
    """The sample source for a data file, chosen by its extension."""
    if path.endswith(".bin") or path.endswith(".json") and not path.endswith(".jsonl"):
        return TokenWindows(path, seq_len, seed, shuffle)
    if path.endswith(".parquet"):
        return ParquetRows(path, buffer_size, seed, shuffle)
    raise UserError(f"data file '{path}' must be .parquet or a token file (.bin); convert it with "
                    "`train_low_mem.py prepare convert` or `train_low_mem.py prepare tokenize`")
