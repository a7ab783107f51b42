"""Generation, streaming, batching, chat and safe loading on tiny random models built here."""
from __future__ import annotations

import io
import json
import os
import pickle
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

from lowmem.cli import infer as cli_generate
from lowmem.data.template import build_messages, encode_prompt, stop_token_ids
from lowmem.infer.generate import (
    GenerationOptions,
    generate_batch,
    generate_samples,
    generate_text,
    load_for_inference,
    prompt_ids,
    resolve_model_dir,
    stream_text,
)
from lowmem.run.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["the cat sat on the mat", "a dog ran in the park", "猫在山上", "狗在水里", "What is 1 + 2? 3",
          "hello world, how are you", "Repeat: sun moon star", "倒序：书 雨 花"]
GREEDY = GenerationOptions(max_new_tokens=8, greedy=True)
PROMPTS = ["the cat", "a dog ran in the park and the cat sat on the mat", "猫在山上", "hello", "What is 1 + 2?"]


def _save_tokenizer(root):
    from lowmem.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 20, 400, str(root / "tokenizer"))


def build_tiny_dirs(root) -> dict:
    """A tokenizer and tiny Llama / T5 export directories (random init, fixed seeds) under root."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tok = _save_tokenizer(root)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                         max_position_embeddings=256, initializer_range=0.2, **ids))
    torch.manual_seed(2)  # a seed whose random T5 answers with varied tokens, not only padding
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, initializer_factor=5.0,
                                             decoder_start_token_id=tok.pad_token_id, **ids))
    dirs = {"tokenizer": str(root / "tokenizer")}
    for name, model in (("llama", llama), ("t5", t5)):
        path = str(root / name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_tiny_dirs(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def llama(dirs):
    return load_for_inference(dirs["llama"])


@pytest.fixture(scope="module")
def t5(dirs):
    return load_for_inference(dirs["t5"])


def hf_greedy(model, tokenizer, prompt, max_new_tokens):
    """Plain transformers generate on the template-encoded prompt."""
    enc_dec = model.config.is_encoder_decoder
    ids = encode_prompt(tokenizer, build_messages(prompt), enc_dec)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    new = out[0] if enc_dec else out[0, len(ids):]
    return new.tolist(), tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_greedy_equals_transformers_generate(kind, dirs, request):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model, tokenizer = request.getfixturevalue(kind)
    plain = (AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM).from_pretrained(dirs[kind]).eval()
    for prompt in PROMPTS[:3]:
        ids, expected = hf_greedy(plain, tokenizer, prompt, GREEDY.max_new_tokens)
        assert len([i for i in ids if i not in tokenizer.all_special_ids]) >= 2  # a real answer, not only specials
        assert generate_text(model, tokenizer, prompt, GREEDY) == expected
    # temperature 0 is greedy too
    assert generate_text(model, tokenizer, PROMPTS[0], GenerationOptions(max_new_tokens=8, temperature=0)) == \
        generate_text(model, tokenizer, PROMPTS[0], GREEDY)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_stream_yields_the_same_text(kind, request):
    model, tokenizer = request.getfixturevalue(kind)
    options = GenerationOptions(max_new_tokens=12, greedy=True)
    for prompt in PROMPTS[:3]:
        pieces = list(stream_text(model, tokenizer, prompt, options))
        assert len(pieces) > 1
        assert "".join(pieces) == generate_text(model, tokenizer, prompt, options)
    history = [("the cat", "sat")]
    assert "".join(stream_text(model, tokenizer, "hello", options, history)) == \
        generate_text(model, tokenizer, "hello", options, history)


def test_stream_closed_early_stops_generation(llama):
    model, tokenizer = llama
    stream = stream_text(model, tokenizer, "the cat", GenerationOptions(max_new_tokens=200, greedy=True))
    next(stream)
    stream.close()  # joins the generating thread; it stops at its next token instead of running 200 steps


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_batch_with_left_padding_equals_one_by_one(kind, request):
    model, tokenizer = request.getfixturevalue(kind)
    prompts = list(PROMPTS)
    if kind == "llama":  # one prompt 4 tokens short of the context: capped alone, not the whole batch with it
        near_end = "cat " * 200
        while len(prompt_ids(model, tokenizer, near_end)) < 252:
            near_end += "cat "
        prompts.insert(2, near_end)
    one_by_one = [generate_text(model, tokenizer, p, GREEDY) for p in prompts]
    assert generate_batch(model, tokenizer, prompts, GREEDY, batch_size=3) == one_by_one
    assert generate_batch(model, tokenizer, prompts, GREEDY, batch_size=8) == one_by_one


def test_generate_samples_keeps_train_mode(llama):
    model, tokenizer = llama
    model.train()
    try:
        samples = generate_samples(model, tokenizer, PROMPTS[:2] + ["cat " * 400], max_new_tokens=8)
        assert model.training
    finally:
        model.eval()
    # the over-long prompt is cut to fit instead of failing a training run, and does not shorten the others
    assert samples[:2] == [generate_text(model, tokenizer, p, GREEDY) for p in PROMPTS[:2]]
    assert len(samples) == 3


def test_seeded_sampling_repeats(llama):
    model, tokenizer = llama
    options = GenerationOptions(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    assert generate_text(model, tokenizer, "the cat", options) == generate_text(model, tokenizer, "the cat", options)


def test_checkpoint_layout_and_tokenizer_lookup(dirs, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_00000100"
    shutil.copytree(dirs["llama"], step / "model")
    assert resolve_model_dir(str(step)) == str(step / "model")
    with pytest.raises(UserError, match="no ema"):
        resolve_model_dir(str(step), use_ema=True)
    shutil.copytree(dirs["llama"], step / "ema", ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    model, tokenizer = load_for_inference(str(step), use_ema=True)  # ema/ has no tokenizer: model/'s is used
    assert generate_text(model, tokenizer, "the cat", GREEDY) == generate_text(*load_for_inference(dirs["llama"]),
                                                                               "the cat", GREEDY)
    bare = tmp_path / "bare"
    shutil.copytree(dirs["llama"], bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    with pytest.raises(UserError, match="no tokenizer"):
        load_for_inference(str(bare))


def test_bad_inputs_are_user_errors(dirs, llama, tmp_path):
    model, tokenizer = llama
    with pytest.raises(UserError, match="does not exist"):
        load_for_inference(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not a model directory"):
        load_for_inference(str(tmp_path))
    with pytest.raises(UserError, match="context is 256"):
        generate_text(model, tokenizer, "cat " * 300, GREEDY)
    with pytest.raises(UserError, match="prompt 2: .*context"):
        generate_batch(model, tokenizer, ["hi", "cat " * 300], GREEDY)
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -0.1}, {"max_new_tokens": 0}, {"top_k": -1}):
        with pytest.raises(UserError, match=f"--{next(iter(bad))}"):
            GenerationOptions(**bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        cli_generate.generate(dirs["llama"], batch_file=str(empty))
    with pytest.raises(UserError, match="--top_p"):
        cli_generate.generate(dirs["llama"], prompt="hi", top_p=2)
    with pytest.raises(UserError, match="exactly one"):
        cli_generate.generate(dirs["llama"])


class _Planted:
    """Pickles to a call that writes a marker file: what a malicious pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickle_weights_are_not_loaded_without_trust(dirs, llama, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil"
    shutil.copytree(dirs["llama"], evil, ignore=shutil.ignore_patterns("*.safetensors"))
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Planted(str(marker))}, f)
    with pytest.raises(UserError, match="trust_pickle"):
        load_for_inference(str(evil))
    assert not marker.exists()
    # a genuine pickle checkpoint loads when trusted, with a warning
    legit = tmp_path / "legit"
    shutil.copytree(dirs["llama"], legit, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(llama[0].state_dict(), legit / "pytorch_model.bin")
    model, tokenizer = load_for_inference(str(legit), trust_pickle=True)
    assert "trust_pickle" in capsys.readouterr().err
    assert generate_text(model, tokenizer, "the cat", GREEDY) == generate_text(*llama, "the cat", GREEDY)


def test_cli_batch_file_writes_jsonl(dirs, llama, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = generate_batch(*llama, PROMPTS, GREEDY)
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n", encoding="utf-8")
    cli_generate.generate(dirs["llama"], batch_file=str(txt), greedy=True, max_new_tokens=8, batch_size=2)
    rows = [json.loads(line) for line in open(tmp_path / "prompts.generated.jsonl", encoding="utf-8")]
    assert rows == [{"prompt": p, "response": r} for p, r in zip(PROMPTS, expected)]
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "other": list(range(len(PROMPTS)))}), str(table))
    out = tmp_path / "out" / "answers.jsonl"
    cli_generate.generate(dirs["llama"], batch_file=str(table), output=str(out), greedy=True, max_new_tokens=8)
    assert [json.loads(line)["response"] for line in open(out, encoding="utf-8")] == expected


def test_chat_loop_drops_oldest_turns_to_fit(llama, capsys):
    model, tokenizer = llama
    options = GenerationOptions(max_new_tokens=4, greedy=True)
    turns = ["the cat sat on the mat"] * 8 + ["clear", "hello", "quit", "never read"]
    out = io.StringIO()
    history = cli_generate.chat_loop(model, tokenizer, options, io.StringIO("\n".join(turns) + "\n"), out,
                                     max_seq_len=64)
    assert "dropped" in capsys.readouterr().err
    assert history == [("hello", generate_text(model, tokenizer, "hello", options))]
    assert len(out.getvalue().splitlines()) >= 9  # one answer per turn, no prompts on a pipe


def _expected_chat(model, tokenizer, options):
    a1 = generate_text(model, tokenizer, "the cat", options)
    a2 = generate_text(model, tokenizer, "hello", options, [("the cat", a1)])
    a3 = generate_text(model, tokenizer, "hi there", options)
    return a1, a2, a3


def _cli(*args):
    return [sys.executable, os.path.join(REPO, "train_low_mem.py"), *args]


# one thread: a tiny model gains nothing from more, and tests may run beside other processes
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}


def test_chat_over_a_pipe(dirs, llama):
    a1, a2, a3 = _expected_chat(*llama, GenerationOptions(max_new_tokens=6, greedy=True))
    stdin = "the cat\nhello\nclear\nhi there\nexit\nnot reached\n".encode()
    done = subprocess.run(_cli("chat", dirs["llama"], "--greedy", "--max_new_tokens=6", "--show_prompt"),
                          input=stdin, capture_output=True, timeout=1800, env=ENV, cwd=REPO)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, err
    assert done.stdout.decode("utf-8") == f"{a1}\n{a2}\n{a3}\n"  # answers only: no prompt echo on a pipe
    prompts = [block.split("[/prompt]")[0] for block in err.split("[prompt]\n")[1:]]
    assert len(prompts) == 3  # 'not reached' after exit is never answered
    assert "the cat" in prompts[0] and "hello" not in prompts[0]
    assert "the cat" in prompts[1] and a1 in prompts[1] and "hello" in prompts[1]  # history kept
    assert "the cat" not in prompts[2] and "hello" not in prompts[2]  # cleared
    assert "(history cleared)" in err


def test_chat_on_a_terminal(dirs, llama):
    a1 = generate_text(*llama, "the cat", GenerationOptions(max_new_tokens=6, greedy=True))
    master, slave = os.openpty()
    proc = subprocess.Popen(_cli("chat", dirs["llama"], "--greedy", "--max_new_tokens=6"), stdin=slave,
                            stdout=slave, stderr=slave, env=ENV, cwd=REPO, close_fds=True)
    os.close(slave)
    seen = bytearray()

    def read_until(marker: bytes, count: int, timeout: float = 90):
        deadline = time.time() + timeout
        while seen.count(marker) < count and time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen.extend(os.read(master, 4096))
                except OSError:  # EIO once the child has closed the terminal
                    break
        return seen.count(marker) >= count

    try:
        assert read_until(b"You: ", 1), seen.decode("utf-8", "replace")
        os.write(master, "the cat\n".encode())
        assert read_until(b"You: ", 2), seen.decode("utf-8", "replace")
        text = seen.decode("utf-8", "replace").replace("\r\n", "\n")
        assert f"Assistant: {a1}\n" in text
        os.write(master, b"exit\n")
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.parametrize("command, args, needle", [
    (cli_generate.generate, {"prompt": "hi", "tempreature": 0.5},
     "unknown flag --tempreature for `generate`; did you mean: --temperature"),
    (cli_generate.chat, {"max_new_token": 4},
     "unknown flag --max_new_token for `chat`; did you mean: --max_new_tokens"),
    (cli_generate.evaluate, {"file": "x.parquet", "generation_metric": True},
     "unknown flag --generation_metric for `evaluate`; did you mean: --generation_metrics"),
    (cli_generate.generate, {"prompt": "hi", "zzz": 1}, "unknown flag --zzz for `generate`; valid flags: --model_dir"),
])
def test_unknown_flags_are_refused_before_the_model_is_loaded(tmp_path, command, args, needle):
    with pytest.raises(UserError) as err:
        command(str(tmp_path / "no_such_model"), **args)  # loading it would say 'does not exist'
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["generate", "chat", "evaluate"])
def test_help_lists_every_flag_with_a_meaning(name, capsys):
    import inspect

    from lowmem.cli.flags import explicit_flags

    command = getattr(cli_generate, name)
    required = {flag: "unused" for flag, p in inspect.signature(command).parameters.items()
                if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    assert command(**required, help=True) is None  # Fire passes --help into **unknown
    lines = capsys.readouterr().out.splitlines()
    for flag in explicit_flags(command):
        row = next(i for i, line in enumerate(lines) if line.startswith(f"  --{flag} "))
        assert "default:" in lines[row] or "required" in lines[row]
        assert lines[row + 1].startswith("      ") and len(lines[row + 1].strip()) > 10, (flag, lines[row + 1])


# --- a model trained on the demo data: exports that stop like we do, and raw continuation ----------------------

@pytest.fixture(scope="module")
def demo_model(tmp_path_factory, tokenizer_dir):
    """The tiny preset after 40 steps on the bundled demo Q&A: enough to end its answers with <|im_end|>."""
    from conftest import run_in_process, tiny_config

    from lowmem.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo_model")
    write_demo_data(str(root / "data"))
    cfg = tiny_config(root, tokenizer_dir, {"train_file": str(root / "data" / "train.parquet"), "validation_file": ""},
                      max_steps=40, batch_size_per_gpu=32, learn_rate=3e-3, warmup_steps=5, logging_steps=10)
    run_in_process(cfg)
    return cfg.final_dir(), str(root / "data" / "test.parquet")


def _printed(capsys, **flags) -> tuple[str, str]:
    """What `generate` prints (stdout without its newline, stderr)."""
    capsys.readouterr()
    cli_generate.generate(**flags)
    out, err = capsys.readouterr()
    return out.removesuffix("\n"), err


def test_plain_transformers_stops_at_the_end_of_turn_and_prints_what_generate_prints(demo_model, capsys):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, test_file = demo_model
    tokenizer, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == stop_token_ids(tokenizer) == [tokenizer.eos_token_id, end_of_turn]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    for row in pq.read_table(test_file).to_pylist()[:3]:
        messages = [{"role": "user", "content": row["prompt"]}]
        # transformers 5: a dict of input_ids and attention_mask when tensors are asked for
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():  # plain generate: only what the export's generation_config says
            new = model.generate(**inputs, do_sample=False, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:]
        assert new[-1] == end_of_turn and len(new) < 32  # it stopped at the end of the turn
        printed, notice = _printed(capsys, model_dir=final, prompt=row["prompt"], greedy=True, max_new_tokens=32)
        assert printed == tokenizer.decode(new, skip_special_tokens=True)
        assert notice.count("prompt format: chat template (the model was trained on prompt_response data") == 1


def test_raw_continuation_equals_plain_transformers_on_the_raw_prompt(demo_model, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, _ = demo_model
    tokenizer, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final).eval()
    prompt = "What number comes after"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:]
    expected = tokenizer.decode(new, skip_special_tokens=True)
    raw, notice = _printed(capsys, model_dir=final, prompt=prompt, raw=True, greedy=True, max_new_tokens=12)
    assert raw == expected and "plain text continued" in notice
    assert _printed(capsys, model_dir=final, prompt=prompt, template="none", greedy=True, max_new_tokens=12)[0] == raw
    chat = _printed(capsys, model_dir=final, prompt=prompt, greedy=True, max_new_tokens=12)[0]
    assert chat != raw  # trained on prompt/response: templated unless asked otherwise
    pretrained = tmp_path / "pretrained"  # the same weights, as if the run had trained on text only
    shutil.copytree(final, pretrained)
    with open(pretrained / "train_config.json", encoding="utf-8") as f:
        config = json.load(f)
    with open(pretrained / "train_config.json", "w", encoding="utf-8") as f:
        json.dump({**config, "data_kinds": ["text"]}, f)
    auto, notice = _printed(capsys, model_dir=str(pretrained), prompt=prompt, greedy=True, max_new_tokens=12)
    assert auto == raw and "(the model was trained on text data" in notice
    assert _printed(capsys, model_dir=str(pretrained), prompt=prompt, template="chat", greedy=True,
                    max_new_tokens=12)[0] == chat


@pytest.mark.parametrize("flags, needle", [({"raw": True, "template": "chat"}, "contradicts"),
                                           ({"template": "jinja"}, "is not one of auto, chat, none")])
def test_contradicting_prompt_formats_are_refused_before_loading(tmp_path, flags, needle):
    with pytest.raises(UserError, match=needle):
        cli_generate.generate(str(tmp_path / "no_such_model"), prompt="hi", **flags)


def test_raw_prompts_take_no_history(llama):
    with pytest.raises(UserError, match="takes no history"):
        generate_text(*llama, "the cat", GREEDY, history=[("a", "b")], raw=True)


def test_trusted_pickle_the_safe_loader_refuses_is_one_line_with_a_command_that_converts_it(dirs, llama, tmp_path):
    import shlex

    import numpy as np

    old = tmp_path / "old"
    shutil.copytree(dirs["llama"], old, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = dict(llama[0].state_dict())
    weights["training_step"] = np.int64(5)  # a numpy scalar beside the tensors: torch's safe loader refuses it
    torch.save(weights, old / "pytorch_model.bin")
    with pytest.raises(UserError) as err:
        load_for_inference(str(old), trust_pickle=True)
    message = str(err.value)
    assert "\n" not in message and "even with --trust_pickle=True" in message and "numpy" in message
    program, flag, code = shlex.split(message.split("convert it once to model.safetensors with: ", 1)[1])
    assert (program, flag) == ("python", "-c")
    exec(code, {})  # what the user runs once, here in this process
    model, tokenizer = load_for_inference(str(old))  # safetensors now: no --trust_pickle needed
    assert generate_text(model, tokenizer, "the cat", GREEDY) == generate_text(*llama, "the cat", GREEDY)


@pytest.mark.parametrize("flag", ["--prompt=", "--prompt=   ", "--prompt"])
def test_an_empty_prompt_is_refused_before_the_model_loads(flag, tmp_path):
    import fire

    with pytest.raises(UserError, match="^--prompt (is empty|needs the text)"):
        fire.Fire(cli_generate.generate, command=[f"--model_dir={tmp_path}/no_model", flag])
