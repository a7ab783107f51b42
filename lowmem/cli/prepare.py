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

from ..data.rawio import DEFAULT_ROW_GROUP_SIZE, as_list
from ..data.token_file import DEFAULT_CHUNK_ROWS
from ..run.errors import UserError
from .flags import HELP_FLAGS, command_help, explicit_flags, reject_unknown_flags

TOOLS = ("convert", "clean", "split", "stats", "train_tokenizer", "tokenize")
OTHER_TOOLS = {"reference": "compute the reference caches of a preference run (the same flags as its train command)"}

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


# one line per flag for `prepare <tool> --help`
MEANINGS = {
    "input": "the file to read (csv, json, jsonl, parquet or txt; clean/split/stats: parquet)",
    "output": "the parquet file to write (written to <output>.tmp, renamed when complete)",
    "output_dir": "the directory to write into",
    "output_prefix": "writes <output_prefix>.bin (tokens) and <output_prefix>.json (index)",
    "prompt_column": "source column (or jsonl field) that becomes `prompt`",
    "response_column": "source column that becomes `response`",
    "text_column": "source column that becomes `text` (instead of prompt/response)",
    "keep_columns": "extra columns copied as text, comma-separated (e.g. user_id for split --group_column)",
    "row_group_size": "rows per parquet row group (what the trainer's streaming reader holds at a time)",
    "strict": "a bad row is an error instead of being skipped and counted",
    "dedup": "also drop rows equal to an earlier one (memory grows with the unique rows)",
    "min_chars": "drop rows with a checked field shorter than this",
    "max_chars": "drop rows with a checked field longer than this; None: no limit",
    "columns": "the columns to use, comma-separated; default: every string column (tokenizer: text or prompt+response)",
    "valid_ratio": "share of rows (or groups) written to valid.parquet",
    "test_ratio": "share of rows (or groups) written to test.parquet; 0: no test file",
    "seed": "seed of the row (or group) hash and of the sample",
    "group_column": "keep all rows with the same value of this column in one split (e.g. user_id)",
    "tokenizer_dir": "a tokenizer directory; stats then also counts tokens",
    "histogram_png": "save a histogram of the lengths to this PNG file",
    "vocab_size": "vocabulary entries to learn, special tokens included (at least 300)",
    "sample_rows": "at most this many rows, drawn uniformly, train the tokenizer",
    "num_workers": "tokenizer processes; default: every core",
    "chunk_rows": "rows per chunk written at once (the unit of resume)",
    "max_seq_len": "SFT data: the training run's max_seq_len (long rows are cut or skipped when tokenizing)",
    "train_on": "conversations: all_assistant | last_assistant | all (as train --train_on)",
    "train_on_prompt": "prompt/response: the prompt carries the loss too (as train --train_on_prompt)",
    "messages_column": "source column holding conversations (messages or ShareGPT conversations)",
}


def _tools() -> dict:
    """Tool name -> method of PrepareCommands."""
    return {name: getattr(PrepareCommands, name) for name in TOOLS}


def prepare_help(tool: str | None = None) -> str:
    """The tools with one line each, or one tool's flags with their defaults and meanings."""
    if tool is None:
        lines = ["usage: train_low_mem.py prepare TOOL [--flag=value ...]", "", "tools:"]
        lines += [f"  {name:<16} {inspect.getdoc(method).splitlines()[0]}" for name, method in _tools().items()]
        lines += [f"  {name:<16} {meaning}" for name, meaning in OTHER_TOOLS.items()]
        lines += ["", "`train_low_mem.py prepare TOOL --help` lists the flags of a tool."]
        return "\n".join(lines)
    check_tool(tool)
    return command_help(f"prepare {tool}", _tools()[tool], MEANINGS)


def check_tool(word: str) -> None:
    """A UserError unless `word` names a prepare tool (or asks for help)."""
    if word in TOOLS or word in OTHER_TOOLS or word in HELP_FLAGS:
        return
    if word.startswith("-"):
        raise UserError(f"`prepare` needs a tool before its flags: {', '.join(TOOLS)}; e.g. prepare convert {word}")
    near = difflib.get_close_matches(word, TOOLS + tuple(OTHER_TOOLS), n=1, cutoff=0.5)
    hint = f"did you mean: {near[0]}? " if near else ""
    raise UserError(f"unknown prepare tool '{word}'; {hint}tools: {', '.join(TOOLS + tuple(OTHER_TOOLS))}")


def _stop_for_flags(method, unknown: dict) -> bool:
    """True after printing help for --help; a UserError for an unknown flag; False otherwise."""
    if not unknown:
        return False
    if "help" in unknown or "h" in unknown:
        print(prepare_help(method.__name__))
        return True
    reject_unknown_flags(f"prepare {method.__name__}", explicit_flags(method), unknown)
    return False


class PrepareCommands:
    """Data preparation: convert, clean, split, stats, train_tokenizer, tokenize."""

    def convert(self, input, output, prompt_column="prompt", response_column="response", text_column=None,
                keep_columns=None, row_group_size=DEFAULT_ROW_GROUP_SIZE, strict=False, **unknown):
        """csv/json/jsonl/parquet/txt -> parquet with prompt,response (or text with --text_column=NAME).

        --keep_columns=user_id copies extra columns as text; --strict makes a bad row an error.
        """
        if _stop_for_flags(self.convert, unknown):
            return
        from ..data.prepare import convert

        convert(_text("input", input), _text("output", output), _text("prompt_column", prompt_column),
                _text("response_column", response_column), _text("text_column", text_column, optional=True),
                as_list(keep_columns), _int("row_group_size", row_group_size), _bool("strict", strict))

    def clean(self, input, output, dedup=False, min_chars=0, max_chars=None, columns=None,
              row_group_size=DEFAULT_ROW_GROUP_SIZE, **unknown):
        """Drop null/empty/too short/too long (and with --dedup, repeated) rows; strip control characters."""
        if _stop_for_flags(self.clean, unknown):
            return
        from ..data.prepare import clean

        clean(_text("input", input), _text("output", output), _bool("dedup", dedup), _int("min_chars", min_chars),
              _int("max_chars", max_chars, optional=True), as_list(columns), _int("row_group_size", row_group_size))

    def split(self, input, output_dir, valid_ratio=0.05, test_ratio=0.0, seed=42, group_column=None,
              row_group_size=DEFAULT_ROW_GROUP_SIZE, **unknown):
        """Write output_dir/train.parquet (+ valid, test); --group_column=user_id keeps each group in one split."""
        if _stop_for_flags(self.split, unknown):
            return
        from ..data.prepare import split

        split(_text("input", input), _text("output_dir", output_dir), _float("valid_ratio", valid_ratio),
              _float("test_ratio", test_ratio), _int("seed", seed), _text("group_column", group_column, optional=True),
              _int("row_group_size", row_group_size))

    def stats(self, input, tokenizer_dir=None, histogram_png=None, columns=None, **unknown):
        """Rows, nulls and length percentiles (characters, tokens with --tokenizer_dir) of a parquet file."""
        if _stop_for_flags(self.stats, unknown):
            return
        from ..data.prepare import stats

        stats(_text("input", input), _text("tokenizer_dir", tokenizer_dir, optional=True),
              _text("histogram_png", histogram_png, optional=True), as_list(columns))

    def train_tokenizer(self, input, output_dir, vocab_size=8000, sample_rows=200_000, columns=None, seed=42,
                        strict=False, **unknown):
        """Train a byte-level BPE tokenizer on a sample of at most --sample_rows rows."""
        if _stop_for_flags(self.train_tokenizer, unknown):
            return
        from ..data.prepare import train_tokenizer

        train_tokenizer(_text("input", input), _text("output_dir", output_dir), _int("vocab_size", vocab_size),
                        _int("sample_rows", sample_rows), as_list(columns), _int("seed", seed), _bool("strict", strict))

    def tokenize(self, input, output_prefix, tokenizer_dir, text_column="text", num_workers=None,
                 chunk_rows=DEFAULT_CHUNK_ROWS, strict=False, max_seq_len=None, train_on="all_assistant",
                 train_on_prompt=False, prompt_column="prompt", response_column="response",
                 messages_column="messages", **unknown):
        """Tokenize once: text -> <output_prefix>.bin + .json for pretraining; SFT data (prompt/response or
        conversations) -> a tokenize-once cache for `train --train_file=<output_prefix>`. Rerun to resume."""
        if _stop_for_flags(self.tokenize, unknown):
            return
        from ..data.options import Columns, DataOptions
        from ..data.sources import open_dataset, parse_data_arg

        input = _text("input", input)
        columns = {"prompt_column": _text("prompt_column", prompt_column),
                   "response_column": _text("response_column", response_column),
                   "text_column": _text("text_column", text_column),
                   "messages_column": _text("messages_column", messages_column)}
        specs = parse_data_arg(input, "input")
        kind = open_dataset(specs[0], DataOptions(columns=Columns(**columns)), None, shuffle=False, flag="input",
                            log=lambda _: None).kind if len(specs) == 1 else "mixture"
        if kind == "text":
            from ..data.token_file import tokenize_to_bin

            tokenize_to_bin(input, _text("output_prefix", output_prefix), _text("tokenizer_dir", tokenizer_dir),
                            columns["text_column"], _int("num_workers", num_workers, optional=True),
                            _int("chunk_rows", chunk_rows), _bool("strict", strict))
            return
        if max_seq_len is None:
            raise UserError(f"--input '{input}' holds {kind.replace('_', '/')} data: a tokenize-once SFT cache needs "
                            "--max_seq_len (the training run's), since truncation is decided when tokenizing")
        from ..data.encoding import TRAIN_ON
        from ..data.sft_cache_build import build_sft_cache

        train_on = _text("train_on", train_on)
        if train_on not in TRAIN_ON:
            raise UserError(f"--train_on expects one of {', '.join(TRAIN_ON)}; got {train_on!r}")
        build_sft_cache(input, _text("output_prefix", output_prefix), _text("tokenizer_dir", tokenizer_dir),
                        _int("max_seq_len", max_seq_len), train_on, _bool("train_on_prompt", train_on_prompt), columns,
                        _int("num_workers", num_workers, optional=True), _bool("strict", strict))