"""The loop's view of the data: per-epoch batch streams for this process, and validation batches."""
from __future__ import annotations

import math
from typing import Iterator

from config import TrainConfig

from .batches import Batch, Prefetcher, SampleEncoder, batches_from, packed_batches_from, skip_batches
from .sft import is_record_file, open_record_sources
from .stream import open_source


class TrainData:
    """Training batches of one process, resumable at any sample position of any epoch."""

    def __init__(self, cfg: TrainConfig, tokenizer, is_encoder_decoder: bool, rank: int, world: int,
                 pin_memory: bool, log=print):
        self.cfg, self.rank, self.world, self.pin_memory = cfg, rank, world, pin_memory
        self.packing = cfg.packing and not is_encoder_decoder  # T5 batches are padded
        if is_record_file(cfg.train_file):
            self.source, self.validation = open_record_sources(cfg, tokenizer, is_encoder_decoder, log)
        else:
            self.source = open_source(cfg.train_file, cfg.max_seq_len, cfg.dataloader_buffer_size, cfg.seed)
            self.validation = None
            if cfg.validation_file:
                self.validation = open_source(cfg.validation_file, cfg.max_seq_len, cfg.dataloader_buffer_size,
                                              cfg.seed, shuffle=False)
        self.encoder = SampleEncoder(tokenizer, cfg.max_seq_len, is_encoder_decoder, cfg.train_on_prompt,
                                     cfg.strict, cfg.train_file)
        self.pad_id = tokenizer.pad_token_id

    def batches_per_epoch(self) -> int:
        """Micro-batches per process per epoch (an estimate when packing or when rows are skipped)."""
        samples = math.ceil(self.source.num_samples / self.world)
        if self.packing and hasattr(self.source, "seq_len"):
            return math.ceil(samples / self.cfg.batch_size_per_gpu)
        if self.packing:  # a guess that only sets the LR schedule's length: about 3 samples per row
            return max(1, math.ceil(samples / (3 * self.cfg.batch_size_per_gpu)))
        return math.ceil(samples / self.cfg.batch_size_per_gpu)

    def _batches(self, samples, encoder) -> Iterator[Batch]:
        if self.packing:
            return packed_batches_from(samples, encoder, self.cfg.batch_size_per_gpu, self.pad_id, self.cfg.max_seq_len)
        return batches_from(samples, encoder, self.cfg.batch_size_per_gpu, self.pad_id)

    def epoch(self, epoch: int, start_position: int, skip: int = 0) -> Prefetcher:
        samples = self.source.iter_shard(epoch, self.rank, self.world, start_position)
        stream = skip_batches(self._batches(samples, self.encoder), skip)
        return Prefetcher(stream, self.cfg.prefetch_batches, self.pin_memory)

    def validation_batches(self) -> Iterator[Batch]:
        """This process's share of the validation file, in file order."""
        encoder = SampleEncoder(self.encoder.tokenizer, self.cfg.max_seq_len, self.encoder.is_encoder_decoder,
                                self.cfg.train_on_prompt, self.cfg.strict, self.cfg.validation_file)
        return self._batches(self.validation.iter_shard(0, self.rank, self.world, 0), encoder)
