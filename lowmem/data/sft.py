"""User-modeling records as a sample source: history, ablation prompts, per-user (re)sampling per epoch.

Records (schema in lowmem/data/usermodel.py) are read once into memory: user-modeling corpora are
small (tens to hundreds of thousands of records) and history building needs each user's items.
Each epoch's sample list is a pure function of (sample_seed, epoch), so resume stays exact.
"""
from __future__ import annotations

from ..run.errors import UserError
from .options import DataOptions
from .stream import epoch_rng
from .template import build_messages, encode_prompt
from .user_prompts import fit_prompt
from .usermodel import (
    build_history,
    describe_skips,
    format_summary,
    read_records,
    sample_per_user,
    split_train_val,
    summarize,
)


class UserRecordSource:
    """Prompt/response samples built from records; with max_samples_per_user, at most N per user."""

    def __init__(self, records, options: DataOptions, tokenizer, is_encoder_decoder: bool, shuffle: bool = True,
                 resample: bool = True):
        self.records, self.options, self.shuffle = records, options, shuffle
        self.cap = options.records.max_samples_per_user if resample else None
        self.tokenizer, self.is_encoder_decoder = tokenizer, is_encoder_decoder
        self.num_samples = len(self.chosen(0))
        self._epoch: tuple | None = None
        self.held_out = None  # the validation part when --val_ratio splits the records
        self.empty_shards: list[str] = []

    def chosen(self, epoch: int):
        if self.cap is None:
            return self.records
        rec = self.options.records
        return sample_per_user(self.records, self.cap, rec.sample_seed, epoch if rec.resample_each_epoch else None)

    def _fits(self, response_len: int):
        budget = self.options.max_seq_len - response_len

        def fits(prompt: str) -> bool:
            return len(encode_prompt(self.tokenizer, build_messages(prompt), self.is_encoder_decoder)) <= budget
        return fits

    def sample(self, epoch: int, index: int) -> dict:
        """The index-th sample of the epoch's seeded order (the per-user choice is made per epoch)."""
        if self._epoch is None or self._epoch[0] != epoch:
            chosen = self.chosen(epoch)
            order = epoch_rng(self.options.seed, epoch).permutation(len(chosen)) if self.shuffle else range(len(chosen))
            self._epoch = (epoch, chosen, [int(i) for i in order])
        _, chosen, order = self._epoch
        record = chosen[order[index]]
        response_len = len(self.tokenizer(record.target, add_special_tokens=False)["input_ids"]) + 2
        rec = self.options.records
        prompt, dropped = fit_prompt(record, rec.ablation_config, rec.prompt_style, self._fits(response_len),
                                     rec.max_history_items)
        notes = {"history_cut": 1, "history_items_dropped": dropped} if dropped else {}
        return {"prompt": prompt, "response": record.target, "_notes": notes}


def open_records(paths: list[str], options: DataOptions, tokenizer, is_encoder_decoder: bool, shuffle: bool = True,
                 log=print) -> UserRecordSource:
    """Records of one dataset as a sample source; for training with --val_ratio, `held_out` holds the validation part.

    The record options' choices and ranges are checked with the config (lowmem/train/validate.py).
    """
    rec = options.records
    records, skips = [], {}
    for path in paths:
        more, more_skips = read_records(path, strict=options.strict)
        records += more
        for reason, count in more_skips.items():
            skips[reason] = skips.get(reason, 0) + count
    if not records:
        raise UserError(f"'{paths[0]}' has no usable records (skipped: {describe_skips(skips)})")
    records = build_history(records, rec.max_history_items)
    validation = None
    if shuffle and rec.val_ratio > 0:  # an explicit split wins over a preset's validation_file
        records, validation, report = split_train_val(records, rec.val_ratio, rec.split_by, options.seed)
        log(f"validation split by {rec.split_by}: {report}")
    source = UserRecordSource(records, options, tokenizer, is_encoder_decoder, shuffle=shuffle, resample=shuffle)
    if shuffle:
        log(f"records: skipped {describe_skips(skips)}\n{format_summary(summarize(records, source.chosen(0)))}")
    if validation:
        source.held_out = UserRecordSource(validation, options, tokenizer, is_encoder_decoder, shuffle=False,
                                           resample=False)
    return source
