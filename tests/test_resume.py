"""Exact resume: SIGKILL and SIGTERM mid-run, one and two processes, epoch boundaries, broken checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import REPO, cli, cli_here, flags, read_jsonl, run_in_process, tiny_config, two_processes


def losses(cfg) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl")) if "loss" in r}


def weights(cfg) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(cfg.final_dir(), "model.safetensors"))


def start(cfg, launcher=None) -> subprocess.Popen:
    command = (launcher or [sys.executable]) + [os.path.join(REPO, "train_low_mem.py"), "train", *flags(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def wait_for_step(cfg, proc, step: int, timeout: float = 300) -> None:
    path = os.path.join(cfg.logging_dir(), "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                # the trainer may be mid-write: read complete lines only
                steps = [json.loads(l).get("step", 0) for l in f if l.endswith("\n") and l.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached")


def assert_same_run(reference, resumed, after_step: int) -> None:
    ref, got = losses(reference), losses(resumed)
    assert sorted(got) == sorted(ref)  # every step logged exactly once, none lost
    for step in ref:
        if step > after_step:
            assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r}"  # bitwise on CPU
    wa, wb = weights(reference), weights(resumed)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture
def run_cfgs(tmp_path, tokenizer_dir, qa_files):
    def make(name, **overrides):
        base = dict(epochs=2, save_steps=4, keep_latest_n_ckp=3, validation_file="", dropout=0.1, trace_samples=True)
        return tiny_config(tmp_path / name, tokenizer_dir, qa_files, **{**base, **overrides})
    return make


def resume(cfg, launcher=None):
    """The run continued with --is_keep_training=True: by a launcher, else in this process (a new process only adds
    its start-up; what the resume restores comes from the checkpoint alone)."""
    args = ["train", *flags(cfg, "--is_keep_training=True")]
    result = cli(args, launcher=launcher) if launcher else cli_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def token_file(tmp_path, tokenizer_dir) -> str:
    from lowmem.data.token_file import tokenize_to_bin

    docs = tmp_path / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"document {i}: " + "cat dog 猫 狗 " * (i % 7 + 1)}) + "\n")
    tokenize_to_bin(str(docs), str(tmp_path / "tokens"), tokenizer_dir, num_workers=1)
    return str(tmp_path / "tokens.bin")


def shard_folder(tmp_path, qa_files) -> str:
    """The training rows as 5 parquet shards in a folder, plus an empty one."""
    from test_data_sources import rows_of, write_shards

    return write_shards(tmp_path / "shards", rows_of(qa_files["train_file"]), 5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards_mixture", "tokens", "records_packed"])
def test_sigkill_then_resume_is_bitwise_identical(run_cfgs, kind, tmp_path, tokenizer_dir, qa_files):
    extra = {}
    if kind == "shards_mixture":  # a folder of shards mixed with another file; two validation sets
        from conftest import write_qa_parquet

        other = write_qa_parquet(tmp_path / "other.parquet", 60, seed=9)
        extra = {"train_file": f"{shard_folder(tmp_path, qa_files)}:0.7,{other}:0.3", "eval_steps": 10,
                 "report_to": "tensorboard",
                 "validation_file": f"{qa_files['validation_file']}:1,{write_qa_parquet(tmp_path / 'v2.parquet', 16)}:1"}
    elif kind == "tokens":
        extra = {"train_file": token_file(tmp_path, tokenizer_dir), "max_seq_len": 32}
    elif kind == "records_packed":
        from test_sft import write_user_records

        extra = {"train_file": write_user_records(tmp_path / "users.jsonl", n_users=20, per_user=6), "packing": True,
                 "max_samples_per_user": 4, "resample_each_epoch": True, "batch_size_per_gpu": 2, "max_seq_len": 96}
    reference = run_cfgs("a", **extra)
    run_in_process(reference)
    steps = max(losses(reference))
    killed = run_cfgs("b", **extra)
    proc = start(killed)
    kill_at = steps // 2 - 1  # inside epoch 0, just before its end; the resume crosses the epoch boundary
    wait_for_step(killed, proc, kill_at)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(killed)) < steps
    result = resume(killed)
    assert "resumed from" in result.stdout
    assert_same_run(reference, killed, after_step=0)
    # the data order continues exactly: same samples per step as the uninterrupted run
    trace_a = {r["step"]: r["samples"] for r in read_jsonl(os.path.join(reference.logging_dir(), "samples_rank0.jsonl"))}
    trace_b = {r["step"]: r["samples"] for r in read_jsonl(os.path.join(killed.logging_dir(), "samples_rank0.jsonl"))}
    assert trace_a == trace_b
    if kind == "shards_mixture":
        records = read_jsonl(os.path.join(killed.logging_dir(), "metrics.jsonl"))
        evals = [r for r in records if "eval_loss" in r]
        assert evals and all({"eval_loss/valid", "eval_loss/v2"} <= r.keys() for r in evals)
        final = [r for r in records if "loss" in r][-1]
        seen = final["data_seen_shards"] + final["data_seen_other"]
        assert seen == 2 * 300  # two epochs of the mixture (240 + 60 rows each), each sample counted once
        assert final["data_seen_other"] / seen == pytest.approx(0.3, abs=0.01)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(reference.logging_dir())
        events.Reload()
        assert {"eval_loss/valid", "eval_loss/v2", "eval_loss", "data_seen_shards"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_sigterm_checkpoints_at_once_and_resumes_twice(run_cfgs):
    reference = run_cfgs("a")
    run_in_process(reference)
    cfg = run_cfgs("b", save_steps=1000)  # only the signal and epoch ends write checkpoints
    for stop_at in (9, 41):  # mid-epoch 0, then mid-epoch 1 after a resume
        proc = start(cfg) if stop_at == 9 else start_resumed(cfg)
        wait_for_step(cfg, proc, stop_at)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, out[-3000:]
        assert "stopped by SIGTERM" in out
        last_logged = max(losses(cfg))
        ckpts = sorted(n for n in os.listdir(cfg.checkpoint_dir()) if n.startswith("step_"))
        assert ckpts[-1] == f"step_{last_logged:08d}"  # no lost steps
    resume(cfg)
    assert_same_run(reference, cfg, after_step=0)


def start_resumed(cfg, launcher=None):
    import dataclasses

    return start(dataclasses.replace(cfg, is_keep_training=True), launcher=launcher)


@pytest.mark.slow
def test_two_processes_on_shards_survive_sigterm_on_one_worker(run_cfgs, tmp_path, qa_files):
    """SIGTERM to one of two processes mid-epoch: all stop together at one step with one checkpoint, and the resumed
    run ends bitwise where the uninterrupted one does, each rank on the same samples (a SIGKILL's resume from the
    last periodic checkpoint is the same restore: one process above, the launcher's own death in test_run_safety)."""
    shards = {"train_file": shard_folder(tmp_path, qa_files)}
    reference = run_cfgs("a", epochs=1, batch_size_per_gpu=4, **shards)
    ref = cli(["train", *flags(reference)], launcher=two_processes())
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = run_cfgs("b", epochs=1, batch_size_per_gpu=4, save_steps=4, **shards)
    proc = start(cfg, launcher=two_processes())
    wait_for_step(cfg, proc, 13)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train_low_mem.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGTERM)  # one process only: all stop together
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out[-3000:]
    assert "checkpoint written, resume with --is_keep_training=True" in out
    stopped_at = max(losses(cfg))
    assert sorted(os.listdir(cfg.checkpoint_dir()))[-1] == f"step_{stopped_at:08d}"  # no step lost
    resume(cfg, launcher=two_processes())
    assert_same_run(reference, cfg, after_step=0)
    for rank in (0, 1):
        a = read_jsonl(os.path.join(reference.logging_dir(), f"samples_rank{rank}.jsonl"))
        b = read_jsonl(os.path.join(cfg.logging_dir(), f"samples_rank{rank}.jsonl"))
        assert a == b


def test_truncated_checkpoint_falls_back_and_rotation_keeps_n(run_cfgs, qa_files):
    cfg = run_cfgs("a", epochs=1, keep_latest_n_ckp=2, validation_file=qa_files["validation_file"], eval_steps=5,
                   dropout=0.0)
    run_in_process(cfg)
    names = sorted(os.listdir(cfg.checkpoint_dir()))
    assert names == ["best", "step_00000028", "step_00000030"]
    newest = os.path.join(cfg.checkpoint_dir(), "step_00000030", "model", "model.safetensors")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with open(os.path.join(cfg.logging_dir(), "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 31, "loss": 2.')  # a kill during a log write leaves a torn last line
    import dataclasses

    more = dataclasses.replace(cfg, epochs=2, is_keep_training=True, allow_config_change=False)
    summary = run_in_process(more)
    assert summary["step"] == 60
    # the resume came from step 28: steps 29 and 30 were trained again and logged once
    assert sorted(losses(more)) == list(range(1, 61))


def test_planted_pickle_is_not_executed(run_cfgs, tmp_path):
    cfg = run_cfgs("a", epochs=1, max_steps=8)
    run_in_process(cfg)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    newest = os.path.join(cfg.checkpoint_dir(), "step_00000008")
    torch.save({"state": Evil()}, os.path.join(newest, "optimizer.pt"))
    manifest_path = os.path.join(newest, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["optimizer.pt"] = os.path.getsize(os.path.join(newest, "optimizer.pt"))
    json.dump(manifest, open(manifest_path, "w"))
    import dataclasses

    summary = run_in_process(dataclasses.replace(cfg, max_steps=10, is_keep_training=True))
    assert not marker.exists()
    assert summary["step"] == 10  # fell back to the checkpoint at step 4 and went on


def test_changed_config_is_refused_on_resume(run_cfgs):
    cfg = run_cfgs("a", epochs=1, max_steps=4)
    run_in_process(cfg)
    result = cli_here(["train", *flags(cfg, "--is_keep_training=True", "--batch_size_per_gpu=4", "--max_steps=6")])
    assert result.returncode == 2
    assert "resume refused: global_batch was 8, now 4" in result.stderr


@pytest.mark.parametrize("optimizer, save_steps", [("adamw", 1), ("adamw", 5), ("adafactor", 1)])
def test_diverging_run_stops_and_keeps_last_good_checkpoint(run_cfgs, optimizer, save_steps):
    """adamw decides on the device and halts at the next log/save; adafactor decides on the host each step."""
    cfg = run_cfgs("a", epochs=1, learn_rate=1e4, warmup_steps=0, save_steps=save_steps, logging_steps=save_steps,
                   max_nonfinite_steps=2, max_grad_norm=0.0, dropout=0.0, optimizer=optimizer)
    result = cli_here(["train", *flags(cfg)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "non-finite" in result.stderr and "Traceback" not in result.stderr
    records = read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl"))
    assert any(r.get("nonfinite_steps") for r in records)
    assert not os.path.exists(cfg.final_dir())
    from lowmem.checkpoint.files import complete_checkpoints, verify

    saved = complete_checkpoints(cfg.checkpoint_dir()) if os.path.isdir(cfg.checkpoint_dir()) else []
    assert saved or save_steps > 1  # saving every step, the good first steps were saved
    from safetensors.torch import load_file

    for path in saved:  # every checkpoint written holds finite weights: skipped steps never reached them
        verify(path)
        weights = load_file(os.path.join(path, "model", "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values())

