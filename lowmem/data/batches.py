"""Samples to batches: encode on the fly in groups, pad to the longest in the batch or pack, prefetch in a thread.

Each batch records the sample position after it, so a checkpoint taken after any optimizer step
resumes the stream at exactly the next sample, and the counters of the rows it consumed (skips,
truncations, samples per dataset), so counts survive a resume and never include prefetched rows.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

import torch

from ..run.errors import UserError
from .template import IGNORE_INDEX

ENCODE_GROUP = 64  # samples per batched tokenizer call
CHUNK_TOKENS = 1 << 21  # packing looks at least this many tokens at once: long conversations need small ones beside them


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]
    loss_units: int  # what the loss is averaged over: label positions (after the causal shift), or pairs
    real_tokens: int  # non-padding input positions
    total_tokens: int  # input positions including padding
    position: int  # where this process's sample stream restarts to continue after this batch...
    samples: int
    sample_hashes: list[str] = field(default_factory=list)  # filled only when tracing
    skip: int = 0  # ...and how many batches built from there to drop (packing builds several per chunk)
    counts: Counter = field(default_factory=Counter)  # skipped/truncated rows and samples per dataset it consumed
    sample_positions: list[int] = field(default_factory=list)  # packing: positions of the samples it holds
    real: torch.Tensor | None = None  # [rows, width] true at real (non-padding) tokens: what an MoE router is judged on
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # what the loss needs beside the model's inputs

    def on(self, device, non_blocking: bool = False) -> "Batch":
        """The batch with its tensors on `device`."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, tensors={k: move(v) for k, v in self.tensors.items()},
                       real=None if self.real is None else move(self.real),
                       extra={k: move(v) for k, v in self.extra.items()})


def encode_stream(samples: Iterable[tuple[int, dict]], encoder, names: list[str] | None = None,
                  locate: Callable[[dict], str | None] | None = None) -> Iterator[tuple[int, object, Counter]]:
    """(position, encoded sample or None, counters of that row), encoding ENCODE_GROUP samples per tokenizer call.

    A row the reader could not parse arrives as {'_skip': reason}; `_source` names a mixture's dataset. `locate`
    names a sample's file and row for --strict errors (the stream position is shuffled, not where the row is).
    """
    pending: list[tuple[int, dict]] = []
    for item in samples:
        pending.append(item)
        if len(pending) == ENCODE_GROUP:
            yield from _encode_group(pending, encoder, names, locate)
            pending = []
    if pending:
        yield from _encode_group(pending, encoder, names, locate)


def _encode_group(pending, encoder, names, locate) -> Iterator[tuple[int, object, Counter]]:
    from .encoding import Skipped, where

    def label(position: int, sample: dict):  # only strict runs name rows, so only they pay for it
        if not encoder.strict or locate is None:
            return position
        return locate(sample) or position

    readable = [(p, s) for p, s in pending if "_skip" not in s]
    keep = ("_reference",)  # what an encoder reads beside the row's own fields
    results = iter(encoder.encode_many([{k: v for k, v in s.items() if not k.startswith("_") or k in keep}
                                        for _, s in readable], [label(p, s) for p, s in readable]))
    for position, sample in pending:
        counts: Counter = Counter()
        if "_skip" in sample:
            if encoder.strict:
                raise UserError(f"{where(encoder.source, label(position, sample))}: "
                                f"{sample['_skip'].replace('_', ' ')} (run without --strict to skip such rows)")
            counts[f"skipped_{sample['_skip']}"] += 1
            yield position, None, counts
            continue
        result = next(results)
        if isinstance(result, Skipped):
            counts[f"skipped_{result.reason}"] += 1
            yield position, None, counts
            continue
        counts.update(result.notes)
        counts.update(sample.get("_notes", ()))  # notes recorded when a tokenize-once cache was built
        if names and "_source" in sample:
            counts[f"seen_{names[sample['_source']]}"] += 1
        yield position, result, counts


def sample_hash(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.md5(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def collate(encoded: list, pad_id: int, is_encoder_decoder: bool, position: int, trace: bool = False,
            counts: Counter | None = None) -> Batch:
    """Pad to the longest sample of the batch."""
    width = max(len(e.input_ids) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    label_width = max(len(e.labels) for e in encoded) if is_encoder_decoder else width
    labels = torch.full((n, label_width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(encoded):
        k = len(e.input_ids)
        input_ids[i, :k] = e.input_ids
        attention[i, :k] = 1
        labels[i, : len(e.labels)] = e.labels
    counted = labels if is_encoder_decoder else labels[:, 1:]
    real = int(attention.sum())
    return Batch({"input_ids": input_ids, "attention_mask": attention, "labels": labels},
                 loss_units=int((counted != IGNORE_INDEX).sum()), real_tokens=real,
                 total_tokens=input_ids.numel(), position=position, samples=n,
                 sample_hashes=[sample_hash(e.input_ids) for e in encoded] if trace else [], counts=counts or Counter(),
                 real=attention.bool())


def batches_from(stream: Iterable[tuple[int, object, Counter]], batch_size: int, pad_id: int,
                 is_encoder_decoder: bool = False, trace: bool = False, collate_pending=None) -> Iterator[Batch]:
    """Group encoded samples into batches of batch_size (the epoch's last may be smaller); `collate_pending`
    (pending, pad_id, position, counts) builds them when the samples are not single sequences (pairs)."""

    def batch(pending, position, counts):
        if collate_pending is not None:
            return collate_pending(pending, pad_id, position, counts)
        return collate(pending, pad_id, is_encoder_decoder, position, trace, counts)

    pending: list = []
    counts: Counter = Counter()
    position = 0
    for position, encoded, row_counts in stream:
        counts.update(row_counts)
        if encoded is None:
            continue
        pending.append(encoded)
        if len(pending) == batch_size:
            yield batch(pending, position + 1, counts)
            pending, counts = [], Counter()
    if pending:
        yield batch(pending, position + 1, counts)


def pack_rows(encoded: list, max_len: int) -> list[list]:
    """Best-fit decreasing: longest samples first, each into the fullest row that still has room for it."""
    import bisect

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted by room
    for i in order:
        n = len(encoded[i].input_ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (max_len - n, len(rows) - 1))
    return [[encoded[i] for i in sorted(row)] for row in rows]


def collate_packed(rows: list[list], pad_id: int, position: int, skip: int, trace: bool = False,
                   counts: Counter | None = None, positions: list[int] | None = None) -> Batch:
    """Several samples per row; position ids restart at each sample, so attention stays within it.

    No attention mask is passed: transformers derives a block-diagonal causal mask (SDPA, eager) or
    varlen boundaries (flash-attn) from the restarting position ids. Each sample's first label is
    ignored so no token learns to predict the next sample.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    real, hashes = 0, []
    for i, row in enumerate(rows):
        start = 0
        for e in row:
            k = len(e.input_ids)
            input_ids[i, start:start + k] = e.input_ids
            position_ids[i, start:start + k] = torch.arange(k)
            labels[i, start + 1:start + k] = e.labels[1:]
            start += k
            if trace:
                hashes.append(sample_hash(e.input_ids))
        position_ids[i, start:] = torch.arange(width - start)  # the padding tail is a sequence of its own
        mask[i, :start] = True
        real += start
    return Batch({"input_ids": input_ids, "position_ids": position_ids, "labels": labels},
                 loss_units=int((labels != IGNORE_INDEX).sum()), real_tokens=real, total_tokens=n * width,
                 position=position, samples=sum(len(r) for r in rows), sample_hashes=hashes, skip=skip,
                 counts=counts or Counter(), sample_positions=positions or [], real=mask)


class SamplePacker:
    """How packed_batches_from packs single samples: best fit into rows, batch_size rows a batch."""

    @staticmethod
    def tokens(encoded) -> int:
        return len(encoded.input_ids)

    @staticmethod
    def groups(encoded: list, max_len: int, batch_size: int) -> list:
        rows = pack_rows(encoded, max_len)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

    @staticmethod
    def samples(group) -> list:
        return [e for row in group for e in row]

    @staticmethod
    def collate(group, pad_id: int, position: int, skip: int, trace: bool, counts, positions) -> Batch:
        return collate_packed(group, pad_id, position, skip, trace, counts, positions)


def packed_batches_from(stream: Iterable[tuple[int, object, Counter]], batch_size: int, pad_id: int, max_len: int,
                        trace: bool = False, chunk_rows: int = 32, packer=SamplePacker) -> Iterator[Batch]:
    """Pack chunks of samples (chunk_rows batches' worth of tokens, at least CHUNK_TOKENS) into full rows
    (`packer`: single samples, or preference pairs with lowmem/data/pairs.PairPacker).

    A chunk yields several batches; each records the chunk's start and how many of its batches are
    done, so a resume rebuilds the same chunk and drops those. The chunk's counters ride on its last batch.
    """
    budget = max(batch_size * max_len * chunk_rows, CHUNK_TOKENS)
    pending: list[tuple[int, object]] = []
    counts: Counter = Counter()
    tokens, chunk_start, position = 0, None, -1
    for position, encoded, row_counts in stream:
        chunk_start = position if chunk_start is None else chunk_start
        counts.update(row_counts)
        if encoded is None:
            continue
        pending.append((position, encoded))
        tokens += packer.tokens(encoded)
        if tokens >= budget:
            yield from _emit_chunk(pending, batch_size, pad_id, max_len, chunk_start, position + 1, trace, counts,
                                   packer)
            pending, counts, tokens, chunk_start = [], Counter(), 0, None
    if pending or counts:
        yield from _emit_chunk(pending, batch_size, pad_id, max_len, chunk_start, position + 1, trace, counts, packer)


def _emit_chunk(pending, batch_size, pad_id, max_len, chunk_start, chunk_end, trace, counts, packer
                ) -> Iterator[Batch]:
    if not pending:
        return  # every row of the last chunk was skipped: nothing to train, the counts go nowhere
    where = {id(e): p for p, e in pending}
    groups = packer.groups([e for _, e in pending], max_len, batch_size)
    for j, group in enumerate(groups):
        last = j == len(groups) - 1
        yield packer.collate(group, pad_id, chunk_end if last else chunk_start, 0 if last else j + 1, trace,
                             counts if last else None, [where[id(e)] for e in packer.samples(group)])


def skip_batches(batches: Iterator[Batch], skip: int) -> Iterator[Batch]:
    for i, batch in enumerate(batches):
        if i >= skip:
            yield batch


def dummy_batch(pad_id: int) -> Batch:
    """A batch that contributes nothing to the loss: keeps a process without data in step with the others."""
    ids = torch.full((1, 8), pad_id, dtype=torch.long)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "labels": torch.full_like(ids, IGNORE_INDEX)}, 0, 0, 0, -1, 0,
                 real=torch.zeros_like(ids, dtype=torch.bool))


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
