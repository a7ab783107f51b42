"""The train state: counters of the run and the data pipeline's position, with state_dict/load_state_dict.

One owner: only TrainState's methods change its fields (the loop calls `advance`, `record_eval`,
`next_epoch`; the non-finite guard `nonfinite_step`/`finite_step`/`settle_nonfinite`), and only the
checkpoint manager saves and restores it (train_state.json, through GlobalTrainState). The data position
is global: it names, for every process, where its share of the epoch continues, so a run checkpointed
with N processes can continue with M (see DataPosition.reshard).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..data.stream import Shard


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
    nonfinite_steps: int = 0  # non-finite steps in a row, up to now
    nonfinite_total: int = 0
    counts: dict = field(default_factory=dict)  # data counters of trained rows, summed over processes, at resume
    data: DataPosition = field(default_factory=DataPosition)
    local_counts: Counter = field(default_factory=Counter)  # this process's counters since the run (re)started
    last_eval: dict | None = None  # the newest evaluation's results (not saved: a resume evaluates anew)
    last_eval_step: int = -1

    @classmethod
    def fresh(cls, world: int) -> "TrainState":
        return cls(data=DataPosition(world=world, ranks=[RankPosition() for _ in range(world)]))

    @property
    def epoch(self) -> int:
        return self.data.epoch

    # ---------------------------------------------------------------- what the loop changes

    def advance(self, window: list, world: int, rank: int, counts: bool = True) -> None:
        """Count an optimizer step and move this process's data position past the batches it trained (`world`, `rank`:
        data-parallel; `counts`: whether this process adds its batches' data counters, one per sequence group)."""
        self.step += 1
        mine = self.data.ranks[rank]
        for batch in window:
            if batch.position < 0:
                continue  # a dummy batch of a process without data
            if batch.skip:  # mid-chunk of packed rows: remember which samples of the chunk are trained
                if mine.skip == 0 or mine.position != batch.position:
                    mine.consumed = []
                mine.consumed += batch.sample_positions
            else:
                mine.consumed = []
            mine.position, mine.skip = batch.position, batch.skip
            if counts:
                self.local_counts.update(batch.counts)
        self.tokens_seen += sum(b.real_tokens for b in window) * world

    def next_epoch(self, world: int) -> None:
        self.data.next_epoch(world)

    def record_eval(self, result: dict, threshold: float = 0.0, patience: int = 0) -> tuple[bool, bool]:
        """Keep an evaluation; (a new best: a finite loss below the best so far, stop early: `patience` evaluations
        in a row without an improvement of more than `threshold`)."""
        loss, previous = result["eval_loss"], self.best_eval_loss
        best = math.isfinite(loss) and (previous is None or loss < previous)
        if best:
            self.best_eval_loss = loss
        improved = best and (previous is None or previous - loss > threshold)
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        self.last_eval, self.last_eval_step = result, self.step
        return best, bool(patience) and self.evals_without_improvement >= patience

    def nonfinite_step(self) -> int:
        """Count a skipped non-finite step; returns how many came in a row."""
        self.nonfinite_steps += 1
        self.nonfinite_total += 1
        return self.nonfinite_steps

    def finite_step(self) -> None:
        self.nonfinite_steps = 0

    def settle_nonfinite(self, in_a_row: int, new: int) -> None:
        """The counts a device-side guard kept since it last settled."""
        self.nonfinite_steps = in_a_row
        self.nonfinite_total += new

    # ---------------------------------------------------------------- checkpoints

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


class GlobalTrainState:
    """The train state of every process together: what a checkpoint holds (with the run's settings beside it)
    and the counters the logs show. state_dict and counts are collectives: every process calls them."""

    def __init__(self, state: TrainState, channel, rank: int, world: int, settings: dict, log=print,
                 group: int = 1):
        self.state, self.channel, self.rank, self.world = state, channel, rank, world  # data-parallel rank and world
        self.group = group  # processes per sequence-parallel group: they share one data position
        self.settings, self.log = settings, log  # the fingerprint and config saved beside the state

    def counts(self) -> dict:
        """Data counters of the whole run (every process, resumes included): skipped/truncated rows, samples per set."""
        return self.state.total_counts(self.channel.gather_objects(dict(self.state.local_counts)))

    def state_dict(self) -> dict:
        state = self.state
        gathered = self.channel.gather_objects((asdict(state.data.ranks[self.rank]), dict(state.local_counts)))
        gathered = gathered[::self.group]  # one per data-parallel rank (a group's processes hold the same)
        ranks = [RankPosition(**position) for position, _ in gathered]
        return {**state.state_dict(state.total_counts([c for _, c in gathered]), ranks), **self.settings}

    def load_state_dict(self, saved: dict) -> None:
        state = self.state
        state.load_state_dict(saved)
        if state.data.world != self.world:
            old = saved.get("config", {})
            self.log(f"elastic resume: {state.data.world} processes x {old.get('batch_size_per_gpu', '?')} x "
                     f"{old.get('gradient_accumulation_steps', '?')} accumulation -> {self.world} processes; the epoch "
                     "continues at the next untrained sample")
            state.data = state.data.reshard(self.world)
