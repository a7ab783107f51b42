"""Inference on a trained model directory: load, generate (one, streamed, batched).

Every prompt is encoded by lowmem.data.template, the template SFT training used, so the model is asked in
the format it learnt (or, with raw=True, fed as plain text to continue, for pretrained-only models);
answers end at the template's stop tokens. Generation itself is Hugging Face `model.generate`. A LoRA
adapter directory loads on the base it names. Only safetensors weights are loaded unless the user
trusts a pickle file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import shlex
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..data.template import build_messages, encode_prompt, stop_token_ids
from ..data.tokenizer import load_tokenizer
from ..model import adapters
from ..run.errors import UserError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ---------------------------------------------------------------- loading

def _is_model_dir(path: str) -> bool:
    """A Hugging Face model directory, or a LoRA adapter directory (which names its base)."""
    return os.path.isfile(os.path.join(path, "config.json")) or adapters.is_adapter_dir(path)


def resolve_model_dir(path: str, use_ema: bool = False) -> str:
    """The Hugging Face (or adapter) directory inside a final export or a training checkpoint."""
    if not path or not os.path.isdir(str(path)):
        raise UserError(f"model_dir '{path}' does not exist; pass model_save/<run>/final or a checkpoint directory")
    path = str(path)
    if _is_model_dir(path):
        return path
    sub = os.path.join(path, "ema" if use_ema else "model")
    if _is_model_dir(sub):
        return sub
    if use_ema and _is_model_dir(os.path.join(path, "model")):
        raise UserError(f"checkpoint '{path}' has no ema/ (the run trained without EMA); drop --use_ema")
    raise UserError(f"'{path}' is not a model directory (no config.json, nor model/config.json inside); pass "
                    "model_save/<run>/final or model_save/<run>/checkpoints/step_XXXXXXXX")


def find_tokenizer_dir(path: str, model_dir: str) -> str:
    """The model dir's tokenizer, else the checkpoint's or its run directory's."""
    path = os.path.abspath(str(path))
    candidates = [model_dir, path, os.path.join(path, "model"), os.path.dirname(path),
                  os.path.dirname(os.path.dirname(path))]
    for directory in candidates:
        if any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
            return directory
    raise UserError(f"no tokenizer found for '{path}' (looked for tokenizer.json in the model dir, the checkpoint "
                    "and the run dir); copy the run's tokenizer files into the model directory")


def resolve_device(device=None) -> torch.device:
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(str(device))
    except RuntimeError:
        raise UserError(f"--device={device!r} is not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device} but no CUDA GPU is visible; use --device=cpu")
    return resolved


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype) in ("", "auto"):
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if str(dtype).lower() not in DTYPES:
        raise UserError(f"--dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype).lower()]


def load_for_inference(model_dir: str, device=None, dtype=None, use_ema: bool = False, trust_pickle: bool = False):
    """(model in eval mode on `device`, tokenizer) from a final export or a checkpoint directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model_dir(model_dir, use_ema)
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir, path))
    files = os.listdir(path)
    has_safe = any(name in files for name in SAFE_WEIGHTS) or any(name.endswith(".safetensors") for name in files)
    if not has_safe:
        if not any(name in files for name in PICKLE_WEIGHTS):
            raise UserError(f"'{path}' has no weights (model.safetensors); point --model_dir at a complete export")
        if not trust_pickle:
            raise UserError(f"'{path}' holds only pickle weights (pytorch_model.bin), which can run code when loaded; "
                            "convert them to safetensors, or pass --trust_pickle=True if you trust the file")
        print(f"warning: loading pickle weights from '{path}' because --trust_pickle=True; only do this for files "
              "you trust", file=sys.stderr)
    device = resolve_device(device)
    if adapters.is_adapter_dir(path):
        model = adapters.load_merged(path, resolve_dtype(dtype, device), len(tokenizer))
        return model.to(device).eval(), tokenizer
    try:
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, use_safetensors=has_safe, dtype=resolve_dtype(dtype, device))
    except Exception as exc:  # transformers reports a bad dir or weights file with many exception types
        if trust_pickle and "Weights only load failed" in str(exc):
            raise UserError(pickle_refused(path, str(exc))) from None
        raise UserError(f"could not load the model in '{path}': {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                        "it must be a directory written by save_pretrained") from None
    return model.to(device).eval(), tokenizer


def pickle_conversion(path: str) -> str:
    """A shell command that rewrites a trusted pickle checkpoint in `path` as model.safetensors, once."""
    code = ("import glob, torch, transformers as t; "
            f"d = {json.dumps(path)}; c = t.AutoConfig.from_pretrained(d); s = {{}}; "
            '[s.update(torch.load(f, weights_only=False)) for f in sorted(glob.glob(d + "/pytorch_model*.bin"))]; '
            "getattr(t, c.architectures[0]).from_pretrained(None, config=c, "
            "state_dict={k: v for k, v in s.items() if torch.is_tensor(v)}).save_pretrained(d)")
    return f"python -c {shlex.quote(code)}"


def pickle_refused(path: str, error: str) -> str:
    """Why a trusted pickle checkpoint did not load, and what works instead (torch's own advice names no flag here)."""
    found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global| \(|\.?\n|$)", error)
    what = found.group(1).strip() if found else "objects other than tensors"
    return (f"'{path}' holds pickle weights that transformers reads only through torch's safe loader, even with "
            f"--trust_pickle=True, and that loader refuses them ({what}); if you trust the file, convert it once to "
            f"model.safetensors with: {pickle_conversion(path)}")


# ---------------------------------------------------------------- options

@dataclass
class GenerationOptions:
    """Decoding settings; temperature 0 or greedy=True decode greedily."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self):
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"--{name}={value!r} must be an integer >= {low}")

        integer("max_new_tokens", 1)
        integer("top_k", 0)
        integer("no_repeat_ngram_size", 0)
        if self.seed is not None:
            integer("seed", 0)
        temperature = self.temperature
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise UserError(f"--temperature={self.temperature!r} must be >= 0 (0 decodes greedily); try 0.7")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UserError(f"--top_p={self.top_p!r} must be in (0, 1]; try 0.9, or 1.0 to turn nucleus sampling off")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise UserError(f"--repetition_penalty={self.repetition_penalty!r} must be > 0 (1.0 is no penalty)")

    @property
    def is_greedy(self) -> bool:
        return bool(self.greedy) or self.temperature == 0


def _generation_config(model, tokenizer, options: GenerationOptions, max_new_tokens: int):
    from transformers import GenerationConfig

    stops = list(stop_token_ids(tokenizer))
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for extra in model_eos if isinstance(model_eos, list) else [model_eos]:
        if isinstance(extra, int) and extra not in stops:
            stops.append(extra)
    values = dict(max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=_pad_id(tokenizer),
                  repetition_penalty=float(options.repetition_penalty), num_beams=1, use_cache=True,
                  no_repeat_ngram_size=options.no_repeat_ngram_size)
    if options.is_greedy:
        values.update(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)  # neutral values keep HF from warning
    else:
        values.update(do_sample=True, temperature=float(options.temperature), top_k=options.top_k,
                      top_p=float(options.top_p))
    return GenerationConfig(**values)


# ---------------------------------------------------------------- generation

def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def context_length(model) -> int | None:
    """Positions a decoder was built for; None for T5 (relative positions, no hard limit)."""
    if is_encoder_decoder(model):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def raw_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as plain text to continue, tokenized as `tokenizer(prompt)` does (with BOS where it adds one)."""
    return tokenizer(str(prompt), add_special_tokens=True)["input_ids"]


def prompt_ids(model, tokenizer, prompt: str, history=None, system: str | None = None,
               truncate_for: int = 0, raw: bool = False) -> list[int]:
    """Template-encoded prompt (raw: the text itself); one that fills the context is an error, or with
    truncate_for=N is cut from the left to leave room for N new tokens."""
    if raw and (history or system):
        raise UserError("a raw prompt is plain text to continue: it takes no history or system message")
    ids = raw_prompt_ids(tokenizer, prompt) if raw else encode_prompt(
        tokenizer, build_messages(str(prompt), history, system), is_encoder_decoder(model))
    limit = context_length(model)
    if limit is not None and truncate_for:
        return ids[-max(1, limit - truncate_for):]  # the newest tokens, which end where the answer starts
    if limit is not None and len(ids) >= limit:
        raise UserError(f"the prompt is {len(ids)} tokens but the model's context is {limit}; shorten the prompt "
                        "(or its history)")
    return ids


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) for the block, then the model's previous mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _generate(model, tokenizer, id_lists: list[list[int]], options: GenerationOptions,
              streamer=None, stop_event: threading.Event | None = None) -> list[str]:
    """One model.generate call over prompts already encoded; decoders are padded on the left."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    enc_dec = is_encoder_decoder(model)
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), _pad_id(tokenizer), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(id_lists):
        start = 0 if enc_dec else width - len(ids)  # left padding so every decoder row ends at the answer
        input_ids[row, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, start:start + len(ids)] = 1
    limit = context_length(model)
    max_new = options.max_new_tokens if limit is None else max(1, min(options.max_new_tokens, limit - width))
    criteria = None
    if stop_event is not None:
        class _Stop(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                return torch.full((ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=ids.device)

        criteria = StoppingCriteriaList([_Stop()])
    with eval_mode(model), torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=_generation_config(model, tokenizer, options, max_new),
                             streamer=streamer, stopping_criteria=criteria)
    new_tokens = out if enc_dec else out[:, width:]
    return [_decode(tokenizer, row) for row in new_tokens.tolist()]


def _seed(options: GenerationOptions) -> None:
    if options.seed is not None:
        torch.manual_seed(options.seed)  # seeds CPU and every CUDA device


def generate_text(model, tokenizer, prompt: str, options: GenerationOptions | None = None, history=None,
                  system: str | None = None, raw: bool = False) -> str:
    """The model's answer to `prompt` after earlier (user, assistant) turns; raw: its continuation of the text."""
    options = options or GenerationOptions()
    ids = prompt_ids(model, tokenizer, prompt, history, system, raw=raw)
    _seed(options)
    return _generate(model, tokenizer, [ids], options)[0]


class _PieceStreamer:
    """Receives token ids from model.generate (in its thread) and queues new text pieces."""

    END = object()

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""
        self.pieces: queue.Queue = queue.Queue()
        self.first = True
        self.error: BaseException | None = None

    def put(self, value):
        if self.first:  # the prompt (decoder) or the decoder start token (T5): not part of the answer
            self.first = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._emit(final=False)

    def _emit(self, final: bool):
        text = _decode(self.tokenizer, self.ids)
        if not final and text.endswith("\ufffd"):
            return  # a multi-byte character is half decoded; wait for the rest of its bytes
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.pieces.put(text[len(self.emitted):])
            self.emitted = text

    def end(self):
        self._emit(final=True)
        self.pieces.put(self.END)

    def fail(self, exc: BaseException):
        self.error = exc
        self.pieces.put(self.END)


def stream_text(model, tokenizer, prompt: str, options: GenerationOptions | None = None, history=None,
                system: str | None = None, raw: bool = False) -> Iterator[str]:
    """Yield the answer in pieces as they are generated; closing the iterator stops generation."""
    options = options or GenerationOptions()
    ids = prompt_ids(model, tokenizer, prompt, history, system, raw=raw)
    streamer, stop = _PieceStreamer(tokenizer), threading.Event()

    def work():
        try:
            _generate(model, tokenizer, [ids], options, streamer=streamer, stop_event=stop)
        except BaseException as exc:  # handed to the consuming thread, which re-raises it
            streamer.fail(exc)

    _seed(options)
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            piece = streamer.pieces.get()
            if piece is _PieceStreamer.END:
                break
            yield piece
    finally:
        stop.set()
        worker.join()
    if streamer.error is not None:
        raise streamer.error


def iter_generate(model, tokenizer, prompts: Iterable[str], options: GenerationOptions | None = None,
                  batch_size: int = 8, truncate: bool = False, window: int = 16,
                  on_batch: Callable[[int], object] | None = None, raw: bool = False) -> Iterator[str]:
    """Answers in input order; prompts are sorted by length within windows so batches pad little.

    A prompt too close to the context end for max_new_tokens is answered alone, so its shorter cap
    does not cut the answers of the others. truncate cuts over-long prompts instead of raising.
    `on_batch(n)` is called after each model.generate call with the n prompts it answered (progress bars).
    """
    options = options or GenerationOptions()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch_size={batch_size!r} must be an integer >= 1")
    _seed(options)
    limit = context_length(model)
    pending: list[list[int]] = []

    def flush() -> list[str]:
        order = sorted(range(len(pending)), key=lambda i: len(pending[i]))
        fits = [i for i in order if limit is None or len(pending[i]) + options.max_new_tokens <= limit]
        chunks = [fits[s:s + batch_size] for s in range(0, len(fits), batch_size)]
        chunks += [[i] for i in order[len(fits):]]  # sorted by length, so the ones that do not fit come last
        answers: list[str] = [""] * len(pending)
        for chunk in chunks:
            for i, text in zip(chunk, _generate(model, tokenizer, [pending[i] for i in chunk], options)):
                answers[i] = text
            if on_batch is not None:
                on_batch(len(chunk))
        return answers

    for number, prompt in enumerate(prompts):
        try:
            pending.append(prompt_ids(model, tokenizer, prompt, truncate_for=options.max_new_tokens if truncate else 0,
                                      raw=raw))
        except UserError as exc:
            raise UserError(f"prompt {number + 1}: {exc}") from None
        if len(pending) == batch_size * window:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


def generate_batch(model, tokenizer, prompts: list[str], options: GenerationOptions | None = None,
                   batch_size: int = 8, raw: bool = False) -> list[str]:
    """Answers to many independent prompts, batch_size at a time (left-padded for decoders)."""
    return list(iter_generate(model, tokenizer, prompts, options, batch_size, raw=raw))


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Cheap greedy answers for logging during training; the model's train/eval mode is kept."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, greedy=True)
    return list(iter_generate(model, tokenizer, prompts, options, batch_size=max(1, len(prompts)), truncate=True))

