"""Stage `generate`: each task under its strategy's system prompt → the teacher → a trace record.

    orca2 generate --tasks tasks.jsonl --assign assignment.yaml --teacher openai:gpt-4o -o traces.jsonl

Responses go to the content-addressed cache as they arrive; the output is assembled from the cache
in input order once every request is answered or has failed for good, so re-running the same command
after Ctrl-C or kill -9 pays only for what is missing. Failures go to <output>.errors.jsonl.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from orca2.ask import Answers, Request, ask
from orca2.config import option, save_config
from orca2.errors import Orca2Error
from orca2.io import atomic_text, atomic_writer, read_numbered, sidecar, write_errors
from orca2.models import SPEC_FORMS, ClientConfig, Sampling, parse_model
from orca2.records import Record, with_system_prompt
from orca2.stages import Stage
from orca2.strategies import Assignment, Library, Strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    tasks: str = option(help="Task records (from orca2 tasks).")
    output: str = option(help="Traces to write.", short="-o")
    teacher: str = option(help="The teacher: " + SPEC_FORMS + ".")
    assign: str | None = option(None, "Assignment YAML (task pattern → strategy), e.g. from orca2 select.")
    strategy: str | None = option(None, "One strategy for every task (instead of assign).")
    strategies: tuple[str, ...] = option((), "Extra strategy YAML files or folders.")
    client: ClientConfig = option(help="How requests are sent.", factory=ClientConfig, flatten=True)
    sampling: Sampling = option(help="How replies are sampled.", factory=Sampling, flatten=True)
    prices: dict[str, dict[str, float]] = option(
        help="Model → {prompt, completion} USD per 1M tokens, for the cost estimate.", factory=dict
    )
    allow_failures: bool = option(False, "Exit 0 even if some requests failed for good.")
    limit: int | None = option(None, "Only the first N tasks.")

    def __post_init__(self) -> None:
        if (self.assign is None) == (self.strategy is None):
            raise Orca2Error("generate: give exactly one of --assign FILE or --strategy NAME")
        parse_model(self.teacher)
        for model, price in self.prices.items():
            if set(price) - {"prompt", "completion"}:
                raise Orca2Error(f"prices.{model}: keys are 'prompt' and 'completion' (USD per 1M tokens)")


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """A task put to the teacher: the record, the strategy and the messages sent."""

    record: Record
    strategy: Strategy
    messages: list[dict[str, str]]

    def request(self) -> Request:
        """What the model is asked; a program model also sees the task's gold answer and meta."""
        return Request(
            self.messages,
            {**self.record.get("meta", {}), "answer": self.record.get("answer"), "task": self.record["task"]},
        )


def prepare(path: str, chooser: Any, library: Library, limit: int | None) -> Iterator[Prepared]:
    """Stream tasks with their strategy messages; `chooser(task, record_id) -> strategy name`."""
    for count, (lineno, record) in enumerate(read_numbered(path)):
        if limit is not None and count >= limit:
            return
        if record["messages"][-1]["role"] != "user":
            raise Orca2Error(
                f"{path}:{lineno}: field 'messages': the last message must be the user's task, "
                f"got a {record['messages'][-1]['role']} message"
            )
        try:
            strategy = library.get(chooser(record["task"], record["id"]))
        except Orca2Error as exc:
            raise Orca2Error(f"{path}:{lineno}: task '{record['task']}': {exc}") from None
        messages = with_system_prompt(record["messages"], strategy.system_text(record["task"]))
        yield Prepared(record, strategy, messages)


def trace_records(item: Prepared, answers: Answers, i: int, response: dict[str, Any]) -> Iterator[Record]:
    """The output records for one answered task: one per sample."""
    n = len(response["contents"])
    for k, content in enumerate(response["contents"]):
        meta = dict(item.record.get("meta", {}))
        provenance = answers.provenance(i, response, k)
        meta.update(
            {
                "strategy": item.strategy.name,
                "prompt_hash": prompt_hash(item.messages[0]["content"]),
                "teacher": provenance.pop("model"),
                **provenance,
            }
        )
        if n > 1:
            meta.update(sample=k, task_id=item.record["id"], usage_per="request")
        yield {
            "id": item.record["id"] if n == 1 else f"{item.record['id']}#{k}",
            "task": item.record["task"],
            "messages": item.messages + [{"role": "assistant", "content": content}],
            "answer": item.record.get("answer"),
            "meta": meta,
        }


def estimate_cost(
    prices: dict[str, dict[str, float]], spec: str, prompt_tokens: int, completion_tokens: int
) -> float | None:
    """USD at the listed per-1M-token prices; the Batch API bills half of them."""
    scheme, model = spec.split(":", 1)
    price = prices.get(model) or prices.get(spec)
    if price is None:
        return None
    usd = (prompt_tokens * price.get("prompt", 0.0) + completion_tokens * price.get("completion", 0.0)) / 1e6
    return usd / 2 if scheme == "batch" else usd


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate traces for every task; return the summary (also saved as <output>.summary.json)."""
    library = Library.load(cfg.strategies)
    if cfg.assign is not None:
        assignment = Assignment.load(cfg.assign, library)
        chooser = assignment.strategy_for
    else:
        library.get(cfg.strategy)  # type: ignore[arg-type]
        chooser = lambda task, record_id: cfg.strategy  # noqa: E731
    spec = parse_model(cfg.teacher)
    requests = [p.request() for p in prepare(cfg.tasks, chooser, library, cfg.limit)]
    errors: list[Record] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    by_strategy: dict[str, int] = {}
    finish: dict[str, int] = {}
    answered = written = 0
    with (
        ask(spec, requests, cfg.sampling, cfg.client, desc=f"generate {cfg.teacher}", library=library) as answers,
        atomic_writer(cfg.output) as sink,
    ):
        del requests  # the answers are read back from the cache, streaming the tasks a second time
        result = answers.result
        for i, item in enumerate(prepare(cfg.tasks, chooser, library, cfg.limit)):
            response = answers.response(i)
            if response is None:
                errors.append(
                    {
                        "id": item.record["id"],
                        "task": item.record["task"],
                        "messages": item.messages,
                        "answer": item.record.get("answer"),
                        "meta": {**item.record.get("meta", {}), "strategy": item.strategy.name, "teacher": spec.id},
                        "error": answers.error(i),
                    }
                )
                continue
            answered += 1
            usage["prompt_tokens"] += response["prompt_tokens"]
            usage["completion_tokens"] += response["completion_tokens"]
            for trace in trace_records(item, answers, i, response):
                sink.write(trace)
                written += 1
                by_strategy[item.strategy.name] = by_strategy.get(item.strategy.name, 0) + 1
                finish[trace["meta"]["finish_reason"]] = finish.get(trace["meta"]["finish_reason"], 0) + 1
        cached_at_start = answers.cached_at_start
    errors_path = write_errors(cfg.output, errors)
    save_config(cfg, sidecar(cfg.output, "config.yaml"))
    summary: dict[str, Any] = {
        "output": cfg.output,
        "tasks": answered + len(errors),
        "records": written,
        "answered": answered,
        "cached_at_start": cached_at_start,
        "requested": result.requested,
        "done_this_run": result.done,
        "failed": len(errors),
        "retries": result.retries,
        "seconds": round(result.seconds, 2),
        "usage_this_run": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        "usage_total": usage,
        "cost_this_run_usd": estimate_cost(cfg.prices, spec.id, result.prompt_tokens, result.completion_tokens),
        "cost_total_usd": estimate_cost(cfg.prices, spec.id, usage["prompt_tokens"], usage["completion_tokens"]),
        "by_strategy": by_strategy,
        "finish_reasons": finish,
    }
    if errors:
        summary["errors"] = str(errors_path)
    if result.aborted:
        summary["aborted"] = result.aborted
    with atomic_text(sidecar(cfg.output, "summary.json")) as f:
        f.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return summary


def show(s: dict[str, Any], cfg: GenerateConfig) -> str:
    """What `orca2 generate` prints; failures stop the command (exit 1) unless allow_failures."""
    cost = (
        f", cost ≈ ${s['cost_this_run_usd']:.4f} (total ${s['cost_total_usd']:.4f})"
        if s["cost_total_usd"] is not None
        else ""
    )
    usage = s["usage_this_run"]
    text = (
        f"{s['answered']}/{s['tasks']} tasks answered ({s['cached_at_start']} from cache, {s['done_this_run']} new, "
        f"{s['failed']} failed, {s['retries']} retries); tokens this run: {usage['prompt_tokens']} prompt + "
        f"{usage['completion_tokens']} completion{cost}\nwrote {s['records']} traces to {s['output']}"
    )
    if s["failed"]:
        message = (
            f"{s['failed']} of {s['tasks']} tasks failed (listed in {s['errors']}); "
            f"finished responses are cached, so re-running the same command retries only these"
        )
        if s.get("aborted"):
            message = f"run stopped early: {s['aborted']}; " + message
        if not cfg.allow_failures:
            print(text)
            raise Orca2Error(message)
        print(f"warning: {message}", file=sys.stderr)
    return text


def wire(run_: Any) -> GenerateConfig:
    """In `orca2 run`: the run's tasks, under select's assignment (or the config's own) when there is one."""
    wired: dict[str, Any] = {"tasks": str(run_.paths["tasks"]), "output": str(run_.paths["traces"])}
    if "select" in run_.stages or "assignment" in run_.data:
        wired["assign"] = str(run_.paths["assignment"])
    return run_.build(GenerateConfig, run_.section("generate", wired, client=True), "generate.")


def files(run_: Any, cfg: GenerateConfig) -> tuple[list[Path], list[Path]]:
    assignment = [run_.paths["assignment"]] if run_.paths["assignment"].exists() else []
    return [run_.paths["tasks"], *assignment], [run_.paths["traces"]]


def step(run_: Any, cfg: GenerateConfig, resume: bool) -> dict[str, Any]:
    summary = run(cfg)
    if summary["failed"] and not cfg.allow_failures:
        raise Orca2Error(
            f"{summary['failed']} of {summary['tasks']} teacher requests failed (see {summary['errors']}); "
            "re-running retries only those"
        )
    return {k: summary[k] for k in ("tasks", "records", "answered", "failed", "cached_at_start")}


STAGE = Stage("generate", GenerateConfig, run, show, wire, files, step)
