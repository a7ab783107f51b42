"""Building a tokenize-once SFT cache (`prepare tokenize` of prompt/response or conversation files).

The cache's files and how training reads them are described in lowmem/data/sft_cache.py; this module
reads the source through the data registry and writes those files, resuming an interrupted build.
"""
from __future__ import annotations

import os

import numpy as np

from ..run.errors import UserError
from .encoding import SampleEncoder, Skipped
from .options import Columns, DataOptions
from .sft_cache import CACHE_KINDS, FORMAT_VERSION, ROW, cache_files, template_hash, tokenizer_hash
from .sources import open_dataset, parse_data_arg
from .tables import ShardTable
from .token_file import _read_index, _write_index, in_order_pool, split_prefix, token_dtype
from .tokenizer import load_tokenizer

_WORKER: dict = {}


def _init_worker(table_args: tuple, encoder_args: tuple) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool already uses every core
    paths, columns, fmt = table_args
    tokenizer_dir, *settings = encoder_args
    _WORKER["table"] = ShardTable(paths, columns, fmt, 1 << 30, 0, shuffle=False)  # file order, no windows
    _WORKER["encoder"] = SampleEncoder(load_tokenizer(tokenizer_dir), *settings)


def _encode_unit(u: int) -> tuple[list, list, list]:
    """(ids per row or None, label masks, status text per row) of one unit."""
    rows = _WORKER["table"].unit_rows(u)
    readable = [i for i, row in enumerate(rows) if "_skip" not in row]
    table, encoder = _WORKER["table"], _WORKER["encoder"]
    where = [table.locate(int(table.unit_first[u]) + i) for i in readable] if encoder.strict else readable
    results = iter(encoder.encode_many([rows[i] for i in readable], where))
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
    """Encode every row of an SFT data file (or dir/glob/list) into a tokenize-once cache; resumes when rerun.

    columns: source column names by flag ({"prompt_column": "question", ...}); the others keep their defaults.
    """
    tokenizer_dir = os.path.abspath(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    options = DataOptions(max_seq_len=int(max_seq_len), columns=Columns(**(columns or {})), train_on=train_on,
                          train_on_prompt=train_on_prompt, strict=strict)
    specs = parse_data_arg(input, "input")
    if len(specs) != 1:
        raise UserError(f"--input '{input}' names a weighted mixture; build one cache per dataset")
    dataset = open_dataset(specs[0], options, tokenizer, shuffle=False, flag="input", log=log)
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
