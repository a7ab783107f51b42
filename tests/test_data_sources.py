"""The data registry: shards, globs and lists as one dataset, weighted mixtures, kinds by content, the
tokenize-once cache; every bad input a one-line error or a counted skip."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_qa_parquet

from lowmem.data.mixture import Mixture
from lowmem.data.options import Columns, DataOptions
from lowmem.data.pipeline import TrainData
from lowmem.data.sources import container, open_dataset, parse_data_arg, parse_inputs
from lowmem.data.stream import Shard, iter_shard
from lowmem.run.errors import UserError


def settings(**values):
    return DataOptions(**{"max_seq_len": 64, "buffer_size": 100, **values})


def inputs(train_file="", datasets=(), validation_file=""):
    return parse_inputs(train_file, list(datasets), validation_file, [], held_out_split=False)


def write_shards(folder, rows: list[tuple[str, str]], n_shards: int, empty: bool = True) -> str:
    """rows split over n_shards parquet files (train-0000i-of-...), plus an empty one."""
    os.makedirs(folder, exist_ok=True)
    per = -(-len(rows) // n_shards)
    for i in range(n_shards):
        part = rows[i * per:(i + 1) * per]
        table = pa.table({"prompt": [p for p, _ in part], "response": [r for _, r in part]})
        pq.write_table(table, os.path.join(folder, f"train-{i:05d}-of-{n_shards:05d}.parquet"), row_group_size=30)
    if empty:
        pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}),
                       os.path.join(folder, f"train-{n_shards:05d}-of-{n_shards:05d}.parquet"))
    return str(folder)


def rows_of(path: str) -> list[tuple[str, str]]:
    table = pq.read_table(path)
    return list(zip(table.column("prompt").to_pylist(), table.column("response").to_pylist()))


def epoch_samples(source, epoch: int, world: int = 1) -> list[tuple]:
    return [(s["prompt"], s["response"]) for r in range(world) for _, s in iter_shard(source, epoch, Shard(r, world))]


def test_a_folder_of_shards_is_one_dataset_with_the_same_rows_per_epoch(tmp_path):
    single = write_qa_parquet(tmp_path / "all.parquet", 230, seed=3)
    folder = write_shards(tmp_path / "shards", rows_of(single), 5)
    cfg = settings()
    sharded = open_dataset(parse_data_arg(folder, "train_file")[0], cfg).source
    whole = open_dataset(parse_data_arg(single, "train_file")[0], cfg).source
    assert sharded.num_samples == whole.num_samples == 230
    assert len(sharded.empty_shards) == 1  # skipped and counted
    for epoch in (0, 1):
        assert Counter(epoch_samples(sharded, epoch)) == Counter(epoch_samples(whole, epoch))
        # two processes share the epoch: every sample once
        assert Counter(epoch_samples(sharded, epoch, world=2)) == Counter(rows_of(single))
    assert epoch_samples(sharded, 0) != epoch_samples(sharded, 1)  # reshuffled per epoch
    glob_form = open_dataset(parse_data_arg(f"{folder}/train-0000[0-4]-*.parquet", "f")[0], cfg).source
    assert epoch_samples(glob_form, 0) == epoch_samples(sharded, 0)
    listed = ",".join(sorted(os.path.join(folder, n) for n in os.listdir(folder)))
    assert epoch_samples(open_dataset(parse_data_arg(listed, "f")[0], cfg).source, 0) == epoch_samples(sharded, 0)


def test_bad_shards_and_patterns_are_one_line_errors(tmp_path):
    folder = write_shards(tmp_path / "shards", rows_of(write_qa_parquet(tmp_path / "a.parquet", 40)), 2, empty=False)
    pq.write_table(pa.table({"prompt": ["x"], "answer": ["y"]}), os.path.join(folder, "train-00009.parquet"))
    with pytest.raises(UserError, match="train-00009.parquet' has another schema"):
        open_dataset(parse_data_arg(folder, "train_file")[0], settings())
    with pytest.raises(UserError, match="the pattern '.*nothing-\\*.parquet' matches no file"):
        parse_data_arg(str(tmp_path / "nothing-*.parquet"), "train_file")
    with pytest.raises(UserError, match="b.parquet' has no weight"):
        parse_data_arg(f"{tmp_path}/a.parquet:0.5,{tmp_path}/b.parquet", "train_file")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match="neither parquet, JSON lines"):
        container(str(tmp_path / "notes.txt"))


def test_kind_comes_from_the_content_not_the_extension(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(5)) + "\n")
    cfg = settings(columns=Columns(prompt_column="q", response_column="a"))
    dataset = open_dataset(parse_data_arg(str(qa), "train_file")[0], cfg)
    assert dataset.kind == "prompt_response"  # a .jsonl is not taken for user records
    assert dataset.source.sample(0, 0).keys() == {"prompt", "response", "_row"}  # _row: its place in the files
    disguised = tmp_path / "data.dat"
    shutil.copy(write_qa_parquet(tmp_path / "x.parquet", 12), disguised)
    assert open_dataset(parse_data_arg(str(disguised), "f")[0], settings()).kind == "prompt_response"
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
                    + "\nnot json\n")
    dataset = open_dataset(parse_data_arg(str(chat), "f")[0], settings())
    assert dataset.kind == "sharegpt" and dataset.source.num_samples == 2
    assert sorted(str(dataset.source.sample(0, i).get("_skip")) for i in range(2)) == ["None", "invalid_json"]


def test_mixture_shares_follow_the_weights_and_resume_anywhere(tmp_path):
    names, weights, sizes = ["zh", "code", "qa"], [0.7, 0.2, 0.1], [3000, 500, 90]
    files = [write_qa_parquet(tmp_path / f"{n}.parquet", size, seed=i) for i, (n, size) in enumerate(zip(names, sizes))]
    arg = ",".join(f"{f}:{w}" for f, w in zip(files, weights))
    specs = parse_data_arg(arg, "train_file")
    assert [s.name for s in specs] == names and [s.weight for s in specs] == weights
    cfg = settings()
    mixture = Mixture([open_dataset(s, cfg).source for s in specs], weights, names, seed=7)
    drawn = [mixture.sample(0, g)["_source"] for g in range(10_000)]
    for i, w in enumerate(weights):
        assert abs(drawn.count(i) / 10_000 - w) < 0.01, (names[i], drawn.count(i))
    again = Mixture([open_dataset(s, cfg).source for s in specs], weights, names, seed=7)
    later = [again.sample(1, g) for g in range(2500, 2600)]  # a fresh object, straight into epoch 1
    assert later == [mixture.sample(1, g) for g in range(2500, 2600)]
    assert mixture.seen(0, 10_000) == [drawn.count(i) for i in range(3)]
    qa_rows = [(s["prompt"], s["response"]) for s in (mixture.sample(0, g) for g in range(10_000)) if s["_source"] == 2]
    assert len(set(qa_rows)) == 90 and len(qa_rows) > 900  # the small dataset repeats
    with pytest.raises(UserError, match="weight too small"):
        Mixture([open_dataset(s, cfg).source for s in specs], [1.0, 1.0, 1e-9], names, seed=7)


def test_config_file_datasets_and_validation_of_another_kind(tmp_path, tokenizer_dir):
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    a = write_qa_parquet(tmp_path / "a.parquet", 60)
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(30)) + "\n")
    listed = inputs(datasets=[{"path": a, "weight": 3}, {"path": str(b), "weight": 1, "name": "second",
                                                         "prompt_column": "question", "response_column": "answer"}],
                    validation_file=a)
    data = TrainData(listed, settings(), tokenizer, False, 0, 1, pin_memory=False, log=lambda _: None)
    assert data.names == ["a", "second"] and isinstance(data.source, Mixture)
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": ["some text"] * 5}), text)
    with pytest.raises(UserError, match="is pretraining data .* training data is SFT"):
        TrainData(inputs(a, validation_file=str(text)), settings(), tokenizer, False, 0, 1, False, lambda _: None)
    with pytest.raises(UserError, match="unknown key"):
        inputs(datasets=[{"path": a, "wieght": 1}])


def test_tokenize_once_cache_gives_the_batches_of_the_source(tmp_path, tokenizer_dir):
    from lowmem.data.sft_cache_build import build_sft_cache
    from lowmem.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    folder = write_shards(tmp_path / "shards", rows_of(write_qa_parquet(tmp_path / "a.parquet", 150, seed=5)), 3)
    build_sft_cache(folder, str(tmp_path / "cache"), tokenizer_dir, max_seq_len=24, num_workers=1, log=lambda _: None)
    assert build_sft_cache(folder, str(tmp_path / "cache"), tokenizer_dir, 24, log=lambda _: None)["complete"]

    def batches(train_file, packing):
        cfg = settings(max_seq_len=24, packing=packing, batch_size=4, buffer_size=40)
        data = TrainData(inputs(train_file), cfg, tokenizer, False, 1, 2, pin_memory=False, log=lambda _: None)
        return [(b.tensors, b.position, b.skip, dict(b.counts)) for b in data.epoch(1, Shard(1, 2), 0)]

    for packing in (False, True):
        on_the_fly, cached = batches(folder, packing), batches(str(tmp_path / "cache"), packing)
        assert len(on_the_fly) == len(cached) > 3
        for (ta, pa_, sa, ca), (tb, pb, sb, cb) in zip(on_the_fly, cached):
            assert (pa_, sa, ca) == (pb, sb, cb)  # same positions and the same skipped/truncated counts
            assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    assert any("skipped_response_too_long" in c or "truncated_prompt" in c for *_, c in batches(folder, False))
    with pytest.raises(UserError, match="built with max_seq_len=24 \\(this run: 32\\)"):
        TrainData(inputs(str(tmp_path / "cache")), settings(max_seq_len=32), tokenizer, False, 0, 1, False,
                  lambda _: None)
    other = tmp_path / "other_tok"
    shutil.copytree(tokenizer_dir, other)
    with open(other / "tokenizer_config.json", "a", encoding="utf-8") as f:
        f.write("\n")  # any change to the tokenizer's files
    with pytest.raises(UserError, match="built with another tokenizer"):
        TrainData(inputs(str(tmp_path / "cache")), settings(max_seq_len=24), load_tokenizer(str(other)), False, 0,
                  1, False, lambda _: None)


def test_a_jsonl_of_records_is_read_as_records_when_its_first_rows_lack_user_id(tmp_path):
    rows = [{"target": f"review {i}", "profile": {"age": 30}} for i in range(50)]  # no user_id: skipped, counted
    rows += [{"user_id": f"u{i % 10}", "target": f"review {i}", "timestamp": i} for i in range(150)]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    logged = []
    dataset = open_dataset(parse_data_arg(str(path), "train_file")[0], settings(), None, log=logged.append)
    assert dataset.kind == "records" and dataset.source.num_samples == 150
    assert "50 no user_id" in "\n".join(logged)


def test_every_missing_input_is_named_in_one_error(tmp_path):
    a = write_qa_parquet(tmp_path / "a.parquet", 10)
    with pytest.raises(UserError) as err:
        parse_inputs(f"{a}:0.5,{tmp_path}/b.parquet:0.5", [], f"{tmp_path}/valid-*.parquet", [], held_out_split=False)
    message = str(err.value)
    assert message.startswith("2 input(s) missing: ") and "\n" not in message
    assert "b.parquet' does not exist" in message and "valid-*.parquet' matches no file" in message
    listed = [{"path": f"{tmp_path}/c.parquet", "weight": 1}, {"path": a, "wieght": 1}, "d.parquet"]
    problems = ["--tokenizer_dir: 'x' does not exist"]  # a caller's own problems, reported with these
    found = parse_inputs("ignored.parquet", listed, "ignored.parquet", [], held_out_split=True, problems=problems)
    assert found.train == [] and found.validation == []
    assert len(problems) == 5 and all(needle in " ".join(problems) for needle in (
        "c.parquet' does not exist", "unknown key(s) wieght", "entry 3 must be a mapping", "every one needs a weight"))
    inputs_ = parse_inputs(a, [], a, [], held_out_split=False)
    assert [s.paths for s in inputs_.train] == [[a]] == [s.paths for s in inputs_.validation]


@pytest.mark.parametrize("kind", ["prompt_response", "pairs"])
def test_strict_names_the_file_and_its_row_not_the_shuffled_position(tmp_path, tokenizer_dir, kind):
    """A bad record at row 40 of the second file is named as that file's row 40, whatever the shuffle did."""
    from lowmem.data.tokenizer import load_tokenizer

    def row(i):
        if kind == "pairs":
            return {"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
        return {"prompt": f"question {i}", "response": f"answer {i}"}

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        rows = [row(100 * shard + i) for i in range(60)]
        if shard == 1:
            rows[40] = {**rows[40], ("rejected" if kind == "pairs" else "response"): ""}  # empty answer
        pq.write_table(pa.Table.from_pylist(rows), folder / f"train-{shard:05d}-of-00002.parquet", row_group_size=16)
    data = TrainData(inputs(str(folder)), settings(strict=True, buffer_size=32, batch_size=4),
                     load_tokenizer(tokenizer_dir), False, 0, 1, pin_memory=False, log=lambda _: None)
    with pytest.raises(UserError) as caught:
        for _ in data.epoch(0, Shard(0, 1), 0):
            pass
    assert str(caught.value).startswith(f"'{folder}/train-00001-of-00002.parquet' row 40: empty"), str(caught.value)
