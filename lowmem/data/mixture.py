"""A weighted mixture of datasets as one sample source, deterministic from the seed and O(datasets) in state.

The mixture's sample stream runs on across epochs: global sample G = epoch * num_samples + index. It
is cut into blocks of B samples; every block holds each dataset's share of B exactly (largest
remainder rounding of weight x B), in an order shuffled by (seed, block). So the realised shares
match the weights to 1/B at every block boundary, and which dataset sample G comes from, and how
many samples that dataset gave before it, are computed from G alone: a resume is O(B), not O(G).

What an epoch means: one mixture epoch is as many samples as all datasets hold together. Each
dataset gives weight x that many; a dataset asked for more than it holds repeats (its next pass is
reshuffled), one asked for less is subsampled, and the next epoch continues where it stopped, so a
subsampled dataset is not cut to the same subset every epoch.
"""
from __future__ import annotations

import math

import numpy as np

from ..run.errors import UserError
from .tables import epoch_rng

MIN_BLOCK, MAX_BLOCK = 1000, 1 << 20
MIN_PER_BLOCK = 10  # the smallest weight still gets this many samples in every block


def apportion(weights: list[float], total: int) -> list[int]:
    """Integers proportional to weights that sum to total (largest remainder)."""
    exact = [w * total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


class Mixture:
    """Samples of several sources drawn by weight; `sample` adds `_source` (the dataset's index)."""

    def __init__(self, sources: list, weights: list[float], names: list[str], seed: int):
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise UserError(f"mixture weights must be positive numbers, got {weights}")
        total = sum(weights)
        self.sources, self.names, self.seed = sources, names, seed
        self.weights = [w / total for w in weights]
        self.block = min(MAX_BLOCK, max(MIN_BLOCK, math.ceil(MIN_PER_BLOCK / min(self.weights))))
        self.per_block = apportion(self.weights, self.block)
        if min(self.per_block) == 0:
            small = names[self.per_block.index(0)]
            raise UserError(f"dataset '{small}' has a weight too small to sample (under 1/{MAX_BLOCK}); raise it")
        self.num_samples = sum(s.num_samples for s in sources)
        self.empty_shards = [p for s in sources for p in getattr(s, "empty_shards", [])]
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block_order(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot of block b, how many earlier slots of the block hold the same dataset)."""
        if self._block is None or self._block[0] != b:
            slots = np.repeat(np.arange(len(self.sources), dtype=np.int32), self.per_block)
            slots = slots[epoch_rng(self.seed, b, 7919).permutation(self.block)]  # 7919: apart from data seeds
            rank = np.zeros(self.block, dtype=np.int64)
            for i in range(len(self.sources)):
                where = np.flatnonzero(slots == i)
                rank[where] = np.arange(len(where))
            self._block = (b, slots, rank)
        return self._block[1], self._block[2]

    def locate(self, epoch: int, index: int) -> tuple[int, int]:
        """(dataset, that dataset's running sample count) of mixture sample `index` of `epoch`."""
        g = epoch * self.num_samples + index
        b, slot = divmod(g, self.block)
        slots, rank = self._block_order(b)
        i = int(slots[slot])
        return i, b * self.per_block[i] + int(rank[slot])

    def seen(self, epoch: int, index: int) -> list[int]:
        """Samples each dataset gave before mixture sample `index` of `epoch` (all processes together)."""
        g = epoch * self.num_samples + index
        b, slot = divmod(g, self.block)
        slots, _ = self._block_order(b)
        in_block = np.bincount(slots[:slot], minlength=len(self.sources))
        return [b * n + int(c) for n, c in zip(self.per_block, in_block)]

    def sample(self, epoch: int, index: int) -> dict:
        i, k = self.locate(epoch, index)
        source = self.sources[i]
        passes, offset = divmod(k, source.num_samples)  # a small dataset repeats, reshuffled each pass
        return {**source.sample(passes, offset), "_source": i}

    def check_ids(self, vocab_size: int) -> None:
        for source in self.sources:
            if hasattr(source, "check_ids"):
                source.check_ids(vocab_size)
