"""Turn command-line words into validated values, and the checks every command shares.

Fire 0.7 neither coerces values to annotated types nor rejects unknown keys, so this module does
both: each value is converted through its field's type (a `Literal[...]` field accepts only its
choices), and an unknown, mistyped or repeated flag is a UserError naming the closest valid names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import typing

from ..fields import choice_error, field_types, type_name
from ..run.errors import UserError

# names other trainers use for our fields; accepted and mapped
ALIASES = {"max_epochs": "epochs", "lr": "learn_rate", "learning_rate": "learn_rate"}
# set by launchers; accepted and ignored
LAUNCHER_FLAGS = {"local_rank", "local-rank"}
SELECTORS = ("config", "use_large_config", "use_small_config", "is_finetune")
HELP_FLAGS = ("--help", "-h")
_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}
TORCHAO_LOGGERS = ("torchao", "torch.utils._pytree")  # torchao's import registers enums torch warns about
DEEPSPEED_LOGGERS = ("DeepSpeed",)
DATASET_EXAMPLE = '\'[{"path": "data/a.parquet", "weight": 0.7}, {"path": "data/b.parquet", "weight": 0.3}]\''


def closest(name: str, valid: typing.Iterable[str], prefix: str = "--") -> str:
    """'did you mean: --a, --b' for the near names, else a pointer to --help."""
    matches = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    return f"did you mean: {', '.join(prefix + m for m in matches)}" if matches else "see --help for the list"


def _convert_choice(name: str, value, choices: tuple):
    for choice in choices:
        same_text = not isinstance(value, bool) and not isinstance(choice, bool) and str(value) == str(choice)
        if value == choice or same_text:  # Fire hands `--x=2` as a number and `--x=two` as text
            return choice
        if isinstance(choice, bool) and isinstance(value, str) and value.strip().lower() in (_TRUE if choice else _FALSE):
            return choice  # `--x=true` for a choice of auto|True|False, as a plain bool flag takes it
    raise choice_error(name, value, choices)


def _convert_mappings(name: str, value) -> list[dict]:
    """A list of mappings, from a config file or a JSON string on the command line."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise UserError(f"--{name} is not valid JSON ({exc.msg} at character {exc.pos}); pass a list of "
                            f"mappings such as {DATASET_EXAMPLE}, or set it in a --config file") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
        raise UserError(f"--{name} expects a list of mappings such as {DATASET_EXAMPLE}; got {value!r}")
    return [dict(item) for item in value]


def _convert_scalar(value, type_):
    if type_ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if isinstance(value, (int, str)) and text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError
    if type_ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value) if isinstance(value, (int, float)) else int(str(value).strip())
    if type_ is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if type_ is str:
        if isinstance(value, tuple):  # Fire splits `a,b` into a tuple; the text had commas
            return ",".join(str(v) for v in value)
        if isinstance(value, (list, dict)):
            raise ValueError
        # Fire turns numeric-looking text into numbers; a str field takes them back as text
        return value if isinstance(value, str) else str(value)
    return value


def convert(name: str, value, type_):
    """Convert one flag value to its field type or raise a UserError naming the flag."""
    origin, args = typing.get_origin(type_), typing.get_args(type_)
    if type(None) in args:  # Optional[T]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        type_ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(type_), typing.get_args(type_)
    if origin is typing.Literal:
        return _convert_choice(name, value, args)
    if origin is list and args and args[0] is dict:
        return _convert_mappings(name, value)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [_convert_scalar(v, args[0] if args else str) for v in value]
        return _convert_scalar(value, type_)
    except (ValueError, TypeError):
        raise UserError(f"--{name} expects {type_name(type_)}, got {value!r}") from None


def load_config_file(path: str) -> dict:
    """Field values from a JSON or YAML file."""
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' does not exist; pass a preset name or a JSON/YAML file path")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as exc:  # json and yaml raise different types
        raise UserError(f"config file '{path}' is not valid JSON/YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file '{path}' must hold a mapping of field names to values")
    return values


def canonical_name(raw_name: str, known: typing.Container[str] = ()) -> str:
    """The field a flag sets: aliases mapped, '-' read as '_'."""
    if raw_name in known:
        return raw_name
    name = raw_name.replace("-", "_")
    return ALIASES.get(name, name)


def build(cls, values: dict, source: str = "flag"):
    """An instance of dataclass `cls` with `values` applied; unknown names and bad types are errors."""
    types = field_types(cls)
    converted = {}
    for raw_name, value in values.items():
        name = canonical_name(raw_name, types)
        if name not in types:
            where = f"unknown {source} --{raw_name}" if source == "flag" else f"unknown field '{raw_name}' in {source}"
            raise UserError(f"{where}; {closest(name, types)}")
        converted[name] = convert(name, value, types[name])
    return cls(**converted)


# ---------------------------------------------------------------- flags of the whole command line

def _flag_words(args: typing.Sequence[str]) -> list[tuple[str, str]]:
    """(flag name, the words that gave it) for each --flag in args, up to Fire's own `--` separator."""
    found = []
    for index, word in enumerate(args):
        if word == "--":
            break
        if not word.startswith("--") or len(word) == 2:
            continue
        name, has_value, _ = word[2:].partition("=")
        following = args[index + 1] if index + 1 < len(args) else None
        shown = word if has_value or following is None or following.startswith("--") else f"{word} {following}"
        found.append((name, shown))
    return found


def check_repeated_flags(args: typing.Sequence[str], aliases: bool = True) -> None:
    """A UserError for a flag given twice: Fire would silently keep the last value.

    `--lr`, `--learning_rate` and `--learn_rate` are one flag (with `aliases`), and so are `--a-b` and `--a_b`.
    """
    seen: dict[str, list[str]] = {}
    for raw_name, shown in _flag_words(args):
        name = canonical_name(raw_name) if aliases else raw_name.replace("-", "_")
        if name in LAUNCHER_FLAGS or f"--{name}" in HELP_FLAGS:
            continue
        seen.setdefault(name, []).append(shown)
    for name, given in seen.items():
        if len(given) > 1:
            times = "twice" if len(given) == 2 else f"{len(given)} times"
            raise UserError(f"--{name} is given {times} ({', '.join(given)}); pass it once")


def check_no_positionals(command: str, args: typing.Sequence[str]) -> None:
    """A UserError for a word that is neither a --flag nor the value of the --flag before it: Fire would hand it to
    the command's result after the whole run (a train that trained and exported, then failed)."""
    expects_value = False
    for word in args:
        if word == "--":
            break
        if word.startswith("-") and not _is_number(word):
            expects_value = word.startswith("--") and "=" not in word and word not in HELP_FLAGS
            continue
        if not expects_value:
            raise UserError(f"`{command}` takes only --flag=value arguments; '{word}' is not one (a value needs its "
                            f"flag: --name={word})")
        expects_value = False


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def wants_help(args: typing.Sequence[str]) -> bool:
    return any(word in HELP_FLAGS for word in args)


def reject_unknown_flags(command: str, known: typing.Sequence[str], unknown: dict) -> None:
    """A UserError naming the first unknown flag of `command` and the closest known ones."""
    if not unknown:
        return
    name = sorted(unknown)[0]
    guesses = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = (f"did you mean: {', '.join('--' + g for g in guesses)}" if guesses
            else f"valid flags: {', '.join('--' + k for k in known)}")
    raise UserError(f"unknown flag --{name} for `{command}`; {hint}")


def explicit_flags(function) -> list[str]:
    """The named parameters of a command function (not its **unknown)."""
    return [name for name, p in inspect.signature(function).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"]


def command_help(command: str, function, meanings: dict[str, str]) -> str:
    """A command's usage from its signature: each flag with its default (or 'required') and meaning."""
    lines = [f"usage: train_low_mem.py {command} [--flag=value ...]", "",
             (inspect.getdoc(function) or "").strip(), "", "flags:"]
    for name, param in inspect.signature(function).parameters.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or name == "self":
            continue
        default = "required" if param.default is inspect.Parameter.empty else f"default: {param.default!r}"
        lines.append(f"  --{name:<22} {default}")
        if meanings.get(name):
            lines.append(f"      {meanings[name]}")
    return "\n".join(lines)


# ---------------------------------------------------------------- third-party import notices

class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_loggers(names: typing.Iterable[str]):
    """Hide warnings and below of the named loggers and their children for the duration; errors still show.

    The level covers child loggers (torchao.kernel...); the filter covers a package that sets its own
    logger's level while it is imported (DeepSpeed), and that level is left as the package set it.
    """
    drop = _BelowError()
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addFilter(drop)
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, before):
            logger.removeFilter(drop)
            if logger.level == logging.ERROR:
                logger.setLevel(level)


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def import_quietly(module: str, loggers: typing.Iterable[str]) -> None:
    """Import `module` now with the named loggers quiet; later imports of it reuse the loaded module."""
    with quiet_loggers(loggers):
        importlib.import_module(module)


def import_models_quietly() -> None:
    """Import transformers' modeling code now, with installed torchao's import-time notices hidden.

    For runs that do not use torchao: transformers imports it whenever it is installed (its quantizer
    registry), and torchao logs each CUDA extension it cannot load and triggers torch `_pytree`
    deprecation warnings.
    """
    if installed("torchao") and installed("transformers"):
        import_quietly("transformers.modeling_utils", TORCHAO_LOGGERS)


def import_deepspeed_quietly() -> None:
    """Import an installed deepspeed now with its import-time notices hidden, for runs that do not use it.

    Accelerate's `unwrap_model` imports deepspeed whenever it is installed, and DeepSpeed logs
    "Setting accelerator to CPU" on every machine without CUDA.
    """
    if installed("deepspeed"):
        import_quietly("deepspeed", DEEPSPEED_LOGGERS)


# ---------------------------------------------------------------- the training config from its flags

def resolve_config(kwargs: dict):
    """The TrainConfig the flags of `train` (and `show_config`, `prepare reference`) ask for; its values are checked
    by validate.check_config."""
    from config import TRAIN_PRESETS, TrainConfig, TrainConfigPretrainLarge, TrainConfigSFT, TrainConfigSFTSmall

    # the preset from --config or the selectors, then the config file and the flags, then the values checked
    kwargs = {k: v for k, v in kwargs.items() if k not in LAUNCHER_FLAGS}
    config_arg = kwargs.pop("config", None)
    large = build(_Selectors, {"use_large_config": kwargs.pop("use_large_config", False)}).use_large_config
    small = build(_Selectors, {"use_small_config": kwargs.pop("use_small_config", False)}).use_small_config
    finetune = build(_Selectors, {"is_finetune": kwargs.get("is_finetune", False)}).is_finetune
    if large and small:
        raise UserError("--use_large_config and --use_small_config contradict each other; pass one")
    if large and finetune:
        raise UserError("--use_large_config (pretraining) contradicts --is_finetune; for SFT use --is_finetune=True "
                        "alone or with --use_small_config=True")
    if small and not finetune:
        raise UserError("--use_small_config selects the small SFT preset; pass it with --is_finetune=True")
    if config_arg is not None and (large or small):
        raise UserError("--config and --use_large_config/--use_small_config both choose a preset; pass one of them")
    file_values: dict = {}
    if large:
        cls = TrainConfigPretrainLarge
    elif small:
        cls = TrainConfigSFTSmall
    elif finetune:
        cls = TrainConfigSFT
    else:
        cls = TrainConfig
    if config_arg is not None:
        name = str(config_arg)
        if name in TRAIN_PRESETS:
            cls = TRAIN_PRESETS[name]
        elif name.endswith((".json", ".yaml", ".yml")) or os.path.sep in name:
            file_values = load_config_file(name)
            base = file_values.pop("preset", None)
            if base is not None:
                if base not in TRAIN_PRESETS:
                    raise UserError(f"preset '{base}' in {name} does not exist; choose one of {', '.join(TRAIN_PRESETS)}")
                cls = TRAIN_PRESETS[base]
        else:
            raise UserError(f"--config '{name}' is neither a preset nor a .json/.yaml file; presets: "
                            f"{', '.join(TRAIN_PRESETS)}; {closest(name, TRAIN_PRESETS, prefix='')}")
    cfg = build(cls, file_values, source=f"'{config_arg}'") if file_values else cls()
    return build(type(cfg), {**dataclasses.asdict(cfg), **kwargs})


@dataclasses.dataclass
class _Selectors:
    use_large_config: bool = False
    use_small_config: bool = False
    is_finetune: bool = False
