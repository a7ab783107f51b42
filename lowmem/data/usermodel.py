"""User-modeling SFT records: read, build history, sample per user, split (prompts: user_prompts.py).

Record schema: one JSON object per line in a .jsonl file, or one row of a .parquet file (other
fields/columns are ignored):

  user_id    required  str or int (ints become str): whose next message or review is predicted
  target     required  non-empty str: the text to predict (the training response)
  profile    optional  mapping field -> value, or a free-text string
  history    optional  list of the user's earlier items, oldest first; each a string or a mapping
                       {"text": str, "timestamp": sortable}. Absent or null: build_history() fills
                       it from the same user's earlier records; [] means "no history" and is kept
  context    optional  list of dialogue turns before the target; each a string or a mapping
                       {"role": str, "text": str} ("content" is accepted for "text")
  timestamp  optional  number or string (ISO-8601 text sorts correctly); orders a user's records
  item_id    optional  str or int: what the record is about (a movie, a conversation); a user's
                       records with the same item_id are one item for split_by="latest_item"

A row that breaks the schema is skipped and counted per reason (SKIP_REASONS); with strict=True
the first one is a UserError naming the file and row. Whole-file problems (missing file, unknown
extension, unreadable parquet, a parquet without user_id/target columns) are always a UserError.
Records built in code (Record(...)) are checked and normalised the same way and raise BadRow.

Order of a user's records: by timestamp, then file order; if any record of that user has no
timestamp, by file order alone. Numbers sort before strings, so use one kind per dataset.

Prompts (build_prompt) contain exactly the sections the ablation names, in the order profile,
history (oldest first, numbered), context. A requested section with no data for a record is still
rendered, with "(none)" in the simple style and "none." in the detailed one, so every prompt of an
ablation has the same shape. When a prompt is too long, history_limit / fit_prompt drop the oldest
history items first; profile and context are never cut here.

Suggested pipeline: read_records -> build_history (on all records, so history sees every earlier
item) -> split_train_val -> sample_per_user(train, epoch=e) each epoch -> to_prompt_response.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

from ..run.errors import UserError

SPLIT_MODES = ("user", "latest_item")
FIELDS = ("user_id", "target", "profile", "history", "context", "timestamp", "item_id")
SKIP_REASONS = {
    "invalid_utf8": "a line that is not valid UTF-8",
    "invalid_json": "a line that is not valid JSON",
    "not_object": "a line that is not a JSON object",
    "missing_user_id": "no user_id",
    "bad_user_id": "a user_id that is not a string or an integer",
    "missing_target": "no target text",
    "bad_target": "a target that is not a string",
    "bad_profile": "a profile that is not a mapping or a string",
    "bad_history": "a history that is not a list of strings or {text, timestamp} mappings",
    "bad_context": "a context that is not a list of strings or {role, text} mappings",
    "bad_timestamp": "a timestamp that is not a number or a string",
    "bad_item_id": "an item_id that is not a string or an integer",
}


class BadRow(ValueError):
    """A row that breaks the schema; args[0] is a SKIP_REASONS key."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _timestamp(value):
    if value is None or isinstance(value, str):
        return value
    if _is_number(value):
        return None if value != value else value  # NaN is how pandas writes a missing number
    if isinstance(value, (dt.datetime, dt.date)):  # parquet timestamp/date columns arrive as these
        return value.isoformat()
    raise BadRow("bad_timestamp")


def _items(value, reason: str, with_role: bool) -> list[dict]:
    """History items ({text, timestamp?}) or context turns ({role, text}) from strings or mappings."""
    if not isinstance(value, list):
        raise BadRow(reason)
    items = []
    for item in value:
        fields = item if isinstance(item, Mapping) else {}
        text = item if isinstance(item, str) else fields.get("text", fields.get("content"))
        role, ts = fields.get("role"), _timestamp(fields.get("timestamp"))
        if not isinstance(text, str) or not isinstance(role, (str, type(None))):
            raise BadRow(reason)
        stamp = {} if ts is None else {"timestamp": ts}
        items.append({"role": role, "text": text} if with_role else {"text": text, **stamp})
    return items


def _profile(value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items() if v is not None}  # parquet structs pad absent fields with null
    raise BadRow("bad_profile")


@dataclass(frozen=True)
class Record:
    """One sample, validated and normalised on construction (raises BadRow); history None means 'not given'."""

    user_id: str
    target: str
    profile: dict | str | None = None
    history: list[dict] | None = None
    context: list[dict] | None = None
    timestamp: int | float | str | None = None
    item_id: str | int | None = None

    def __post_init__(self):
        # normalising here, not only in the readers, holds records built in code to the same schema
        user, target, item = self.user_id, self.target, self.item_id
        if user is None or (isinstance(user, str) and not user.strip()):
            raise BadRow("missing_user_id")
        if not isinstance(user, (str, int)) or isinstance(user, bool):
            raise BadRow("bad_user_id")
        if target is None or (isinstance(target, str) and not target.strip()):
            raise BadRow("missing_target")
        if not isinstance(target, str):
            raise BadRow("bad_target")
        if item is not None and (not isinstance(item, (str, int)) or isinstance(item, bool)):
            raise BadRow("bad_item_id")
        history = None if self.history is None else _items(self.history, "bad_history", False)
        context = [] if self.context is None else _items(self.context, "bad_context", True)
        for name, value in (("user_id", str(user)), ("profile", _profile(self.profile)), ("history", history),
                            ("context", context), ("timestamp", _timestamp(self.timestamp))):
            object.__setattr__(self, name, value)


def parse_record(row: Mapping) -> Record:
    """A Record from one row mapping (other keys ignored); raises BadRow(reason) for a row that breaks the schema."""
    return Record(**{name: row.get(name) for name in FIELDS})


def _count(skips: dict, reason: str, strict: bool, where: str) -> None:
    if strict:
        raise UserError(f"{where}: {SKIP_REASONS[reason]}; fix that row, or read without strict to skip such rows")
    skips[reason] = skips.get(reason, 0) + 1


def _jsonl_rows(path: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError:  # before ValueError, its base class
                row = BadRow("invalid_utf8")
            except ValueError:
                row = BadRow("invalid_json")
            yield f"{path} line {number}", row if isinstance(row, (dict, BadRow)) else BadRow("not_object")


def _parquet_rows(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow as pa

    from .tables import open_parquet

    pf = open_parquet(path)
    names = pf.schema_arrow.names
    for required in ("user_id", "target"):
        if required not in names:
            raise UserError(f"'{path}' has no '{required}' column (its columns are {names}); rename the column, "
                            "or build records from prompt/response rows with convert_prompt_response")
    is_map = "profile" in names and pa.types.is_map(pf.schema_arrow.field("profile").type)
    row = 0
    for group in range(pf.num_row_groups):  # one row group in memory at a time
        for values in pf.read_row_group(group, columns=[c for c in FIELDS if c in names]).to_pylist():
            row += 1
            if is_map and values["profile"] is not None:  # an Arrow map reads as (key, value) pairs
                values["profile"] = dict(values["profile"])
            yield f"{path} row {row}", values


def iter_records(path: str, strict: bool = False, skips: dict | None = None) -> Iterator[Record]:
    """Stream validated Records from a .jsonl or .parquet file, adding skipped rows to skips (reason -> count)."""
    if not os.path.isfile(path):
        raise UserError(f"records file '{path}' does not exist; check the path")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".parquet"):
        raise UserError(f"records file '{path}' must be .jsonl or .parquet; convert it to one of those")
    skips = {} if skips is None else skips
    for where, row in (_jsonl_rows(path) if ext == ".jsonl" else _parquet_rows(path)):
        try:
            if isinstance(row, BadRow):
                raise row
            record = parse_record(row)
        except BadRow as bad:
            _count(skips, bad.args[0], strict, where)
            continue
        yield record


def read_records(path: str, strict: bool = False) -> tuple[list[Record], dict]:
    """All valid Records of a file and the skipped rows per reason (strict=True: first bad row is a UserError)."""
    skips: dict = {}
    records = list(iter_records(path, strict, skips))
    return records, skips


def describe_skips(skips: dict) -> str:
    return "; ".join(f"{n} {SKIP_REASONS.get(r, r)}" for r, n in sorted(skips.items())) or "none"


def convert_prompt_response(rows: Iterable[Mapping], user_column: str = "user_id", prompt_column: str = "prompt",
                            response_column: str = "response", timestamp_column: str | None = "timestamp",
                            item_column: str | None = None, profile_column: str | None = None,
                            max_history_items: int | None = 50, strict: bool = False) -> tuple[list[Record], dict]:
    """Records from prompt/response rows: context [prompt], target response, history the user's earlier responses."""
    records, skips = [], {}
    for number, row in enumerate(rows, 1):
        if number == 1:
            for column in (user_column, response_column):
                if column not in row:
                    raise UserError(f"prompt/response rows have no '{column}' field (first row has {sorted(row)}); "
                                    "pass the right user_column/response_column")
        prompt = row.get(prompt_column)
        mapped = {"user_id": row.get(user_column), "target": row.get(response_column),
                  "context": None if prompt is None or prompt == "" else [prompt],
                  "timestamp": row.get(timestamp_column) if timestamp_column else None,
                  "item_id": row.get(item_column) if item_column else None,
                  "profile": row.get(profile_column) if profile_column else None}
        try:
            records.append(parse_record(mapped))
        except BadRow as bad:
            _count(skips, bad.args[0], strict, f"prompt/response row {number}")
    return build_history(records, max_history_items), skips


def _check_limit(value, name: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise UserError(f"{name} must be a non-negative integer or None (no limit), got {value!r}; "
                        f"pass e.g. --{name} 20")


def _newest(items: list, limit: int | None) -> list:
    return items if limit is None else items[max(0, len(items) - limit):]


def _groups(records: list[Record]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.user_id, []).append(i)
    return groups


def user_order(records: list[Record]) -> dict[str, list[int]]:
    """Per user, indices into records oldest first: timestamp then file order (file order alone if one is missing)."""
    groups = _groups(records)
    for indices in groups.values():
        if all(records[i].timestamp is not None for i in indices):
            # numbers before strings so a dataset mixing both kinds still sorts instead of raising
            indices.sort(key=lambda i: (isinstance(records[i].timestamp, str), records[i].timestamp, i))
    return groups


def _with_history(record: Record, history: list[dict]) -> Record:
    # not dataclasses.replace(): the items are already normalised and re-checking them is slow
    clone = object.__new__(Record)
    clone.__dict__.update(record.__dict__, history=history)
    return clone


def build_history(records: list[Record], max_history_items: int | None) -> list[Record]:
    """Fill history for records without one from the same user's EARLIER targets only, keeping the newest N.

    Explicit histories (including []) are kept as given. max_history_items=None keeps every earlier item,
    which costs memory quadratic in a user's record count.
    """
    _check_limit(max_history_items, "max_history_items")
    records, out = list(records), list(records)
    for indices in user_order(records).values():
        earlier: list[dict] = []
        for i in indices:
            record = records[i]
            if record.history is None:
                out[i] = _with_history(record, _newest(earlier, max_history_items).copy())
            stamp = {} if record.timestamp is None else {"timestamp": record.timestamp}
            earlier.append({"text": record.target, **stamp})
    return out


def _check_choice(value, valid: Iterable[str], what: str) -> None:
    if value not in valid:
        raise UserError(f"unknown {what} {value!r}; valid names: {', '.join(valid)}")


def _digest(*parts) -> int:
    # hashlib, not hash(): Python salts str hashes per process, which would break reproducibility
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()[:8], "big")


def sample_per_user(records: list[Record], max_samples_per_user: int | None, seed: int,
                    epoch: int | None = None) -> list[Record]:
    """At most N random records per user in their original order; the choice depends only on (seed, epoch, user)."""
    records = list(records)
    if max_samples_per_user is None:
        return records
    if not isinstance(max_samples_per_user, int) or isinstance(max_samples_per_user, bool) or max_samples_per_user <= 0:
        raise UserError(f"max_samples_per_user must be a positive integer or None (no cap), "
                        f"got {max_samples_per_user!r}; pass e.g. --max_samples_per_user 2")
    keep: set[int] = set()
    for user, indices in _groups(records).items():
        if len(indices) <= max_samples_per_user:
            keep.update(indices)
        else:
            keep.update(random.Random(_digest("sample", seed, epoch, user)).sample(indices, max_samples_per_user))
    return [record for i, record in enumerate(records) if i in keep]


def split_train_val(records: list[Record], val_ratio: float, split_by: str = "user",
                    seed: int = 42) -> tuple[list[Record], list[Record], dict]:
    """(train, val, report). split_by="user": round(users * val_ratio) whole users (seeded hash) go to val.

    split_by="latest_item": round(eligible users * val_ratio) users (seeded hash) hold out their latest
    item (every record of that user with the latest record's item_id; without item_id each record is its
    own item). Users with a single item are not eligible, stay in train, and are counted in the report.
    A (user, item) is never in both parts. If an item recurs over time, its earlier text may still be in
    the built history of the user's train records.
    """
    _check_choice(split_by, SPLIT_MODES, "split_by")
    top_ok = split_by == "latest_item"
    if not _is_number(val_ratio) or not (0 <= val_ratio < 1 or (top_ok and val_ratio == 1)):
        raise UserError(f"val_ratio must be in [0, 1) ({'[0, 1] ' if top_ok else ''}for split_by={split_by}), "
                        f"got {val_ratio!r}; pass e.g. --val_ratio 0.1")
    records = list(records)
    if not records:
        raise UserError("no records to split; check the records file and the skipped-row counts")
    order = user_order(records)
    keys = {u: [("item", str(records[i].item_id)) if records[i].item_id is not None else ("row", i) for i in idx]
            for u, idx in order.items()}
    single = [u for u in order if len(set(keys[u])) < 2]
    eligible = list(order) if split_by == "user" else [u for u in order if len(set(keys[u])) >= 2]
    eligible.sort(key=lambda u: _digest("split", seed, u))
    n_val = 0 if val_ratio == 0 or not eligible else max(1, round(len(eligible) * val_ratio))
    if split_by == "user":
        n_val = min(n_val, len(eligible) - 1)  # keep at least one user to train on
    in_val: set[int] = set()
    for user in eligible[:n_val]:
        if split_by == "user":
            in_val.update(order[user])
        else:
            latest = keys[user][-1]
            in_val.update(i for i, key in zip(order[user], keys[user]) if key == latest)
    train = [r for i, r in enumerate(records) if i not in in_val]
    val = [r for i, r in enumerate(records) if i in in_val]
    report = {"split_by": split_by, "train_users": len({r.user_id for r in train}),
              "val_users": len({r.user_id for r in val}), "train_samples": len(train), "val_samples": len(val),
              "single_item_users_kept_in_train": len(single) if split_by == "latest_item" else 0}
    return train, val, report


def _percentiles(counts: list[int]) -> dict[str, int]:
    if not counts:
        return {"p50": 0, "p90": 0, "max": 0}
    ranked = sorted(counts)
    nearest = lambda q: ranked[max(0, math.ceil(q * len(ranked)) - 1)]  # nearest-rank: always a real count
    return {"p50": nearest(0.5), "p90": nearest(0.9), "max": ranked[-1]}


def summarize(records_before: Iterable[Record], records_after: Iterable[Record]) -> dict:
    """Users and samples before/after sampling (or splitting), per-user sample percentiles, users left with none."""
    before = {u: len(i) for u, i in _groups(list(records_before)).items()}
    after = {u: len(i) for u, i in _groups(list(records_after)).items()}
    return {"users_before": len(before), "users_after": len(after),
            "samples_before": sum(before.values()), "samples_after": sum(after.values()),
            "per_user_before": _percentiles(list(before.values())),
            "per_user_after": _percentiles(list(after.values())),
            "users_without_samples": len(set(before) - set(after))}


def format_summary(summary: dict) -> str:
    """A few human-readable lines for logs."""
    share = summary["samples_after"] / summary["samples_before"] if summary["samples_before"] else 0.0
    line = lambda p: f"p50 {p['p50']}, p90 {p['p90']}, max {p['max']}"
    lines = [f"users: {summary['users_before']} before, {summary['users_after']} after",
             f"samples: {summary['samples_before']} before, {summary['samples_after']} after ({share:.1%})",
             f"samples per user before: {line(summary['per_user_before'])}",
             f"samples per user after:  {line(summary['per_user_after'])}"]
    if summary["users_without_samples"]:
        lines.append(f"warning: {summary['users_without_samples']} users have no samples after this step")
    return "\n".join(lines)
