"""The strategy library: reasoning strategies as data (one YAML file each), plus task→strategy assignments.

Other projects import this module just for its prompts, so it stays light: no torch, no openai.

    >>> from orca2 import strategies
    >>> strategies.names()[:3]
    ['direct-answer', 'explain-then-answer', 'extract-generate']
    >>> messages = strategies.render_messages("step-by-step", "What is 2 + 3 * 4?")
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orca2.config import read_yaml
from orca2.errors import Orca2Error
from orca2.prompts import render_template, template_fields

STRATEGIES_DIR = Path(__file__).parent
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
STRATEGY_KEYS = ("name", "description", "system_prompt", "answer_format")
# Placeholders a strategy prompt may use; filled from the task record at render time.
PLACEHOLDERS = ("task",)


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str  # one or two sentences: what it does and which tasks it suits
    system_prompt: str  # the strategy-specific instructions the teacher sees (erased before training)
    answer_format: str | None = None  # optional closing line saying how to state the final answer
    source: str = "<builtin>"  # file it came from, for error messages

    def system_text(self, task: str | None = None) -> str:
        """The full system prompt: instructions, then the answer-format line when there is one."""
        parts = [self.system_prompt] + ([self.answer_format] if self.answer_format else [])
        text = "\n\n".join(parts)
        fields = template_fields(text)
        values = {"task": task or ""} if fields else {}
        return render_template(text, source=f"{self.source} ({self.name})", **values)


def parse_strategy(data: Any, where: str) -> Strategy:
    """Validate one strategy mapping (from YAML) and build a Strategy."""
    if not isinstance(data, dict):
        raise Orca2Error(f"{where}: a strategy must be a mapping with keys {', '.join(STRATEGY_KEYS)}")
    for key in data:
        if key not in STRATEGY_KEYS:
            raise Orca2Error(f"{where}: unknown key '{key}' (valid: {', '.join(STRATEGY_KEYS)})")
    for key in ("name", "description", "system_prompt"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise Orca2Error(f"{where}: field '{key}' must be a non-empty string")
    if data.get("answer_format") is not None and not isinstance(data["answer_format"], str):
        raise Orca2Error(f"{where}: field 'answer_format' must be a string")
    name = data["name"]
    if not NAME_RE.match(name):
        raise Orca2Error(f"{where}: field 'name' {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    strategy = Strategy(name, data["description"].strip(), data["system_prompt"], data.get("answer_format"), where)
    unknown = template_fields(strategy.system_prompt + (strategy.answer_format or "")) - set(PLACEHOLDERS)
    if unknown:
        raise Orca2Error(
            f"{where}: placeholder {{{sorted(unknown)[0]}}} (valid: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
        )
    return strategy


def load_strategy_file(path: str | Path) -> list[Strategy]:
    """Strategies from one YAML file: a single mapping, or a list of mappings."""
    data, lines = read_yaml(path)
    items = data if isinstance(data, list) else [data]
    return [parse_strategy(item, f"{path}" if len(items) == 1 else f"{path}[{i}]") for i, item in enumerate(items)]


def load_strategies(paths: Iterable[str | Path]) -> dict[str, Strategy]:
    """Strategies from YAML files or folders of them; a name defined twice is an error."""
    found: dict[str, Strategy] = {}
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not files:
                raise Orca2Error(f"{path}: no strategy files (*.yaml) in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise Orca2Error(f"{path}: no such strategy file or folder")
        for file in files:
            for strategy in load_strategy_file(file):
                if strategy.name in found:
                    raise Orca2Error(
                        f"{file}: strategy '{strategy.name}' is already defined in {found[strategy.name].source}"
                    )
                found[strategy.name] = strategy
    return found


class Library:
    """A name → Strategy registry: the built-ins, optionally extended or overridden by user files."""

    def __init__(self, strategies: Mapping[str, Strategy]):
        self._strategies = dict(sorted(strategies.items()))

    @classmethod
    def load(cls, user_paths: Iterable[str | Path] = ()) -> Library:
        """The built-in strategies plus those in `user_paths` (a user strategy may replace a built-in of the same
        name)."""
        merged = dict(_builtin())
        merged.update(load_strategies(user_paths))
        return cls(merged)

    def names(self) -> list[str]:
        return list(self._strategies)

    def get(self, name: str) -> Strategy:
        try:
            return self._strategies[name]
        except KeyError:
            raise Orca2Error(f"unknown strategy '{name}' (valid: {', '.join(self._strategies)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._strategies

    def __iter__(self):
        return iter(self._strategies.values())


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, Strategy]:
    return load_strategies([STRATEGIES_DIR])


def names() -> list[str]:
    """Names of the built-in strategies, sorted."""
    return sorted(_builtin())


def get(name: str) -> Strategy:
    """A built-in strategy by name; an unknown name raises an error listing the valid ones."""
    return Library.load().get(name)


def render_messages(strategy: Strategy | str, user: str, task: str | None = None) -> list[dict[str, str]]:
    """Chat messages that put `user` to a teacher under `strategy`'s system prompt."""
    if isinstance(strategy, str):
        strategy = get(strategy)
    return [{"role": "system", "content": strategy.system_text(task)}, {"role": "user", "content": user}]


# --- assignments: which strategy each task gets ------------------------------------------------------


Mix = tuple[tuple[str, float], ...]  # (strategy, weight) pairs


@dataclass(frozen=True)
class Assignment:
    """Task-name patterns (fnmatch globs, first match wins) → strategy names, with an optional default.

    A pattern (or the default) may name a *mix*: a list of strategies (equal shares) or a mapping strategy →
    weight. Each record of a matching task is taught under one of them, chosen by a hash of the record's id
    (stable across runs; over many records the shares follow the weights).
    """

    rules: tuple[tuple[str, str | Mix], ...]
    default: str | Mix | None = None
    source: str = "<assignment>"

    @classmethod
    def load(cls, path: str | Path, library: Library | None = None) -> Assignment:
        """Read an assignment YAML (`default:` and `tasks: {pattern: strategy}`); check names against `library`."""
        data, lines = read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise Orca2Error(f"{path}:1: an assignment must be a mapping with keys 'default' and 'tasks'")
        for key in data:
            if key not in ("default", "tasks"):
                raise Orca2Error(f"{path}:{lines.get(key, 1)}: unknown key '{key}' (valid: default, tasks)")
        tasks = data.get("tasks") or {}
        if not isinstance(tasks, dict):
            raise Orca2Error(f"{path}:{lines.get('tasks', 1)}: field 'tasks' must map task patterns to strategy names")
        library = library or Library.load()

        def names(key: str, value: Any) -> str | Mix | None:
            where = f"{path}:{lines.get(key, 1)}: field '{key}'"
            if value is None:
                return None
            if isinstance(value, list):
                if len(set(map(str, value))) != len(value):
                    raise Orca2Error(f"{where}: a mix lists distinct strategies")
                value = {name: 1.0 for name in value}
            mix = isinstance(value, dict)
            for name in value if mix else [value]:
                if not isinstance(name, str) or name not in library:
                    raise Orca2Error(f"{where}: unknown strategy {name!r} (valid: {', '.join(library.names())})")
            if not mix:
                return value
            if not value or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in value.values()
            ):
                raise Orca2Error(f"{where}: a mix maps strategies to positive weights")
            return tuple((name, float(w)) for name, w in value.items())

        default = names("default", data.get("default"))
        return cls(tuple((str(k), names(f"tasks.{k}", v)) for k, v in tasks.items()), default, str(path))

    def strategy_for(self, task: str, record_id: str = "") -> str:
        """The strategy name for a task's record: the first matching pattern, else the default; from a mix,
        the one the record id's hash falls on."""
        choice = next((name for pattern, name in self.rules if fnmatch.fnmatchcase(task, pattern)), self.default)
        if choice is None:
            raise Orca2Error(f"{self.source}: no pattern matches task '{task}' and there is no 'default'")
        if isinstance(choice, str):
            return choice
        point = int(hashlib.sha256(record_id.encode()).hexdigest()[:12], 16) / 16**12 * sum(w for _, w in choice)
        for name, weight in choice:
            point -= weight
            if point < 0:
                return name
        return choice[-1][0]

    def to_yaml(self) -> str:
        def plain(value: str | Mix) -> Any:
            return value if isinstance(value, str) else dict(value)

        data: dict[str, Any] = {}
        if self.default is not None:
            data["default"] = plain(self.default)
        data["tasks"] = {pattern: plain(name) for pattern, name in self.rules}
        import yaml  # loads when needed, not with the CLI

        return yaml.safe_dump(data, sort_keys=False)
