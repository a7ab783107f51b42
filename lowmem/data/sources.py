"""The one registry of data sources: what a data argument names, what kind of data a file holds, and the
sample source that reads it. Training, validation, `evaluate`, `prepare stats` and `generate --batch_file`
all open their files here.

A data argument (`--train_file`, `--validation_file`, `evaluate FILE`) is a file, a directory (its
.parquet, .jsonl and token .bin files, sorted), a glob (`data/train-*.parquet`), or a comma-separated
list of those: all of it is one dataset whose files stream one after another. Giving every entry a
weight (`data/zh/:0.7,code/*.parquet:0.2,qa.parquet:0.1`) makes each entry a dataset of a weighted
mixture; a `--config` file can list them as `datasets: [{path, weight, name, <x>_column, format}]`.

A file's container is read from its first bytes (parquet magic, JSON lines, a token-file index) and its
kind from its columns (the same rule for parquet columns and jsonl fields; a jsonl's fields are the keys
of its first HEAD_ROWS rows together, so a first row missing a field does not decide the kind):
  messages / conversations   multi-turn chat (OpenAI roles, or ShareGPT from/value)
  user_id + target           user-modeling records (lowmem/data/sft.py)
  prompt + response          single-turn SFT
  text                       plain text (pretraining)
plus packed token files (`prepare tokenize` of text) and tokenize-once SFT caches (`prepare tokenize` of
SFT data). Column names come from --prompt_column/--response_column/--text_column/--messages_column or
a dataset's own `<x>_column`. A new format is one rule in detect_kind and a reader class.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

from ..run.errors import UserError
from .options import Columns, DataOptions

PRETRAIN_KINDS = ("text", "tokens")
SFT_KINDS = ("prompt_response", "messages", "sharegpt", "records", "sft_cache")
PREFERENCE_KINDS = ("preference",)  # a prompt and a chosen and a rejected answer (lowmem/data/pairs.py)
KINDS = PRETRAIN_KINDS + SFT_KINDS + PREFERENCE_KINDS + ("prompts",)  # prompts: for generate --batch_file
TABLE_FORMATS = ("parquet", "jsonl")
COLUMN_FLAGS = ("prompt_column", "response_column", "text_column", "messages_column", "chosen_column",
                "rejected_column")
SPEC_KEYS = ("path", "weight", "name", "format") + COLUMN_FLAGS
HEAD_ROWS = 1000  # jsonl rows whose keys, together, decide the file's columns (a bounded read, never the file)
_WEIGHTED = re.compile(r"^(?P<path>.+):(?P<weight>\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)$")


@dataclass
class DatasetSpec:
    """One dataset of a data argument: its files, weight, name and column names."""

    paths: list[str]
    name: str
    weight: float | None = None
    columns: dict[str, str] = field(default_factory=dict)  # prompt_column etc. that differ from the flags
    format: str | None = None  # a kind from KINDS that overrides detection

    def column(self, columns: Columns, flag: str) -> str:
        return self.columns.get(flag) or getattr(columns, flag)


@dataclass
class DataInputs:
    """The datasets a run reads, parsed once from its data arguments."""

    train: list[DatasetSpec]
    validation: list[DatasetSpec]


# ---------------------------------------------------------------- what a data argument names

def _dataset_name(entry: str) -> str:
    entry = entry.rstrip("/")
    base = os.path.basename(entry) or entry
    for ext in (".parquet", ".jsonl", ".bin", ".json"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return re.sub(r"[^\w.-]+", "_", base).strip("_") or "data"


def _is_token_index(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and ("dtype" in index and "n_tokens" in index or index.get("kind") == "sft_cache")


def _directory_files(directory: str) -> list[str]:
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    files = [os.path.join(directory, n) for n in names if n.endswith((".parquet", ".jsonl"))]
    files += [os.path.join(directory, n) for n in names
              if n.endswith(".bin") and os.path.isfile(os.path.join(directory, n[: -len(".bin")] + ".json"))]
    return sorted(files)


def _report(problems: list[str] | None, message: str) -> None:
    """Raise the problem, or add it to `problems` when the caller collects them all for one message."""
    if problems is None:
        raise UserError(message)
    problems.append(message)


def expand(entry: str, flag: str, problems: list[str] | None = None) -> list[str]:
    """The files one entry names: itself, a directory's data files, or a glob's matches (sorted).

    With `problems`, a missing entry is added there and gives [] instead of raising.
    """
    entry = entry.strip()
    if os.path.isdir(entry):
        files = _directory_files(entry)
        if not files:
            _report(problems, f"--{flag}: directory '{entry}' holds no .parquet, .jsonl or token .bin files")
        return files
    if any(ch in entry for ch in "*?["):
        files = sorted(p for p in glob.glob(entry) if os.path.isfile(p))
        if not files:
            _report(problems, f"--{flag}: the pattern '{entry}' matches no file")
        return files
    if os.path.isfile(entry):
        return [entry]
    for suffix in (".bin", ".json"):  # a token file or SFT cache named by its prefix
        if os.path.isfile(entry + suffix) and _is_token_index(entry + ".json"):
            return [entry + ".json"]
    _report(problems, f"--{flag}: data file '{entry}' does not exist; check the path")
    return []


def parse_data_arg(value: str, flag: str, problems: list[str] | None = None) -> list[DatasetSpec]:
    """Datasets named by one data argument (see the module docstring); [] for an empty argument.

    With `problems`, every problem is added there (and the datasets it concerns left out) instead of raising.
    """
    entries = [e.strip() for e in str(value or "").split(",") if e.strip()]
    if not entries:
        return []
    weighted = [_WEIGHTED.match(e) for e in entries]
    if not any(weighted):
        paths = [p for e in entries for p in expand(e, flag, problems)]
        return [DatasetSpec(paths, _dataset_name(entries[0]))] if paths else []
    if not all(weighted):
        bare = entries[weighted.index(None)]
        _report(problems, f"--{flag}: '{bare}' has no weight while other entries do; give every dataset of a "
                          "mixture a weight (path:0.5,...) or none (then all files form one dataset)")
        for m, e in zip(weighted, entries):  # still name the paths that are missing
            expand(m["path"] if m else e, flag, problems)
        return []
    specs = []
    for m in weighted:
        paths = expand(m["path"], flag, problems)
        if paths:
            specs.append(DatasetSpec(paths, _dataset_name(m["path"]), float(m["weight"])))
    return _unique_names(specs)


def specs_from_list(items: list, flag: str, problems: list[str] | None = None) -> list[DatasetSpec]:
    """Datasets listed in a config file: [{path, weight, name, prompt_column, ..., format}].

    With `problems`, every bad entry is added there (and left out) instead of raising.
    """
    specs = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or "path" not in item:
            _report(problems, f"{flag} entry {number} must be a mapping with a 'path' (and a 'weight'), got {item!r}")
            continue
        unknown = sorted(set(item) - set(SPEC_KEYS))
        wrong = []
        if unknown:
            wrong.append(f"{flag} entry {number} has unknown key(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(SPEC_KEYS)}")
        if item.get("format") is not None and item["format"] not in KINDS:
            wrong.append(f"{flag} entry {number}: format '{item['format']}' is unknown; "
                         f"choose one of {', '.join(KINDS)}")
        weight = item.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            wrong.append(f"{flag} entry {number}: weight must be a number, got {weight!r}")
        for message in wrong:
            _report(problems, message)
        paths = [p for e in str(item["path"]).split(",") if e.strip() for p in expand(e, flag, problems)]
        if wrong or not paths:
            continue
        specs.append(DatasetSpec(paths, str(item.get("name") or _dataset_name(str(item["path"]).split(",")[0])),
                                 None if weight is None else float(weight),
                                 {k: str(item[k]) for k in COLUMN_FLAGS if item.get(k)}, item.get("format")))
    if len(items) > 1 and any(isinstance(i, dict) and i.get("weight") is None for i in items):
        _report(problems, f"{flag}: with several datasets every one needs a weight")
    return _unique_names(specs)


def parse_inputs(train_file: str, datasets: list[dict], validation_file: str, validation_datasets: list[dict],
                 held_out_split: bool, problems: list[str] | None = None) -> DataInputs:
    """The training and validation datasets of a run, with every problem of both arguments named at once.

    A `datasets` list wins over train_file and `validation_datasets` over validation_file. With
    held_out_split (records split off their own validation part with --val_ratio) no validation argument
    is read. Problems go into `problems` when given (the caller adds its own and raises once); otherwise
    they raise here as one UserError.
    """
    found: list[str] = []
    train = specs_from_list(datasets, "datasets", found) if datasets else \
        parse_data_arg(train_file, "train_file", found)
    if held_out_split:
        validation = []
    elif validation_datasets:
        validation = specs_from_list(validation_datasets, "validation_datasets", found)
    else:
        validation = parse_data_arg(validation_file, "validation_file", found)
    if problems is not None:
        problems.extend(found)
    elif found:
        raise UserError(f"{len(found)} input(s) missing: " + "; ".join(found))
    return DataInputs(train, validation)


def _unique_names(specs: list[DatasetSpec]) -> list[DatasetSpec]:
    seen: dict[str, int] = {}
    for spec in specs:
        count = seen.get(spec.name, 0)
        seen[spec.name] = count + 1
        if count:
            spec.name = f"{spec.name}_{count + 1}"
    return specs


# ---------------------------------------------------------------- what a file holds

def container(path: str) -> str:
    """'parquet', 'jsonl', 'tokens' or 'sft_cache', from the file's content (the extension only breaks ties)."""
    if path.endswith((".bin", ".json")):
        index = path[: -len(".bin")] + ".json" if path.endswith(".bin") else path
        if os.path.isfile(index) and _is_token_index(index):
            with open(index, encoding="utf-8") as f:
                return "sft_cache" if json.load(f).get("kind") == "sft_cache" else "tokens"
    if os.path.getsize(path) == 0:
        return "parquet" if path.endswith(".parquet") else "jsonl"  # empty shard: skipped and counted later
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"PAR1":
        return "parquet"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        return "jsonl"
    raise UserError(f"data file '{path}' is neither parquet, JSON lines, nor a token file; convert it with "
                    "`train_low_mem.py prepare convert` (csv/json/txt) or `prepare tokenize`")


def head_rows(path: str, fmt: str, limit: int = HEAD_ROWS) -> list[dict]:
    """The first readable rows of a table file: up to `limit` jsonl objects, or a parquet file's first row."""
    if fmt == "parquet":
        from .tables import open_parquet

        pf = open_parquet(path)
        for batch in pf.iter_batches(batch_size=1):
            rows = batch.to_pylist()
            if rows:
                return rows
        return [{name: None for name in pf.schema_arrow.names}]
    from .tables import parse_jsonl_line

    rows = []
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                row = parse_jsonl_line(line)
                if "_skip" not in row:
                    rows.append(row)
                    if len(rows) >= limit:
                        break
    return rows


def field_names(path: str, fmt: str) -> list[str]:
    """A parquet file's columns; a jsonl file's keys over its first HEAD_ROWS rows (a first row may lack some)."""
    if fmt == "parquet":
        from .tables import open_parquet

        return list(open_parquet(path).schema_arrow.names)
    return list(dict.fromkeys(key for row in head_rows(path, fmt) for key in row))


def _looks_sharegpt(path: str, fmt: str, column: str) -> bool:
    value = next((row[column] for row in head_rows(path, fmt) if row.get(column) is not None), None)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "from" in value[0]


def detect_kind(path: str, fmt: str, spec: DatasetSpec, columns: Columns) -> tuple[str, dict[str, str]]:
    """(kind, canonical key -> column) of a table file, by its columns: the one column rule."""
    names = field_names(path, fmt)
    col = {flag: spec.column(columns, flag) for flag in COLUMN_FLAGS}
    system = {"system": "system"} if "system" in names else {}
    forced = spec.format
    answers = {col["chosen_column"], col["rejected_column"]}
    if forced in (None, "preference") and len(answers & set(names)) == 1:
        have, lack = sorted(answers & set(names))[0], sorted(answers - set(names))[0]
        raise UserError(f"data file '{path}' has a '{have}' column but no '{lack}' column; preference pairs need a "
                        "prompt, a chosen and a rejected answer (name them with --chosen_column/--rejected_column)")
    if forced in (None, "preference") and answers <= set(names):  # before messages: its prompt may be a messages column
        prompt = next((c for c in (col["prompt_column"], col["messages_column"], "messages") if c in names), None)
        if prompt is not None:
            return "preference", {"prompt": prompt, "chosen": col["chosen_column"], "rejected": col["rejected_column"],
                                  **system}
    if forced in (None, "messages", "sharegpt"):
        for column in (col["messages_column"], "messages", "conversations"):
            if column in names:
                sharegpt = forced == "sharegpt" or (forced is None and (column == "conversations"
                                                                        or _looks_sharegpt(path, fmt, column)))
                return ("sharegpt", {"conversations": column, **system}) if sharegpt else \
                    ("messages", {"messages": column, **system})
    if forced in (None, "records") and {"user_id", "target"} <= set(names):
        return "records", {}
    if forced in (None, "prompt_response") and {col["prompt_column"], col["response_column"]} <= set(names):
        return "prompt_response", {"prompt": col["prompt_column"], "response": col["response_column"], **system}
    if forced in (None, "text") and col["text_column"] in names:
        return "text", {"text": col["text_column"]}
    if forced in (None, "prompts") and col["prompt_column"] in names:
        return "prompts", {"prompt": col["prompt_column"], **system}
    wanted = f"format '{forced}'" if forced else (
        f"messages or conversations, user_id+target, {col['prompt_column']}+{col['response_column']}, "
        f"{col['prompt_column']}+{col['chosen_column']}+{col['rejected_column']}, or {col['text_column']}")
    raise UserError(f"data file '{path}' has columns {sorted(names)}, none of which fit {wanted}; name the columns "
                    "with --prompt_column/--response_column/--text_column/--messages_column/--chosen_column/"
                    "--rejected_column")


@dataclass
class Dataset:
    """A resolved dataset: its spec, its kind and the source that reads it."""

    spec: DatasetSpec
    kind: str
    source: object

    @property
    def name(self) -> str:
        return self.spec.name


def open_dataset(spec: DatasetSpec, options: DataOptions, tokenizer=None, is_encoder_decoder: bool = False,
                 shuffle: bool = True, flag: str = "train_file", log=print) -> Dataset:
    """The sample source of one dataset; every file of it must hold the same kind of data."""
    formats = {p: container(p) for p in spec.paths}
    kinds = set(formats.values())
    if len(kinds) > 1:
        odd = next(p for p in spec.paths if formats[p] != formats[spec.paths[0]])
        raise UserError(f"--{flag}: '{odd}' is {formats[odd]} but '{spec.paths[0]}' is {formats[spec.paths[0]]}; "
                        "one dataset's files must share a format (use a mixture for several)")
    fmt = kinds.pop()
    if fmt == "tokens":
        from .stream import TokenWindows

        windows = TokenWindows(spec.paths, options.max_seq_len, options.seed, shuffle, spec.name)
        return Dataset(spec, "tokens", windows)
    if fmt == "sft_cache":
        from .sft_cache import CachedSamples

        if len(spec.paths) != 1:
            raise UserError(f"--{flag}: pass one tokenize-once cache per dataset, got {len(spec.paths)}")
        cache = CachedSamples(spec.paths[0], options, tokenizer, shuffle, spec.name)
        return Dataset(spec, "sft_cache", cache)
    nonempty = [p for p in spec.paths if os.path.getsize(p) > 0]
    if not nonempty:
        listed = ", ".join(f"'{p}'" for p in spec.paths[:3]) + (" ..." if len(spec.paths) > 3 else "")
        raise UserError(f"--{flag}: data file {listed} is empty (0 bytes); point it at data")
    kind, columns = detect_kind(nonempty[0], fmt, spec, options.columns)
    if kind == "records":
        from .sft import open_records

        records = open_records(spec.paths, options, tokenizer, is_encoder_decoder, shuffle, log)
        return Dataset(spec, "records", records)
    from .tables import ShardTable

    table = ShardTable(spec.paths, columns, fmt, options.buffer_size, options.seed, shuffle, spec.name)
    return Dataset(spec, kind, table)


def data_group(kind: str) -> str:
    return "pretraining" if kind in PRETRAIN_KINDS else "preference" if kind in PREFERENCE_KINDS else "SFT"
