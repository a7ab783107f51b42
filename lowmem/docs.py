"""The README's flag table, generated from config.py: `python -m lowmem.docs --update-readme`."""
from __future__ import annotations

import dataclasses
import io
import os
import sys
import tokenize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import TrainConfig  # noqa: E402


def field_comments(path: str) -> dict[str, str]:
    """The trailing `# comment` of each `name: type = value` line in the TrainConfig class."""
    comments, current = {}, None
    with open(path, encoding="utf-8") as f:
        source = f.read()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current:
            comments.setdefault(current, tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NEWLINE:
            current = None
    return comments


def flag_table() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    comments = field_comments(os.path.join(root, "config.py"))
    defaults = TrainConfig()
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        meaning = comments.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `--{f.name}` | `{value!r}` | {meaning} |")
    return "\n".join(lines)


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
        update_readme(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
    else:
        print(flag_table())
