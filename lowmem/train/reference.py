"""Where a preference run's reference log-probabilities come from, without a second model where it can:

  cache         the reference model's summed log-probabilities of every pair, computed once before step 1 (or by
                `train_low_mem.py prepare reference`), stored beside the data and read with each pair
                (lowmem/data/reference_cache.py): training holds one model, and later runs and resumes reuse it
  adapters_off  LoRA: the model itself with its adapters switched off, one extra forward pass per micro-batch
  model         a frozen copy of the starting model (what other trainers do): one more model in memory
SimPO and ORPO need none. The reference is always the model training starts from: its weights before any
step (for LoRA, the base with the adapters off, an earlier adapter merged in when training starts from one).
"""
from __future__ import annotations

import copy
import hashlib
import os

import torch

from ..data.reference_cache import ReferenceCache
from ..run.errors import UserError
from .preference import document_sums

CHOICES = ("auto", "cache", "adapters_off", "model")


def choose(reference: str, loss_needs_reference: bool, lora: bool, sharded: bool, caches_ready: bool) -> str:
    """The reference this run uses ('none' for SimPO and ORPO); a choice that cannot work is one UserError."""
    if not loss_needs_reference:
        if reference not in ("auto",):
            raise UserError(f"--reference={reference} is unused: SimPO and ORPO compare the answers without a "
                            "reference; drop the flag")
        return "none"
    if reference == "adapters_off" and not lora:
        raise UserError("--reference=adapters_off needs LoRA (--lora_r=16): without adapters there is nothing to switch "
                        "off; use --reference=cache (the default) or model")
    if reference == "model" and sharded:
        raise UserError("--reference=model keeps an unsharded copy of the model beside DeepSpeed/FSDP shards; use "
                        "--reference=cache (the default: no second model)")
    if reference == "auto":
        return "cache" if not lora or caches_ready else "adapters_off"
    return reference


def file_digest(paths: list[str], known: dict | None = None) -> tuple[str, dict]:
    """A digest of files' contents, and each file's (size, mtime_ns, hash); a file whose size and time match `known`
    keeps its known hash (a 60 GB model is hashed once, not at every run)."""
    from ..checkpoint.files import file_hash

    known, stats, combined = known or {}, {}, hashlib.blake2b(digest_size=16)
    for path in sorted(paths):
        info = os.stat(path)
        entry = known.get(path)
        digest = entry[2] if entry and entry[:2] == [info.st_size, info.st_mtime_ns] else file_hash(path)
        stats[path] = [info.st_size, info.st_mtime_ns, digest]
        combined.update(f"{os.path.basename(path)}:{digest};".encode())
    return combined.hexdigest(), stats


def model_fingerprint(cfg, tokenizer_size: int, device: str, known: dict | None = None) -> tuple[dict, dict]:
    """What the reference model's weights are: a digest of its directory's weights (an adapter's too), or the preset,
    seed and device it is built from (the same random weights every time)."""
    if not cfg.finetune_from_ckp_file:
        return {"preset": f"{cfg.model_type}/{cfg.model_preset}", "seed": cfg.seed, "vocabulary": tokenizer_size,
                "built_on": device}, {}
    folder = os.path.abspath(cfg.finetune_from_ckp_file)
    files = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith((".safetensors", ".json"))
             and not n.startswith(("tokenizer", "special_tokens", "train_config"))]
    from ..model.adapters import adapter_base_dir, is_adapter_dir

    if is_adapter_dir(folder):
        base = os.path.abspath(adapter_base_dir(folder))
        files += [os.path.join(base, n) for n in os.listdir(base) if n.endswith((".safetensors", "config.json"))]
    digest, stats = file_digest(files, known)
    return {"weights": digest, "vocabulary": tokenizer_size}, stats


class Reference:
    """The reference log-probabilities of a micro-batch's pairs, and how many forward passes they took."""

    def __init__(self, kind: str, accelerator, copy_of_model=None, source: str = ""):
        self.kind, self.accelerator, self.copy, self.source = kind, accelerator, copy_of_model, source
        self.forward_passes = 0
        self.settings: dict = {}  # what a cache's numbers depend on (cache_settings)

    def describe(self) -> str:
        held = {"cache": "log-probabilities cached beside the data (no second model)",
                "adapters_off": "this model with its adapters off (no second model)",
                "model": "a frozen copy of the starting model"}
        if self.kind == "none":
            return "no reference"
        return f"reference: {held[self.kind]}{', ' + self.source if self.source else ''}"

    def sums(self, model, batch) -> torch.Tensor:
        """[pairs, 2] summed log-probabilities (chosen, rejected) under the reference."""
        if self.kind == "cache":
            values = batch.extra["reference"]
            if torch.isnan(values).any():
                raise UserError("a pair has no reference log-probabilities in the cache; compute the cache anew")
            return values.float()
        return self.compute(model, batch)

    @torch.no_grad()
    def compute(self, model, batch) -> torch.Tensor:
        self.forward_passes += 1
        target = self.copy if self.kind == "model" else model
        unwrapped = self.accelerator.unwrap_model(target)
        was_training = unwrapped.training
        unwrapped.eval()  # no dropout in the reference, here as in the cache
        try:
            n = batch.loss_units
            if self.kind == "adapters_off" or (self.kind == "cache" and hasattr(unwrapped, "disable_adapter")):
                with unwrapped.disable_adapter():
                    sums, _ = document_sums(target, batch, 2 * n)
            else:
                sums, _ = document_sums(target, batch, 2 * n)
        finally:
            unwrapped.train(was_training)
        return torch.stack([sums[:n], sums[n:]], dim=1)


def frozen_copy(model):
    """A frozen copy of the starting model for --reference=model."""
    duplicate = copy.deepcopy(model).eval()
    duplicate.requires_grad_(False)
    return duplicate


def data_fingerprint(dataset) -> dict:
    paths = [os.path.abspath(p) for p in dataset.spec.paths]
    return {"files": paths, "bytes": [os.path.getsize(p) for p in paths],
            "mtime_ns": [os.stat(p).st_mtime_ns for p in paths], "columns": dataset.source.columns}


def ensure_caches(data, model, accelerator, channel, settings: dict, cache_dir: str, options, tokenizer,
                  log, layout=None, cut=lambda batch: batch) -> tuple[dict, int]:
    """Every dataset's reference cache, computed where missing or unfinished (each data-parallel rank its share of
    the rows, a progress bar on the main process), refused where it was computed for other settings. Every process
    calls this, with the model as training will start from it; under sequence parallelism the processes of a group
    compute the same rows, each its part (`cut`), and one writes them. Returns (each dataset's cache by name,
    forward passes run)."""
    rank, world, writes = (layout.data_rank, layout.data_world, layout.reports) if layout is not None else \
        (accelerator.process_index, accelerator.num_processes, True)
    from ..data.pairs import EncodedPair, PairEncoder, collate_packed_pairs, collate_pairs
    from ..data.sources import open_dataset

    caches, datasets = {}, data.datasets + [d for d, _ in data.validation]
    reference = Reference("cache", accelerator)
    remembered = {"weight_files": settings.get("weight_files", {})}
    settings = {k: v for k, v in settings.items() if k != "weight_files"}
    for dataset in datasets:
        cache = ReferenceCache(ReferenceCache.prefix_for(dataset.spec.paths, dataset.name, cache_dir))
        fingerprint = {**settings, "data": data_fingerprint(dataset)}

        def prepare():
            return cache.prepare(fingerprint, dataset.source.num_samples, remembered, log)

        if channel.on_main(accelerator.is_main_process, prepare):
            caches[dataset.name] = cache
            continue
        ordered = open_dataset(dataset.spec, options, tokenizer, shuffle=False, flag="train_file", log=lambda _: None)
        encoder = PairEncoder(tokenizer, options.max_seq_len, False, dataset.spec.paths[0])
        pending = cache.pending_rows()[rank::world]
        per_batch = max(1, options.batch_size)
        batches = [pending[i:i + per_batch] for i in range(0, len(pending), per_batch)]
        rounds = int(channel.gather([len(batches)])[:, 0].max())  # ZeRO-3 gathers weights in every process at once
        from tqdm import tqdm

        bar = tqdm(total=rounds, desc=f"reference log-probabilities of '{dataset.name}'", unit="batch",
                   disable=not accelerator.is_main_process, dynamic_ncols=True)
        filler = EncodedPair([data.pad_id], [data.pad_id], [data.pad_id])  # keeps an idle process in step
        for r in range(rounds):
            rows = [int(row) for row in batches[r]] if r < len(batches) else []
            encoded = encoder.encode_many([_row(ordered.source, row) for row in rows], rows)
            usable = [e for e in encoded if isinstance(e, EncodedPair)]
            if layout is not None and layout.sequence_parallel > 1:  # a pair a row: Ulysses' one micro-batch size
                batch = collate_packed_pairs([[(p, 0), (p, 1)] for p in usable or [filler]], data.pad_id, 0, 0)
            else:
                batch = collate_pairs(usable or [filler], data.pad_id, 0)
            batch = cut(batch).on(accelerator.device)
            found = iter(reference.compute(model, batch).tolist())
            if rows and writes:
                cache.write(rows, [tuple(next(found)) if isinstance(e, EncodedPair) else None for e in encoded])
            bar.update(1)
        bar.close()
        channel.gather([0])  # every process has written its rows
        if accelerator.is_main_process:
            if len(cache.pending_rows()):
                raise UserError(f"reference cache '{cache.header_path}' still has rows to compute; run again")
            cache.finish()
        channel.gather([0])
        caches[dataset.name] = cache
        log(f"reference cache {cache.prefix}: {dataset.source.num_samples} rows, computed in {rounds} forward passes "
            "per process")
    return caches, reference.forward_passes


def _row(source, row: int) -> dict:
    sample = source.sample(0, row)  # file order: shuffle is off
    return {k: v for k, v in sample.items() if not k.startswith("_")}


def cache_settings(cfg, tokenizer, device: str, known: dict | None = None) -> tuple[dict, dict]:
    """(what a reference cache's numbers depend on besides the data, the weight files' stats to remember)."""
    from ..data.pairs import TRUNCATION
    from ..data.sft_cache import template_hash, tokenizer_hash

    model, stats = model_fingerprint(cfg, len(tokenizer), device, known)
    folder = str(tokenizer.name_or_path)
    return {"reference_model": model, "tokenizer": tokenizer_hash(folder) if os.path.isdir(folder) else folder,
            "chat_template": template_hash(tokenizer), "max_seq_len": cfg.max_seq_len, "truncation": TRUNCATION}, stats


def preference_objective(cfg, model, data, accelerator, tokenizer, sharded: bool):
    """The preference loss of this run with its reference chosen (lowmem/train/preference.py, `choose` above)."""
    from ..model.adapters import adapter_base_dir, is_adapter_dir, uses_lora
    from .preference import PreferenceLoss, PreferenceSettings

    settings = PreferenceSettings(cfg.preference_loss, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma,
                                  cfg.orpo_lambda, cfg.preference_sft_weight)
    fingerprint, ready = {}, False
    if settings.uses_reference:
        caches = [ReferenceCache(ReferenceCache.prefix_for(d.spec.paths, d.name, cfg.reference_cache_dir))
                  for d in data.datasets + [d for d, _ in data.validation]]
        known = next((c.header().get("weight_files") for c in caches if c.header()), None)
        fingerprint, stats = cache_settings(cfg, tokenizer, accelerator.device.type, known)
        ready = all(c.complete and not c.differences({**fingerprint, "data": data_fingerprint(d)})
                    for c, d in zip(caches, data.datasets + [d for d, _ in data.validation]))
    kind = choose(cfg.reference, settings.uses_reference, uses_lora(cfg), sharded, ready)
    duplicate = frozen_copy(model).to(accelerator.device) if kind == "model" else None
    start = cfg.finetune_from_ckp_file
    if not start:
        source = f"the {cfg.model_type}/{cfg.model_preset} preset's starting weights"
    elif is_adapter_dir(start):
        source = f"the adapters of {start} merged into their base {adapter_base_dir(start)}"
    else:
        source = f"the model of {start}"
    reference = Reference(kind, accelerator, duplicate, source)
    reference.settings = {**fingerprint, "weight_files": stats} if settings.uses_reference else {}
    return PreferenceLoss(settings, reference)
