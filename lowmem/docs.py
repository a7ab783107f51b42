"""Flag documentation from config.py's comments: the README table (`python -m lowmem.docs --update-readme`)
and `train --help`."""
from __future__ import annotations

import ast
import dataclasses
import io
import os
import re
import sys
import tokenize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import TrainConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _field_docs(path: str, class_name: str) -> dict[str, tuple[str, str]]:
    """name -> (section, trailing comment) for each `name: type = value` line of the class."""
    docs, current, section = {}, None, ""
    for tok in _class_tokens(path, class_name):
        if tok.type == tokenize.COMMENT and tok.start[1] == 4 and SECTION.match(tok.string):
            section = SECTION.match(tok.string).group(1)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
            current = tok.string
            docs.setdefault(current, (section, ""))
        elif tok.type == tokenize.COMMENT and current and not docs[current][1]:
            docs[current] = (docs[current][0], tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NEWLINE:
            current = None
    return docs


def field_comments(path: str = CONFIG_PY, class_name: str = "TrainConfig") -> dict[str, str]:
    """The trailing `# comment` of each `name: type = value` line in the class."""
    return {name: comment for name, (_, comment) in _field_docs(path, class_name).items() if comment}


def field_sections(path: str = CONFIG_PY, class_name: str = "TrainConfig") -> dict[str, str]:
    """The `# --- section ---` each field of the class is written under ('' before the first)."""
    return {name: section for name, (section, _) in _field_docs(path, class_name).items()}


def flag_table() -> str:
    comments = field_comments(CONFIG_PY)
    defaults = TrainConfig()
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        meaning = comments.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `--{f.name}` | `{value!r}` | {meaning} |")
    return "\n".join(lines)


def flag_help(cls=TrainConfig) -> str:
    """Every field of `cls` as a flag with its type, default and meaning, grouped by config.py's sections."""
    from .cli import field_types, type_name

    comments, sections = field_comments(CONFIG_PY), field_sections(CONFIG_PY)
    types, defaults = field_types(cls), cls()
    lines, section = [], None
    for f in dataclasses.fields(cls):
        if sections.get(f.name, "") != section:
            section = sections.get(f.name, "")
            lines.append(f"\n{section or 'other'}:")
        lines.append(f"  --{f.name:<30} {type_name(types[f.name])}, default: {getattr(defaults, f.name)!r}")
        if comments.get(f.name):
            lines.append(f"      {comments[f.name]}")
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
