"""Train a byte-level BPE tokenizer locally (Chinese and English, digits split) and load tokenizer dirs."""
from __future__ import annotations

import os
from typing import Iterable

from ..run.errors import UserError
from .template import END_OF_TEXT, PAD, PROJECT_CHAT_TEMPLATE, SPECIAL_TOKENS


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, min_frequency: int = 2):
    """Train on an iterator of texts and save a `transformers`-loadable tokenizer to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise UserError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least 300")
    tokenizer = Tokenizer(models.BPE())
    # digits one by one, so numbers are composed rather than memorised whole
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = PROJECT_CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(tokenizer_dir: str):
    """Load a local tokenizer directory; a missing or unreadable one is a UserError."""
    from transformers import AutoTokenizer

    if not os.path.isdir(tokenizer_dir):
        raise UserError(f"tokenizer_dir '{tokenizer_dir}' does not exist; train one with "
                        "`train_low_mem.py prepare train_tokenizer` or point --tokenizer_dir at a local tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # transformers raises many types for a broken dir
        raise UserError(f"tokenizer_dir '{tokenizer_dir}' could not be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); it needs tokenizer.json or "
                        "the files save_pretrained writes") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
