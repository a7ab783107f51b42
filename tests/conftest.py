"""Shared fixtures: a locally trained tokenizer, generated parquet data, and ways to run the trainer."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# one torch thread per test process: the suite runs two workers (pytest -n 2) on a 2-core CI machine, and a
# trainer started by a test inherits this; torch's own default would oversubscribe the cores many times over
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: ten seconds of CPU or more (launches, kills, compiles, learning runs); "
                                       "-m 'not slow' leaves them out for a quick loop")


# Tests that compile with inductor in the test process run on one worker (pytest.ini: --dist loadgroup): the
# first compile of a process pays ~10 s of setup that the next ones share.
COMPILES = pytest.mark.xdist_group("inductor")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from lowmem.data.demo import generate_rows
    from lowmem.data.tokenizer import train_bpe_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    rows = generate_rows(n_train=3000, n_valid=10, n_test=10)["train"]
    train_bpe_tokenizer((f"{p}\n{r}" for p, r in rows), 600, path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 400-token BPE trained on a few words (English and Chinese)."""
    from lowmem.data.tokenizer import train_bpe_tokenizer

    words = ["cat", "dog", "sun", "moon", "tree", "猫", "狗", "山", "水", "花", "river", "stone"]
    path = str(tmp_path_factory.mktemp("words_tok") / "tokenizer")
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(600)]
    train_bpe_tokenizer(texts, 400, path)
    return path


def write_qa_parquet(path, n_rows: int, seed: int = 0, row_group_size: int = 50):
    """Prompt/response rows of varied length; every row is distinct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "moon", "tree", "猫", "狗", "山", "水", "花"]
    prompts, responses = [], []
    for i in range(n_rows):
        prompts.append(f"row {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
        responses.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
    pq.write_table(pa.table({"prompt": prompts, "response": responses}), str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def qa_files(tmp_path):
    return {"train_file": write_qa_parquet(tmp_path / "train.parquet", 240, seed=1),
            "validation_file": write_qa_parquet(tmp_path / "valid.parquet", 40, seed=2)}


def tiny_config(tmp_path, tokenizer_dir, files, **overrides):
    from config import TrainConfig

    values = dict(run_name="t", output_dir=str(tmp_path / "model_save"), log_dir=str(tmp_path / "logs"),
                  tokenizer_dir=tokenizer_dir, test_file="", model_preset="tiny", max_seq_len=64,
                  batch_size_per_gpu=8, epochs=1, learn_rate=1e-3, warmup_steps=2, logging_steps=1, eval_steps=1000,
                  save_steps=1000, report_to="none", prefetch_batches=2, **files)
    values.update(overrides)
    return TrainConfig(**values)


def run_in_process(cfg):
    """Run the real loop in this process, resetting Accelerate's process-wide state around it."""
    from accelerate.state import AcceleratorState, GradientState

    from lowmem.train.loop import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def cli(args, cwd=None, timeout=1800, env=None, launcher=None):
    """Run train_low_mem.py as a user would; returns the CompletedProcess (the timeout only stops a hang: CI may be slow)."""
    command = (launcher or [sys.executable]) + [os.path.join(REPO, "train_low_mem.py")] + list(args)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def cli_here(args, cwd=None):
    """`train_low_mem.py args` run in this process, as `cli` returns it (exit code, stdout, stderr): for what one
    process of the command line does and says, where a new interpreter would add only its start-up time. Checks of
    what a fresh interpreter prints (import notices), of the environment, or of launchers use `cli`."""
    import contextlib
    import io

    import train_low_mem
    from lowmem.run.errors import UserError

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    _reset_accelerate()
    try:
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = train_low_mem.run_command_line(list(args))
            except UserError as exc:  # what main() prints
                print(f"error: {exc}", file=sys.stderr)
                code = 2
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
        _reset_accelerate()
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def two_processes(config: str = "cpu.yaml") -> list[str]:
    """`accelerate launch` of 2 CPU processes on a free port (tests may run side by side)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(REPO, "accelerate_configs", config), "--main_process_port", str(port)]


def env_without(folder, *packages: str) -> dict:
    """Environment for a subprocess in which `packages` cannot be imported, installed or not."""
    hide = os.path.join(str(folder), "hide_" + "_".join(packages))
    os.makedirs(hide, exist_ok=True)
    with open(os.path.join(hide, "sitecustomize.py"), "w", encoding="utf-8") as f:
        f.write("import sys\n" + "".join(f"sys.modules[{p!r}] = None  # import fails, find_spec: None\n"
                                         for p in packages))
    return {"PYTHONPATH": os.pathsep.join(p for p in (hide, os.environ.get("PYTHONPATH", "")) if p)}


def flags(cfg, *overrides: str) -> list[str]:
    """The config as command-line flags; `overrides` ("--name=value") replace the config's own (a flag given
    twice is an error)."""
    import dataclasses

    values = {k: f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, list)}
    extra = []
    for flag in overrides:
        name = flag[2:].split("=", 1)[0]
        if name in values:
            values[name] = flag
        else:
            extra.append(flag)
    return list(values.values()) + extra


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- tokenizers shaped like real model families (test_encoding, test_architectures, test_generate) ----------

# Templates of the shapes of real model families, written for these tests.
QWEN25 = (  # ChatML with a default system prompt
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3 = (  # ChatML; reasoning kept only in answers after the last user turn
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set answer = message.content %}{%- set thought = '' %}"
    "{%- if '</think>' in answer %}"
    "{%- set thought = answer.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set answer = answer.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user and thought %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + answer + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA31 = (  # header blocks, trimmed contents, a date header in the system block
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in turns %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL = (  # [INST] blocks, the system text inside the first one, raises for roles out of order
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, assistant and a first system message are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
NO_SYSTEM = (  # a template that rejects system messages
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- raise_exception('no system role') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
)
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def family_tokenizer(path: str, template: str | None, specials=(), plain=(), **tokens):
    """The tokenizer at `path` with a family's special tokens (special) and plain added tokens, token roles
    (eos_token=..., bos_token=...) and chat template."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(s, special=False, normalized=False) for s in plain])
    for name, value in tokens.items():
        setattr(tokenizer, name, value)
    tokenizer.chat_template = template
    return tokenizer


# --- tiny mixture-of-experts models of real families, built from their configs (test_moe, test_distributed) -------

def write_moe_dir(path: str, family: str, tokenizer_dir: str, seed: int = 0) -> str:
    """A 2-layer, 8-expert, top-2 model of `family` (qwen3_moe or mixtral), saved with the tokenizer at `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, Qwen3MoeConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if family == "qwen3_moe":  # experts 48 wide, a dense MLP elsewhere would be 96: no square expert weight
        config = Qwen3MoeConfig(num_experts=8, moe_intermediate_size=48, intermediate_size=96, **common)
    else:
        config = MixtralConfig(num_local_experts=8, intermediate_size=48, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory, tokenizer_dir):
    return write_moe_dir(str(tmp_path_factory.mktemp("qwen3_moe") / "model"), "qwen3_moe", tokenizer_dir)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, tokenizer_dir):
    return write_moe_dir(str(tmp_path_factory.mktemp("mixtral") / "model"), "mixtral", tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir):
    """The tiny preset's Llama, built once under a fixed seed and saved with the tokenizer: a local base model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from config import TrainConfig
    from lowmem.model.build import _hf_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(TrainConfig(max_seq_len=64), len(tokenizer), special))
    path = str(tmp_path_factory.mktemp("llama") / "model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
