"""How a config field is declared: its default, its meaning, the values it takes, and what a resume does
when it changes. `config.py` declares every TrainConfig field with `setting(...)`; the flag table and
`--help` (cli/docs.py), the value checks (train/validate.py) and the resume check (checkpoint/resume.py) all read
these rules from the field itself, so a new flag cannot forget one of them.

Resume rules, for a field whose value differs from the one the checkpoint was written with:
  REFUSED   the saved state would not load or would be another model: always refused
  DATA      the run would train other samples or tokens: refused unless --allow_config_change=True
  APPLIED   takes effect from the resumed step on, and is logged as "changed on resume"
  FREE      about this invocation only (where the run lives, how it is started): not compared

A loose module at the bottom, beside run/: config.py, cli/, train/ and checkpoint/ all read it.
May import: run.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing

from .run.errors import UserError

REFUSED, DATA, APPLIED, FREE = "refused", "data", "applied", "free"
RESUME_RULES = (REFUSED, DATA, APPLIED, FREE)
RECORDS = "records"  # a field that only user-modeling records (user_id + target) read
PREFERENCE = "preference"  # a field that only preference pairs (prompt, chosen, rejected) read


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a number: low <= v (low < v when low_open), v <= high (v < high when high_open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"greater than {low}" if self.low_open else f"at least {low}"
        if self.low is None:
            return f"below {high}" if self.high_open else f"at most {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {high}{right}"


def _number(value) -> str:
    """2**32 - 1 as 4294967295, not 4.29497e+09; 0.5 as 0.5."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


def setting(default, help: str, resume: str, allowed: Range | None = None, applies_to: str | None = None):
    """A dataclass field with its rules in the metadata (list and dict defaults are copied per instance)."""
    if resume not in RESUME_RULES:
        raise ValueError(f"resume rule {resume!r} is not one of {RESUME_RULES}")
    metadata = {"help": help, "resume": resume, "range": allowed, "applies_to": applies_to}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rules(config_class) -> dict[str, dict]:
    """name -> metadata of every field, read from the first class in the hierarchy that declared it with
    `setting` (presets redefine defaults only, which drops a field's metadata in the subclass)."""
    found: dict[str, dict] = {}
    for cls in reversed(config_class.__mro__):
        for f in getattr(cls, "__dataclass_fields__", {}).values():
            if f.metadata and f.name not in found:
                found[f.name] = dict(f.metadata)
    return {f.name: found.get(f.name, {}) for f in dataclasses.fields(config_class)}


def names_with(config_class, resume: str) -> tuple[str, ...]:
    return tuple(name for name, meta in rules(config_class).items() if meta.get("resume") == resume)


def out_of_range(name: str, value, allowed: Range | None) -> str | None:
    """Why `value` is not allowed for --name, or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"--{name}={value} must be a finite number" + (f" {allowed.describe()}" if allowed else "")
    if allowed is not None and not allowed.holds(value):
        return f"--{name}={value} must be {allowed.describe()}" + (f" ({allowed.hint})" if allowed.hint else "")
    return None


def field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(type_) -> str:
    """How --help and errors spell a field type: int, float, list[str], one of a|b|c."""
    if typing.get_origin(type_) is typing.Literal:
        return "|".join(str(choice) for choice in typing.get_args(type_))
    if type(None) in typing.get_args(type_):
        inner = [a for a in typing.get_args(type_) if a is not type(None)]
        return f"{type_name(inner[0])} or None" if len(inner) == 1 else str(type_)
    if typing.get_origin(type_) is not None:
        return str(type_).replace("typing.", "")
    return getattr(type_, "__name__", str(type_))


def choice_error(name: str, value, choices: typing.Sequence) -> UserError:
    """`--optimizer expects one of adamw, adafactor; got 'adamx' (closest: adamw)`."""
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    hint = f" (closest: {near[0]})" if near else ""
    return UserError(f"--{name} expects one of {', '.join(str(c) for c in choices)}; got {value!r}{hint}")
