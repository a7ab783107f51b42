"""The one prompt template: SFT data, the bundled demo, generation and chat all encode through here.

Decoder models use the tokenizer's own chat template when it has one, otherwise the project's
ChatML template (which tokenizers trained by this project carry, so plain `transformers` sees it too).
Encoder-decoder models (T5) take the rendered prompt as encoder input and the response as target.
"""
from __future__ import annotations

from dataclasses import dataclass

IM_START, IM_END, END_OF_TEXT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, END_OF_TEXT, IM_START, IM_END]

PROJECT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

IGNORE_INDEX = -100


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the project's one (in place)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PROJECT_CHAT_TEMPLATE


def build_messages(prompt: str, history: list[tuple[str, str]] | None = None, system: str | None = None) -> list[dict]:
    """Chat messages for a new user turn after earlier (user, assistant) turns."""
    messages = [{"role": "system", "content": system}] if system else []
    for user_text, assistant_text in history or []:
        messages.append({"role": "user", "content": user_text})
        messages.append({"role": "assistant", "content": assistant_text})
    messages.append({"role": "user", "content": prompt})
    return messages


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Text of the conversation so far, ending where the assistant's answer begins."""
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_seq2seq_prompt(messages: list[dict]) -> str:
    """Encoder input for T5: turns as plain lines, the newest last."""
    return "\n".join(m["content"] for m in messages)


def encode_prompt(tokenizer, messages: list[dict], is_encoder_decoder: bool = False) -> list[int]:
    """Token ids the model is given to continue (decoder) or to encode (T5)."""
    if is_encoder_decoder:
        return tokenizer(render_seq2seq_prompt(messages), add_special_tokens=True)["input_ids"]
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


_AFFIX_CACHE: dict[tuple[int, str], tuple[str, str] | None] = {}
_SENTINEL = "\u2063RESPONSE\u2063"


def _answer_affixes(tokenizer) -> tuple[str, str] | None:
    """Text the template puts before and after an assistant answer, found once per tokenizer.

    None when the template re-renders earlier turns (the conversation is not prompt + answer).
    """
    key = (id(tokenizer), tokenizer.chat_template)
    if key not in _AFFIX_CACHE:
        probe = [{"role": "user", "content": "hi"}]
        prompt = render_prompt(tokenizer, probe)
        full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
        tail = full[len(prompt):] if full.startswith(prompt) else ""
        _AFFIX_CACHE[key] = tuple(tail.split(_SENTINEL, 1)) if _SENTINEL in tail else None
    return _AFFIX_CACHE[key]


def _response_ids(tokenizer, messages: list[dict], response: str, is_encoder_decoder: bool) -> list[int]:
    if is_encoder_decoder:
        return tokenizer(response, add_special_tokens=True)["input_ids"]  # T5 appends </s>
    affixes = _answer_affixes(tokenizer)
    if affixes is not None:
        tail = affixes[0] + response + affixes[1]
    else:
        prompt_text = render_prompt(tokenizer, messages)
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False)
        tail = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else response + (tokenizer.eos_token or "")
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


@dataclass
class EncodedExample:
    """One training example: the model input and, per position, the label or IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the prompt was cut to fit max_len


def encode_example(
    tokenizer,
    prompt: str,
    response: str,
    max_len: int,
    history: list[tuple[str, str]] | None = None,
    is_encoder_decoder: bool = False,
    train_on_prompt: bool = False,
) -> EncodedExample | None:
    """Encode a prompt/response pair; the loss sees only the response unless train_on_prompt.

    A too-long prompt loses its oldest tokens (the start); the response is never cut. Returns None
    when the response alone does not fit, so the caller can count the skip.
    """
    messages = build_messages(prompt, history)
    prompt_ids = encode_prompt(tokenizer, messages, is_encoder_decoder)
    response_ids = _response_ids(tokenizer, messages, response, is_encoder_decoder)
    if is_encoder_decoder:
        if len(response_ids) > max_len:
            return None
        truncated = len(prompt_ids) > max_len
        return EncodedExample(prompt_ids[-max_len:], response_ids, truncated)
    room = max_len - len(response_ids)
    if room < 1:
        return None
    truncated = len(prompt_ids) > room
    prompt_ids = prompt_ids[-room:]
    labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return EncodedExample(prompt_ids + response_ids, labels + response_ids, truncated)


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and the chat end marker when it has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids
