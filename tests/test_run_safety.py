"""Never lose a run: honest mistakes and ordinary failures, with real processes, signals and files.

Each test reproduces what a user would do (resume with another shape, start a second run of the same
name, corrupt or fill the disk, kill the launcher) and checks that nothing already written is lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import (
    REPO,
    cli,
    cli_here,
    flags,
    read_jsonl,
    run_in_process,
    tiny_config,
    two_processes,
    write_qa_parquet,
)
from test_resume import losses, start, wait_for_step

from lowmem.checkpoint.files import complete_checkpoints, verify


def tree_digest(path) -> dict:
    """Every file under path with a hash of its bytes: 'byte-identical' made checkable."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def saved_run(tmp_path, tokenizer_dir, qa_files):
    """A finished tiny run with checkpoints at steps 2, 4, 6 (constant lr, no dropout: easy to compare)."""
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, qa_files, max_steps=6, save_steps=2, keep_latest_n_ckp=3,
                      validation_file="", lr_scheduler="constant", warmup_steps=0)
    run_in_process(cfg)
    return cfg


def resume_flags(cfg, *extra) -> list[str]:
    return ["train", *flags(cfg, "--is_keep_training=True", *extra)]


def test_changed_model_shape_or_optimizer_is_refused_before_anything_is_touched(saved_run):
    before = tree_digest(saved_run.run_dir()), tree_digest(saved_run.logging_dir())
    for change, needle in (("--model_preset=small", "model_preset was 'tiny', now 'small'"),
                           ("--optimizer=adafactor", "optimizer was 'adamw', now 'adafactor'")):
        result = cli_here(resume_flags(saved_run, change, "--max_steps=8"))
        assert result.returncode == 2, result.stderr[-2000:]
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert (tree_digest(saved_run.run_dir()), tree_digest(saved_run.logging_dir())) == before  # byte-identical


def corrupt_byte(path: str, offset_from_end: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - offset_from_end)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_bytes_and_headers_fall_back_and_all_broken_is_an_error(saved_run, capsys):
    ckpts = complete_checkpoints(saved_run.checkpoint_dir())
    assert [os.path.basename(p) for p in ckpts] == ["step_00000002", "step_00000004", "step_00000006"]
    newest, middle, oldest = (os.path.join(p, "model", "model.safetensors") for p in reversed(ckpts))
    corrupt_byte(newest)  # same size: only the content hash can tell
    with open(middle, "r+b") as f:
        f.write(b"\xff" * 16)  # the safetensors header length and JSON start
    for path in ckpts[1:]:
        with pytest.raises(ValueError):
            verify(path)
    summary = run_in_process(dataclasses.replace(saved_run, is_keep_training=True, max_steps=7))
    out = capsys.readouterr().out
    assert "step_00000006 is unusable" in out and "step_00000004 is unusable" in out
    assert "resumed from" in out and "step_00000002" in out.split("resumed from", 1)[1].splitlines()[0]
    assert summary["step"] == 7
    # every checkpoint broken: an error that lists them; nothing starts over them
    for path in complete_checkpoints(saved_run.checkpoint_dir()):
        corrupt_byte(os.path.join(path, "optimizer.pt"), 10)
    before = tree_digest(saved_run.checkpoint_dir())
    result = cli_here(resume_flags(saved_run, "--max_steps=9"))
    assert result.returncode == 2 and "no usable checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("does not match its hash") >= 2
    assert tree_digest(saved_run.checkpoint_dir()) == before
    check = cli_here(["check_checkpoint", saved_run.checkpoint_dir()])
    assert check.returncode == 2 and "optimizer.pt does not match its hash" in check.stdout + check.stderr


def test_one_owner_per_run(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, epochs=1, max_steps=400, save_steps=1, validation_file="",
                      warmup_steps=0, batch_size_per_gpu=2)
    first = start(cfg)
    wait_for_step(cfg, first, 2)
    second = cli_here(["train", *flags(cfg)])  # a fresh start and a resume, both while the first one trains
    also_resumed = cli_here(resume_flags(cfg))
    assert second.returncode == 2 and "is already running" in second.stderr, second.stderr[-2000:]
    assert also_resumed.returncode == 2 and "is already running" in also_resumed.stderr
    os.killpg(first.pid, signal.SIGKILL)  # the lock stays behind, stale
    first.wait()
    saved = tree_digest(cfg.checkpoint_dir())
    fresh = cli_here(["train", *flags(cfg, "--max_steps=3")])
    assert fresh.returncode == 2 and "already exists" in fresh.stderr and "--run_name" in fresh.stderr
    assert tree_digest(cfg.checkpoint_dir()) == saved
    resumed = cli_here(resume_flags(cfg, "--max_steps=8"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "taking over the lock" in fresh.stdout and "resumed from" in resumed.stdout
    replaced = cli_here(["train", *flags(cfg, "--max_steps=3", "--overwrite_output_dir=True")])
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "deleted the earlier run" in replaced.stdout
    logged = read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl"))
    assert sorted(r["step"] for r in logged if "loss" in r) == [1, 2, 3]
    assert not os.path.exists(os.path.join(cfg.run_dir(), ".lock"))


def test_runs_with_different_output_dirs_keep_their_own_logs(tmp_path, tokenizer_dir, qa_files):
    runs = []
    for name in ("profile_context_seed42", "history_only_seed42"):
        cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, run_name="sft", log_dir="", max_steps=2,
                          output_dir=str(tmp_path / "outputs" / name), validation_file="", report_to="tensorboard")
        run_in_process(cfg)
        runs.append(cfg)
    dirs = [c.logging_dir() for c in runs]
    assert dirs[0] != dirs[1] and all(d.startswith(c.run_dir()) for d, c in zip(dirs, runs))
    for d in dirs:
        assert [r["step"] for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "loss" in r] == [1, 2]
        assert [n for n in os.listdir(d) if n.startswith("events.out.tfevents")]  # TensorBoard beside it
        assert not [n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]  # no empty hparams run
    shared = dataclasses.replace(runs[1], log_dir=str(tmp_path / "logs"), wandb_run_name="same")
    run_in_process(dataclasses.replace(runs[0], log_dir=str(tmp_path / "logs"), wandb_run_name="same",
                                       overwrite_output_dir=True))
    from lowmem.run.errors import UserError

    with pytest.raises(UserError, match="belongs to the run in"):
        run_in_process(dataclasses.replace(shared, overwrite_output_dir=True))


def test_killed_launcher_leaves_no_worker_behind(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=2000, epochs=1, batch_size_per_gpu=2,
                      validation_file="", warmup_steps=0)
    proc = start(cfg, launcher=two_processes())
    wait_for_step(cfg, proc, 2)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train_low_mem.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)  # the launcher alone, as an OOM killer or a lost session would
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} worker(s) still training 30 s after the launcher died"


def test_changed_learning_rate_on_resume_is_used_from_the_next_step(saved_run):
    from safetensors.torch import load_file

    def weights(cfg):
        return load_file(os.path.join(cfg.final_dir(), "model.safetensors"))

    at_six = weights(saved_run)
    same = dataclasses.replace(saved_run, output_dir=saved_run.output_dir + "_copy", log_dir=saved_run.log_dir + "_copy")
    shutil.copytree(saved_run.run_dir(), same.run_dir())
    result = cli_here(resume_flags(saved_run, "--max_steps=9", "--learn_rate=0.0001", "--weight_decay=0.1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "changed on resume: max_steps 6 -> 9, learn_rate 0.001 -> 0.0001, weight_decay 0.01 -> 0.1" in result.stdout
    records = read_jsonl(os.path.join(saved_run.logging_dir(), "metrics.jsonl"))
    assert [r["lr"] for r in records if "loss" in r and r["step"] > 6] == pytest.approx([1e-4] * 3)
    assert any("changed_on_resume" in r for r in records)
    kept = cli_here(resume_flags(same, "--max_steps=9"))  # the same checkpoint continued at the old rate
    assert kept.returncode == 0, kept.stderr[-2000:]
    key = "model.layers.0.mlp.up_proj.weight"
    slow = (weights(saved_run)[key] - at_six[key]).abs().mean()
    fast = (weights(same)[key] - at_six[key]).abs().mean()
    assert 4 < fast / slow < 20  # Adam steps scale with the learning rate: 10x smaller steps


def test_token_ids_past_the_vocabulary_are_refused_before_step_1(tmp_path, tokenizer_dir, tiny_tokenizer):
    from test_resume import token_file

    tokens = token_file(tmp_path, tokenizer_dir)  # made with a 600-entry vocabulary
    cfg = tiny_config(tmp_path, tiny_tokenizer, {"train_file": tokens, "validation_file": ""}, max_seq_len=32,
                      max_steps=2)
    result = cli_here(["train", *flags(cfg)])
    assert result.returncode == 2 and "vocabulary" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(cfg.checkpoint_dir()) and not os.path.exists(cfg.final_dir())


def test_unusable_training_data_is_an_error_and_skip_counts_survive_resume(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lowmem.run.errors import UserError

    empty = tmp_path / "empty_responses.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "response": ["", " ", ""]}), empty)
    cfg = tiny_config(tmp_path / "x", tokenizer_dir, {"train_file": str(empty), "validation_file": ""})
    with pytest.raises(UserError, match="no usable rows"):
        run_in_process(cfg)
    assert not os.path.exists(cfg.run_dir() + "/final")
    mixed = write_qa_parquet(tmp_path / "mixed.parquet", 200, seed=4)
    table = pq.read_table(mixed)
    responses = [r if i % 7 else "" for i, r in enumerate(table.column("response").to_pylist())]
    pq.write_table(table.set_column(1, "response", pa.array(responses)), mixed)
    whole = tiny_config(tmp_path / "whole", tokenizer_dir, {"train_file": mixed, "validation_file": ""}, max_steps=16,
                        epochs=1, warmup_steps=0)
    counted = run_in_process(whole)["data_skipped_empty_or_null"]
    part = dataclasses.replace(whole, output_dir=str(tmp_path / "part"), log_dir=str(tmp_path / "part_logs"),
                               max_steps=7, save_steps=7)
    run_in_process(part)
    resumed = run_in_process(dataclasses.replace(part, max_steps=16, is_keep_training=True))
    assert resumed["data_skipped_empty_or_null"] == counted < 200 // 7 + 1  # consumed rows only, across the resume


def mount_script(size_mb: int, mount_point: str, commands: str) -> list[str] | None:
    """A shell command that mounts a small tmpfs (in a private mount namespace) and runs `commands`."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                            f"mount -t tmpfs -o size=1m tmpfs {mount_point}"], capture_output=True) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size_mb}m tmpfs {mount_point} && {commands}"]


def test_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, tokenizer_dir, qa_files):
    disk = tmp_path / "small_disk"
    disk.mkdir()
    # ~10 MiB a checkpoint on a 30 MiB disk: steps 2 and 4 fit, step 6 does not
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=6, save_steps=2, keep_latest_n_ckp=10,
                      validation_file="", train_state_dir=str(disk / "ckpts"))
    py, script = sys.executable, os.path.join(REPO, "train_low_mem.py")
    train = " ".join(["train", *flags(cfg)])
    command = mount_script(30, str(disk), f"{py} {script} {train} 2>{tmp_path}/err.txt; echo rc=$?; "
                                          f"{py} {script} check_checkpoint {disk}/ckpts/step_00000004; echo check=$?; "
                                          f"ls {disk}/ckpts")
    if command is None:
        pytest.skip("no tmpfs can be mounted here (needs unshare -rm or root)")
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
    err = (tmp_path / "err.txt").read_text()
    assert "rc=2" in out, out + err[-2000:]
    assert "disk" in err and "Traceback" not in err
    assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1
    assert "step_00000006 was not written" in err and "step_00000004 is intact" in err
    assert "check=0" in out  # the checkpoint before the full disk still verifies
    assert ".tmp_step" not in out  # no half-written checkpoint left behind


@pytest.mark.slow
def test_elastic_resume_two_to_one_and_one_to_two_processes(tmp_path, tokenizer_dir, qa_files):
    """12 steps on two processes, the rest on one, and the other way round (the two processes started by torchrun, with
    the --local_rank flag the older launcher passes): every step's loss is the one-process run's."""
    from lowmem.run.distributed import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    common = dict(epochs=1, validation_file="", lr_scheduler="constant", warmup_steps=0, dropout=0.0, save_steps=1000)
    reference = tiny_config(tmp_path / "ref", tokenizer_dir, qa_files, batch_size_per_gpu=8, **common)
    run_in_process(reference)
    expected = losses(reference)
    for name, first, second in (("two_to_one", two_processes(), None), ("one_to_two", None, torchrun)):
        cfg = tiny_config(tmp_path / name, tokenizer_dir, qa_files, batch_size_per_gpu=4 if first else 8, max_steps=12,
                          **common)
        part = cli(["train", *flags(cfg)], launcher=first) if first else cli_here(["train", *flags(cfg)])
        assert part.returncode == 0, part.stderr[-2000:]
        rest_args = ["train", *flags(cfg, "--is_keep_training=True", "--max_steps=0",
                                     f"--batch_size_per_gpu={8 if first else 4}", *(["--local_rank=0"] if second else []))]
        rest = cli(rest_args, launcher=second) if second else cli_here(rest_args)
        assert rest.returncode == 0, rest.stderr[-2000:]
        assert "elastic resume" in rest.stdout
        assert ("devices: 2 x cpu" if second else "devices: 1 x cpu") in rest.stdout
        got = losses(cfg)
        assert sorted(got) == sorted(expected) == list(range(1, 31))  # 240 rows / 8 per step, none repeated or lost
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (name, step)


@pytest.mark.slow
def test_slurm_requeue_cycle_resumes_exactly(tmp_path, tokenizer_dir, qa_files):
    script = os.path.join(REPO, "slurm", "train.sbatch")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (stubs / "scontrol").write_text(f'#!/bin/bash\nif [ "$1" = requeue ]; then echo "$2" >> {tmp_path}/requeued; '
                                    'else echo localhost; fi\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    common = dict(epochs=1, validation_file="", dropout=0.1, save_steps=1000, batch_size_per_gpu=4)
    reference = tiny_config(tmp_path / "ref", tokenizer_dir, qa_files, **common)
    run_in_process(reference)
    cfg = tiny_config(tmp_path / "job", tokenizer_dir, qa_files, **common)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "LAUNCHER": f"{sys.executable}",
           "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_ID": "4242", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    job_flags = [f for f in flags(cfg) if not f.startswith("--is_keep_training")]  # the script adds it
    job = subprocess.Popen(["bash", script, *job_flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(cfg, job, 20)
    job.send_signal(signal.SIGUSR1)  # Slurm's warning before the time limit, to the batch shell
    out, _ = job.communicate(timeout=1800)
    assert job.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM" in out and (tmp_path / "requeued").read_text().split() == ["4242"]
    again = subprocess.run(["bash", script, *job_flags], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "resumed from" in again.stdout and (tmp_path / "requeued").read_text().split() == ["4242"]
    assert losses(cfg) == losses(reference)  # bitwise, dropout included


def test_resuming_a_finished_run_says_so_and_exports_only_when_the_export_is_missing(tmp_path, tokenizer_dir, qa_files,
                                                                                      capsys):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=4, save_steps=2, validation_file="")
    run_in_process(cfg)
    again = dataclasses.replace(cfg, is_keep_training=True)
    before = tree_digest(cfg.run_dir())
    capsys.readouterr()
    assert run_in_process(again)["already_finished"]
    assert "already finished: it is at step 4" in capsys.readouterr().out
    assert tree_digest(cfg.run_dir()) == before  # nothing trained, saved or exported again
    shutil.rmtree(cfg.final_dir())  # as a kill between the last step and the export leaves it
    summary = run_in_process(again)
    assert summary["step"] == 4 and os.path.isfile(os.path.join(cfg.final_dir(), "model.safetensors"))
    out = capsys.readouterr().out
    assert "finished training at step 4 (--max_steps=4) but has no final model: exporting it now" in out
    logged = read_jsonl(os.path.join(cfg.logging_dir(), "metrics.jsonl"))
    assert sorted(r["step"] for r in logged if "loss" in r) == [1, 2, 3, 4]  # no step trained twice


def test_a_full_disk_under_the_log_dir_is_one_line_and_leaves_no_empty_file(tmp_path):
    """The log dir's owner file is claimed on a full disk: one line, and no 0-byte owner.json left behind."""
    disk = tmp_path / "logs_disk"
    disk.mkdir()
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from config import TrainConfig\n"
              "from lowmem.run.errors import UserError\n"
              "from lowmem.train.ownership import claim_log_dir\n"
              "try:\n"
              f"    claim_log_dir(TrainConfig(run_name='r', output_dir='{tmp_path}/ms', log_dir='{disk}'))\n"
              "except UserError as exc:\n"
              "    print('error:', exc)\n")
    (tmp_path / "claim.py").write_text(script)
    fill = f"head -c 2000000 /dev/zero > {disk}/filler 2>/dev/null; mkdir -p {disk}/r; "
    command = mount_script(1, str(disk), f"{fill}{sys.executable} {tmp_path}/claim.py {REPO}; ls -la {disk}/r")
    if command is None:
        pytest.skip("no tmpfs can be mounted here (needs unshare -rm or root)")
    out = subprocess.run(command, capture_output=True, text=True, timeout=600).stdout
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk under the log dir" in errors[0] and "is full" in errors[0], out
    assert "owner.json" not in out  # neither the file nor its temporary copy is left


def test_a_log_dir_with_a_few_kib_free_is_the_same_one_line(tmp_path):
    """TensorBoard's flush (not our jsonl append) is what fails with 4 KiB left: still one line, no thread traceback."""
    disk = tmp_path / "logs_disk"
    disk.mkdir()
    script = ("import os, sys; sys.path.insert(0, sys.argv[1])\n"
              "from accelerate import Accelerator\n"
              "from lowmem.run.errors import UserError\n"
              "from lowmem.train.metrics import MetricsWriter\n"
              f"accelerator = Accelerator(log_with='tensorboard', project_dir='{disk}')\n"
              "accelerator.init_trackers('r')\n"
              f"metrics = MetricsWriter(accelerator, '{disk}/r', None)\n"
              f"free = os.statvfs('{disk}')\n"
              "print('free:', free.f_bavail * free.f_frsize)\n"
              "try:\n"
              "    for step in range(1, 20000):\n"
              "        metrics.log({'loss': 1 / step, 'lr': 1e-3, 'grad_norm': 0.5}, step)\n"
              "    metrics.close()\n"
              "except UserError as exc:\n"
              "    print('error:', exc)\n")
    (tmp_path / "log.py").write_text(script)
    fill = f"head -c 1040000 /dev/zero > {disk}/filler 2>/dev/null; "
    command = mount_script(1, str(disk), f"{fill}{sys.executable} {tmp_path}/log.py {REPO}")
    if command is None:
        pytest.skip("no tmpfs can be mounted here (needs unshare -rm or root)")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    free = int(next(line for line in done.stdout.splitlines() if line.startswith("free:")).split()[1])
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert 0 < free <= 16384, done.stdout  # a few KiB, not zero
    assert len(errors) == 1 and "the disk under the log dir" in errors[0] and "is full" in errors[0], done.stdout
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr[-2000:]
