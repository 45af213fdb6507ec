"""Reading structure out of a model's reply: a JSON object, a JSON list, fenced blocks, or the text.

Judges and agent flows share these. Each returns None when the reply does not hold what was asked for,
so the caller can ask again (`orca2.ask.ask_parsed`) and, after the last try, count it as unparsable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

PARSE_KINDS = ("text", "json_object", "json_list", "fenced")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.S)


def _json_values(text: str, opener: str) -> Any:
    """Each JSON value that starts at an `opener` character of `text`, in order (prose and fences around allowed)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(re.escape(opener), text):
        try:
            value, _ = decoder.raw_decode(text[match.start() :])
        except json.JSONDecodeError:
            continue
        yield value


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in a reply, or None."""
    return next((v for v in _json_values(text, "{") if isinstance(v, dict)), None)


def parse_json_list(text: str) -> list[Any] | None:
    """The first JSON list in a reply, or the list under the only list-valued key of its first object; else None."""
    first_list = next((v for v in _json_values(text, "[") if isinstance(v, list)), None)
    obj = parse_json_object(text)
    if obj is not None:  # {"questions": [...]} is a list too — unless a bare list came first
        lists = [v for v in obj.values() if isinstance(v, list)]
        start_obj, start_list = text.find("{"), text.find("[")
        if len(lists) == 1 and (first_list is None or start_obj < start_list):
            return lists[0]
    return first_list


def parse_fenced(text: str) -> list[str] | None:
    """The contents of the reply's fenced code blocks (```...```), or None when it has none."""
    blocks = [b.strip("\n") for b in _FENCE.findall(text)]
    return blocks or None


def parse_text(text: str) -> str | None:
    """The reply itself, stripped; None when empty."""
    text = text.strip()
    return text or None


PARSERS: dict[str, Callable[[str], Any]] = {
    "text": parse_text,
    "json_object": parse_json_object,
    "json_list": parse_json_list,
    "fenced": parse_fenced,
}
