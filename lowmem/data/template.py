"""The one prompt template: SFT data, the bundled demo, generation and chat all encode through here.

Decoder models use the tokenizer's own chat template when it has one, otherwise the project's
ChatML template (which tokenizers trained by this project carry, so plain `transformers` sees it too).
Encoder-decoder models (T5) take the rendered prompt as encoder input and the response as target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

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
    """Token ids that end an answer: the tokenizer's EOS, the token the chat template ends an assistant turn with
    (the one training labels: ChatML's <|im_end|>, Llama-3's <|eot_id|>, Mistral's </s>), and <|im_end|> when the
    vocabulary has it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in (turn_end_token(tokenizer), IM_END):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def turn_end_pattern(tokenizer) -> re.Pattern | None:
    """Matches a special token right after a content (optional whitespace first): the end of a turn.

    The encoder labels the end of an answer with the same rule (lowmem/data/encoding.py).
    """
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    specials |= {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
    specials = sorted((s for s in specials if s.strip()), key=len, reverse=True)
    return re.compile(r"\s*(?:" + "|".join(map(re.escape, specials)) + ")") if specials else None


def turn_end_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant's answer; None when it writes none.

    A tokenizer without a template gets the project's (ensure_chat_template), which ends turns with <|im_end|>.
    """
    if not getattr(tokenizer, "chat_template", None):
        return IM_END
    pattern = turn_end_pattern(tokenizer)
    after = _text_after_answer(tokenizer)
    found = pattern.match(after) if pattern is not None and after is not None else None
    return found.group(0).strip() if found else None


def _text_after_answer(tokenizer) -> str | None:
    """What the template renders after an assistant answer's content (None if the answer is not rendered)."""
    affixes = _answer_affixes(tokenizer)
    if affixes is not None:
        return affixes[1]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text.split(_SENTINEL, 1)[1] if _SENTINEL in text else None


# --- Whole conversations: the rendered text and where each message's content lies in it ---------------

def answer_text(tokenizer, messages: list[dict], response: str, prompt_text: str) -> str:
    """The text encode_example tokenizes as a decoder's answer (the same rule as _response_ids)."""
    affixes = _answer_affixes(tokenizer)
    if affixes is not None:
        return affixes[0] + response + affixes[1]
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False)
    return full_text[len(prompt_text):] if full_text.startswith(prompt_text) else response + (tokenizer.eos_token or "")


def answer_affixes(tokenizer) -> tuple[str, str] | None:
    """Text the template puts before and after an answer (('', '<|im_end|>\\n') for ChatML); None when it
    re-renders earlier turns. Found once per tokenizer."""
    return _answer_affixes(tokenizer)


Span = tuple[int, int]  # [start, end) of a message's content in the rendered text


@dataclass(frozen=True)
class ChatLayout:
    """The fixed text a compositional template puts around message contents, found by probing it once.

    A conversation renders as lead + c0 + gaps[(r0, r1)] + c1 + ... + c_last + end, or + prompt_end when it
    ends with a user turn and the generation prompt is asked for.
    """

    lead: str  # before the first content of a conversation without a system message
    system_lead: str | None  # before the system content; None when the template rejects system messages
    gaps: dict  # (role, next role) -> the text between their contents
    end: str  # after the last assistant content
    prompt_end: str  # after the last user content, generation prompt included
    edge_whitespace: str | None = "keep"  # "keep", "strip" (Jinja's trim), None: contents with it need Jinja
    think_verbatim: bool = True  # assistant contents with <think> tags render unchanged

    def handles(self, roles: list[str], contents: list[str]) -> bool:
        """Whether concatenation renders this conversation exactly as the template does."""
        if roles[0] == "system" and self.system_lead is None:
            return False
        if not all(contents):  # some templates skip empty messages
            return False
        if self.edge_whitespace is None and any(c[:1].isspace() or c[-1:].isspace() for c in contents):
            return False
        return self.think_verbatim or not any(
            r == "assistant" and ("<think>" in c or "</think>" in c) for r, c in zip(roles, contents))

    def text_before(self, roles: list[str], i: int) -> str | None:
        """The fixed text between message i-1's content and message i's (or before the first)."""
        if i == 0:
            return self.system_lead if roles[0] == "system" else self.lead
        return self.gaps.get((roles[i - 1], roles[i]))

    def render(self, roles: list[str], contents: list[str], generation_prompt: bool = False) -> tuple[str, list[Span]]:
        if self.edge_whitespace == "strip":
            contents = [c.strip() for c in contents]
        parts = [self.system_lead if roles[0] == "system" else self.lead]
        spans, at = [], len(parts[0])
        for i, content in enumerate(contents):
            if i:
                gap = self.gaps[(roles[i - 1], roles[i])]
                parts.append(gap)
                at += len(gap)
            parts.append(content)
            spans.append((at, at + len(content)))
            at += len(content)
        parts.append(self.prompt_end if generation_prompt and roles[-1] == "user" else self.end)
        return "".join(parts), spans


_LAYOUT_CACHE: dict[tuple[int, str, str], ChatLayout | None] = {}


def chat_layout(tokenizer) -> ChatLayout | None:
    """The tokenizer's template as a ChatLayout, or None when it is not compositional; probed once."""
    ensure_chat_template(tokenizer)
    # the special tokens too: templates write bos_token / eos_token into the text
    key = (id(tokenizer), str(tokenizer.chat_template), str(tokenizer.special_tokens_map))
    if key not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[key] = _probe_layout(tokenizer)
    return _LAYOUT_CACHE[key]


def render_chat(tokenizer, roles: list[str], contents: list[str], layout: ChatLayout | None = None,
                generation_prompt: bool = False, turn_end: re.Pattern | None = None,
                concatenate: bool = True) -> tuple[str, list[Span | None]]:
    """The conversation as the template renders it, and each content's span (None where it cannot be found).

    Concatenates when the layout handles the conversation, else runs the template once and finds the
    contents in its text: first right after the layout's text before them, else by search (turn_end: what
    follows a content, to tell it from the same letters elsewhere).
    """
    if concatenate and layout is not None and layout.handles(roles, contents):
        return layout.render(roles, contents, generation_prompt)
    text = _render(tokenizer, roles, contents, generation_prompt, quiet=False)
    return text, locate_contents(text, roles, contents, turn_end, layout)


def locate_contents(text: str, roles: list[str], contents: list[str], turn_end: re.Pattern | None = None,
                    layout: ChatLayout | None = None) -> list[Span | None]:
    """Find each message's content in the rendered text, in order, each after the one before it."""
    spans, cursor = [], 0
    for i, (role, content) in enumerate(zip(roles, contents)):
        before = layout.text_before(roles, i) if layout is not None else None
        span = _find_content(text, role, content, cursor, turn_end, before)
        spans.append(span)
        cursor = span[1] if span else cursor
    return spans


def _find_content(text: str, role: str, content: str, start: int, turn_end: re.Pattern | None,
                  before: str | None) -> Span | None:
    """Where the content (or a form templates often give it) is: right after `before` if that is at start,
    else its first occurrence after start that turn_end follows (an answer 'a' also occurs in 'assistant')."""
    if not content.strip():  # nothing to find, and a blank would match any space
        return None
    forms = [content, content.strip()]
    if role == "assistant" and "</think>" in content:  # reasoning templates render the answer after </think>
        forms.append(content.rsplit("</think>", 1)[1].strip())
    forms = list(dict.fromkeys(f for f in forms if f))
    if before is not None and text.startswith(before, start):
        at = start + len(before)
        for form in forms:
            if text.startswith(form, at):
                return at, at + len(form)
    for form in forms:
        first = at = text.find(form, start)
        while turn_end is not None and at >= 0 and not turn_end.match(text, at + len(form)):
            at = text.find(form, at + 1)
        at = first if at < 0 else at
        if at >= 0:
            return at, at + len(form)
    return None


def _render(tokenizer, roles, contents, generation_prompt: bool = False, quiet: bool = True) -> str | None:
    """The template's own rendering; with quiet, None when the template raises for this conversation."""
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:  # templates raise their own types (jinja2 TemplateError, ValueError, ...)
        if quiet:
            return None
        raise


def _pieces(text: str | None, marks: list[str]) -> list[str] | None:
    """The text before, between and after the marks, each present once and in order; None otherwise."""
    if text is None:
        return None
    pieces, at = [], 0
    for mark in marks:
        found = text.find(mark, at)
        if found < 0 or text.count(mark) != 1:
            return None
        pieces.append(text[at:found])
        at = found + len(mark)
    return pieces + [text[at:]]


def _marks(tag: str, n: int) -> list[str]:
    return [f"\u2063{tag}{i}\u2063" for i in range(n)]


_EXCHANGES = ["user", "assistant"] * 3


def _probe_layout(tokenizer) -> ChatLayout | None:
    closed = _pieces(_render(tokenizer, _EXCHANGES, _marks("m", 6)), _marks("m", 6))
    opened = _pieces(_render(tokenizer, _EXCHANGES[:3], _marks("m", 3), True), _marks("m", 3))
    if closed is None or opened is None or closed[3:6] != closed[1:4]:
        return None  # exchanges are not rendered alike
    gaps = {("user", "assistant"): closed[1], ("assistant", "user"): closed[2]}
    system = _pieces(_render(tokenizer, ["system"] + _EXCHANGES[:2], _marks("s", 3)), _marks("s", 3))
    if system is not None:
        gaps[("system", "user")] = system[1]
    layout = ChatLayout(closed[0], system[0] if system else None, gaps, closed[-1], opened[-1])
    if not _renders_alike(tokenizer, layout, lambda i, role: f"\u2063v{i}\u2063"):
        return None
    edged = lambda i, role: f" \n\u2063e{i}\u2063\t "  # noqa: E731
    edge = next((mode for mode in ("keep", "strip")
                 if _renders_alike(tokenizer, replace(layout, edge_whitespace=mode), edged)), None)
    layout = replace(layout, edge_whitespace=edge)
    thinking = lambda i, role: (f"<think>\n\u2063r{i}\u2063\n</think>\n\n\u2063t{i}\u2063"  # noqa: E731
                                if role == "assistant" else f"\u2063t{i}\u2063")
    return replace(layout, think_verbatim=_renders_alike(tokenizer, layout, thinking))


def _renders_alike(tokenizer, layout: ChatLayout, content_for) -> bool:
    """Concatenation equals the template on conversations of 0-3 exchanges, with and without system/prompt."""
    for system in ([False, True] if layout.system_lead is not None else [False]):
        for exchanges in range(4):
            for opened in (False, True):
                roles = (["system"] if system else []) + _EXCHANGES[:2 * exchanges] + (["user"] if opened else [])
                if not roles or roles[-1] == "system":
                    continue
                contents = [content_for(i, role) for i, role in enumerate(roles)]
                if layout.render(roles, contents, opened)[0] != _render(tokenizer, roles, contents, opened):
                    return False
    return True
