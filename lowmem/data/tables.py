"""Rows of one dataset stored in many files (parquet shards, jsonl files), read by sample index.

A dataset is a list of units: a parquet row group, or a block of up to BLOCK_LINES non-blank lines of
a jsonl file. Each epoch the units of every file are shuffled together (seed, epoch) and taken in
order into windows of at least `buffer_size` rows; the rows of a window are shuffled (seed, epoch,
window). Sample k of an epoch is the k-th row of that sequence, so a data position is one integer
and a resume recomputes the order and seeks. Memory is one window of rows plus a few integers per
unit, whatever the number of files or rows.
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass

import numpy as np

from ..run.errors import UserError

BLOCK_LINES = 10_000  # jsonl lines per unit: the jsonl counterpart of a parquet row group
CONVERT_ROWS = 1024  # rows turned into Python objects at a time
STRING_TYPES = ("string", "large_string", "string_view")


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *more])


def epoch_windows(unit_rows: list[int], buffer_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> tuple[list[list[int]], list[int]]:
    """The epoch's windows (unit indices, in order) and each window's first sample index."""
    n = len(unit_rows)
    order = epoch_rng(seed, epoch).permutation(n) if shuffle else range(n)
    windows, starts, current, rows, total = [], [], [], 0, 0
    for u in order:
        current.append(int(u))
        rows += unit_rows[u]
        if rows >= buffer_size:
            windows.append(current)
            starts.append(total)
            total += rows
            current, rows = [], 0
    if current:
        windows.append(current)
        starts.append(total)
    return windows, starts


def window_order(seed: int, epoch: int, window: int, n: int, shuffle: bool = True) -> np.ndarray:
    """The order of a window's n rows (their concatenation over the window's units)."""
    return epoch_rng(seed, epoch, window).permutation(n) if shuffle else np.arange(n)


@dataclass(frozen=True)
class Unit:
    shard: int  # index into the dataset's files
    part: int  # parquet row group, or jsonl block number
    rows: int
    start: int = 0  # jsonl: byte range of the block
    end: int = 0


def open_parquet(path: str, flags: str = "--train_file/--validation_file"):
    """The one parquet opener of the project: a missing or unreadable file is a UserError naming it."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise UserError(f"data file '{path}' does not exist; check {flags}")
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-parquet or truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"data file '{path}' is not a readable parquet file ({reason}); recreate it or convert "
                        "it with `train_low_mem.py prepare convert`") from None


def jsonl_blocks(path: str, shard: int) -> list[Unit]:
    """Units of BLOCK_LINES non-blank lines each, found in one pass over the file."""
    units, count, block_start, offset = [], 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            if line.strip():
                count += 1
                if count == BLOCK_LINES:
                    units.append(Unit(shard, len(units), count, block_start, offset))
                    count, block_start = 0, offset
    if count:
        units.append(Unit(shard, len(units), count, block_start, offset))
    return units


def parse_jsonl_line(raw: bytes) -> dict:
    """One jsonl row; an unreadable line becomes {'_skip': reason} for the encoder to count."""
    try:
        row = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except UnicodeDecodeError:  # before ValueError, its base class
        return {"_skip": "invalid_utf8"}
    except ValueError:
        return {"_skip": "invalid_json"}
    return row if isinstance(row, dict) else {"_skip": "not_object"}


class ShardTable:
    """The rows of one dataset's files in a seeded, window-shuffled order, read by index."""

    def __init__(self, paths: list[str], columns: dict[str, str], file_format: str, buffer_size: int, seed: int,
                 shuffle: bool = True, name: str = ""):
        self.paths, self.columns, self.format = list(paths), dict(columns), file_format  # canonical -> source name
        self.buffer_size, self.seed, self.shuffle, self.name = max(1, buffer_size), seed, shuffle, name
        self.empty_shards: list[str] = []
        self.units: list[Unit] = []
        schema = None
        for shard, path in enumerate(self.paths):
            units, schema = self._index(shard, path, schema)
            if not units:
                self.empty_shards.append(path)
            self.units.extend(units)
        self.num_samples = sum(u.rows for u in self.units)
        self.unit_first = np.cumsum([0] + [u.rows for u in self.units[:-1]])  # a unit's first row in file order
        self.shard_first = {}  # a file's first row in the dataset's order
        for unit, first in zip(self.units, self.unit_first):
            self.shard_first.setdefault(unit.shard, int(first))
        if self.num_samples == 0:
            listed = ", ".join(f"'{p}'" for p in self.paths[:3]) + (" ..." if len(self.paths) > 3 else "")
            raise UserError(f"data file {listed} is empty (no rows); point --train_file/--validation_file at data")
        self._layout: tuple[int, list[list[int]], list[int]] | None = None
        self._window: tuple[tuple[int, int], object, dict] | None = None
        self._files: dict[int, object] = {}

    # ---------------------------------------------------------------- indexing the files

    def _index(self, shard: int, path: str, first_schema):
        if os.path.getsize(path) == 0:
            return [], first_schema
        if self.format == "jsonl":
            return jsonl_blocks(path, shard), first_schema
        pf = open_parquet(path)
        schema = pf.schema_arrow
        if first_schema is None:
            self._check_types(schema, path)
            first_schema = schema
        elif not schema.equals(first_schema, check_metadata=False):
            differ = sorted(set(map(str, schema)) ^ set(map(str, first_schema)))
            raise UserError(f"shard '{path}' has another schema than '{self.paths[0]}' (differs in: "
                            f"{'; '.join(differ[:4])}); every shard of a dataset needs the same columns and types")
        units = [Unit(shard, g, pf.metadata.row_group(g).num_rows) for g in range(pf.num_row_groups)]
        largest = max((u.rows for u in units), default=0)
        if largest > 4 * self.buffer_size:
            import warnings

            warnings.warn(f"'{path}' has row groups of up to {largest} rows, more than dataloader_buffer_size="
                          f"{self.buffer_size}; memory follows the row group. Rewrite it with "
                          "`train_low_mem.py prepare convert` (10k-row groups)", stacklevel=3)
        return [u for u in units if u.rows], first_schema

    def _check_types(self, schema, path: str) -> None:
        for canonical, column in self.columns.items():
            if column not in schema.names:
                continue  # optional columns (e.g. system) may be absent
            type_name = str(schema.field(column).type)
            conversational = "chosen" in self.columns and canonical == "prompt"  # pairs' prompts may be messages
            if canonical in ("prompt", "response", "text", "system") and type_name not in STRING_TYPES \
                    and not conversational:
                raise UserError(f"column '{column}' of '{path}' has type {type_name}, expected string")

    # ---------------------------------------------------------------- the epoch's order

    def _epoch_layout(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """Windows (lists of unit indices) of this epoch and the first sample index of each."""
        if self._layout is None or self._layout[0] != epoch:
            windows, starts = epoch_windows([u.rows for u in self.units], self.buffer_size, self.seed, epoch,
                                            self.shuffle)
            self._layout = (epoch, windows, starts)
        return self._layout[1], self._layout[2]

    def sample(self, epoch: int, index: int) -> dict:
        """The index-th row of the epoch's order, with canonical keys (prompt, response, text, messages, ...) and
        `_row`, its row number in the dataset's files (what data stored per row, like reference log-probabilities,
        is found by)."""
        windows, starts = self._epoch_layout(epoch)
        w = bisect.bisect_right(starts, index) - 1
        if self._window is None or self._window[0] != (epoch, w):
            self._window = ((epoch, w), *self._read_window(epoch, w, windows[w]), {})
        _, rows, numbers, converted = self._window
        offset = index - starts[w]
        chunk = offset // CONVERT_ROWS
        if chunk not in converted:
            converted.clear()  # one chunk of Python objects at a time
            converted[chunk] = self._convert(rows, chunk * CONVERT_ROWS)
            for row, number in zip(converted[chunk], numbers[chunk * CONVERT_ROWS:]):
                row["_row"] = int(number)
        return converted[chunk][offset % CONVERT_ROWS]

    def locate(self, row: int) -> str:
        """Where the dataset's row `row` (file order, as `_row` counts) is: "'<file>' row <n>", n from 0 in that
        file (a jsonl file's rows are its non-blank lines)."""
        unit = self.units[int(np.searchsorted(self.unit_first, row, side="right")) - 1]
        return f"'{self.paths[unit.shard]}' row {row - self.shard_first[unit.shard]}"

    # ---------------------------------------------------------------- reading

    def _read_window(self, epoch: int, w: int, unit_ids: list[int]):
        """The window's rows in their shuffled order (an Arrow table for parquet, a list of dicts for jsonl), and
        their row numbers in the files."""
        order = window_order(self.seed, epoch, w, sum(self.units[u].rows for u in unit_ids), self.shuffle)
        numbers = np.concatenate([np.arange(self.unit_first[u], self.unit_first[u] + self.units[u].rows)
                                  for u in unit_ids])[order]
        if self.format == "jsonl":
            rows = [row for u in unit_ids for row in self._read_block(self.units[u])]
            return [rows[i] for i in order], numbers
        import pyarrow as pa

        parts = []
        for u in unit_ids:
            unit = self.units[u]
            pf = self._parquet(unit.shard)
            present = [c for c in dict.fromkeys(self.columns.values()) if c in pf.schema_arrow.names]
            try:
                parts.append(pf.read_row_group(unit.part, columns=present))
            except Exception as exc:  # a damaged page surfaces here as ArrowInvalid/OSError
                raise UserError(f"'{self.paths[unit.shard]}' row group {unit.part} cannot be read "
                                f"({str(exc).splitlines()[0]}); the file is damaged: recreate it") from None
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        return table.take(order), numbers

    def unit_rows(self, u: int) -> list[dict]:
        """The rows of one unit in file order, with canonical keys (the tokenize-once cache reads these)."""
        unit = self.units[u]
        if self.format == "jsonl":
            return self._read_block(unit)
        pf = self._parquet(unit.shard)
        present = [c for c in dict.fromkeys(self.columns.values()) if c in pf.schema_arrow.names]
        table = pf.read_row_group(unit.part, columns=present)
        return [row for first in range(0, table.num_rows, CONVERT_ROWS) for row in self._convert(table, first)]

    def _parquet(self, shard: int):
        if shard not in self._files:
            if len(self._files) >= 8:  # a few open shards at a time, not one per file of the dataset
                self._files.pop(next(iter(self._files)))
            self._files[shard] = open_parquet(self.paths[shard])
        return self._files[shard]

    def _read_block(self, unit: Unit) -> list[dict]:
        with open(self.paths[unit.shard], "rb") as f:
            f.seek(unit.start)
            data = f.read(unit.end - unit.start)
        return [self._canonical(parse_jsonl_line(line)) for line in data.split(b"\n") if line.strip()]

    def _canonical(self, row: dict) -> dict:
        if "_skip" in row:
            return row
        return {key: row.get(column) for key, column in self.columns.items() if column in row}

    def _convert(self, rows, first: int) -> list[dict]:
        """Rows first .. first+CONVERT_ROWS of the window as dicts with canonical keys."""
        if isinstance(rows, list):
            return rows[first:first + CONVERT_ROWS]
        part = rows.slice(first, CONVERT_ROWS)
        names = [(key, column) for key, column in self.columns.items() if column in part.column_names]
        values = [part.column(column).to_pylist() for _, column in names]
        return [{key: v for (key, _), v in zip(names, row)} for row in zip(*values)]
