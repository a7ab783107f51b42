"""Preference pairs: a prompt with a chosen and a rejected answer, encoded as two documents and batched together.

A row holds `prompt` (a string, or a list of messages ending with the user's turn) and `chosen` / `rejected`
(a string, or a one-message list with the assistant's answer, as the common DPO datasets store them). The
prompt is rendered with the chat template (the tokenizer's own, else ChatML) up to where the answer starts;
each answer is what the template writes for it, its end-of-turn token included. A pair becomes two
documents, prompt + chosen and prompt + rejected, whose answer tokens carry the labels.

Truncation keeps the end of the prompt (the same cut for both answers) and never shortens an answer. A pair
whose longer answer leaves no room for a prompt token, a pair with an empty answer, and a pair whose answers
are the same are skipped and counted (errors with --strict).

Batches: padded, a micro-batch of n pairs is 2n rows (every chosen document, then every rejected one);
packed, the documents of whole pairs fill rows of `max_seq_len` tokens, both documents of a pair in the same
micro-batch. `extra["sequence"]` numbers each token's document (pair i's chosen is i, its rejected n + i;
-1 elsewhere) and `extra["reference"]` holds the reference model's summed log-probabilities of each pair
(chosen, rejected) when the data carries them (NaN otherwise). A batch's loss units are its pairs.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import torch

from ..run.errors import UserError
from .batches import Batch
from .encoding import ROLE_ALIASES, Skipped, batch_encoder, where
from .template import IGNORE_INDEX, answer_text, build_messages, render_prompt

TRUNCATION = "keep the prompt's end, never cut an answer (v1)"  # what reference caches record of the cut


@dataclass(eq=False)  # pairs are told apart by identity (a batch maps its documents back to their pair)
class EncodedPair:
    prompt: list[int]  # after truncation
    chosen: list[int]
    rejected: list[int]
    notes: tuple[str, ...] = ()
    reference: tuple[float, float] | None = None  # the reference model's summed log-probabilities, when known

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    def documents(self) -> list[list[int]]:
        return [self.prompt + self.chosen, self.prompt + self.rejected]


def _loaded(value):
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                return json.loads(stripped)
            except ValueError:
                return value
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, str)):  # numpy arrays of pandas cells
        return value.tolist()
    return value


def prompt_messages(value, system) -> list[dict] | Skipped:
    """The prompt as chat messages: a string is one user turn; a list must alternate and end with the user."""
    value = _loaded(value)
    if isinstance(value, str):
        return build_messages(value, system=system if isinstance(system, str) and system.strip() else None) \
            if value.strip() else Skipped("empty_or_null")
    if not isinstance(value, (list, tuple)) or not value:
        return Skipped("empty_or_null")
    messages = []
    for entry in value:
        if not isinstance(entry, dict):
            return Skipped("bad_messages")
        role, content = entry.get("role", entry.get("from")), entry.get("content", entry.get("value"))
        role = ROLE_ALIASES.get(str(role).strip().lower()) if isinstance(role, str) else None
        if role is None or not isinstance(content, str):
            return Skipped("bad_messages")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        return Skipped("prompt_not_ending_with_user")
    return messages


def answer_of(value) -> str | None:
    """An answer given as a string or as a one-message list; None when it is neither."""
    value = _loaded(value)
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content", value[0].get("value"))
    return value if isinstance(value, str) else None


class PairEncoder:
    """Encodes preference rows into EncodedPair, one batched tokenizer call per group; bad pairs become Skipped."""

    def __init__(self, tokenizer, max_seq_len: int, strict: bool = False, source: str = ""):
        self.tokenizer, self.max_seq_len, self.strict, self.source = tokenizer, max_seq_len, strict, source
        self._encode = batch_encoder(tokenizer)

    def __call__(self, sample: dict, position: int = -1):
        return self.encode_many([sample], [position])[0]

    def encode_many(self, samples: list[dict], positions: list[int]) -> list:
        planned = [self._texts(sample) for sample in samples]
        texts = [t for p in planned if isinstance(p, tuple) for t in p]
        ids = iter(self._encode(texts, False) if texts else [])
        results = []
        for plan, sample, position in zip(planned, samples, positions):
            result = plan if isinstance(plan, Skipped) else self._fit(next(ids), next(ids), next(ids))
            if isinstance(result, Skipped) and self.strict:
                raise UserError(f"{where(self.source, position, 'pair')}: {result.reason.replace('_', ' ')} (run "
                                "without --strict to skip such pairs)")
            if isinstance(result, EncodedPair) and "_reference" in sample:
                result.reference = sample["_reference"]
            results.append(result)
        return results

    def _texts(self, sample: dict) -> tuple[str, str, str] | Skipped:
        messages = prompt_messages(sample.get("prompt"), sample.get("system"))
        if isinstance(messages, Skipped):
            return messages
        chosen, rejected = answer_of(sample.get("chosen")), answer_of(sample.get("rejected"))
        if chosen is None or rejected is None or not chosen.strip() or not rejected.strip():
            return Skipped("empty_answer")
        if chosen.strip() == rejected.strip():
            return Skipped("identical_answers")
        prompt_text = render_prompt(self.tokenizer, messages)
        return (prompt_text, answer_text(self.tokenizer, messages, chosen, prompt_text),
                answer_text(self.tokenizer, messages, rejected, prompt_text))

    def _fit(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> EncodedPair | Skipped:
        room = self.max_seq_len - max(len(chosen), len(rejected))
        if room < 1:
            return Skipped("answer_too_long")
        notes = ("truncated_prompt",) if len(prompt) > room else ()
        return EncodedPair(prompt[-room:], chosen, rejected, notes)


# ---------------------------------------------------------------- batches

def _batch(input_ids, labels, sequence, pairs: list[EncodedPair], real: int, position: int, skip: int, counts,
           positions, extra_tensors: dict) -> Batch:
    reference = torch.tensor([p.reference if p.reference is not None else (float("nan"),) * 2 for p in pairs],
                             dtype=torch.float64)
    return Batch({"input_ids": input_ids, "labels": labels, **extra_tensors}, loss_units=len(pairs), real_tokens=real,
                 total_tokens=input_ids.numel(), position=position, samples=len(pairs), skip=skip,
                 counts=counts or Counter(), sample_positions=positions or [], real=sequence >= 0,
                 extra={"sequence": sequence, "reference": reference})


def collate_pairs(pairs: list[EncodedPair], pad_id: int, position: int, counts: Counter | None = None) -> Batch:
    """Padded: every chosen document, then every rejected one, each in a row of its own."""
    documents = [(p, 0) for p in pairs] + [(p, 1) for p in pairs]
    width = max(len(p.prompt) + len(p.rejected if side else p.chosen) for p, side in documents)
    n = len(documents)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    sequence = torch.full((n, width), -1, dtype=torch.long)
    real = 0
    for row, (pair, side) in enumerate(documents):
        ids = pair.documents()[side]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, len(pair.prompt):len(ids)] = torch.tensor(ids[len(pair.prompt):])
        sequence[row, :len(ids)] = row
        real += len(ids)
    return _batch(input_ids, labels, sequence, pairs, real, position, 0, counts, None,
                  {"attention_mask": (sequence >= 0).long()})


def pair_batches(pairs: list[EncodedPair], max_len: int, rows_per_batch: int) -> list[list[list[tuple]]]:
    """Best fit of whole pairs into micro-batches of `rows_per_batch` rows of `max_len` tokens: each batch a list of
    rows, each row a list of (pair, side) documents; both documents of a pair always share a batch."""
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].tokens)
    batches: list[list[list[tuple]]] = []
    rooms: list[list[int]] = []
    for i in order:
        pair = pairs[i]
        sizes = sorted(((len(pair.prompt) + len(pair.rejected if side else pair.chosen), side) for side in (0, 1)),
                       reverse=True)
        for b in range(len(batches) + 1):
            if b == len(batches):
                batches.append([[] for _ in range(rows_per_batch)])
                rooms.append([max_len] * rows_per_batch)
            trial, placed = list(rooms[b]), []
            for size, side in sizes:  # the longer document first, each into the fullest row it fits
                fitting = [r for r in range(rows_per_batch) if trial[r] >= size]
                if not fitting:
                    break
                r = min(fitting, key=lambda k: (trial[k], k))
                trial[r] -= size
                placed.append((r, side))
            if len(placed) == 2:
                for r, side in placed:
                    batches[b][r].append((pair, side))
                rooms[b] = trial
                break
    return [[row for row in batch if row] for batch in batches]


def collate_packed_pairs(rows: list[list[tuple]], pad_id: int, position: int, skip: int, counts=None,
                         positions=None) -> Batch:
    """Packed: documents side by side in rows, position ids restarting at each (no attention across them)."""
    pairs = list(dict.fromkeys(pair for row in rows for pair, _ in row))  # in order of appearance, each once
    number = {id(pair): i for i, pair in enumerate(pairs)}
    width = max(sum(len(pair.prompt) + len(pair.rejected if side else pair.chosen) for pair, side in row)
                for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    sequence = torch.full((n, width), -1, dtype=torch.long)
    real = 0
    for r, row in enumerate(rows):
        start = 0
        for pair, side in row:
            ids = pair.documents()[side]
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            position_ids[r, start:end] = torch.arange(len(ids))
            labels[r, start + len(pair.prompt):end] = torch.tensor(ids[len(pair.prompt):])
            sequence[r, start:end] = number[id(pair)] + side * len(pairs)
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # the padding tail is a sequence of its own
        real += start
    return _batch(input_ids, labels, sequence, pairs, real, position, skip, counts, positions,
                  {"position_ids": position_ids})


class PairPacker:
    """How packed_batches_from packs pairs (lowmem/data/batches.py packs single samples the same way)."""

    @staticmethod
    def tokens(pair: EncodedPair) -> int:
        return pair.tokens

    @staticmethod
    def groups(pairs: list, max_len: int, batch_size: int) -> list:
        return pair_batches(pairs, max_len, batch_size)

    @staticmethod
    def samples(group) -> list:
        return list(dict.fromkeys(pair for row in group for pair, _ in row))

    @staticmethod
    def collate(group, pad_id: int, position: int, skip: int, trace: bool, counts, positions):
        return collate_packed_pairs(group, pad_id, position, skip, counts, positions)
