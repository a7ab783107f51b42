"""Preference training (DPO, IPO, hinge, SimPO, ORPO): the losses against their formulas, packed pairs, the reference
cache on disk, exact resume, and a tiny model that learns which answer is preferred."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, cli, cli_here, flags, read_jsonl, run_in_process, tiny_config, two_processes
from test_resume import losses, start, wait_for_step, weights

from lowmem.run.errors import UserError
from lowmem.train.preference import PreferenceSettings, pair_losses

ANIMALS, OTHERS = ["cat", "dog", "fish", "bird"], ["sun", "moon", "tree", "book"]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def animal_task(folder):
    """'Which is an animal: X or Y?': SFT data answering either word equally often, pairs preferring the animal,
    and held-out questions (word pairs and orders never trained on)."""
    combos = [(a, o, first) for a in ANIMALS for o in OTHERS for first in (0, 1)]
    random.Random(0).shuffle(combos)
    held, train = combos[:12], combos[12:]

    def ask(a, o, first):
        return f"Which is an animal: {a if first else o} or {o if first else a}?"

    return {"sft": write_jsonl(folder / "sft.jsonl", [{"prompt": ask(*c), "response": word}
                                                      for c in train * 4 for word in c[:2]]),
            "pairs": write_jsonl(folder / "pairs.jsonl", [{"prompt": ask(*c), "chosen": c[0], "rejected": c[1]}
                                                          for c in train * 4]),
            "valid": write_jsonl(folder / "valid.jsonl", [{"prompt": ask(*c), "chosen": c[0], "rejected": c[1]}
                                                          for c in held]),
            "test": write_jsonl(folder / "test.jsonl", [{"prompt": ask(*c), "response": c[0]} for c in held])}


@pytest.fixture
def pair_files(tmp_path):
    rng = random.Random(3)
    words = ANIMALS + OTHERS

    def rows(n):
        out = []
        for i in range(n):
            chosen, rejected = rng.sample(words, 2)
            prompt = f"row {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 10)))
            out.append({"prompt": prompt, "chosen": chosen + " " * (i % 3) + " yes" * (i % 4), "rejected": rejected})
        return out

    return {"train_file": write_jsonl(tmp_path / "pairs.jsonl", rows(96)),
            "validation_file": write_jsonl(tmp_path / "valid_pairs.jsonl", rows(16))}


# ---------------------------------------------------------------- the losses, by their formulas

def test_each_loss_is_its_formula():
    torch.manual_seed(0)
    c, r, rc, rr = (torch.randn(6, dtype=torch.float64) * 3 - 10 for _ in range(4))
    nc, nr = torch.tensor([3., 5, 1, 7, 2, 4], dtype=torch.float64), torch.tensor([2., 2, 6, 1, 3, 5], dtype=torch.float64)
    beta, eps, gamma, lam = 0.3, 0.1, 0.7, 0.2
    sig = torch.sigmoid
    z = (c - rc) - (r - rr)
    expected = {
        "dpo": -(1 - eps) * torch.log(sig(beta * z)) - eps * torch.log(sig(-beta * z)),
        "hinge": torch.clamp(1 - beta * z, min=0),
        "ipo": ((c - rc) / nc - (r - rr) / nr - 1 / (2 * beta)) ** 2,
        "simpo": -(1 - eps) * torch.log(sig(beta * (c / nc - r / nr) - gamma))
        - eps * torch.log(sig(-(beta * (c / nc - r / nr) - gamma))),
        "orpo": -c / nc - lam * torch.log(sig(torch.log(torch.exp(c / nc) / (1 - torch.exp(c / nc)))
                                              - torch.log(torch.exp(r / nr) / (1 - torch.exp(r / nr))))),
    }
    for name, want in expected.items():
        s = PreferenceSettings(name, beta, eps if name in ("dpo", "simpo") else 0.0, gamma, lam)
        got, reward_c, reward_r = pair_losses(s, c, r, nc, nr, rc, rr)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=name)
    got, reward_c, _ = pair_losses(PreferenceSettings("dpo", beta, sft_weight=0.5), c, r, nc, nr, rc, rr)
    torch.testing.assert_close(got, -torch.log(sig(beta * z)) - 0.5 * c / nc)  # the SFT term: mean token loss
    torch.testing.assert_close(reward_c, beta * (c - rc))


def _tiny_model(tokenizer_dir):
    from transformers import AutoTokenizer

    from config import TrainConfig
    from lowmem.model.build import build_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    return build_model(TrainConfig(max_seq_len=64), tokenizer).train(), tokenizer


class _FixedReference:
    """Reference sums given per pair (by its place in the padded batch), whatever order a batch holds them in."""

    def __init__(self, values, order):
        self.values, self.order = values, order

    def sums(self, model, batch):
        return self.values[self.order]


def test_packed_pairs_give_the_padded_loss_and_gradients(tokenizer_dir, pair_files):
    from lowmem.data.pairs import PairEncoder, PairPacker, collate_pairs
    from lowmem.train.preference import PreferenceLoss

    model, tokenizer = _tiny_model(tokenizer_dir)
    rows = read_jsonl(pair_files["train_file"])[:7]
    pairs = PairEncoder(tokenizer, 64).encode_many(rows, list(range(7)))
    padded = collate_pairs(pairs, tokenizer.pad_token_id, 7)
    groups = PairPacker.groups(pairs, 128, 7)  # rows of 128: every pair fits in one micro-batch
    assert len(groups) == 1  # both documents of every pair in one micro-batch
    packed = PairPacker.collate(groups[0], tokenizer.pad_token_id, 7, 0, False, None, None)
    assert packed.tensors["input_ids"].shape[0] < padded.tensors["input_ids"].shape[0]  # rows shared
    reference = torch.randn(7, 2, generator=torch.Generator().manual_seed(5)) - 20
    packed_order = [next(i for i, p in enumerate(pairs) if p is q) for q in PairPacker.samples(groups[0])]
    results = []
    for batch, order in ((padded, list(range(7))), (packed, packed_order)):
        model.zero_grad()
        objective = PreferenceLoss(PreferenceSettings("dpo", 0.5, sft_weight=0.3), _FixedReference(reference, order))
        loss, _ = objective(model, batch, torch.tensor(7.0))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_pairs_are_counted_or_refused(tokenizer_dir):
    from transformers import AutoTokenizer

    from lowmem.data.encoding import Skipped
    from lowmem.data.pairs import PairEncoder

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [{"prompt": "a question", "chosen": "yes", "rejected": ""},
            {"prompt": "a question", "chosen": "same", "rejected": " same "},
            {"prompt": "a question", "chosen": "cat " * 40, "rejected": "dog"},
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": "go away"},
            {"prompt": "long " * 60, "chosen": "yes", "rejected": "no"}]
    results = PairEncoder(tokenizer, 32).encode_many(rows, list(range(5)))
    assert [r.reason if isinstance(r, Skipped) else "ok" for r in results] == \
        ["empty_answer", "identical_answers", "answer_too_long", "ok", "ok"]
    assert results[4].notes == ("truncated_prompt",) and len(results[4].prompt) + len(results[4].chosen) <= 32
    with pytest.raises(UserError, match="pair 7: identical answers"):
        PairEncoder(tokenizer, 32, strict=True).encode_many(rows[1:2], [7])


def test_a_missing_answer_column_is_named(tmp_path):
    from lowmem.data.options import DataOptions
    from lowmem.data.sources import open_dataset, parse_data_arg

    path = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(UserError, match="has a 'chosen' column but no 'rejected' column"):
        open_dataset(parse_data_arg(path, "train_file")[0], DataOptions())


# ---------------------------------------------------------------- runs

def pair_config(tmp_path, tokenizer_dir, files, **overrides):
    values = dict(max_seq_len=64, batch_size_per_gpu=8, learn_rate=1e-3, warmup_steps=0, lr_scheduler="constant",
                  max_steps=6, save_steps=3, eval_steps=3, mixed_precision="no")
    return tiny_config(tmp_path, tokenizer_dir, files, **{**values, **overrides})


def test_a_preference_run_learns_what_sft_alone_does_not(tmp_path, tokenizer_dir):
    """The SFT model answers either word; DPO (with an SFT term) on the pairs makes it prefer the animal, also on
    questions it never saw: validation accuracy from the starting model's ~0.5 to >= 0.9, and more right answers."""
    from lowmem.data.reference_cache import ReferenceCache

    task = animal_task(tmp_path)
    with open(task["pairs"], "a", encoding="utf-8") as f:  # bad pairs are skipped and counted, never a NaN
        f.write(json.dumps({"prompt": "Which?", "chosen": "cat", "rejected": "cat"}) + "\n")
        f.write(json.dumps({"prompt": "Which?", "chosen": "", "rejected": "sun"}) + "\n")
    sft = tiny_config(tmp_path / "sft", tokenizer_dir, {"train_file": task["sft"], "validation_file": ""},
                      test_file=task["test"], test_generation_samples=12, max_seq_len=32, batch_size_per_gpu=16,
                      max_steps=100, learn_rate=3e-3, warmup_steps=5, logging_steps=10, seed=1)
    before = run_in_process(sft)
    dpo = tiny_config(tmp_path / "dpo", "", {"train_file": task["pairs"], "validation_file": task["valid"]},
                      finetune_from_ckp_file=sft.final_dir(), test_file=task["test"], test_generation_samples=12,
                      max_seq_len=32, batch_size_per_gpu=8, max_steps=40, eval_steps=20, learn_rate=1e-3,
                      warmup_steps=0, beta=0.1, preference_sft_weight=1.0, seed=1, logging_steps=10)
    after = run_in_process(dpo)
    start = ReferenceCache(os.path.join(str(tmp_path), "valid.reference"))  # the starting model's log-probabilities
    preferred = [start.values(i) for i in range(12)]
    assert 0.2 <= sum(c > r for c, r in preferred) / 12 <= 0.8  # no clear preference before
    assert after["eval_rewards/accuracy"] >= 0.9
    assert after["test_exact_match"] > before["test_exact_match"]
    assert after["data_skipped_identical_answers"] == after["data_skipped_empty_answer"] >= 1  # once an epoch
    records = read_jsonl(os.path.join(dpo.logging_dir(), "metrics.jsonl"))
    logged = [r for r in records if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
            "logps/rejected", "real_token_fraction", "tokens_per_sec"} <= logged[-1].keys()


def test_the_reference_cache_is_computed_once_and_refused_when_it_differs(tmp_path, tokenizer_dir, pair_files,
                                                                         tiny_tokenizer):
    run = pair_config(tmp_path / "a", tokenizer_dir, pair_files, max_steps=3)
    prepared = cli_here(["prepare", "reference", *flags(run)])
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "pairs.reference: 96 rows, computed in 12 forward passes" in prepared.stdout
    first = run_in_process(run)
    assert first["reference_forward_passes"] == 0  # the prepared cache, no reference model run
    resumed = run_in_process(dataclasses.replace(run, max_steps=6, is_keep_training=True))
    assert resumed["reference_forward_passes"] == 0 and resumed["step"] == 6
    other = pair_config(tmp_path / "b", tokenizer_dir, pair_files)
    for change, needle in (({"max_seq_len": 48}, "max_seq_len 64 -> 48"),
                           ({"tokenizer_dir": tiny_tokenizer}, "tokenizer"),
                           ({"seed": 7}, "reference_model")):
        with pytest.raises(UserError, match=f"reference cache .* was computed for other settings \\(.*{needle}"):
            run_in_process(dataclasses.replace(other, **change))
    assert not os.path.exists(other.checkpoint_dir())


def test_a_changed_or_cut_reference_cache_is_said_and_only_its_bad_rows_are_computed_again(tmp_path):
    from lowmem.data.reference_cache import BLOCK_ROWS, RECORD, ReferenceCache

    n, fingerprint, said = 3 * BLOCK_ROWS + 100, {"reference_model": "m", "data": "d"}, []
    cache = ReferenceCache(str(tmp_path / "pairs.reference"))
    assert not cache.prepare(fingerprint, n, log=said.append) and not said  # a new cache: nothing to say
    values = [(-1.0 - i, -2.0 - i) for i in range(n)]
    half = n // 2
    cache.write(list(range(half)), values[:half])
    assert not cache.prepare(fingerprint, n, log=said.append)  # a build killed half-way goes on, and says so
    assert said == [f"reference cache '{cache.data_path}': continuing an interrupted build from row {half} "
                    f"({half} of {n} rows already computed)"]
    cache.write(list(range(half, n)), values[half:])
    cache.finish()
    assert cache.prepare(fingerprint, n, log=said.append) and len(said) == 1  # complete and verified: silent

    original = open(cache.data_path, "rb").read()
    with open(cache.data_path, "r+b") as f:  # 16 rows zeroed in place: same size, other numbers
        f.seek((BLOCK_ROWS + 5) * RECORD.itemsize)
        f.write(b"\0" * 16 * RECORD.itemsize)
    assert not cache.prepare(fingerprint, n, log=said.append)
    assert said[-1] == (f"reference cache '{cache.data_path}': rows {BLOCK_ROWS}-{2 * BLOCK_ROWS - 1} differ from "
                        "the hashes written when they were computed (the file changed on disk): computing them again")
    assert list(cache.pending_rows()) == list(range(BLOCK_ROWS, 2 * BLOCK_ROWS))  # only that block
    assert cache.values(0) == values[0] and cache.values(n - 1) == values[n - 1]
    cache.write(list(range(BLOCK_ROWS, 2 * BLOCK_ROWS)), values[BLOCK_ROWS:2 * BLOCK_ROWS])
    cache.finish()
    assert open(cache.data_path, "rb").read() == original

    with open(cache.data_path, "r+b") as f:  # cut short, in the middle of the third block
        f.truncate((2 * BLOCK_ROWS + 7) * RECORD.itemsize)
    assert not cache.prepare(fingerprint, n, log=said.append)
    assert said[-1].endswith(f"(the file is cut short): computing rows {2 * BLOCK_ROWS}-{n - 1} again")
    assert list(cache.pending_rows()) == list(range(2 * BLOCK_ROWS, n))
    assert cache.values(2 * BLOCK_ROWS) is None and cache.values(2 * BLOCK_ROWS - 1) == values[2 * BLOCK_ROWS - 1]


def start_command(args: list[str]) -> subprocess.Popen:
    command = [sys.executable, os.path.join(REPO, "train_low_mem.py"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


@pytest.mark.slow
def test_a_killed_cache_build_continues_where_it_stopped(tmp_path, tokenizer_dir):
    rng = random.Random(0)
    rows = [{"prompt": f"q {i} " + "cat " * rng.randint(1, 20), "chosen": "yes " * rng.randint(1, 5), "rejected": "no"}
            for i in range(1200)]
    files = {"train_file": write_jsonl(tmp_path / "many.jsonl", rows), "validation_file": ""}
    run = pair_config(tmp_path / "run", tokenizer_dir, files, batch_size_per_gpu=8, max_seq_len=48)
    from lowmem.data.reference_cache import ReferenceCache

    cache = ReferenceCache(os.path.join(str(tmp_path), "many.reference"))
    build = start_command(["prepare", "reference", *flags(run)])
    deadline = time.time() + 300
    while not (os.path.isfile(cache.data_path) and cache.header() and 0 < len(cache.pending_rows()) < 1000):
        assert build.poll() is None and time.time() < deadline, build.stdout.read()[-2000:]
        time.sleep(0.02)  # until a part of the rows is written
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    left, first = len(cache.pending_rows()), int(cache.pending_rows()[0])
    assert 0 < left < 1200 and not cache.complete
    done = cli_here(["prepare", "reference", *flags(run)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert cache.complete and f"computed in {-(-left // 8)} forward passes" in done.stdout  # only what was left
    assert f"continuing an interrupted build from row {first} ({1200 - left} of 1200 rows already computed)" in done.stdout
    clean = cli_here(["prepare", "reference", *flags(run, f"--reference_cache_dir={tmp_path}/clean")])
    assert clean.returncode == 0
    with open(cache.data_path, "rb") as a, open(os.path.join(str(tmp_path), "clean", "many.reference.bin"), "rb") as b:
        assert a.read() == b.read()  # the same numbers as a build never interrupted


def test_sigkill_during_preference_training_resumes_bitwise(tmp_path, tokenizer_dir, pair_files):
    options = dict(max_steps=16, save_steps=4, packing=True, batch_size_per_gpu=2, preference_loss="dpo",
                   label_smoothing=0.1, dropout=0.1)
    reference = pair_config(tmp_path / "a", tokenizer_dir, pair_files, **options)
    run_in_process(reference)
    killed = pair_config(tmp_path / "b", tokenizer_dir, pair_files, **options)
    proc = start(killed)
    wait_for_step(killed, proc, 7)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = cli_here(["train", *flags(killed, "--is_keep_training=True")])
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-2000:]
    assert losses(killed) == losses(reference)  # bitwise on CPU
    a, b = weights(reference), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_step_is_the_same_however_its_pairs_are_split(tmp_path, tokenizer_dir, pair_files):
    """8 pairs x 1, 4 x 2 accumulation and 2 processes x 4: the same losses (normalised over the step's pairs)."""
    common = dict(max_steps=4, save_steps=4, validation_file="", preference_loss="ipo", preference_sft_weight=0.5,
                  reference="model")
    whole = pair_config(tmp_path / "whole", tokenizer_dir, pair_files, batch_size_per_gpu=8, **common)
    split = pair_config(tmp_path / "split", tokenizer_dir, pair_files, batch_size_per_gpu=4,
                        gradient_accumulation_steps=2, **common)
    shared = pair_config(tmp_path / "shared", tokenizer_dir, pair_files, batch_size_per_gpu=4, **common)
    for cfg in (whole, split):
        run_in_process(cfg)
    result = cli(["train", *flags(shared)], launcher=two_processes(), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference 0.00 GiB (a frozen copy)" in result.stdout  # the memory plan counts the copy
    for cfg in (split, shared):
        assert list(losses(cfg).values()) == pytest.approx(list(losses(whole).values()), rel=1e-5)


def test_lora_references_without_a_second_model(tmp_path, pair_files, llama_dir, capsys):
    """LoRA: adapters off by default (no cache, no copy), and starting from an earlier run's adapters, the reference
    is those adapters merged into their base, not the bare base."""
    answers = write_jsonl(tmp_path / "sft_rows.jsonl", [{"prompt": r["prompt"], "response": r["chosen"]}
                                                        for r in read_jsonl(pair_files["train_file"])])
    sft = tiny_config(tmp_path / "sft", "", {"train_file": answers, "validation_file": ""},
                      finetune_from_ckp_file=llama_dir, lora_r=4, merge_lora=False, max_steps=2, learn_rate=1e-2)
    run_in_process(sft)
    capsys.readouterr()
    dpo = pair_config(tmp_path / "dpo", "", pair_files, finetune_from_ckp_file=sft.final_dir(), lora_r=4, max_steps=2,
                      eval_steps=100, preference_loss="hinge")
    result = run_in_process(dpo)
    out = capsys.readouterr().out
    assert "reference: this model with its adapters off (no second model), the adapters of" in out
    assert f"merged into their base {llama_dir}" in out and "reference 0.00 GiB (adapters off)" in out
    assert result["reference_forward_passes"] == 2 + 2  # one per micro-batch: two steps, two validation batches
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".reference.json")]  # no cache was needed


def test_preference_flags_on_other_data_and_impossible_references_are_refused(tmp_path, tokenizer_dir, qa_files):
    from lowmem.train.reference import choose

    with pytest.raises(UserError, match="--beta=0.5 applies to preference pairs"):
        run_in_process(tiny_config(tmp_path, tokenizer_dir, qa_files, beta=0.5))
    with pytest.raises(UserError, match="--reference=adapters_off needs LoRA"):
        choose("adapters_off", True, False, False, False)
    with pytest.raises(UserError, match="--reference=model keeps an unsharded copy"):
        choose("model", True, False, True, False)
    with pytest.raises(UserError, match="--reference=cache is unused: SimPO and ORPO"):
        choose("cache", False, False, False, False)
    assert choose("auto", True, True, False, False) == "adapters_off"  # LoRA without a cache
    assert choose("auto", True, True, False, True) == "cache"  # LoRA with one ready
    assert choose("auto", True, False, True, False) == "cache" and choose("auto", False, True, False, True) == "none"
