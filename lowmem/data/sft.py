"""User-modeling records as a sample source: history, ablation prompts, per-user (re)sampling per epoch.

Records (schema in lowmem/data/usermodel.py) are read once into memory: user-modeling corpora are
small (tens to hundreds of thousands of records) and history building needs each user's items.
Each epoch's sample list is a pure function of (sample_seed, epoch), so resume stays exact.
"""
from __future__ import annotations

from config import TrainConfig

from ..errors import UserError
from ..template import build_messages, encode_prompt
from .stream import epoch_rng
from .user_prompts import ABLATIONS, PROMPT_STYLES, fit_prompt
from .usermodel import (SPLIT_MODES, build_history, describe_skips, format_summary, read_records, sample_per_user,
                        split_train_val, summarize)


class UserRecordSource:
    """Prompt/response samples built from records; with max_samples_per_user, at most N per user."""

    def __init__(self, records, cfg: TrainConfig, tokenizer, is_encoder_decoder: bool, shuffle: bool = True,
                 resample: bool = True):
        self.records, self.cfg, self.shuffle = records, cfg, shuffle
        self.cap = cfg.max_samples_per_user if resample else None
        self.tokenizer, self.is_encoder_decoder = tokenizer, is_encoder_decoder
        self.num_samples = len(self.chosen(0))
        self._epoch: tuple | None = None
        self.held_out = None  # the validation part when --val_ratio splits the records
        self.empty_shards: list[str] = []

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

    def sample(self, epoch: int, index: int) -> dict:
        """The index-th sample of the epoch's seeded order (the per-user choice is made per epoch)."""
        if self._epoch is None or self._epoch[0] != epoch:
            chosen = self.chosen(epoch)
            order = epoch_rng(self.cfg.seed, epoch).permutation(len(chosen)) if self.shuffle else range(len(chosen))
            self._epoch = (epoch, chosen, [int(i) for i in order])
        _, chosen, order = self._epoch
        record = chosen[order[index]]
        response_len = len(self.tokenizer(record.target, add_special_tokens=False)["input_ids"]) + 2
        prompt = fit_prompt(record, self.cfg.ablation_config, self.cfg.prompt_style, self._fits(response_len),
                            self.cfg.max_history_items)
        return {"prompt": prompt, "response": record.target}


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


def open_records(paths: list[str], cfg: TrainConfig, tokenizer, is_encoder_decoder: bool, shuffle: bool = True,
                 log=print) -> UserRecordSource:
    """Records of one dataset as a sample source; for training with --val_ratio, `held_out` holds the validation part."""
    check_options(cfg)
    records, skips = [], {}
    for path in paths:
        more, more_skips = read_records(path, strict=cfg.strict)
        records += more
        for reason, count in more_skips.items():
            skips[reason] = skips.get(reason, 0) + count
    if not records:
        raise UserError(f"'{paths[0]}' has no usable records (skipped: {describe_skips(skips)})")
    records = build_history(records, cfg.max_history_items)
    validation = None
    if shuffle and cfg.val_ratio > 0:  # an explicit split wins over a preset's validation_file
        records, validation, report = split_train_val(records, cfg.val_ratio, cfg.split_by, cfg.seed)
        log(f"validation split by {cfg.split_by}: {report}")
    source = UserRecordSource(records, cfg, tokenizer, is_encoder_decoder, shuffle=shuffle, resample=shuffle)
    if shuffle:
        log(f"records: skipped {describe_skips(skips)}\n{format_summary(summarize(records, source.chosen(0)))}")
    if validation:
        source.held_out = UserRecordSource(validation, cfg, tokenizer, is_encoder_decoder, shuffle=False,
                                           resample=False)
    return source
