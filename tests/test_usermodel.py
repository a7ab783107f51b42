"""User-modeling records: reading and validation, history without leakage, per-user sampling, splits, prompts."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowmem.data.user_prompts import (
    ABLATION_SECTIONS,
    ABLATIONS,
    DETAILED_HEADERS,
    PROMPT_STYLES,
    SIMPLE_TAGS,
    build_prompt,
    fit_prompt,
    prompt_sections,
    to_prompt_response,
)
from lowmem.data.usermodel import (
    BadRow,
    Record,
    build_history,
    convert_prompt_response,
    format_summary,
    read_records,
    sample_per_user,
    split_train_val,
    summarize,
)
from lowmem.run.errors import UserError


def make_records(n_users: int, per_user, seed: int = 0, item_repeats: bool = False) -> list[Record]:
    """Records of several users in shuffled file order, with timestamps that include ties."""
    rng = random.Random(seed)
    records = []
    for u in range(n_users):
        count = per_user(u) if callable(per_user) else per_user
        for k in range(count):
            item = f"movie{k % 3}" if item_repeats else f"movie{k}"
            records.append(Record(user_id=f"u{u}", target=f"u{u} message {k}", profile={"age": 20 + u, "city": "Paris"},
                                  context=[{"role": "friend", "text": f"hi {k}"}, "plain turn"],
                                  timestamp=k // 2, item_id=item))
    rng.shuffle(records)
    return records


def per_user_counts(records) -> dict:
    counts: dict = {}
    for r in records:
        counts[r.user_id] = counts.get(r.user_id, 0) + 1
    return counts


def test_sampling_caps_per_user_and_is_reproducible():
    records = make_records(25, lambda u: 1 + u % 7, seed=1)
    picked = sample_per_user(records, 3, seed=42)
    full = per_user_counts(records)
    for user, n in per_user_counts(picked).items():
        assert n == min(3, full[user])
    assert set(per_user_counts(picked)) == set(full)
    assert picked == sample_per_user(records, 3, seed=42)
    positions = [records.index(r) for r in picked]
    assert positions == sorted(positions)  # original order kept
    assert sample_per_user(records, None, seed=42) == records


def test_resampling_each_epoch_gives_fresh_but_reproducible_choices():
    records = make_records(30, 40, seed=2)
    epoch0 = sample_per_user(records, 3, seed=7, epoch=0)
    epoch1 = sample_per_user(records, 3, seed=7, epoch=1)
    assert all(n == 3 for n in per_user_counts(epoch1).values())
    assert epoch0 != epoch1
    assert epoch1 == sample_per_user(records, 3, seed=7, epoch=1)
    assert sample_per_user(records, 3, seed=7) != sample_per_user(records, 3, seed=8)


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_bad_sample_cap_is_a_user_error(bad):
    with pytest.raises(UserError, match="max_samples_per_user"):
        sample_per_user(make_records(2, 3), bad, seed=0)


@pytest.mark.parametrize("split_by", ["user", "latest_item"])
@pytest.mark.parametrize("item_repeats", [False, True])
def test_splits_never_share_a_user_item(split_by, item_repeats):
    records = make_records(40, lambda u: 1 + u % 6, seed=3, item_repeats=item_repeats)
    train, val, report = split_train_val(records, 0.5 if split_by == "user" else 1.0, split_by=split_by, seed=5)
    assert len(train) + len(val) == len(records) and val
    key = lambda r: (r.user_id, r.item_id)
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert (train, val) == split_train_val(records, 0.5 if split_by == "user" else 1.0, split_by=split_by, seed=5)[:2]
    if split_by == "user":
        assert not {r.user_id for r in train} & {r.user_id for r in val}
    else:
        items = {}
        for r in records:
            items.setdefault(r.user_id, set()).add(r.item_id)
        single = [u for u, kinds in items.items() if len(kinds) < 2]
        assert report["single_item_users_kept_in_train"] == len(single) > 0
        assert not {r.user_id for r in val} & set(single)
        for r in val:  # the held-out item is the user's latest record's item
            latest = max((x for x in records if x.user_id == r.user_id), key=lambda x: (x.timestamp, records.index(x)))
            assert r.item_id == latest.item_id


def test_split_by_user_ratio_and_bad_arguments():
    records = make_records(50, 4, seed=4)
    train, val, report = split_train_val(records, 0.1, split_by="user", seed=1)
    assert report["val_users"] == 5 and report["train_users"] == 45
    with pytest.raises(UserError, match="val_ratio"):
        split_train_val(records, 1.0, split_by="user")
    with pytest.raises(UserError, match="latest_item"):
        split_train_val(records, 0.1, split_by="random")


def test_built_history_holds_only_earlier_items_newest_kept():
    records = make_records(6, 12, seed=5)
    records.append(Record(user_id="u0", target="given", history=[{"text": "explicit"}], timestamp=3))
    built = build_history(records, max_history_items=4)
    rank = {id(r): (r.timestamp, i) for i, r in enumerate(records)}
    for original, record in zip(records, built):
        if original.history is not None:
            assert record.history == original.history
            continue
        earlier = sorted((x for x in records if x.user_id == record.user_id and rank[id(x)] < rank[id(original)]),
                         key=lambda x: rank[id(x)])
        assert [h["text"] for h in record.history] == [x.target for x in earlier[-4:]]
        assert all(h["timestamp"] <= record.timestamp for h in record.history)
    assert all(r.history == [] for r in build_history(records, 0) if r.target != "given")


def test_history_without_timestamps_follows_file_order():
    records = [Record(user_id="a", target=t) for t in ("first", "second", "third")]
    assert [len(r.history) for r in build_history(records, None)] == [0, 1, 2]
    assert build_history(records, None)[2].history == [{"text": "first"}, {"text": "second"}]


def rich_record() -> Record:
    return Record(user_id="u7", target="see you", profile={"name": "Ann", "age": 30},
                  history=[{"text": f"old {k}"} for k in range(5)], context=[{"role": "friend", "text": "lunch?"}])


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_renders_exactly_its_sections(ablation):
    wanted = set(ABLATION_SECTIONS[ablation])
    for record in (rich_record(), Record(user_id="bare", target="TARGET-TEXT")):
        simple = build_prompt(record, ablation, "simple")
        detailed = build_prompt(record, ablation, "detailed")
        for name in ("profile", "history", "context"):
            assert (SIMPLE_TAGS[name] in simple) == (name in wanted), (ablation, name)
            assert (DETAILED_HEADERS[name] in detailed) == (name in wanted), (ablation, name)
        assert simple.startswith(f"[USER_HASH={record.user_id}]")
        assert detailed.startswith(f"You are modeling user {record.user_id}.")
        assert simple.endswith("Predict the user's next message:")
        assert detailed.endswith("Write the user's next message.")
        assert record.target not in simple + detailed
    assert ("(none)" in build_prompt(Record(user_id="bare", target="TARGET-TEXT"), ablation, "simple"))
    assert ("Ann" in build_prompt(rich_record(), ablation, "simple")) == ("profile" in wanted)
    assert ("old 4" in build_prompt(rich_record(), ablation, "detailed")) == ("history" in wanted)
    assert ("friend: lunch?" in build_prompt(rich_record(), ablation, "simple")) == ("context" in wanted)


def test_history_truncation_drops_oldest_first():
    record = rich_record()
    newest3 = prompt_sections(record, "history_only", max_history_items=3)["history"]
    assert newest3 == ["1. old 2", "2. old 3", "3. old 4"]
    assert prompt_sections(record, "history_only", history_limit=1)["history"] == ["1. old 4"]
    fitted, dropped = fit_prompt(record, "all", "simple", fits=lambda p: p.count("old ") <= 2)
    assert "old 3" in fitted and "old 4" in fitted and "old 2" not in fitted and dropped == len(record.history) - 2
    assert fit_prompt(record, "all", "simple", fits=lambda p: True)[1] == 0
    empty, dropped = fit_prompt(record, "all", "simple", fits=lambda p: False)
    assert "(none)" in empty and dropped == len(record.history)
    pairs = list(to_prompt_response([record], "context_only"))
    assert pairs == [(build_prompt(record, "context_only"), "see you")]


def test_records_built_in_code_are_normalised_and_checked():
    record = Record(user_id=3, target="t", history=["a", {"content": "b", "timestamp": 2}], context=["hi"])
    assert record.user_id == "3" and record.context == [{"role": None, "text": "hi"}]
    assert record.history == [{"text": "a"}, {"text": "b", "timestamp": 2}]
    with pytest.raises(BadRow, match="missing_target"):
        Record(user_id="a", target="  ")


def test_unknown_ablation_or_style_lists_valid_names():
    with pytest.raises(UserError, match="profile_and_context"):
        build_prompt(rich_record(), "profile_plus_context", "simple")
    with pytest.raises(UserError, match="simple, detailed"):
        build_prompt(rich_record(), "all", "lovink")
    assert PROMPT_STYLES == ("simple", "detailed")


BAD_ROWS = {
    "missing_target": {"user_id": "a"},
    "bad_target": {"user_id": "a", "target": 5},
    "missing_user_id": {"target": "t"},
    "bad_user_id": {"user_id": [1], "target": "t"},
    "bad_history": {"user_id": "a", "target": "t", "history": "not a list"},
    "bad_profile": {"user_id": "a", "target": "t", "profile": 42},
    "bad_context": {"user_id": "a", "target": "t", "context": [{"role": "x"}]},
    "bad_timestamp": {"user_id": "a", "target": "t", "timestamp": {"day": 1}},
    "bad_item_id": {"user_id": "a", "target": "t", "item_id": 1.5},
}


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


def test_bad_jsonl_rows_are_counted_per_reason(tmp_path):
    good = [{"user_id": 7, "target": "hello", "profile": "likes tea", "history": ["a", {"text": "b", "timestamp": 1}],
             "context": ["hi", {"role": "friend", "content": "yo"}], "timestamp": "2024-01-02", "item_id": 3},
            {"user_id": "b", "target": "plain"}]
    raw = [b"{not json", b"[1, 2]", b"\xff\xfe", b""]
    path = write_jsonl(tmp_path / "r.jsonl", good + list(BAD_ROWS.values()), raw)
    records, skips = read_records(path)
    assert skips == {**{reason: 1 for reason in BAD_ROWS}, "invalid_json": 1, "not_object": 1, "invalid_utf8": 1}
    assert [r.user_id for r in records] == ["7", "b"]
    assert records[0].context == [{"role": None, "text": "hi"}, {"role": "friend", "text": "yo"}]
    assert records[0].history == [{"text": "a"}, {"text": "b", "timestamp": 1}] and records[1].history is None


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_strict_mode_names_file_and_row(tmp_path, reason):
    path = write_jsonl(tmp_path / "r.jsonl", [{"user_id": "a", "target": "ok"}, BAD_ROWS[reason]])
    with pytest.raises(UserError, match=r"r\.jsonl line 2"):
        read_records(path, strict=True)


def test_parquet_rows_row_groups_and_whole_file_errors(tmp_path):
    table = pa.table({"user_id": ["a", "a", "b", None], "target": ["x", None, "y", "z"],
                      "profile": pa.array([[("age", "3")], None, [], None], type=pa.map_(pa.string(), pa.string())),
                      "history": [["h1"], None, [], None], "timestamp": [1, 2, 3, 4]})
    path = str(tmp_path / "r.parquet")
    pq.write_table(table, path, row_group_size=2)
    records, skips = read_records(path)
    assert skips == {"missing_target": 1, "missing_user_id": 1}
    assert records[0].profile == {"age": "3"} and records[0].history == [{"text": "h1"}] and records[1].history == []
    with pytest.raises(UserError, match="row 2"):
        read_records(path, strict=True)
    pq.write_table(pa.table({"user_id": ["a"], "text": ["x"]}), str(tmp_path / "n.parquet"))
    with pytest.raises(UserError, match="no 'target' column"):
        read_records(str(tmp_path / "n.parquet"))
    with pytest.raises(UserError, match="does not exist"):
        read_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "r.csv").write_text("user_id,target\na,b\n")
    with pytest.raises(UserError, match=".jsonl or .parquet"):
        read_records(str(tmp_path / "r.csv"))


def test_convert_prompt_response_builds_history_from_earlier_responses():
    rows = [{"uid": "a", "prompt": "q3", "response": "r3", "timestamp": 3},
            {"uid": "a", "prompt": "q1", "response": "r1", "timestamp": 1},
            {"uid": "b", "prompt": "q2", "response": "r2", "timestamp": 2},
            {"uid": "a", "prompt": "q2", "response": "r2a", "timestamp": 2},
            {"uid": "c", "prompt": "q", "response": None}]
    records, skips = convert_prompt_response(rows, user_column="uid", max_history_items=5)
    assert skips == {"missing_target": 1}
    first = records[0]
    assert first.context == [{"role": None, "text": "q3"}] and first.target == "r3"
    assert [h["text"] for h in first.history] == ["r1", "r2a"]
    assert records[1].history == [] and records[2].history == []
    with pytest.raises(UserError, match="'user_id'"):
        convert_prompt_response(rows)


def test_summary_percentiles_and_text():
    before = make_records(10, lambda u: u + 1)
    after = sample_per_user(before, 2, seed=0)
    summary = summarize(before, after)
    assert summary["users_before"] == summary["users_after"] == 10
    assert summary["samples_before"] == 55 and summary["samples_after"] == 19
    assert summary["per_user_before"] == {"p50": 5, "p90": 9, "max": 10}
    assert summary["per_user_after"] == {"p50": 2, "p90": 2, "max": 2}
    text = format_summary(summary)
    assert "p50 5, p90 9, max 10" in text and "warning" not in text
    assert "warning: 1 users" in format_summary(summarize(before, [r for r in after if r.user_id != "u0"]))
