"""Every shell command of the README that can run on a CPU without a hub runs as written, top to bottom.

The commands run in a scratch directory that starts like a fresh checkout, with the files a user brings
(raw.jsonl, corpus.jsonl, chats, prompts.txt, my_run.json) written first. Long runs get tiny sizes through
flags (fewer steps, the tiny preset); nothing else of a command is changed. Commands that need a GPU,
a cluster, a server or a downloaded model are listed in SKIPPED with the reason, and a new command that
is neither run nor listed fails the test.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

SKIPPED = {  # the start of a command -> why it cannot run here
    "python3 -m venv": "sets up the environment this test runs in",
    ". .venv/bin/activate": "the environment this test runs in",
    "pip install": "the environment this test runs in",
    "python -m pytest": "is the test suite itself",
    "accelerate launch --multi_gpu": "needs several GPUs",
    "accelerate launch --config_file accelerate_configs/multi_gpu.yaml": "needs several GPUs",
    "accelerate launch train_low_mem.py train --is_finetune=True": "needs the GPU pretraining run's model",
    "torchrun": "needs several GPUs",
    "./start_pretrain_large.sh": "needs GPUs and the 10M-row pretraining data",
    "sbatch": "needs a Slurm cluster (tests/test_run_safety.py runs the script with stand-ins)",
    "tensorboard": "starts a server",
    "python train_low_mem.py train --run_name=qwen_lora": "needs a downloaded Qwen model in /models",
    "accelerate launch --config_file accelerate_configs/deepspeed_zero3_sp.yaml": "needs 8 GPUs and Qwen3-30B-A3B",
}
TINY = {"--max_steps": "3", "--warmup_steps": "1", "--model_preset": "tiny", "--save_steps": "2", "--eval_steps": "2",
        "--logging_steps": "1", "--test_generation_samples": "3", "--batch_size_per_gpu": "4"}
SHORTER = {"--max_seq_len": "256"}  # replaced where a command gives it (a cache and its training run agree)
TINY_EVALUATE = {"--max_examples": "16"}  # the demo's 200 test questions, answered one by one, are the slow part


def readme_commands() -> list[str]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()  # a trailing comment
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def user_files(root: str) -> None:
    """What the README assumes a user has: raw data, a corpus, conversations, preference pairs, prompts, a records
    config."""
    rng = random.Random(0)
    words = "cat dog sun moon tree fish bird rain star book 猫 狗 山 水 花".split()
    os.makedirs(os.path.join(root, "data", "sft"), exist_ok=True)
    with open(os.path.join(root, "raw.jsonl"), "w", encoding="utf-8") as f:
        for i in range(400):
            f.write(json.dumps({"question": " ".join(rng.choices(words, k=rng.randint(2, 8))),
                                "answer": " ".join(rng.choices(words, k=rng.randint(1, 5))),
                                "user_id": f"u{i % 200}"}, ensure_ascii=False) + "\n")
    with open(os.path.join(root, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=40))}, ensure_ascii=False) + "\n")
    for shard in range(2):
        with open(os.path.join(root, "data", "sft", f"chats-{shard}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(60):
                turns = [{"role": r, "content": " ".join(rng.choices(words, k=4))} for r in ("user", "assistant") * 2]
                f.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    with open(os.path.join(root, "chats.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(60):
            turns = [{"role": r, "content": " ".join(rng.choices(words, k=3))} for r in ("user", "assistant")]
            f.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    with open(os.path.join(root, "pairs.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(40):
            chosen, rejected = rng.sample(words, 2)
            f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=4)), "chosen": chosen, "rejected": rejected},
                               ensure_ascii=False) + "\n")
    with open(os.path.join(root, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("What is 1 + 2?\n重复：猫 狗 山\n")
    records = os.path.join(root, "records.jsonl")
    with open(records, "w", encoding="utf-8") as f:
        for u in range(20):
            for i in range(4):
                f.write(json.dumps({"user_id": f"u{u}", "profile": {"colour": "red"}, "timestamp": i,
                                    "context": [f"friend: day {i}?"], "target": "I like red things"}) + "\n")
    with open(os.path.join(root, "my_run.json"), "w", encoding="utf-8") as f:
        json.dump({"preset": "sft", "train_file": records, "validation_file": "", "tokenizer_dir": "model_save/demo_tokenizer",
                   "finetune_from_ckp_file": "", "model_preset": "tiny", "max_seq_len": 128, "batch_size_per_gpu": 8,
                   "gradient_accumulation_steps": 1, "report_to": "none", "learn_rate": 1e-3, "warmup_steps": 2}, f)


def with_tiny_sizes(args: list[str]) -> list[str]:
    """A command with tiny sizes: `train` gets TINY (flags it has are given a tiny value, missing ones appended),
    `evaluate` TINY_EVALUATE, and each command SHORTER's values for the flags it gives."""
    tiny = {"train": TINY, "evaluate": TINY_EVALUATE}.get(args[0], {})
    given = {**SHORTER, **tiny}
    out, seen = [], set()
    i = 0
    while i < len(args):
        word = args[i]
        name = word.split("=", 1)[0]
        if name in given:
            seen.add(name)
            out.append(f"{name}={given[name]}")
            i += 1 if "=" in word else 2
            continue
        out.append(word)
        i += 1
    uses_config_file = "--config" in (a.split("=", 1)[0] for a in args)
    extra = {k: v for k, v in tiny.items() if k not in seen and not (uses_config_file and k == "--batch_size_per_gpu")}
    return out + [f"{k}={v}" for k, v in extra.items()]


def run_in_process(args: list[str], stdin: str, capsys) -> tuple[int, str, str]:
    """train_low_mem.py's own command line, in this process (no second torch import per command)."""
    from accelerate.state import AcceleratorState, GradientState

    import train_low_mem

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        code = train_low_mem.run_command_line(args)
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # a UserError is what main() turns into exit 2
        from lowmem.run.errors import UserError

        if not isinstance(exc, UserError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        sys.stdin = saved_stdin
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "checkout")
    os.makedirs(root)
    for name in ("train_low_mem.py", "config.py", "lowmem", "accelerate_configs", "slurm"):
        os.symlink(os.path.join(REPO, name), os.path.join(root, name))
    user_files(root)
    monkeypatch.chdir(root)
    ran, skipped = [], []
    for command in (part.strip() for line in readme_commands() for part in line.split(" && ")):
        reason = next((why for start, why in SKIPPED.items() if command.startswith(start)), None)
        if reason:
            skipped.append(command)
            continue
        words = shlex.split(command)
        if words[:2] == ["python", "-c"]:
            continue
        if words[0] == "python" and words[1] == "train_low_mem.py":
            args = with_tiny_sizes(words[2:])
            code, out, err = run_in_process(args, "What is 1 + 2?\nclear\nexit\n", capsys)
        elif words[:2] == ["accelerate", "launch"]:
            args = words[:3] + with_tiny_sizes(words[3:])
            done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args[2:]], cwd=root,
                                  capture_output=True, text=True, timeout=1800)
            code, out, err = done.returncode, done.stdout, done.stderr
        else:
            pytest.fail(f"README command neither run nor listed in SKIPPED: {command}")
        assert code in (0, None), f"{command}\n{err[-3000:]}"
        ran.append(command)
    assert len(ran) >= 15, (ran, skipped)
    assert os.path.isfile(os.path.join(root, "model_save", "my_run", "final", "model.safetensors"))
    assert os.path.isfile(os.path.join(root, "data", "sft_cache.json"))
    assert os.path.isfile(os.path.join(root, "answers.jsonl"))


def test_readme_python_examples_run(tmp_path, monkeypatch, tokenizer_dir, qa_files):
    """The plain-transformers snippet of the README prints an answer from an exported model."""
    from conftest import run_in_process as train_here
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=3, validation_file="", run_name="demo",
                      output_dir=str(tmp_path / "model_save"))
    train_here(cfg)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    snippet = next(b for b in blocks if "apply_chat_template" in b and "PeftModel" not in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # the README's code, as a user would paste it
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
