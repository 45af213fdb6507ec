"""Stages: each reads records, asks models or trains, writes records. Only the pipeline and the CLI import them
(and the loop, through this registry, for its round steps).

Each stage module declares itself with a `Stage` (train and eval too, from their top-level folders): the CLI
builds its command from it — one flag per config field (orca2.flags) — and prints what `show` makes of the
summary `run` returns; `orca2 run` fills its section from the run (`wire`), hashes its files (`files`) and runs
it (`step`). This package's own module is light: it imports no stage until one is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every stage, one line each, in the chain's order: where its Stage is declared, and the line `orca2 --help` shows
# (None: a step of `orca2 run` only, without a command of its own).
REGISTRY: dict[str, tuple[str, str | None]] = {
    "instruct": ("orca2.stages.instruct:STAGE", "Documents → agent flows → task records (AgentInstruct)."),
    "tasks": ("orca2.stages.tasks:STAGE", "Build task records from sources (gsm8k, bbh, jsonl, hf, synthetic)."),
    "select": ("orca2.stages.select:STAGE", "Pick the best strategy per task on a dev slice (writes an assignment)."),
    "generate": ("orca2.stages.generate:STAGE", "Send tasks to the teacher under their strategy prompts (traces)."),
    "erase": ("orca2.stages.erase:STAGE", "Replace strategy prompts by one generic prompt and curate (SFT data)."),
    "persona": ("orca2.stages.persona:CHAIN", None),
    "persona synth": ("orca2.stages.persona:SYNTH", "Synthetic users with known BigFive levels and their posts."),
    "persona infer": ("orca2.stages.persona:INFER", "Each user's BigFive facets from their posts, chunk by chunk."),
    "persona augment": ("orca2.stages.persona:AUGMENT", "Per user a profile; per post its psychological activity."),
    "persona build": ("orca2.stages.persona:BUILD", "PCIP records (PTIT or PSIT) for orca2 train."),
    "sample": ("orca2.stages.sample:STAGE", "The student writes K replies per prompt."),
    "judge": ("orca2.stages.judge:STAGE", "Score sampled replies (meta.judge); teacher replies join as positives."),
    "pairs": ("orca2.stages.pairs:STAGE", "Judged replies → preference records (DPO pairs or KTO labels)."),
    "train": (
        "orca2.train.trainer:STAGE",
        "Fine-tune the student with DeepSpeed: SFT on teacher tokens, DPO, KTO.",
    ),
    "eval": ("orca2.eval.evaluate:STAGE", "Evaluate a model on benchmarks under system-prompt conditions."),
    "iterate": ("orca2.stages.iterate:STAGE", None),
}


def load(name: str) -> Stage:
    """The Stage registered under `name` (imports its module)."""
    module, _, attribute = REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(module), attribute)


def _nothing(summary: dict[str, Any], cfg: Any) -> str:
    return ""


@dataclass(frozen=True)
class Stage:
    """One stage as the CLI and `orca2 run` see it."""

    name: str  # its command: "generate", "persona infer"
    config: type  # its frozen config dataclass; flags, YAML keys and defaults come from its fields
    run: Callable[[Any], dict[str, Any]] | None  # config → summary (what it kept, dropped, wrote); None: a run step
    show: Callable[[dict[str, Any], Any], str] = _nothing  # (summary, config) → what the command prints
    # --- in `orca2 run` (a stage without `wire` is not a step of the chain) ---
    wire: Callable[[Any], Any] | None = None  # the run → its config: its section, paths and seed filled in
    files: Callable[[Any, Any], tuple[list[Path], list[Path]]] | None = None  # (run, config) → (inputs, outputs)
    step: Callable[[Any, Any, bool], dict[str, Any]] | None = None  # (run, config, resume) → the manifest's counts
    prepare: Callable[[Any], None] | None = None  # before any config is built: what its presence changes in the run
