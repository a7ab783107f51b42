"""`train_low_mem.py prepare <command> --flag=value`: the data tools as Fire commands.

Each method names its flags explicitly and collects the rest in `**unknown` only to reject them
before any work: Fire 0.7 calls a method with the flags it knows and complains about the others
only after the method returned (a typo in a tokenize flag would cost a whole run), and it passes
`--help` after other flags into **kwargs, where it prints the command's help here.
Fire does not convert values to the documented types (numeric-looking text arrives as a number),
so each value passes through a converter that raises a UserError naming the flag.
Summaries are printed by the tools; the methods return None so Fire prints nothing more.
"""
from __future__ import annotations

import difflib
import inspect

from .data.rawio import DEFAULT_ROW_GROUP_SIZE, as_list
from .data.token_file import DEFAULT_CHUNK_ROWS
from .errors import UserError

_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def _text(flag: str, value, optional: bool = False):
    if value is None:
        if optional:
            return None
        raise UserError(f"--{flag} needs a value")
    if isinstance(value, (list, tuple, dict)):
        raise UserError(f"--{flag} expects one text value, got {value!r}")
    return str(value)


def _int(flag: str, value, optional: bool = False):
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value) if isinstance(value, (int, float)) else int(str(value).strip())
    except (TypeError, ValueError):
        raise UserError(f"--{flag} expects a whole number, got {value!r}") from None


def _float(flag: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{flag} expects a number, got {value!r}") from None


def _bool(flag: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise UserError(f"--{flag} expects true or false, got {value!r}")


def _stop_for_flags(method, unknown: dict) -> bool:
    """True after printing help for --help; a UserError for an unknown flag; False otherwise."""
    if not unknown:
        return False
    known = [name for name in inspect.signature(method).parameters if name != "unknown"]
    if "help" in unknown or "h" in unknown:
        print(f"prepare {method.__name__}: {inspect.getdoc(method)}\nflags:")
        for name, param in inspect.signature(method).parameters.items():
            if name != "unknown":
                default = "required" if param.default is inspect.Parameter.empty else f"default: {param.default!r}"
                print(f"  --{name:<18} {default}")
        return True
    name = sorted(unknown)[0]
    guesses = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = (f"did you mean: {', '.join('--' + g for g in guesses)}" if guesses
            else f"valid flags: {', '.join('--' + k for k in known)}")
    raise UserError(f"unknown flag --{name} for `prepare {method.__name__}`; {hint}")


class PrepareCommands:
    """Data preparation: convert, clean, split, stats, train_tokenizer, tokenize."""

    def convert(self, input, output, prompt_column="prompt", response_column="response", text_column=None,
                keep_columns=None, row_group_size=DEFAULT_ROW_GROUP_SIZE, strict=False, **unknown):
        """csv/json/jsonl/parquet/txt -> parquet with prompt,response (or text with --text_column=NAME).

        --keep_columns=user_id copies extra columns as text; --strict makes a bad row an error.
        """
        if _stop_for_flags(self.convert, unknown):
            return
        from .data.prepare import convert

        convert(_text("input", input), _text("output", output), _text("prompt_column", prompt_column),
                _text("response_column", response_column), _text("text_column", text_column, optional=True),
                as_list(keep_columns), _int("row_group_size", row_group_size), _bool("strict", strict))

    def clean(self, input, output, dedup=False, min_chars=0, max_chars=None, columns=None,
              row_group_size=DEFAULT_ROW_GROUP_SIZE, **unknown):
        """Drop null/empty/too short/too long (and with --dedup, repeated) rows; strip control characters."""
        if _stop_for_flags(self.clean, unknown):
            return
        from .data.prepare import clean

        clean(_text("input", input), _text("output", output), _bool("dedup", dedup), _int("min_chars", min_chars),
              _int("max_chars", max_chars, optional=True), as_list(columns), _int("row_group_size", row_group_size))

    def split(self, input, output_dir, valid_ratio=0.05, test_ratio=0.0, seed=42, group_column=None,
              row_group_size=DEFAULT_ROW_GROUP_SIZE, **unknown):
        """Write output_dir/train.parquet (+ valid, test); --group_column=user_id keeps each group in one split."""
        if _stop_for_flags(self.split, unknown):
            return
        from .data.prepare import split

        split(_text("input", input), _text("output_dir", output_dir), _float("valid_ratio", valid_ratio),
              _float("test_ratio", test_ratio), _int("seed", seed), _text("group_column", group_column, optional=True),
              _int("row_group_size", row_group_size))

    def stats(self, input, tokenizer_dir=None, histogram_png=None, columns=None, **unknown):
        """Rows, nulls and length percentiles (characters, tokens with --tokenizer_dir) of a parquet file."""
        if _stop_for_flags(self.stats, unknown):
            return
        from .data.prepare import stats

        stats(_text("input", input), _text("tokenizer_dir", tokenizer_dir, optional=True),
              _text("histogram_png", histogram_png, optional=True), as_list(columns))

    def train_tokenizer(self, input, output_dir, vocab_size=8000, sample_rows=200_000, columns=None, seed=42,
                        strict=False, **unknown):
        """Train a byte-level BPE tokenizer on a sample of at most --sample_rows rows."""
        if _stop_for_flags(self.train_tokenizer, unknown):
            return
        from .data.prepare import train_tokenizer

        train_tokenizer(_text("input", input), _text("output_dir", output_dir), _int("vocab_size", vocab_size),
                        _int("sample_rows", sample_rows), as_list(columns), _int("seed", seed), _bool("strict", strict))

    def tokenize(self, input, output_prefix, tokenizer_dir, text_column="text", num_workers=None,
                 chunk_rows=DEFAULT_CHUNK_ROWS, strict=False, **unknown):
        """Tokenize text into <output_prefix>.bin + .json for pretraining; rerun the same command to resume."""
        if _stop_for_flags(self.tokenize, unknown):
            return
        from .data.token_file import tokenize_to_bin

        tokenize_to_bin(_text("input", input), _text("output_prefix", output_prefix),
                        _text("tokenizer_dir", tokenizer_dir), _text("text_column", text_column),
                        _int("num_workers", num_workers, optional=True), _int("chunk_rows", chunk_rows),
                        _bool("strict", strict))
