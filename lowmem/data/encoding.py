"""One sample encoder for every SFT format: token windows, text, prompt/response pairs and conversations.

Samples arrive with canonical keys (the data sources map columns). A group of samples is encoded with one
batched call of the fast tokenizer: each sample becomes a few text segments, labelled or not, all segments
of the group are tokenized together, and each sample is put together from its segments' ids.

Conversations are rendered once each (by concatenation when the template is compositional, else by the
template), and cut into unlabelled text up to where generation would start and labelled answers that end
with the template's end-of-turn token, so the prompt part tokenizes as it does at inference.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from typing import Callable

import numpy as np
import torch
from jinja2 import TemplateError

from ..run.errors import UserError
from .template import (
    IGNORE_INDEX,
    answer_affixes,
    answer_text,
    build_messages,
    chat_layout,
    ensure_chat_template,
    render_chat,
    render_prompt,
    render_seq2seq_prompt,
    turn_end_pattern,
)

TRAIN_ON = ("all_assistant", "last_assistant", "all")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant", "chatgpt": "assistant"}
_USER = ["user"]  # the roles of a lone prompt


@dataclass
class Encoded:
    input_ids: torch.Tensor  # 1-d long
    labels: torch.Tensor  # 1-d long; decoders: same length, the model shifts; IGNORE_INDEX where no loss
    notes: tuple[str, ...] = ()  # counters to add when this sample is used


@dataclass
class Skipped:
    reason: str


def where(source: str, position, noun: str = "sample") -> str:
    """How a strict error names a row: a location the reader gave ("'a.parquet' row 40"), else the stream position."""
    return position if isinstance(position, str) else f"'{source}' {noun} {position}"


@dataclass
class Conversation:
    """A checked conversation: an optional system message, then user/assistant turns ending with an answer."""

    roles: list[str]
    contents: list[str]

    def without_oldest(self, exchanges: int) -> Conversation:
        """The conversation less its oldest exchanges (a user turn and the answer after it); the system stays."""
        if exchanges == 0:
            return self
        system = 1 if self.roles[0] == "system" else 0
        cut = [i for i, role in enumerate(self.roles) if role == "user"][exchanges]
        return Conversation(self.roles[:system] + self.roles[cut:], self.contents[:system] + self.contents[cut:])


def parse_conversation(sample: dict) -> Conversation | Skipped:
    """OpenAI `messages` or ShareGPT `conversations` (a list or its JSON text) as a checked Conversation."""
    value = sample["messages"] if "messages" in sample else sample["conversations"]
    if isinstance(value, str):
        if not value.strip():
            return Skipped("empty_or_null")
        try:
            value = json.loads(value)
        except ValueError:
            return Skipped("bad_messages")
    if value is None:
        return Skipped("empty_or_null")
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy arrays (pandas cells)
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return Skipped("bad_messages")
    if not value:
        return Skipped("empty_or_null")
    roles, contents = [], []
    for entry in value:
        if not isinstance(entry, (dict, Mapping)):  # dict first: the ABC check is slow
            return Skipped("bad_messages")
        role = entry.get("role")
        role = entry.get("from") if role is None else role
        content = entry.get("content")
        content = entry.get("value") if content is None else content
        if not isinstance(role, str) or not isinstance(content, str):
            return Skipped("bad_messages")
        canonical = ROLE_ALIASES.get(role) or ROLE_ALIASES.get(role.strip().lower())
        if canonical is None:
            return Skipped("unknown_role")
        roles.append(canonical)
        contents.append(content)
    system = sample.get("system")
    if system is not None and not isinstance(system, str):
        return Skipped("bad_messages")
    if system and system.strip() and "system" not in roles:
        roles, contents = ["system"] + roles, [system] + contents
    return _in_order(roles, contents)


def _in_order(roles: list[str], contents: list[str]) -> Conversation | Skipped:
    turns = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns)):
        return Skipped("roles_out_of_order")
    answers = [i for i, role in enumerate(roles) if role == "assistant" and contents[i].strip()]
    if not answers:
        return Skipped("no_assistant_turn")
    last = answers[-1] + 1  # turns after the last answer carry no loss
    return Conversation(roles[:last], contents[:last])


@dataclass
class _Draft:
    """An encoding still as Python lists: a group's drafts become tensors together, in one numpy conversion."""

    input_ids: list[int]
    learned: list[tuple[int, int]] | None = None  # [start, end) positions that carry labels; None: all of them
    targets: list[int] | None = None  # encoder-decoder: the labels, a sequence of their own
    notes: tuple[str, ...] = ()


@dataclass
class _Job:
    """One sample waiting for the ids of its texts; finish turns them into a result or a next job."""

    texts: list[str]
    add_special_tokens: bool
    finish: Callable[[list[list[int]]], "_Draft | Skipped | _Job"]
    ids: list[list[int]] | None = None


@dataclass
class _Trim:
    """Search for the fewest oldest exchanges whose removal makes a conversation fit."""

    exchanges: int  # user turns in the whole conversation
    misses: int = 0  # the most exchanges dropped that is known not to fit
    fits: int | None = None  # the fewest exchanges dropped known to fit...
    best: _Draft | None = None  # ...and its encoding

    def next_drop(self, guess: int) -> int | None:
        if self.fits is not None:  # estimates overshoot a little at most: step down until it no longer fits
            return self.fits - 1 if self.fits - 1 > self.misses else None
        if self.misses >= self.exchanges - 1:
            return None
        return min(self.exchanges - 1, max(self.misses + 1, guess))


class SampleEncoder:
    """Turns samples into input_ids/labels; unusable rows become Skipped, or raise when strict."""

    def __init__(self, tokenizer, max_seq_len: int, is_encoder_decoder: bool = False, train_on: str = "all_assistant",
                 train_on_prompt: bool = False, strict: bool = False, source: str = "", *,
                 render_with_jinja: bool = False):
        if train_on not in TRAIN_ON:
            raise UserError(f"train_on={train_on!r} is not one of {', '.join(TRAIN_ON)}")
        self.tokenizer, self.max_seq_len, self.is_encoder_decoder = tokenizer, max_seq_len, is_encoder_decoder
        self.train_on, self.train_on_prompt, self.strict, self.source = train_on, train_on_prompt, strict, source
        self.label_everything = train_on_prompt or train_on == "all"
        self.render_with_jinja = render_with_jinja  # never concatenate (tests; a template the probe misjudges)

    def __call__(self, sample: dict, position: int = -1) -> Encoded | Skipped:
        return self.encode_many([sample], [position])[0]

    def encode_many(self, samples: list[dict], positions: list[int]) -> list[Encoded | Skipped]:
        """Encode a group of samples with one batched tokenizer call (more only for conversations cut to fit)."""
        results: list = [self._plan(sample) for sample in samples]
        pending = [i for i, result in enumerate(results) if isinstance(result, _Job)]
        while pending:
            self._tokenize([results[i] for i in pending])
            for i in pending:
                results[i] = results[i].finish(results[i].ids)
            pending = [i for i in pending if isinstance(results[i], _Job)]
        for result, position in zip(results, positions):
            if self.strict and isinstance(result, Skipped):
                raise UserError(f"{where(self.source, position)}: {result.reason} "
                                "(run without --strict to skip such rows)")
        drafts = [i for i, result in enumerate(results) if isinstance(result, _Draft)]
        for i, encoded in zip(drafts, _tensors([results[i] for i in drafts])):
            results[i] = encoded
        return results

    # --- what the template and tokenizer give, worked out once per encoder ---------------------------------
    @cached_property
    def _encode_texts(self) -> Callable[[list[str], bool], list[list[int]]]:
        return batch_encoder(self.tokenizer)

    @cached_property
    def _layout(self):
        return chat_layout(self.tokenizer)

    @cached_property
    def _answer_affixes(self) -> tuple[str, str] | None:
        ensure_chat_template(self.tokenizer)
        return answer_affixes(self.tokenizer)

    @cached_property
    def _turn_end(self) -> re.Pattern | None:
        return turn_end_pattern(self.tokenizer)

    def _tokenize(self, jobs: list[_Job]) -> None:
        for special in (False, True):
            group = [job for job in jobs if job.add_special_tokens == special]
            ids = self._encode_texts([text for job in group for text in job.texts], special) if group else []
            at = 0
            for job in group:
                job.ids, at = ids[at:at + len(job.texts)], at + len(job.texts)

    # --- one sample: its texts to tokenize, or its result straight away -------------------------------------
    def _plan(self, sample: dict) -> Encoded | Skipped | _Job:
        if "input_ids" in sample:  # token windows, or a pre-tokenized cache with its labels
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)  # no copy when already int64
            return Encoded(ids, torch.as_tensor(sample["labels"], dtype=torch.long) if "labels" in sample else ids)
        if "text" in sample:
            return self._plan_text(sample["text"])
        if "messages" in sample or "conversations" in sample:
            conversation = parse_conversation(sample)
            if isinstance(conversation, Skipped):
                return conversation
            return self._plan_seq2seq_chat(conversation) if self.is_encoder_decoder else self._plan_chat(conversation)
        prompt, response = sample.get("prompt"), sample.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            return Skipped("empty_or_null")
        if self.is_encoder_decoder:
            return _Job([render_seq2seq_prompt(build_messages(prompt)), response], True, self._finish_seq2seq)
        return self._plan_pair(prompt, response)

    def _plan_text(self, text) -> Skipped | _Job:
        if not isinstance(text, str) or not text.strip():
            return Skipped("empty_or_null")
        if self.is_encoder_decoder:
            raise UserError(f"'{self.source}': T5 needs prompt/response columns, not text")
        return _Job([text], False, self._finish_text)

    def _finish_text(self, ids: list[list[int]]) -> _Draft:
        tokens = ids[0] + [self.tokenizer.eos_token_id]
        notes = ("truncated_text",) if len(tokens) > self.max_seq_len else ()
        return _Draft(tokens[:self.max_seq_len], notes=notes)

    def _plan_pair(self, prompt: str, response: str) -> _Job:
        """The texts encode_example tokenizes: the rendered prompt, and the answer with the template's affixes."""
        messages, layout, affixes = build_messages(prompt), self._layout, self._answer_affixes
        if layout is not None and not self.render_with_jinja and layout.handles(_USER, [prompt]):
            content = prompt.strip() if layout.edge_whitespace == "strip" else prompt
            prompt_text = layout.lead + content + layout.prompt_end  # what render_prompt gives, without Jinja
        else:
            prompt_text = render_prompt(self.tokenizer, messages)
        if affixes is not None:
            answer = affixes[0] + response + affixes[1]
        else:
            answer = answer_text(self.tokenizer, messages, response, prompt_text)
        return _Job([prompt_text, answer], False, self._finish_pair)

    def _finish_pair(self, ids: list[list[int]]) -> _Draft | Skipped:
        prompt_ids, response_ids = ids
        room = self.max_seq_len - len(response_ids)
        if room < 1:
            return Skipped("response_too_long")
        notes = ("truncated_prompt",) if len(prompt_ids) > room else ()
        prompt_ids = prompt_ids[-room:]  # the prompt loses its oldest tokens
        total = len(prompt_ids) + len(response_ids)
        learned = None if self.label_everything else [(len(prompt_ids), total)]
        return _Draft(prompt_ids + response_ids, learned, notes=notes)

    def _finish_seq2seq(self, ids: list[list[int]]) -> _Draft | Skipped:
        prompt_ids, target_ids = ids
        if len(target_ids) > self.max_seq_len:
            return Skipped("response_too_long")
        notes = ("truncated_prompt",) if len(prompt_ids) > self.max_seq_len else ()
        return _Draft(prompt_ids[-self.max_seq_len:], targets=target_ids, notes=notes)

    def _plan_seq2seq_chat(self, conversation: Conversation) -> _Job:
        """T5: every turn before the last answer is the encoder input, the last answer the target."""
        earlier = [{"content": content} for content in conversation.contents[:-1]]
        return _Job([render_seq2seq_prompt(earlier), conversation.contents[-1]], True, self._finish_seq2seq)

    # --- conversations for decoders -------------------------------------------------------------------------
    def _plan_chat(self, whole: Conversation, dropped: int = 0, trim: _Trim | None = None) -> Skipped | _Job:
        conversation = whole.without_oldest(dropped)
        try:
            text, spans = render_chat(self.tokenizer, conversation.roles, conversation.contents, self._layout,
                                      turn_end=self._turn_end, concatenate=not self.render_with_jinja)
        except (TemplateError, ValueError):  # the template rejects a conversation we accept
            return Skipped("template_error")
        answers = self._answer_spans(text, conversation, spans)
        if answers is None:
            return Skipped("assistant_not_rendered")
        pieces = _pieces(text, answers, "last" if self.train_on == "last_assistant" else "every")
        user_starts = [span[0] for role, span in zip(conversation.roles, spans) if role == "user" and span]

        def finish(ids: list[list[int]]) -> _Draft | Skipped | _Job:
            draft = self._assemble(ids, [labelled for _, labelled in pieces])
            length = len(draft.input_ids)
            if length <= self.max_seq_len and trim is None:
                return draft
            state = trim or _Trim(exchanges=sum(role == "user" for role in whole.roles))
            if length <= self.max_seq_len:
                state.fits, state.best = dropped, draft
            else:
                state.misses = max(state.misses, dropped)
            guess = dropped + _exchanges_to_drop(length - self.max_seq_len, length, len(text), user_starts)
            drop = state.next_drop(guess)
            if drop is not None:
                return self._plan_chat(whole, drop, state)
            if state.best is None:
                return Skipped("conversation_too_long")
            state.best.notes += ("dropped_turns",) + ("dropped_exchanges",) * state.fits  # conversations, exchanges
            return state.best

        return _Job([piece for piece, _ in pieces], False, finish)

    def _answer_spans(self, text: str, conversation: Conversation, spans) -> list[tuple[int, int]] | None:
        """[start, end) of each answer found: from where generation starts to its end-of-turn token.

        None when the last answer is not in the text; an earlier one the template leaves out (reasoning
        only, say) has nothing to learn and no span.
        """
        answers, previous_end, last = [], 0, len(conversation.roles) - 1
        for i, (role, content, span) in enumerate(zip(conversation.roles, conversation.contents, spans)):
            if span is None and i == last:
                return None
            if role != "assistant" or not content.strip() or span is None:
                previous_end = span[1] if span else previous_end
                continue
            answers.append((self._answer_start(text, content, span[0], previous_end), self._answer_end(text, span[1])))
            previous_end = answers[-1][1]
        return answers

    def _answer_start(self, text: str, content: str, start: int, previous_end: int) -> int:
        if "</think>" in content:  # the reasoning the template renders before the answer is learned too
            think = text.rfind("<think>", previous_end, start)
            if think >= 0:
                return think
        prefix = self._answer_affixes[0] if self._answer_affixes else ""  # Mistral's space: generation writes it
        if prefix and start - len(prefix) >= previous_end and text.startswith(prefix, start - len(prefix)):
            return start - len(prefix)
        return start

    def _answer_end(self, text: str, end: int) -> int:
        found = self._turn_end.match(text, end) if self._turn_end is not None else None
        return found.end() if found else end  # the end-of-turn token is learned, so the model stops

    def _assemble(self, ids: list[list[int]], labelled: list[bool]) -> _Draft:
        learned, at = [], 0
        for piece, learn in zip(ids, labelled):
            if learn:
                learned.append((at, at + len(piece)))
            at += len(piece)
        return _Draft(list(chain.from_iterable(ids)), None if self.label_everything else learned)


def _tensors(drafts: list[_Draft]) -> list[Encoded]:
    """Encoded samples, each with tensors of its own, cut from one numpy array of the whole group's ids."""
    sequences = []
    for draft in drafts:
        sequences += [draft.input_ids] if draft.targets is None else [draft.input_ids, draft.targets]
    flat = np.array(list(chain.from_iterable(sequences)), dtype=np.int64)  # one conversion, not one per sample
    encoded, at = [], 0
    for draft in drafts:
        input_ids, at = flat[at:at + len(draft.input_ids)].copy(), at + len(draft.input_ids)
        if draft.targets is not None:
            labels, at = flat[at:at + len(draft.targets)].copy(), at + len(draft.targets)
        elif draft.learned is None:
            labels = input_ids
        else:
            labels = np.full_like(input_ids, IGNORE_INDEX)
            for start, end in draft.learned:
                labels[start:end] = input_ids[start:end]
        tokens = torch.from_numpy(input_ids)
        encoded.append(Encoded(tokens, tokens if labels is input_ids else torch.from_numpy(labels), draft.notes))
    return encoded


def _pieces(text: str, answers: list[tuple[int, int]], which: str) -> list[tuple[str, bool]]:
    """The text as alternating unlabelled / labelled pieces (empty pieces left out)."""
    pieces, at = [], 0
    for i, (start, end) in enumerate(answers):
        pieces += [(text[at:start], False), (text[start:end], which == "every" or i == len(answers) - 1)]
        at = end
    pieces.append((text[at:], False))
    return [piece for piece in pieces if piece[0]]


def _exchanges_to_drop(excess_tokens: int, tokens: int, chars: int, user_starts: list[int]) -> int:
    """A guess from character counts: how many more of the oldest exchanges hold the excess tokens."""
    if excess_tokens <= 0 or len(user_starts) < 2:
        return 1
    excess_chars = excess_tokens * chars / max(1, tokens)
    return next((k for k in range(1, len(user_starts)) if user_starts[k] - user_starts[0] >= excess_chars),
                len(user_starts) - 1)


def batch_encoder(tokenizer) -> Callable[[list[str], bool], list[list[int]]]:
    """A function that tokenizes many texts in one call: the Rust tokenizer's batch encode when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer: one batched call through transformers
        return lambda texts, special: tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []
    from tokenizers import Tokenizer

    # a private copy: truncation or padding another caller sets on the shared one cannot leak in
    private = Tokenizer.from_str(backend.to_str())
    private.no_truncation()
    private.no_padding()
    private.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    encode = getattr(private, "encode_batch_fast", private.encode_batch)  # fast: no offsets
    return lambda texts, special: [e.ids for e in encode(texts, add_special_tokens=special)] if texts else []
