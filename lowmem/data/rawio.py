"""Streaming readers for raw data files (csv, json, jsonl, parquet, txt).

Readers yield `Batch`es: an Arrow table of string columns covering exactly `batch_rows` source
rows (the last may be shorter), so callers can commit and resume at batch boundaries. A source
row is a data record for csv, json and parquet, and a physical line for jsonl and txt (blank lines
included), so row numbers in messages match what an editor shows.

Rows that cannot be read (invalid UTF-8, bad JSON, wrong field count, a non-string value) are
skipped and counted per reason; with strict=True the first one is a UserError instead. Problems
with the whole file (missing, empty, not parquet, missing column, wrong column type) are always
a UserError.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from ..run.errors import UserError

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
STRING_TYPES = ("string", "large_string", "string_view")
DEFAULT_ROW_GROUP_SIZE = 10_000
# invalid UTF-8 bytes decode to these under errors="surrogateescape"; JSON "\ud800" escapes land here too
_SURROGATE = re.compile("[\ud800-\udfff]")
SKIP_REASONS = {
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "not valid JSON",
    "not_object": "not a JSON object",
    "non_string": "a value that is not a string",
    "field_count": "a different number of fields than the header",
}


@dataclass
class Batch:
    """One slice of the source: its table, the source rows it covers and the rows it skipped."""

    table: pa.Table
    row_start: int
    row_end: int
    skipped: dict = field(default_factory=dict)  # reason -> [count, where the first one was]


def merge_skips(total: dict, more: dict) -> dict:
    for reason, (count, where) in more.items():
        if reason in total:
            total[reason][0] += count
        else:
            total[reason] = [count, where]
    return total


def describe_skips(skipped: dict) -> str:
    if not skipped:
        return "none"
    return "; ".join(f"{count} {reason} (first at {where})" for reason, (count, where) in sorted(skipped.items()))


def as_list(value) -> list[str] | None:
    """A column list from Fire (a tuple, a list or 'a,b' text) or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def file_format(path: str) -> str:
    """The format named by the extension, after checking the file exists and is not empty."""
    if not os.path.isfile(path):
        raise UserError(f"input file '{path}' does not exist; check the --input path")
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise UserError(f"input file '{path}' has an unknown extension; use one of {', '.join(FORMATS)}")
    if os.path.getsize(path) == 0:
        raise UserError(f"input file '{path}' is empty; point --input at a file with data")
    return fmt


def open_parquet(path: str):
    """A pyarrow ParquetFile; anything that is not a readable parquet file is a UserError."""
    from .tables import open_parquet as open_checked

    if file_format(path) != "parquet":
        raise UserError(f"'{path}' is not a .parquet file; convert it first with `train_low_mem.py prepare convert`")
    return open_checked(path, "the --input path")


def string_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if str(f.type) in STRING_TYPES]


def check_columns(path: str, wanted: list[str], existing: list[str], schema: pa.Schema | None = None) -> None:
    """Every wanted column exists (and, with a schema, holds strings); else a one-line UserError."""
    for name in wanted:
        if name not in existing:
            raise UserError(f"'{path}' has no column '{name}'; its columns are {existing}; pass the right "
                            "column name (e.g. --prompt_column/--response_column/--text_column/--columns)")
        if schema is not None:
            type_name = str(schema.field(name).type)
            if type_name not in STRING_TYPES + ("null",):
                raise UserError(f"column '{name}' of '{path}' has type {type_name}, expected string; "
                                "write it as text or choose another column")


def auto_text_columns(path: str, existing: list[str]) -> list[str]:
    """'text' if present, else prompt+response; otherwise the user must say which columns."""
    if "text" in existing:
        return ["text"]
    if "prompt" in existing and "response" in existing:
        return ["prompt", "response"]
    raise UserError(f"'{path}' has neither a 'text' column nor 'prompt'+'response' (it has {existing}); "
                    "pass --columns=name1,name2")


class _Rows:
    """Gathers rows into batches of exactly batch_rows source rows and counts skips."""

    def __init__(self, path, columns, batch_rows, strict, start_row, n_text):
        self.path, self.columns, self.batch_rows, self.strict = path, columns, max(1, batch_rows), strict
        self.n_text = n_text  # columns after the first n_text are kept as text whatever their JSON type
        self.start = self.row = start_row
        self.values: list[list] = [[] for _ in columns]
        self.skipped: dict = {}

    def skip(self, reason: str, where: str) -> None:
        if self.strict:
            raise UserError(f"'{self.path}' {where}: {SKIP_REASONS[reason]}; fix that row or run without "
                            "--strict to skip such rows")
        merge_skips(self.skipped, {reason: [1, where]})

    def add(self, values: list, where: str) -> None:
        """Keep one row of raw values (str or None for each column); a bad value skips the row."""
        values = values[:self.n_text] + [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                                         for v in values[self.n_text:]]
        for value in values[:self.n_text]:
            if value is not None and not isinstance(value, str):
                return self.skip("non_string", where)
            if value and _SURROGATE.search(value):
                return self.skip("invalid_utf8", where)
        for column, value in zip(self.values, values):
            column.append(value)

    def next_row(self) -> Batch | None:
        """Count one source row; return the finished batch when it is full."""
        self.row += 1
        return self.flush() if self.row - self.start >= self.batch_rows else None

    def flush(self) -> Batch | None:
        if self.row == self.start:
            return None
        table = pa.table({name: pa.array(vals, pa.string()) for name, vals in zip(self.columns, self.values)})
        batch = Batch(table, self.start, self.row, self.skipped)
        self.start, self.values, self.skipped = self.row, [[] for _ in self.columns], {}
        return batch


def _progress(desc: str | None, total: int, unit: str, initial: int = 0):
    from tqdm import tqdm

    # disable=None turns the bar off when stderr is not a terminal
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, disable=None if desc else True,
                file=sys.stderr, dynamic_ncols=True)


def peek_columns(path: str) -> list[str]:
    """Column names of a file without reading it: parquet schema, csv header, first JSON object."""
    fmt = file_format(path)
    if fmt == "txt":
        return ["text"]
    if fmt == "parquet":
        return list(open_parquet(path).schema_arrow.names)
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            return next(csv.reader(f), [])
    if fmt == "json":
        first = next((obj for obj in _load_json_array(path) if isinstance(obj, dict)), {})
        return list(first)
    with open(path, "rb") as f:  # jsonl: the first line that holds a JSON object
        for raw in f:
            try:
                obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return list(obj)
    return []


def _load_json_array(path: str) -> list:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"'{path}' is not valid UTF-8 at byte {exc.start}; re-save it as UTF-8") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        "a .json file must hold one array of objects; use .jsonl for one object per line") from None
    if not isinstance(items, list):
        raise UserError(f"'{path}' holds a JSON {type(items).__name__}, expected an array of objects")
    return items


def iter_batches(path: str, columns: list[str] | None = None, batch_rows: int = DEFAULT_ROW_GROUP_SIZE,
                 strict: bool = False, start_row: int = 0, desc: str | None = None,
                 keep: list[str] | None = None) -> Iterator[Batch]:
    """Batches of the given string columns (None: 'text' or prompt+response) from any supported file.

    `keep` names extra columns carried along as text (a JSON number becomes its text, e.g. a user id).
    """
    fmt = file_format(path)
    existing = peek_columns(path)
    columns = columns or auto_text_columns(path, existing)
    keep = [k for k in keep or [] if k not in columns]
    if fmt == "parquet":
        yield from _parquet_batches(path, columns, keep, batch_rows, start_row, desc)
        return
    check_columns(path, columns + keep, existing)
    rows = _Rows(path, columns + keep, batch_rows, strict, start_row, len(columns))
    if fmt == "csv":
        produced = _csv_rows(path, rows, desc)
    elif fmt == "txt":
        produced = _line_rows(path, rows, desc, parse=None)
    elif fmt == "jsonl":
        produced = _line_rows(path, rows, desc, parse=_json_row)
    else:
        produced = _array_rows(path, rows, desc)
    for batch in produced:
        yield batch
    last = rows.flush()
    if last is not None:
        yield last


def _parquet_batches(path, columns, keep, batch_rows, start_row, desc) -> Iterator[Batch]:
    pf = open_parquet(path)
    check_columns(path, columns, list(pf.schema_arrow.names), pf.schema_arrow)
    check_columns(path, keep, list(pf.schema_arrow.names))
    columns = columns + keep
    schema = pa.schema([(c, pa.string()) for c in columns])
    pending, pending_rows, first = [], 0, start_row
    group_start = 0
    with _progress(desc, pf.metadata.num_rows, "rows", initial=start_row) as bar:
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if group_start + n <= start_row:  # resume: whole row groups before the start are not read
                group_start += n
                continue
            try:
                table = pf.read_row_group(g, columns=columns)
            except Exception as exc:  # a damaged page surfaces here as ArrowInvalid/OSError
                raise UserError(f"'{path}' row group {g} cannot be read ({str(exc).splitlines()[0]}); "
                                "the file is damaged: recreate it") from None
            try:
                table = table.slice(max(0, start_row - group_start)).cast(schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise UserError(f"'{path}' row group {g}: a kept column cannot be written as text "
                                f"({str(exc).splitlines()[0]}); keep only scalar columns") from None
            group_start += n
            while table.num_rows:
                take = min(batch_rows - pending_rows, table.num_rows)
                pending.append(table.slice(0, take))
                pending_rows += take
                table = table.slice(take)
                if pending_rows == batch_rows:
                    yield Batch(pa.concat_tables(pending), first, first + pending_rows)
                    bar.update(pending_rows)
                    first, pending, pending_rows = first + pending_rows, [], 0
        if pending_rows:
            yield Batch(pa.concat_tables(pending), first, first + pending_rows)
            bar.update(pending_rows)


def _csv_rows(path, rows: _Rows, desc) -> Iterator[Batch]:
    csv.field_size_limit(2**31 - 1)  # long documents are legitimate; the default limit is 128 KiB
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f, \
            _progress(desc, os.path.getsize(path), "B") as bar:
        reader = csv.reader(f)
        header = next(reader)
        index = [header.index(c) for c in rows.columns]
        seen, done = 0, 0
        try:
            for record in reader:
                if seen >= rows.start:  # start_row counts data records
                    where = f"line {reader.line_num}"
                    if len(record) != len(header):
                        rows.skip("field_count", where)
                    else:
                        rows.add([record[i] for i in index], where)
                    batch = rows.next_row()
                    if batch is not None:
                        position = f.buffer.tell()
                        bar.update(position - done)
                        done = position
                        yield batch
                seen += 1
        except csv.Error as exc:
            raise UserError(f"'{path}' line {reader.line_num} is not valid CSV ({exc}); fix the quoting there") from None


def _json_row(rows: _Rows, obj, where: str) -> None:
    if not isinstance(obj, dict):
        return rows.skip("not_object", where)
    rows.add([obj.get(c) for c in rows.columns], where)


def _line_rows(path, rows: _Rows, desc, parse) -> Iterator[Batch]:
    with open(path, "rb") as f, _progress(desc, os.path.getsize(path), "B") as bar:
        for number, raw in enumerate(f, start=1):
            if number > rows.start:
                bar.update(len(raw))
                text = raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
                where = f"line {number}"
                if parse is None:
                    if text.strip():  # blank lines separate nothing in one-document-per-line text
                        rows.add([text], where)
                elif text.strip():
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError:
                        rows.skip("invalid_utf8" if _SURROGATE.search(text) else "invalid_json", where)
                    else:
                        parse(rows, obj, where)
                batch = rows.next_row()
                if batch is not None:
                    yield batch


def _array_rows(path, rows: _Rows, desc) -> Iterator[Batch]:
    items = _load_json_array(path)
    with _progress(desc, len(items), "rows", initial=rows.start) as bar:
        for number in range(rows.start, len(items)):
            _json_row(rows, items[number], f"item {number + 1}")
            bar.update(1)
            batch = rows.next_row()
            if batch is not None:
                yield batch


def iter_tables(pf, path: str, batch_rows: int, columns: list[str] | None = None, desc: str | None = None):
    """(row_group, table) pieces of a parquet file with their original types, at most batch_rows each."""
    with _progress(desc, pf.metadata.num_rows, "rows") as bar:
        for g in range(pf.num_row_groups):
            try:
                for record_batch in pf.iter_batches(batch_size=max(1, batch_rows), row_groups=[g], columns=columns):
                    bar.update(record_batch.num_rows)
                    yield g, pa.Table.from_batches([record_batch])
            except (pa.ArrowInvalid, OSError) as exc:  # a damaged page surfaces while reading
                raise UserError(f"'{path}' row group {g} cannot be read ({str(exc).splitlines()[0]}); "
                                "the file is damaged: recreate it") from None

