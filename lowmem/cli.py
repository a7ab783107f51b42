"""Turn Fire keyword arguments into a validated config dataclass.

Fire 0.7 neither coerces values to annotated types nor rejects unknown keys, so this module does
both: each value is converted through its field's type, and an unknown or mistyped flag is a
UserError naming the closest valid names.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing

from .errors import UserError

# names other trainers use for our fields; accepted and mapped
ALIASES = {"max_epochs": "epochs", "lr": "learn_rate", "learning_rate": "learn_rate"}
# set by launchers; accepted and ignored
LAUNCHER_FLAGS = {"local_rank", "local-rank"}
SELECTORS = ("config", "use_large_config", "use_small_config", "is_finetune")
_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def closest(name: str, valid: typing.Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    return ", ".join(f"--{m}" for m in matches) if matches else "see --help for the list"


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
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [_convert_scalar(v, args[0] if args else str) for v in value]
        return _convert_scalar(value, type_)
    except (ValueError, TypeError):
        type_name = getattr(type_, "__name__", str(type_))
        raise UserError(f"--{name} expects {type_name}, got {value!r}") from None


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


def build(cls, values: dict, source: str = "flag"):
    """An instance of dataclass `cls` with `values` applied; unknown names and bad types are errors."""
    types = field_types(cls)
    converted = {}
    for raw_name, value in values.items():
        name = ALIASES.get(raw_name, raw_name).replace("-", "_") if raw_name not in types else raw_name
        if name not in types:
            where = f"unknown {source} --{raw_name}" if source == "flag" else f"unknown field '{raw_name}' in {source}"
            raise UserError(f"{where}; did you mean: {closest(name, types)}")
        converted[name] = convert(name, value, types[name])
    return cls(**converted)


def describe_fields(cls) -> str:
    """One line per field: flag, type and default (for --help and the README)."""
    types = field_types(cls)
    defaults = cls()
    lines = []
    for f in dataclasses.fields(cls):
        type_name = getattr(types[f.name], "__name__", str(types[f.name]).replace("typing.", ""))
        lines.append(f"  --{f.name:<28} {type_name:<6} default: {getattr(defaults, f.name)!r}")
    return "\n".join(lines)
