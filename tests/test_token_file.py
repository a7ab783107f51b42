"""Packed token files: round trip, resume after SIGKILL byte for byte, worker-count independence, validation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowmem.data.token_file import TokenFile, token_dtype, tokenize_to_bin
from lowmem.run.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["cat", "dog", "sun", "moon", "tree", "猫", "狗", "山", "水", "花", "river", "stone"]


def documents(n: int, newlines: bool = True) -> list[str]:
    docs = []
    for i in range(n):
        words = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(1 + (i * 7) % 23))
        docs.append(f"doc {i}: {words}" + (f"\nline two {i}" if newlines and i % 4 == 0 else ""))
    return docs


def write_text_parquet(path, docs, row_group_size=64) -> str:
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=row_group_size)
    return str(path)


def decode_documents(file: TokenFile, tokenizer_dir: str) -> list[str]:
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    ids = np.asarray(file.tokens, dtype=np.int64)
    assert ids[-1] == file.eos_token_id
    ends = np.flatnonzero(ids == file.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist(), clean_up_tokenization_spaces=False) for s, e in zip(starts, ends)]


def test_round_trip_text_tokens_text_per_document(tmp_path, tiny_tokenizer):
    docs = documents(150) + ["a literal <|endoftext|> inside text stays text", "中文 和 English 混合\t制表"]
    source = write_text_parquet(tmp_path / "docs.parquet", docs)
    index = tokenize_to_bin(source, str(tmp_path / "out" / "train"), tiny_tokenizer, num_workers=1, chunk_rows=40)
    assert index["complete"] and index["n_documents"] == len(docs) and index["dtype"] == "uint16"
    with open(tmp_path / "out" / "train.json", encoding="utf-8") as f:
        on_disk = json.load(f)
    for key in ("format_version", "dtype", "n_tokens", "n_documents", "vocab_size", "eos_token_id",
                "tokenizer_dir", "source", "complete"):
        assert key in on_disk
    for name in ("train", "train.bin", "train.json"):
        file = TokenFile(str(tmp_path / "out" / name))
        assert file.n_tokens == index["n_tokens"] == len(file.tokens)
        assert isinstance(file.tokens, np.memmap) and file.tokens.dtype == np.dtype("<u2")
        assert file.path.endswith("train.bin") and file.vocab_size == index["vocab_size"]
    assert not file.tokens.flags.writeable
    assert decode_documents(file, tiny_tokenizer) == docs
    assert os.path.getsize(file.path) == file.n_tokens * 2


def test_jsonl_and_txt_inputs_match_parquet(tmp_path, tiny_tokenizer):
    docs = documents(60, newlines=False)
    parquet = write_text_parquet(tmp_path / "d.parquet", docs)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")  # blank lines between documents are skipped
    tokenize_to_bin(parquet, str(tmp_path / "p"), tiny_tokenizer, num_workers=1)
    tokenize_to_bin(str(jsonl), str(tmp_path / "j"), tiny_tokenizer, text_column="body", num_workers=1)
    tokenize_to_bin(str(txt), str(tmp_path / "t"), tiny_tokenizer, num_workers=1)
    reference = (tmp_path / "p.bin").read_bytes()
    assert (tmp_path / "j.bin").read_bytes() == reference == (tmp_path / "t.bin").read_bytes()


KILLED_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
from lowmem.data import token_file

write_index = token_file._write_index


def slow_write_index(path, index):
    time.sleep(0.05)  # between the fsynced .bin chunk and its index entry: where a kill hurts most
    write_index(path, index)


token_file._write_index = slow_write_index
token_file.tokenize_to_bin({source!r}, {prefix!r}, {tokenizer!r}, num_workers=1, chunk_rows=10)
"""


def test_sigkilled_run_resumes_to_identical_bytes(tmp_path, tiny_tokenizer, capsys):
    docs = documents(500)
    source = write_text_parquet(tmp_path / "docs.parquet", docs, row_group_size=37)
    reference = tmp_path / "ref"
    tokenize_to_bin(source, str(reference), tiny_tokenizer, num_workers=1, chunk_rows=10)

    prefix = str(tmp_path / "killed")
    script = KILLED_RUN.format(repo=REPO, source=source, prefix=prefix, tokenizer=tiny_tokenizer)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, chunks = time.time() + 60, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                with open(prefix + ".json", encoding="utf-8") as f:
                    chunks = json.load(f)["chunks_done"]
            except (OSError, ValueError, KeyError):
                chunks = 0
            if chunks >= 5:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    with open(prefix + ".json", encoding="utf-8") as f:
        partial = json.load(f)
    assert not partial["complete"] and 5 <= partial["chunks_done"] < 50
    with pytest.raises(UserError, match="incomplete"):
        TokenFile(prefix)

    capsys.readouterr()
    index = tokenize_to_bin(source, prefix, tiny_tokenizer, num_workers=2, chunk_rows=10)
    assert f"resumed_from_row: {partial['rows_done']}" in capsys.readouterr().out
    assert (tmp_path / "killed.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert index["n_tokens"] == TokenFile(str(reference)).n_tokens and index["chunks_done"] == 50

    # a finished file is left alone; other settings start it over and give the same tokens
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    tokenize_to_bin(source, prefix, tiny_tokenizer, num_workers=1, chunk_rows=10)
    assert os.stat(prefix + ".bin").st_mtime_ns == mtime
    tokenize_to_bin(source, prefix, tiny_tokenizer, num_workers=1, chunk_rows=64)
    assert (tmp_path / "killed.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_bad_rows_are_counted_and_strict_raises(tmp_path, tiny_tokenizer):
    source = str(tmp_path / "holes.parquet")
    pq.write_table(pa.table({"text": ["one doc", None, "", "two doc", None]}), source)
    index = tokenize_to_bin(source, str(tmp_path / "h"), tiny_tokenizer, num_workers=1)
    assert index["n_documents"] == 2
    assert {k: v[0] for k, v in index["skipped"].items()} == {"null": 2, "empty": 1}

    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"fine line\nbroken \xff line\nlast line\n")
    index = tokenize_to_bin(str(txt), str(tmp_path / "b"), tiny_tokenizer, num_workers=1)
    assert index["n_documents"] == 2 and index["skipped"]["invalid_utf8"] == [1, "line 2"]
    with pytest.raises(UserError, match=r"bad.txt' line 2: invalid UTF-8"):
        tokenize_to_bin(str(txt), str(tmp_path / "b2"), tiny_tokenizer, num_workers=1, strict=True)

    with pytest.raises(UserError, match="no column 'body'"):
        tokenize_to_bin(source, str(tmp_path / "x"), tiny_tokenizer, text_column="body", num_workers=1)
    empty = str(tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"text": pa.array([None, None], pa.string())}), empty)
    with pytest.raises(UserError, match="no non-empty text"):
        tokenize_to_bin(empty, str(tmp_path / "y"), tiny_tokenizer, num_workers=1)
    with pytest.raises(UserError, match="does not exist"):
        tokenize_to_bin(str(tmp_path / "missing.jsonl"), str(tmp_path / "z"), tiny_tokenizer, num_workers=1)


def test_token_file_validation(tmp_path, tiny_tokenizer):
    source = write_text_parquet(tmp_path / "d.parquet", documents(20))
    prefix = str(tmp_path / "tf")
    tokenize_to_bin(source, prefix, tiny_tokenizer, num_workers=1)
    good = json.loads(open(prefix + ".json", encoding="utf-8").read())

    def write_index(**changes):
        with open(prefix + ".json", "w", encoding="utf-8") as f:
            json.dump({**good, **changes}, f)

    def message() -> str:
        with pytest.raises(UserError) as err:
            TokenFile(prefix + ".bin")
        assert "\n" not in str(err.value)
        return str(err.value)

    write_index(complete=False)
    assert "incomplete" in message() and "tf.bin" in message()
    write_index(n_tokens=good["n_tokens"] + 1)
    assert "bytes but its index says" in message()
    write_index(vocab_size=70000)
    assert "uint16 cannot hold" in message()
    write_index(dtype="int8")
    assert "expected uint16 or uint32" in message()
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        f.write("{not json")
    assert "not a valid index" in message()
    os.remove(prefix + ".json")
    assert "index" in message() and "tf.json' is missing" in message()
    write_index()
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    assert "bytes but its index says" in message()
    os.remove(prefix + ".bin")
    assert "tf.bin' is missing" in message()
    assert token_dtype(400) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_an_index_declaring_fewer_vocabulary_entries_than_the_ids_is_refused(tmp_path, tiny_tokenizer):
    prefix = str(tmp_path / "tf")
    index = tokenize_to_bin(write_text_parquet(tmp_path / "d.parquet", documents(20)), prefix, tiny_tokenizer,
                            num_workers=1)
    largest = int(np.asarray(TokenFile(prefix).tokens).max())
    TokenFile(prefix).check_ids(index["vocab_size"])  # a consistent file passes
    for recorded in (True, False):  # the index's max_token_id, or (files of earlier versions) the ids read
        changed = {**index, "vocab_size": largest}
        if not recorded:
            del changed["max_token_id"]
        with open(prefix + ".json", "w", encoding="utf-8") as f:
            json.dump(changed, f)
        with pytest.raises(UserError) as err:
            TokenFile(prefix).check_ids(100_000)
        assert str(err.value) == (f"token file '{prefix}.bin': the index says vocab_size {largest} but the file holds "
                                  f"id {largest}: it was written with another tokenizer or is corrupt; tokenize it "
                                  "again (`train_low_mem.py prepare tokenize`)")
