"""The loop's view of the data: per-epoch batch streams for this process, and validation batches."""
from __future__ import annotations

import math
from typing import Iterator

from config import TrainConfig

from .batches import Batch, Prefetcher, SampleEncoder, batches_from
from .stream import open_source


class TrainData:
    """Training batches of one process, resumable at any sample position of any epoch."""

    def __init__(self, cfg: TrainConfig, tokenizer, is_encoder_decoder: bool, rank: int, world: int, pin_memory: bool):
        self.cfg, self.rank, self.world, self.pin_memory = cfg, rank, world, pin_memory
        self.source = open_source(cfg.train_file, cfg.max_seq_len, cfg.dataloader_buffer_size, cfg.seed)
        self.encoder = SampleEncoder(tokenizer, cfg.max_seq_len, is_encoder_decoder, cfg.train_on_prompt,
                                     cfg.strict, cfg.train_file)
        self.pad_id = tokenizer.pad_token_id
        self.validation = None
        if cfg.validation_file:
            self.validation = open_source(cfg.validation_file, cfg.max_seq_len, cfg.dataloader_buffer_size,
                                          cfg.seed, shuffle=False)

    def batches_per_epoch(self) -> int:
        """Micro-batches per process per epoch (an upper bound when rows are skipped)."""
        return math.ceil(math.ceil(self.source.num_samples / self.world) / self.cfg.batch_size_per_gpu)

    def epoch(self, epoch: int, start_position: int) -> Prefetcher:
        samples = self.source.iter_shard(epoch, self.rank, self.world, start_position)
        stream = batches_from(samples, self.encoder, self.cfg.batch_size_per_gpu, self.pad_id)
        return Prefetcher(stream, self.cfg.prefetch_batches, self.pin_memory)

    def validation_batches(self) -> Iterator[Batch]:
        """This process's share of the validation file, in file order."""
        encoder = SampleEncoder(self.encoder.tokenizer, self.cfg.max_seq_len, self.encoder.is_encoder_decoder,
                                self.cfg.train_on_prompt, self.cfg.strict, self.cfg.validation_file)
        samples = self.validation.iter_shard(0, self.rank, self.world, 0)
        return batches_from(samples, encoder, self.cfg.batch_size_per_gpu, self.pad_id)
