"""Samples to batches: encode on the fly, pad to the longest in the batch, prefetch in a thread.

Each batch records the sample position after it, so a checkpoint taken after any optimizer step
resumes the stream at exactly the next sample.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..errors import UserError
from ..template import IGNORE_INDEX, encode_example


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]
    label_tokens: int  # positions that count in the loss (after the causal shift)
    real_tokens: int  # non-padding input positions
    total_tokens: int  # input positions including padding
    position: int  # where this process's sample stream restarts to continue after this batch...
    samples: int
    sample_hashes: list[str] = field(default_factory=list)  # filled only when tracing
    skip: int = 0  # ...and how many batches built from there to drop (packing builds several per chunk)


@dataclass
class SampleEncoder:
    """Turns a raw sample into input_ids/labels; bad or unusable rows are counted, or raise when strict."""

    tokenizer: object
    max_seq_len: int
    is_encoder_decoder: bool = False
    train_on_prompt: bool = False
    strict: bool = False
    source: str = ""
    trace: bool = False  # hash each sample's tokens so tests can check the data order
    counts: Counter = field(default_factory=Counter)

    def _skip(self, reason: str, position: int):
        if self.strict:
            raise UserError(f"'{self.source}' sample {position}: {reason} (run without --strict to skip such rows)")
        self.counts[f"skipped_{reason}"] += 1
        return None

    def __call__(self, sample: dict, position: int = -1) -> dict | None:
        if "input_ids" in sample:  # token windows
            ids = torch.as_tensor(sample["input_ids"])
            return {"input_ids": ids, "labels": ids}
        if "text" in sample:
            text = sample["text"]
            if not isinstance(text, str) or not text.strip():
                return self._skip("empty_or_null", position)
            if self.is_encoder_decoder:
                raise UserError(f"'{self.source}': T5 needs prompt/response columns, not text")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            if len(ids) > self.max_seq_len:
                self.counts["truncated_text"] += 1
                ids = ids[: self.max_seq_len]
            ids = torch.tensor(ids)
            return {"input_ids": ids, "labels": ids}
        prompt, response = sample.get("prompt"), sample.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            return self._skip("empty_or_null", position)
        example = encode_example(self.tokenizer, prompt, response, self.max_seq_len,
                                 is_encoder_decoder=self.is_encoder_decoder, train_on_prompt=self.train_on_prompt)
        if example is None:
            return self._skip("response_too_long", position)
        if example.truncated:
            self.counts["truncated_prompt"] += 1
        return {"input_ids": torch.tensor(example.input_ids), "labels": torch.tensor(example.labels)}


def sample_hash(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.md5(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def collate(encoded: list[dict], pad_id: int, is_encoder_decoder: bool, position: int, trace: bool = False) -> Batch:
    """Pad to the longest sample of the batch."""
    width = max(len(e["input_ids"]) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    label_width = max(len(e["labels"]) for e in encoded) if is_encoder_decoder else width
    labels = torch.full((n, label_width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(encoded):
        k = len(e["input_ids"])
        input_ids[i, :k] = e["input_ids"]
        attention[i, :k] = 1
        labels[i, : len(e["labels"])] = e["labels"]
    counted = labels if is_encoder_decoder else labels[:, 1:]
    real = int(attention.sum())
    return Batch({"input_ids": input_ids, "attention_mask": attention, "labels": labels},
                 label_tokens=int((counted != IGNORE_INDEX).sum()), real_tokens=real,
                 total_tokens=input_ids.numel(), position=position, samples=n,
                 sample_hashes=[sample_hash(e["input_ids"]) for e in encoded] if trace else [])


def batches_from(samples: Iterable[tuple[int, dict]], encoder: SampleEncoder, batch_size: int,
                 pad_id: int) -> Iterator[Batch]:
    """Group encoded samples into batches of batch_size (the epoch's last may be smaller)."""
    pending: list[dict] = []
    position = 0
    for position, sample in samples:
        encoded = encoder(sample, position)
        if encoded is None:
            continue
        pending.append(encoded)
        if len(pending) == batch_size:
            yield collate(pending, pad_id, encoder.is_encoder_decoder, position + 1, encoder.trace)
            pending = []
    if pending:
        yield collate(pending, pad_id, encoder.is_encoder_decoder, position + 1, encoder.trace)


def pack_rows(encoded: list[dict], max_len: int) -> list[list[dict]]:
    """First-fit decreasing: longest samples first, each into the first row with room for it."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(encoded[i]["input_ids"])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return [[encoded[i] for i in sorted(row)] for row in rows]


def collate_packed(rows: list[list[dict]], pad_id: int, position: int, skip: int, trace: bool = False) -> Batch:
    """Several samples per row; position ids restart at each sample, so attention stays within it.

    No attention mask is passed: transformers derives a block-diagonal causal mask (SDPA, eager) or
    varlen boundaries (flash-attn) from the restarting position ids. Each sample's first label is
    ignored so no token learns to predict the next sample.
    """
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    real, hashes = 0, []
    for i, row in enumerate(rows):
        start = 0
        for e in row:
            k = len(e["input_ids"])
            input_ids[i, start:start + k] = e["input_ids"]
            positions[i, start:start + k] = torch.arange(k)
            labels[i, start + 1:start + k] = e["labels"][1:]
            start += k
            if trace:
                hashes.append(sample_hash(e["input_ids"]))
        positions[i, start:] = torch.arange(width - start)  # the padding tail is a sequence of its own
        real += start
    return Batch({"input_ids": input_ids, "position_ids": positions, "labels": labels},
                 label_tokens=int((labels != IGNORE_INDEX).sum()), real_tokens=real, total_tokens=n * width,
                 position=position, samples=sum(len(r) for r in rows), sample_hashes=hashes, skip=skip)


def packed_batches_from(samples: Iterable[tuple[int, dict]], encoder: SampleEncoder, batch_size: int,
                        pad_id: int, max_len: int, chunk_rows: int = 32) -> Iterator[Batch]:
    """Pack chunks of samples (about chunk_rows batches' worth of tokens) into full rows.

    A chunk yields several batches; each records the chunk's start and how many of its batches are
    done, so a resume rebuilds the same chunk and drops those.
    """
    budget = batch_size * max_len * chunk_rows
    pending: list[dict] = []
    tokens, chunk_start, position = 0, None, -1
    for position, sample in samples:
        chunk_start = position if chunk_start is None else chunk_start
        encoded = encoder(sample, position)
        if encoded is None:
            continue
        pending.append(encoded)
        tokens += len(encoded["input_ids"])
        if tokens >= budget:
            yield from _emit_chunk(pending, encoder, batch_size, pad_id, max_len, chunk_start, position + 1)
            pending, tokens, chunk_start = [], 0, None
    if pending:
        yield from _emit_chunk(pending, encoder, batch_size, pad_id, max_len, chunk_start, position + 1)


def _emit_chunk(pending, encoder, batch_size, pad_id, max_len, chunk_start, chunk_end) -> Iterator[Batch]:
    rows = pack_rows(pending, max_len)
    groups = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    for j, group in enumerate(groups):
        last = j == len(groups) - 1
        yield collate_packed(group, pad_id, chunk_end if last else chunk_start, 0 if last else j + 1, encoder.trace)


def skip_batches(batches: Iterator[Batch], skip: int) -> Iterator[Batch]:
    for i, batch in enumerate(batches):
        if i >= skip:
            yield batch


def dummy_batch(pad_id: int) -> Batch:
    """A batch that contributes nothing to the loss: keeps a process without data in step with the others."""
    ids = torch.full((1, 8), pad_id, dtype=torch.long)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "labels": torch.full_like(ids, IGNORE_INDEX)}, 0, 0, 0, -1, 0)


class Prefetcher:
    """Runs a batch iterator in a background thread, `depth` batches ahead, pinning memory for CUDA."""

    _DONE = object()

    def __init__(self, iterator: Iterator[Batch], depth: int, pin_memory: bool):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._pin = pin_memory
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator):
        try:
            for batch in iterator:
                if self._pin:
                    batch.tensors = {k: v.pin_memory() for k, v in batch.tensors.items()}
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # re-raised in the consumer's thread
            self._put(exc)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is self._DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
