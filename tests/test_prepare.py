"""Data preparation tools: convert, clean, split, stats, train_tokenizer, the prepare CLI, and bad inputs."""
from __future__ import annotations

import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowmem.data.prepare import clean, convert, split, stats, train_tokenizer
from lowmem.run.errors import UserError

WORDS = ["cat", "dog", "sun", "moon", "tree", "猫", "狗", "山", "水", "花", "river", "stone"]


def qa_rows(n: int) -> list[dict]:
    return [{"q": f"question {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 5 + 1)),
             "a": f"answer {i}\nsecond line, \"quoted\""} for i in range(n)]


def write_all_formats(tmp_path, rows: list[dict]) -> dict:
    paths = {fmt: str(tmp_path / f"src.{fmt}") for fmt in ("csv", "json", "jsonl", "parquet")}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["q", "a"])
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False)
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"], row_group_size=4)
    return paths


def group_sizes(path: str) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_convert_every_format_renames_and_uses_row_groups(tmp_path):
    rows = qa_rows(30)
    expected = [{"prompt": r["q"], "response": r["a"]} for r in rows]
    for fmt, path in write_all_formats(tmp_path, rows).items():
        out = str(tmp_path / f"out_{fmt}.parquet")
        summary = convert(path, out, prompt_column="q", response_column="a", row_group_size=7)
        assert summary["rows_written"] == 30 and summary["skipped"] == {}, fmt
        assert pq.read_table(out).to_pylist() == expected, fmt
        assert group_sizes(out) == [7, 7, 7, 7, 2], fmt
        assert not os.path.exists(out + ".tmp")


def test_convert_text_column_txt_and_keep_columns(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\n\nsecond doc 猫\n", encoding="utf-8")
    convert(str(txt), str(tmp_path / "t.parquet"))
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == [{"text": "first doc"}, {"text": "second doc 猫"}]

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"b{i}", "user_id": i % 3}) for i in range(5)), encoding="utf-8")
    convert(str(jsonl), str(tmp_path / "d.parquet"), text_column="body", keep_columns="user_id")
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.column_names == ["text", "user_id"]
    assert table.column("user_id").to_pylist() == ["0", "1", "2", "0", "1"]


def test_convert_missing_column_names_file_and_existing_columns(tmp_path):
    path = write_all_formats(tmp_path, qa_rows(3))
    for fmt in ("csv", "jsonl", "parquet"):
        with pytest.raises(UserError) as err:
            convert(path[fmt], str(tmp_path / "o.parquet"))
        message = str(err.value)
        assert path[fmt] in message and "'prompt'" in message and "'q'" in message and "\n" not in message


def test_convert_parquet_with_non_string_column_is_an_error(tmp_path):
    path = str(tmp_path / "typed.parquet")
    pq.write_table(pa.table({"prompt": [1, 2], "response": ["a", "b"]}), path)
    with pytest.raises(UserError, match="column 'prompt' of .*typed.parquet' has type int64, expected string"):
        convert(path, str(tmp_path / "o.parquet"))


def test_convert_skips_and_counts_bad_rows_and_strict_makes_them_errors(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "ok", "response": "fine"}).encode(),
             b'{"prompt": "bad \xff byte", "response": "x"}',
             b"{not json",
             json.dumps({"prompt": 5, "response": "x"}).encode(),
             b"[1, 2]",
             json.dumps({"prompt": None, "response": "kept as null"}).encode()]
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    summary = convert(str(jsonl), str(tmp_path / "j.parquet"))
    assert summary["skipped"] == {"invalid_utf8": 1, "invalid_json": 1, "non_string": 1, "not_object": 1}
    assert summary["rows_written"] == 2 and summary["nulls"] == {"prompt": 1, "response": 0}
    with pytest.raises(UserError, match=r"bad.jsonl' line 2: invalid UTF-8"):
        convert(str(jsonl), str(tmp_path / "j2.parquet"), strict=True)
    assert not os.path.exists(tmp_path / "j2.parquet") and not os.path.exists(tmp_path / "j2.parquet.tmp")

    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b"prompt,response\nok,fine\nbad \xfe,x\nonly one field\n\"multi\nline\",y\n")
    summary = convert(str(csv_path), str(tmp_path / "c.parquet"))
    assert summary["skipped"] == {"invalid_utf8": 1, "field_count": 1}
    assert pq.read_table(tmp_path / "c.parquet").column("prompt").to_pylist() == ["ok", "multi\nline"]
    with pytest.raises(UserError, match=r"bad.csv' line 3: invalid UTF-8"):
        convert(str(csv_path), str(tmp_path / "c2.parquet"), strict=True)

    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"good line\nbad \xc3\x28 line\nanother\n")
    summary = convert(str(txt), str(tmp_path / "t.parquet"))
    assert summary["skipped"] == {"invalid_utf8": 1} and summary["rows_written"] == 2


@pytest.mark.parametrize("case", ["missing", "empty_csv", "empty_jsonl", "empty_parquet", "not_parquet",
                                  "truncated_parquet", "unknown_ext", "json_not_array", "json_bad_utf8",
                                  "header_only_csv"])
def test_bad_files_are_one_line_user_errors(tmp_path, case):
    good = str(tmp_path / "good.parquet")
    pq.write_table(pa.table({"prompt": ["p"] * 50, "response": ["r"] * 50}), good)
    paths = {"missing": tmp_path / "nope.csv", "empty_csv": tmp_path / "e.csv", "empty_jsonl": tmp_path / "e.jsonl",
             "empty_parquet": tmp_path / "e.parquet", "not_parquet": tmp_path / "text.parquet",
             "truncated_parquet": tmp_path / "cut.parquet", "unknown_ext": tmp_path / "data.xlsx",
             "json_not_array": tmp_path / "obj.json", "json_bad_utf8": tmp_path / "bad.json",
             "header_only_csv": tmp_path / "h.csv"}
    path = paths[case]
    contents = {"empty_csv": b"", "empty_jsonl": b"", "empty_parquet": b"", "not_parquet": b"prompt,response\na,b\n",
                "truncated_parquet": open(good, "rb").read()[:-40], "unknown_ext": b"x",
                "json_not_array": b'{"prompt": "a", "response": "b"}', "json_bad_utf8": b'[{"prompt": "\xff"}]',
                "header_only_csv": b"prompt,response\n"}
    if case in contents:
        path.write_bytes(contents[case])
    expected = {"missing": "does not exist", "empty_csv": "is empty", "empty_jsonl": "is empty",
                "empty_parquet": "is empty", "not_parquet": "not a readable parquet file",
                "truncated_parquet": "not a readable parquet file", "unknown_ext": "unknown extension",
                "json_not_array": "expected an array", "json_bad_utf8": "not valid UTF-8 at byte",
                "header_only_csv": "no readable rows"}[case]
    with pytest.raises(UserError) as err:
        convert(str(path), str(tmp_path / "out.parquet"))
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    if case in ("not_parquet", "truncated_parquet", "empty_parquet"):
        with pytest.raises(UserError, match=expected):
            stats(str(path))


def test_clean_counts_each_rule_and_passes_other_columns_through(tmp_path):
    prompts = ["good one", None, "", "   ", "ctrl\x00\x07 kept\ttab\nnewline\r", "x", "y" * 50, "good one", "\x01\x02"]
    responses = ["r1", "rr", "rr", "rr", "r2", "rr", "rr", "r1", "rr"]
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": prompts, "response": responses, "user_id": list(range(9))}), path)
    out = str(tmp_path / "clean.parquet")
    summary = clean(path, out, dedup=True, min_chars=2, max_chars=40, row_group_size=2)
    assert summary["removed"] == {"null": 1, "empty": 3, "too_short": 1, "too_long": 1, "duplicate": 1}
    assert summary["rows_in"] == 9 and summary["rows_out"] == 2
    assert summary["rows_with_control_chars_stripped"] == 2
    assert pq.read_table(out).to_pylist() == [
        {"prompt": "good one", "response": "r1", "user_id": 0},
        {"prompt": "ctrl kept\ttab\nnewline", "response": "r2", "user_id": 4}]
    assert group_sizes(out) == [2]
    with pytest.raises(UserError, match="column 'user_id' .* has type int64"):
        clean(path, str(tmp_path / "c2.parquet"), columns="prompt,user_id")


def test_split_is_deterministic_and_respects_ratios(tmp_path):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(4000)]}), path, row_group_size=300)
    first = split(path, str(tmp_path / "a"), valid_ratio=0.1, test_ratio=0.05, seed=3, row_group_size=500)
    again = split(path, str(tmp_path / "b"), valid_ratio=0.1, test_ratio=0.05, seed=3, row_group_size=500)
    other = split(path, str(tmp_path / "c"), valid_ratio=0.1, test_ratio=0.05, seed=4, row_group_size=500)
    counts = first["rows_per_split"]
    assert sum(counts.values()) == 4000
    assert 300 <= counts["valid"] <= 500 and 130 <= counts["test"] <= 270
    for name in ("train", "valid", "test"):
        a = pq.read_table(tmp_path / "a" / f"{name}.parquet")
        assert a.equals(pq.read_table(tmp_path / "b" / f"{name}.parquet"))
        assert max(group_sizes(str(tmp_path / "a" / f"{name}.parquet"))) <= 500
    assert other["rows_per_split"] != counts
    all_rows = sorted(sum((pq.read_table(tmp_path / "a" / f"{n}.parquet").column("text").to_pylist()
                           for n in ("train", "valid", "test")), []))
    assert all_rows == sorted(f"row {i}" for i in range(4000))
    with pytest.raises(UserError, match="sum below 1"):
        split(path, str(tmp_path / "d"), valid_ratio=0.6, test_ratio=0.5)


def test_split_by_group_never_puts_a_group_in_two_splits(tmp_path):
    path = str(tmp_path / "users.parquet")
    n = 3000
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(n)], "response": ["r"] * n,
                             "user_id": [(i * 37) % 211 for i in range(n)]}), path, row_group_size=250)
    summary = split(path, str(tmp_path / "s"), valid_ratio=0.2, test_ratio=0.2, group_column="user_id",
                    row_group_size=400)
    owners: dict = {}
    for name in ("train", "valid", "test"):
        for user in pq.read_table(tmp_path / "s" / f"{name}.parquet").column("user_id").to_pylist():
            owners.setdefault(user, set()).add(name)
    assert all(len(splits) == 1 for splits in owners.values())
    assert len(owners) == 211 and sum(summary["rows_per_split"].values()) == n
    assert all(summary["rows_per_split"][s] > 0 for s in ("train", "valid", "test"))
    with pytest.raises(UserError, match="no column 'uid'"):
        split(path, str(tmp_path / "x"), group_column="uid")


def test_stats_percentiles_nulls_tokens_and_histogram(tmp_path, tiny_tokenizer):
    path = str(tmp_path / "s.parquet")
    texts = ["a" * n for n in range(1, 101)] + [None, None]
    pq.write_table(pa.table({"text": texts, "n": list(range(102))}), path, row_group_size=16)
    png = str(tmp_path / "plots" / "hist.png")
    summary = stats(path, tokenizer_dir=tiny_tokenizer, histogram_png=png)
    assert summary["rows"] == 102 and summary["nulls"] == {"text": 2, "n": 0}
    chars = summary["lengths"]["text"]["chars"]
    assert (chars["p50"], chars["p90"], chars["p99"], chars["max"], chars["count"]) == (50, 90, 99, 100, 100)
    tokens = summary["lengths"]["text"]["tokens"]
    assert tokens["count"] == 100 and 1 <= tokens["p50"] <= chars["p50"]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_tokenizer_samples_a_bounded_number_of_rows(tmp_path):
    from lowmem.data.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(3000):
            f.write(json.dumps({"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(6)) + f" {i}"},
                               ensure_ascii=False) + "\n")
        f.write("{broken\n")
    summary = train_tokenizer(str(corpus), str(tmp_path / "tok"), vocab_size=400, sample_rows=500, seed=1)
    assert summary["rows_with_text"] == 3000 and summary["rows_sampled"] == 500
    assert summary["skipped"] == {"invalid_json": 1}
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer.eos_token == "<|endoftext|>" and 300 <= len(tokenizer) <= 400
    text = "moon river 猫"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(UserError, match="pass --columns"):
        bad = tmp_path / "other.jsonl"
        bad.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
        train_tokenizer(str(bad), str(tmp_path / "tok2"))


def test_cli_rejects_unknown_flags_before_doing_any_work(tmp_path, capsys):
    import fire

    from lowmem.cli.prepare import PrepareCommands

    src = write_all_formats(tmp_path, qa_rows(5))["csv"]
    out = str(tmp_path / "cli.parquet")
    with pytest.raises(UserError, match="unknown flag --row_group for `prepare convert`; did you mean: --row_group_size"):
        fire.Fire(PrepareCommands, command=["convert", f"--input={src}", f"--output={out}", "--row_group=3"])
    assert not os.path.exists(out)
    fire.Fire(PrepareCommands, command=["convert", f"--input={src}", f"--output={out}", "--prompt_column=q",
                                        "--response_column=a", "--row_group_size=2"])
    assert group_sizes(out) == [2, 2, 1]
    assert "rows_written: 5" in capsys.readouterr().out
    with pytest.raises(UserError, match="--valid_ratio expects a number"):
        fire.Fire(PrepareCommands, command=["split", f"--input={out}", f"--output_dir={tmp_path}", "--valid_ratio=abc"])


def test_train_tokenizer_notes_a_vocabulary_smaller_than_asked(tmp_path, capsys):
    corpus = tmp_path / "small.jsonl"
    lines = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(6)) + f" {i}" for i in range(500)]
    corpus.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    summary = train_tokenizer(str(corpus), str(tmp_path / "big"), vocab_size=32000)
    entries = summary["vocab_size"]
    assert entries < 32000 and summary["vocab_size_asked"] == 32000
    assert (f"note: vocabulary has {entries} entries, fewer than the 32000 asked: the data has no more merges"
            in capsys.readouterr().out)
    exact = train_tokenizer(str(corpus), str(tmp_path / "exact"), vocab_size=300)
    assert exact["vocab_size"] == 300 and "note:" not in capsys.readouterr().out


def _rows_file(tmp_path, n: int, users: int) -> str:
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(n)], "user_id": [f"u{i % users}" for i in range(n)]}),
                   path)
    return path


def _suggested(message: str, flag: str) -> float:
    import re

    return float(re.search(rf"--{flag}=([0-9.]+) or more", message).group(1))


@pytest.mark.parametrize("ratios, flag", [({"valid_ratio": 0.001}, "valid_ratio"),
                                          ({"valid_ratio": 0.05, "test_ratio": 0.001}, "test_ratio")])
def test_split_refuses_an_empty_side_and_suggests_a_ratio_that_fills_it(tmp_path, ratios, flag):
    path = _rows_file(tmp_path, 40, 40)
    side = flag.split("_")[0]
    with pytest.raises(UserError) as err:
        split(path, str(tmp_path / "out"), **ratios)
    message = str(err.value)
    assert f"{side}.parquet would be empty: --{flag}={ratios[flag]:g} puts none of the 40 rows there" in message
    assert "\n" not in message
    assert os.listdir(tmp_path / "out") == []  # the partial files were discarded
    summary = split(path, str(tmp_path / "fixed"), **{**ratios, flag: _suggested(message, flag)})
    assert summary["rows_per_split"][side] >= 1 and summary["rows_per_split"]["train"] >= 1


def test_split_by_group_counts_groups_and_refuses_an_empty_train(tmp_path):
    path = _rows_file(tmp_path, 40, 3)
    with pytest.raises(UserError) as err:
        split(path, str(tmp_path / "a"), valid_ratio=0.01, group_column="user_id")
    message = str(err.value)
    assert "valid.parquet would be empty: --valid_ratio=0.01 puts none of the 3 groups (40 rows) there" in message
    fixed = split(path, str(tmp_path / "b"), valid_ratio=_suggested(message, "valid_ratio"), group_column="user_id")
    assert fixed["rows_per_split"]["valid"] > 0
    with pytest.raises(UserError, match=r"train.parquet would be empty: .* take all 3 groups \(40 rows\)"):
        split(path, str(tmp_path / "c"), valid_ratio=0.95, group_column="user_id")
    one_user = _rows_file(tmp_path, 5, 1)
    with pytest.raises(UserError, match="would be empty"):
        split(one_user, str(tmp_path / "d"), valid_ratio=0.5, group_column="user_id")


def test_split_missing_group_column_points_at_convert_keep_columns(tmp_path):
    path = str(tmp_path / "converted.parquet")
    pq.write_table(pa.table({"prompt": ["p"] * 4, "response": ["r"] * 4}), path)
    with pytest.raises(UserError) as err:
        split(path, str(tmp_path / "s"), group_column="user_id")
    assert "no column 'user_id'" in str(err.value) and "--keep_columns=user_id" in str(err.value)
    assert "prepare convert" in str(err.value)


def test_prepare_help_lists_each_flag_with_its_meaning(capsys):
    import fire

    from lowmem.cli.prepare import PrepareCommands

    fire.Fire(PrepareCommands, command=["train_tokenizer", "--input=x", "--output_dir=y", "--help"])
    out = capsys.readouterr().out
    assert "--vocab_size" in out and "default: 8000" in out and "vocabulary entries to learn" in out
