"""Terminal commands for a trained model: `generate`, `chat` and `evaluate`, plus the chat REPL.

Each command names its flags explicitly and collects the rest in `**unknown` only to reject them
first: Fire reports an unknown flag only after the command returned, so a typo would cost a whole
generation run. Every value is converted through its type here, because Fire turns numeric-looking
text into numbers and does not coerce. Bad values are UserErrors, raised before the model is loaded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

from ..data.sources import PRETRAIN_KINDS  # data kinds that never went through the chat template
from ..data.template import build_messages, encode_prompt, render_prompt, render_seq2seq_prompt
from ..infer.generate import (
    GenerationOptions,
    context_length,
    generate_text,
    is_encoder_decoder,
    iter_generate,
    load_for_inference,
    resolve_model_dir,
    stream_text,
)
from ..run.errors import UserError
from .flags import command_help, convert, explicit_flags, import_models_quietly, reject_unknown_flags

D = GenerationOptions()  # the defaults every command shows
EXIT_COMMANDS = {"exit", "quit", "q", "/exit", "/quit"}
TEMPLATES = ("auto", "chat", "none")
CLEAR_COMMANDS = {"clear", "/clear"}


# one line per flag for `generate|chat|evaluate --help`
MEANINGS = {
    "model_dir": "model_save/<run>/final, a checkpoint directory (step_XXXXXXXX), any Hugging Face model dir, or a "
                 "LoRA adapter dir (its base is loaded from adapter_config.json's base_model_name_or_path)",
    "prompt": "the one prompt to answer (printed; with --output also written as JSONL)",
    "batch_file": "answer every prompt of prompts.txt (one a line) or a parquet/jsonl with a prompt column",
    "output": "where the answers go as JSONL; default: <batch_file>.generated.jsonl",
    "stream": "print the answer token by token as it is generated",
    "template": "auto: the chat template if the model was trained on prompts/conversations, plain continuation if "
                "only on text (train_config.json's data_kinds) | chat | none",
    "raw": "feed the prompt as plain text to continue, no chat template (same as --template=none)",
    "max_new_tokens": "tokens generated at most per answer",
    "temperature": "sampling temperature; 0 decodes greedily",
    "top_k": "sample among the k most likely tokens; 0: no limit",
    "top_p": "nucleus sampling: the smallest set of tokens with this much probability; 1.0: off",
    "repetition_penalty": "above 1.0 makes repeated tokens less likely; 1.0: none",
    "no_repeat_ngram_size": "never repeat an n-gram of this size; 0: off",
    "greedy": "always take the most likely token (no sampling)",
    "seed": "seed of the sampling, for answers that repeat; None: a fresh draw",
    "system": "a system message put before the conversation",
    "batch_size": "prompts (or rows) processed together",
    "use_ema": "use the EMA weights of a checkpoint (its ema/ directory)",
    "trust_pickle": "allow loading pytorch_model.bin (pickle can run code); only for files you wrote",
    "device": "cpu, cuda or cuda:N; default: cuda when visible, else cpu",
    "dtype": "float32, bfloat16 or float16; default: bfloat16 on a GPU that has it, else float32",
    "max_seq_len": "tokens the model reads at most; default: the run's max_seq_len, else the model's context",
    "show_prompt": "write each full prompt (history and template included) to stderr",
    "file": "the parquet/jsonl file (prompt/response or text) or token file (.bin) to score",
    "generation_metrics": "also answer every prompt greedily and score exact match and BLEU-4",
    "max_examples": "score at most this many rows; None: all",
}
EVALUATE_OUTPUT = "where the JSON result goes; default: <file>.eval.json"


def help_text(command: str) -> str:
    """`--help` of generate, chat or evaluate: every flag with its default and meaning."""
    function = {"generate": generate, "chat": chat, "evaluate": evaluate}[command]
    meanings = {**MEANINGS, "output": EVALUATE_OUTPUT} if command == "evaluate" else MEANINGS
    return command_help(command, function, meanings)


def _check_flags(command: str, function, unknown: dict) -> bool:
    """True after printing help for --help; a UserError for an unknown flag, before any work."""
    if "help" in unknown or "h" in unknown:
        print(help_text(command))
        return True
    reject_unknown_flags(command, explicit_flags(function), unknown)
    return False


# ---------------------------------------------------------------- shared flag handling

def build_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, greedy,
                  seed) -> GenerationOptions:
    return GenerationOptions(
        max_new_tokens=convert("max_new_tokens", max_new_tokens, int),
        temperature=convert("temperature", temperature, float), top_k=convert("top_k", top_k, int),
        top_p=convert("top_p", top_p, float),
        repetition_penalty=convert("repetition_penalty", repetition_penalty, float),
        no_repeat_ngram_size=convert("no_repeat_ngram_size", no_repeat_ngram_size, int),
        greedy=convert("greedy", greedy, bool), seed=convert("seed", seed, int | None))


def _load(model_dir, use_ema, trust_pickle, device, dtype):
    import_models_quietly()  # torchao is not used to answer prompts
    return load_for_inference(str(model_dir), device=device, dtype=dtype, use_ema=convert("use_ema", use_ema, bool),
                              trust_pickle=convert("trust_pickle", trust_pickle, bool))


def read_train_config(model_dir: str, use_ema: bool = False) -> dict:
    """The run's train_config.json (in the export, or beside a checkpoint); {} for models from elsewhere."""
    path = resolve_model_dir(str(model_dir), use_ema)
    for directory in (path, str(model_dir), os.path.dirname(os.path.dirname(os.path.abspath(str(model_dir))))):
        config_file = os.path.join(directory, "train_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                return json.load(f)
    return {}


def default_max_seq_len(model_dir: str, model, use_ema: bool = False) -> int:
    """max_seq_len of the run's train_config.json, else the model's context, else 512."""
    value = read_train_config(model_dir, use_ema).get("max_seq_len")
    if isinstance(value, int) and value > 1:
        return value
    return context_length(model) or 512


def check_prompt_format(template: str, raw: bool) -> None:
    if template not in TEMPLATES:
        raise UserError(f"--template={template!r} is not one of {', '.join(TEMPLATES)}")
    if raw and template == "chat":
        raise UserError("--raw=True contradicts --template=chat; pass one of them")


def use_raw_prompts(template: str, raw: bool, train_config: dict, tokenizer) -> tuple[bool, str]:
    """(continue the prompt as plain text?, why): as asked, else as the model's training data was."""
    check_prompt_format(template, raw)
    if raw or template != "auto":
        return raw or template == "none", "as asked"
    kinds = train_config.get("data_kinds")
    if kinds:
        only_text = all(kind in PRETRAIN_KINDS for kind in kinds)
        return only_text, f"the model was trained on {', '.join(kinds)} data"
    if getattr(tokenizer, "chat_template", None):
        return False, "the tokenizer has a chat template"
    return True, "no train_config.json says how it was trained and the tokenizer has no chat template"


def _announce_template(raw: bool, why: str) -> None:
    other = "--template=chat" if raw else "--raw=True"
    print(f"prompt format: {'plain text continued (no chat template)' if raw else 'chat template'} ({why}; "
          f"{other} for the other)", file=sys.stderr)


def _max_seq_len(value, model_dir, model, use_ema) -> int:
    if value is None:
        return default_max_seq_len(model_dir, model, convert("use_ema", use_ema, bool))
    value = convert("max_seq_len", value, int)
    if value < 2:
        raise UserError(f"--max_seq_len={value} must be at least 2")
    return value


def prompt_text(prompt) -> str:
    """The text of --prompt; an empty one is refused, as blank lines of a batch file are."""
    if isinstance(prompt, bool):  # Fire gives True for a bare `--prompt`
        raise UserError("--prompt needs the text to answer, e.g. --prompt='What is 1 + 2?'")
    text = convert("prompt", prompt, str)
    if not text.strip():
        raise UserError("--prompt is empty; pass the text to answer, e.g. --prompt='What is 1 + 2?'")
    return text


def read_prompts(path: str) -> list[str]:
    """Prompts of a batch file: prompts.txt (one a line, blank lines skipped) or parquet/jsonl with `prompt`."""
    from ..infer.evaluate import iter_rows

    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"batch file '{path}' does not exist; pass a prompts.txt (one prompt a line) or a "
                        "parquet/jsonl file with a prompt column")
    if path.endswith((".parquet", ".jsonl")):
        prompts = []
        for number, row in enumerate(iter_rows(path, ("prompt",)), start=1):
            if not isinstance(row.get("prompt"), str):
                raise UserError(f"batch file '{path}' row {number} has no text prompt field; every row needs one")
            prompts.append(row["prompt"])
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    if not prompts:
        raise UserError(f"batch file '{path}' has no prompts; write one prompt a line (or rows with a prompt column)")
    return prompts


# ---------------------------------------------------------------- commands

def generate(model_dir, prompt=None, batch_file=None, output=None, stream=False, template="auto", raw=False,
             max_new_tokens=D.max_new_tokens, temperature=D.temperature, top_k=D.top_k, top_p=D.top_p,
             repetition_penalty=D.repetition_penalty, no_repeat_ngram_size=D.no_repeat_ngram_size, greedy=False,
             seed=None, system=None, batch_size=8, use_ema=False, trust_pickle=False, device=None, dtype=None,
             **unknown):
    """Answer one --prompt (printed, or streamed with --stream) or every prompt of --batch_file (to JSONL)."""
    if _check_flags("generate", generate, unknown):
        return None
    options = build_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size,
                            greedy, seed)
    batch_size = convert("batch_size", batch_size, int)
    template, raw = str(template), convert("raw", raw, bool)
    check_prompt_format(template, raw)  # before the model is loaded
    if (prompt is None) == (batch_file is None):
        raise UserError("pass exactly one of --prompt='...' and --batch_file=prompts.txt")
    prompt = None if prompt is None else prompt_text(prompt)
    prompts = read_prompts(batch_file) if batch_file is not None else None
    model, tokenizer = _load(model_dir, use_ema, trust_pickle, device, dtype)
    raw, why = use_raw_prompts(template, raw, read_train_config(model_dir, convert("use_ema", use_ema, bool)),
                               tokenizer)
    _announce_template(raw, why)
    if prompts is not None:
        output = str(output) if output else os.path.splitext(str(batch_file))[0] + ".generated.jsonl"
        _generate_file(model, tokenizer, prompts, options, batch_size, output, raw)
        return None
    system = None if system is None else convert("system", system, str)
    if convert("stream", stream, bool):
        pieces = []
        for piece in stream_text(model, tokenizer, prompt, options, system=system, raw=raw):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        response = "".join(pieces)
    else:
        response = generate_text(model, tokenizer, prompt, options, system=system, raw=raw)
        print(response)
    if output:
        with open(str(output), "w", encoding="utf-8") as f:
            f.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")
    return None


def _generate_file(model, tokenizer, prompts, options, batch_size, output, raw: bool = False) -> None:
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f, tqdm(total=len(prompts), unit="prompt", file=sys.stderr) as bar:
        answers = iter_generate(model, tokenizer, prompts, options, batch_size, on_batch=bar.update, raw=raw)
        for prompt, response in zip(prompts, answers):
            f.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")
            f.flush()  # lines written so far survive an interrupted run
    print(f"wrote {len(prompts)} answers to {output}", file=sys.stderr)


def chat(model_dir, max_new_tokens=None, temperature=D.temperature, top_k=D.top_k, top_p=D.top_p,
         repetition_penalty=D.repetition_penalty, no_repeat_ngram_size=D.no_repeat_ngram_size, greedy=False,
         seed=None, system=None, max_seq_len=None, show_prompt=False, use_ema=False, trust_pickle=False, device=None,
         dtype=None, **unknown):
    """Multi-turn chat on the terminal or over a pipe; `clear` forgets, `exit`/`quit`/`q`/Ctrl-D leave."""
    if _check_flags("chat", chat, unknown):
        return None
    options = build_options(D.max_new_tokens if max_new_tokens is None else max_new_tokens, temperature, top_k,
                            top_p, repetition_penalty, no_repeat_ngram_size, greedy, seed)
    model, tokenizer = _load(model_dir, use_ema, trust_pickle, device, dtype)
    seq_len = _max_seq_len(max_seq_len, model_dir, model, use_ema)
    if max_new_tokens is None:  # half the context for the answer, the rest for the conversation so far
        options = dataclasses.replace(options, max_new_tokens=max(1, min(D.max_new_tokens, seq_len // 2)))
    chat_loop(model, tokenizer, options, max_seq_len=seq_len,
              system=None if system is None else str(system), show_prompt=convert("show_prompt", show_prompt, bool))
    return None


def evaluate(model_dir, file, output=None, max_seq_len=None, batch_size=8, generation_metrics=False,
             max_examples=None, max_new_tokens=D.max_new_tokens, use_ema=False, trust_pickle=False, device=None,
             dtype=None, **unknown):
    """Loss and perplexity on --file (plus exact match and BLEU-4 with --generation_metrics); writes JSON."""
    if _check_flags("evaluate", evaluate, unknown):
        return None
    from ..infer import evaluate as evaluation

    batch_size = convert("batch_size", batch_size, int)
    max_examples = convert("max_examples", max_examples, int | None)
    with_generation = convert("generation_metrics", generation_metrics, bool)
    options = GenerationOptions(max_new_tokens=convert("max_new_tokens", max_new_tokens, int), greedy=True)
    file = str(file)
    if not os.path.isfile(file) and evaluation.token_file_path(file) is None:
        raise UserError(f"--file '{file}' does not exist; pass a parquet/jsonl file or a token file (.bin)")
    output = str(output) if output else os.path.splitext(file)[0] + ".eval.json"
    model, tokenizer = _load(model_dir, use_ema, trust_pickle, device, dtype)
    seq_len = _max_seq_len(max_seq_len, model_dir, model, use_ema)
    result = {"model_dir": str(model_dir),
              **evaluation.evaluate_loss(model, tokenizer, file, seq_len, batch_size, max_examples)}
    if with_generation:
        result["generation"] = evaluation.generation_metrics(model, tokenizer, file, options, batch_size, max_examples)
    evaluation.write_json(result, output)
    print(json.dumps({k: v for k, v in result.items() if k != "generation"}, ensure_ascii=False))
    if with_generation:
        generated = result["generation"]
        print(json.dumps({"exact_match": generated["exact_match"], "bleu4": generated["bleu4"]}))
    print(f"wrote {output}", file=sys.stderr)
    return None


# ---------------------------------------------------------------- chat REPL

def fit_history(model, tokenizer, prompt: str, history: list, budget: int, system: str | None = None):
    """The newest turns of history that fit with the prompt in `budget` tokens; None if the prompt alone does not."""
    history = list(history)
    while True:
        ids = encode_prompt(tokenizer, build_messages(prompt, history, system), is_encoder_decoder(model))
        if len(ids) <= budget:
            return history
        if not history:
            return None
        history.pop(0)


def _read_line(input_stream, output, interactive: bool) -> str | None:
    """One line of user input; None at end of input."""
    if interactive and input_stream is sys.stdin and output is sys.stdout:
        with contextlib.suppress(ImportError):  # readline is missing on some platforms; input() works without it
            import readline  # noqa: F401  gives input() line editing and history
        try:
            return input("You: ")
        except EOFError:
            return None
    if interactive:
        output.write("You: ")
        output.flush()
    line = input_stream.readline()
    return None if line == "" else line.rstrip("\r\n")


def chat_loop(model, tokenizer, options: GenerationOptions | None = None, input_stream=None, output=None,
              max_seq_len: int | None = None, system: str | None = None, show_prompt: bool = False,
              notices=None) -> list:
    """Multi-turn chat in the training template; returns the final history of (user, assistant) turns.

    On a terminal it prompts "You: " and prefixes answers with "Assistant: "; with piped input stdout
    gets only the answers, one per turn, and notices go to stderr. The oldest turns are dropped so the
    prompt fits max_seq_len - max_new_tokens. `show_prompt` writes each full prompt to stderr.
    """
    options = options or GenerationOptions()
    input_stream = input_stream or sys.stdin
    output = output or sys.stdout
    interactive = bool(getattr(input_stream, "isatty", lambda: False)())
    notices = notices or (output if interactive else sys.stderr)
    context = context_length(model)
    max_seq_len = min(max_seq_len or context or 512, context or 1 << 30)  # never past what the model can read
    budget = max_seq_len - options.max_new_tokens
    if budget < 1:
        raise UserError(f"--max_new_tokens={options.max_new_tokens} leaves no room for a prompt in "
                        f"max_seq_len={max_seq_len}; lower --max_new_tokens")
    if interactive:
        notices.write("Chat: type 'clear' to forget the conversation, 'exit' or Ctrl-D to leave.\n")
    history: list[tuple[str, str]] = []
    while True:
        try:
            line = _read_line(input_stream, output, interactive)
        except KeyboardInterrupt:
            line = None
        if line is None:
            if interactive:
                output.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_COMMANDS:
            break
        if text.lower() in CLEAR_COMMANDS:
            history = []
            notices.write("(history cleared)\n")
            notices.flush()
            continue
        kept = fit_history(model, tokenizer, text, history, budget, system)
        if kept is None:
            notices.write(f"(that message is longer than {budget} tokens; send a shorter one)\n")
            notices.flush()
            continue
        if len(kept) < len(history):
            notices.write(f"(dropped {len(history) - len(kept)} oldest turn(s) to fit max_seq_len={max_seq_len})\n")
        history = kept
        if show_prompt:
            shown = build_messages(text, history, system)
            rendered = render_seq2seq_prompt(shown) if is_encoder_decoder(model) else render_prompt(tokenizer, shown)
            sys.stderr.write(f"[prompt]\n{rendered}\n[/prompt]\n")
            sys.stderr.flush()
        if interactive:
            output.write("Assistant: ")
        pieces: list[str] = []
        stream = stream_text(model, tokenizer, text, options, history, system)
        try:
            for piece in stream:
                pieces.append(piece)
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            stream.close()  # stops the generating thread
            output.write("\n(interrupted; this turn is not kept)\n")
            continue
        output.write("\n")
        output.flush()
        history.append((text, "".join(pieces)))
    output.flush()
    return history

