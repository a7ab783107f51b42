"""The few settings the data layer reads: the data code takes these, never the whole training config.

Field names match the config fields (and flags) they come from, so `getattr(columns, "prompt_column")`
works and a reader of the config knows which flag sets which option.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Columns:
    """Source column names of the canonical fields (--prompt_column etc.); a dataset may override each."""

    prompt_column: str = "prompt"
    response_column: str = "response"
    text_column: str = "text"
    messages_column: str = "messages"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"


@dataclass(frozen=True)
class RecordOptions:
    """How user-modeling records become samples (lowmem/data/sft.py reads them)."""

    ablation_config: str = "all"
    prompt_style: str = "simple"
    max_history_items: int = 20
    max_samples_per_user: int | None = None
    sample_seed: int = 42
    resample_each_epoch: bool = False
    val_ratio: float = 0.0
    split_by: str = "user"


@dataclass(frozen=True)
class DataOptions:
    """Everything the data layer needs to read, encode and batch samples."""

    max_seq_len: int = 512
    seed: int = 42
    buffer_size: int = 10000  # rows of the shuffle window (--dataloader_buffer_size)
    columns: Columns = field(default_factory=Columns)
    train_on: str = "all_assistant"
    train_on_prompt: bool = False
    strict: bool = False
    records: RecordOptions = field(default_factory=RecordOptions)
    batch_size: int = 8  # micro-batch per process (--batch_size_per_gpu)
    packing: bool = False
    prefetch_batches: int = 8
    trace_samples: bool = False
