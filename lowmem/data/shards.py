"""One batch cut for sequence parallelism: every process of a group holds the same batch and keeps a contiguous
1/N of each row.

Labels are shifted before the cut (the label of a part's last token is the first token of the next part) and
travel as `shift_labels` (transformers' losses and the preference objective read them unshifted); rows are padded
to a multiple of N with padding that trains nothing; position ids are kept (Ulysses gathers them to find where
packed documents start) and made for padded batches, whose attention mask Ulysses drops (their padding is at the
end of each row, after every real token, so causal attention never sees it). Token counts become this part's;
a batch of preference pairs keeps its pair count, which every process of the group shares.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from .batches import Batch
from .template import IGNORE_INDEX


def _shifted(t: torch.Tensor, fill: int) -> torch.Tensor:
    return F.pad(t[:, 1:], (0, 1), value=fill)


def _filled(batch: Batch, rows: int, pad_id: int) -> Batch:
    """`batch` with rows of padding added (no label, positions of their own)."""
    t = batch.tensors
    have, width = t["input_ids"].shape
    extra_rows = rows - have

    def grow(tensor: torch.Tensor, fill) -> torch.Tensor:
        return torch.cat([tensor, torch.full((extra_rows, width), fill, dtype=tensor.dtype)])

    tensors = {"input_ids": grow(t["input_ids"], pad_id), "labels": grow(t["labels"], IGNORE_INDEX)}
    positions = t.get("position_ids")
    if positions is None:
        positions = torch.arange(width).expand(have, width)
    tensors["position_ids"] = torch.cat([positions, torch.arange(width).expand(extra_rows, width)])
    extra = {k: grow(v, -1) if k == "sequence" else v for k, v in batch.extra.items()}
    return replace(batch, tensors=tensors, extra=extra, real=None if batch.real is None else grow(batch.real, False))


def cut(batch: Batch, rank: int, n: int, pad_id: int, rows: int = 0) -> Batch:
    """This process's part (rank of n) of every row of `batch`, with filler rows up to `rows` (Ulysses is built for
    one micro-batch size: a short last batch is filled with rows that train nothing)."""
    if n == 1:
        return batch
    t = batch.tensors
    have, width = t["input_ids"].shape
    rows = max(rows, have)
    if rows > have:
        batch = _filled(batch, rows, pad_id)
        t = batch.tensors
    target = math.ceil(width / n) * n
    grow = target - width
    positions = t.get("position_ids")
    if positions is None:
        positions = torch.arange(width).expand(rows, width)
    if grow:  # the padding continues the row's last document: it trains nothing and attends only backwards
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, grow + 1)], dim=1)
    part = slice(rank * target // n, (rank + 1) * target // n)

    def take(tensor: torch.Tensor, fill) -> torch.Tensor:
        return F.pad(tensor, (0, grow), value=fill)[:, part].contiguous()

    shift_labels = take(_shifted(t["labels"], IGNORE_INDEX), IGNORE_INDEX)
    tensors = {"input_ids": take(t["input_ids"], pad_id), "position_ids": positions[:, part].contiguous(),
               "labels": shift_labels, "shift_labels": shift_labels}
    extra = dict(batch.extra)
    if "sequence" in extra:  # preference pairs: the document of each label, shifted like the labels
        extra["shift_sequence"] = take(_shifted(extra["sequence"], -1), -1)
        extra["sequence"] = take(extra["sequence"], -1)
    real = None if batch.real is None else take(batch.real, False)
    pairs = "sequence" in batch.extra
    real_tokens = int(real.sum()) if real is not None else int((tensors["input_ids"] != pad_id).sum())
    return replace(batch, tensors=tensors, extra=extra, real=real, real_tokens=real_tokens,
                   total_tokens=rows * (target // n),
                   loss_units=batch.loss_units if pairs else int((shift_labels != IGNORE_INDEX).sum()))
