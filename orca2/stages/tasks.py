"""Stage `tasks`: sources → task records (user message + gold answer + task name), with accounting.

Sources are written KIND:ARG (gsm8k:PATH, bbh:PATH, jsonl:PATH, hf:NAME, synthetic[:KIND,...]); the
readers live in orca2.sources, shared with erase (decontamination) and eval (benchmarks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orca2.config import option, save_config
from orca2.errors import Orca2Error
from orca2.io import AppendWriter, atomic_writer, sidecar
from orca2.sources import COLUMN_KEYS, open_source
from orca2.stages import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TasksConfig:
    sources: tuple[str, ...] = option(
        help="Sources: gsm8k:PATH, bbh:PATH, jsonl:PATH, hf:NAME, synthetic[:KIND,...]", argument=True
    )
    output: str = option(help="Task records to write (.jsonl or .jsonl.gz).", short="-o")
    columns: dict[str, str] = option(
        help="Row mapping for jsonl:/hf: sources, KEY=COLUMN,... (keys: prompt, answer, id, task).", factory=dict
    )
    task: str | None = option(None, "Task name for jsonl:/hf: rows without a task column.")
    per_kind: int = option(100, "Synthetic items per kind.")
    split: str = option("train", "Synthetic split: each split draws its items from a disjoint random stream.")
    seed: int = option(0, "Seed of the synthetic generators.")
    min_steps: int = option(2, "Synthetic word problems: fewest operations.")
    max_steps: int = option(3, "Synthetic word problems: most operations.")
    limit: int | None = option(None, "Keep at most this many records per source (the first ones).")
    skip_invalid: bool = option(False, "Send bad rows to <output>.rejects.jsonl and go on (else stop at the first).")

    def __post_init__(self) -> None:
        for key in self.columns:
            if key not in COLUMN_KEYS:
                raise Orca2Error(f"columns: unknown key '{key}' (valid: {', '.join(COLUMN_KEYS)})")
        if not self.sources:
            raise Orca2Error("tasks: give at least one source, e.g. synthetic or gsm8k:data/gsm8k/train.jsonl")
        if self.per_kind < 1 or (self.limit is not None and self.limit < 1):
            raise Orca2Error("tasks: per_kind and limit must be positive")
        if not 1 <= self.min_steps <= self.max_steps:
            raise Orca2Error(f"tasks: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")


def run(cfg: TasksConfig) -> dict[str, Any]:
    """Read every source, write the task records atomically, and return the accounting summary."""
    counts: dict[str, dict[str, int]] = {}
    seen_ids: dict[str, str] = {}
    rejects_path = sidecar(cfg.output, "rejects.jsonl")
    if rejects_path.exists():
        rejects_path.unlink()
    rejects: AppendWriter | None = None
    try:
        with atomic_writer(cfg.output) as sink:
            for spec in cfg.sources:
                tally = counts.setdefault(spec, {"read": 0, "kept": 0, "rejected": 0})
                for where, item in open_source(
                    spec,
                    columns=cfg.columns,
                    task=cfg.task,
                    per_kind=cfg.per_kind,
                    split=cfg.split,
                    seed=cfg.seed,
                    min_steps=cfg.min_steps,
                    max_steps=cfg.max_steps,
                ):
                    if cfg.limit is not None and tally["kept"] >= cfg.limit:
                        break
                    tally["read"] += 1
                    if not isinstance(item, Orca2Error) and item["id"] in seen_ids:
                        item = Orca2Error(
                            f"{where}: field 'id' {item['id']!r} repeats an id first seen at {seen_ids[item['id']]}"
                        )
                    if isinstance(item, Orca2Error):
                        if not cfg.skip_invalid:
                            raise item
                        rejects = rejects or AppendWriter(rejects_path)
                        rejects.write({"where": where, "error": str(item)})
                        tally["rejected"] += 1
                        continue
                    seen_ids[item["id"]] = where
                    sink.write(item)
                    tally["kept"] += 1
    finally:
        if rejects is not None:
            rejects.close()
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    total = {k: sum(t[k] for t in counts.values()) for k in ("read", "kept", "rejected")}
    assert total["read"] == total["kept"] + total["rejected"], total
    summary = {"output": str(cfg.output), "sources": counts, "total": total}
    if total["rejected"]:
        summary["rejects"] = str(rejects_path)
    return summary


def show(summary: dict[str, Any], cfg: TasksConfig) -> str:
    """What `orca2 tasks` prints: per source kept/rejected of read, then the file written."""
    lines = [
        f"{spec}: {t['kept']} kept, {t['rejected']} rejected of {t['read']} read"
        for spec, t in summary["sources"].items()
    ]
    lines.append(f"wrote {summary['total']['kept']} task records to {summary['output']}")
    if "rejects" in summary:
        lines.append(f"rejected rows listed in {summary['rejects']}")
    return "\n".join(lines)


def wire(run_: Any) -> TasksConfig:
    """In `orca2 run`: tasks.jsonl in the run folder; an instruct stage's records join the sources."""
    section = run_.section("tasks", {"output": str(run_.paths["tasks"])})
    if "instruct" in run_.stages:
        section["sources"] = [*(section.get("sources") or ()), f"jsonl:{run_.paths['instruct']}"]
    return run_.build(TasksConfig, section, "tasks.")


def files(run_: Any, cfg: TasksConfig) -> tuple[list[Path], list[Path]]:
    """Inputs: local source files (hub datasets and synthetic generators are not files)."""
    specs = [spec.partition(":")[2] for spec in cfg.sources]
    return [Path(p) for p in specs if p and Path(p).exists()], [run_.paths["tasks"]]


def step(run_: Any, cfg: TasksConfig, resume: bool) -> dict[str, Any]:
    return run(cfg)["total"]


STAGE = Stage("tasks", TasksConfig, run, show, wire, files, step)
