"""The loop's view of the data: this process's batches of each epoch, resumable at any position, and the
validation sets.

The training data is one dataset or a weighted mixture of several (lowmem/data/sources.py opens them);
validation is one or more datasets, each evaluated on its own. The loop never sees file formats.
"""
from __future__ import annotations

import math
from typing import Iterator

from ..run.errors import UserError
from .batches import Batch, Prefetcher, SamplePacker, batches_from, encode_stream, packed_batches_from, skip_batches
from .encoding import SampleEncoder, Skipped
from .mixture import Mixture
from .options import DataOptions
from .pairs import PairEncoder, PairPacker, collate_pairs
from .sources import PREFERENCE_KINDS, DataInputs, Dataset, data_group, open_dataset
from .stream import Shard, iter_shard

PEEK_SAMPLES = 256  # rows encoded before step 1 to refuse a training file with none usable


class TrainData:
    """Training batches of one process, resumable at any sample position of any epoch."""

    def __init__(self, inputs: DataInputs, options: DataOptions, tokenizer, is_encoder_decoder: bool, rank: int,
                 world: int, pin_memory: bool, log=print):
        self.options, self.rank, self.world, self.pin_memory = options, rank, world, pin_memory
        if not inputs.train:
            raise UserError("no training data: set --train_file (or a datasets: list in a --config file)")
        self.datasets = [open_dataset(spec, options, tokenizer, is_encoder_decoder, True, "train_file", log)
                         for spec in inputs.train]
        for d in self.datasets:
            if d.kind == "prompts":
                raise UserError(f"training data '{d.spec.paths[0]}' has a prompt column but no "
                                f"'{d.spec.column(options.columns, 'response_column')}' column; SFT needs both (name "
                                "them with --prompt_column/--response_column)")
        if len(self.datasets) == 1:
            self.source, self.names = self.datasets[0].source, None
        else:
            self.names = [d.name for d in self.datasets]
            self.source = Mixture([d.source for d in self.datasets], [d.spec.weight for d in self.datasets],
                                  self.names, options.seed)
        self.validation = self._open_validation(inputs, tokenizer, is_encoder_decoder, log)
        self.is_encoder_decoder = is_encoder_decoder
        self.pairs = self._preference_data(is_encoder_decoder)
        self.packing = options.packing and not is_encoder_decoder  # T5 batches are padded
        self.encoder = self._encoder(tokenizer, self.describe_first())
        self.pad_id = tokenizer.pad_token_id
        self.trace = options.trace_samples
        self.references: dict[int, object] = {}  # id(dataset source) -> its reference cache (preference pairs)

    def _preference_data(self, is_encoder_decoder: bool) -> bool:
        """Whether the run trains on preference pairs; pairs mixed with other data, or for T5, are refused."""
        paired = [d.kind in PREFERENCE_KINDS for d in self.datasets]
        if not any(paired):
            return False
        if not all(paired):
            other = next(d for d in self.datasets if d.kind not in PREFERENCE_KINDS)
            raise UserError(f"training data '{other.spec.paths[0]}' is {other.kind} data but other datasets of the "
                            "run hold preference pairs; train preference pairs on their own (after SFT)")
        if is_encoder_decoder:
            raise UserError("preference pairs train decoder models (Llama, Qwen, Mistral, ...), not T5")
        return True

    def attach_references(self, caches: dict) -> None:
        """The reference caches of the datasets (training and validation) by dataset name: samples carry their
        row's reference log-probabilities from then on."""
        for d in self.datasets + [d for d, _ in self.validation]:
            if d.name in caches:
                self.references[id(d.source)] = caches[d.name]

    def _with_reference(self, samples, source):
        """Samples with `_reference`, their row's reference sums, when the dataset has a cache."""
        inner = getattr(source, "sources", None)  # a mixture: `_source` says which dataset
        for position, sample in samples:
            origin = inner[sample["_source"]] if inner is not None and "_source" in sample else source
            cache = self.references.get(id(origin))
            if cache is not None and "_row" in sample:
                sample = {**sample, "_reference": cache.values(sample["_row"])}
            yield position, sample

    @property
    def kinds(self) -> set[str]:
        """The kinds of the training datasets (tokens, text, prompt_response, records, ...)."""
        return {d.kind for d in self.datasets}

    def _open_validation(self, inputs: DataInputs, tokenizer, is_encoder_decoder, log) -> list[tuple[Dataset, float]]:
        """[(dataset, weight)]: the records' held-out part, or the validation datasets."""
        held_out = getattr(self.datasets[0].source, "held_out", None)
        if held_out is not None:
            return [(Dataset(self.datasets[0].spec, "records", held_out), 1.0)]
        sets = [open_dataset(spec, self.options, tokenizer, is_encoder_decoder, False, "validation_file", log)
                for spec in inputs.validation]
        groups = {data_group(d.kind) for d in self.datasets}
        for d in sets:
            if data_group(d.kind) not in groups:
                raise UserError(f"validation data '{d.spec.paths[0]}' is {data_group(d.kind)} data ({d.kind}) but the "
                                f"training data is {' and '.join(sorted(groups))}; validate on data of the same kind")
        return [(d, d.spec.weight if d.spec.weight is not None else 1.0) for d in sets]

    def _encoder(self, tokenizer, source_name: str):
        o = self.options
        if self.pairs:
            return PairEncoder(tokenizer, o.max_seq_len, o.strict, source_name)
        return SampleEncoder(tokenizer, o.max_seq_len, self.is_encoder_decoder, o.train_on, o.train_on_prompt,
                             o.strict, source_name)

    def describe(self) -> str:
        """One line per dataset for the start-up summary: kind, files, samples, weight, empty shards."""
        lines = []
        for d in self.datasets:
            empty = getattr(d.source, "empty_shards", [])
            weight = f", weight {d.spec.weight:g}" if d.spec.weight is not None and len(self.datasets) > 1 else ""
            skipped = f", {len(empty)} empty file(s) skipped" if empty else ""
            lines.append(f"train data '{d.name}': {d.kind}, {len(d.spec.paths)} file(s), {d.source.num_samples} "
                         f"samples{weight}{skipped}")
        if isinstance(self.source, Mixture):
            lines.append(f"mixture: one epoch = {self.source.num_samples} samples drawn by weight (smaller datasets "
                         "repeat, larger ones are subsampled and continue next epoch)")
        for d, _ in self.validation:
            lines.append(f"validation data '{d.name}': {d.kind}, {d.source.num_samples} samples")
        return "\n".join(lines)

    def batches_per_epoch(self) -> int:
        """Micro-batches per process per epoch (an estimate when packing or when rows are skipped)."""
        samples = math.ceil(self.source.num_samples / self.world)
        tokens_only = all(d.kind == "tokens" for d in self.datasets)
        if self.packing and not tokens_only:  # a guess that only sets the LR schedule's length: ~3 samples per row
            per_row = 1.5 if self.pairs else 3  # a pair is two documents
            return max(1, math.ceil(samples / (per_row * self.options.batch_size)))
        return max(1, math.ceil(samples / self.options.batch_size))

    def check_before_training(self, vocab_size: int) -> None:
        """Refuse data the run cannot use before step 1: token ids past the vocabulary, no usable row at all."""
        for d in self.datasets:
            if hasattr(d.source, "check_ids"):
                d.source.check_ids(vocab_size)
        n = min(PEEK_SAMPLES, self.source.num_samples)
        samples = [self.source.sample(0, g) for g in range(n)]
        usable = [s for s in samples if "_skip" not in s]
        readable = [{k: v for k, v in s.items() if not k.startswith("_")} for s in usable]
        results = self.encoder.encode_many(readable, [self._locate(self.source, s) or i for i, s in enumerate(usable)]) \
            if readable else []
        if not any(not isinstance(r, Skipped) for r in results):
            reasons = sorted({r.reason for r in results} | {s["_skip"] for s in samples if "_skip" in s})
            raise UserError(f"no usable rows in the first {n} samples of the training data ({self.describe_first()}): "
                            f"every one was skipped ({', '.join(reasons) or 'no rows'}); check the columns and "
                            "--max_seq_len")

    @staticmethod
    def _locate(source, sample: dict) -> str | None:
        """The file and row a sample of `source` was read from ("'a.parquet' row 40"), where its reader knows them."""
        inner = getattr(source, "sources", None)  # a mixture: `_source` says which dataset
        origin = inner[sample["_source"]] if inner is not None and "_source" in sample else source
        if "_row" not in sample or not hasattr(origin, "locate"):
            return None
        return origin.locate(sample["_row"])

    def describe_first(self) -> str:
        return self.datasets[0].spec.paths[0] + (" ..." if len(self.datasets) > 1 else "")

    def _batches(self, samples, encoder, source) -> Iterator[Batch]:
        stream = encode_stream(samples, encoder, self.names, lambda sample: self._locate(source, sample))
        o = self.options
        if self.packing:
            packer = PairPacker if self.pairs else SamplePacker
            return packed_batches_from(stream, o.batch_size, self.pad_id, o.max_seq_len, self.trace, packer=packer)
        return batches_from(stream, o.batch_size, self.pad_id, self.is_encoder_decoder, self.trace,
                            collate_pairs if self.pairs else None)

    def epoch(self, epoch: int, shard: Shard, start_position: int, skip: int = 0) -> Prefetcher:
        samples = self._with_reference(iter_shard(self.source, epoch, shard, start_position), self.source)
        stream = skip_batches(self._batches(samples, self.encoder, self.source), skip)
        return Prefetcher(stream, self.options.prefetch_batches, self.pin_memory)

    def validation_batches(self) -> list[tuple[str, float, Iterator[Batch]]]:
        """(name, weight, this process's batches in file order) of each validation dataset."""
        out = []
        for d, weight in self.validation:
            encoder = self._encoder(self.encoder.tokenizer, d.spec.paths[0])
            samples = self._with_reference(iter_shard(d.source, 0, Shard(self.rank, self.world), 0), d.source)
            out.append((d.name, weight, self._batches(samples, encoder, d.source)))
        return out
