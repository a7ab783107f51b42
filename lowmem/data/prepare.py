"""Prepare raw data: convert to parquet, clean, split, describe, and train a tokenizer on a sample.

Every tool streams its input (one batch or row group at a time), shows a progress bar on a
terminal, prints a short summary and returns it as a dict. Parquet the tools write has row
groups of `row_group_size` rows so the trainer's streaming reader holds one row group at a time.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..run.errors import UserError
from .parquet_sink import ParquetSink
from .rawio import (
    DEFAULT_ROW_GROUP_SIZE,
    as_list,
    check_columns,
    describe_skips,
    file_format,
    iter_batches,
    iter_tables,
    merge_skips,
    open_parquet,
    string_columns,
)

# Unicode category Cc without tab and newline: invisible bytes that only confuse a tokenizer
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SPLITS = ("train", "valid", "test")


def _print_summary(title: str, lines: dict) -> None:
    print(f"{title}:")
    for key, value in lines.items():
        print(f"  {key}: {value}")


def _check_output(input: str, output: str) -> None:
    if not str(output).endswith(".parquet"):
        raise UserError(f"output '{output}' must end with .parquet")
    if os.path.abspath(input) == os.path.abspath(output):
        raise UserError(f"output '{output}' is the input file; write to a new path")


def convert(input: str, output: str, prompt_column: str = "prompt", response_column: str = "response",
            text_column: str | None = None, keep_columns=None, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
            strict: bool = False) -> dict:
    """csv / json / jsonl / parquet / txt -> parquet with columns prompt,response (or text).

    Source columns are renamed to the standard names; `keep_columns` (e.g. user_id) are copied as
    text. A .json file must hold one JSON array and is loaded whole; use .jsonl for large data,
    which is streamed like csv and parquet. A .txt file is one document per line (text only).
    Unreadable rows are skipped and counted (strict=True: the first is an error). Nulls are kept;
    `clean` removes them.
    """
    if text_column is None and file_format(input) == "txt":
        text_column = "text"
    sources = [text_column] if text_column else [prompt_column, response_column]
    targets = ["text"] if text_column else ["prompt", "response"]
    keep = [k for k in as_list(keep_columns) or [] if k not in sources]
    if len(set(sources)) < len(sources) or set(keep) & set(targets):
        raise UserError(f"columns {sources} and --keep_columns={keep} overlap; each output column "
                        f"({targets + keep}) must come from a different source column")
    _check_output(input, output)
    schema = pa.schema([(name, pa.string()) for name in targets + keep])
    skipped, nulls, rows_read = {}, dict.fromkeys(targets, 0), 0
    with ParquetSink(output, schema, row_group_size) as sink:
        for batch in iter_batches(input, [str(c) for c in sources], row_group_size, strict, keep=keep, desc="convert"):
            table = batch.table.rename_columns(targets + keep)
            for name in targets:
                nulls[name] += table.column(name).null_count
            sink.write(table)
            merge_skips(skipped, batch.skipped)
            rows_read = batch.row_end
        if sink.rows == 0:
            raise UserError(f"'{input}' has no readable rows (skipped: {describe_skips(skipped)}); check the file")
    summary = {"input": input, "output": output, "rows_read": rows_read, "rows_written": sink.rows,
               "nulls": nulls, "skipped": {k: v[0] for k, v in skipped.items()}}
    _print_summary("convert", {**summary, "skipped": describe_skips(skipped)})
    return summary


def _text_columns(pf, path: str, columns) -> list[str]:
    schema = pf.schema_arrow
    names = as_list(columns) or string_columns(schema)
    if not names:
        raise UserError(f"'{path}' has no string columns (it has {schema.names}); convert it first")
    check_columns(path, names, list(schema.names), schema)
    return names


def clean(input: str, output: str, dedup: bool = False, min_chars: int = 0, max_chars: int | None = None,
          columns=None, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> dict:
    """Drop bad rows of a parquet file and strip control characters; other columns pass through.

    Rules, applied to each checked column (default: every string column) in this order, a row is
    dropped when one field is: null; empty or only whitespace after control characters (Unicode
    Cc except tab and newline) are removed; shorter than min_chars; longer than max_chars; or
    (dedup=True) the whole row equals an earlier one. Dedup keeps a set of 16-byte BLAKE2 hashes of
    the cleaned values, so memory grows with the unique rows: about 100 bytes each in Python,
    roughly 1 GB for 10M unique rows.
    """
    _check_output(input, output)
    pf = open_parquet(input)
    names = _text_columns(pf, input, columns)
    schema = pf.schema_arrow
    removed = dict.fromkeys(["null", "empty", "too_short", "too_long", "duplicate"], 0)
    seen: set[bytes] = set()
    stripped = rows_in = 0
    with ParquetSink(output, schema, row_group_size) as sink:
        for _, table in iter_tables(pf, input, row_group_size, desc="clean"):
            rows_in += table.num_rows
            values = [table.column(name).to_pylist() for name in names]
            keep, cleaned_columns = [], [[] for _ in names]
            for row in zip(*values):
                reason = None
                if any(v is None for v in row):
                    reason = "null"
                else:
                    cleaned = [CONTROL_CHARS.sub("", v) for v in row]
                    stripped += cleaned != list(row)
                    if any(not v.strip() for v in cleaned):
                        reason = "empty"
                    elif any(len(v) < min_chars for v in cleaned):
                        reason = "too_short"
                    elif max_chars is not None and any(len(v) > max_chars for v in cleaned):
                        reason = "too_long"
                    elif dedup:
                        # control characters are gone, so "\0" cannot occur inside a value
                        digest = hashlib.blake2b("\0".join(cleaned).encode("utf-8"), digest_size=16).digest()
                        if digest in seen:
                            reason = "duplicate"
                        else:
                            seen.add(digest)
                keep.append(reason is None)
                if reason is None:
                    for column, value in zip(cleaned_columns, cleaned):
                        column.append(value)
                else:
                    removed[reason] += 1
            kept = table.filter(pa.array(keep, pa.bool_()))
            for name, column in zip(names, cleaned_columns):
                field = schema.field(name)
                kept = kept.set_column(schema.get_field_index(name), field,
                                       pa.array(column, pa.string()).cast(field.type))
            sink.write(kept)
    summary = {"input": input, "output": output, "rows_in": rows_in, "rows_out": sink.rows, "removed": removed,
               "rows_with_control_chars_stripped": stripped, "columns": names}
    _print_summary("clean", summary)
    return summary


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_fractions(seed: int, start: int, n: int) -> np.ndarray:
    """A uniform number in [0, 1) per row index, a pure function of (seed, index)."""
    base = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    index = np.arange(start, start + n, dtype=np.uint64)
    return (_splitmix64(index * np.uint64(0x9E3779B97F4A7C15) + base) >> np.uint64(11)) / float(2**53)


def group_fraction(seed: int, value) -> float:
    """A uniform number in [0, 1) per group value; rows without a value form one group."""
    key = f"{seed}\0{'<null>' if value is None else value}".encode("utf-8")
    return (int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 11) / float(2**53)


class _SplitTally:
    """Rows per split and the extreme hash values seen: enough to say which ratio would fill an empty split."""

    def __init__(self, valid_ratio: float, test_ratio: float):
        self.valid_ratio, self.test_ratio = valid_ratio, test_ratio
        self.rows = dict.fromkeys(SPLITS, 0)
        self.lowest, self.highest = 1.0, 0.0
        self.lowest_above_test = 1.0  # the smallest hash a larger valid_ratio would reach first

    def codes(self, u: np.ndarray) -> np.ndarray:
        """0 train, 1 valid, 2 test for each hash value."""
        t, v = self.test_ratio, self.valid_ratio
        code = np.where(u < t, 2, np.where(u < t + v, 1, 0))
        for index, name in enumerate(SPLITS):
            self.rows[name] += int((code == index).sum())
        if len(u):
            self.lowest, self.highest = min(self.lowest, float(u.min())), max(self.highest, float(u.max()))
            above = u[u >= t]
            if len(above):
                self.lowest_above_test = min(self.lowest_above_test, float(above.min()))
        return code


def _ratio_above(x: float) -> float:
    """The shortest decimal (two significant digits) strictly above x."""
    decimals = max(2, 1 - math.floor(math.log10(x))) if x > 0 else 2
    return (math.floor(x * 10**decimals) + 1) / 10**decimals


def _ratio_below(x: float) -> float:
    """The shortest decimal (two significant digits) strictly below x; 0 when there is none."""
    decimals = max(2, 1 - math.floor(math.log10(x))) if x > 0 else 2
    return max(0.0, (math.ceil(x * 10**decimals) - 1) / 10**decimals)


def _count_groups(pf, input: str, group_column: str, batch_rows: int) -> int:
    """Distinct values of the group column (read again only to word an error)."""
    seen: set = set()
    for _, table in iter_tables(pf, input, batch_rows, columns=[group_column]):
        seen.update(pc.unique(pc.cast(table.column(group_column), pa.string())).to_pylist())
    return len(seen)


def _check_split_sizes(tally: _SplitTally, wanted: list[str], units: str, kind: str, seed: int) -> None:
    """A UserError naming the first split that came out empty, and a ratio that would give it one of `kind`."""
    empty = next((name for name in wanted if tally.rows[name] == 0), None)
    if empty is None:
        return
    t, v = tally.test_ratio, tally.valid_ratio
    if empty == "train":
        fits = _ratio_below(tally.highest)
        fix = (f"lower --valid_ratio and --test_ratio so they sum to at most {fits:g}" if fits > 0
               else "give it more data")
        raise UserError(f"split: train.parquet would be empty: --valid_ratio={v:g} and --test_ratio={t:g} take all "
                        f"{units} (seed {seed}); {fix}")
    if empty == "valid":
        flag, ratio, needed = "valid_ratio", v, _ratio_above(tally.lowest_above_test - t)
        train_start = t + needed  # hashes from here on still go to train
    else:
        flag, ratio, needed = "test_ratio", t, _ratio_above(tally.lowest)
        train_start = needed + v
    fix = (f"--{flag}={needed:g} or more would give it at least one" if train_start <= tally.highest
           else f"there are too few {kind} for a {empty} split: add data or drop --{flag}")
    raise UserError(f"split: {empty}.parquet would be empty: --{flag}={ratio:g} puts none of the {units} there "
                    f"(seed {seed}); {fix}")


def _check_group_column(input: str, group_column: str, names: list[str]) -> None:
    if group_column not in names:
        raise UserError(f"'{input}' has no column '{group_column}' (its columns are {names}); `prepare convert` "
                        f"keeps only prompt/response (or text) unless given --keep_columns={group_column}: "
                        "convert again with it, or pass another --group_column")


def split(input: str, output_dir: str, valid_ratio: float = 0.05, test_ratio: float = 0.0, seed: int = 42,
          group_column: str | None = None, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> dict:
    """Split a parquet file into output_dir/{train,valid,test}.parquet, streaming and deterministic.

    Each row (or, with group_column, each group value) gets a seeded hash in [0, 1): below
    test_ratio goes to test, below test_ratio+valid_ratio to valid, the rest to train. With a
    group column all rows of one group land in the same split. valid/test files are written only
    when their ratio is above 0; a split that would come out empty is an error and nothing is written.
    """
    valid_ratio, test_ratio = float(valid_ratio), float(test_ratio)
    if valid_ratio < 0 or test_ratio < 0 or valid_ratio + test_ratio >= 1:
        raise UserError(f"valid_ratio={valid_ratio} and test_ratio={test_ratio} must be >= 0 and sum below 1")
    pf = open_parquet(input)
    if group_column is not None:
        _check_group_column(input, str(group_column), list(pf.schema_arrow.names))
    wanted = [name for name, ratio in zip(SPLITS, (1.0, valid_ratio, test_ratio)) if ratio > 0]
    paths = {name: os.path.join(output_dir, f"{name}.parquet") for name in wanted}
    tally, offset = _SplitTally(valid_ratio, test_ratio), 0
    with contextlib.ExitStack() as stack:
        sinks = {name: stack.enter_context(ParquetSink(path, pf.schema_arrow, row_group_size))
                 for name, path in paths.items()}
        for _, table in iter_tables(pf, input, row_group_size, desc="split"):
            if group_column is None:
                u = row_fractions(int(seed), offset, table.num_rows)
            else:
                groups = pc.cast(table.column(str(group_column)), pa.string()).to_pylist()
                cache: dict = {}
                u = np.array([cache[g] if g in cache else cache.setdefault(g, group_fraction(int(seed), g))
                              for g in groups])
            code = tally.codes(u)
            for index, name in enumerate(SPLITS):
                if name in sinks:
                    sinks[name].write(table.filter(pa.array(code == index)))
            offset += table.num_rows
        if offset == 0:
            raise UserError(f"'{input}' has no rows to split")
        units, kind = f"{offset} rows", "rows"
        if group_column is not None and any(tally.rows[name] == 0 for name in wanted):
            units = f"{_count_groups(pf, input, str(group_column), row_group_size)} groups ({offset} rows)"
            kind = f"groups of --group_column={group_column}"
        _check_split_sizes(tally, wanted, units, kind, int(seed))  # raising here discards every file written
    counts = {name: tally.rows[name] for name in wanted}
    summary = {"input": input, "rows": offset, "rows_per_split": counts, "files": paths,
               "group_column": group_column, "seed": seed}
    _print_summary("split", summary)
    return summary


class _LengthCounts:
    """Exact length distribution as counts per length: memory grows with the longest text, not the rows."""

    def __init__(self):
        self.counts = np.zeros(1, dtype=np.int64)

    def add(self, lengths: np.ndarray) -> None:
        if len(lengths):
            more = np.bincount(lengths.astype(np.int64))
            if len(more) > len(self.counts):
                more[:len(self.counts)] += self.counts
                self.counts = more
            else:
                self.counts[:len(more)] += more

    def describe(self) -> dict:
        total = int(self.counts.sum())
        if total == 0:
            return {"count": 0}
        cumulative = np.cumsum(self.counts)
        # nearest rank: the smallest length at or below which q of the texts fall
        result = {f"p{int(q * 100)}": int(np.searchsorted(cumulative, q * total)) for q in (0.5, 0.9, 0.99)}
        result["max"] = int(np.flatnonzero(self.counts)[-1])
        result["mean"] = round(float((self.counts * np.arange(len(self.counts))).sum() / total), 2)
        result["count"] = total
        return result


def stats(input: str, tokenizer_dir: str | None = None, histogram_png: str | None = None, columns=None,
          batch_rows: int = DEFAULT_ROW_GROUP_SIZE) -> dict:
    """Rows, nulls per column and length percentiles (characters, and tokens with a tokenizer) of a parquet file.

    Percentiles are exact (nearest rank) from per-length counts; nulls are left out of lengths.
    histogram_png saves a length histogram per text column.
    """
    pf = open_parquet(input)
    names = _text_columns(pf, input, columns)
    tokenizer = None
    if tokenizer_dir:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer_dir))
    nulls = dict.fromkeys(pf.schema_arrow.names, 0)
    chars = {name: _LengthCounts() for name in names}
    tokens = {name: _LengthCounts() for name in names} if tokenizer else {}
    for _, table in iter_tables(pf, input, batch_rows, desc="stats"):
        for name in table.column_names:
            nulls[name] += table.column(name).null_count
        for name in names:
            present = table.column(name).drop_null()
            chars[name].add(pc.utf8_length(present).to_numpy(zero_copy_only=False))
            if tokenizer is not None:
                ids = tokenizer(present.to_pylist(), add_special_tokens=False)["input_ids"]
                tokens[name].add(np.array([len(x) for x in ids], dtype=np.int64))
    lengths = {name: {"chars": chars[name].describe(), **({"tokens": tokens[name].describe()} if tokens else {})}
               for name in names}
    if histogram_png:
        _save_histogram(str(histogram_png), chars, tokens)
    summary = {"input": input, "rows": pf.metadata.num_rows, "nulls": nulls, "lengths": lengths,
               "histogram_png": histogram_png}
    _print_summary("stats", summary)
    return summary


def _save_histogram(path: str, chars: dict, tokens: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    kinds = [("characters", chars)] + ([("tokens", tokens)] if tokens else [])
    fig, axes = plt.subplots(len(chars), len(kinds), figsize=(5 * len(kinds), 3 * len(chars)), squeeze=False)
    for row, name in enumerate(chars):
        for col, (unit, table) in enumerate(kinds):
            counts = table[name].counts
            ax = axes[row][col]
            ax.hist(np.arange(len(counts)), bins=min(60, max(1, len(counts))), weights=counts)
            ax.set_title(f"{name}: length in {unit}")
            ax.set_xlabel(unit)
            ax.set_ylabel("rows")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def train_tokenizer(input: str, output_dir: str, vocab_size: int = 8000, sample_rows: int = 200_000, columns=None,
                    seed: int = 42, strict: bool = False) -> dict:
    """Train a byte-level BPE tokenizer on a uniform sample of at most sample_rows rows.

    Reads parquet / jsonl / csv / txt in a stream and keeps a seeded reservoir sample, so memory
    is bounded by sample_rows, not the corpus. A row's text is its non-empty column values
    (default: 'text', else prompt and response) joined by a newline.
    """
    sample_rows = int(sample_rows)
    if sample_rows < 1:
        raise UserError(f"sample_rows={sample_rows} must be at least 1")
    rng = random.Random(int(seed))
    sample: list[str] = []
    seen, skipped = 0, {}
    for batch in iter_batches(input, as_list(columns), DEFAULT_ROW_GROUP_SIZE, strict, desc="sample"):
        merge_skips(skipped, batch.skipped)
        values = [batch.table.column(i).to_pylist() for i in range(batch.table.num_columns)]
        for row in zip(*values):
            text = "\n".join(v for v in row if v)
            if not text.strip():
                continue
            if seen < sample_rows:
                sample.append(text)
            else:
                slot = rng.randrange(seen + 1)
                if slot < sample_rows:
                    sample[slot] = text
            seen += 1
    if not sample:
        raise UserError(f"'{input}' has no non-empty text to train a tokenizer on; check --columns")
    from .tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(iter(sample), int(vocab_size), str(output_dir))
    summary = {"input": input, "output_dir": output_dir, "rows_with_text": seen, "rows_sampled": len(sample),
               "vocab_size": len(tokenizer), "vocab_size_asked": int(vocab_size),
               "skipped": {k: v[0] for k, v in skipped.items()}}
    _print_summary("train_tokenizer", {**summary, "skipped": describe_skips(skipped)})
    if len(tokenizer) < int(vocab_size):
        # BPE stops when no pair occurs often enough to merge: the data, not a bug, sets the size
        print(f"note: vocabulary has {len(tokenizer)} entries, fewer than the {int(vocab_size)} asked: the data has "
              "no more merges (train on more text, or ask for a smaller --vocab_size)")
    return summary
