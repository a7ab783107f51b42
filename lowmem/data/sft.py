"""User-modeling records as a sample source: history, ablation prompts, per-user (re)sampling per epoch.

Records (schema in lowmem/data/usermodel.py) are read once into memory: user-modeling corpora are
small (tens to hundreds of thousands of records) and history building needs each user's items.
Each epoch's sample list is a pure function of (sample_seed, epoch), so resume stays exact.
"""
from __future__ import annotations

from typing import Iterator

from config import TrainConfig

from ..errors import UserError
from ..template import build_messages, encode_prompt
from .stream import epoch_rng
from .user_prompts import ABLATIONS, PROMPT_STYLES, fit_prompt
from .usermodel import (SPLIT_MODES, build_history, describe_skips, format_summary, read_records, sample_per_user,
                        split_train_val, summarize)


def is_record_file(path: str) -> bool:
    """jsonl files, and parquet files with user_id and target columns, hold user-modeling records."""
    if path.endswith(".jsonl"):
        return True
    if path.endswith(".parquet"):
        from .stream import open_parquet

        names = set(open_parquet(path).schema_arrow.names)
        return {"user_id", "target"} <= names
    return False


class UserRecordSource:
    """Prompt/response samples built from records; with max_samples_per_user, at most N per user."""

    def __init__(self, records, cfg: TrainConfig, tokenizer, is_encoder_decoder: bool, shuffle: bool = True,
                 resample: bool = True):
        self.records, self.cfg, self.shuffle = records, cfg, shuffle
        self.cap = cfg.max_samples_per_user if resample else None
        self.tokenizer, self.is_encoder_decoder = tokenizer, is_encoder_decoder
        self.num_samples = len(self.chosen(0))

    def chosen(self, epoch: int):
        if self.cap is None:
            return self.records
        return sample_per_user(self.records, self.cap, self.cfg.sample_seed,
                               epoch if self.cfg.resample_each_epoch else None)

    def _fits(self, response_len: int):
        budget = self.cfg.max_seq_len - response_len

        def fits(prompt: str) -> bool:
            return len(encode_prompt(self.tokenizer, build_messages(prompt), self.is_encoder_decoder)) <= budget
        return fits

    def iter_shard(self, epoch: int, rank: int, world: int, start: int = 0) -> Iterator[tuple[int, dict]]:
        chosen = self.chosen(epoch)
        order = epoch_rng(self.cfg.seed, epoch).permutation(len(chosen)) if self.shuffle else range(len(chosen))
        mine = list(order)[rank::world]
        for position in range(start, len(mine)):
            record = chosen[int(mine[position])]
            response_len = len(self.tokenizer(record.target, add_special_tokens=False)["input_ids"]) + 2
            prompt = fit_prompt(record, self.cfg.ablation_config, self.cfg.prompt_style, self._fits(response_len),
                                self.cfg.max_history_items)
            yield position, {"prompt": prompt, "response": record.target}


def check_options(cfg: TrainConfig) -> None:
    if cfg.ablation_config not in ABLATIONS:
        raise UserError(f"ablation_config '{cfg.ablation_config}' is unknown; choose one of {', '.join(ABLATIONS)}")
    if cfg.prompt_style not in PROMPT_STYLES:
        raise UserError(f"prompt_style '{cfg.prompt_style}' is unknown; choose one of {', '.join(PROMPT_STYLES)}")
    if cfg.split_by not in SPLIT_MODES:
        raise UserError(f"split_by '{cfg.split_by}' is unknown; choose one of {', '.join(SPLIT_MODES)}")
    if cfg.max_samples_per_user is not None and cfg.max_samples_per_user < 1:
        raise UserError(f"--max_samples_per_user={cfg.max_samples_per_user} must be at least 1 (or None for no cap)")
    if not 0.0 <= cfg.val_ratio < 1.0:
        raise UserError(f"--val_ratio={cfg.val_ratio} must be in [0, 1)")


def open_record_sources(cfg: TrainConfig, tokenizer, is_encoder_decoder: bool, log) -> tuple:
    """(train source, validation source or None) from record files, with the start-up summary logged."""
    check_options(cfg)
    records, skips = read_records(cfg.train_file, strict=cfg.strict)
    if not records:
        raise UserError(f"'{cfg.train_file}' has no usable records (skipped: {describe_skips(skips)})")
    records = build_history(records, cfg.max_history_items)
    validation = None
    if cfg.val_ratio > 0:  # an explicit split wins over a preset's validation_file
        records, validation, report = split_train_val(records, cfg.val_ratio, cfg.split_by, cfg.seed)
        log(f"validation split by {cfg.split_by}: {report}")
    elif cfg.validation_file:
        val_records, _ = read_records(cfg.validation_file, strict=cfg.strict)
        validation = build_history(val_records, cfg.max_history_items)
    train = UserRecordSource(records, cfg, tokenizer, is_encoder_decoder)
    log(f"records: skipped {describe_skips(skips)}\n{format_summary(summarize(records, train.chosen(0)))}")
    val_source = None
    if validation:
        val_source = UserRecordSource(validation, cfg, tokenizer, is_encoder_decoder, shuffle=False, resample=False)
    return train, val_source
