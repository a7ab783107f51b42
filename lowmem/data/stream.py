"""Sample sources read by index, and each process's share of an epoch.

Every source (tables.ShardTable, TokenWindows, mixture.Mixture, sft.UserRecordSource, sft_cache.CachedSamples)
has `num_samples` (per epoch) and `sample(epoch, index)`: the index-th sample of the epoch's order, a
pure function of (seed, epoch). Which process trains which sample is decided here, globally: process
r of W takes global positions base + r, base + r + W, ... (base is 0 unless an elastic resume moved
it), so every sample goes to exactly one process and a position is one integer per process.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..run.errors import UserError
from .tables import epoch_rng

__all__ = ["Shard", "TokenWindows", "close_all", "epoch_rng", "iter_shard"]


@dataclass(frozen=True)
class Shard:
    """One process's part of an epoch: global positions base + rank + j * world, except `exclude`.

    `exclude` holds positions at or after `base` that an earlier run with another process count already
    trained (elastic resume); they are passed over so no sample is trained twice.
    """

    rank: int = 0
    world: int = 1
    base: int = 0
    exclude: frozenset = field(default_factory=frozenset)

    def global_position(self, j: int) -> int:
        return self.base + self.rank + j * self.world


def iter_shard(source, epoch: int, shard: Shard, start: int = 0) -> Iterator[tuple[int, dict]]:
    """(j, sample) for this process's samples from its j = start on."""
    j = start
    while True:
        g = shard.global_position(j)
        if g >= source.num_samples:
            return
        if g not in shard.exclude:
            yield j, source.sample(epoch, g)
        j += 1


class TokenWindows:
    """Non-overlapping `seq_len` windows of one or more packed token files, shuffled per epoch."""

    def __init__(self, paths: list[str], seq_len: int, seed: int, shuffle: bool = True, name: str = ""):
        from .token_file import TokenFile

        self.files = [TokenFile(p) for p in paths]
        self.paths = [f.path for f in self.files]
        self.name, self.seq_len, self.seed, self.shuffle = name, seq_len, seed, shuffle
        counts = [f.n_tokens // seq_len for f in self.files]
        self.starts = list(np.cumsum([0] + counts[:-1]))
        self.num_samples = int(sum(counts))
        self.empty_shards = [f.path for f, n in zip(self.files, counts) if n == 0]
        if self.num_samples == 0:
            total = sum(f.n_tokens for f in self.files)
            raise UserError(f"token file '{self.paths[0]}' has {total} tokens, fewer than max_seq_len={seq_len}")
        self._order: tuple[int, np.ndarray] | None = None
        self._fds: dict[int, int] = {}

    @property
    def vocab_size(self) -> int:
        return max(f.vocab_size for f in self.files)

    def check_ids(self, vocab_size: int) -> None:
        """Refuse, before step 1 or scoring, token files whose ids the model's embedding cannot hold."""
        for f in self.files:
            f.check_ids(vocab_size)

    def sample(self, epoch: int, index: int) -> dict:
        if self._order is None or self._order[0] != epoch:
            n = self.num_samples
            self._order = (epoch, epoch_rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n))
        window = int(self._order[1][index])
        f = bisect.bisect_right(self.starts, window) - 1
        file = self.files[f]
        nbytes = self.seq_len * file.dtype.itemsize
        # pread rather than slicing the memmap: mapped pages would count in RSS and grow with the file
        raw = os.pread(self._fd(f), nbytes, (window - int(self.starts[f])) * nbytes)
        return {"input_ids": np.frombuffer(raw, dtype=file.dtype).astype(np.int64)}

    def _fd(self, f: int) -> int:
        if f not in self._fds:
            if len(self._fds) >= 8:
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[f] = os.open(self.files[f].path, os.O_RDONLY)
        return self._fds[f]

    def __del__(self):
        close_all(getattr(self, "_fds", {}))


def close_all(fds: dict) -> None:
    """Close the file descriptors a reader kept open (at garbage collection: errors are of no use there)."""
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
