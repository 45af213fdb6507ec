"""Stage `select`: measure which strategy suits each task, and write the assignment.

For every task, a dev slice (default 32 items with gold answers, drawn by seed) goes to the teacher
under each candidate strategy; answers are scored with the shared extractor. The best strategy per
task wins (ties: fewer completion tokens, then the candidates' order); the default is the best overall.
Orca 2 chose strategies by hand; this measures the choice. Responses land in the same cache as
`generate`, so the dev items are not paid for twice.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from orca2.answers import score
from orca2.ask import Request, ask
from orca2.config import save_config
from orca2.errors import Orca2Error
from orca2.io import atomic_text, read_numbered, sidecar
from orca2.records import Record, with_system_prompt
from orca2.strategies import Assignment, Library
from orca2.models import ClientConfig, Sampling, parse_model, redacted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectConfig:
    tasks: str  # task records with gold answers
    output: str  # assignment YAML to write
    teacher: str  # openai:<model> | batch:<model> | local:<...> | program:synthetic
    candidates: tuple[str, ...] = ()  # strategies to compare; default: the whole library
    dev_size: int = 32  # items per task
    strategies: tuple[str, ...] = ()  # extra strategy YAML files or folders
    client: ClientConfig = field(default_factory=ClientConfig)
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        parse_model(self.teacher)
        if self.dev_size < 1:
            raise Orca2Error("select: dev_size must be >= 1")


def _glob_literal(name: str) -> str:
    """A task name as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def dev_slices(path: str, size: int, seed: int) -> tuple[dict[str, list[Record]], int]:
    """Per task, `size` items with gold answers drawn by seed (constant memory per task); and how many had no answer."""
    heaps: dict[str, list[tuple[bytes, int, Record]]] = {}
    no_answer = 0
    for lineno, record in read_numbered(path):
        if not record.get("answer"):
            no_answer += 1
            continue
        rank = hashlib.sha256(f"{seed}:{record['id']}".encode()).digest()
        heap = heaps.setdefault(record["task"], [])
        item = (bytes(255 - b for b in rank), lineno, record)  # max-heap on rank via inverted bytes: keep the smallest
        if len(heap) < size:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    return {task: [r for _, _, r in sorted(heap, key=lambda x: x[1])] for task, heap in sorted(heaps.items())}, no_answer


def run(cfg: SelectConfig) -> dict[str, Any]:
    """Score every candidate strategy on every task's dev slice; write the assignment and the table."""
    library = Library.load(cfg.strategies)
    candidates = list(cfg.candidates) or library.names()
    for name in candidates:
        library.get(name)
    slices, no_answer = dev_slices(cfg.tasks, cfg.dev_size, cfg.sampling.seed or 0)
    if not slices:
        raise Orca2Error(f"{cfg.tasks}: no task records with gold answers, so no strategy can be scored")
    plan: list[tuple[str, str, Record]] = []
    requests: list[Request] = []
    for task, records in slices.items():
        for name in candidates:
            system = library.get(name).system_text(task)
            for record in records:
                plan.append((task, name, record))
                requests.append(Request(with_system_prompt(record["messages"], system),
                                        {**record.get("meta", {}), "answer": record.get("answer"), "task": task}))
    with ask(cfg.teacher, requests, cfg.sampling, cfg.client, desc=f"select {cfg.teacher}", library=library) as answers:
        if answers.result.aborted:
            raise Orca2Error(f"select stopped early: {answers.result.aborted} (responses so far are cached)")
        cells: dict[str, dict[str, dict[str, float]]] = {}
        for i, (task, name, record) in enumerate(plan):
            cell = cells.setdefault(task, {}).setdefault(name, {"n": 0, "correct": 0, "tokens": 0, "failed": 0})
            response = answers.response(i)
            if response is None:
                cell["failed"] += 1
                continue
            answer_type = record.get("meta", {}).get("answer_type")
            for content in response["contents"]:
                cell["n"] += 1
                cell["correct"] += score(content, record["answer"], answer_type).correct
            cell["tokens"] += response["completion_tokens"]
        spec, done = answers.spec.id, answers.result.done
    table: dict[str, dict[str, Any]] = {}
    for task, by_name in cells.items():
        row = {}
        for name in candidates:
            c = by_name[name]
            row[name] = {"accuracy": c["correct"] / c["n"] if c["n"] else None,
                         "mean_completion_tokens": c["tokens"] / max(1, c["n"]), "n": c["n"], "failed": c["failed"]}
        table[task] = row
    chosen = {task: _best(row, candidates) for task, row in table.items()}
    overall = {name: _mean([table[t][name]["accuracy"] for t in table]) for name in candidates}
    default = max(candidates, key=lambda n: (overall[n] if overall[n] is not None else -1, -candidates.index(n)))
    assignment = Assignment(tuple((_glob_literal(t), s) for t, s in chosen.items()), default, cfg.output)
    with atomic_text(cfg.output) as f:
        f.write(f"# Written by `orca2 select` with teacher {spec}: the best of {len(candidates)} strategies per task\n"
                f"# on dev slices of up to {cfg.dev_size} items (table: {sidecar(cfg.output, 'table.md').name}).\n")
        f.write(assignment.to_yaml())
    report = {"teacher": spec, "candidates": candidates, "dev_size": cfg.dev_size, "table": table, "chosen": chosen,
              "default": default, "overall_accuracy": overall, "skipped_without_answer": no_answer,
              "requests_this_run": done}
    with atomic_text(sidecar(cfg.output, "table.json")) as f:
        f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    with atomic_text(sidecar(cfg.output, "table.md")) as f:
        f.write(render_table(table, candidates, chosen))
    save_config(redacted(cfg), sidecar(cfg.output, "config.yaml"))
    return report


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _best(row: dict[str, dict[str, Any]], candidates: list[str]) -> str:
    def rank(name: str) -> tuple[float, float, int]:
        acc = row[name]["accuracy"]
        return (acc if acc is not None else -1.0, -row[name]["mean_completion_tokens"], -candidates.index(name))

    return max(candidates, key=rank)


def render_table(table: dict[str, dict[str, Any]], candidates: list[str], chosen: dict[str, str]) -> str:
    """Markdown: task × strategy, each cell 'accuracy % (mean completion tokens)', the winner in bold."""
    lines = ["| task | n | " + " | ".join(candidates) + " | chosen |", "|---|---:|" + "---:|" * len(candidates) + "---|"]
    for task, row in table.items():
        n = max(c["n"] for c in row.values())
        cells = []
        for name in candidates:
            c = row[name]
            text = "–" if c["accuracy"] is None else f"{100 * c['accuracy']:.0f}% ({c['mean_completion_tokens']:.0f} tok)"
            cells.append(f"**{text}**" if name == chosen[task] else text)
        lines.append(f"| {task} | {n} | " + " | ".join(cells) + f" | {chosen[task]} |")
    return "\n".join(lines) + "\n"
