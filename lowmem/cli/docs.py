"""Flag documentation from config.py: each field's meaning as declared with `setting` (lowmem/fields.py) and the
`# --- section ---` comment it stands under; the README table (`python -m lowmem.cli.docs --update-readme`) and
`train --help`."""
from __future__ import annotations

import ast
import dataclasses
import io
import os
import re
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)

from config import TrainConfig  # noqa: E402

from ..fields import rules  # noqa: E402

CONFIG_PY = os.path.join(ROOT, "config.py")
SECTION = re.compile(r"#\s*---\s*(.+?)\s*---\s*$")  # `# --- optimisation ---` opens a group of fields


def _class_tokens(path: str, class_name: str):
    """The tokens of one class body of the file, in order."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if node.lineno <= tok.start[0] <= node.end_lineno:
            yield tok


def field_sections(path: str = CONFIG_PY, class_name: str = "TrainConfig") -> dict[str, str]:
    """The `# --- section ---` each field of the class is written under ('' before the first)."""
    sections, section = {}, ""
    for tok in _class_tokens(path, class_name):
        if tok.type == tokenize.COMMENT and tok.start[1] == 4 and SECTION.match(tok.string):
            section = SECTION.match(tok.string).group(1)
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            sections.setdefault(tok.string, section)
    return sections


ON_RESUME = {"refused": "refused", "data": "refused unless --allow_config_change", "applied": "applied, logged",
             "free": "free"}


def _constraint(meta: dict) -> str:
    """The field's range and resume rule, as --help and the README table show them."""
    allowed = meta.get("range")
    parts = [allowed.describe()] if allowed is not None else []
    return "; ".join(parts + [f"on resume: {ON_RESUME.get(meta.get('resume'), '?')}"])


def flag_table() -> str:
    meta, defaults = rules(TrainConfig), TrainConfig()
    lines = ["| flag | default | meaning | allowed, on resume |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        meaning = meta[f.name].get("help", "").replace("|", "\\|")
        lines.append(f"| `--{f.name}` | `{getattr(defaults, f.name)!r}` | {meaning} | {_constraint(meta[f.name])} |")
    return "\n".join(lines)


def flag_help(cls=TrainConfig) -> str:
    """Every field of `cls` as a flag with its type, default, meaning, range and resume rule, by config.py's sections."""
    from ..fields import field_types, type_name

    meta, sections = rules(cls), field_sections(CONFIG_PY)
    types, defaults = field_types(cls), cls()
    lines, section = [], None
    for f in dataclasses.fields(cls):
        if sections.get(f.name, "") != section:
            section = sections.get(f.name, "")
            lines.append(f"\n{section or 'other'}:")
        lines.append(f"  --{f.name:<30} {type_name(types[f.name])}, default: {getattr(defaults, f.name)!r} "
                     f"({_constraint(meta[f.name])})")
        if meta[f.name].get("help"):
            lines.append(f"      {meta[f.name]['help']}")
    return "\n".join(lines).lstrip("\n")


def update_readme(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = "<!-- flags:start -->\n", "<!-- flags:end -->"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + start + flag_table() + "\n" + end + tail)


if __name__ == "__main__":
    if "--update-readme" in sys.argv:
        update_readme(os.path.join(ROOT, "README.md"))
    else:
        print(flag_table())
