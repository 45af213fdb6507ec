"""Benchmarks as data (eval/benchmarks.yaml plus user YAML files) and their loaders → task records."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orca2.answers import ANSWER_TYPES, infer_answer_type
from orca2.config import read_yaml
from orca2.errors import Orca2Error
from orca2.prompts import render_template
from orca2.records import Record, make_record, user_prompt

EVAL_DIR = Path(__file__).parent
LOADERS = ("gsm8k", "bbh", "jsonl", "hf", "multiple_choice", "orcabench")
KEYS = (
    "loader",
    "path",
    "answer_type",
    "template",
    "aggregate",
    "reference",
    "fields",
    "columns",
    "traits",
    "judge",
    "constrain",
)
CONSTRAINTS = ("none", "choice")


@dataclass(frozen=True)
class Benchmark:
    name: str
    loader: str
    path: str
    answer_type: str = "auto"
    template: str = "{question}"
    aggregate: str = "micro"  # micro: over items; macro: mean of per-task accuracies
    reference: dict[str, float] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)  # multiple_choice: question, choices, answer, task
    columns: dict[str, str] = field(default_factory=dict)  # jsonl / hf: prompt, answer, id, task
    source: str = ""
    traits: str | None = None  # orcabench: the held-out users' BigFive traits (persona infer output)
    judge: str = "program:persona"  # orcabench: consistency judge, and BigFive inference of the generated posts
    # choice: a multiple-choice item's reply held to "The answer is (X)." over its own letters (local engine only;
    # off by default, so that published comparisons stay unconstrained)
    constrain: str = "none"


def default_data_dir() -> Path:
    env = os.environ.get("ORCA2_DATA_DIR")
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def load_registry(extra: tuple[str, ...] = ()) -> dict[str, Benchmark]:
    """The shipped benchmarks plus those in `extra` YAML files (same keys; a name may be redefined)."""
    registry: dict[str, Benchmark] = {}
    for path in (EVAL_DIR / "benchmarks.yaml", *map(Path, extra)):
        data, lines = read_yaml(path)
        if not isinstance(data, dict):
            raise Orca2Error(f"{path}:1: a benchmark file maps names to entries")
        for name, entry in data.items():
            where = f"{path}:{lines.get(str(name), 1)}"
            if not isinstance(entry, dict):
                raise Orca2Error(f"{where}: benchmark '{name}' must be a mapping")
            for key in entry:
                if key not in KEYS:
                    raise Orca2Error(
                        f"{path}:{lines.get(f'{name}.{key}', 1)}: benchmark '{name}': unknown key '{key}' "
                        f"(valid: {', '.join(KEYS)})"
                    )
            if entry.get("loader") not in LOADERS:
                raise Orca2Error(f"{where}: benchmark '{name}': loader must be one of {', '.join(LOADERS)}")
            if not isinstance(entry.get("path"), str):
                raise Orca2Error(f"{where}: benchmark '{name}': field 'path' is required")
            answer_type = entry.get("answer_type", "auto")
            if answer_type != "auto" and answer_type not in ANSWER_TYPES:
                raise Orca2Error(
                    f"{where}: benchmark '{name}': answer_type must be auto or one of {', '.join(ANSWER_TYPES)}"
                )
            if entry.get("constrain", "none") not in CONSTRAINTS:
                raise Orca2Error(f"{where}: benchmark '{name}': constrain must be one of {', '.join(CONSTRAINTS)}")
            registry[str(name)] = Benchmark(
                str(name),
                entry["loader"],
                entry["path"],
                answer_type,
                entry.get("template", "{question}"),
                entry.get("aggregate", "micro"),
                dict(entry.get("reference") or {}),
                dict(entry.get("fields") or {}),
                dict(entry.get("columns") or {}),
                str(path),
                entry.get("traits"),
                entry.get("judge", "program:persona"),
                entry.get("constrain", "none"),
            )
    return registry


def select(registry: dict[str, Benchmark], names: tuple[str, ...]) -> list[tuple[Benchmark, str | None]]:
    """Resolve 'gsm8k', 'bbh', or 'bbh/date_understanding' (one task of a benchmark) to (benchmark, task filter)."""
    chosen = []
    for name in names:
        base, _, task = name.partition("/")
        if base not in registry:
            raise Orca2Error(
                f"unknown benchmark '{name}' (valid: {', '.join(sorted(registry))}; or add one with --benchmarks FILE)"
            )
        chosen.append((registry[base], f"{base}/{task}" if task else None))
    return chosen


def resolve_path(path: str, data_dir: Path) -> str:
    if path.startswith("hf:") or Path(path).is_absolute():
        return path
    return str(data_dir / path)


def _dig(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else None
    return value


def _multiple_choice(bench: Benchmark, data_dir: Path) -> Iterator[Record]:
    from orca2.io import iter_json_lines

    path = resolve_path(bench.path, data_dir)
    if path.startswith("hf:"):
        from orca2.sources import load_hf

        try:
            items: Any = enumerate(load_hf(path[3:], default_split="test"))
        except Orca2Error as exc:
            raise Orca2Error(f"benchmark '{bench.name}': {exc}; point `path` at a local JSONL copy") from None
    else:
        items = ((line, row) for line, row in iter_json_lines(path))
    f = {"question": "question", "choices": "choices", "answer": "answer", **bench.fields}
    for index, row in items:
        question, choices, answer = _dig(row, f["question"]), _dig(row, f["choices"]), _dig(row, f["answer"])
        if not isinstance(question, str) or not isinstance(choices, list) or answer is None:
            raise Orca2Error(
                f"{path}:{index}: needs fields {f['question']!r}, {f['choices']!r} (a list) and {f['answer']!r}"
            )
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        gold = letters[int(answer)] if isinstance(answer, int) or str(answer).isdigit() else str(answer).strip("() ")
        listing = "\n".join(f"({letter}) {choice}" for letter, choice in zip(letters, choices))
        task = f"{bench.name}/{_dig(row, f['task'])}" if "task" in f else bench.name
        yield make_record(
            f"{bench.name}/{index}",
            task,
            [
                {
                    "role": "user",
                    "content": render_template(
                        bench.template, f"benchmark {bench.name}", question=question, choices=listing
                    ),
                }
            ],
            f"({gold})",
            {"answer_type": "choice", "benchmark": bench.name},
        )


def load_items(bench: Benchmark, task_filter: str | None, data_dir: Path, limit: int | None) -> list[Record]:
    """Task records for a benchmark: the template applied, answer types set, at most `limit` per task."""
    if bench.loader == "multiple_choice":
        records: Iterator[Record] = _multiple_choice(bench, data_dir)
    else:
        from orca2.sources import open_source

        spec = f"{bench.loader}:{resolve_path(bench.path, data_dir)}"
        path = Path(spec.split(":", 1)[1])
        if bench.loader != "hf" and not path.exists():
            raise Orca2Error(f"benchmark '{bench.name}': {path} not found (set ORCA2_DATA_DIR or the entry's path)")

        def templated() -> Iterator[Record]:
            for _where, item in open_source(spec, columns=bench.columns, task=bench.name):
                if isinstance(item, Orca2Error):
                    raise item
                prompt = render_template(bench.template, f"benchmark {bench.name}", question=user_prompt(item))
                meta = {**item.get("meta", {}), "benchmark": bench.name}
                task = item["task"]
                if (
                    bench.loader == "bbh"
                ):  # the reader names tasks bbh/<file>; a user benchmark names them <bench>/<file>
                    task = f"{bench.name}/{task.split('/', 1)[1]}"
                yield make_record(item["id"], task, [{"role": "user", "content": prompt}], item["answer"], meta)

        records = templated()
    out: list[Record] = []
    per_task: dict[str, int] = {}
    for record in records:
        if task_filter and record["task"] != task_filter:
            continue
        if limit is not None and per_task.get(record["task"], 0) >= limit:
            continue
        per_task[record["task"]] = per_task.get(record["task"], 0) + 1
        if bench.answer_type != "auto":
            record["meta"]["answer_type"] = bench.answer_type
        elif record.get("answer"):
            record["meta"]["answer_type"] = infer_answer_type(record["answer"])
        out.append(record)
    if task_filter and not out:
        raise Orca2Error(f"benchmark '{bench.name}' has no task '{task_filter}'")
    return out


def choice_format(bench: Benchmark, record: Record) -> dict[str, Any] | None:
    """The reply format of a multiple-choice item under `constrain: choice`: "The answer is (X)." where X is one of
    the item's option letters (read from its "(A) ..." lines); None for other items and benchmarks."""
    import re

    from orca2.structured import regex_format

    if bench.constrain != "choice" or record["meta"].get("answer_type") != "choice":
        return None
    letters = sorted(set(re.findall(r"(?m)^\s*\(([A-Z])\)", user_prompt(record))))
    if not letters:
        return None
    return regex_format(rf"The answer is \(({'|'.join(letters)})\)\.", name=f"{bench.name}-choice")
