"""Prompts for user-modeling records: ablations (which sections) and styles (how they read).

Prompts contain exactly the sections the ablation names, in the order profile, history (oldest
first, numbered), context. A requested section with no data for a record is still rendered, with
"(none)" in the simple style and "none." in the detailed one. When a prompt is too long,
history_limit / fit_prompt drop the oldest history items first; profile and context are never cut.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator, Mapping

from .usermodel import Record, _check_choice, _check_limit, _newest

ABLATION_SECTIONS = {"profile_only": ("profile",), "history_only": ("history",), "context_only": ("context",),
                     "profile_and_history": ("profile", "history"), "profile_and_context": ("profile", "context"),
                     "history_and_context": ("history", "context"), "all": ("profile", "history", "context")}
ABLATIONS = tuple(ABLATION_SECTIONS)
PROMPT_STYLES = ("simple", "detailed")
SIMPLE_TAGS = {"profile": "[PROFILE]", "history": "[HISTORY]", "context": "[CONTEXT]"}
SIMPLE_INSTRUCTION = "Predict the user's next message:"
DETAILED_HEADERS = {"profile": "Their profile:", "history": "Their past messages, oldest first:",
                    "context": "The current conversation:"}
DETAILED_INSTRUCTION = "Write the user's next message."

def prompt_sections(record: Record, ablation_config: str, max_history_items: int | None = None,
                    history_limit: int | None = None) -> dict[str, list[str]]:
    """The requested sections in prompt order as rendered lines; an empty list means no data for this record."""
    _check_choice(ablation_config, ABLATIONS, "ablation_config")
    _check_limit(max_history_items, "max_history_items")
    _check_limit(history_limit, "history_limit")
    sections: dict[str, list[str]] = {}
    for name in ABLATION_SECTIONS[ablation_config]:
        if name == "profile":
            profile = record.profile
            if isinstance(profile, Mapping):
                sections[name] = [f"{k}: {v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)}"
                                  for k, v in profile.items()]
            else:
                sections[name] = [profile] if profile and profile.strip() else []
        elif name == "history":
            items = _newest(_newest(record.history or [], max_history_items), history_limit)
            sections[name] = [f"{n}. {item['text']}" for n, item in enumerate(items, 1)]
        else:
            sections[name] = [f"{t['role']}: {t['text']}" if t["role"] else t["text"] for t in record.context]
    return sections


def build_prompt(record: Record, ablation_config: str, prompt_style: str = "simple",
                 max_history_items: int | None = None, history_limit: int | None = None) -> str:
    """The prompt for one record; history_limit keeps only the newest items (the oldest are dropped first)."""
    _check_choice(prompt_style, PROMPT_STYLES, "prompt_style")
    sections = prompt_sections(record, ablation_config, max_history_items, history_limit)
    if prompt_style == "simple":
        parts = [f"[USER_HASH={record.user_id}]"]
        parts += [SIMPLE_TAGS[name] + "\n" + ("\n".join(lines) or "(none)") for name, lines in sections.items()]
        return "\n\n".join(parts + [SIMPLE_INSTRUCTION])
    parts = [f"You are modeling user {record.user_id}."]
    parts += [DETAILED_HEADERS[name] + ("\n" + "\n".join(lines) if lines else " none.")
              for name, lines in sections.items()]
    return "\n".join(parts + [DETAILED_INSTRUCTION])


def fit_prompt(record: Record, ablation_config: str, prompt_style: str, fits: Callable[[str], bool],
               max_history_items: int | None = None) -> tuple[str, int]:
    """(the prompt with the most newest history items for which fits(prompt) holds, how many older items it left
    out), dropping oldest first.

    fits is the caller's length test (e.g. token count <= budget). If even no history fits, the prompt
    without history items is returned and the caller truncates or skips it.
    """
    full = build_prompt(record, ablation_config, prompt_style, max_history_items)
    if fits(full) or "history" not in ABLATION_SECTIONS[ablation_config]:
        return full, 0
    shown = len(_newest(record.history or [], max_history_items))
    lo, hi, best = 0, shown - 1, None
    while lo <= hi:  # fewer items is never longer, so binary search on the number kept
        mid = (lo + hi) // 2
        prompt = build_prompt(record, ablation_config, prompt_style, max_history_items, history_limit=mid)
        if fits(prompt):
            best, lo = (prompt, shown - mid), mid + 1
        else:
            hi = mid - 1
    return best if best is not None else (build_prompt(record, ablation_config, prompt_style, max_history_items, 0),
                                          shown)


def to_prompt_response(records: Iterable[Record], ablation_config: str, prompt_style: str = "simple",
                       max_history_items: int | None = None) -> Iterator[tuple[str, str]]:
    """(prompt, response) pairs ready for the SFT template; response is the record's target."""
    _check_choice(ablation_config, ABLATIONS, "ablation_config")
    _check_choice(prompt_style, PROMPT_STYLES, "prompt_style")
    for record in records:
        yield build_prompt(record, ablation_config, prompt_style, max_history_items), record.target
