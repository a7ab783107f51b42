"""The train state: counters of the run and the data pipeline's position, with state_dict/load_state_dict.

One owner: the loop advances it, checkpoint.py saves and restores it (train_state.json), nothing else
writes it. The data position is global: it names, for every process, where its share of the epoch
continues, so a run checkpointed with N processes can continue with M (see DataPosition.reshard).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from .data.stream import Shard


@dataclass
class RankPosition:
    """Where one process's share of the epoch continues."""

    position: int = 0  # its next sample j (packing: the first sample of the chunk being trained)
    skip: int = 0  # packing: batches of that chunk already trained
    consumed: list[int] = field(default_factory=list)  # packing: samples j of that chunk already trained


@dataclass
class DataPosition:
    """The epoch, how its samples are shared among processes, and each process's position."""

    epoch: int = 0
    base: int = 0  # global position where the current sharing of the epoch starts
    world: int = 1
    exclude: list[int] = field(default_factory=list)  # positions at or after base trained before a reshard
    ranks: list[RankPosition] = field(default_factory=lambda: [RankPosition()])

    def shard(self, rank: int) -> Shard:
        return Shard(rank, self.world, self.base, frozenset(self.exclude))

    def next_epoch(self, world: int) -> None:
        self.epoch += 1
        self.base, self.world, self.exclude = 0, world, []
        self.ranks = [RankPosition() for _ in range(world)]

    def _trained(self, rank: int) -> tuple[int, list[int]]:
        """(first untrained global position of this process, positions it trained after that one)."""
        shard, rp = self.shard(rank), self.ranks[rank]
        if rp.skip == 0:
            return shard.global_position(rp.position), []
        done = set(rp.consumed)
        j = rp.position
        while j in done or shard.global_position(j) in shard.exclude:
            j += 1
        return shard.global_position(j), [shard.global_position(k) for k in sorted(done) if k > j]

    def reshard(self, world: int) -> "DataPosition":
        """The same epoch continued by `world` processes: every untrained sample once, no trained one again."""
        fronts = [self._trained(r) for r in range(self.world)]
        base = min(front for front, _ in fronts)
        trained = {g for g in self.exclude if g >= base}
        for r, (front, ahead) in enumerate(fronts):
            shard = self.shard(r)
            j = max(0, -(-(base - shard.global_position(0)) // self.world))  # first j at or after base
            while shard.global_position(j) < front:
                trained.add(shard.global_position(j))
                j += 1
            trained.update(ahead)
        return DataPosition(self.epoch, base, world, sorted(trained), [RankPosition() for _ in range(world)])

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict) -> "DataPosition":
        ranks = [RankPosition(int(r["position"]), int(r["skip"]), list(r.get("consumed", []))) for r in saved["ranks"]]
        return cls(int(saved["epoch"]), int(saved["base"]), int(saved["world"]), list(saved["exclude"]), ranks)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0
    nonfinite_total: int = 0
    counts: dict = field(default_factory=dict)  # data counters of trained rows, summed over processes, at resume
    data: DataPosition = field(default_factory=DataPosition)
    local_counts: Counter = field(default_factory=Counter)  # this process's counters since the run (re)started

    @property
    def epoch(self) -> int:
        return self.data.epoch

    def state_dict(self, counts: dict, ranks: list[RankPosition]) -> dict:
        """What train_state.json holds; counts and ranks are the sums / positions gathered from every process."""
        data = DataPosition(self.data.epoch, self.data.base, self.data.world, self.data.exclude, ranks)
        return {"step": self.step, "epoch": self.epoch, "tokens_seen": self.tokens_seen,
                "best_eval_loss": self.best_eval_loss, "evals_without_improvement": self.evals_without_improvement,
                "nonfinite_steps": self.nonfinite_steps, "nonfinite_total": self.nonfinite_total,
                "counts": dict(counts), "data": data.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        for name in ("step", "tokens_seen", "best_eval_loss", "evals_without_improvement", "nonfinite_steps",
                     "nonfinite_total"):
            setattr(self, name, saved.get(name, getattr(self, name)))
        self.counts = dict(saved.get("counts", {}))
        if "data" in saved:
            self.data = DataPosition.from_state_dict(saved["data"])
        else:  # a checkpoint from before the position was global: every process at the saved position
            world = int(saved.get("fingerprint", {}).get("world_size", 1))
            rank = RankPosition(int(saved.get("position", 0)), int(saved.get("skip", 0)))
            self.data = DataPosition(int(saved.get("epoch", 0)), 0, world, [],
                                     [RankPosition(rank.position, rank.skip) for _ in range(world)])

    def total_counts(self, gathered: list[dict]) -> dict:
        """Counters of the whole run: those saved at resume plus every process's since then."""
        total = Counter(self.counts)
        for counts in gathered:
            total.update(counts)
        return dict(total)
