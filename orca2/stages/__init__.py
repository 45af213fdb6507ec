"""Stages: each reads records, asks models or trains, writes records. Only the pipeline and the CLI import them.

Each stage module declares itself with a `Stage` (train and eval too, from their top-level folders): the CLI
builds its command from it — one flag per config field (orca2.flags) — and prints what `show` makes of the
summary `run` returns. This package's own module is light: it imports no stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _nothing(summary: dict[str, Any], cfg: Any) -> str:
    return ""


@dataclass(frozen=True)
class Stage:
    """One stage as the CLI and the pipeline see it."""

    name: str  # its command: "generate", "persona infer"
    config: type  # its frozen config dataclass; flags, YAML keys and defaults come from its fields
    run: Callable[[Any], dict[str, Any]]  # config → summary (what it kept, dropped, wrote)
    show: Callable[[dict[str, Any], Any], str] = _nothing  # (summary, config) → what the command prints
