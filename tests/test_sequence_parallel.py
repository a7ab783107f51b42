"""Sequence parallelism (--sequence_parallel_size, DeepSpeed Ulysses through accelerate's ParallelismConfig): how a
batch is cut, every refusal, the parts of two processes adding up to one process on whole sequences (dense on
packed rows, LoRA, MoE, DPO), and a real two-process run under ZeRO that equals one process, survives a SIGKILL
and resumes at another sequence-parallel size. All on CPU processes over gloo."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli, cli_here, flags, read_jsonl, run_in_process, tiny_config, two_processes

from config import TrainConfig
from lowmem.data.batches import collate, collate_packed
from lowmem.data.encoding import Encoded
from lowmem.data.shards import cut
from lowmem.run.errors import UserError

deepspeed = pytest.importorskip("deepspeed", reason="sequence parallelism is DeepSpeed's Ulysses")
CONFIGS = os.path.join(REPO, "accelerate_configs")


def _docs(lengths=(21, 14, 30), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [Encoded(ids, ids.clone()) for ids in (torch.randint(4, 90, (n,), generator=gen) for n in lengths)]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("n", [2, 3])
def test_the_parts_of_a_batch_put_together_are_the_batch_with_labels_shifted_before_the_cut(packed, n):
    docs = _docs()
    batch = collate_packed([[docs[0], docs[1]], [docs[2]]], 0, 0, 0) if packed else collate(docs, 0, False, 0)
    parts = [cut(batch, rank, n, 0) for rank in range(n)]
    width = batch.tensors["input_ids"].shape[1]
    whole = {key: torch.cat([p.tensors[key] for p in parts], dim=1) for key in ("input_ids", "position_ids",
                                                                                 "shift_labels")}
    assert whole["input_ids"].shape[1] % n == 0 and whole["input_ids"].shape[1] - width < n  # padded to n parts
    assert torch.equal(whole["input_ids"][:, :width], batch.tensors["input_ids"])
    shifted = torch.nn.functional.pad(batch.tensors["labels"][:, 1:], (0, 1), value=-100)
    assert torch.equal(whole["shift_labels"][:, :width], shifted)  # a part's last label is the next part's token
    assert (whole["shift_labels"][:, width:] == -100).all()
    positions = batch.tensors["position_ids"] if packed else torch.arange(width).expand(len(docs), width)
    assert torch.equal(whole["position_ids"][:, :width], positions)
    assert sum(p.loss_units for p in parts) == batch.loss_units == int((shifted != -100).sum())
    assert sum(p.real_tokens for p in parts) == batch.real_tokens
    assert all("attention_mask" not in p.tensors for p in parts)  # Ulysses drops it; positions say the rest


def test_a_pair_batch_keeps_its_pairs_in_every_part():
    from lowmem.data.pairs import EncodedPair, collate_packed_pairs

    pair = EncodedPair([5, 6, 7], [8, 9], [10, 11, 12])
    batch = collate_packed_pairs([[(pair, 0), (pair, 1)]], 0, 0, 0)
    parts = [cut(batch, rank, 2, 0) for rank in range(2)]
    assert [p.loss_units for p in parts] == [1, 1]  # every process computes the pair's values from the group's sums
    sequence = torch.cat([p.extra["shift_sequence"] for p in parts], dim=1)[:, :batch.tensors["labels"].shape[1]]
    assert torch.equal(sequence, torch.nn.functional.pad(batch.extra["sequence"][:, 1:], (0, 1), value=-1))


def _llama_config(heads=4, kv=2):
    """What the checks read of a model config."""
    from types import SimpleNamespace

    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, is_encoder_decoder=False)


@pytest.mark.parametrize("values, world, config, attention, needle", [
    ({}, 3, _llama_config(), "sdpa", "a number of processes divisible by it"),
    ({}, 2, _llama_config(heads=3, kv=3), "sdpa", "3 is not divisible by 2; use 3"),
    ({"sequence_parallel_size": 4}, 4, _llama_config(heads=8, kv=3), "sdpa", "the 3 key/value heads"),
    ({}, 2, _llama_config(), "eager", "eager needs the [tokens x tokens] mask"),
    ({"packing": True}, 2, _llama_config(), "sdpa", "packed documents would attend to each other; use "
                                                   "--attn_implementation=sdpa_varlen"),
    ({"packing": True}, 2, _llama_config(), "flex_attention", "packed documents would attend to each other"),
    ({"zero_stage": 0}, 2, _llama_config(), "sdpa", "runs under DeepSpeed: add --zero_stage=2"),
])
def test_what_cannot_be_split_is_refused_in_one_line_naming_the_fix(values, world, config, attention, needle,
                                                                     monkeypatch):
    from lowmem.model import sequence_parallel

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    cfg = TrainConfig(**{"sequence_parallel_size": 2, "zero_stage": 2, **values})
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        sequence_parallel.check(cfg, config, attention, world)
    sequence_parallel.check(TrainConfig(), config, attention, world)  # N = 1: nothing to check


def test_without_deepspeed_flags_the_command_line_says_what_to_add(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, sequence_parallel_size=2, max_steps=1)
    done = cli_here(["train", *flags(cfg)])
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--sequence_parallel_size=2 needs a number of processes divisible by it; this launch has 1" in done.stderr


@pytest.mark.slow
def test_two_processes_parts_add_up_to_one_process_for_dense_lora_moe_and_dpo(qwen3_moe_dir, tokenizer_dir):
    script = os.path.join(REPO, "tests", "sequence_parallel_parts.py")
    done = subprocess.run([*two_processes(), script, REPO, qwen3_moe_dir, tokenizer_dir], capture_output=True,
                          text=True, timeout=900, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    cases = re.findall(r"CASE (\w+) ok", done.stdout)  # the two processes' lines may share one
    assert sorted(cases) == sorted(["dense", "lora", "moe", "dpo"] * 2), done.stdout[-3000:]


def _launch(name: str, processes: int = 2) -> list[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, name),
            "--num_processes", str(processes), "--main_process_port", str(port)]


def _logged(cfg) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl"))
            if "loss" in r}


@pytest.fixture
def base_model(tmp_path, tokenizer_dir):
    """The tiny preset saved once: every run starts from the same weights (ZeRO-3 builds its own otherwise)."""
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.model.build import build_model

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    folder = str(tmp_path / "base")
    build_model(TrainConfig(), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_zero3_lora_run_split_in_two_equals_one_process_survives_a_kill_and_resumes_unsplit(tmp_path, qa_files,
                                                                                              base_model):
    from test_resume import start, wait_for_step

    # LoRA without dropout (the same masks): under ZeRO-3 the chunked loss gathers the frozen head
    common = dict(finetune_from_ckp_file=base_model, packing=True, mixed_precision="no", lora_r=8, lora_dropout=0.0,
                  max_steps=6, save_steps=2, batch_size_per_gpu=4, warmup_steps=0, eval_steps=3, eval_max_batches=2)
    reference = tiny_config(tmp_path / "one", "", qa_files, **common)
    run_in_process(reference)
    split = tiny_config(tmp_path / "split", "", qa_files, sequence_parallel_size=2, **common)
    proc = start(split, launcher=_launch("deepspeed_zero3.yaml"))
    wait_for_step(split, proc, 3, timeout=600)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = os.path.join(split.checkpoint_dir())
    unsplit = dataclasses.replace(split, run_name="unsplit", sequence_parallel_size=1, batch_size_per_gpu=2,
                                  is_keep_training=True)
    shutil.copytree(split.checkpoint_dir(), unsplit.checkpoint_dir())  # the same checkpoints, resumed another way

    resumed = cli(["train", *flags(dataclasses.replace(split, is_keep_training=True))],
                  launcher=_launch("deepspeed_zero3.yaml"), cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "each sequence split over 2 (Ulysses; 1 data-parallel rank)" in resumed.stdout + resumed.stderr
    want, got = _logged(reference), _logged(split)
    assert sorted(got) == list(range(1, 7)) and os.listdir(steps)
    for step, (loss, norm) in want.items():  # the same loss and gradient norm at every step, resume included
        assert got[step][0] == pytest.approx(loss, rel=1e-5) and got[step][1] == pytest.approx(norm, rel=1e-4), step

    again = cli(["train", *flags(unsplit)], launcher=_launch("deepspeed_zero3.yaml"), cwd=str(tmp_path))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert "resumed from" in output and "(DeepSpeed ZeRO-3) " in output  # no split: 2 data-parallel ranks
    assert max(_logged(unsplit)) == 6


@pytest.mark.slow
def test_a_zero2_run_split_in_two_equals_one_process(tmp_path, qa_files, base_model):
    common = dict(finetune_from_ckp_file=base_model, packing=True, mixed_precision="no",
                  max_steps=3, batch_size_per_gpu=4, warmup_steps=0)
    reference = tiny_config(tmp_path / "one", "", qa_files, **common)
    run_in_process(reference)
    split = tiny_config(tmp_path / "split", "", qa_files, sequence_parallel_size=2, **common)
    done = cli(["train", *flags(split)], launcher=_launch("deepspeed_zero2.yaml"), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    want, got = _logged(reference), _logged(split)
    for step, (loss, norm) in want.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-5) and got[step][1] == pytest.approx(norm, rel=1e-4), step
