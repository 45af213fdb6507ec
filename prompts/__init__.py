"""Prompt texts as data: generic system prompts for erasure, judge prompts, and strict template rendering.

`import orca2.prompts` is light: it reads text files, nothing else.
"""

from __future__ import annotations

import string
from pathlib import Path

from orca2.errors import Orca2Error

PROMPTS_DIR = Path(__file__).parent
GENERIC_NAMES = ("cautious", "empty")


def template_fields(text: str) -> set[str]:
    """The placeholder names in a `{name}` template ('{{' and '}}' are literal braces)."""
    fields = set()
    try:
        for _, name, spec, conversion in string.Formatter().parse(text):
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise Orca2Error(f"placeholder {{{name}}} must be a plain name such as {{question}}")
            fields.add(name)
    except ValueError as exc:
        raise Orca2Error(f"malformed template ({exc}); write literal braces as '{{{{' and '}}}}'") from None
    return fields


def render_template(text: str, source: str = "template", **values: str) -> str:
    """Fill a template; a placeholder without a value, or a value without a placeholder, is an error."""
    fields = template_fields(text)
    missing = sorted(fields - set(values))
    if missing:
        raise Orca2Error(
            f"{source}: no value for placeholder {{{missing[0]}}} (given: {', '.join(sorted(values)) or 'none'})"
        )
    unused = sorted(set(values) - fields)
    if unused:
        raise Orca2Error(
            f"{source}: value '{unused[0]}' has no placeholder (placeholders: {', '.join(sorted(fields)) or 'none'})"
        )
    return text.format(**values)


def read_prompt(relative: str) -> str:
    """A shipped prompt text by its path under prompts/, e.g. 'generic/cautious.txt' (trailing newline dropped)."""
    path = PROMPTS_DIR / relative
    if not path.is_file():
        raise Orca2Error(f"no shipped prompt '{relative}'")
    return path.read_text(encoding="utf-8").rstrip("\n")


def generic_prompt(name_or_path: str) -> str:
    """The generic system prompt that erasure puts in place: 'cautious' (Orca 2's), 'empty', or a text file."""
    if name_or_path in GENERIC_NAMES:
        return read_prompt(f"generic/{name_or_path}.txt")
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(encoding="utf-8").rstrip("\n")
    raise Orca2Error(
        f"unknown generic prompt '{name_or_path}' (valid: {', '.join(GENERIC_NAMES)}, or the path of a text file)"
    )
