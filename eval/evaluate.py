"""Stage `eval`: a model on benchmarks under empty / cautious / strategy system prompts; scored, analysed, reported.

    orca2 eval --model runs/student/model --bench gsm8k,bbh --system empty,cautious -o reports/student

For each condition (system prompt) and benchmark task, items go through the same teacher clients as
generation (batched local generation, or an OpenAI-compatible endpoint with concurrency, retries and
the response cache, so a re-run skips finished items). Each item's response, extracted answer,
correctness and detected strategy are saved as records in <output>/<condition>/items.jsonl.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from orca2.answers import extract_answer, gold_value, infer_answer_type
from orca2.cache import ResponseCache, default_cache_dir, request_key
from orca2.config import save_config
from orca2.errors import Orca2Error
from orca2.eval.benchmarks import default_data_dir, load_items, load_registry, select
from orca2.eval.usage import CATEGORIES, classify
from orca2.generate import redacted, teacher_id
from orca2.io import atomic_text, write_records
from orca2.prompts import generic_prompt
from orca2.records import with_system_prompt
from orca2.strategies import Library
from orca2.teachers import ClientConfig, Sampling, parse_teacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    model: str  # HF folder | local:default | local:<path> | openai:<model>
    output: str  # report folder
    bench: tuple[str, ...] = ("gsm8k", "bbh")  # benchmark names, or name/task for one task
    system: tuple[str, ...] = ("empty",)  # conditions: empty | cautious | strategy:NAME | path of a text file
    label: str | None = None  # the model's name in reports (default: derived from `model`)
    benchmarks: tuple[str, ...] = ()  # extra benchmark YAML files
    data_dir: str | None = None  # default $ORCA2_DATA_DIR, else ../shared/data
    limit: int | None = None  # items per task
    strategies: tuple[str, ...] = ()  # extra strategy files, for strategy:NAME conditions
    client: ClientConfig = field(default_factory=ClientConfig)
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=512))

    def __post_init__(self) -> None:
        if self.model.startswith(("openai:", "local:")):
            parse_teacher(self.model)
        if not self.system or not self.bench:
            raise Orca2Error("eval: give at least one --bench and one --system condition")


def model_spec(model: str) -> str:
    """A model argument as a teacher spec: a bare folder or .gguf path becomes local:<path>."""
    if model.startswith(("openai:", "local:")):
        parse_teacher(model)
        return model
    path = Path(model)
    if not path.exists():
        raise Orca2Error(f"model '{model}': no such folder or file (use openai:<model> for an endpoint, local:default for SmolLM2)")
    if path.is_dir() and not (path / "config.json").exists():
        raise Orca2Error(f"{path}: not a model folder (no config.json)")
    if path.is_dir() and not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise Orca2Error(f"{path}: the model folder has no tokenizer")
    return f"local:{path}"


def default_label(spec: str) -> str:
    """A model's name in reports: the folder name (its parent for a run's .../model folder), else the spec."""
    if not spec.startswith("local:"):
        return spec
    path = Path(spec.split(":", 1)[1])
    return path.parent.name if path.name == "model" else path.name


def system_text(condition: str, library: Library, task: str) -> str:
    """The system prompt a condition stands for."""
    if condition.startswith("strategy:"):
        return library.get(condition.split(":", 1)[1]).system_text(task)
    return generic_prompt(condition)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (sound at 0 and 100 %, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every (condition, benchmark task); write items, report.json, report.md and plots."""
    from orca2.dispatch import Request, dispatch
    from orca2.eval.report import plot_accuracy, plot_usage, render_report
    from orca2.teachers import make_teacher

    spec = model_spec(cfg.model)
    label = cfg.label or default_label(spec)
    library = Library.load(cfg.strategies)
    registry = load_registry(cfg.benchmarks)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    chosen = select(registry, cfg.bench)
    items = {bench.name: load_items(bench, task, data_dir, cfg.limit) for bench, task in chosen}
    for condition in cfg.system:
        system_text(condition, library, "x")  # unknown names fail now, before any request
    cache_id = teacher_id(spec)
    params = cfg.sampling.to_dict()
    plan = []
    for condition in cfg.system:
        for bench_name, records in items.items():
            for record in records:
                messages = with_system_prompt(record["messages"], system_text(condition, library, record["task"]))
                plan.append((condition, bench_name, record, Request(request_key(cache_id, messages, params), messages)))
    output = Path(cfg.output)
    cache = ResponseCache(cfg.client.cache_dir or default_cache_dir())
    try:
        result = dispatch(lambda: make_teacher(spec, cfg.client), [r for *_, r in plan], cfg.sampling, cfg.client, cache,
                          desc=f"eval {label}")
        failed = result.failures
        if result.aborted:
            failed = {r.key: failed.get(r.key, result.aborted) for *_, r in plan if r.key not in cache}
        by_condition: dict[str, list[dict[str, Any]]] = {c: [] for c in cfg.system}
        for condition, bench_name, record, request in plan:
            response = cache.get(request.key)
            answer_type = record["meta"].get("answer_type") or infer_answer_type(record.get("answer") or "")
            meta = {**record["meta"], "condition": condition, "model": label}
            if response is None:
                meta.update(error=failed.get(request.key, "no response"), correct=False, strategy_used=None)
                content = ""
            else:
                content = response["contents"][0]
                extracted = extract_answer(content, answer_type)
                gold = gold_value(record["answer"], answer_type) if record.get("answer") else None
                meta.update(extracted_answer=extracted.value, extraction=extracted.method,
                            correct=gold is not None and extracted.value == gold, strategy_used=classify(content),
                            response_words=len(content.split()), completion_tokens=response["completion_tokens"],
                            finish_reason=response["finish_reasons"][0])
            by_condition[condition].append({"id": record["id"], "task": record["task"],
                                            "messages": request.messages + [{"role": "assistant", "content": content}],
                                            "answer": record.get("answer"), "meta": meta})
    finally:
        cache.close()
    report = {"model": label, "spec": spec, "conditions": list(cfg.system), "benchmarks": {}, "failed": len(failed)}
    for condition, rows in by_condition.items():
        safe = condition.replace("/", "_").replace(":", "-")
        write_records(output / safe / "items.jsonl", rows)
        report["benchmarks"].setdefault(condition, summarise(rows, {b.name: b for b, _ in chosen}))
    with atomic_text(output / "report.json") as f:
        f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    plot_accuracy([report], output / "accuracy.png")
    plot_usage([report], output / "strategy_usage.png")
    with atomic_text(output / "report.md") as f:
        f.write(render_report([report], registry))
    save_config(redacted(cfg), output / "config.yaml")
    if failed:
        raise Orca2Error(f"{len(failed)} of {len(plan)} items got no response (first: {next(iter(failed.values()))}); "
                         f"the rest are scored in {output}/report.md; re-running retries only the missing ones")
    return report


def summarise(rows: list[dict[str, Any]], benches: dict[str, Any]) -> dict[str, Any]:
    """Per task: accuracy with a 95 % CI, strategy usage, mean response length; per benchmark: micro or macro."""
    tasks: dict[str, dict[str, Any]] = {}
    for row in rows:
        t = tasks.setdefault(row["task"], {"benchmark": row["meta"]["benchmark"], "n": 0, "correct": 0, "words": 0,
                                           "usage": {c: 0 for c in CATEGORIES}, "failed": 0})
        t["n"] += 1
        t["correct"] += bool(row["meta"]["correct"])
        t["words"] += row["meta"].get("response_words", 0)
        if row["meta"].get("strategy_used"):
            t["usage"][row["meta"]["strategy_used"]] += 1
        else:
            t["failed"] += 1
    out: dict[str, Any] = {"tasks": {}, "overall": {}}
    for name, t in sorted(tasks.items()):
        low, high = wilson(t["correct"], t["n"])
        out["tasks"][name] = {"benchmark": t["benchmark"], "n": t["n"], "correct": t["correct"],
                              "accuracy": t["correct"] / t["n"], "ci95": [low, high], "mean_words": t["words"] / t["n"],
                              "usage": {k: v / t["n"] for k, v in t["usage"].items()}, "failed": t["failed"]}
    for bench_name, bench in benches.items():
        mine = [v for v in out["tasks"].values() if v["benchmark"] == bench_name]
        if not mine:
            continue
        n, correct = sum(v["n"] for v in mine), sum(v["correct"] for v in mine)
        if bench.aggregate == "macro" and len(mine) > 1:
            acc = sum(v["accuracy"] for v in mine) / len(mine)
            # CI of a mean of independent task accuracies: 1.96 sqrt(Σ var_i) / k, each var_i from the
            # Agresti-Coull estimate (c + 2) / (n + 4), which stays positive at 0 % and 100 %
            variances = [((v["correct"] + 1.92) / (v["n"] + 3.84)) * (1 - (v["correct"] + 1.92) / (v["n"] + 3.84))
                         / (v["n"] + 3.84) for v in mine]
            half = 1.96 * math.sqrt(sum(variances)) / len(mine)
            ci = [max(0.0, acc - half), min(1.0, acc + half)]
        else:
            acc, ci = correct / n, list(wilson(correct, n))
        out["overall"][bench_name] = {"n": n, "correct": correct, "accuracy": acc, "ci95": ci, "aggregate": bench.aggregate,
                                      "tasks": len(mine), "reference": bench.reference}
    return out
